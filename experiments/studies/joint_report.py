"""
The joint study's report (experiments/studies/joint.py): its table, the note on how it was measured, and its two
figures, the training curves and the samples beside the reconstructions.
"""

import numpy as np

from experiments.studies.common import mean_spread, pyplot
from support import files, images

ARMS = ("frozen", "finetune", "joint")
ARM_COLORS = dict(zip(ARMS, ("tab:blue", "tab:orange", "tab:green")))


def table(rows, b):
    def cell(arm, key, sub=None):
        values = [(r[key][sub] if sub else r[key]) for r in rows if r["arm"] == arm]
        return mean_spread(values)

    return files.markdown_table(
        ["arm", "accuracy", "FID-LeNet", "ceiling accuracy", "ceiling FID-LeNet", "test MSE", "usage", "perplexity",
         "nearest code", "spread", "codes moved", "minutes"],
        [[arm, cell(arm, "accuracy"), cell(arm, "fid"), cell(arm, "ceiling", "accuracy"), cell(arm, "ceiling", "fid"),
          cell(arm, "test_mse"), cell(arm, "usage"), cell(arm, "perplexity"), cell(arm, "nearest"),
          cell(arm, "spread"), cell(arm, "moved"),
          mean_spread([sum(r["seconds"].values()) / 60 for r in rows if r["arm"] == arm])] for arm in ARMS])


def note(b, draw, preset, seed, w, tokenizer_lr):
    return (f"Each arm: {b['tokenizer_steps']} tokenizer updates (batch {b['tokenizer_batch']}, lr {tokenizer_lr}) "
            f"and {b['flow_steps']} flow updates (configs/{preset}.json's flow, batch {b['flow_batch']}); finetune "
            f"trains the last {b['together']} together, joint all but the first {b['warmup']} tokenizer steps; flow "
            f"weight on the codebook w = {w:g}. {b['num_samples']} samples of the EMA flow ({draw['steps']} "
            f"{draw['solver']} steps, guidance {draw['cfg_scale']} for t in {list(draw['cfg_interval'])}) against "
            f"the test split; ceiling: the arm's reconstructions of the first {b['num_samples']} training images, "
            f"scored the same way; test MSE, usage and perplexity on the test split; nearest code: mean distance to "
            f"the nearest other code; spread: mean distance between two codes; codes moved: mean distance from where "
            f"they were when the flow started. Mean ± half the range over {b['seeds']} seeds from {seed}; "
            f"minutes: training, shared stages counted in every arm that uses them.")


def figure_curves(rows, b, dataset):
    """The training logs of the first seed, each value of one training batch: the flow's loss, the tokenizer's
    reconstruction error and the codes' nearest-neighbour distance, against each part's own updates."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    first = rows[0]["seed"]
    for r in (r for r in rows if r["seed"] == first):
        log = r["log"]
        flow = [(e["flow_step"], e["flow"]) for e in log if "flow" in e]
        rec = [(e["tokenizer_step"], e["rec"]) for e in log if "rec" in e]
        geometry = [(e["tokenizer_step"], e["nearest"]) for e in log]  # the flow alone: the codes where they stopped
        for ax, points in zip(axes, (flow, rec, geometry)):
            if points:
                ax.plot(*zip(*sorted(points)), "-", lw=1.2, c=ARM_COLORS[r["arm"]], label=r["arm"])
    for ax, (xlabel, ylabel) in zip(axes, (("flow updates", "flow loss (cross-entropy + z-loss, training batch)"),
                                           ("tokenizer updates", "reconstruction MSE (training batch)"),
                                           ("tokenizer updates", "mean distance to the nearest other code"))):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(f"{dataset}: the tokenizer frozen, fine-tuned with the flow, or trained with it (seed {first})",
                 fontsize=10)
    fig.tight_layout()
    return files.figure(fig)


def class_rows(samples, sample_labels, real, recon, real_labels):
    """A row per class: its first two samples, then its first real image and that image's reconstruction (white
    where there is none)."""
    white = np.full(samples.shape[1:], 255, np.uint8)

    def nth(pictures, labels, c, k):
        where = np.nonzero(labels == c)[0]
        return pictures[where[k]] if len(where) > k else white

    return np.stack([nth(pictures, labels, c, k) for c in range(10) for pictures, labels, k in
                     ((samples, sample_labels, 0), (samples, sample_labels, 1), (real, real_labels, 0),
                      (recon, real_labels, 0))])


def figure_pictures(pictures):
    """Per arm, a row per class: two guided samples, a real training image, its reconstruction by the arm's
    tokenizer."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(pictures), figsize=(3.2 * len(pictures), 7), squeeze=False)
    for ax, (arm, rows) in zip(axes[0], pictures.items()):
        ax.imshow(np.asarray(images.image_grid(rows, 4, scale=1).convert("RGB")))
        ax.set_title(f"{arm}: samples | real | reconstruction", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return files.figure(fig)
