"""
Beyond the paper: a one- or two-step student by reflow.

The teacher's sampler maps each noise z0 to one code grid c. A student with the teacher's network and
objective, started from the teacher's weights, is trained on those fixed pairs (z0, c) instead of fresh noise
(`sample.py --couplings`, then `train.py --codes COUPLINGS --init TEACHER`): its path from z0 is straight and
its posterior at t = 0 already points at c, so one Euler step lands on the posterior mean. Teacher and student
are scored at 1, 2 and 4 network evaluations (each solver), beside the exact posterior on the toys and beside
the teacher at 100 Euler steps on images.
"""

import os
import shutil
import time

import torch

import baselines
import sample
import train
import vfm
from experiments.studies.common import (SAMPLE_BATCH, clock, figure_tv_vs_nfe, load_flow, log_ticks, log_y,
                                        metric_panels, need, need_scoring, pyplot, refuse_to_replace, score,
                                        timed_draw, train_settings, write_outputs)
from experiments.studies.solvers import steps_for_nfe
from support import config, files
from support.cli import UserError, user_errors
from support.codesets import CodeSet
from toy import run as toy_run
from toy.toys import Oracle, make_toy

# What each budget runs.
TOY_BUDGETS = {
    "tiny": dict(toys=("checkerboard", "pairs"), teacher_iters=8, couplings=200, coupling_steps=4,
                 student_iters=8, student_lr=4e-3, nfe=(1, 2, 4), num_samples=400),
    # the teacher is toy/run.py's Purrception (1,200 iterations); 20,000 couplings at 100 Euler steps; the
    # student trains as long as the teacher did, at the same rate
    "full": dict(toys=("checkerboard", "pairs"), teacher_iters=1200, couplings=20000, coupling_steps=100,
                 student_iters=1200, student_lr=4e-3, nfe=(1, 2, 4, 100), num_samples=20000),
}
IMAGE_BUDGETS = {
    "tiny": dict(couplings=24, coupling_steps=2, coupling_solver="euler", coupling_cfg=2.0, student_steps=2,
                 batch_size=8, lr=1e-4, ema_decay=0.9, nfe=(1, 2), cfg_scales=(1.0, 2.0), reference_steps=3,
                 num_samples=20),
    # couplings drawn with README tier 2's sampler (8 midpoint steps, guidance 3), so that the student's single
    # pass is already guided
    "full": dict(couplings=10000, coupling_steps=8, coupling_solver="midpoint", coupling_cfg=3.0,
                 student_steps=2000, batch_size=32, lr=1e-3, ema_decay=0.999, nfe=(1, 2, 4), cfg_scales=(1.0, 3.0),
                 reference_steps=100, num_samples=1000),
}


def run(args):
    if args.data == "toy":
        if args.ckpt:
            raise UserError("--ckpt is for --data fashion-mnist or mnist; the toy trains its own teacher")
        refuse_to_replace(args, "fewstep-toy")
        return on_toys(args)
    refuse_to_replace(args, "fewstep-" + args.data)
    return on_codes(args)


# ---- The 2D toys -----------------------------------------------------------------------------------------

def on_toys(args):
    """Oracle, teacher and student at each NFE and solver on each toy."""
    torch.set_num_threads(1)  # the toy's small matrices: a second thread costs more than it gives
    b, start = TOY_BUDGETS[args.budget], clock()
    rows, costs, exact = [], {}, {}
    for toy_name in b["toys"]:
        toy = make_toy(toy_name)
        objective = baselines.build_objective("purrception", toy.codebook)
        t0 = time.time()
        teacher = toy_run.train(toy, objective, b["teacher_iters"], args.seed)
        t1 = time.time()
        couplings = toy_run.sample(toy, objective, teacher, b["couplings"], args.seed + 100,
                                   steps=b["coupling_steps"], couplings=True)
        t2 = time.time()
        student = toy_run.train(toy, objective, b["student_iters"], args.seed, lr=b["student_lr"], init=teacher,
                                couplings=couplings)
        costs[toy_name] = dict(teacher_seconds=round(t1 - t0, 1), couplings_seconds=round(t2 - t1, 1),
                               student_seconds=round(time.time() - t2, 1))
        exact[toy_name] = round(toy.tv(toy.sample(b["num_samples"], torch.Generator().manual_seed(args.seed))), 4)
        models = (("oracle", Oracle(toy, objective.codebook)), ("teacher", teacher), ("student", student))
        for name, model in models:
            for solver in vfm.SOLVERS:
                for target in b["nfe"]:
                    steps = steps_for_nfe(target, solver)
                    codes = toy_run.sample(toy, objective, model, b["num_samples"], args.seed, steps=steps,
                                           solver=solver)
                    rows.append(dict(toy=toy_name, model=name, solver=solver, nfe_target=target, steps=steps,
                                     nfe=vfm.num_evaluations(steps, solver), tv=round(toy.tv(codes), 4)))
                print(f"  {toy_name:<12} {name:<8} {solver:<9} TV at NFE {b['nfe']}: " +
                      " ".join(f"{r['tv']:.3f}" for r in rows[-len(b["nfe"]):]), flush=True)

    def cells(series):
        mine = [r for r in rows if (r["toy"], r["model"], r["solver"]) == series]
        return [f"{r['tv']:.3f}" + ("" if r["nfe"] == r["nfe_target"] else f" ({r['nfe']})") for r in mine]

    table = files.markdown_table(["toy", "model", "solver", *(f"NFE {n}" for n in b["nfe"])],
                                 [[*series, *cells(series)]
                                  for series in dict.fromkeys((r["toy"], r["model"], r["solver"]) for r in rows)])
    note = (f"TV to p(c) of {b['num_samples']} samples; in brackets the NFE a solver actually used where it cannot "
            f"hit the target. teacher: Purrception's toy MLP, {b['teacher_iters']} iterations (batch 512, seed "
            f"{args.seed}); student: the teacher's weights trained {b['student_iters']} more iterations (lr "
            f"{b['student_lr']}) on {b['couplings']} fixed couplings (z0, the grid the teacher's {b['coupling_steps']} "
            f"Euler steps reach from z0); oracle: the exact posterior. TV of {b['num_samples']} exact draws (the "
            f"floor): " + ", ".join(f"{k} {v:.3f}" for k, v in exact.items()) + ". Seconds (teacher, couplings, "
            "student): " + "; ".join(f"{k} {v['teacher_seconds']}, {v['couplings_seconds']}, {v['student_seconds']}"
                                     for k, v in costs.items()) + ".")
    return write_outputs(args, "fewstep-toy", table, note,
                         dict(settings=b, seed=args.seed, costs=costs, exact_draws_tv=exact, rows=rows), start,
                         {"fewstep-toy": figure_toys(b, rows, exact)})


def figure_toys(b, rows, exact):
    return figure_tv_vs_nfe(b, rows, exact, {"oracle": "k", "teacher": "tab:blue", "student": "tab:orange"},
                            "teacher and reflow student")


# ---- Images: a teacher checkpoint, its couplings, its student --------------------------------------------

def on_codes(args):
    """Couplings from --ckpt, a student trained on them by train.py, both scored at few NFE with and without
    guidance. Each part is kept in --out and reused when the study runs again."""
    b, start = IMAGE_BUDGETS[args.budget], clock()
    ckpt = need(args.ckpt, f"fewstep --data {args.data} needs --ckpt (a Purrception, CFM or CFM-endpoint checkpoint)")
    teacher = load_flow(ckpt, ("purrception", "cfm", "cfm-endpoint"), "fewstep")
    if teacher.dataset != args.data:
        raise UserError(f"{ckpt}: trained on {teacher.dataset} codes, not --data {args.data}")
    need_scoring(args.data, args)
    costs = {}

    # 1. the couplings, drawn by sample.py, and 2. the student, trained on them by train.py; a run of the study
    # that stopped resumes both, and other couplings get a new student
    pairs_out, run_dir = os.path.join(args.out, "couplings"), os.path.join(args.out, "runs", "student")
    wanted = dict(ckpt=os.path.abspath(ckpt), step=teacher.step, num_samples=b["couplings"],
                  steps=b["coupling_steps"], solver=b["coupling_solver"], cfg_scale=b["coupling_cfg"],
                  cfg_interval=[0.0, 1.0], temperature="1.0", weights="ema", seed=args.seed)
    draw_couplings = made_by(os.path.join(pairs_out, "couplings"), wanted) is None
    if draw_couplings:
        shutil.rmtree(run_dir, ignore_errors=True)
    student_run = train_settings(codes=os.path.join(pairs_out, "couplings"), init=ckpt, model=teacher.settings["model"],
                             objective=teacher.name, codebook_scale=teacher.objective.codebook_scale, out=run_dir,
                             steps=b["student_steps"], batch_size=b["batch_size"], lr=b["lr"], lr_final=0.0,
                             ema_decay=b["ema_decay"], ema_warmup=True, seed=args.seed,
                             ckpt_every=max(1, b["student_steps"] // 4), log_every=max(1, b["student_steps"] // 4),
                             sample_every=0)  # a run there of other settings is refused before any work
    if draw_couplings:
        couplings = sample.Settings(ckpt=ckpt, num_samples=b["couplings"], steps=b["coupling_steps"],
                                    solver=b["coupling_solver"], cfg_scale=b["coupling_cfg"], seed=args.seed,
                                    couplings=True, out=pairs_out, force=True)
        print(f"couplings: python sample.py {config.command_line(couplings)}", flush=True)
        t0 = time.time()
        with user_errors():
            sample.sample(couplings)
        costs["couplings_seconds"] = round(time.time() - t0, 1)
    costs["couplings_seconds_per_sample"] = made_by(os.path.join(pairs_out, "couplings"), wanted)["seconds_per_sample"]
    print(f"student: python train.py {config.command_line(student_run)}", flush=True)
    t0 = time.time()
    train.train(student_run)
    costs["student_seconds"] = round(time.time() - t0, 1)
    student = load_flow(os.path.join(run_dir, "checkpoints", "last.pt"), (teacher.name,), "fewstep")

    # 3. both at few evaluations, with and without guidance; the teacher at many
    rows = []

    def add(model, flow, solver, steps, cfg, target):
        images, labels, seconds = timed_draw(flow, b["num_samples"], args.seed, steps=steps, solver=solver,
                                             cfg_scale=cfg)
        rows.append(dict(model=model, solver=solver, cfg_scale=cfg, nfe_target=target, steps=steps,
                         nfe=vfm.num_evaluations(steps, solver),
                         passes=vfm.guided_evaluations(steps, solver, cfg, guidable=flow.num_classes > 0),
                         ms_per_sample=round(1000 * seconds / b["num_samples"], 2),
                         **score(images, labels, flow.dataset, args)))
        r = rows[-1]
        print(f"  {model:<8} {solver:<9} cfg {cfg:g} NFE {r['nfe']:>3}: accuracy {r['accuracy']:.3f}  FID "
              f"{r['fid']:.2f}  ({r['ms_per_sample']:.1f} ms/sample)", flush=True)

    for cfg in b["cfg_scales"]:
        for model, flow in (("teacher", teacher), ("student", student)):
            for solver in ("euler", "midpoint"):
                for target in b["nfe"]:
                    if vfm.num_evaluations(steps_for_nfe(target, solver), solver) == target:
                        add(model, flow, solver, steps_for_nfe(target, solver), cfg, target)
        add("teacher", teacher, "euler", b["reference_steps"], cfg, b["reference_steps"])
    table = files.markdown_table(
        ["model", "solver", "guidance", "NFE", "network passes", "ms/sample", "accuracy", "FID-LeNet", "coverage"],
        [[r["model"], r["solver"], f"{r['cfg_scale']:g}", r["nfe"], r["passes"], f"{r['ms_per_sample']:.1f}",
          f"{r['accuracy']:.3f}", f"{r['fid']:.2f}", f"{r['coverage']:.3f}"] for r in rows])
    note = (f"{b['num_samples']} samples per row (labels 0..9 cycled, EMA weights, temperature 1). teacher: {ckpt} "
            f"(step {teacher.step}); student: its weights trained {b['student_steps']} steps (batch "
            f"{b['batch_size']}, lr {b['lr']} decaying to 0, EMA {b['ema_decay']}) on {b['couplings']} couplings "
            f"drawn by the teacher with {b['coupling_steps']} {b['coupling_solver']} steps at guidance "
            f"{b['coupling_cfg']:g} ({costs['couplings_seconds_per_sample'] * 1000:.1f} ms each). NFE: network "
            f"evaluations; network passes: with guidance two per evaluation. ms/sample: sampling and decoding on "
            f"this machine's CPU, batches of {SAMPLE_BATCH}.")
    plot = figure_images(rows, b, f"{teacher.dataset}: teacher and reflow student vs network evaluations")
    return write_outputs(args, "fewstep-" + args.data, table, note,
                         dict(settings=b, seed=args.seed, ckpt=os.path.abspath(ckpt), costs=costs, rows=rows), start,
                         {"fewstep-" + args.data: plot})


def figure_images(rows, b, title):
    """Accuracy and FID-LeNet against NFE: a colour per model, a line style per guidance scale, a marker per
    solver; the teacher's many-step rows as horizontal lines."""
    plt = pyplot()
    fig, axes = metric_panels(plt, title)
    colors, markers = {"teacher": "tab:blue", "student": "tab:orange"}, {"euler": "o", "midpoint": "^"}
    styles = dict(zip(b["cfg_scales"], ("-", "--", ":")))
    for ax, metric in zip(axes, ("accuracy", "fid")):
        for model, solver, cfg in dict.fromkeys((r["model"], r["solver"], r["cfg_scale"]) for r in rows):
            mine = sorted((r["nfe"], r[metric]) for r in rows if (r["model"], r["solver"], r["cfg_scale"]) ==
                          (model, solver, cfg) and r["nfe"] <= max(b["nfe"]))
            if mine:
                ax.plot(*zip(*mine), styles[cfg], marker=markers[solver], c=colors[model], ms=5,
                        label=f"{model}, {solver}, guidance {cfg:g}")
        for r in rows:
            if r["nfe_target"] == b["reference_steps"]:
                ax.axhline(r[metric], c="0.4", ls=styles[r["cfg_scale"]], lw=1,
                           label=f"teacher, {r['steps']} Euler steps, guidance {r['cfg_scale']:g}")
        log_ticks(ax, b["nfe"])
        if metric == "fid":
            log_y(ax)
        ax.set_xlabel("network evaluations (NFE)")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return files.figure(fig)


def made_by(couplings_dir, wanted):
    """The teacher settings of the coupling set in couplings_dir if they include `wanted` (the teacher's file and
    step, and every sampling setting the study sets), else None: no set, an unreadable one, or one drawn
    otherwise."""
    try:
        teacher = CodeSet(couplings_dir).meta.get("teacher", {})
    except (OSError, ValueError):
        return None
    return teacher if {k: teacher.get(k) for k in wanted} == wanted else None
