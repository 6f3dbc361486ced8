"""
What every study shares: its outputs (a markdown table, a JSON record, figures), drawing samples from a trained
flow exactly as sample.py draws them, and scoring images with evaluate.py.

Outputs are written together at the end, once every number and figure exists: a run that fails or is
interrupted before then leaves what an earlier run wrote in --out as it was. A study refuses to start where its
outputs already exist, unless --force.
"""

import json
import os
import time

import numpy as np

import evaluate
import sample
import train
from support import checkpoint, datasets, files, lenet
from support.cli import UserError, make_dir, user_errors

SAMPLE_BATCH = sample.BATCH_SIZE  # sample i gets the same noise as `sample.py --seed S`


# ---- Outputs: a markdown table, a JSON record, figures ---------------------------------------------------

def clock():
    """(wall seconds, CPU seconds of this process over all its threads): on a shared machine the second is the
    steadier measure of the work done."""
    return time.time(), time.process_time()


def output_paths(args, name, figures):
    """OUT/NAME.md, OUT/NAME.json and OUT/FIGURE.png for each figure name."""
    return [os.path.join(args.out, f) for f in (f"{name}.md", f"{name}.json", *(f"{fig}.png" for fig in figures))]


def refuse_to_replace(args, name, figures=None):
    """Before any work: the outputs of an earlier run (NAME.md, NAME.json and the figures, by default NAME.png)
    stay unless --force."""
    existing = [path for path in output_paths(args, name, figures or [name]) if os.path.exists(path)]
    if existing and not args.force:
        raise UserError(f"{existing[0]} exists (an earlier run): pass --force to replace that run's outputs, or "
                        f"choose another --out")


def write_outputs(args, name, table, note, record, start, figures):
    """OUT/NAME.md (the table, then a note on how it was measured), OUT/NAME.json and OUT/FIGURE.png for each of
    figures {FIGURE: files.figure(fig)}, written together; print the table."""
    record = dict(command=args.command_line, budget=args.budget, seconds=round(time.time() - start[0], 1),
                  cpu_seconds=round(time.process_time() - start[1], 1), **record)
    text = f"{table}\n{note}"
    md, js, *pngs = output_paths(args, name, figures)
    files.write_together({md: lambda path: files.write_text(path, text + "\n"),
                    js: lambda path: files.write_json(path, record),
                    **dict(zip(pngs, figures.values()))})
    print(text)
    print(f"{args.out}/{name}.md, {name}.json, {name}*.png written in {record['seconds']:.0f} s "
          f"({record['cpu_seconds']:.0f} CPU seconds)")
    return record


def mean_spread(values):
    """'mean ± half-range' over seeds (the value alone for one seed)."""
    values = [v for v in values if v is not None]
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def log_ticks(ax, values):
    """A log x axis labelled at exactly the values measured."""
    ax.set_xscale("log")
    ax.set_xticks(list(values), [str(v) for v in values])
    ax.minorticks_off()


def log_y(ax):
    """A log y axis with plain numbers (0.02, 0.05, ...) rather than powers of ten."""
    from matplotlib.ticker import FormatStrFormatter
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))


def metric_panels(plt, title):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].set_ylabel("classifier accuracy (higher is better)")
    axes[1].set_ylabel("FID-LeNet (lower is better)")
    fig.suptitle(title, fontsize=10)
    return fig, axes


def figure_metrics_vs(rows, series_key, x_key, series, title, xlabel, reference=None, log_x=None):
    """Accuracy and FID-LeNet against x_key, a line per series; log_x: the x values to label on a log axis."""
    plt = pyplot()
    fig, axes = metric_panels(plt, title)
    for ax, metric in zip(axes, ("accuracy", "fid")):
        for s in series:
            points = sorted((r[x_key], r[metric]) for r in rows if r[series_key] == s)
            if points:
                ax.plot(*zip(*points), "-o", ms=3, label=s)
        if reference is not None:
            ax.axhline(reference[metric], c="k", ls="--", lw=1, label="VQ reconstructions")
        if log_x:
            log_ticks(ax, log_x)
        if metric == "fid":
            log_y(ax)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return files.figure(fig)


def figure_tv_vs_nfe(b, rows, exact, colors, title):
    """On the toys: TV against network evaluations, a panel per toy, a line per (model, solver) of rows (a
    colour per model), beside the TV of exact draws."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(b["toys"]), figsize=(5.2 * len(b["toys"]), 4), squeeze=False)
    styles = {"euler": "-o", "heun": "-s", "midpoint": "-^", "discrete euler": "--D"}
    for ax, toy_name in zip(axes[0], b["toys"]):
        mine = [r for r in rows if r["toy"] == toy_name]
        for series in dict.fromkeys((r["model"], r["solver"]) for r in mine):
            pts = sorted({r["nfe"]: r["tv"] for r in mine if (r["model"], r["solver"]) == series}.items())
            ax.plot(*zip(*pts), styles[series[1]], c=colors[series[0]], ms=4, label=", ".join(series))
        ax.axhline(exact[toy_name], c="0.5", ls=":", lw=1, label=f"{b['num_samples']} exact draws")
        log_ticks(ax, b["nfe"])
        log_y(ax)
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel(f"TV to p(c) ({b['num_samples']} samples)")
        ax.set_title(f"{toy_name}: {title}", fontsize=10)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return files.figure(fig)


# ---- Trained flows: loading, sampling, scoring -----------------------------------------------------------

RUN_SETTINGS = ("codes", "init", "steps", "batch_size", "lr", "warmup_steps", "lr_final", "ema_decay", "ema_warmup",
                "keep_every")


def train_settings(**kw):
    """train.py's settings for a study's run (resumed where it stopped), after checking that a run already in its
    --out was started with the same settings: a study resumes its own runs, never one of another budget. Then
    train.train(settings) runs it."""
    settings = train.Settings(resume=True, **kw)
    path = os.path.join(settings.out, "settings.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                earlier = json.load(f)
        except (OSError, ValueError):
            earlier = {}
        differ = [k for k in RUN_SETTINGS if earlier.get(k) != getattr(settings, k)]
        if differ:
            k = differ[0]
            raise UserError(f"{settings.out}: a run with --{k.replace('_', '-')} {earlier.get(k)}, not "
                            f"{getattr(settings, k)} as this study asks; choose another --out, or remove that run")
    return settings


def need(value, message):
    if not value:
        raise UserError(message)
    return value


def need_scoring(dataset, args):
    """Before any training or sampling: the dataset's IDX files in --data-dir, and evaluate.py's classifier file
    (trained now where it does not exist yet, so its directory must be writable)."""
    need(args.data_dir, "scoring images needs --data-dir (the directory of the dataset's IDX files)")
    classifier = args.classifier or lenet.default_classifier_path(dataset)
    with user_errors():
        datasets.load_mnist(dataset, args.data_dir, "test")
        if not os.path.exists(classifier):  # trained below and written there
            make_dir(os.path.dirname(os.path.abspath(classifier)))
        lenet.load_classifier(dataset, args.data_dir, classifier)


def load_flow(path, objectives, role):
    """checkpoint.Flow of a train.py checkpoint (EMA weights, CPU) whose objective is one of `objectives`."""
    with user_errors():
        flow = checkpoint.Flow(path)
    if flow.name not in objectives:
        raise UserError(f"{path}: a checkpoint of {flow.name}; {role} needs {' or '.join(objectives)}")
    return flow


def timed_draw(flow, n, seed, **settings):
    """(images uint8 (n, H, W, C), labels (n,), seconds): sample.draw's n samples, those `python sample.py --seed
    SEED` draws with these settings (steps, solver, temperature, cfg_scale, cfg_interval), and how long they took."""
    start = time.time()
    images, labels = sample.draw(flow, n, seed=seed, **settings)
    return images, labels, time.time() - start


def score(images, labels, dataset, args):
    """evaluate.py's accuracy (of its classifier on the conditioning labels), FID-LeNet and coverage."""
    with user_errors():
        metrics = evaluate.evaluate_images(images, labels, dataset, args.data_dir, classifier_path=args.classifier)
    return dict(accuracy=round(float(metrics["accuracy"]), 4), fid=round(float(metrics["fid"]), 3),
                coverage=round(float(metrics["coverage"]), 4))
