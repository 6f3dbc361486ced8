"""
Claim (3): as a continuous flow, Purrception samples well with few steps and with higher-order solvers.

Quality against the number of network evaluations (NFE) for Euler, Heun and midpoint, beside DFM's discrete
Euler sampler at the same NFE: on the 2D toys through the exact posterior (the oracle) and through trained toy
MLPs, scored by TV to the exact p(c); on images through trained checkpoints, scored by evaluate.py.
"""

import os
import time

import torch

import baselines
import vfm
from experiments.studies.common import (SAMPLE_BATCH, clock, figure_metrics_vs, figure_tv_vs_nfe, load_flow, need,
                                        need_scoring, refuse_to_replace, score, timed_draw, write_outputs)
from support import files
from support.cli import UserError
from toy import run as toy_run
from toy.toys import Oracle, make_toy

# What each budget runs.
TOY_BUDGETS = {
    "tiny": dict(toys=("checkerboard", "pairs"), iters=8, nfe=(2, 4), num_samples=400),
    "full": dict(toys=("checkerboard", "pairs"), iters=3200, nfe=(4, 8, 16, 32, 100), num_samples=20000),
}
IMAGE_BUDGETS = {
    "tiny": dict(nfe=(2, 4), num_samples=20),
    "full": dict(nfe=(4, 8, 16, 32, 100), num_samples=1000),
}


def steps_for_nfe(nfe, solver):
    """Steps of `solver` whose network evaluations come closest to `nfe` without exceeding it (at least 1)."""
    if solver == "heun":  # 2 * steps - 1 evaluations: the last step is an Euler step
        return max(1, (nfe + 1) // 2)
    return max(1, nfe // (2 if solver == "midpoint" else 1))


def solvers_of(model_name):
    """(solver name in the tables, solver passed to the sampler) for each solver a model is run with."""
    if model_name == "dfm":
        return [("discrete euler", "euler")]
    return [(solver, solver) for solver in vfm.SOLVERS]


def run(args):
    if args.data == "toy":
        if args.ckpt or args.dfm_ckpt:
            raise UserError("--ckpt and --dfm-ckpt are for --data fashion-mnist or mnist; the toy trains its own")
    refuse_to_replace(args, "solvers-" + args.data)
    return on_toys(args) if args.data == "toy" else on_codes(args)


# ---- The 2D toys -----------------------------------------------------------------------------------------

def on_toys(args):
    """Euler, Heun and midpoint on the exact posterior and on a trained Purrception MLP; DFM at the same NFE.

    On the one-token checkerboard DFM's first step already draws from the learned p(c), so any NFE is exact
    for it; the two-token pairs toy is where a few discrete steps pay for revealing tokens independently."""
    torch.set_num_threads(1)
    b, start = TOY_BUDGETS[args.budget], clock()
    rows, train_seconds, exact = [], {}, {}
    for toy_name in b["toys"]:
        toy = make_toy(toy_name)
        purrception = baselines.build_objective("purrception", toy.codebook)
        dfm = baselines.build_objective("dfm", toy.codebook)
        t0 = time.time()
        models = [("oracle", purrception, Oracle(toy, purrception.codebook)),
                  ("purrception", purrception, toy_run.train(toy, purrception, b["iters"], args.seed)),
                  ("dfm", dfm, toy_run.train(toy, dfm, b["iters"], args.seed))]
        train_seconds[toy_name] = round(time.time() - t0, 1)
        exact[toy_name] = round(toy.tv(toy.sample(b["num_samples"], torch.Generator().manual_seed(args.seed))), 4)
        for name, objective, model in models:
            for label, solver in solvers_of(name):
                for target in b["nfe"]:
                    steps = steps_for_nfe(target, solver)
                    t0 = time.time()
                    codes = toy_run.sample(toy, objective, model, b["num_samples"], args.seed, steps=steps,
                                           solver=solver)
                    rows.append(dict(toy=toy_name, model=name, solver=label, nfe_target=target, steps=steps,
                                     nfe=vfm.num_evaluations(steps, solver), seconds=round(time.time() - t0, 4),
                                     tv=round(toy.tv(codes), 4)))
                print(f"  {toy_name:<12} {name:<12} {label:<14} TV at NFE {b['nfe']}: " +
                      " ".join(f"{r['tv']:.3f}" for r in rows[-len(b["nfe"]):]), flush=True)

    def cells(series):
        mine = [r for r in rows if (r["toy"], r["model"], r["solver"]) == series]
        tv = [f"{r['tv']:.3f}" + ("" if r["nfe"] == r["nfe_target"] else f" ({r['nfe']})") for r in mine]
        us = 1e6 * sum(r["seconds"] for r in mine) / (b["num_samples"] * sum(r["nfe"] for r in mine))
        return tv + [f"{us:.1f}"]

    table = files.markdown_table(["toy", "model", "solver", *(f"NFE {n}" for n in b["nfe"]), "µs/sample/NFE"],
                                 [[*series, *cells(series)]
                                  for series in dict.fromkeys((r["toy"], r["model"], r["solver"]) for r in rows)])
    note = (f"TV to p(c) of {b['num_samples']} samples; in brackets the NFE a solver actually used where it "
            f"cannot hit the target (Heun: 2 per step but 1 for the last, an Euler step). oracle = the exact "
            f"posterior through Purrception's sampler; purrception and dfm: the toy MLP trained {b['iters']} "
            f"iterations (batch 512, seed {args.seed}). TV of {b['num_samples']} exact draws from p(c) (the floor): " +
            ", ".join(f"{k} {v:.3f}" for k, v in exact.items()) + ". µs/sample/NFE: sampling wall time on this "
            "machine's CPU (one thread) per sample and network evaluation, over the row.")
    return write_outputs(args, "solvers-toy", table, note,
                         dict(settings=b, seed=args.seed, train_seconds=train_seconds, exact_draws_tv=exact,
                              rows=rows), start, {"solvers-toy": figure_toys(b, rows, exact)})


def figure_toys(b, rows, exact):
    return figure_tv_vs_nfe(b, rows, exact, {"oracle": "k", "purrception": "tab:blue", "dfm": "tab:red"},
                            "quality vs NFE")


# ---- Images through trained checkpoints ------------------------------------------------------------------

def on_codes(args):
    """Quality and seconds per sample vs NFE for a Purrception checkpoint's solvers and a DFM checkpoint."""
    b, start = IMAGE_BUDGETS[args.budget], clock()
    checkpoints = [load_flow(need(args.ckpt, f"solvers --data {args.data} needs --ckpt (a Purrception checkpoint)"),
                       ("purrception",), "--ckpt")]
    if args.dfm_ckpt:
        checkpoints.append(load_flow(args.dfm_ckpt, ("dfm",), "--dfm-ckpt"))
    for flow in checkpoints:
        if flow.dataset != args.data:
            raise UserError(f"{flow.path}: trained on {flow.dataset} codes, not --data {args.data}")
    need_scoring(args.data, args)
    rows = []
    for flow in checkpoints:
        for label, solver in solvers_of(flow.name):
            for target in b["nfe"]:
                steps = steps_for_nfe(target, solver)
                samples, labels, seconds = timed_draw(flow, b["num_samples"], args.seed, steps=steps, solver=solver)
                rows.append(dict(model=flow.name, solver=label, nfe_target=target, steps=steps,
                                 nfe=vfm.num_evaluations(steps, solver),
                                 seconds_per_sample=round(seconds / b["num_samples"], 5),
                                 **score(samples, labels, flow.dataset, args)))
                print(f"  {flow.name:<12} {solver:<9} NFE {rows[-1]['nfe']:>3}: accuracy {rows[-1]['accuracy']:.3f}"
                      f"  FID {rows[-1]['fid']:.2f}  ({seconds:.0f} s)", flush=True)
    table = files.markdown_table(
        ["model", "solver", "NFE target", "steps", "NFE", "ms/sample", "accuracy", "FID-LeNet"],
        [[r["model"], r["solver"], r["nfe_target"], r["steps"], r["nfe"], f"{1000 * r['seconds_per_sample']:.1f}",
          f"{r['accuracy']:.3f}", f"{r['fid']:.2f}"] for r in rows])
    note = (f"{b['num_samples']} samples per row (labels 0..9 cycled, EMA weights, temperature 1, no guidance); "
            f"checkpoints: " + ", ".join(f"{f.name} {f.path} (step {f.step})" for f in checkpoints) +
            f". ms/sample: wall time of sampling and decoding, on this machine's CPU, in batches of {SAMPLE_BATCH}.")
    for r in rows:
        r["series"] = f"{r['model']}, {r['solver']}"
    series = list(dict.fromkeys(r["series"] for r in rows))
    plot = figure_metrics_vs(rows, "series", "nfe", series, f"{checkpoints[0].dataset}: quality vs network evaluations",
                             "network evaluations (NFE)", log_x=b["nfe"])
    return write_outputs(args, "solvers-" + args.data, table, note,
                         dict(settings=b, seed=args.seed, ckpts={f.name: os.path.abspath(f.path) for f in checkpoints},
                              rows=rows), start, {"solvers-" + args.data: plot})
