"""
Image quality against training steps (the paper's headline), in one command: every kept checkpoint of a run
(RUN/checkpoints/step-NNNNNNN.pt: EMA-only files, every --keep-every steps and at the last), in step order.

    torchrun --nproc_per_node=8 experiments/curve.py --run-dir runs/in256-xl2 --metric fid \\
        --reference VIRTUAL_imagenet256_labeled.npz --inception pt_inception-2015-12-05-6726825d.pth \\
        --num-samples 10000 --steps 99 --temperature 0.9 --out runs/in256-xl2/curve
    python experiments/curve.py --config fmnist --run runs/fmnist-flow --metric fid-lenet --data-dir DIR \\
        --out runs/fmnist-flow/curve          # --config: a preset's sampler (its "sample" section)

A checkpoint's N samples are sample.py's with the same flags, however many processes draw them (each rank its
batches, into OUT/.parts-step-NNNNNNN); rank 0 scores them (fid: fid.py's FID and Inception Score, grey images as
RGB; fid-lenet: evaluate.py's FID-LeNet, accuracy and coverage) into OUT/step-NNNNNNN.json, with the settings. One
scored already is skipped: a stopped sweep resumes, or catches up with a run still training; another sweep into the
same --out is refused. Last, OUT/curve.md (step, metrics, seconds) and OUT/curve.png are written together.
"""

import dataclasses
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
import numpy as np

import evaluate
import fid
import sample
import vfm
from experiments.studies.common import need_scoring, pyplot
from support import checkpoint, config, datasets, distributed, files, inception, lenet
from support.cli import UserError, check_finite, check_output_files, check_positive, check_seed, make_dir, run_command
from support.cli import user_errors
from support.config import flag
from support.metrics import frechet_distance, gaussian_fit

KEPT, SCORED = re.compile(r"step-(\d{7,})\.pt"), re.compile(r"step-(\d{7,})\.json")
METRICS = {"fid": [("fid", "FID"), ("inception_score", "Inception Score")],
           "fid-lenet": [("fid", "FID-LeNet"), ("accuracy", "accuracy"), ("coverage", "coverage")]}
SAMPLING = ("num_samples", "temperature", "cfg_scale", "cfg_interval", "steps", "solver", "dfm_sampler", "precision",
            "seed", "batch_size")  # sample.py's flags (its help, its defaults), recorded with every score
Settings = dataclasses.make_dataclass("Settings", [
    ("run_dir", str, flag(None, "a run of train.py (its --out) with kept checkpoints; `--run` will do, except under "
                                "torchrun, which takes it for its --run-path", required=True)),
    ("out", str, flag(None, "the scores: step-NNNNNNN.json per checkpoint, curve.md and curve.png", required=True)),
    ("metric", str, flag("fid", "fid: Inception FID and IS (fid.py); fid-lenet: 28 x 28 runs (evaluate.py)",
                         choices=tuple(METRICS))),
    ("reference", str, flag(None, f"--metric fid: ADM's reference batch, {fid.REFERENCE_FILE}")),
    ("inception", str, flag(None, f"--metric fid: the Inception weights, {inception.WEIGHTS_FILE}")),
    ("data_dir", str, flag(None, "--metric fid-lenet: the directory of the dataset's IDX files")),
    ("classifier", str, flag(None, "--metric fid-lenet: evaluate.py's classifier file (default: its cache)")),
    *((f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
      for f in dataclasses.fields(sample.Settings) if f.name in SAMPLING + ("tokenizer", "tokenizer_ckpt"))])


def kept_checkpoints(run):
    """[(step, path)] of RUN/checkpoints/step-NNNNNNN.pt in step order; a UserError where there are none."""
    if not os.path.isdir(run):
        raise UserError(f"{run}: no such run directory; expected the --out of train.py")
    where = os.path.join(run, "checkpoints")
    names = os.listdir(where) if os.path.isdir(where) else []
    kept = sorted((int(m[1]), os.path.join(where, m[0])) for m in map(KEPT.fullmatch, names) if m)
    if not kept:
        raise UserError(f"{where}: no kept checkpoints (step-NNNNNNN.pt); train with --keep-every N")
    return kept


def scored(out, settings):
    """{step: record} of the OUT/step-NNNNNNN.json there are; a UserError where one is of another sweep."""
    records = {}
    for m in filter(None, map(SCORED.fullmatch, sorted(os.listdir(out)))):
        path = os.path.join(out, m[0])
        try:
            with open(path) as f:
                records[int(m[1])] = record = json.load(f)
            earlier = dict(record["settings"])
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{path}: not a score of experiments/curve.py; move it away, or choose another "
                            f"--out") from None
        for k in [k for k in {**settings, **earlier} if earlier.get(k) != settings.get(k)][:1]:
            raise UserError(f"{path}: scored with --{k.replace('_', '-')} {earlier.get(k)}, not {settings.get(k)}; "
                            f"rerun with that sweep's settings to resume it, or choose another --out")
    return records


def scorer(s, dataset, device, rank, world):
    """score(images, labels) -> {metric: value} on rank 0, its network and the real side ready; a UserError there
    is raised on every rank (rank 0 says it), so that none waits alone."""
    message = None
    try:
        if rank == 0 and s.metric == "fid-lenet":
            need_scoring(dataset, s)  # the IDX files, and the classifier (trained now if its file is absent)

            def score(images, labels):
                m = evaluate.evaluate_images(images, labels, dataset, s.data_dir, s.classifier)
                return {k: m[k] for k in ("fid", "accuracy", "coverage")}
        elif rank == 0:
            with user_errors():
                model = inception.load(s.inception, device)
                mu, sigma, _ = fid.reference_statistics(s.reference, model, 100, device)

            def score(images, labels):
                rgb = images if images.shape[-1] == 3 else np.repeat(images, 3, axis=-1)
                features, logits = fid.inception_outputs(model, rgb, 100, device, "Inception features")
                is_mean, is_std = fid.inception_score(logits)
                return dict(fid=frechet_distance(*gaussian_fit(features), mu, sigma), inception_score=is_mean,
                            inception_score_std=is_std)
    except UserError as e:
        message = str(e)
    message = distributed.all_gather_object(message, world)[0]
    if message:
        raise UserError(message)
    return score if rank == 0 else None


def sample_and_score(s, step, path, settings, score, rank, world, device):
    """Every rank draws its batches of the checkpoint's N samples; rank 0 scores them into OUT/step-NNNNNNN.json."""
    start = time.time()
    with user_errors():
        flow = checkpoint.Flow(path, device, tokenizer=s.tokenizer, tokenizer_ckpt=s.tokenizer_ckpt)
    labels = sample.sample_labels(s.num_samples, flow.num_classes)
    kw = dict(steps=s.steps, solver=s.solver, temperature=s.temperature, cfg_scale=s.cfg_scale,
              cfg_interval=tuple(settings["cfg_interval"]), precision=settings["precision"], dfm_sampler=s.dfm_sampler)
    batch = lambda b: dict(images=sample.generate_batch(flow, labels, s.seed, b, s.batch_size, **kw))
    drawn = distributed.gather_batches(os.path.join(s.out, f".parts-step-{step:07d}"),
                                       -(-s.num_samples // s.batch_size), batch, rank, world,
                                       desc=f"step {step} ({world} process(es))")
    if rank == 0:
        images, sampled = drawn["images"], time.time() - start
        metrics = score(images, labels if flow.num_classes else None)
        path_json = os.path.join(s.out, f"step-{step:07d}.json")
        files.write_json(path_json, dict(step=step, checkpoint=os.path.abspath(path), **metrics,
                                         num_samples=len(images), processes=world, sample_seconds=round(sampled, 1),
                                         seconds=round(time.time() - start, 1), settings=settings))
        said = "  ".join(f"{title} {metrics[k]:.4g}" for k, title in METRICS[s.metric] if metrics[k] is not None)
        print(f"step {step}: {said} ({time.time() - start:.0f} s) -> {path_json}", flush=True)


def write_curve(s, settings):
    """OUT/curve.md and OUT/curve.png from every score in OUT, written together."""
    records, columns = [r for _, r in sorted(scored(s.out, settings).items())], METRICS[s.metric]
    cell = lambda v: "-" if v is None else f"{v:.4g}"
    table = files.markdown_table(["step", *(t for _, t in columns), "seconds"],
                                 [[r["step"], *(cell(r[k]) for k, _ in columns), r["seconds"]] for r in records])
    shown = " ".join(f"--{k.replace('_', '-')} {':'.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in settings.items() if k not in ("run_dir", "metric"))
    plt, steps = pyplot(), [r["step"] for r in records]
    fig, axes = plt.subplots(1, len(columns), figsize=(4.5 * len(columns), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], columns):
        points = [(r["step"], r[key]) for r in records if r[key] is not None]
        if points:
            ax.plot(*zip(*points), "-o", ms=3)
        ax.set_xscale("log" if 0 < 100 * min(steps) <= max(steps) else "linear")  # steps spanning decades
        ax.set(xlabel="training steps", ylabel=title)
    fig.suptitle(f"{os.path.basename(os.path.abspath(s.run_dir))}: {s.num_samples:,} samples per checkpoint",
                 fontsize=10)
    fig.tight_layout()
    md, png = os.path.join(s.out, "curve.md"), os.path.join(s.out, "curve.png")
    files.write_together({md: lambda p: files.write_text(p, f"{table}\n{s.metric} of {settings['run_dir']}'s kept "
                                                            f"checkpoints (EMA weights): {shown}\n"),
                          png: files.figure(fig)})
    print(f"{table}\n{len(records)} checkpoint(s) -> {md}, {png}")


def curve(s):
    check_positive(s, "num_samples", "steps", "batch_size")
    check_finite(s, "cfg_scale")
    check_seed(s)
    with user_errors():
        vfm.parse_temperature(s.temperature)
        cfg_interval = vfm.parse_cfg_interval(s.cfg_interval)
    kept = kept_checkpoints(s.run_dir)
    with user_errors():
        first = checkpoint.load_any(kept[0][1])
    dataset, objective = first["codes_meta"].get("dataset"), first["settings"]["objective"]
    if objective == "dfm" and s.solver != "euler":
        raise UserError(f"{s.run_dir}: a DFM run samples with its discrete Euler step only, not --solver {s.solver}")
    if s.metric == "fid":
        for value, name, what in ((s.reference, "reference", f"ADM's reference batch, e.g. {fid.REFERENCE_FILE}, "
                                   f"published at {fid.REFERENCE_URL}"), (s.inception, "inception", f"the FID "
                                   f"Inception weights {inception.WEIGHTS_FILE}, at {inception.WEIGHTS_URL}")):
            if not value:
                raise UserError(f"--metric fid needs --{name}: {what}")
            fid.check_file(value, what)
        scoring = dict(reference=os.path.abspath(s.reference), inception=os.path.abspath(s.inception))
    elif dataset not in datasets.CLASS_NAMES:
        raise UserError(f"--metric fid-lenet scores 28 x 28 runs of {' or '.join(datasets.CLASS_NAMES)}; "
                        f"{s.run_dir} was trained on {dataset} codes: use --metric fid")
    elif not s.data_dir:
        raise UserError("--metric fid-lenet needs --data-dir (the directory of the dataset's IDX files)")
    else:
        scoring = dict(data_dir=os.path.abspath(s.data_dir),
                       classifier=os.path.abspath(s.classifier or lenet.default_classifier_path(dataset)))
    make_dir(s.out)
    check_output_files(s.out, "curve.md", "curve.png")
    with distributed.processes() as (rank, world, device):
        settings = dict(run_dir=os.path.abspath(s.run_dir), metric=s.metric, **{k: getattr(s, k) for k in SAMPLING},
                        **scoring)
        settings.update(cfg_interval=list(cfg_interval), precision=distributed.autocast_context(s.precision, device)[0])
        scored(s.out, settings)  # another sweep's scores there: refused before anything is loaded
        score = scorer(s, dataset, device, rank, world)
        done = distributed.all_gather_object(set(scored(s.out, settings)), world)[0]  # rank 0's view, for every rank
        for step, path in kept:
            if step not in done:
                sample_and_score(s, step, path, settings, score, rank, world, device)
        if rank == 0:
            write_curve(s, settings)


def main(argv=None):
    run_command(lambda: curve(config.parse(Settings, argv, "sample", "Sample and score every kept checkpoint of a "
                                           "run: FID against training steps.")))  # --config: a preset's sampler


if __name__ == "__main__":
    main()
