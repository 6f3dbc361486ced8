"""
Purrception and its baselines on 2D toy codebooks, in seconds on a laptop CPU.

    python toy/run.py                      # all four methods on the checkerboard: a table and figures
    python toy/run.py --method oracle      # the exact posterior through Purrception's sampler
    python toy/run.py --method cfm --toy rings --iters 2000 --seed 1 --out runs/toy-cfm

Every method trains the same small MLP (it reads all N tokens of z_t, so a token's posterior can depend on the
others) with the same budget, then draws 20,000 samples with 100 Euler steps; the score is the total-variation
distance between the histogram of generated codes and the true p(c).

Outputs in --out: metrics.json for one --method; otherwise metrics-METHOD.json for each method, table.md and
samples.png, posterior.png, temperature.png. They are written together when the run ends, and files of an
earlier run there are replaced only with --force.
"""

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python toy/run.py` from anywhere
import files  # noqa: E402
import vfm  # noqa: E402
from cli import ArgumentParser, UserError, check_positive, check_seed, make_dir, run_command  # noqa: E402
from schedule import learning_rate  # noqa: E402
from toy.toys import TOYS, Oracle, make_toy  # noqa: E402

METHODS = (*vfm.OBJECTIVES, "oracle")


# ----------------------------------------------------------------------------------------------------------
# The network: an MLP over all tokens of z_t (for DFM, of x_t's tokens, masked or revealed)
# ----------------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------------
# Train, sample, measure
# ----------------------------------------------------------------------------------------------------------

def train(toy, objective, iters, seed, batch_size=512, lr=4e-3, progress=None, on_step=None, init=None,
          couplings=None):
    """Train a ToyMLP for `iters` steps; on_step(step, model), if given, runs after each optimizer step
    (step counts the steps done, 1 to iters), e.g. to score the model along the way. init: a ToyMLP to start
    from (a copy is trained). couplings: (codes (M, N), noise (M, N, d)), fixed pairs to train on instead of
    fresh samples and fresh noise (a reflow student)."""
    torch.manual_seed(seed)
    model = ToyMLP(toy.num_tokens, **objective.model_io()) if init is None else copy.deepcopy(init).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for step in range(iters):
        # a linear warm-up over the first 5%, and a cosine decay to zero over the whole run
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, iters, lr, warmup=max(1, iters // 20), final=0.0, decay_start=0)
        if couplings is None:
            loss, _, _ = objective.loss(model, toy.sample(batch_size, g), generator=g)
        else:
            i = torch.randint(len(couplings[0]), (batch_size,), generator=g)
            loss, _, _ = objective.loss(model, couplings[0][i], generator=g, z0=couplings[1][i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step + 1, model)
        if progress is not None and (step % 200 == 0 or step == iters - 1):
            progress(step, loss.item())
    return model.eval()


def sample(toy, objective, model, n, seed, steps=100, solver="euler", temperature=1.0, callback=None,
           couplings=False):
    """n samples (n, N) of code indices; couplings=True: (codes, the noise z0 (n, N, d) each started from)."""
    g = torch.Generator().manual_seed(seed + 1)
    if objective.name == "dfm":
        solver = "euler"
    z0 = objective.noise((n, toy.num_tokens), g) if couplings else None
    codes = objective.sample(model, (n, toy.num_tokens), steps=steps, solver=solver, temperature=temperature,
                             generator=g, callback=callback, z0=z0)
    return (codes, z0) if couplings else codes


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


def run_method(toy, method, iters, seed, num_samples=20000, steps=100, log=print, codebook_scale="raw"):
    """Train one method (the oracle needs no training) and score its samples. Returns (metrics, model, objective,
    the samples scored)."""
    objective = vfm.build_objective("purrception" if method == "oracle" else method, toy.codebook,
                                    codebook_scale=codebook_scale)
    start = time.time()
    if method == "oracle":
        model, iters = Oracle(toy, objective.codebook), 0
    else:
        model = train(toy, objective, iters, seed,
                      progress=lambda s, l: log(f"  {method:<13} step {s:>5}/{iters}  loss {l:.4f}"))
    codes = sample(toy, objective, model, num_samples, seed, steps=steps)
    metrics = dict(method=method, toy=toy.name, codebook_scale=codebook_scale, iters=iters,
                   tv=round(toy.tv(codes), 4), seconds=round(time.time() - start, 2), num_samples=num_samples,
                   steps=steps, seed=seed)
    if method == "purrception":
        kl = posterior_by_t(toy, objective.codebook, model, [0.1, 0.3, 0.5, 0.7, 0.9])
        metrics["kl_by_t"] = {f"{r['t']:.1f}": round(r["kl"], 4) for r in kl}
    return metrics, model, objective, codes


# ----------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------

def draw_histogram(ax, toy, hist, title):
    """Codes as dots whose area is their probability (first token's marginal for multi-token toys)."""
    K = toy.num_codes
    marginal = hist.view(K, -1).sum(1) if toy.num_tokens > 1 else hist
    pts = toy.codebook.numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=4, c="0.8")
    ax.scatter(pts[:, 0], pts[:, 1], s=2000 * marginal.numpy() * math.sqrt(K) / 8, c="tab:blue", alpha=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xlim(-2.2, 2.2)
    ax.set_ylim(-2.2, 2.2)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def figures(toy, results, seed, steps, n=4000):
    """{file name: its writer} for samples.png (the histograms of the scored samples, and trajectories of 64),
    posterior.png (entropy and KL over t) and temperature.png (n samples at each temperature)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = results["oracle"][2].codebook.pow(2).mean().sqrt() / toy.codebook.pow(2).mean().sqrt()
    names = ["data"] + [m for m in ("oracle", *vfm.OBJECTIVES) if m in results]
    fig, axes = plt.subplots(2, len(names), figsize=(2.3 * len(names), 4.8))
    g, written = torch.Generator().manual_seed(seed), {}
    for col, name in enumerate(names):
        if name == "data":
            draw_histogram(axes[0, col], toy, toy.true_histogram(), "p(c)")
            pts = (toy.codebook[toy.sample(2000, g)] + 0.03 * torch.randn(2000, toy.num_tokens, 2, generator=g))
            axes[1, col].scatter(*pts[:, 0].T.numpy(), s=1, c="tab:blue", alpha=0.3)
            axes[1, col].set_title("data (token 1)", fontsize=9)
        else:
            metrics, model, objective, codes = results[name]
            draw_histogram(axes[0, col], toy, toy.histogram(codes), f"{name}  TV {metrics['tv']:.3f}")
            path = []
            if name != "dfm":
                ends = sample(toy, objective, model, 64, seed, steps=steps,
                              callback=lambda t, z, out: path.append(z[:, 0] / scale))
                path = torch.stack(path + [objective.codebook[ends[:, 0]] / scale])  # (T, 64, 2)
                for i in range(path.shape[1]):
                    axes[1, col].plot(*path[:, i].T.numpy(), lw=0.5, c="tab:orange", alpha=0.6)
                axes[1, col].set_title("trajectories (token 1)", fontsize=9)
            else:
                axes[1, col].text(0, 0, "discrete jumps:\nno path", ha="center", va="center", fontsize=8)
                axes[1, col].set_title("trajectories", fontsize=9)
        pts = toy.codebook.numpy()
        axes[1, col].scatter(pts[:, 0], pts[:, 1], s=4, c="k")
        for ax in axes[1, col:col + 1]:
            ax.set_xlim(-3.5, 3.5)
            ax.set_ylim(-3.5, 3.5)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{toy.name}: {toy.description}; {steps} Euler steps", fontsize=10)
    fig.tight_layout()
    written["samples.png"] = files.figure(fig)

    if "purrception" in results:
        _, model, objective, _ = results["purrception"]
        rows = posterior_by_t(toy, objective.codebook, model, torch.linspace(0.02, 0.98, 25).tolist(), n=2000)
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
        ts = [r["t"] for r in rows]
        a.plot(ts, [r["entropy_exact"] for r in rows], label="exact posterior", c="k")
        a.plot(ts, [r["entropy_model"] for r in rows], label="learned (Purrception)", c="tab:blue", ls="--")
        a.set_xlabel("t (0 = noise, 1 = data)")
        a.set_ylabel("mean entropy of q(c | z_t) [nats]")
        a.legend(fontsize=8)
        b.plot(ts, [r["kl"] for r in rows], c="tab:red")
        b.set_xlabel("t")
        b.set_ylabel("KL(exact || learned) [nats/token]")
        fig.suptitle(f"{toy.name}: the posterior along the path", fontsize=10)
        fig.tight_layout()
        written["posterior.png"] = files.figure(fig)

        temps = [0.25, 0.5, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0]
        fig, axes = plt.subplots(1, 4, figsize=(12, 3.2))
        for name, style in (("oracle", "k-o"), ("purrception", "b-s")):
            _, model, objective, _ = results[name]
            drawn = {tau: sample(toy, objective, model, n, seed, steps=steps, temperature=tau) for tau in temps}
            axes[0].plot(temps, [toy.tv(codes) for codes in drawn.values()], style, label=name, ms=3)
        axes[0].set_xlabel("temperature tau")
        axes[0].set_ylabel(f"TV to p(c) ({n:,} samples)")
        axes[0].legend(fontsize=8)
        for ax, tau in zip(axes[1:], (0.5, 1.0, 2.0)):
            draw_histogram(ax, toy, toy.histogram(drawn[tau]), f"Purrception, tau = {tau}")
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        written["temperature.png"] = files.figure(fig)
    return written


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

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
                   help="the flow runs on the raw codebook (the paper's) or on E / rms(E); see vfm.py")
    p.add_argument("--out", default="runs/toy")
    p.add_argument("--force", action="store_true", help="replace the files of an earlier run in --out")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    return p.parse_args(argv)


def output_names(args):
    if args.method:
        return ["metrics.json"]
    names = [f"metrics-{method}.json" for method in ("oracle", *vfm.OBJECTIVES)] + ["table.md"]
    return names + ([] if args.no_figures else ["samples.png", "posterior.png", "temperature.png"])


def run(args):
    check_positive(args, "iters", "num_samples", "steps")
    check_seed(args)
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
    quiet = lambda *a: None  # noqa: E731
    out = lambda name: os.path.join(args.out, name)  # noqa: E731

    if args.method:
        metrics, _, _, _ = run_method(toy, args.method, args.iters, args.seed, args.num_samples, args.steps,
                                   codebook_scale=args.codebook_scale)
        files.write_json(out("metrics.json"), metrics)
        print(json.dumps(metrics))
        return metrics

    start, results = time.time(), {}
    print(f"toy '{toy.name}': {toy.description}; {args.iters} iterations per method, "
          f"{args.num_samples} samples, {args.steps} Euler steps")
    for method in ("oracle", *vfm.OBJECTIVES):
        results[method] = run_method(toy, method, args.iters, args.seed, args.num_samples, args.steps, log=quiet,
                                     codebook_scale=args.codebook_scale)
        print(f"  {method:<13} done in {results[method][0]['seconds']:.1f} s")
    table = files.markdown_table(["method", "iterations", "seconds", "TV"],
                                 [[m["method"], m["iters"], f"{m['seconds']:.1f}", f"{m['tv']:.3f}"]
                                  for m, _, _, _ in results.values()])
    writers = {out(f"metrics-{method}.json"): lambda path, m=m: files.write_json(path, m)
               for method, (m, _, _, _) in results.items()}
    writers[out("table.md")] = lambda path: files.write_text(path, table)
    if not args.no_figures:
        writers.update({out(name): write for name, write in
                        figures(toy, results, args.seed, args.steps, min(4000, args.num_samples)).items()})
    files.write_together(writers)
    print(table, end="")
    if not args.no_figures:
        print(f"figures: {args.out}/samples.png, posterior.png, temperature.png")
    print(f"total {time.time() - start:.1f} s")
    return results


def main(argv=None):
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    main()
