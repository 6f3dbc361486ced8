"""
Where the convergence claim should show: the codebook size K.

The paper's gaps come from K = 16,384 codes. With few codes, predicting the clean token (Purrception,
CFM-endpoint, DFM) is an easy classification, and the objectives learn at about the same rate; with many, the
posterior over codes is what has to be learned. Each code set (tokenizers of one dataset with different K, the
same grid) gets the convergence study's runs of each objective, scored once at the end of the budget, beside the
tokenizer's own reconstructions: the ceiling of its codes.
"""

import os

from experiments.studies.common import (clock, log_ticks, log_y, metric_panels, need, need_scoring, pyplot,
                                        refuse_to_replace, write_outputs)
from experiments.studies.convergence import (IMAGE_BUDGETS, OBJECTIVE_COLORS, parse_objectives,
                                             reconstruction_reference, run_settings, score_checkpoint, train_run)
from support import files
from support.cli import UserError, user_errors
from support.codesets import CodeSet

# The convergence study's image settings, with one checkpoint kept (and scored): the last.
BUDGETS = {
    "tiny": dict(IMAGE_BUDGETS["tiny"], keep_every=IMAGE_BUDGETS["tiny"]["train_steps"], ckpt_every=1),
    "full": dict(IMAGE_BUDGETS["full"], keep_every=IMAGE_BUDGETS["full"]["train_steps"], ckpt_every=500),
}
DEFAULT_OBJECTIVES = "purrception,cfm-endpoint,dfm"  # the three that predict the clean token


def run(args):
    """Every objective on every code set, the final checkpoint of each scored."""
    b, start = BUDGETS[args.budget], clock()
    refuse_to_replace(args, "codebook-" + args.data)
    objectives = parse_objectives(args.objectives or DEFAULT_OBJECTIVES)
    sets = code_sets(need(args.codes, "codebook needs --codes CODES,CODES,... (code sets of `python tokenizer.py "
                                      "encode`, one per codebook size)"), args.data)
    need_scoring(args.data, args)
    runs_settings = {(k, o): run_settings(path, o, run_dir(args, k, o), b, args) for k, (path, _) in sets.items()
             for o in objectives}  # every run checked before any work
    rows, references = [], {}
    for k, (path, codes) in sets.items():
        references[k] = dict(codes=os.path.abspath(path), **reconstruction_reference(codes, b["num_samples"], args))
        print(f"K = {k}: VQ reconstructions accuracy {references[k]['accuracy']:.3f}  FID "
              f"{references[k]['fid']:.2f}", flush=True)
        for objective in objectives:
            cost = train_run(objective, runs_settings[k, objective])
            ckpt = os.path.join(run_dir(args, k, objective), "checkpoints", f"step-{b['train_steps']:07d}.pt")
            rows.append(dict(codebook_size=k, **score_checkpoint(ckpt, objective, b["train_steps"], b, args.data,
                                                                 args), seconds_per_step=cost["seconds_per_step"]))
            r = rows[-1]
            print(f"  K = {k:<6} {objective:<13} step {b['train_steps']}: accuracy {r['accuracy']:.3f}  FID "
                  f"{r['fid']:.2f}", flush=True)
    table = files.markdown_table(
        ["K", "objective", "accuracy", "FID-LeNet", "s/step (train)"],
        [row for k in sets for row in
         [[k, r["objective"], f"{r['accuracy']:.3f}", f"{r['fid']:.2f}",
           "-" if r["seconds_per_step"] is None else f"{r['seconds_per_step']:.3f}"]
          for r in rows if r["codebook_size"] == k] +
         [[k, "VQ reconstructions (ceiling)", f"{references[k]['accuracy']:.3f}", f"{references[k]['fid']:.2f}", "-"]]])
    note = (f"{b['model']} after {b['train_steps']} steps, batch {b['batch_size']}, lr {b['lr']} ({b['warmup']} "
            f"warm-up steps, then constant), EMA decay {b['ema_decay']} with --ema-warmup, seed {args.seed}, codebook "
            f"scale {args.codebook_scale}: the convergence study's settings. {b['num_samples']} samples of the EMA "
            f"weights (labels 0..9 cycled), {b['steps']} Euler steps (DFM: discrete Euler), temperature 1, no "
            f"guidance. Code sets: " + "; ".join(f"K = {k}: {p}" for k, (p, _) in sets.items()) + ".")
    return write_outputs(args, "codebook-" + args.data, table, note,
                         dict(settings=b, dataset=args.data, codebook_scale=args.codebook_scale, seed=args.seed,
                              references={str(k): v for k, v in references.items()}, rows=rows), start,
                         {"codebook-" + args.data: figure(rows, references, objectives, b, args.data)})


def code_sets(spec, dataset):
    """{K: (path, CodeSet)} of a comma-separated list of code sets of `dataset`, one per codebook size, smallest
    K first."""
    sets, first = {}, None
    for path in [p.strip() for p in spec.split(",") if p.strip()]:
        with user_errors():
            codes = CodeSet(path)
        if codes.meta.get("dataset") != dataset:
            raise UserError(f"{path}: a code set of {codes.meta.get('dataset')}, not of --data {dataset}")
        if codes.has_noise:
            raise UserError(f"{path}: a coupling set of `sample.py --couplings`; expected the code set of a "
                            f"tokenizer (`tokenizer.py encode`)")
        k = codes.num_codes
        if k in sets:
            raise UserError(f"{path}: K = {k}, as {sets[k][0]}; give one code set per codebook size")
        # only the codebook may differ: the same images, coded on the same grid
        first = first or (path, images_of(codes))
        for name, value in images_of(codes).items():
            if value != first[1][name]:
                raise UserError(f"{path}: {name} {value}, against {first[1][name]} in {first[0]}; the study "
                                f"compares codebook sizes on code sets of the same images and grid")
        sets[k] = (path, codes)
    if len(sets) < 2:
        raise UserError(f"--codes {spec}: expected two or more code sets (one per codebook size), comma-separated")
    return dict(sorted(sets.items()))


def images_of(codes):
    """What must agree between the code sets of the study: which images, and the grid they are coded on."""
    return dict(grid=codes.grid, split=codes.meta.get("split"), num_images=len(codes), views=codes.views)


def run_dir(args, k, objective):
    """OUT/runs/K{K}/OBJECTIVE: one training run of the study."""
    return os.path.join(args.out, "runs", f"K{k}", objective)


def figure(rows, references, objectives, b, dataset):
    """Accuracy and FID-LeNet against K at the budget, a line per objective, and the tokenizers' ceiling."""
    plt = pyplot()
    fig, axes = metric_panels(plt, f"{dataset}: quality after {b['train_steps']} steps ({b['model']}, batch "
                                   f"{b['batch_size']}) vs the codebook size K")
    ks = sorted(references)
    for ax, metric in zip(axes, ("accuracy", "fid")):
        for objective in objectives:
            points = sorted((r["codebook_size"], r[metric]) for r in rows if r["objective"] == objective)
            ax.plot(*zip(*points), "-o", ms=4, c=OBJECTIVE_COLORS[objective], label=objective)
        ax.plot(ks, [references[k][metric] for k in ks], "--s", c="k", ms=3, lw=1, label="VQ reconstructions")
        log_ticks(ax, ks)
        if metric == "fid":
            log_y(ax)
        ax.set_xlabel("codebook size K")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return files.figure(fig)
