"""
The paper's three claims, measured at laptop scale, one subcommand each (and a look at the posterior), and three
steps beyond the paper (a few-step student, guidance in a window, the tokenizer trained with the flow):

    python experiments/study.py convergence --data toy                         # (1) quality vs training iterations
    python experiments/study.py convergence --data fashion-mnist --codes runs/fmnist-codes --data-dir DIR
    python experiments/study.py temperature --ckpt RUN/checkpoints/last.pt --data-dir DIR      # (2) temperature sweep
    python experiments/study.py solvers --data toy                             # (3) quality vs NFE, on the exact posterior
    python experiments/study.py solvers --data fashion-mnist --ckpt PURRCEPTION.pt --dfm-ckpt DFM.pt --data-dir DIR
    python experiments/study.py uncertainty --ckpt PURRCEPTION.pt              # posterior entropy along the path
    python experiments/study.py fewstep --data toy                             # a reflow student at 1, 2, 4 evaluations
    python experiments/study.py fewstep --data fashion-mnist --ckpt TEACHER.pt --data-dir DIR
    python experiments/study.py guidance --ckpt RUN/checkpoints/last.pt --data-dir DIR        # guidance only in a window of t
    python experiments/study.py codebook --codes CODES_K256,CODES_K1024,... --data-dir DIR    # (1) against the codebook size
    python experiments/study.py joint --data-dir DIR                           # the tokenizer trained with the flow

Claims (arXiv 2510.01478): (1) Purrception converges faster than CFM, CFM-endpoint and DFM trained with the
same backbone and budget; (2) the softmax temperature is a training-free quality knob with a U-shaped curve;
(3) as a continuous flow it samples well with few steps and higher-order solvers. Beyond them: a reflow
student that samples in one or two network evaluations, guidance that acts only for t in a window, and the
paper's own proposed next step, a tokenizer trained together with the flow instead of frozen before it.

Every subcommand writes OUT/NAME.md (a markdown table, also printed), OUT/NAME.json (every number behind it,
with the settings and wall times) and OUT/NAME*.png, all together when it ends: a run that fails or is stopped
leaves them as they were. Where these files exist from an earlier run, a study refuses to start unless --force,
which replaces them. The studies that train on images keep their work in --out and resume it when run again:
`convergence` its training runs (OUT/runs) and each checkpoint's score, `fewstep` its couplings
(OUT/couplings) and its student (OUT/runs/student); a run there made with other settings is refused.

The code of each subcommand is in experiments/studies/NAME.py: `--budget full` runs the settings of its budget table; `--budget
tiny` runs the same code in seconds (for the tests; its numbers mean nothing). Image quality is scored by
evaluate.py: classifier accuracy on the conditioning labels and FID-LeNet against the real images; the IDX files
and the classifier are checked before any training or sampling. Samples are drawn exactly as `python sample.py
--seed S --batch-size 250` draws them (labels 0, 1, ..., 9, 0, 1, ... and EMA weights), so any row can be
reproduced with sample.py and evaluate.py.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
import baselines
import vfm
from experiments.studies import codebook, convergence, fewstep, guidance, joint, solvers, temperature, uncertainty
from support.cli import ArgumentParser, check_seed, make_dir, run_command

IMAGE_DATASETS = ("mnist", "fashion-mnist")

BUDGET_HELP = {
    "convergence": "At --budget full, --data toy runs 2 toys x 4 objectives x 2 seeds, 3,200 iterations of batch "
                   "512, scored at 6 points with 20,000 samples of 100 steps (--schedule per-budget: a separate run "
                   "for each point); --data fashion-mnist runs 4 objectives x 3,000 DiT-T/1 steps of batch 32, each "
                   "scored at 6 checkpoints with 1,000 samples of 100 Euler steps (--objectives runs fewer). "
                   "Stopped, it resumes where it was: the runs in OUT/runs continue and the checkpoints scored keep "
                   "their scores. Measured CPU times: experiments/RESULTS.md.",
    "temperature": "At --budget full: 12 temperatures and schedules x 2 guidance scales x 1,000 samples of 50 Euler "
                   "steps (guidance doubles the batch). Measured CPU time: experiments/RESULTS.md.",
    "solvers": "At --budget full: --data toy trains a Purrception and a DFM model per toy (3,200 iterations) and "
               "draws 20,000 samples a row at NFE 4 to 100; --data fashion-mnist draws 20 rows of 1,000 samples at "
               "NFE 4 to 100. Measured CPU times: experiments/RESULTS.md.",
    "uncertainty": "At --budget full: 6 samples (one per class) along 100 Euler steps. Measured CPU time: "
                   "experiments/RESULTS.md.",
    "fewstep": "At --budget full: --data toy runs, per toy, a teacher, 20,000 couplings, a student and 36 rows of "
               "20,000 samples; --data fashion-mnist draws 10,000 couplings at 8 guided midpoint steps, trains 2,000 "
               "DiT-T/1 student steps of batch 32 and draws 22 rows of 1,000 samples. Stopped, it resumes: the "
               "couplings and the student's run in --out are reused. Measured CPU times: experiments/RESULTS.md.",
    "codebook": "At --budget full: for each code set and objective, 3,000 DiT-T/1 steps of batch 32 and 1,000 "
                "samples of 100 Euler steps (a Purrception or DFM step costs more as K grows, a CFM-endpoint step "
                "does not). Stopped, it resumes where it was, as convergence does. Measured CPU time: "
                "experiments/RESULTS.md.",
    "guidance": "At --budget full: 10 rows of 1,000 samples of 8 midpoint steps. Measured CPU time: "
                "experiments/RESULTS.md.",
    "joint": "At --budget full: two seeds x three arms (frozen, finetune, joint), each 2,800 tokenizer updates of "
             "batch 128 and 2,500 flow updates of batch 32, then 1,000 guided samples with the preset's sampler. "
             "Each stage's end is kept in OUT/joint-DATA and reused: stopped, it resumes at the last stage it "
             "finished. Measured CPU time: experiments/RESULTS.md.",
}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0].strip(), epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--budget", choices=("tiny", "full"), default="full",
                        help="full: the study as described above; tiny: seconds, for the tests")
    common.add_argument("--out", default="runs/study", help="where the tables, JSON and figures go (an earlier "
                        "run's are replaced only with --force)")
    common.add_argument("--seed", type=int, default=0, help="training and sampling seed in [0, 2^32) (toys: the "
                        "first seed)")
    common.add_argument("--force", action="store_true", help="replace the table, JSON and figures of an earlier "
                        "run of this subcommand in --out")
    sub = p.add_subparsers(dest="command", required=True)
    helps = {"convergence": "(1) quality vs training iterations for the four objectives",
             "temperature": "(2) quality vs softmax temperature on a Purrception checkpoint",
             "solvers": "(3) quality vs network evaluations for Euler, Heun, midpoint (and DFM)",
             "uncertainty": "the posterior's per-token entropy along the sampling path",
             "fewstep": "a reflow student against its teacher at 1, 2 and 4 network evaluations",
             "guidance": "guidance only for t in a window: quality and network passes",
             "codebook": "(1) against the codebook size K: the objectives at one budget on code sets of several K",
             "joint": "the paper's limitation: the tokenizer frozen, fine-tuned with the flow, or trained with it"}
    parsers = {name: sub.add_parser(name, parents=[common], help=helps[name], description=helps[name] + ". " +
                                    BUDGET_HELP[name]) for name in helps}
    for name in ("convergence", "solvers", "fewstep"):
        parsers[name].add_argument("--data", choices=("toy",) + IMAGE_DATASETS, default="toy",
                                   help="the 2D toys, or images through a VQ code set")
    parsers["convergence"].add_argument("--codes", help="a code set of `python tokenizer.py encode` (image data)")
    parsers["codebook"].add_argument("--data", choices=IMAGE_DATASETS, default="fashion-mnist",
                                     help="the dataset of the code sets")
    parsers["joint"].add_argument("--data", choices=IMAGE_DATASETS, default="fashion-mnist",
                                  help="the dataset (its preset in configs/ sets the flow and the sampler)")
    parsers["joint"].add_argument("--flow-weight", type=float, default=joint.FLOW_WEIGHT,
                                  help="w, the weight of the flow's loss in the codebook's gradient (the stages "
                                  "without the two together are shared by every weight)")
    parsers["codebook"].add_argument("--codes", help="comma-separated code sets of `python tokenizer.py encode`, one per "
                                     "codebook size, on one grid")
    parsers["convergence"].add_argument("--schedule", choices=("one-run", "per-budget"),
                                        help="toys: score one run along the way (one-run, the default), or train a "
                                        "separate run per iteration count, each with its learning-rate schedule "
                                        "completed (per-budget)")
    parsers["convergence"].add_argument("--objectives", help="a comma-separated subset of "
                                        f"{','.join(baselines.OBJECTIVES)} (default: all four)")
    parsers["codebook"].add_argument("--objectives", help="a comma-separated subset of "
                                     f"{','.join(baselines.OBJECTIVES)} (default: {codebook.DEFAULT_OBJECTIVES})")
    for name in ("convergence", "codebook"):
        parsers[name].add_argument("--codebook-scale", default="raw", choices=vfm.CODEBOOK_SCALES,
                                   help="the flow runs on the raw codebook (the authors' code's) or on E / rms(E)")
    for name in ("temperature", "solvers", "uncertainty"):
        parsers[name].add_argument("--ckpt", help="a Purrception checkpoint of train.py (RUN/checkpoints/last.pt)")
    parsers["fewstep"].add_argument("--ckpt", help="the teacher: a Purrception, CFM or CFM-endpoint checkpoint of "
                                    "train.py (image data)")
    parsers["guidance"].add_argument("--ckpt", help="a checkpoint of train.py with classes (any objective)")
    parsers["solvers"].add_argument("--dfm-ckpt", help="a DFM checkpoint: its discrete sampler at the same NFE")
    for name in ("convergence", "temperature", "solvers", "fewstep", "guidance", "codebook", "joint"):
        parsers[name].add_argument("--data-dir", help="the dataset's IDX files, for scoring images (evaluate.py)")
        parsers[name].add_argument("--classifier", help="evaluate.py's classifier file (default: its cache, "
                                   "trained on first use)")
    args = p.parse_args(argv)
    args.command_line = "python experiments/study.py " + " ".join(sys.argv[1:] if argv is None else map(str, argv))
    return args


COMMANDS = {"convergence": convergence.run, "temperature": temperature.run, "solvers": solvers.run,
            "uncertainty": uncertainty.run, "fewstep": fewstep.run, "guidance": guidance.run, "codebook": codebook.run,
            "joint": joint.run}


def run(args):
    check_seed(args)
    make_dir(args.out)
    return COMMANDS[args.command](args)


def main(argv=None):
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    main()
