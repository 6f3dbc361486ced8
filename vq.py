"""
The VQ tokenizer for MNIST and Fashion-MNIST: a small convolutional autoencoder with a vector-quantized
bottleneck that turns a 28 x 28 image into a 7 x 7 grid of code indices into a (K, d) codebook, and back.
Purrception's flow runs over the embeddings of these codes; the tokenizer itself is trained once and frozen.

`python tokenizer.py train` trains it and writes RUN/tokenizer.pt; support/tokenizers.py reads that file back.

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
  codebook `MnistVQ.codebook` returns and `tokenizer.py encode` exports. Its scale is not tuned for the flow: unit
  vectors in d = 8 have a per-dimension RMS of 1 / sqrt(8), like LlamaGen's codes. The flow runs on them as
  they are (the setting of the authors' code), or standardised with `train.py --codebook-scale rms` (vfm.flow_codebook:
  E / rms(E)), which leaves the nearest code of every point unchanged.
* Every code stays in use: the codebook is initialised by k-means++ on the first batch of encoder outputs, then
  follows the encoder by exponential moving averages (decay 0.99), and any code left unused for 20 training
  batches in a row is re-seeded from an encoder output of the current batch.
* Usage is the fraction of the K codes used at least once on a set of images; perplexity is exp(entropy) of
  the code histogram, K when all codes are used equally often and 1 when one code is used everywhere.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- Codebook statistics ---------------------------------------------------------------------------------

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


# ---- The vector quantizer --------------------------------------------------------------------------------

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
    The codebook is unit-norm on purpose (see the module docstring): the flow uses it as it is, or rescaled with
    `train.py --codebook-scale rms`.
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


# ---- The autoencoder: 28 x 28 x 1 -> 7 x 7 x d -> 28 x 28 x 1 --------------------------------------------

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

