"""
Guidance only where it helps: classifier-free guidance for t in a window (Kynkäänniemi et al. 2024, arXiv
2404.07724), one conditional pass elsewhere. Quality and network passes for a grid of windows at one guidance
scale, on a checkpoint with classes.
"""

import os

import baselines
import vfm
from experiments.studies.common import (clock, load_flow, need, need_scoring, pyplot, refuse_to_replace, score,
                                        timed_draw, write_outputs)
from support import files
from support.cli import UserError

# What each budget runs.
BUDGETS = {
    "tiny": dict(cfg_scale=2.0, windows=((0, 1), (0.5, 1)), steps=2, num_samples=20),
    # README tier 2's sampler: 8 midpoint steps (DFM: 16 discrete Euler steps) at guidance 3
    "full": dict(cfg_scale=3.0, windows=((0, 1), (0.1, 1), (0.2, 1), (0.3, 1), (0.5, 1), (0, 0.5), (0, 0.8),
                                         (0.2, 0.8), (0.3, 0.7)), steps=8, num_samples=1000),
}


def run(args):
    """Quality and network passes for each guidance window at one scale, on a checkpoint with classes."""
    b, start = BUDGETS[args.budget], clock()
    refuse_to_replace(args, "guidance")
    flow = load_flow(need(args.ckpt, "guidance needs --ckpt RUN/checkpoints/last.pt"), baselines.OBJECTIVES, "guidance")
    if not flow.num_classes:
        raise UserError(f"{args.ckpt}: trained without labels, so there is nothing to guide towards")
    need_scoring(flow.dataset, args)
    solver, steps = ("euler", 2 * b["steps"]) if flow.name == "dfm" else ("midpoint", b["steps"])
    rows = []
    for cfg, window in [(1.0, (0, 1))] + [(b["cfg_scale"], w) for w in b["windows"]]:
        images, labels, seconds = timed_draw(flow, b["num_samples"], args.seed, steps=steps, solver=solver,
                                             cfg_scale=cfg, cfg_interval=window)
        rows.append(dict(cfg_scale=cfg, window=list(window), passes=vfm.guided_evaluations(steps, solver, cfg, window),
                         seconds=round(seconds, 1), **score(images, labels, flow.dataset, args)))
        r = rows[-1]
        print(f"  guidance {cfg:g} on [{window[0]:g}, {window[1]:g}]: accuracy {r['accuracy']:.3f}  FID "
              f"{r['fid']:.2f}  coverage {r['coverage']:.3f}  ({r['passes']} passes)", flush=True)
    full = vfm.guided_evaluations(steps, solver, b["cfg_scale"])
    table = files.markdown_table(
        ["guidance", "window [lo, hi] of t", "network passes", "passes saved", "accuracy", "FID-LeNet", "coverage"],
        [[f"{r['cfg_scale']:g}", f"[{r['window'][0]:g}, {r['window'][1]:g}]", r["passes"],
          f"{1 - r['passes'] / full:.0%}" if r["cfg_scale"] != 1 else "-", f"{r['accuracy']:.3f}", f"{r['fid']:.2f}",
          f"{r['coverage']:.3f}"] for r in rows])
    note = (f"{b['num_samples']} samples per row of {args.ckpt} ({flow.name}, step {flow.step}): {steps} {solver} "
            f"steps, temperature 1, guidance only at the network evaluations with lo <= t <= hi (t = 0 is noise), "
            f"one conditional pass elsewhere. Passes saved: against guidance everywhere ({full} passes). The first "
            f"row is no guidance.")
    return write_outputs(args, "guidance", table, note,
                         dict(settings=b, seed=args.seed, ckpt=os.path.abspath(args.ckpt), solver=solver, steps=steps,
                              rows=rows), start, {"guidance": figure_guidance(rows, flow, b)})


def figure_guidance(rows, flow, b):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric, label in zip(axes, ("fid", "accuracy", "coverage"),
                                 ("FID-LeNet (lower is better)", "accuracy", "coverage")):
        for r in rows:
            name = "no guidance" if r["cfg_scale"] == 1 else f"[{r['window'][0]:g}, {r['window'][1]:g}]"
            ax.scatter(r["passes"], r[metric], s=14, c="k" if r["cfg_scale"] == 1 else "tab:blue")
            ax.annotate(name, (r["passes"], r[metric]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("network passes per sample")
        ax.set_ylabel(label)
    fig.suptitle(f"{flow.dataset}, {flow.name}: guidance {b['cfg_scale']:g} only for t in a window", fontsize=10)
    fig.tight_layout()
    return files.figure(fig)
