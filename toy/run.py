"""
Purrception and its baselines on 2D toy codebooks, in seconds on a laptop CPU.

    python toy/run.py                      # all four methods on the checkerboard: a table and figures
    python toy/run.py --method oracle      # the exact posterior through Purrception's sampler
    python toy/run.py --method cfm --toy rings --iters 2000 --seed 1 --out runs/toy-cfm
    python toy/run.py --animate            # also flow.gif: Purrception's flow beside the exact posterior's

Every method trains the same small MLP (it reads all N tokens of z_t, so a token's posterior can depend on the
others) with the same budget, then draws 20,000 samples with 100 Euler steps; the score is the total-variation
distance between the histogram of generated codes and the true p(c). These defaults are the preset
configs/toy.json (--config toy). Beside each TV its floor, the TV of as many exact draws from p(c): where it
is more than half the methods' (median) TV, a warning on stderr says that --num-samples is too small.

Outputs in --out: metrics.json for one --method; otherwise metrics-METHOD.json for each method, table.md and
samples.png, posterior.png, temperature.png (toy/figures.py draws them); with --animate also flow.gif. They
are written together when the run ends, and files of an earlier run there are replaced only with --force.
"""

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python toy/run.py` from anywhere
import baselines  # noqa: E402
import vfm  # noqa: E402
from support import config, files  # noqa: E402
from support.cli import ArgumentParser, UserError, check_positive, check_seed, make_dir, run_command  # noqa: E402
from support.schedule import learning_rate  # noqa: E402
from toy import figures  # noqa: E402
from toy.toys import TOYS, Oracle, make_toy  # noqa: E402

METHODS = (*baselines.OBJECTIVES, "oracle")
ANIMATED = ("oracle", "purrception")  # the flows whose posterior flow.gif shows
ANIMATED_POINTS = 400


# ---- The network: an MLP over all tokens of z_t (for DFM, of x_t's tokens, masked or revealed) -----------

class ToyMLP(nn.Module):
    """model(x, t, y) -> (B, N, out_dim). x: (B, N, d) float, or (B, N) long when input_vocab is set (DFM: each
    token is embedded straight into the model width, as the DiT does)."""

    def __init__(self, num_tokens, in_dim, out_dim, input_vocab=None, hidden=128, depth=3, num_frequencies=8):
        super().__init__()
        self.num_tokens, self.out_dim = num_tokens, out_dim
        in_dim = hidden if input_vocab else in_dim
        self.token_embed = nn.Embedding(input_vocab, in_dim) if input_vocab else None
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(num_frequencies))
        layers, width = [], num_tokens * in_dim + 2 * num_frequencies
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(hidden, num_tokens * out_dim))

    def forward(self, x, t, y=None):
        if self.token_embed is not None:
            x = self.token_embed(x)  # (B, N, hidden)
        angles = t.float()[:, None] * self.frequencies  # (B, F)
        h = torch.cat([x.flatten(1), angles.sin(), angles.cos()], dim=1)  # (B, N*d + 2F)
        return self.net(h).view(-1, self.num_tokens, self.out_dim)  # (B, N, out_dim)


# ---- Train -----------------------------------------------------------------------------------------------

def train(toy, objective, iters, seed, *, batch_size=512, lr=4e-3, init=None, couplings=None, on_step=None,
          progress=None):
    """A ToyMLP trained for `iters` AdamW steps on batches of the toy, the rate warmed up linearly over the first
    5% and decayed to zero on a cosine (support/schedule.py). init: a ToyMLP to start from (a copy is trained).
    couplings: fixed pairs (codes (M, N), noise (M, N, d)) to train on (a reflow student). on_step(step, model)
    runs after each step (1 to iters), e.g. to score the model; progress(step, loss) every 200 steps."""
    torch.manual_seed(seed)
    model = ToyMLP(toy.num_tokens, **objective.model_io()) if init is None else copy.deepcopy(init).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for step in range(iters):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, iters, lr, warmup=max(1, iters // 20), final=0.0, decay_start=0)
        codes, z0 = draw_batch(toy, batch_size, g, couplings)  # (B, N), and (B, N, d) or None: fresh noise
        loss, _, _ = objective.loss(model, codes, generator=g, z0=z0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step + 1, model)
        if progress is not None and (step % 200 == 0 or step == iters - 1):
            progress(step, loss.item())
    return model.eval()


def draw_batch(toy, batch_size, generator, couplings=None):
    """batch_size codes (B, N) of the toy and no noise (the loss draws it), or as many (codes, noise) couplings."""
    if couplings is None:
        return toy.sample(batch_size, generator), None
    i = torch.randint(len(couplings[0]), (batch_size,), generator=generator)
    return couplings[0][i], couplings[1][i]


# ---- Sample and measure ----------------------------------------------------------------------------------

def sample(toy, objective, model, n, seed, *, steps=100, solver="euler", temperature=1.0, callback=None,
           couplings=False):
    """n samples (n, N) of code indices; couplings=True: (codes, the noise z0 (n, N, d) each started from)."""
    g = torch.Generator().manual_seed(seed + 1)
    if objective.name == "dfm":
        solver = "euler"
    z0 = objective.noise((n, toy.num_tokens), g) if couplings else None
    codes = objective.sample(model, (n, toy.num_tokens), steps=steps, solver=solver, temperature=temperature,
                             generator=g, callback=callback, z0=z0)
    return (codes, z0) if couplings else codes


def euler_path(toy, objective, model, n, seed, steps=100):
    """The Euler path of n of sample()'s samples (a continuous flow), in the toy's coordinates (the flow's over its
    codebook scale): the times t_i of the network evaluations (T,), z_t there (T, n, N, 2), the network output
    there (T, n, N, out_dim) and the codes the path snaps to at t = 1 (n, N, 2)."""
    scale = objective.codebook.pow(2).mean().sqrt() / toy.codebook.pow(2).mean().sqrt()
    ts, zs, outs = [], [], []
    codes = sample(toy, objective, model, n, seed, steps=steps,
                   callback=lambda t, z, out: (ts.append(t), zs.append(z / scale), outs.append(out)))
    return torch.tensor(ts), torch.stack(zs), torch.stack(outs), objective.codebook[codes] / scale


@torch.no_grad()
def posterior_by_t(toy, codebook, model, ts, n=2000, seed=0):
    """Along the true path: mean entropy of the exact and the learned posterior, and KL(exact || learned)."""
    g = torch.Generator().manual_seed(seed)
    oracle, rows = Oracle(toy, codebook), []
    for t in ts:
        z1 = codebook[toy.sample(n, g)]
        tt = torch.full((n,), float(t))
        zt = vfm.interpolate(torch.randn(z1.shape, generator=g), z1, tt)
        log_p = torch.log_softmax(oracle(zt, tt).double(), -1)
        log_q = torch.log_softmax(model(zt, tt).double(), -1)
        p = log_p.exp()
        rows.append(dict(t=float(t), entropy_exact=float(-(p * log_p).sum(-1).mean()),
                         entropy_model=float(-(log_q.exp() * log_q).sum(-1).mean()),
                         kl=float((p * (log_p - log_q)).sum(-1).mean())))
    return rows


def tv_floor(toy, n, draws=5, seed=0):
    """The sampling floor of n samples' TV: the mean TV of `draws` sets of n exact draws from p(c), one generator."""
    g = torch.Generator().manual_seed(seed)
    return sum(toy.tv(toy.sample(n, g)) for _ in range(draws)) / draws


def floor_warning(metrics):
    """Print a one-line warning (and return True) where the TV floor is more than half the median TV of run_method's
    `metrics`, the oracle aside (its TV is the floor by construction)."""
    scored = [m for m in metrics if m["method"] != "oracle"]
    median = statistics.median(m["tv"] for m in scored) if scored else math.inf
    n, floor = metrics[0]["num_samples"], metrics[0]["tv_floor"]
    if floor > median / 2:
        what = f"{scored[0]['method']}'s" if len(scored) == 1 else "the methods' median"
        print(f"warning: at --num-samples {n} the TV of {n} exact draws from p(c) is {floor:.3f}, more than half "
              f"{what} TV ({median:.3f}): the scores are mostly sampling noise; raise --num-samples", file=sys.stderr)
    return floor > median / 2


def run_method(toy, method, iters, seed, num_samples=20000, steps=100, log=print, codebook_scale="raw"):
    """Train one method (the oracle needs no training) and score its samples. Returns (metrics, model, objective,
    the samples scored)."""
    objective = baselines.build_objective("purrception" if method == "oracle" else method, toy.codebook,
                                          codebook_scale=codebook_scale)
    start = time.time()
    if method == "oracle":
        model, iters = Oracle(toy, objective.codebook), 0
    else:
        model = train(toy, objective, iters, seed,
                      progress=lambda s, l: log(f"  {method:<13} step {s:>5}/{iters}  loss {l:.4f}"))
    codes = sample(toy, objective, model, num_samples, seed, steps=steps)
    metrics = dict(method=method, toy=toy.name, codebook_scale=codebook_scale, iters=iters, tv=round(toy.tv(codes), 4),
                   seconds=round(time.time() - start, 2), num_samples=num_samples, steps=steps, seed=seed)
    metrics["tv_floor"] = round(tv_floor(toy, num_samples), 4)  # not the method's time: after `seconds`
    if method == "purrception":
        kl = posterior_by_t(toy, objective.codebook, model, [0.1, 0.3, 0.5, 0.7, 0.9])
        metrics["kl_by_t"] = {f"{r['t']:.1f}": round(r["kl"], 4) for r in kl}
    return metrics, model, objective, codes


# ---- Figures: what they show is computed here, toy/figures.py draws it -----------------------------------

def pictures(toy, results, seed, steps, n=4000):
    """{file name: its writer} for samples.png, posterior.png and temperature.png (n samples a temperature)."""
    paths = {}
    for name, (_, model, objective, _) in results.items():
        if name != "dfm":  # DFM's tokens jump from mask to code: no path
            _, z, _, ends = euler_path(toy, objective, model, 64, seed, steps)
            paths[name] = (z, ends)
    written = {"samples.png": figures.samples(toy, results, paths, steps, seed)}
    if "purrception" in results:
        _, model, objective, _ = results["purrception"]
        rows = posterior_by_t(toy, objective.codebook, model, torch.linspace(0.02, 0.98, 25).tolist(), n=2000)
        written["posterior.png"] = figures.posterior(toy, rows)
        drawn = {name: {tau: sample(toy, objective, model, n, seed, steps=steps, temperature=tau)
                        for tau in figures.TEMPERATURES}
                 for name, (_, model, objective, _) in results.items() if name in ("oracle", "purrception")}
        written["temperature.png"] = figures.temperature(toy, drawn)
    return written


def animation(toy, results, seed, steps):
    """The writer of flow.gif: the Euler paths of ANIMATED_POINTS samples of the ANIMATED methods in results."""
    return figures.animation(toy, {name: euler_path(toy, results[name][2], results[name][1], ANIMATED_POINTS,
                                                    seed, steps)[:3] for name in ANIMATED if name in results})


# ---- Command line ----------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0].strip(), epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, help="run one method and write OUT/metrics.json "
                   "(default: all four methods and the oracle, with a table and figures)")
    p.add_argument("--toy", default="checkerboard", choices=list(TOYS))
    p.add_argument("--iters", type=int, default=1200, help="training iterations per method (batch 512)")
    p.add_argument("--seed", type=int, default=0, help="an integer in [0, 2^32)")
    p.add_argument("--num-samples", type=int, default=20000)
    p.add_argument("--steps", type=int, default=100, help="Euler steps (DFM: discrete Euler steps)")
    p.add_argument("--codebook-scale", default="raw", choices=vfm.CODEBOOK_SCALES,
                   help="the flow runs on the raw codebook (the authors' code's) or on E / rms(E); see vfm.py")
    p.add_argument("--out", default="runs/toy")
    p.add_argument("--force", action="store_true", help="replace the files of an earlier run in --out")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--animate", action="store_true", help=f"also write OUT/flow.gif: {ANIMATED_POINTS} points "
                   f"flowing from the noise onto the codebook, coloured by the entropy of their posterior (the "
                   f"oracle's and Purrception's; with --method, one of them)")
    return config.parse_args(p, argv, "toy")


def output_names(args):
    if args.method:
        names = ["metrics.json"]
    else:
        names = [f"metrics-{method}.json" for method in ("oracle", *baselines.OBJECTIVES)] + ["table.md"]
        names += [] if args.no_figures else ["samples.png", "posterior.png", "temperature.png"]
    return names + (["flow.gif"] if args.animate else [])


def run(args):
    check_positive(args, "iters", "num_samples", "steps")
    check_seed(args)
    if args.animate and args.method not in (None, *ANIMATED):
        raise UserError(f"--animate --method {args.method}: flow.gif shows the posterior of "
                        f"{' or '.join(ANIMATED)}; choose one of them, or no --method for both")
    make_dir(args.out)
    existing = [name for name in output_names(args) if os.path.exists(os.path.join(args.out, name))]
    if existing and not args.force:
        raise UserError(f"{os.path.join(args.out, existing[0])} exists (an earlier run): pass --force to replace "
                        f"that run's files, or choose another --out")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        return experiment(args)
    except RuntimeError as e:  # torch's allocator: too many samples for this machine's memory
        if "can't allocate memory" not in str(e):
            raise
        raise UserError(f"out of memory with --num-samples {args.num_samples}: choose fewer") from None


def experiment(args):
    toy = make_toy(args.toy)
    start, results, writers = time.time(), {}, {}
    if args.method:
        results[args.method] = run_method(toy, args.method, args.iters, args.seed, args.num_samples, args.steps,
                                          codebook_scale=args.codebook_scale)
        metrics = results[args.method][0]
        writers["metrics.json"] = lambda path: files.write_json(path, metrics)
    else:
        print(f"toy '{toy.name}': {toy.description}; {args.iters} iterations per method, "
              f"{args.num_samples} samples, {args.steps} Euler steps")
        for method in ("oracle", *baselines.OBJECTIVES):
            results[method] = run_method(toy, method, args.iters, args.seed, args.num_samples, args.steps,
                                         log=lambda *a: None, codebook_scale=args.codebook_scale)
            print(f"  {method:<13} done in {results[method][0]['seconds']:.1f} s")
        table = files.markdown_table(["method", "iterations", "seconds", "TV", "floor"], [
            [m["method"], m["iters"], f"{m['seconds']:.1f}", f"{m['tv']:.3f}", f"{m['tv_floor']:.3f}"]
            for m, _, _, _ in results.values()])
        writers.update({f"metrics-{method}.json": lambda path, m=m: files.write_json(path, m)
                        for method, (m, _, _, _) in results.items()})
        writers["table.md"] = lambda path: files.write_text(path, table)
        if not args.no_figures:
            writers.update(pictures(toy, results, args.seed, args.steps, min(4000, args.num_samples)))
    if args.animate:
        writers["flow.gif"] = animation(toy, results, args.seed, args.steps)
    files.write_together({os.path.join(args.out, name): write for name, write in writers.items()})
    floor_warning([m for m, _, _, _ in results.values()])

    if args.method:
        print(json.dumps(metrics))
        return metrics
    print(table, end="")
    if not args.no_figures:
        print(f"figures: {args.out}/samples.png, posterior.png, temperature.png")
    if args.animate:
        print(f"animation: {args.out}/flow.gif")
    print(f"total {time.time() - start:.1f} s")
    return results


def main(argv=None):
    return run_command(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
