"""
Claim (2): the softmax temperature of Purrception's posterior is a training-free quality knob with a U-shaped
curve.

One Purrception checkpoint samples the same noise at constant temperatures and at schedules over t, with and
without classifier-free guidance; every row is scored by evaluate.py.
"""

import os

import numpy as np

import vfm
from experiments.studies.common import (clock, load_flow, log_y, metric_panels, need, need_scoring, pyplot,
                                        refuse_to_replace, score, timed_draw, write_outputs)
from support import files, images

# What each budget runs.
BUDGETS = {
    "tiny": dict(temperatures=("0.5", "1.0", "1.5"), schedules=("linear:1.2:0.8", "cosine:1.2:0.8"),
                 cfg_scales=(1.0, 2.0), num_samples=20, steps=3, grid_per_class=2),
    "full": dict(temperatures=("0.2", "0.3", "0.5", "0.7", "0.8", "0.9", "1.0", "1.2", "1.5"),
                 schedules=("linear:1.2:0.8", "cosine:1.2:0.8", "linear:0.8:1.2"),
                 cfg_scales=(1.0, 2.0), num_samples=1000, steps=50, grid_per_class=8),
}
FIGURES = ("temperature", "temperature-grid")  # OUT/temperature.png: the sweep; temperature-grid.png: samples


def run(args):
    """Constant temperatures and schedules over t, with and without guidance, on one Purrception checkpoint."""
    b, start = BUDGETS[args.budget], clock()
    refuse_to_replace(args, "temperature", FIGURES)
    flow = load_flow(need(args.ckpt, "temperature needs --ckpt RUN/checkpoints/last.pt (a Purrception run)"),
                     ("purrception",), "temperature")
    need_scoring(flow.dataset, args)
    rows, kept = [], {}
    for cfg in b["cfg_scales"]:
        for spec in b["temperatures"] + b["schedules"]:
            samples, labels, seconds = timed_draw(flow, b["num_samples"], args.seed, steps=b["steps"],
                                                  temperature=spec, cfg_scale=cfg)
            rows.append(dict(temperature=spec, constant=":" not in spec, cfg_scale=cfg,
                             sample_seconds=round(seconds, 1), **score(samples, labels, flow.dataset, args)))
            if cfg == 1.0 and ":" not in spec:
                kept[spec] = samples, labels
            print(f"  temperature {spec:<15} cfg {cfg}: accuracy {rows[-1]['accuracy']:.3f}  "
                  f"FID {rows[-1]['fid']:.2f}  ({seconds:.0f} s)", flush=True)

    def cell(spec, cfg, metric):
        r = row(rows, spec, cfg)
        return f"{r[metric]:.3f}" if metric == "accuracy" else f"{r[metric]:.2f}"

    header = ["temperature"] + [f"{m} (cfg {cfg:g})" for cfg in b["cfg_scales"] for m in ("accuracy", "FID")]
    table = files.markdown_table(header, [[spec] + [cell(spec, cfg, m) for cfg in b["cfg_scales"]
                                                    for m in ("accuracy", "fid")]
                                          for spec in b["temperatures"] + b["schedules"]])
    note = (f"{flow.path} (step {flow.step}, EMA): {b['num_samples']} samples (labels 0..9 cycled), "
            f"{b['steps']} Euler steps, the same noise for every row. 'linear:A:B' and 'cosine:A:B' go from A at "
            f"t = 0 (noise) to B at t = 1 (data). cfg 1 is no guidance.")
    constants = [r for r in rows if r["constant"] and r["cfg_scale"] == 1.0]
    best = min(constants, key=lambda r: r["fid"])["temperature"]
    chosen = [b["temperatures"][0], best, b["temperatures"][-1]]
    return write_outputs(args, "temperature", table, note,
                         dict(settings=b, ckpt=os.path.abspath(flow.path), step=flow.step, best_constant=best,
                              grid_temperatures=chosen, rows=rows), start,
                         dict(zip(FIGURES, (figure_sweep(b, rows, flow), figure_grid(b, rows, kept, chosen)))))


def row(rows, spec, cfg):
    return next(r for r in rows if (r["temperature"], r["cfg_scale"]) == (spec, cfg))


def figure_sweep(b, rows, flow):
    """Accuracy and FID against the temperature: a line of constants per guidance scale, the schedules as
    markers at their mean temperature over t."""
    plt = pyplot()
    fig, axes = metric_panels(plt, f"Temperature sweep: Purrception, {flow.dataset}, step {flow.step}")
    markers = "s^vDP"
    for ax, metric in zip(axes, ("accuracy", "fid")):
        for i, cfg in enumerate(b["cfg_scales"]):
            color = f"C{i}"
            const = [(float(r["temperature"]), r[metric]) for r in rows if r["constant"] and r["cfg_scale"] == cfg]
            ax.plot(*zip(*sorted(const)), "-o", ms=3, c=color, label=f"constant, cfg {cfg:g}")
            for j, spec in enumerate(b["schedules"]):
                tau = vfm.parse_temperature(spec)
                mean_tau = float(np.mean([tau(t) for t in np.linspace(0, 1, 101)]))
                ax.plot([mean_tau], [row(rows, spec, cfg)[metric]], markers[j % len(markers)], c=color, ms=6,
                        mfc="none", label=f"{spec}, cfg {cfg:g}")
        if metric == "fid":
            log_y(ax)
        ax.set_xlabel("temperature (schedules at their mean over t)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    return files.figure(fig)


def figure_grid(b, rows, kept, chosen):
    """Samples at the chosen constant temperatures without guidance, a row per class."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(chosen), figsize=(4.2 * len(chosen), 4.6))
    for ax, spec, role in zip(axes, chosen, ("lowest", "best FID", "highest")):
        samples, labels = kept[spec]
        grid = images.class_grid(samples, labels, per_row=b["grid_per_class"])
        canvas = np.asarray(images.image_grid(grid, b["grid_per_class"], scale=1))
        ax.imshow(canvas, cmap="gray", vmin=0, vmax=255)
        r = row(rows, spec, 1.0)
        ax.set_title(f"{role}: temperature {spec}\naccuracy {r['accuracy']:.3f}, FID-LeNet {r['fid']:.2f}", fontsize=9)
        ax.axis("off")
    fig.suptitle("Samples at the lowest, the best (lowest FID) and the highest constant temperature, no guidance; "
                 "a row per class, the same noise in each panel", fontsize=10)
    fig.tight_layout()
    return files.figure(fig)
