"""
LlamaGen's image tokenizer: a VQGAN-style convolutional autoencoder with a 16,384 x 8 codebook, loadable from
the published ImageNet checkpoints. Purrception's ImageNet experiments run the flow over its code indices.

Sources: Sun et al., "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation"
(arXiv 2406.06525) and its repository github.com/FoundationVision/LlamaGen
(tokenizer/tokenizer_image/vq_model.py), which builds on taming-transformers (Esser et al., arXiv 2012.09841).

Checkpoints (https://huggingface.co/FoundationVision/LlamaGen), weights under checkpoint["model"]:
    llamagen-vq16   vq_ds16_c2i.pt   16x downsampling   256 x 256 image -> 16 x 16 codes
    llamagen-vq8    vq_ds8_c2i.pt     8x downsampling   256 x 256 image -> 32 x 32 codes

Images are float (B, 3, H, W) in [-1, 1] (pixel / 127.5 - 1), H and W multiples of the downsampling factor.

Architecture (ch = 128, z_channels = 256, GroupNorm(32 groups, eps 1e-6), SiLU, all convs 3 x 3 unless noted)
---------------------------------------------------------------------------------------------------------
Encoder  conv_in 3 -> ch
         one level per entry of ch_mult, ch * ch_mult[i] channels, 2 res blocks each; the last (lowest
         resolution) level puts an attention block after every res block; every level but the last ends in
         a stride-2 downsampling conv
         mid: res block, attention block, res block
         GroupNorm, SiLU, conv_out -> z_channels
quant_conv (1 x 1) z_channels -> 8, L2-normalise, nearest unit-norm code
post_quant_conv (1 x 1) 8 -> z_channels
Decoder  conv_in z_channels -> ch * ch_mult[-1]
         mid: res block, attention block, res block
         the levels in reverse (lowest resolution first), 3 res blocks each (num_res_blocks + 1); attention
         after every res block at the lowest-resolution level only; every level but the last ends in a 2x
         nearest-neighbour upsampling followed by a conv
         GroupNorm, SiLU, conv_out -> 3

Details the published checkpoints depend on:
* Downsampling pads right and bottom only, F.pad(x, (0, 1, 0, 1)), then a 3 x 3 conv with stride 2, padding 0.
* The decoder's levels are stored lowest resolution first: decoder.conv_blocks.0 is the ch * ch_mult[-1] level
  with the attention blocks, and the upsampling convs live in conv_blocks.0 .. conv_blocks.(n - 2).
* A res block changes its channel count through a 1 x 1 "nin_shortcut" conv on the skip path.
* Both the encoder output and the codebook are L2-normalised before the lookup, so the nearest code is the one
  of highest cosine similarity, and the decoder is fed the unit-norm code vector.
* The quantizer carries a training-time buffer, quantize.codebook_used, of 65,536 floats (a rolling record of
  recently used indices). It plays no part in encoding or decoding but is in the published state dict.

The flow and the codebook scale
-------------------------------
`LlamaGenVQ.codebook` is the L2-normalised codebook, the vectors the lookup and the decoder use. Unit-norm codes
in 8 dimensions have a per-dimension RMS of 1 / sqrt(8) ~ 0.35, far smaller than the flow's N(0, I) source.
The paper's flow runs on them as they are (train.py's default); `--codebook-scale rms` runs it on
vfm.flow_codebook(E, "rms") = E / rms(E), which is sqrt(8) * E for unit-norm codes. Snapping to the nearest code
is unchanged by a global scale, so the tokenizer's own codebook is never modified.
"""

import argparse
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from support import files

LLAMAGEN_CONFIGS = {
    "llamagen-vq16": dict(ch_mult=(1, 1, 2, 2, 4), codebook_size=16384, codebook_dim=8, z_channels=256, ch=128,
                          num_res_blocks=2),
    "llamagen-vq8": dict(ch_mult=(1, 2, 2, 4), codebook_size=16384, codebook_dim=8, z_channels=256, ch=128,
                         num_res_blocks=2),
}
CHECKPOINT_FILES = {"llamagen-vq16": "vq_ds16_c2i.pt", "llamagen-vq8": "vq_ds8_c2i.pt"}
CHECKPOINT_URL = "https://huggingface.co/FoundationVision/LlamaGen/resolve/main/{}"
USAGE_BUFFER_SIZE = 65536  # length of quantize.codebook_used in the published checkpoints
LOOKUP_CHUNK = 1024  # latent vectors compared with the whole codebook at once: a (1024, K) distance matrix


# ---- Building blocks -------------------------------------------------------------------------------------

def group_norm(channels):
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """x + conv(SiLU(norm(conv(SiLU(norm(x)))))), with a 1 x 1 conv on the skip path when channels change."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = None
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C_out, H, W)
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H * W positions, with 1 x 1 convs for q, k, v and the output."""

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, HW, C)
                   for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v: (B, 1, HW, C)
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W: pad one zero row at the bottom and one column on the right, then a stride-2 3 x 3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour interpolation, then a 3 x 3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Level(nn.Module):
    """One resolution: res blocks, each followed by an attention block when `attention` is on, then a resampler.

    The resampler is stored as `downsample` in the encoder and `upsample` in the decoder, as in the checkpoints.
    """

    def __init__(self, in_channels, out_channels, num_blocks, attention, resample=None):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(in_channels if i == 0 else out_channels, out_channels)
                                 for i in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks if attention else 0))
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels)
        self.resample = resample

    def forward(self, x):
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[i](x)
        if self.resample == "down":
            x = self.downsample(x)
        elif self.resample == "up":
            x = self.upsample(x)
        return x


def middle(channels):
    """The bottleneck of both halves: res block, attention block, res block."""
    return nn.ModuleList([ResBlock(channels, channels), AttnBlock(channels), ResBlock(channels, channels)])


# ---- Encoder and decoder ---------------------------------------------------------------------------------

class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, z_channels, H / ds, W / ds) with ds = 2 ** (len(ch_mult) - 1)."""

    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, in_channels=3):
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        widths = [ch] + [ch * m for m in ch_mult]  # input width of level i is widths[i], output widths[i + 1]
        self.conv_blocks = nn.ModuleList(
            Level(widths[i], widths[i + 1], num_res_blocks, attention=(i == n - 1),
                  resample="down" if i < n - 1 else None)
            for i in range(n))
        self.mid = middle(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], z_channels, kernel_size=3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.conv_blocks:
            h = level(h)  # level i: (B, ch * ch_mult[i], H / 2^(i+1), W / 2^(i+1)), the last one not halved
        for block in self.mid:
            h = block(h)  # (B, ch * ch_mult[-1], h, w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z_channels, h, w)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h * ds, w * ds). Levels run from the lowest resolution up."""

    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, out_channels=3):
        super().__init__()
        n = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)
        self.mid = middle(block_in)
        levels = []
        for i in reversed(range(n)):  # i = n - 1 (lowest resolution, attention) first
            block_out = ch * ch_mult[i]
            levels.append(Level(block_in, block_out, num_res_blocks + 1, attention=(i == n - 1),
                                resample="up" if i > 0 else None))
            block_in = block_out
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)  # (B, ch * ch_mult[-1], h, w)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)  # channels ch * ch_mult[-1-j] at level j; H, W doubled after every level but the last
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, h * ds, w * ds)


# ---- Quantizer: nearest unit-norm code (highest cosine similarity) ---------------------------------------

class VectorQuantizer(nn.Module):
    """The codebook (K, d), stored unnormalised as in the checkpoint and L2-normalised wherever it is used."""

    def __init__(self, codebook_size, codebook_dim):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, codebook_dim)
        self.register_buffer("codebook_used", torch.zeros(USAGE_BUFFER_SIZE))  # training statistics, unused here

    def normalized_codebook(self):
        return F.normalize(self.embedding.weight, p=2, dim=-1)  # (K, d), unit rows

    def lookup(self, z):
        """(..., d) latent vectors -> (...) index of the nearest code once both are L2-normalised,
        argmin_k ||z' - e'_k||^2 with z' = z / |z|, e'_k = e_k / |e_k|: the code of highest cosine similarity, up
        to rounding.

        The distance is computed as LlamaGen's VectorQuantizer computes it, (||z'||^2 + ||e'_k||^2) - 2 <z', e'_k>
        in float32, and argmin takes the first of equal values: the squared norms are 1 only to within rounding,
        and adding them decides near-ties as upstream does.
        """
        codebook = self.normalized_codebook()  # (K, d)
        code_norms = codebook.pow(2).sum(dim=1)  # ||e_k||^2, (K,)
        flat = F.normalize(z.reshape(-1, z.shape[-1]), p=2, dim=-1)  # (N, d)
        indices = torch.cat([(chunk.pow(2).sum(dim=1, keepdim=True) + code_norms - 2 * (chunk @ codebook.T))
                             .argmin(dim=1) for chunk in flat.split(LOOKUP_CHUNK)])  # (N,)
        return indices.view(z.shape[:-1])


# ---- The tokenizer ---------------------------------------------------------------------------------------

class LlamaGenVQ(nn.Module):
    """images (B, 3, H, W) in [-1, 1] <-> code indices (B, H / ds, W / ds) into a (K, d) unit-norm codebook."""

    def __init__(self, ch_mult=(1, 1, 2, 2, 4), codebook_size=16384, codebook_dim=8, z_channels=256, ch=128,
                 num_res_blocks=2):
        super().__init__()
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels)
        self.quantize = VectorQuantizer(codebook_size, codebook_dim)
        self.quant_conv = nn.Conv2d(z_channels, codebook_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(codebook_dim, z_channels, kernel_size=1)
        self.downsample = 2 ** (len(ch_mult) - 1)

    @property
    def codebook(self):
        """(K, d) the L2-normalised codebook: the vectors the lookup compares with and the decoder receives."""
        with torch.no_grad():
            return self.quantize.normalized_codebook()

    @torch.no_grad()
    def encode(self, images):
        """(B, 3, H, W) float in [-1, 1] -> (B, H / ds, W / ds) long code indices."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[2] % self.downsample or images.shape[3] % self.downsample:
            raise ValueError(f"image size {tuple(images.shape[2:])} is not a multiple of {self.downsample}")
        h = self.quant_conv(self.encoder(images))  # (B, d, h, w)
        return self.quantize.lookup(h.permute(0, 2, 3, 1))  # (B, h, w)

    @torch.no_grad()
    def decode(self, codes):
        """(B, h, w) long code indices -> (B, 3, h * ds, w * ds) images, clamped to [-1, 1]."""
        if codes.dim() != 3:
            raise ValueError(f"expected codes of shape (B, h, w), got {tuple(codes.shape)}")
        z = self.codebook[codes].permute(0, 3, 1, 2)  # (B, d, h, w), unit-norm code vectors
        images = self.decoder(self.post_quant_conv(z))  # (B, 3, h * ds, w * ds)
        return images.clamp(-1, 1)


# ---- Loading a published checkpoint ----------------------------------------------------------------------

def state_dict_shapes(name):
    """{key: shape} of the tokenizer `name`'s state dict, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in LlamaGenVQ(**LLAMAGEN_CONFIGS[name]).state_dict().items()}


def _first_few(keys, n=3):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def check_layout(wanted, found, name, where, article="a"):
    """ValueError, naming `where`, unless `found` equals `wanted` ({key: shape}, the state dict of tokenizer
    `name`): the first missing keys, else the first unexpected ones, else the first tensor of another shape."""
    missing, unexpected = wanted.keys() - found.keys(), found.keys() - wanted.keys()
    if missing:
        raise ValueError(f"{where}: not {article} {name} checkpoint: missing keys {_first_few(missing)}")
    if unexpected:
        raise ValueError(f"{where}: not {article} {name} checkpoint: unexpected keys {_first_few(unexpected)}")
    key = next((k for k in wanted if wanted[k] != found[k]), None)
    if key is not None:
        raise ValueError(f"{where}: {key} has shape {found[key]}, but {name} expects {wanted[key]}")


def check_state_dict(name, found, where):
    """ValueError, naming `where`, unless `found` ({key: shape}) is the state dict of tokenizer `name`."""
    wanted = state_dict_shapes(name)
    if found == wanted:
        return
    for other in LLAMAGEN_CONFIGS:
        if other != name and found == state_dict_shapes(other):
            raise ValueError(f"{where}: this is a {other} checkpoint, not {name}")
    check_layout(wanted, found, name, where)


def load_llamagen(name, ckpt_path, device="cpu"):
    """The tokenizer `name` (a key of LLAMAGEN_CONFIGS) with the weights of `ckpt_path`, frozen, in eval mode.

    Accepts the published layout ({"model": state_dict, ...}) or a bare state dict. Raises FileNotFoundError or
    ValueError naming the file for a missing or unreadable file, missing or unexpected keys, or a tensor of the
    wrong shape. The file is read without running pickled code: tensors, plain containers and numbers only,
    plus the argparse Namespace that LlamaGen's training script stores under "args".
    """
    if name not in LLAMAGEN_CONFIGS:
        raise ValueError(f"unknown LlamaGen tokenizer '{name}'; choose from: {', '.join(LLAMAGEN_CONFIGS)}")
    expected = f"LlamaGen's {CHECKPOINT_FILES[name]} ({CHECKPOINT_URL.format(CHECKPOINT_FILES[name])})"
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
        checkpoint = files.load_torch(ckpt_path, expected)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("kind"), str):  # one of this repo's own files
        raise ValueError(f"{ckpt_path}: a checkpoint of kind {checkpoint['kind']!r}; expected {expected}")
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{ckpt_path}: expected a state dict of tensors, or one under 'model', as in {expected}")
    check_state_dict(name, {k: tuple(v.shape) for k, v in state.items()}, ckpt_path)

    with torch.device("meta"):
        model = LlamaGenVQ(**LLAMAGEN_CONFIGS[name])
    model.load_state_dict(state, assign=True)
    return model.float().to(device).eval().requires_grad_(False)
