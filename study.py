"""
The paper's three claims, measured at laptop scale, one subcommand each (and a look at the posterior):

    python study.py convergence --data toy                         # (1) quality vs training iterations
    python study.py convergence --data fashion-mnist --codes runs/fmnist-codes --data-dir DIR
    python study.py temperature --ckpt RUN/checkpoints/last.pt --data-dir DIR      # (2) temperature sweep
    python study.py solvers --data toy                             # (3) quality vs NFE, on the exact posterior
    python study.py solvers --ckpt PURRCEPTION.pt --dfm-ckpt DFM.pt --data-dir DIR
    python study.py uncertainty --ckpt PURRCEPTION.pt              # posterior entropy along the path

Claims (arXiv 2510.01478): (1) Purrception converges faster than CFM, CFM-endpoint and DFM trained with the
same backbone and budget; (2) the softmax temperature is a training-free quality knob with a U-shaped curve;
(3) as a continuous flow it samples well with few steps and higher-order solvers.

Every subcommand writes OUT/NAME.md (a markdown table, also printed), OUT/NAME.json (every number behind it,
with the settings and wall times) and OUT/NAME*.png. `--budget full` runs the settings below;
`--budget tiny` runs the same code in seconds (for the tests; its numbers mean nothing). Image quality is
scored by evaluate.py: classifier accuracy on the conditioning labels and FID-LeNet against the real images.
Samples are drawn exactly as `python sample.py --seed S --batch-size 250` draws them (labels 0, 1, ..., 9,
0, 1, ... and EMA weights), so any row can be reproduced with sample.py and evaluate.py.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

import vfm
from data import CodeSet, UserError, run_command
from toy import run as toy_run
from toy.toys import Oracle, make_toy

IMAGE_DATASETS = ("mnist", "fashion-mnist")
SAMPLE_BATCH = 250  # sample.py's default batch: sample i gets the same noise as `sample.py --seed S`

# What each subcommand runs at each budget.
CONVERGENCE_TOY = {
    "tiny": dict(toys=("checkerboard", "pairs"), iters=(4, 8), seeds=1, num_samples=400, steps=4, kl_samples=200),
    "full": dict(toys=("checkerboard", "pairs"), iters=(100, 200, 400, 800, 1600, 3200), seeds=2,
                 num_samples=20000, steps=100, kl_samples=2000),
}
CONVERGENCE_IMAGES = {
    "tiny": dict(model="DiT-T/1", batch_size=8, train_steps=2, keep_every=1, lr=1e-4, warmup=0, ema_decay=0.9,
                 num_samples=20, steps=3),
    "full": dict(model="DiT-T/1", batch_size=64, train_steps=3000, keep_every=500, lr=1e-3, warmup=100,
                 ema_decay=0.995, num_samples=1000, steps=100),
}
TEMPERATURE = {
    "tiny": dict(temperatures=("0.5", "1.0", "1.5"), schedules=("linear:1.2:0.8", "cosine:1.2:0.8"),
                 cfg_scales=(1.0, 2.0), num_samples=20, steps=3, grid_per_class=2),
    "full": dict(temperatures=("0.2", "0.3", "0.5", "0.7", "0.8", "0.9", "1.0", "1.2", "1.5"),
                 schedules=("linear:1.2:0.8", "cosine:1.2:0.8", "linear:0.8:1.2"),
                 cfg_scales=(1.0, 2.0), num_samples=1000, steps=50, grid_per_class=8),
}
SOLVERS_TOY = {
    "tiny": dict(toys=("checkerboard", "pairs"), iters=8, nfe=(2, 4), num_samples=400),
    "full": dict(toys=("checkerboard", "pairs"), iters=3200, nfe=(4, 8, 16, 32, 100), num_samples=20000),
}
SOLVERS_IMAGES = {
    "tiny": dict(nfe=(2, 4), num_samples=20),
    "full": dict(nfe=(4, 8, 16, 32, 100), num_samples=1000),
}
UNCERTAINTY = {
    "tiny": dict(classes=2, times=3, steps=4),
    "full": dict(classes=6, times=8, steps=100),
}


# ----------------------------------------------------------------------------------------------------------
# Outputs: a markdown table, a JSON record, figures
# ----------------------------------------------------------------------------------------------------------

def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(args, name, table, record, start):
    """OUT/NAME.md and OUT/NAME.json; print the table."""
    record = dict(command=args.command_line, budget=args.budget, seconds=round(time.time() - start[0], 1),
                  cpu_seconds=round(time.process_time() - start[1], 1), **record)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    toy_run.write_json(os.path.join(args.out, f"{name}.json"), record)
    print(table)
    print(f"{args.out}/{name}.md, {name}.json, {name}*.png written in {record['seconds']:.0f} s "
          f"({record['cpu_seconds']:.0f} CPU seconds)")
    return record


def clock():
    """(wall seconds, CPU seconds of this process over all its threads): on a shared machine the second is the
    steadier measure of the work done."""
    return time.time(), time.process_time()


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


def mean_spread(values):
    """'mean ± half-range' over seeds (the value alone for one seed)."""
    values = [v for v in values if v is not None]
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"


def steps_for_nfe(nfe, solver):
    """Steps of `solver` whose network evaluations come closest to `nfe` without exceeding it (at least 1)."""
    if solver == "heun":  # 2 * steps - 1 evaluations: the last step is an Euler step
        return max(1, (nfe + 1) // 2)
    return max(1, nfe // (2 if solver == "midpoint" else 1))


# ----------------------------------------------------------------------------------------------------------
# Image runs: loading checkpoints, sampling, scoring
# ----------------------------------------------------------------------------------------------------------

class Flow:
    """A trained flow of train.py with what sampling and scoring need: EMA model, objective, tokenizer."""

    def __init__(self, path, objectives, role):
        import sample
        import train
        ckpt = train.load_checkpoint(path)
        objective = ckpt["args"]["objective"]
        if objective not in objectives:
            raise UserError(f"{path}: a checkpoint of {objective}; {role} needs {' or '.join(objectives)}")
        self.path, self.step = path, ckpt["step"]
        self.model, self.objective, ckpt = sample.load_flow(path, "cpu", use_ema=True)
        self.meta, self.name = ckpt["codes_meta"], objective
        self.grid = tuple(self.meta["grid"])
        self.tokenizer = sample.load_codes_tokenizer(self.meta, ckpt["codebook"], "cpu")

    @property
    def dataset(self):
        return self.meta.get("dataset", "unknown")

    def labels(self, n):
        classes = self.meta["num_classes"]
        return np.arange(n) % classes if classes else np.zeros(n, dtype=np.int64)

    def generate(self, n, steps, solver="euler", temperature="1.0", cfg_scale=1.0, seed=0):
        """(images uint8 (n, H, W, C), labels (n,), seconds): batches of 250 seeded as sample.py seeds them."""
        import sample
        labels, parts, start = self.labels(n), [], time.time()
        for b, lo in enumerate(range(0, n, SAMPLE_BATCH)):
            y = torch.from_numpy(labels[lo:lo + SAMPLE_BATCH])
            parts.append(sample.generate(self.model, self.objective, self.tokenizer, y, self.grid, steps=steps,
                                         solver=solver, temperature=temperature, cfg_scale=cfg_scale,
                                         seed=seed * 1_000_003 + b, device="cpu"))
        return np.concatenate(parts), labels, time.time() - start


def score(images, labels, dataset, args):
    """evaluate.py's accuracy (of its classifier on the conditioning labels), FID-LeNet and coverage."""
    import evaluate
    metrics = evaluate.evaluate_images(images, labels, dataset, need_data_dir(args), classifier_path=args.classifier)
    return dict(accuracy=round(float(metrics["accuracy"]), 4), fid=round(float(metrics["fid"]), 3),
                coverage=round(float(metrics["coverage"]), 4))


def need(value, message):
    if not value:
        raise UserError(message)
    return value


def need_data_dir(args):
    return need(args.data_dir, "scoring images needs --data-dir (the directory of the dataset's IDX files)")


def metric_panels(plt, title):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].set_ylabel("classifier accuracy (higher is better)")
    axes[1].set_ylabel("FID-LeNet (lower is better)")
    fig.suptitle(title, fontsize=10)
    return fig, axes


# ----------------------------------------------------------------------------------------------------------
# (1) Convergence
# ----------------------------------------------------------------------------------------------------------

def convergence(args):
    if args.data == "toy":
        if args.codes:
            raise UserError("--codes is for --data fashion-mnist or mnist; the toys need no code set")
        args.schedule = args.schedule or "one-run"
        return convergence_toy(args)
    if args.schedule:
        raise UserError("--schedule is for --data toy; train.py keeps its learning rate constant after warm-up, "
                        "so the checkpoints along one run are what a shorter budget gives")
    return convergence_images(args)


def convergence_toy(args):
    """Every objective on every toy, scored at each of the budget's iteration counts.

    --schedule one-run: along one run of the largest count (toy/run.py's warm-up and cosine decay over all of
    it), so the early points are models at a high learning rate. --schedule per-budget: a separate run for
    every count, each with its own warm-up and decay to zero: what a user with that budget would get."""
    torch.set_num_threads(1)  # the toy's small matrices: a second thread costs more than it gives
    b, start = CONVERGENCE_TOY[args.budget], clock()
    rows, reference = [], {}
    for toy_name in b["toys"]:
        toy = make_toy(toy_name)
        oracle_objective = vfm.build_objective("purrception", toy.codebook)
        oracle = Oracle(toy, oracle_objective.codebook)
        codes = toy_run.sample(toy, oracle_objective, oracle, b["num_samples"], args.seed, steps=b["steps"])
        exact = toy.sample(b["num_samples"], torch.Generator().manual_seed(args.seed))
        reference[toy_name] = dict(oracle_tv=round(toy.tv(codes), 4), exact_draws_tv=round(toy.tv(exact), 4))
        for method in vfm.OBJECTIVES:
            for seed in range(args.seed, args.seed + b["seeds"]):
                objective = vfm.build_objective(method, toy.codebook)
                mine, scoring = [], []

                def score_model(step, model):
                    if step not in b["iters"]:
                        return
                    t0 = time.time()
                    codes = toy_run.sample(toy, objective, model, b["num_samples"], seed, steps=b["steps"])
                    row = dict(toy=toy_name, method=method, seed=seed, iters=step, tv=round(toy.tv(codes), 4))
                    if method == "purrception" and toy_name == "checkerboard":
                        kl = toy_run.posterior_by_t(toy, objective.codebook, model, [0.1, 0.3, 0.5, 0.7, 0.9],
                                                    n=b["kl_samples"], seed=seed)
                        row["kl_by_t"] = {f"{r['t']:.1f}": round(r["kl"], 4) for r in kl}
                        row["kl"] = round(float(np.mean([r["kl"] for r in kl])), 4)
                    mine.append(row)
                    scoring.append(time.time() - t0)

                t0 = time.time()
                if args.schedule == "one-run":
                    toy_run.train(toy, objective, max(b["iters"]), seed, on_step=score_model)
                else:
                    for iters in b["iters"]:
                        score_model(iters, toy_run.train(toy, objective, iters, seed))
                train_seconds = time.time() - t0 - sum(scoring)
                for row in mine:
                    row["train_seconds"] = round(train_seconds, 1)
                rows += mine
                print(f"  {toy_name:<12} {method:<13} seed {seed}: TV " + " ".join(f"{r['tv']:.3f}" for r in mine) +
                      f"  (train {train_seconds:.0f} s, scoring {sum(scoring):.0f} s)", flush=True)

    def cells(toy_name, method, key):
        return [mean_spread([r.get(key) for r in rows if (r["toy"], r["method"], r["iters"]) ==
                             (toy_name, method, it)]) for it in b["iters"]]

    table_rows = []
    for toy_name in b["toys"]:
        table_rows += [[toy_name, "TV", m, *cells(toy_name, m, "tv")] for m in vfm.OBJECTIVES]
        ref = reference[toy_name]
        table_rows.append([toy_name, "TV", "oracle (exact posterior)", *[f"{ref['oracle_tv']:.3f}"] * len(b["iters"])])
        table_rows.append([toy_name, "TV", f"{b['num_samples']} exact draws",
                           *[f"{ref['exact_draws_tv']:.3f}"] * len(b["iters"])])
    if "checkerboard" in b["toys"]:
        table_rows.append(["checkerboard", "KL", "purrception", *cells("checkerboard", "purrception", "kl")])
    table = markdown_table(["toy", "metric", "method", *map(str, b["iters"])], table_rows)
    runs = (f"after N training iterations of one {max(b['iters'])}-iteration run" if args.schedule == "one-run" else
            "of a separate N-iteration run for each N (warm-up and cosine decay completed)")
    note = (f"\n\nTV of {b['num_samples']} samples ({b['steps']} Euler steps; DFM: discrete Euler steps) {runs} "
            f"(batch 512), mean ± half the range over {b['seeds']} seed(s). KL: Purrception's mean "
            f"KL(exact || learned posterior) over t = 0.1 ... 0.9.")
    name = "convergence-toy" + ("" if args.schedule == "one-run" else "-per-budget")
    figure_convergence_toy(args, name, b, rows, reference)
    return write_outputs(args, name, table + note,
                         dict(settings=b, schedule=args.schedule, reference=reference, rows=rows), start)


def figure_convergence_toy(args, name, b, rows, reference):
    plt = pyplot()
    panels = [(toy_name, "tv") for toy_name in b["toys"]]
    if "checkerboard" in b["toys"]:
        panels.append(("checkerboard", "kl"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    colors = dict(zip(vfm.OBJECTIVES, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for ax, (toy_name, key) in zip(axes, panels):
        for method in vfm.OBJECTIVES if key == "tv" else ("purrception",):
            by_iter = [[r[key] for r in rows if (r["toy"], r["method"], r["iters"]) == (toy_name, method, it)]
                       for it in b["iters"]]
            mean = [np.mean(v) for v in by_iter]
            ax.plot(b["iters"], mean, "-o", ms=3, c=colors[method], label=method)
            ax.fill_between(b["iters"], [min(v) for v in by_iter], [max(v) for v in by_iter], color=colors[method],
                            alpha=0.2, lw=0)
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
    fig.savefig(os.path.join(args.out, f"{name}.png"), dpi=110)
    plt.close(fig)


def convergence_images(args):
    """The four objectives trained by train.py on one code set with the same settings, scored at kept checkpoints."""
    import train
    b, start = CONVERGENCE_IMAGES[args.budget], clock()
    codes_dir = need(args.codes, f"--data {args.data} needs --codes CODES (a code set of `python vq.py encode`)")
    need_data_dir(args)
    codes = CodeSet(codes_dir)
    dataset = codes.meta.get("dataset")
    if dataset != args.data:
        raise UserError(f"{codes_dir}: a code set of {dataset}, not of --data {args.data}")
    reference = reconstruction_reference(codes, b["num_samples"], args)
    rows, runs = [], {}
    for objective in vfm.OBJECTIVES:
        run_dir = os.path.join(args.out, "runs", objective)
        argv = ["--codes", codes_dir, "--model", b["model"], "--objective", objective, "--out", run_dir,
                "--steps", b["train_steps"], "--batch-size", b["batch_size"], "--lr", b["lr"],
                "--warmup-steps", b["warmup"], "--ema-decay", b["ema_decay"], "--seed", args.seed,
                "--keep-every", b["keep_every"], "--ckpt-every", b["keep_every"], "--log-every", b["keep_every"],
                "--sample-every", 0, "--resume"]
        print(f"training {objective}: python train.py {' '.join(map(str, argv))}", flush=True)
        t0 = time.time()
        train.train(train.parse_args([str(a) for a in argv]))
        runs[objective] = dict(train_seconds=round(time.time() - t0, 1), seconds_per_step=seconds_per_step(run_dir))
        for step in range(b["keep_every"], b["train_steps"] + 1, b["keep_every"]):
            flow = Flow(os.path.join(run_dir, "checkpoints", f"step-{step:07d}.pt"), vfm.OBJECTIVES, "convergence")
            images, labels, seconds = flow.generate(b["num_samples"], b["steps"], seed=args.seed)
            rows.append(dict(objective=objective, step=step, sample_seconds=round(seconds, 1),
                             **score(images, labels, dataset, args)))
            print(f"  {objective:<13} step {step:>6}: accuracy {rows[-1]['accuracy']:.3f}  FID {rows[-1]['fid']:.2f}"
                  f"  ({seconds:.0f} s sampling)", flush=True)
    table = markdown_table(
        ["objective", "training steps", "accuracy", "FID-LeNet", "s/step (train)"],
        [[r["objective"], r["step"], f"{r['accuracy']:.3f}", f"{r['fid']:.2f}",
          f"{runs[r['objective']]['seconds_per_step']:.3f}"] for r in rows] +
        [["VQ reconstructions (ceiling)", "-", f"{reference['accuracy']:.3f}", f"{reference['fid']:.2f}", "-"]])
    note = (f"\n\n{b['model']}, batch {b['batch_size']}, lr {b['lr']} ({b['warmup']} warm-up steps), EMA decay "
            f"{b['ema_decay']}, seed {args.seed}; at each checkpoint {b['num_samples']} samples of the EMA weights "
            f"(labels 0..9 cycled), {b['steps']} Euler steps (DFM: discrete Euler), temperature 1, no guidance.")
    figure_metrics_vs(args, "convergence-" + args.data, rows, "objective", "step", vfm.OBJECTIVES,
                      f"{dataset}: quality vs training steps ({b['model']}, batch {b['batch_size']})",
                      "training steps", reference)
    return write_outputs(args, "convergence-" + args.data, table + note,
                         dict(settings=b, dataset=dataset, codes=os.path.abspath(codes_dir), runs=runs,
                              reference=reference, rows=rows), start)


def seconds_per_step(run_dir):
    """Mean training seconds per step over the logged intervals of log.jsonl (None if nothing was logged)."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rates = [json.loads(line)["steps_per_s"] for line in f if line.strip()]
    return round(float(np.mean([1 / r for r in rates if r > 0])), 4) if rates else None


def reconstruction_reference(codes, n, args):
    """The score of the tokenizer's own reconstructions of n training images: the best a flow can reach."""
    import sample
    tokenizer = sample.load_codes_tokenizer(codes.meta, torch.from_numpy(codes.codebook), "cpu")
    grids, labels = codes.get(np.arange(min(n, len(codes))))
    with torch.no_grad():
        images = sample.to_uint8(tokenizer.decode(torch.from_numpy(grids)))
    return score(images, labels, codes.meta["dataset"], args)


def figure_metrics_vs(args, name, rows, series_key, x_key, series, title, xlabel, reference=None, log_x=None):
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
    fig.savefig(os.path.join(args.out, f"{name}.png"), dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# (2) Temperature
# ----------------------------------------------------------------------------------------------------------

def temperature(args):
    """Constant temperatures and schedules over t, with and without guidance, on one Purrception checkpoint."""
    b, start = TEMPERATURE[args.budget], clock()
    flow = Flow(need(args.ckpt, "temperature needs --ckpt RUN/checkpoints/last.pt (a Purrception run)"),
                ("purrception",), "temperature")
    need_data_dir(args)
    rows, kept = [], {}
    for cfg in b["cfg_scales"]:
        for spec in b["temperatures"] + b["schedules"]:
            images, labels, seconds = flow.generate(b["num_samples"], b["steps"], temperature=spec, cfg_scale=cfg,
                                                    seed=args.seed)
            rows.append(dict(temperature=spec, constant=":" not in spec, cfg_scale=cfg,
                             sample_seconds=round(seconds, 1), **score(images, labels, flow.dataset, args)))
            if cfg == 1.0 and ":" not in spec:
                kept[spec] = images
            print(f"  temperature {spec:<15} cfg {cfg}: accuracy {rows[-1]['accuracy']:.3f}  "
                  f"FID {rows[-1]['fid']:.2f}  ({seconds:.0f} s)", flush=True)

    def cell(spec, cfg, metric):
        r = next(r for r in rows if (r["temperature"], r["cfg_scale"]) == (spec, cfg))
        return f"{r[metric]:.3f}" if metric == "accuracy" else f"{r[metric]:.2f}"

    header = ["temperature"] + [f"{m} (cfg {cfg:g})" for cfg in b["cfg_scales"] for m in ("accuracy", "FID")]
    table = markdown_table(header, [[spec] + [cell(spec, cfg, m) for cfg in b["cfg_scales"]
                                              for m in ("accuracy", "fid")]
                                    for spec in b["temperatures"] + b["schedules"]])
    note = (f"\n\n{flow.path} (step {flow.step}, EMA): {b['num_samples']} samples (labels 0..9 cycled), "
            f"{b['steps']} Euler steps, the same noise for every row. 'linear:A:B' and 'cosine:A:B' go from A at "
            f"t = 0 (noise) to B at t = 1 (data). cfg 1 is no guidance.")
    constants = [r for r in rows if r["constant"] and r["cfg_scale"] == 1.0]
    best = min(constants, key=lambda r: r["fid"])["temperature"]
    chosen = [b["temperatures"][0], best, b["temperatures"][-1]]
    figure_temperature(args, b, rows, flow)
    figure_temperature_grid(args, b, rows, kept, chosen, flow)
    return write_outputs(args, "temperature", table + note,
                         dict(settings=b, ckpt=os.path.abspath(flow.path), step=flow.step, best_constant=best,
                              grid_temperatures=chosen, rows=rows), start)


def figure_temperature(args, b, rows, flow):
    plt = pyplot()
    fig, axes = metric_panels(plt, f"Temperature sweep: Purrception, {flow.dataset}, step {flow.step}")
    markers = "s^vDP"
    for ax, metric in zip(axes, ("accuracy", "fid")):
        for i, cfg in enumerate(b["cfg_scales"]):
            color = f"C{i}"
            const = [(float(r["temperature"]), r[metric]) for r in rows if r["constant"] and r["cfg_scale"] == cfg]
            ax.plot(*zip(*sorted(const)), "-o", ms=3, c=color, label=f"constant, cfg {cfg:g}")
            for j, spec in enumerate(b["schedules"]):
                r = next(r for r in rows if (r["temperature"], r["cfg_scale"]) == (spec, cfg))
                tau = vfm.parse_temperature(spec)
                mean_tau = float(np.mean([tau(t) for t in np.linspace(0, 1, 101)]))
                ax.plot([mean_tau], [r[metric]], markers[j % len(markers)], c=color, ms=6, mfc="none",
                        label=f"{spec}, cfg {cfg:g}")
        if metric == "fid":
            log_y(ax)
        ax.set_xlabel("temperature (schedules at their mean over t)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "temperature.png"), dpi=110)
    plt.close(fig)


def figure_temperature_grid(args, b, rows, kept, chosen, flow):
    import sample
    plt = pyplot()
    fig, axes = plt.subplots(1, len(chosen), figsize=(4.2 * len(chosen), 4.6))
    labels = flow.labels(b["num_samples"])
    for ax, spec, role in zip(axes, chosen, ("lowest", "best FID", "highest")):
        grid = sample.class_grid(kept[spec], labels, per_row=b["grid_per_class"])
        canvas = tile(grid, b["grid_per_class"])
        ax.imshow(canvas, cmap="gray", vmin=0, vmax=255)
        r = next(r for r in rows if (r["temperature"], r["cfg_scale"]) == (spec, 1.0))
        ax.set_title(f"{role}: temperature {spec}\naccuracy {r['accuracy']:.3f}, FID-LeNet {r['fid']:.2f}", fontsize=9)
        ax.axis("off")
    fig.suptitle("Samples at the lowest, the best (lowest FID) and the highest constant temperature, no guidance; "
                 "a row per class, the same noise in each panel", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "temperature-grid.png"), dpi=110)
    plt.close(fig)


def tile(images, nrow, pad=2):
    """uint8 (B, H, W, C) -> one (rows * (H + pad), nrow * (W + pad)) or RGB canvas on white."""
    B, H, W, C = images.shape
    rows = (B + nrow - 1) // nrow
    canvas = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, C), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        canvas[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = img
    return canvas[..., 0] if C == 1 else canvas


# ----------------------------------------------------------------------------------------------------------
# (3) Solvers and the number of function evaluations
# ----------------------------------------------------------------------------------------------------------

def solvers(args):
    if args.data == "toy":
        if args.ckpt or args.dfm_ckpt:
            raise UserError("--ckpt and --dfm-ckpt are for --data fashion-mnist or mnist; the toy trains its own")
        return solvers_toy(args)
    return solvers_images(args)


def solvers_toy(args):
    """Euler, Heun and midpoint on the exact posterior and on a trained Purrception MLP; DFM at the same NFE.

    On the one-token checkerboard DFM's first step already draws from the learned p(c), so any NFE is exact
    for it; the two-token pairs toy is where a few discrete steps pay for revealing tokens independently."""
    torch.set_num_threads(1)
    b, start = SOLVERS_TOY[args.budget], clock()
    rows, train_seconds, exact = [], {}, {}
    for toy_name in b["toys"]:
        toy = make_toy(toy_name)
        purrception = vfm.build_objective("purrception", toy.codebook)
        dfm = vfm.build_objective("dfm", toy.codebook)
        t0 = time.time()
        models = [("oracle", purrception, Oracle(toy, purrception.codebook)),
                  ("purrception", purrception, toy_run.train(toy, purrception, b["iters"], args.seed)),
                  ("dfm", dfm, toy_run.train(toy, dfm, b["iters"], args.seed))]
        train_seconds[toy_name] = round(time.time() - t0, 1)
        exact[toy_name] = round(toy.tv(toy.sample(b["num_samples"], torch.Generator().manual_seed(args.seed))), 4)
        for name, objective, model in models:
            for solver in ("euler",) if name == "dfm" else vfm.SOLVERS:
                for target in b["nfe"]:
                    steps = steps_for_nfe(target, solver)
                    t0 = time.time()
                    codes = toy_run.sample(toy, objective, model, b["num_samples"], args.seed, steps=steps,
                                           solver=solver)
                    rows.append(dict(toy=toy_name, model=name, solver="discrete euler" if name == "dfm" else solver,
                                     nfe_target=target, steps=steps, nfe=vfm.num_evaluations(steps, solver),
                                     seconds=round(time.time() - t0, 4), tv=round(toy.tv(codes), 4)))
                print(f"  {toy_name:<12} {name:<12} {rows[-1]['solver']:<14} TV at NFE {b['nfe']}: " +
                      " ".join(f"{r['tv']:.3f}" for r in rows[-len(b["nfe"]):]), flush=True)
    def cells(series):
        mine = [r for r in rows if (r["toy"], r["model"], r["solver"]) == series]
        tv = [f"{r['tv']:.3f}" + ("" if r["nfe"] == r["nfe_target"] else f" ({r['nfe']})") for r in mine]
        us = 1e6 * sum(r["seconds"] for r in mine) / (b["num_samples"] * sum(r["nfe"] for r in mine))
        return tv + [f"{us:.1f}"]

    table = markdown_table(["toy", "model", "solver", *(f"NFE {n}" for n in b["nfe"]), "µs/sample/NFE"],
                           [[*series, *cells(series)]
                            for series in dict.fromkeys((r["toy"], r["model"], r["solver"]) for r in rows)])
    note = (f"\n\nTV to p(c) of {b['num_samples']} samples; in brackets the NFE a solver actually used where it "
            f"cannot hit the target (Heun: 2 per step but 1 for the last, an Euler step). oracle = the exact "
            f"posterior through Purrception's sampler; purrception and dfm: the toy MLP trained {b['iters']} "
            f"iterations (batch 512, seed {args.seed}). TV of {b['num_samples']} exact draws from p(c) (the floor): " +
            ", ".join(f"{k} {v:.3f}" for k, v in exact.items()) + ". µs/sample/NFE: sampling wall time on this "
            f"machine's CPU (one thread) per sample and network evaluation, over the row.")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(b["toys"]), figsize=(5.2 * len(b["toys"]), 4), squeeze=False)
    styles = {"euler": "-o", "heun": "-s", "midpoint": "-^", "discrete euler": "--D"}
    colors = {"oracle": "k", "purrception": "tab:blue", "dfm": "tab:red"}
    for ax, toy_name in zip(axes[0], b["toys"]):
        mine = [r for r in rows if r["toy"] == toy_name]
        for series in dict.fromkeys((r["model"], r["solver"]) for r in mine):
            pts = [(r["nfe"], r["tv"]) for r in mine if (r["model"], r["solver"]) == series]
            ax.plot(*zip(*pts), styles[series[1]], c=colors[series[0]], ms=4, label=", ".join(series))
        ax.axhline(exact[toy_name], c="0.5", ls=":", lw=1, label=f"{b['num_samples']} exact draws")
        log_ticks(ax, b["nfe"])
        log_y(ax)
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel(f"TV to p(c) ({b['num_samples']} samples)")
        ax.set_title(f"{toy_name}: quality vs NFE", fontsize=10)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "solvers-toy.png"), dpi=110)
    plt.close(fig)
    return write_outputs(args, "solvers-toy", table + note,
                         dict(settings=b, seed=args.seed, train_seconds=train_seconds, exact_draws_tv=exact,
                              rows=rows), start)


def solvers_images(args):
    """Quality and seconds per sample vs NFE for a Purrception checkpoint's solvers and a DFM checkpoint."""
    b, start = SOLVERS_IMAGES[args.budget], clock()
    flows = [Flow(need(args.ckpt, f"solvers --data {args.data} needs --ckpt (a Purrception checkpoint)"),
                  ("purrception",), "--ckpt")]
    if args.dfm_ckpt:
        flows.append(Flow(args.dfm_ckpt, ("dfm",), "--dfm-ckpt"))
    if flows[0].dataset != args.data:
        raise UserError(f"{args.ckpt}: trained on {flows[0].dataset} codes, not --data {args.data}")
    need_data_dir(args)
    rows = []
    for flow in flows:
        for solver in ("euler",) if flow.name == "dfm" else vfm.SOLVERS:
            for target in b["nfe"]:
                steps = steps_for_nfe(target, solver)
                images, labels, seconds = flow.generate(b["num_samples"], steps, solver=solver, seed=args.seed)
                rows.append(dict(model=flow.name, solver="discrete euler" if flow.name == "dfm" else solver,
                                 nfe_target=target, steps=steps, nfe=vfm.num_evaluations(steps, solver),
                                 seconds_per_sample=round(seconds / b["num_samples"], 5),
                                 **score(images, labels, flow.dataset, args)))
                print(f"  {flow.name:<12} {solver:<9} NFE {rows[-1]['nfe']:>3}: accuracy {rows[-1]['accuracy']:.3f}"
                      f"  FID {rows[-1]['fid']:.2f}  ({seconds:.0f} s)", flush=True)
    table = markdown_table(["model", "solver", "NFE target", "steps", "NFE", "ms/sample", "accuracy", "FID-LeNet"],
                           [[r["model"], r["solver"], r["nfe_target"], r["steps"], r["nfe"],
                             f"{1000 * r['seconds_per_sample']:.1f}", f"{r['accuracy']:.3f}", f"{r['fid']:.2f}"]
                            for r in rows])
    note = (f"\n\n{b['num_samples']} samples per row (labels 0..9 cycled, EMA weights, temperature 1, no guidance); "
            f"checkpoints: " + ", ".join(f"{f.name} {f.path} (step {f.step})" for f in flows) +
            f". ms/sample: wall time of sampling and decoding, on this machine's CPU, in batches of {SAMPLE_BATCH}.")
    for row in rows:
        row["series"] = f"{row['model']}, {row['solver']}"
    series = list(dict.fromkeys(r["series"] for r in rows))
    figure_metrics_vs(args, "solvers-" + args.data, rows, "series", "nfe", series,
                      f"{flows[0].dataset}: quality vs network evaluations", "network evaluations (NFE)",
                      log_x=b["nfe"])
    return write_outputs(args, "solvers-" + args.data, table + note,
                         dict(settings=b, seed=args.seed, ckpts={f.name: os.path.abspath(f.path) for f in flows},
                              rows=rows), start)


# ----------------------------------------------------------------------------------------------------------
# The posterior's uncertainty along the path
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def uncertainty(args):
    """Per-token entropy of q(c | z_t) and the decoded argmax at several times of one Euler path per class."""
    import sample
    b, start = UNCERTAINTY[args.budget], clock()
    flow = Flow(need(args.ckpt, "uncertainty needs --ckpt RUN/checkpoints/last.pt (a Purrception run)"),
                ("purrception",), "uncertainty")
    classes = max(1, min(b["classes"], flow.meta["num_classes"]))
    labels = torch.arange(classes) if flow.meta["num_classes"] else None
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
    entropy = torch.stack([-(torch.log_softmax(l, -1).exp() * torch.log_softmax(l, -1)).sum(-1)
                           for _, l in captured], 1)  # (B, T, h, w)
    argmax = torch.stack([l.argmax(-1) for _, l in captured], 1)  # (B, T, h, w)
    decoded = sample.to_uint8(flow.tokenizer.decode(argmax.flatten(0, 1)))  # (B * T, H, W, C)
    decoded = decoded.reshape(classes, len(times), *decoded.shape[1:])
    final_images = sample.to_uint8(flow.tokenizer.decode(final))
    agree = (argmax == final[:, None]).float().flatten(2).mean(2)  # (B, T)
    names = flow.meta.get("class_names") or [str(i) for i in range(classes)]
    max_entropy = math.log(flow.objective.num_codes)

    header = ["sample"] + [f"t={t:.2f}" for t in times]
    table_rows = [[f"{names[i] if labels is not None else i}: entropy"] +
                  [f"{entropy[i, j].mean():.2f}" for j in range(len(times))] for i in range(classes)]
    table_rows.append(["all: entropy"] + [f"{entropy[:, j].mean():.2f}" for j in range(len(times))])
    table_rows.append(["all: argmax = final code"] + [f"{agree[:, j].mean():.0%}" for j in range(len(times))])
    note = (f"\n\nMean per-token entropy of q(c | z_t) in nats (uniform over K = {flow.objective.num_codes}: "
            f"{max_entropy:.2f}) along one {b['steps']}-step Euler path per class, temperature 1, no guidance; "
            f"{flow.path} (step {flow.step}, EMA), seed {args.seed}.")

    plt = pyplot()
    T = len(times)
    fig, axes = plt.subplots(classes, 2 * T + 1, figsize=(0.95 * (2 * T + 1) + 0.8, 1.05 * classes + 0.5),
                             squeeze=False)
    for i in range(classes):
        for j in range(T):
            im = axes[i, 2 * j].imshow(entropy[i, j].numpy(), cmap="magma", vmin=0, vmax=max_entropy,
                                       interpolation="nearest")
            axes[i, 2 * j + 1].imshow(decoded[i, j].squeeze(-1), cmap="gray", vmin=0, vmax=255)
            if i == 0:
                axes[i, 2 * j].set_title(f"t={times[j]:.2f}\nentropy", fontsize=7)
                axes[i, 2 * j + 1].set_title("\nargmax", fontsize=7)
        axes[i, -1].imshow(final_images[i].squeeze(-1), cmap="gray", vmin=0, vmax=255)
        axes[i, 0].set_ylabel(names[i] if labels is not None else str(i), fontsize=7)
    axes[0, -1].set_title("final\nsample", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes, fraction=0.015, pad=0.01, label="entropy [nats]")
    fig.savefig(os.path.join(args.out, "uncertainty.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)
    return write_outputs(args, "uncertainty", markdown_table(header, table_rows) + note,
                         dict(settings=b, ckpt=os.path.abspath(flow.path), step=flow.step, times=times,
                              classes=[names[i] if labels is not None else str(i) for i in range(classes)],
                              mean_entropy=entropy.mean((2, 3)).tolist(), argmax_agrees_with_final=agree.tolist(),
                              entropy_maps=entropy.tolist()), start)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

BUDGET_HELP = {
    "convergence": "CPU budget at --budget full, on 2 cores: --data toy about 15 minutes (2 toys x 4 objectives x 2 "
                   "seeds, 3,200 iterations of batch 512, scored at 6 points with 20,000 samples of 100 steps; "
                   "--schedule per-budget about 1.5x that); --data fashion-mnist about an hour (4 objectives x "
                   "3,000 DiT-T/1 steps of batch 64 at about 8 steps/s, then 6 checkpoints each scored with 1,000 "
                   "samples of 100 Euler steps, about 85 s apiece).",
    "temperature": "CPU budget at --budget full, on 2 cores: about 30 minutes for DiT-T/1 (12 temperatures and "
                   "schedules x 2 guidance scales x 1,000 samples of 50 Euler steps, the sampling setting of the "
                   "README's Fashion-MNIST tier; guidance doubles the batch).",
    "solvers": "CPU budget at --budget full, on 2 cores: --data toy about 5 minutes; --data fashion-mnist about 10 "
               "minutes for DiT-T/1 (20 rows of 1,000 samples at NFE 4 to 100).",
    "uncertainty": "CPU budget at --budget full: seconds (6 samples, 100 Euler steps).",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--budget", choices=("tiny", "full"), default="full",
                        help="full: the study as described above; tiny: seconds, for the tests")
    common.add_argument("--out", default="runs/study", help="where the tables, JSON and figures go")
    common.add_argument("--seed", type=int, default=0, help="training and sampling seed (toys: the first seed)")
    sub = p.add_subparsers(dest="command", required=True)
    helps = {"convergence": "(1) quality vs training iterations for the four objectives",
             "temperature": "(2) quality vs softmax temperature on a Purrception checkpoint",
             "solvers": "(3) quality vs network evaluations for Euler, Heun, midpoint (and DFM)",
             "uncertainty": "the posterior's per-token entropy along the sampling path"}
    parsers = {name: sub.add_parser(name, parents=[common], help=helps[name], description=helps[name] + ". " +
                                    BUDGET_HELP[name]) for name in helps}
    for name in ("convergence", "solvers"):
        parsers[name].add_argument("--data", choices=("toy",) + IMAGE_DATASETS, default="toy",
                                   help="the 2D toys, or images through a VQ code set")
    parsers["convergence"].add_argument("--codes", help="a code set of `python vq.py encode` (image data)")
    parsers["convergence"].add_argument("--schedule", choices=("one-run", "per-budget"),
                                        help="toys: score one run along the way (one-run, the default), or train a "
                                        "separate run per iteration count, each with its learning-rate schedule "
                                        "completed (per-budget)")
    for name in ("temperature", "solvers", "uncertainty"):
        parsers[name].add_argument("--ckpt", help="a Purrception checkpoint of train.py (RUN/checkpoints/last.pt)")
    parsers["solvers"].add_argument("--dfm-ckpt", help="a DFM checkpoint: its discrete sampler at the same NFE")
    for name in ("convergence", "temperature", "solvers"):
        parsers[name].add_argument("--data-dir", help="the dataset's IDX files, for scoring images (evaluate.py)")
        parsers[name].add_argument("--classifier", help="evaluate.py's classifier file (default: its cache, "
                                   "trained on first use)")
    args = p.parse_args(argv)
    args.command_line = "python study.py " + " ".join(sys.argv[1:] if argv is None else map(str, argv))
    return args


COMMANDS = {"convergence": convergence, "temperature": temperature, "solvers": solvers, "uncertainty": uncertainty}


def main(argv=None):
    args = parse_args(argv)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create --out {args.out}: {e.strerror}", file=sys.stderr)
        sys.exit(2)
    return run_command(COMMANDS[args.command], args)


if __name__ == "__main__":
    main()
