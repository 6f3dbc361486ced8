"""
The Diffusion Transformer (DiT) that every objective in this repo trains: one backbone, sized by a preset name.

Sources
-------
* DiT: W. Peebles and S. Xie, "Scalable Diffusion Models with Transformers", ICCV 2023 (arXiv 2212.09748):
  patch embedding, adaLN-Zero blocks, the final adaLN layer, the zero initialisation and the model sizes.
* The fixed 2D sine-cosine positional embedding of MAE (He et al. 2022), as DiT uses it.

What is different from DiT's own models.py
------------------------------------------
* The input is a grid of code-embedding vectors, channels last: x of shape (B, H, W, in_dim) is a point z_t in
  the codebook's embedding space. For the discrete (DFM) baseline it is a grid of token indices (B, H, W) in
  [0, input_vocab), embedded by a lookup table straight into the model width (hidden_size channels a position,
  as the Purrception paper's DFM does) before the same patch embedding.
* Patches are flattened and embedded by a Linear layer (the same map as DiT's stride-p convolution).
* Time t lies in [0, 1] with noise at t = 0 and data at t = 1 (the convention of vfm.py). It is embedded as
  sinusoidal features of 1000 * t, so the frequencies are those of DiT's integer timesteps 0..1000
  (`time_scale`; the authors' code embeds t itself, time_scale = 1).
* The output is out_dim numbers per grid position, channels last: logits over the K codes (Purrception, DFM)
  or d channels (the CFM baselines). There is no learned variance.
* Labels y are in [0, num_classes], and the index num_classes is the null class ("no label") that
  classifier-free guidance uses. The model never drops labels itself; the training objective does.
* Attention runs through torch.nn.functional.scaled_dot_product_attention (fused kernels where available).
"""

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TIME_SCALE = 1000  # t in [0, 1] is embedded as DiT's timestep 1000 * t (the authors' code embeds t itself: 1)
FREQUENCY_DIM = 256  # sinusoidal features of the time before the time MLP


# ---- Patches and positions -------------------------------------------------------------------------------

def patchify(x, patch_size):
    """(B, H, W, C) -> (B, T, p * p * C), T = (H / p) * (W / p); patches in row-major order."""
    B, H, W, C = x.shape
    p = patch_size
    x = x.reshape(B, H // p, p, W // p, p, C)  # (B, h, p, w, p, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, h, w, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)  # (B, T, p*p*C)


def unpatchify(x, patch_size, grid_size):
    """(B, T, p * p * C) -> (B, H, W, C) with H = W = grid_size: the inverse of patchify."""
    B, T, PC = x.shape
    p, h = patch_size, grid_size // patch_size
    x = x.reshape(B, h, h, p, p, PC // (p * p))  # (B, h, w, p, p, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, h, p, w, p, C)
    return x.reshape(B, h * p, h * p, PC // (p * p))  # (B, H, W, C)


def sincos_1d(dim, positions):
    """(N,) positions -> (N, dim): [sin(pos * w_i), cos(pos * w_i)] with w_i = 10000^(-i / (dim / 2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (N, dim)


def sincos_2d(dim, grid_size):
    """(grid_size**2, dim) fixed positional embedding of a square grid, patches in row-major order.

    The first half of the channels encodes the column of a patch and the second half its row, as in MAE and DiT.
    """
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    return emb.float()  # (T, dim)


# ---- Embedders for time and class labels -----------------------------------------------------------------

def timestep_features(t, dim, max_period=10000):
    """(B,) times -> (B, dim) sinusoidal features [cos(t * f_i), sin(t * f_i)], f_i = max_period^(-i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, dim)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, D): sinusoidal features of time_scale * t, then a two-layer MLP."""

    def __init__(self, hidden_size, frequency_dim=FREQUENCY_DIM, time_scale=TIME_SCALE):
        super().__init__()
        self.frequency_dim, self.time_scale = frequency_dim, time_scale
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(timestep_features(self.time_scale * t, self.frequency_dim))  # (B, D)


class LabelEmbedder(nn.Module):
    """y in [0, num_classes] -> (B, D); row num_classes is the null class used by classifier-free guidance."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y):
        return self.embedding(y)  # (B, D)


# ---- Transformer block with adaLN-Zero conditioning ------------------------------------------------------

def modulate(x, shift, scale):
    """Adaptive LayerNorm: x * (1 + scale) + shift, with (B, D) shift and scale broadcast over the T tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, heads, D/heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, D/heads)
        x = x.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(x)  # (B, T, D)


class MLP(nn.Module):
    """Linear, GELU (tanh approximation), Linear."""

    def __init__(self, hidden_size, mlp_hidden):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # (B, T, D)


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose LayerNorms are shifted, scaled and gated by the conditioning c.

    The six (B, D) vectors come from c through SiLU and one Linear; its zero initialisation makes both gates
    zero, so the block starts as the identity (adaLN-Zero).
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, T, D)
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, T, D)
        return x


# ---- Final layer -----------------------------------------------------------------------------------------

class FinalLayer(nn.Module):
    """adaLN (shift and scale from c), then a Linear from D to the p * p * out_dim outputs of each patch, laid out
    on the grid: (B, T, D) -> (B, H, W, out_dim), unpatchify(linear(x)).

    Without gradients (sampling) and with p > 1, the output (out_dim = K logits: the largest tensor of a pass) is
    made once. The Linear's weight is p * p blocks of out_dim rows, one per position (i, j) of a patch (patchify's
    order); each block's product over the T tokens is written straight to its grid positions, so the pass peaks
    at (1 + 1 / p^2) x the output, where unpatchifying the whole product would copy it (2 x). With gradients
    (training) it is the one product and its unpatchify: autograd's record of p * p writes into one tensor would
    copy the output's gradient at each of them."""

    def __init__(self, hidden_size, patch_size, out_dim, grid_size):
        super().__init__()
        self.patch_size, self.patches = patch_size, grid_size // patch_size  # h = w patches a side
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, D) each
        x = modulate(self.norm_final(x), shift, scale)  # (B, T, D)
        B, T, D = x.shape
        p, h = self.patch_size, self.patches  # h x h patches
        if p == 1 or torch.is_grad_enabled():  # p = 1: a token is a position, and unpatchify a view
            return unpatchify(self.linear(x), p, h * p)  # (B, H, W, out_dim)
        x = x.view(B, h, h, D)  # (B, h, w, D)
        weights = self.linear.weight.view(p * p, -1, D)  # (p * p, out_dim, D)
        biases = self.linear.bias.view(p * p, -1)  # (p * p, out_dim)
        out = None
        for k in range(p * p):
            i, j = divmod(k, p)
            part = F.linear(x, weights[k], biases[k])  # (B, h, w, out_dim): position (i, j) of every patch
            if out is None:  # the dtype of the Linear's output: bf16 under autocast
                out = part.new_empty(B, h, p, h, p, part.shape[-1])  # (B, h, p, w, p, out_dim)
            out[:, :, i, :, j] = part
            del part  # freed before the next is made: one p * p-th of the output at a time
        return out.view(B, h * p, h * p, -1)  # (B, H, W, out_dim)


# ---- The model -------------------------------------------------------------------------------------------

class DiT(nn.Module):
    """Diffusion Transformer over a square grid of codes.

    forward(x, t, y):
        x: (B, H, W, in_dim) float, a point z_t in the embedding space, or (B, H, W) long token indices in
           [0, input_vocab) when input_vocab is given (the DFM baseline: K codes and one mask token; each is
           embedded into hidden_size channels, and in_dim is then hidden_size whatever is passed).
        t: (B,) float in [0, 1], noise at 0 and data at 1.
        y: (B,) long in [0, num_classes]; num_classes is the null class. With num_classes = 0 the model is
           unconditional and y is all zeros (the null class).
        returns (B, H, W, out_dim) float.
    """

    def __init__(self, grid_size: int, in_dim: int | None, out_dim: int, num_classes: int, *,
                 patch_size: int = 2, hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: float = 4.0, input_vocab: int | None = None, time_scale: float = TIME_SCALE):
        super().__init__()
        if grid_size % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide grid_size {grid_size}: the {grid_size} x "
                             f"{grid_size} code grid cannot be cut into {patch_size} x {patch_size} patches")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size {hidden_size} must be a multiple of 4 for the 2D positional embedding")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if input_vocab is not None:
            in_dim = hidden_size  # token lookups of the model width
        self.grid_size, self.in_dim, self.out_dim, self.num_classes = grid_size, in_dim, out_dim, num_classes
        self.patch_size, self.hidden_size, self.depth, self.num_heads = patch_size, hidden_size, depth, num_heads
        self.mlp_ratio, self.input_vocab = mlp_ratio, input_vocab
        self.num_tokens = (grid_size // patch_size) ** 2

        self.token_embedder = nn.Embedding(input_vocab, in_dim) if input_vocab is not None else None
        self.patch_embed = nn.Linear(patch_size * patch_size * in_dim, hidden_size)
        self.register_buffer("pos_embed", sincos_2d(hidden_size, grid_size // patch_size), persistent=False)
        self.t_embedder = TimestepEmbedder(hidden_size, time_scale=time_scale)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, out_dim, grid_size)
        self.initialize_weights()

    def initialize_weights(self):
        """All initialisation, in one place. At init every block is the identity and the output is zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Token lookup for DFM: std 0.02, as the paper's code.
        if self.token_embedder is not None:
            nn.init.normal_(self.token_embedder.weight, std=0.02)
        nn.init.normal_(self.y_embedder.embedding.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: shifts, scales and gates start at zero, so each block starts as the identity.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # The output starts at zero: uniform logits over the codes, or a zero velocity.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x, t, y):
        if self.token_embedder is not None:
            x = self.token_embedder(x)  # (B, H, W, hidden_size)
        x = self.patch_embed(patchify(x, self.patch_size)) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        for block in self.blocks:
            x = block(x, c)  # (B, T, D)
        return self.final_layer(x, c)  # (B, H, W, out_dim)

    def num_params(self):
        """Number of parameters (the positional embedding is a fixed buffer, not counted)."""
        return sum(p.numel() for p in self.parameters())


# ---- Presets: DiT paper sizes (Table 1), plus T, a tiny size for 28 x 28 images on a laptop CPU ----------

SIZES = {  # name: (depth, hidden_size, num_heads)
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    "T": (4, 128, 4),
}
PATCH_SIZES = {"XL": (2, 4), "L": (2, 4), "B": (1, 2, 4), "S": (1, 2, 4), "T": (1, 2)}
DiT_models = {f"DiT-{size}/{p}": functools.partial(DiT, depth=depth, hidden_size=width, num_heads=heads, patch_size=p)
              for size, (depth, width, heads) in SIZES.items() for p in PATCH_SIZES[size]}


def build_dit(name: str, **kw) -> DiT:
    """The preset `name` (a key of DiT_models) with the data-dependent arguments: grid_size, in_dim, out_dim,
    num_classes and optionally input_vocab."""
    if name not in DiT_models:
        raise ValueError(f"unknown model '{name}'; choose from: {', '.join(DiT_models)}")
    return DiT_models[name](**kw)
