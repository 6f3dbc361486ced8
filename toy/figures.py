"""
The pictures of a toy run, drawn from what toy/run.py trained and sampled (nothing here trains or samples):

    samples.png      each method's histogram of scored samples, over the sampler's paths of 64 of them
    posterior.png    the entropy of the exact and the learned posterior along the true path, and the KL between them
    temperature.png  TV against the sampling temperature, and Purrception's samples at three temperatures
    flow.gif         points moving from the noise onto the codebook along the sampler's path, each coloured by
                     the entropy of its posterior q(c | z_t)

Each function returns a writer (path) -> None for support.files.write_together. A toy with two tokens shows
its first token.
"""

import math

import numpy as np
import torch

from support import files

TEMPERATURES = (0.25, 0.5, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0)
TITLES = {"oracle": "exact posterior (oracle)", "purrception": "Purrception (learned)"}  # flow.gif's panels
FRAMES = 50  # flow.gif: about this many of the sampler's steps (frame_steps)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def frame_axes(ax, half_width):
    ax.set_xlim(-half_width, half_width)
    ax.set_ylim(-half_width, half_width)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def draw_histogram(ax, toy, hist, title):
    """Codes as dots whose area is their probability (first token's marginal for multi-token toys)."""
    K = toy.num_codes
    marginal = hist.view(K, -1).sum(1) if toy.num_tokens > 1 else hist
    pts = toy.codebook.numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=4, c="0.8")
    ax.scatter(pts[:, 0], pts[:, 1], s=2000 * marginal.numpy() * math.sqrt(K) / 8, c="tab:blue", alpha=0.8)
    ax.set_title(title, fontsize=9)
    frame_axes(ax, 2.2)


def samples(toy, results, paths, steps, seed):
    """samples.png. results: {method: (metrics, model, objective, codes)}, the data column first; paths: {method:
    (z (T, 64, N, 2) at the sampler's steps, the codes they snap to (64, N, 2))}, for the continuous flows."""
    plt = pyplot()
    names = ["data", *results]
    fig, axes = plt.subplots(2, len(names), figsize=(2.3 * len(names), 4.8))
    g = torch.Generator().manual_seed(seed)
    for col, name in enumerate(names):
        if name == "data":
            draw_histogram(axes[0, col], toy, toy.true_histogram(), "p(c)")
            pts = (toy.codebook[toy.sample(2000, g)] + 0.03 * torch.randn(2000, toy.num_tokens, 2, generator=g))
            axes[1, col].scatter(*pts[:, 0].T.numpy(), s=1, c="tab:blue", alpha=0.3)
            axes[1, col].set_title("data (token 1)", fontsize=9)
        else:
            metrics, _, _, codes = results[name]
            draw_histogram(axes[0, col], toy, toy.histogram(codes), f"{name}  TV {metrics['tv']:.3f}")
            if name in paths:
                z, ends = paths[name]
                path = torch.cat([z[:, :, 0], ends[None, :, 0]])  # (T + 1, 64, 2)
                for i in range(path.shape[1]):
                    axes[1, col].plot(*path[:, i].T.numpy(), lw=0.5, c="tab:orange", alpha=0.6)
                axes[1, col].set_title("trajectories (token 1)", fontsize=9)
            else:
                axes[1, col].text(0, 0, "discrete jumps:\nno path", ha="center", va="center", fontsize=8)
                axes[1, col].set_title("trajectories", fontsize=9)
        pts = toy.codebook.numpy()
        axes[1, col].scatter(pts[:, 0], pts[:, 1], s=4, c="k")
        frame_axes(axes[1, col], 3.5)
    fig.suptitle(f"{toy.name}: {toy.description}; {steps} Euler steps", fontsize=10)
    fig.tight_layout()
    return files.figure(fig)


def posterior(toy, rows):
    """posterior.png from toy/run.py's posterior_by_t rows (t, entropy_exact, entropy_model, kl)."""
    plt = pyplot()
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
    return files.figure(fig)


def temperature(toy, drawn):
    """temperature.png. drawn: {"oracle" and "purrception": {tau: codes (n, N)} for tau in TEMPERATURES}."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.2))
    for name, style in (("oracle", "k-o"), ("purrception", "b-s")):
        axes[0].plot(TEMPERATURES, [toy.tv(drawn[name][tau]) for tau in TEMPERATURES], style, label=name, ms=3)
    axes[0].set_xlabel("temperature tau")
    axes[0].set_ylabel(f"TV to p(c) ({len(drawn['oracle'][1.0]):,} samples)")
    axes[0].legend(fontsize=8)
    for ax, tau in zip(axes[1:], (0.5, 1.0, 2.0)):
        draw_histogram(ax, toy, toy.histogram(drawn["purrception"][tau]), f"Purrception, tau = {tau}")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return files.figure(fig)


def frame_steps(T, frames=FRAMES):
    """About `frames` of T steps, the first and the last among them, at 1 - (1 - s)^1.5 of the way for s evenly
    spaced: closer together near t = 1, where the points settle on their codes."""
    s = torch.linspace(0, 1, min(frames, T), dtype=torch.float64)
    return ((T - 1) * (1 - (1 - s) ** 1.5)).round().long().unique().tolist()


def animation(toy, flows, frames=FRAMES, dpi=100):
    """flow.gif: a panel per flow, {"oracle" or "purrception": (t (T,), z (T, n, N, 2), logits (T, n, N, K))} at
    the sampler's T network evaluations, shown at frame_steps. Each point is coloured by the entropy of its
    posterior softmax(logits), from 0 (sure of its code) to that of p(c) (the posterior at t = 0); the codebook
    is drawn as squares, grey where p(c) > 0."""
    from PIL import Image
    plt = pyplot()
    entropies = {}
    for name, (_, _, logits) in flows.items():
        log_q = torch.log_softmax(logits[:, :, 0].double(), -1)  # (T, n, K)
        entropies[name] = -(log_q.exp() * log_q).sum(-1)  # (T, n)
    pts, marginal = toy.codebook.numpy(), toy.true_histogram().view(toy.num_codes, -1).sum(1)
    prior_entropy = float(-(marginal[marginal > 0] * marginal[marginal > 0].log()).sum())

    fig, axes = plt.subplots(1, len(flows), figsize=(3.4 * len(flows) + 1.2, 3.9), dpi=dpi, squeeze=False,
                             layout="constrained")
    dots = []
    for ax, (name, (_, z, _)) in zip(axes[0], flows.items()):
        ax.scatter(*pts[marginal.numpy() > 0].T, marker="s", s=150, c="0.82", lw=0, zorder=0)
        ax.scatter(*pts.T, marker="s", s=150, facecolors="none", edgecolors="0.55", lw=0.6, zorder=0)
        dots.append(ax.scatter(*z[0, :, 0].T.numpy(), c=entropies[name][0].numpy(), s=9, cmap="plasma",
                               vmin=0.0, vmax=prior_entropy, lw=0))
        ax.set_title(TITLES[name], fontsize=10)
        frame_axes(ax, 2.6)
    bar = fig.colorbar(dots[0], ax=axes[0].tolist(), fraction=0.05)
    bar.set_label("entropy of q(c | z_t) [nats]", fontsize=9)
    heading = fig.suptitle(f"{toy.name}: noise to codes, t = 0.00", fontsize=11)
    fig.get_layout_engine().set(w_pad=0.08, h_pad=0.08)
    fig.canvas.draw()
    fig.set_layout_engine("none")  # the layout of the first frame, for all: nothing moves but the points

    images = []
    for i in frame_steps(len(next(iter(flows.values()))[0]), frames):
        for dot, (name, (t, z, _)) in zip(dots, flows.items()):
            dot.set_offsets(z[i, :, 0].numpy())
            dot.set_array(entropies[name][i].numpy())
        heading.set_text(f"{toy.name}: noise to codes, t = {float(t[i]):.2f}")
        fig.canvas.draw()
        images.append(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())  # (H, W, 3)
    plt.close(fig)
    # one palette for every frame (no flicker): 255 colours of the first, middle and last frame, and pure white
    palette = Image.fromarray(np.concatenate([images[0], images[len(images) // 2], images[-1]])).quantize(255)
    palette = np.concatenate([np.reshape(palette.getpalette()[:3 * 255], (-1, 3)), [[255, 255, 255]]])  # (P, 3)
    images = [paletted(image, palette) for image in images]
    durations = [800] + [80] * (len(images) - 2) + [2000] if len(images) > 1 else [2000]

    def write(path):
        files.atomic_write(path, lambda f: images[0].save(f, format="GIF", save_all=True, append_images=images[1:],
                                                          duration=durations, loop=0))
    return write


def paletted(image, palette):
    """An RGB image (H, W, 3) as a GIF frame: each pixel the nearest colour of the palette (P, 3), exactly."""
    from PIL import Image
    rgb = image.astype(np.int64)
    colors, index = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2], return_inverse=True)
    colors = np.stack([colors >> 16, (colors >> 8) & 255, colors & 255], axis=1)  # (U, 3)
    nearest = ((colors[:, None] - palette[None]) ** 2).sum(-1).argmin(1)  # (U,)
    frame = Image.fromarray(nearest[index].reshape(image.shape[:2]).astype(np.uint8))  # mode L: the indices
    frame.putpalette(palette.astype(np.uint8).ravel().tolist())  # now mode P
    return frame
