"""
The VQ tokenizer for MNIST and Fashion-MNIST: a small convolutional autoencoder with a vector-quantized
bottleneck that turns a 28 x 28 image into a 7 x 7 grid of code indices into a (K, d) codebook, and back.
Purrception's flow runs over the embeddings of these codes; the tokenizer itself is trained once and frozen.

    python vq.py train --dataset fashion-mnist --data-dir DIR --out runs/fmnist-vq      # RUN/tokenizer.pt
    python vq.py encode --tokenizer runs/fmnist-vq/tokenizer.pt --dataset fashion-mnist --data-dir DIR \\
        --split train --out runs/fmnist-codes                                          # a code set (data.py)

Sources: van den Oord et al., "Neural Discrete Representation Learning" (VQ-VAE, arXiv 1711.00937: nearest-code
lookup, straight-through gradients, commitment loss with beta = 0.25, EMA codebook updates in its appendix);
Dhariwal et al., "Jukebox" (arXiv 2005.00341: restarting dead codes from encoder outputs); Yu et al.,
"Vector-quantized Image Modeling with Improved VQGAN" (arXiv 2110.04627) and Sun et al., LlamaGen
(arXiv 2406.06525): L2-normalised codes and encoder outputs, i.e. a cosine-similarity lookup.

Conventions
-----------
* Images are float (B, 1, 28, 28) in [-1, 1] (pixel / 127.5 - 1); codes are long (B, 7, 7) in [0, K).
* The codebook is unit-norm: encoder outputs and codes are L2-normalised before the lookup, so the nearest code
  is the one of highest cosine similarity, and the decoder receives the unit-norm code vector. This is the
  codebook `MnistVQ.codebook` returns and `vq.py encode` exports. Its scale is not tuned for the flow: unit
  vectors in d = 8 have a per-dimension RMS of 1 / sqrt(8), and the flow standardises the codebook itself
  (vfm.flow_codebook: E / rms(E)), which leaves the nearest code of every point unchanged.
* Every code stays in use: the codebook is initialised by k-means++ on the first batch of encoder outputs, then
  follows the encoder by exponential moving averages (decay 0.99), and any code left unused for 20 training
  batches in a row is re-seeded from an encoder output of the current batch.
* Usage is the fraction of the K codes used at least once on a set of images; perplexity is exp(entropy) of
  the code histogram, K when all codes are used equally often and 1 when one code is used everywhere.
"""

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
from data import UserError, run_command

MNIST_KIND = "mnist-vq"  # the "kind" of a checkpoint written by `python vq.py train`
DATASETS = ("mnist", "fashion-mnist")


# ----------------------------------------------------------------------------------------------------------
# Codebook statistics
# ----------------------------------------------------------------------------------------------------------

def code_counts(indices, num_codes):
    """(K,) how often each code occurs in `indices` (any shape)."""
    return torch.bincount(indices.reshape(-1).cpu(), minlength=num_codes)


def codebook_usage(counts):
    """The fraction of codes used at least once."""
    return (counts > 0).float().mean().item()


def perplexity(counts):
    """exp(entropy) of the code histogram: K for a uniform assignment, 1 for a single code."""
    p = counts.double() / counts.sum().clamp_min(1)
    entropy = -(p * p.clamp_min(1e-300).log()).sum()  # 0 log 0 = 0
    return entropy.exp().item()


# ----------------------------------------------------------------------------------------------------------
# The vector quantizer
# ----------------------------------------------------------------------------------------------------------

def kmeans_plus_plus(x, k):
    """k rows of x (N, d) as initial centres: each next one drawn with probability proportional to its squared
    distance from the nearest centre chosen so far (Arthur & Vassilvitskii, 2007)."""
    chosen = [torch.randint(len(x), ()).item()]
    dist2 = (x - x[chosen[0]]).pow(2).sum(1)  # (N,)
    for _ in range(1, k):
        weights = dist2 if dist2.sum() > 0 else torch.ones_like(dist2)  # fewer distinct points than k
        i = torch.multinomial(weights, 1).item()
        chosen.append(i)
        dist2 = torch.minimum(dist2, (x - x[i]).pow(2).sum(1))
    return x[chosen].clone()  # (k, d)


class VectorQuantizer(nn.Module):
    """A (K, d) unit-norm codebook: cosine-similarity lookup, straight-through gradients, commitment loss,
    EMA codebook updates with k-means++ initialisation and dead-code restarts.

    forward(z) takes encoder outputs z (B, d, h, w) and returns (z_q, indices, commitment_loss):
      z_q (B, d, h, w)  the unit-norm code vectors, whose gradient is passed to normalize(z) unchanged
      indices (B, h, w) the chosen codes
      commitment_loss   beta * mean |normalize(z) - sg(e_c)|^2, which pulls the encoder towards its codes
    The codes are buffers, not parameters: in training mode every call moves them (no optimizer involved).
    The codebook is unit-norm on purpose (see the module docstring): the flow rescales it itself.
    """

    def __init__(self, num_codes=256, dim=8, beta=0.25, decay=0.99, dead_after=20, kmeans_iters=10):
        super().__init__()
        self.num_codes, self.dim = num_codes, dim
        self.beta, self.decay = beta, decay
        self.dead_after = dead_after  # a code unused for this many training batches in a row is re-seeded
        self.kmeans_iters = kmeans_iters
        self.register_buffer("embedding", F.normalize(torch.randn(num_codes, dim), dim=1))  # (K, d) unit rows
        self.register_buffer("ema_sum", torch.zeros(num_codes, dim))  # (K, d) running sum of assigned vectors
        self.register_buffer("unused_for", torch.zeros(num_codes, dtype=torch.long))  # (K,) batches since used
        self.register_buffer("initialized", torch.tensor(False))
        self.restarts = 0  # dead codes re-seeded since construction (a training statistic, not saved)

    @property
    def codebook(self):
        """(K, d) the unit-norm code vectors the lookup compares with and the decoder receives."""
        return self.embedding

    def lookup(self, z):
        """(N, d) unit vectors -> (N,) index of the nearest code, i.e. the one of highest cosine similarity."""
        return (z @ self.embedding.T).argmax(dim=1)  # (N, K) similarities

    def encode(self, z):
        """(B, d, h, w) encoder outputs -> (B, h, w) indices of their nearest codes; never moves the codebook."""
        B, d, h, w = z.shape
        flat = F.normalize(z, dim=1).permute(0, 2, 3, 1).reshape(-1, d)  # (N, d) unit vectors, N = B * h * w
        return self.lookup(flat).view(B, h, w)

    def forward(self, z):
        B, d, h, w = z.shape
        flat = F.normalize(z, dim=1).permute(0, 2, 3, 1).reshape(-1, d)  # (N, d) unit vectors, N = B * h * w
        if self.training and not self.initialized:
            self.initialize(flat.detach())
        indices = self.lookup(flat.detach())  # (N,)
        quantized = self.embedding[indices]  # (N, d), a copy: the updates below do not change it
        if self.training:
            self.update(flat.detach(), indices)
        commitment_loss = self.beta * F.mse_loss(flat, quantized)
        quantized = quantized + (flat - flat.detach())  # straight-through: forward exactly e_c, backward identity
        z_q = quantized.view(B, h, w, d).permute(0, 3, 1, 2)  # (B, d, h, w)
        return z_q, indices.view(B, h, w), commitment_loss

    # ---- codebook updates (training mode only) ----

    @torch.no_grad()
    def initialize(self, flat):
        """k-means++ seeds refined by a few rounds of spherical k-means on one batch of encoder outputs."""
        codes = kmeans_plus_plus(flat, self.num_codes)  # (K, d)
        for _ in range(self.kmeans_iters):
            indices = (flat @ codes.T).argmax(dim=1)  # (N,)
            sums = torch.zeros_like(codes).index_add_(0, indices, flat)  # (K, d)
            codes = torch.where(sums.norm(dim=1, keepdim=True) > 0, F.normalize(sums, dim=1), codes)  # empty: kept
        indices = (flat @ codes.T).argmax(dim=1)
        self.embedding.copy_(codes)
        self.ema_sum.zero_().index_add_(0, indices, flat)
        self.initialized.fill_(True)

    @torch.no_grad()
    def update(self, flat, indices):
        """Move every code towards the mean direction of the vectors assigned to it, then restart dead codes.

        The running sum decays by `decay` each batch and gains (1 - decay) times this batch's sum; the code is
        its direction. An unused code keeps its direction while its sum fades."""
        sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, flat)  # (K, d)
        self.ema_sum.lerp_(sums, 1 - self.decay)  # decay * old + (1 - decay) * new
        self.embedding.copy_(F.normalize(self.ema_sum, dim=1))
        used = torch.bincount(indices, minlength=self.num_codes) > 0  # (K,)
        self.unused_for.add_(1).masked_fill_(used, 0)
        self.restart_dead_codes(flat)

    @torch.no_grad()
    def restart_dead_codes(self, flat):
        """Re-seed every code unused for `dead_after` batches in a row with an encoder output of this batch,
        drawn at random without replacement, and give it the running sum of a code with a fair share (N / K) of
        the batch. Returns how many were restarted."""
        dead = (self.unused_for >= self.dead_after).nonzero().squeeze(1)  # (n_dead,)
        if len(dead) == 0:
            return 0
        if len(flat) >= len(dead):
            pick = torch.randperm(len(flat), device=flat.device)[:len(dead)]
        else:
            pick = torch.randint(len(flat), (len(dead),), device=flat.device)
        self.embedding[dead] = flat[pick]
        self.ema_sum[dead] = flat[pick] * (len(flat) / self.num_codes)
        self.unused_for[dead] = 0
        self.restarts += len(dead)
        return len(dead)


# ----------------------------------------------------------------------------------------------------------
# The autoencoder: 28 x 28 x 1 -> 7 x 7 x d -> 28 x 28 x 1
# ----------------------------------------------------------------------------------------------------------

class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), the residual block of the original VQ-VAE."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class Encoder(nn.Module):
    def __init__(self, channels, code_dim, in_channels=1):
        super().__init__()
        c1, c2, c3 = channels
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), ResBlock(c1),          # (B, c1, 28, 28)
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), ResBlock(c2),         # (B, c2, 14, 14)
            nn.Conv2d(c2, c3, 4, stride=2, padding=1), ResBlock(c3), ResBlock(c3),  # (B, c3, 7, 7)
            nn.ReLU(), nn.Conv2d(c3, code_dim, 1),                           # (B, d, 7, 7)
        )

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, channels, code_dim, out_channels=1):
        super().__init__()
        c1, c2, c3 = channels
        self.net = nn.Sequential(
            nn.Conv2d(code_dim, c3, 3, padding=1), ResBlock(c3), ResBlock(c3),   # (B, c3, 7, 7)
            nn.ReLU(), nn.ConvTranspose2d(c3, c2, 4, stride=2, padding=1), ResBlock(c2),  # (B, c2, 14, 14)
            nn.ReLU(), nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), ResBlock(c1),  # (B, c1, 28, 28)
            nn.ReLU(), nn.Conv2d(c1, out_channels, 3, padding=1),                # (B, 1, 28, 28)
        )

    def forward(self, z):
        return self.net(z)


class MnistVQ(nn.Module):
    """The tokenizer: images (B, 1, 28, 28) in [-1, 1] <-> code indices (B, 7, 7) into a (K, d) unit-norm codebook.

    forward(images) -> (reconstruction, indices, commitment_loss) is the training pass; encode and decode are the
    frozen tokenizer's interface, the same one every tokenizer in this repo offers.
    """

    image_shape = (1, 28, 28)  # (C, H, W)
    grid_size = 7  # 4x downsampling: 28 -> 7

    def __init__(self, num_codes=256, code_dim=8, channels=(16, 32, 64)):
        super().__init__()
        self.config = {"num_codes": num_codes, "code_dim": code_dim, "channels": list(channels)}  # saved with it
        self.encoder = Encoder(channels, code_dim)
        self.quantizer = VectorQuantizer(num_codes, code_dim)
        self.decoder = Decoder(channels, code_dim)

    @property
    def codebook(self):
        """(K, d) float, the unit-norm code vectors as used for the lookup and fed to the decoder."""
        return self.quantizer.codebook.detach()

    def forward(self, images):
        z_q, indices, commitment_loss = self.quantizer(self.encoder(images))  # (B, d, 7, 7), (B, 7, 7)
        return self.decoder(z_q), indices, commitment_loss  # (B, 1, 28, 28)

    @torch.no_grad()
    def encode(self, images):
        """(B, 1, 28, 28) float in [-1, 1] -> (B, 7, 7) long code indices."""
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"expected images of shape (B, 1, 28, 28), got {tuple(images.shape)}")
        return self.quantizer.encode(self.encoder(images.float()))  # (B, 7, 7)

    @torch.no_grad()
    def decode(self, codes):
        """(B, 7, 7) long code indices -> (B, 1, 28, 28) images, clamped to [-1, 1]."""
        if codes.dim() != 3:
            raise ValueError(f"expected codes of shape (B, h, w), got {tuple(codes.shape)}")
        z_q = self.codebook[codes].permute(0, 3, 1, 2)  # (B, d, h, w)
        return self.decoder(z_q).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------
# Loading a tokenizer
# ----------------------------------------------------------------------------------------------------------
# A tokenizer is named either by the path of a checkpoint written by `python vq.py train` (its "kind" says
# which class it is), or by a key of TOKENIZERS together with the path of its weights (ckpt). Each entry of
# TOKENIZERS is a loader(ckpt_path, device) returning a frozen module with codebook, encode and decode.

def load_mnist_vq(path, device="cpu"):
    """A tokenizer written by `python vq.py train`, frozen, in eval mode; UserError naming the file otherwise."""
    expected = f"a tokenizer written by `python vq.py train` (kind {MNIST_KIND!r})"
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; expected {expected}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and torch each raise their own errors for a corrupt or foreign file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"{path}: not a readable checkpoint ({reason}); expected {expected}") from None
    kind = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if kind != MNIST_KIND or not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("config"), dict):
        raise UserError(f"{path}: checkpoint of kind {kind!r}; expected {expected}")
    try:
        model = MnistVQ(**ckpt["config"])
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError) as e:
        raise UserError(f"{path}: weights do not fit its config ({str(e).splitlines()[0][:160]})") from None
    return model.to(device).eval().requires_grad_(False)


def _llamagen_loader(name):
    def load(ckpt, device="cpu"):
        from llamagen import load_llamagen
        return load_llamagen(name, ckpt, device)
    return load


TOKENIZERS = {
    MNIST_KIND: load_mnist_vq,
    "llamagen-vq16": _llamagen_loader("llamagen-vq16"),  # LlamaGen vq_ds16_c2i.pt: 16x, 16,384 x 8 codes
    "llamagen-vq8": _llamagen_loader("llamagen-vq8"),  # LlamaGen vq_ds8_c2i.pt: 8x, the paper's choice
}


def load_tokenizer(path, ckpt=None, device="cpu"):
    """A frozen tokenizer in eval mode: `path` is a checkpoint of `vq.py train`, or a name in TOKENIZERS whose
    weights are at `ckpt`."""
    if path in TOKENIZERS:
        if ckpt is None:
            raise UserError(f"tokenizer '{path}' needs the path of its weights (ckpt)")
        return TOKENIZERS[path](ckpt, device)
    if ckpt is not None:
        raise UserError(f"{path}: a checkpoint of `vq.py train` holds its own weights; a separate ckpt ({ckpt}) "
                        f"goes only with a tokenizer name: {', '.join(TOKENIZERS)}")
    return load_mnist_vq(path, device)


def tokenizer_record(path, ckpt=None):
    """What a code set's meta.json stores to find its tokenizer again (see sample.py)."""
    if path in TOKENIZERS:
        return {"kind": path, "name": path, "ckpt": os.path.abspath(ckpt)}
    return {"kind": MNIST_KIND, "path": os.path.abspath(path)}


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------

def to_float(images):
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28) in [-1, 1]."""
    return torch.as_tensor(images).float().div(127.5).sub(1).unsqueeze(1)


def mnist_batches(images, labels, batch_size):
    """(images (B, 1, 28, 28) float in [-1, 1], labels (B,)) pairs over a split, in order."""
    for lo in range(0, len(images), batch_size):
        yield to_float(images[lo:lo + batch_size]), labels[lo:lo + batch_size]


def comparison_grid(top, bottom, scale=4, gap=4):
    """A PIL image: the images of `top` (n, 1, H, W) in [-1, 1] in a row above those of `bottom`, upscaled."""
    pixels = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()  # (n, H, W)
    rows = [pixels(top), pixels(bottom)]
    n, H, W = rows[0].shape
    canvas = np.full((2 * H + gap, n * W + (n - 1) * gap), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for i, image in enumerate(row):
            canvas[r * (H + gap): r * (H + gap) + H, i * (W + gap): i * (W + gap) + W] = image
    canvas = Image.fromarray(canvas)
    return canvas.resize((canvas.width * scale, canvas.height * scale), resample=Image.NEAREST)


def save_atomically(path, write):
    """Call write(file) on a temporary file, then rename it to `path`; an interrupt leaves no partial file."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(tokenizer, images, batch_size=500):
    """Reconstruction MSE (in [-1, 1]) and PSNR, codebook usage and perplexity over uint8 images (N, 28, 28)."""
    squared_error, counts = 0.0, torch.zeros(tokenizer.codebook.shape[0], dtype=torch.long)
    for lo in range(0, len(images), batch_size):
        x = to_float(images[lo:lo + batch_size])  # (B, 1, 28, 28)
        codes = tokenizer.encode(x)  # (B, 7, 7)
        squared_error += (tokenizer.decode(codes) - x).pow(2).sum().item()
        counts += code_counts(codes, len(counts))
    mse = squared_error / (len(images) * images[0].size)
    return {"mse": mse, "psnr": 10 * math.log10(4 / max(mse, 1e-12)),  # peak-to-peak 2 in [-1, 1]
            "usage": codebook_usage(counts), "perplexity": perplexity(counts)}


def learning_rate(step, steps, peak, warmup=100):
    """Linear warm-up, then a cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args):
    check_positive(args, "steps", "batch_size", "lr", "limit")
    if not 2 <= args.codebook_size <= 65536:
        raise UserError(f"--codebook-size {args.codebook_size}: expected 2 to 65536 codes (stored as uint16)")
    train_images, _ = data.load_mnist(args.dataset, args.data_dir, "train", download=args.download)
    test_images, test_labels = data.load_mnist(args.dataset, args.data_dir, "test")
    if args.limit:  # the first N images of each split, for quick runs
        train_images = train_images[:args.limit]
        test_images, test_labels = test_images[:args.limit], test_labels[:args.limit]
    make_dir(args.out)

    torch.manual_seed(args.seed)
    model = MnistVQ(num_codes=args.codebook_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    train_images = torch.from_numpy(train_images)  # (N, 28, 28) uint8
    order, position = torch.randperm(len(train_images)), 0
    start = time.time()
    bar = tqdm(range(args.steps), desc="train vq", unit="step")
    for step in bar:
        if position + args.batch_size > len(order):  # a new epoch, in a new order
            order, position = torch.randperm(len(train_images)), 0
        x = to_float(train_images[order[position:position + args.batch_size]])  # (B, 1, 28, 28)
        position += args.batch_size
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)

        reconstruction, indices, commitment_loss = model(x)
        mse = F.mse_loss(reconstruction, x)
        loss = mse + commitment_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        if step % 10 == 0 or step == args.steps - 1:
            counts = code_counts(indices, args.codebook_size)
            bar.set_postfix(mse=f"{mse.item():.4f}", usage=f"{codebook_usage(counts):.2f}",
                            ppl=f"{perplexity(counts):.0f}", restarts=model.quantizer.restarts)
    seconds = time.time() - start

    model.eval()
    test = evaluate(model, test_images)
    metrics = {"dataset": args.dataset, "steps": args.steps, "batch_size": args.batch_size,
               "seconds": round(seconds, 1),  # the training loop, without loading and evaluation
               "train_images": len(train_images), "test_images": len(test_images),
               "num_codes": args.codebook_size, "code_dim": model.quantizer.dim, "grid": [model.grid_size] * 2,
               "test_mse": test["mse"], "test_psnr": test["psnr"],
               "test_usage": test["usage"], "test_perplexity": test["perplexity"],
               "restarts": model.quantizer.restarts}
    checkpoint = {"kind": MNIST_KIND, "config": model.config, "model": model.state_dict(), "metrics": metrics,
                  "args": vars(args)}
    save_atomically(os.path.join(args.out, "tokenizer.pt"), lambda f: torch.save(checkpoint, f))

    # one test image of each class, then reconstructions below
    columns = [int(np.nonzero(test_labels == c)[0][0]) for c in np.unique(test_labels)]
    originals = to_float(test_images[columns])
    preview = comparison_grid(originals, model.decode(model.encode(originals)))
    save_atomically(os.path.join(args.out, "recon.png"), lambda f: preview.save(f, format="PNG"))
    data.atomic_write_text(os.path.join(args.out, "metrics.json"), json.dumps(metrics, indent=2))
    print(f"{args.out}: test MSE {test['mse']:.4f}, PSNR {test['psnr']:.2f} dB, codebook usage {test['usage']:.1%}, "
          f"perplexity {test['perplexity']:.1f}, {seconds:.0f} s")
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Encoding a dataset into a code set
# ----------------------------------------------------------------------------------------------------------

SHARD_SIZE = 100_000  # code grids per shard file


def write_codes(tokenizer, batches, total, out, shard_size=SHARD_SIZE):
    """Encode an iterable of (images (B, C, H, W), labels (B,)) batches into shards of OUT; returns
    (number of shards, grid (h, w), code counts (K,))."""
    codes, labels, shards, held = [], [], 0, 0
    counts = torch.zeros(tokenizer.codebook.shape[0], dtype=torch.long)
    with tqdm(total=total, desc="encode", unit="img") as bar:
        for images, batch_labels in batches:
            batch_codes = tokenizer.encode(images)  # (B, h, w)
            counts += code_counts(batch_codes, len(counts))
            codes.append(batch_codes.cpu().numpy().astype(np.uint16))
            labels.append(np.asarray(batch_labels, dtype=np.int64))
            held += len(batch_codes)
            bar.update(len(batch_codes))
            if held >= shard_size:
                shards = flush_shard(out, shards, codes, labels, shard_size)
                held = sum(len(c) for c in codes)
    if held or shards == 0:
        shards = flush_shard(out, shards, codes, labels, held)
    return shards, tuple(batch_codes.shape[1:]), counts


def flush_shard(out, index, codes, labels, size):
    """Write the first `size` held code grids as shard `index`, keep the rest; returns the next shard index."""
    all_codes, all_labels = np.concatenate(codes), np.concatenate(labels)
    data.write_shard(out, index, all_codes[:size, None], all_labels[:size])  # (n, V = 1, h, w)
    codes[:], labels[:] = [all_codes[size:]], [all_labels[size:]]
    return index + 1


def encode(args):
    check_positive(args, "batch_size", "limit")
    if args.dataset == "imagefolder":
        return encode_imagefolder(args)
    if args.tokenizer_ckpt:
        raise UserError(f"--tokenizer-ckpt goes with a pretrained --tokenizer ({', '.join(TOKENIZERS)}), "
                        f"not with {args.dataset}")
    meta_path = os.path.join(args.out, "meta.json")
    if os.path.exists(meta_path) and not args.force:
        raise UserError(f"{args.out}: a code set already exists; pass --force to overwrite")
    tokenizer = load_tokenizer(args.tokenizer)
    images, labels = data.load_mnist(args.dataset, args.data_dir, args.split)
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    make_dir(args.out)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the old set stops looking complete before any of its shards is replaced

    start = time.time()
    num_shards, grid, counts = write_codes(tokenizer, mnist_batches(images, labels, args.batch_size), len(images),
                                           args.out)
    meta = data.write_meta(args.out, tokenizer.codebook.cpu().numpy(), num_shards, grid=list(grid),
                           num_classes=10, views=1, class_names=data.CLASS_NAMES[args.dataset],
                           dataset=args.dataset, split=args.split, image_shape=[1, 28, 28],
                           tokenizer=tokenizer_record(args.tokenizer))
    print(f"{args.out}: {meta['num_images']} code grids {grid[0]}x{grid[1]} in {num_shards} shard(s), "
          f"codebook usage {codebook_usage(counts):.1%}, perplexity {perplexity(counts):.1f}, "
          f"{time.time() - start:.0f} s")
    return meta


# ----------------------------------------------------------------------------------------------------------
# Encoding an ImageFolder tree (ImageNet) with a pretrained tokenizer, sharded across torchrun ranks
# ----------------------------------------------------------------------------------------------------------

IMAGEFOLDER_SHARD = 10_000  # images per shard: 10,000 x 2 views x 32 x 32 codes x 2 bytes = 41 MB


def encode_imagefolder(args):
    """Center-crop every image (ADM's preprocessing) and encode it and its horizontal flip: views V = 2.

    Shard i holds images [i * S, (i + 1) * S) of the sorted file list. Under torchrun, rank r encodes the shards
    i = r, r + world, ...; a shard already on disk is skipped, so an interrupted run resumes where it stopped.
    Rank 0 writes meta.json last, once every shard is there.
    """
    import torch.distributed as dist
    from train import setup_distributed

    if args.tokenizer not in TOKENIZERS or args.tokenizer == MNIST_KIND:
        raise UserError(f"--dataset imagefolder wants a pretrained tokenizer: --tokenizer "
                        f"{{{', '.join(k for k in TOKENIZERS if k != MNIST_KIND)}}} --tokenizer-ckpt PATH")
    rank, world, device = setup_distributed()
    try:
        paths, labels, classes = data.list_imagefolder(args.data_dir)
        if args.limit:
            paths, labels = paths[:args.limit], labels[:args.limit]
        meta_path = os.path.join(args.out, "meta.json")
        if os.path.exists(meta_path) and not args.force:
            raise UserError(f"{args.out}: a code set already exists; pass --force to overwrite")
        tokenizer = load_tokenizer(args.tokenizer, args.tokenizer_ckpt, device)
        if args.image_size % tokenizer.downsample:
            raise UserError(f"--image-size {args.image_size} is not a multiple of the tokenizer's "
                            f"downsampling factor {tokenizer.downsample}")
        if rank == 0:
            make_dir(args.out)
            if args.force and os.path.exists(meta_path):
                os.remove(meta_path)
                for name in os.listdir(args.out):
                    if name.startswith(("codes-", "labels-")):
                        os.remove(os.path.join(args.out, name))
        if world > 1:
            dist.barrier()
        num_shards = (len(paths) + args.shard_size - 1) // args.shard_size
        todo = [i for i in range(rank, num_shards, world) if not data.shard_done(args.out, i)]
        for i in tqdm(todo, desc=f"shards (rank {rank})", position=rank, unit="shard"):
            lo, hi = i * args.shard_size, min((i + 1) * args.shard_size, len(paths))
            images = data.ImageFolderImages(paths[lo:hi], labels[lo:hi], args.image_size)
            loader = torch.utils.data.DataLoader(images, batch_size=args.batch_size, num_workers=args.workers)
            codes = []
            for x, _ in loader:
                x = x.to(device)
                views = torch.stack([tokenizer.encode(x), tokenizer.encode(x.flip(3))], 1)  # (B, 2, h, w)
                codes.append(views.cpu().numpy())
            data.write_shard(args.out, i, np.concatenate(codes), labels[lo:hi])
        if world > 1:
            dist.barrier()
        if rank == 0:
            grid = [args.image_size // tokenizer.downsample] * 2
            meta = data.write_meta(args.out, tokenizer.codebook.cpu().numpy(), num_shards, grid=grid,
                                   num_classes=len(classes), views=2, class_names=classes, dataset="imagefolder",
                                   data_dir=os.path.abspath(args.data_dir), image_shape=[3, args.image_size,
                                   args.image_size], tokenizer=tokenizer_record(args.tokenizer, args.tokenizer_ckpt))
            print(f"{args.out}: {meta['num_images']} images x 2 views, {grid[0]}x{grid[1]} codes, "
                  f"{num_shards} shard(s)")
    finally:
        if world > 1:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def check_positive(args, *names):
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} {value}: expected a positive number")


def make_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot create the output directory ({e.strerror})") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the MNIST / Fashion-MNIST VQ tokenizer, or encode a dataset "
                                            "into a code set for train.py.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a tokenizer: RUN/tokenizer.pt, recon.png, metrics.json")
    t.add_argument("--dataset", choices=DATASETS, required=True)
    t.add_argument("--data-dir", required=True, help="directory of the IDX files")
    t.add_argument("--out", required=True, help="run directory RUN")
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (Adam, cosine decay)")
    t.add_argument("--codebook-size", type=int, default=256, help="K, the number of codes")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--limit", type=int, help="use only the first N images of each split (quick tests)")
    t.add_argument("--download", action="store_true", help="fetch missing IDX files into --data-dir")

    e = sub.add_parser("encode", help="encode a split into a code set (the format of data.py) for train.py")
    e.add_argument("--tokenizer", required=True,
                   help="RUN/tokenizer.pt written by `vq.py train`, or llamagen-vq8 / llamagen-vq16")
    e.add_argument("--tokenizer-ckpt", help="the weights of a pretrained tokenizer (vq_ds8_c2i.pt, vq_ds16_c2i.pt)")
    e.add_argument("--dataset", choices=DATASETS + ("imagefolder",), required=True)
    e.add_argument("--data-dir", required=True, help="directory of the IDX files, or the root of an ImageFolder tree")
    e.add_argument("--image-size", type=int, default=256, help="imagefolder: center-crop size")
    e.add_argument("--shard-size", type=int, default=IMAGEFOLDER_SHARD, help="imagefolder: images per shard")
    e.add_argument("--workers", type=int, default=4, help="imagefolder: image-decoding worker processes")
    e.add_argument("--split", choices=("train", "test"), default="train")
    e.add_argument("--out", required=True, help="code set directory CODES")
    e.add_argument("--batch-size", type=int, default=500)
    e.add_argument("--limit", type=int, help="encode only the first N images of the split")
    e.add_argument("--force", action="store_true", help="overwrite an existing code set in --out")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    return run_command({"train": train, "encode": encode}[args.command], args)


if __name__ == "__main__":
    main()
