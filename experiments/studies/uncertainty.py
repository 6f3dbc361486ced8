"""
The posterior's uncertainty along the path: the per-token entropy of Purrception's q(c | z_t), and what its most
likely codes decode to, at several times of one sampling path per class.
"""

import math
import os

import numpy as np
import torch

from experiments.studies.common import clock, load_flow, need, pyplot, refuse_to_replace, write_outputs
from support import files, images

# What each budget runs.
BUDGETS = {
    "tiny": dict(classes=2, times=3, steps=4),
    "full": dict(classes=6, times=8, steps=100),
}


@torch.no_grad()
def run(args):
    """Per-token entropy of q(c | z_t) and the decoded argmax at several times of one Euler path per class."""
    b, start = BUDGETS[args.budget], clock()
    refuse_to_replace(args, "uncertainty")
    flow = load_flow(need(args.ckpt, "uncertainty needs --ckpt RUN/checkpoints/last.pt (a Purrception run)"),
                     ("purrception",), "uncertainty")
    classes = max(1, min(b["classes"], flow.num_classes))
    labels = torch.arange(classes) if flow.num_classes else None
    picks = np.unique(np.round(np.linspace(0, b["steps"] - 1, b["times"])).astype(int)).tolist()
    captured, evaluations = [], []  # (t, logits) at the chosen evaluations; the time of every evaluation

    def callback(t, z, logits):
        if len(evaluations) in picks:
            captured.append((t, logits.clone()))
        evaluations.append(t)

    g = torch.Generator().manual_seed(args.seed)
    final = flow.objective.sample(flow.model, (classes, *flow.grid), y=labels, steps=b["steps"], generator=g,
                                  callback=callback)  # (B, h, w)
    times = [t for t, _ in captured]
    entropy = torch.stack([entropy_of(logits) for _, logits in captured], 1)  # (B, T, h, w)
    argmax = torch.stack([logits.argmax(-1) for _, logits in captured], 1)  # (B, T, h, w)
    decoded = images.to_uint8(flow.tokenizer.decode(argmax.flatten(0, 1)))  # (B * T, H, W, C)
    decoded = decoded.reshape(classes, len(times), *decoded.shape[1:])
    final_images = images.to_uint8(flow.tokenizer.decode(final))
    agree = (argmax == final[:, None]).float().flatten(2).mean(2)  # (B, T)
    names = flow.meta.get("class_names") or [str(i) for i in range(classes)]
    names = [names[i] if labels is not None else str(i) for i in range(classes)]
    max_entropy = math.log(flow.objective.num_codes)

    header = ["sample"] + [f"t={t:.2f}" for t in times]
    table_rows = [[f"{names[i]}: entropy"] + [f"{entropy[i, j].mean():.2f}" for j in range(len(times))]
                  for i in range(classes)]
    table_rows.append(["all: entropy"] + [f"{entropy[:, j].mean():.2f}" for j in range(len(times))])
    table_rows.append(["all: argmax = final code"] + [f"{agree[:, j].mean():.0%}" for j in range(len(times))])
    note = (f"Mean per-token entropy of q(c | z_t) in nats (uniform over K = {flow.objective.num_codes}: "
            f"{max_entropy:.2f}) along one {b['steps']}-step Euler path per class, temperature 1, no guidance; "
            f"{flow.path} (step {flow.step}, EMA), seed {args.seed}.")
    plot = figure_along_path(names, times, entropy, decoded, final_images, max_entropy)
    return write_outputs(args, "uncertainty", files.markdown_table(header, table_rows), note,
                         dict(settings=b, ckpt=os.path.abspath(flow.path), step=flow.step, times=times,
                              classes=names, mean_entropy=entropy.mean((2, 3)).tolist(),
                              argmax_agrees_with_final=agree.tolist(), entropy_maps=entropy.tolist()), start,
                         {"uncertainty": plot})


def entropy_of(logits):
    """The entropy in nats of softmax(logits) over the last axis: -sum_k q_k log q_k."""
    log_q = torch.log_softmax(logits, -1)
    return -(log_q.exp() * log_q).sum(-1)


def figure_along_path(names, times, entropy, decoded, final_images, max_entropy):
    """A row per class: the entropy map and the decoded argmax at each time, then the final sample."""
    plt = pyplot()
    B, T = len(names), len(times)
    fig, axes = plt.subplots(B, 2 * T + 1, figsize=(0.95 * (2 * T + 1) + 0.8, 1.05 * B + 0.5), squeeze=False)
    for i in range(B):
        for j in range(T):
            im = axes[i, 2 * j].imshow(entropy[i, j].numpy(), cmap="magma", vmin=0, vmax=max_entropy,
                                       interpolation="nearest")
            axes[i, 2 * j + 1].imshow(decoded[i, j].squeeze(-1), cmap="gray", vmin=0, vmax=255)
            if i == 0:
                axes[i, 2 * j].set_title(f"t={times[j]:.2f}\nentropy", fontsize=7)
                axes[i, 2 * j + 1].set_title("\nargmax", fontsize=7)
        axes[i, -1].imshow(final_images[i].squeeze(-1), cmap="gray", vmin=0, vmax=255)
        axes[i, 0].set_ylabel(names[i], fontsize=7)
    axes[0, -1].set_title("final\nsample", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes, fraction=0.015, pad=0.01, label="entropy [nats]")
    return files.figure(fig, bbox_inches="tight")
