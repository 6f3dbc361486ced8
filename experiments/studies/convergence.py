"""
Claim (1): Purrception converges faster than CFM, CFM-endpoint and DFM trained with the same backbone and budget.

On the 2D toys every objective trains the toy MLP of toy/run.py and is scored by the total-variation distance of
its samples to the exact p(c) (and, for Purrception, the KL of its posterior to the exact one). On images every
objective is trained by train.py on one code set with the same settings, and each kept checkpoint is scored by
evaluate.py, beside the score of the tokenizer's own reconstructions: the best a flow can reach.
"""

import json
import os
import time

import numpy as np
import torch

import baselines
import train
from experiments.studies.common import (clock, figure_metrics_vs, load_flow, log_ticks, log_y, mean_spread, need,
                                        need_scoring, pyplot, refuse_to_replace, score, timed_draw, train_settings,
                                        write_outputs)
from support import config, files, images, lenet, tokenizers
from support.cli import UserError, user_errors
from support.codesets import CodeSet
from toy import run as toy_run
from toy.toys import Oracle, make_toy

# What each budget runs.
TOY_BUDGETS = {
    "tiny": dict(toys=("checkerboard", "pairs"), iters=(4, 8), seeds=1, num_samples=400, steps=4, kl_samples=200),
    "full": dict(toys=("checkerboard", "pairs"), iters=(100, 200, 400, 800, 1600, 3200), seeds=2,
                 num_samples=20000, steps=100, kl_samples=2000),
}
IMAGE_BUDGETS = {
    "tiny": dict(model="DiT-T/1", batch_size=8, train_steps=2, keep_every=1, lr=1e-4, warmup=0, ema_decay=0.9,
                 num_samples=20, steps=3),
    # README tier 2's batch, learning rate and EMA, with the rate held after warm-up (so that the checkpoint of
    # step N is what an N-step run gives) and the paper's sampler: 100 Euler steps, temperature 1, no guidance.
    "full": dict(model="DiT-T/1", batch_size=32, train_steps=3000, keep_every=500, lr=4e-3, warmup=100,
                 ema_decay=0.999, num_samples=1000, steps=100),
}
KL_TIMES = [0.1, 0.3, 0.5, 0.7, 0.9]
OBJECTIVE_COLORS = dict(zip(baselines.OBJECTIVES, ("tab:blue", "tab:orange", "tab:green", "tab:red")))


def run(args):
    args.objectives = parse_objectives(args.objectives)
    if args.data == "toy":
        if args.codes:
            raise UserError("--codes is for --data fashion-mnist or mnist; the toys need no code set")
        args.schedule = args.schedule or "one-run"
        refuse_to_replace(args, toy_output_name(args))
        return on_toys(args)
    if args.schedule:
        raise UserError("--schedule is for --data toy; on images the study runs train.py with a constant learning "
                        "rate after warm-up, so the checkpoints along one run are what a shorter budget gives")
    refuse_to_replace(args, "convergence-" + args.data)
    return on_codes(args)


def parse_objectives(spec):
    """'purrception,dfm' -> ['purrception', 'dfm'] in baselines.OBJECTIVES's order; None: all four."""
    if spec is None:
        return list(baselines.OBJECTIVES)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in baselines.OBJECTIVES]
    if unknown or not names:
        raise UserError(f"--objectives {spec}: expected a comma-separated list of {', '.join(baselines.OBJECTIVES)}")
    return [n for n in baselines.OBJECTIVES if n in names]


def toy_output_name(args):
    return "convergence-toy" + ("" if args.schedule == "one-run" else "-per-budget")


# ---- The 2D toys -----------------------------------------------------------------------------------------

def on_toys(args):
    """Every objective on every toy, scored at each of the budget's iteration counts.

    --schedule one-run: along one run of the largest count (toy/run.py's warm-up and cosine decay over all of
    it), so the early points are models at a high learning rate. --schedule per-budget: a separate run for
    every count, each with its own warm-up and decay to zero: what a user with that budget would get."""
    torch.set_num_threads(1)  # the toy's small matrices: a second thread costs more than it gives
    b, start = TOY_BUDGETS[args.budget], clock()
    rows, reference = [], {}
    for toy_name in b["toys"]:
        toy = make_toy(toy_name)
        oracle_objective = baselines.build_objective("purrception", toy.codebook, codebook_scale=args.codebook_scale)
        oracle = Oracle(toy, oracle_objective.codebook)
        codes = toy_run.sample(toy, oracle_objective, oracle, b["num_samples"], args.seed, steps=b["steps"])
        exact = toy.sample(b["num_samples"], torch.Generator().manual_seed(args.seed))
        reference[toy_name] = dict(oracle_tv=round(toy.tv(codes), 4), exact_draws_tv=round(toy.tv(exact), 4))
        for method in args.objectives:
            for seed in range(args.seed, args.seed + b["seeds"]):
                rows += train_and_score(toy, method, seed, b, args.schedule, args.codebook_scale)

    def cells(toy_name, method, key):
        return [mean_spread([r.get(key) for r in rows if (r["toy"], r["method"], r["iters"]) ==
                             (toy_name, method, it)]) for it in b["iters"]]

    table_rows = []
    for toy_name in b["toys"]:
        table_rows += [[toy_name, "TV", m, *cells(toy_name, m, "tv")] for m in args.objectives]
        ref = reference[toy_name]
        table_rows.append([toy_name, "TV", "oracle (exact posterior)", *[f"{ref['oracle_tv']:.3f}"] * len(b["iters"])])
        table_rows.append([toy_name, "TV", f"{b['num_samples']} exact draws",
                           *[f"{ref['exact_draws_tv']:.3f}"] * len(b["iters"])])
    if "checkerboard" in b["toys"] and "purrception" in args.objectives:
        table_rows.append(["checkerboard", "KL", "purrception", *cells("checkerboard", "purrception", "kl")])
    table = files.markdown_table(["toy", "metric", "method", *map(str, b["iters"])], table_rows)
    runs = (f"after N training iterations of one {max(b['iters'])}-iteration run" if args.schedule == "one-run" else
            "of a separate N-iteration run for each N (warm-up and cosine decay completed)")
    note = (f"TV of {b['num_samples']} samples ({b['steps']} Euler steps; DFM: discrete Euler steps) {runs} "
            f"(batch 512), mean ± half the range over {b['seeds']} seed(s). KL: Purrception's mean "
            f"KL(exact || learned posterior) over t = 0.1 ... 0.9.")
    name = toy_output_name(args)
    return write_outputs(args, name, table, note,
                         dict(settings=b, schedule=args.schedule, codebook_scale=args.codebook_scale,
                              reference=reference, rows=rows), start,
                         {name: figure_toys(args, b, rows, reference)})


def train_and_score(toy, method, seed, b, schedule, codebook_scale="raw"):
    """The rows of one objective and seed on one toy: TV (and on the checkerboard Purrception's KL) at each of
    the budget's iteration counts."""
    objective = baselines.build_objective(method, toy.codebook, codebook_scale=codebook_scale)
    rows, scoring = [], []

    def score_model(step, model):
        if step not in b["iters"]:
            return
        t0 = time.time()
        codes = toy_run.sample(toy, objective, model, b["num_samples"], seed, steps=b["steps"])
        row = dict(toy=toy.name, method=method, seed=seed, iters=step, tv=round(toy.tv(codes), 4))
        if method == "purrception" and toy.name == "checkerboard":
            kl = toy_run.posterior_by_t(toy, objective.codebook, model, KL_TIMES, n=b["kl_samples"], seed=seed)
            row["kl_by_t"] = {f"{r['t']:.1f}": round(r["kl"], 4) for r in kl}
            row["kl"] = round(float(np.mean([r["kl"] for r in kl])), 4)
        rows.append(row)
        scoring.append(time.time() - t0)

    t0 = time.time()
    if schedule == "one-run":
        toy_run.train(toy, objective, max(b["iters"]), seed, on_step=score_model)
    else:
        for iters in b["iters"]:
            score_model(iters, toy_run.train(toy, objective, iters, seed))
    train_seconds = time.time() - t0 - sum(scoring)
    for row in rows:
        row["train_seconds"] = round(train_seconds, 1)
    print(f"  {toy.name:<12} {method:<13} seed {seed}: TV " + " ".join(f"{r['tv']:.3f}" for r in rows) +
          f"  (train {train_seconds:.0f} s, scoring {sum(scoring):.0f} s)", flush=True)
    return rows


def figure_toys(args, b, rows, reference):
    plt = pyplot()
    panels = [(toy_name, "tv") for toy_name in b["toys"]]
    if "checkerboard" in b["toys"] and "purrception" in args.objectives:
        panels.append(("checkerboard", "kl"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (toy_name, key) in zip(axes, panels):
        for method in args.objectives if key == "tv" else ("purrception",):
            by_iter = [[r[key] for r in rows if (r["toy"], r["method"], r["iters"]) == (toy_name, method, it)]
                       for it in b["iters"]]
            mean = [np.mean(v) for v in by_iter]
            ax.plot(b["iters"], mean, "-o", ms=3, c=OBJECTIVE_COLORS[method], label=method)
            ax.fill_between(b["iters"], [min(v) for v in by_iter], [max(v) for v in by_iter],
                            color=OBJECTIVE_COLORS[method], alpha=0.2, lw=0)
        if key == "tv":
            ax.axhline(reference[toy_name]["oracle_tv"], c="k", ls="--", lw=1, label="oracle sampler")
            ax.set_ylabel(f"TV to p(c) ({b['num_samples']} samples)")
            ax.set_ylim(0, None)
            ax.set_title(toy_name, fontsize=10)
        else:
            log_y(ax)
            ax.set_ylabel("KL(exact || learned) [nats/token]")
            ax.set_title("checkerboard: Purrception's posterior", fontsize=10)
        log_ticks(ax, b["iters"])
        ax.set_xlabel("training iterations (batch 512)")
        ax.legend(fontsize=7)
    how = ("scored along one run" if args.schedule == "one-run" else
           "a separate run per budget, each with its schedule completed")
    fig.suptitle(f"Convergence on the 2D toys, {how}: mean and range over {b['seeds']} seed(s)", fontsize=10)
    fig.tight_layout()
    return files.figure(fig)


# ---- Images through a VQ code set ------------------------------------------------------------------------

def on_codes(args):
    """The four objectives trained by train.py on one code set with the same settings, scored at kept checkpoints."""
    b, start = IMAGE_BUDGETS[args.budget], clock()
    codes_dir = need(args.codes, f"--data {args.data} needs --codes CODES (a code set of `python tokenizer.py encode`)")
    with user_errors():
        codes = CodeSet(codes_dir)
    dataset = codes.meta.get("dataset")
    if dataset != args.data:
        raise UserError(f"{codes_dir}: a code set of {dataset}, not of --data {args.data}")
    need_scoring(dataset, args)
    runs_settings = {objective: run_settings(codes_dir, objective, os.path.join(args.out, "runs", objective), b, args)
             for objective in args.objectives}  # every run checked before any work
    reference = reconstruction_reference(codes, b["num_samples"], args)
    rows, runs = [], {}
    for objective in args.objectives:
        run_dir = os.path.join(args.out, "runs", objective)
        runs[objective] = train_run(objective, runs_settings[objective])
        for step in range(b["keep_every"], b["train_steps"] + 1, b["keep_every"]):
            rows.append(score_checkpoint(os.path.join(run_dir, "checkpoints", f"step-{step:07d}.pt"), objective,
                                         step, b, dataset, args))
            print(f"  {objective:<13} step {step:>6}: accuracy {rows[-1]['accuracy']:.3f}  FID {rows[-1]['fid']:.2f}"
                  f"  ({rows[-1]['sample_seconds']:.0f} s sampling)", flush=True)
    table = files.markdown_table(
        ["objective", "training steps", "accuracy", "FID-LeNet", "s/step (train)"],
        [[r["objective"], r["step"], f"{r['accuracy']:.3f}", f"{r['fid']:.2f}",
          f"{runs[r['objective']]['seconds_per_step']:.3f}"] for r in rows] +
        [["VQ reconstructions (ceiling)", "-", f"{reference['accuracy']:.3f}", f"{reference['fid']:.2f}", "-"]])
    note = (f"{b['model']}, batch {b['batch_size']}, lr {b['lr']} ({b['warmup']} warm-up steps, then constant), "
            f"EMA decay {b['ema_decay']} with train.py's --ema-warmup, seed {args.seed}; at each checkpoint "
            f"{b['num_samples']} samples of the EMA weights "
            f"(labels 0..9 cycled), {b['steps']} Euler steps (DFM: discrete Euler), temperature 1, no guidance; "
            f"codebook scale {args.codebook_scale}.")
    plot = figure_metrics_vs(rows, "objective", "step", args.objectives,
                             f"{dataset}: quality vs training steps ({b['model']}, batch {b['batch_size']})",
                             "training steps", reference)
    return write_outputs(args, "convergence-" + args.data, table, note,
                         dict(settings=b, dataset=dataset, codes=os.path.abspath(codes_dir),
                              codebook_scale=args.codebook_scale, runs=runs, reference=reference, rows=rows), start,
                         {"convergence-" + args.data: plot})


def run_settings(codes_dir, objective, run_dir, b, args):
    """train.py's settings for one objective's run of the image study in run_dir (checked against a run already
    there): the budget's settings, a checkpoint kept every keep_every steps, the learning rate held after warm-up
    (so that the checkpoint of step N is what an N-step run gives)."""
    ckpt_every = b.get("ckpt_every", b["keep_every"])
    return train_settings(codes=codes_dir, model=b["model"], objective=objective, out=run_dir,
                          steps=b["train_steps"], batch_size=b["batch_size"], lr=b["lr"], warmup_steps=b["warmup"],
                          ema_decay=b["ema_decay"], ema_warmup=True, seed=args.seed, keep_every=b["keep_every"],
                          ckpt_every=ckpt_every, log_every=ckpt_every, sample_every=0,
                          codebook_scale=args.codebook_scale)


def train_run(objective, settings):
    """Train (or resume, or find finished) one run of the image study: {train_seconds, seconds_per_step}."""
    print(f"training {objective}: python train.py {config.command_line(settings)}", flush=True)
    t0 = time.time()
    train.train(settings)
    return dict(train_seconds=round(time.time() - t0, 1), seconds_per_step=seconds_per_step(settings.out))


def score_checkpoint(path, objective, step, b, dataset, args):
    """The row of one kept checkpoint. Its score is also written beside it (step-N.score.json), so that a study
    stopped part-way and run again scores only what it had not: the score is reused while the checkpoint file
    and the scoring settings are the same."""
    stat = os.stat(path)
    classifier = os.path.abspath(args.classifier or lenet.default_classifier_path(dataset))
    key = dict(checkpoint_bytes=stat.st_size, checkpoint_mtime=stat.st_mtime, num_samples=b["num_samples"],
               steps=b["steps"], seed=args.seed, data_dir=os.path.abspath(args.data_dir), classifier=classifier,
               classifier_mtime=os.stat(classifier).st_mtime)
    cache = path[:-len(".pt")] + ".score.json"
    try:
        with open(cache) as f:
            kept = json.load(f)
        if kept["key"] == key:
            return kept["row"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: scored again
        pass
    flow = load_flow(path, baselines.OBJECTIVES, "convergence")
    samples, labels, seconds = timed_draw(flow, b["num_samples"], args.seed, steps=b["steps"])
    row = dict(objective=objective, step=step, sample_seconds=round(seconds, 1),
               **score(samples, labels, dataset, args))
    files.write_json(cache, dict(key=key, row=row))
    return row


def seconds_per_step(run_dir):
    """Mean training seconds per step over the logged intervals of log.jsonl (None if nothing was logged)."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rates = [json.loads(line)["steps_per_s"] for line in f if line.strip()]
    return round(float(np.mean([1 / r for r in rates if r > 0])), 4) if rates else None


@torch.no_grad()
def reconstruction_reference(codes, n, args):
    """The score of the tokenizer's own reconstructions of the first n training images: the best a flow can
    reach."""
    with user_errors():
        tokenizer = tokenizers.load_for_codes(codes.meta, torch.from_numpy(codes.codebook), "cpu")
    grids, labels = codes.get(np.arange(min(n, len(codes))))
    decoded = images.to_uint8(tokenizer.decode(torch.from_numpy(grids)))
    return score(decoded, labels, codes.meta["dataset"], args)
