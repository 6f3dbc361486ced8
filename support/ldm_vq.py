"""
latent-diffusion's VQ-f8 image tokenizer: taming-transformers' VQGAN autoencoder with a 16,384 x 4 codebook,
loadable from the published first-stage checkpoint. A second pretrained tokenizer family beside LlamaGen's.

Sources: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (arXiv 2112.10752) and
its repository github.com/CompVis/latent-diffusion (models/first_stage_models/vq-f8/config.yaml,
ldm/models/autoencoder.py VQModel, ldm/modules/diffusionmodules/model.py Encoder and Decoder), which builds on
taming-transformers (Esser et al., arXiv 2012.09841; github.com/CompVis/taming-transformers,
taming/modules/diffusionmodules/model.py and taming/modules/vqvae/quantize.py VectorQuantizer2).

Checkpoint (latent-diffusion's README, "Pretrained Autoencoding Models", f=8, VQ (Z=16384, d=4)):
    ldm-vq8   model.ckpt, unzipped from https://ommer-lab.com/files/latent-diffusion/vq-f8.zip
              8x downsampling   256 x 256 image -> 32 x 32 codes
It is a PyTorch Lightning checkpoint: the weights are under checkpoint["state_dict"], beside the training loss's
own weights ("loss.": LPIPS and the discriminator, dropped here), optimizer states and Lightning's bookkeeping.

Images are float (B, 3, H, W) in [-1, 1] (pixel / 127.5 - 1), H and W multiples of 8.

Architecture (vq-f8/config.yaml: ch 128, ch_mult [1, 2, 2, 4], num_res_blocks 2, attn_resolutions [32],
resolution 256, z_channels 4, double_z false, embed_dim 4, n_embed 16384, dropout 0; GroupNorm(32 groups, eps 1e-6),
SiLU, all convs 3 x 3 unless noted). The res, attention and resampling blocks are the same as LlamaGen's (both
come from taming's model.py), so they are imported from support/llamagen.py; the containers and their key names
are taming's.
---------------------------------------------------------------------------------------------------------
Encoder  conv_in 3 -> ch
         one level per entry of ch_mult (encoder.down.i), ch * ch_mult[i] channels, 2 res blocks each; a level
         whose resolution is in attn_resolutions puts an attention block after every res block; every level but
         the last ends in a stride-2 downsampling conv
         mid: block_1 (res), attn_1, block_2 (res)
         GroupNorm, SiLU, conv_out -> z_channels (double_z false: not 2 * z_channels)
quant_conv (1 x 1) z_channels -> embed_dim, nearest code by Euclidean distance
post_quant_conv (1 x 1) embed_dim -> z_channels
Decoder  conv_in z_channels -> ch * ch_mult[-1]
         mid: block_1, attn_1, block_2
         the levels from the lowest resolution up, 3 res blocks each (num_res_blocks + 1), attention after every
         res block where the resolution is in attn_resolutions; every level but the highest-resolution one ends
         in a 2x nearest-neighbour upsampling followed by a conv
         GroupNorm, SiLU, conv_out -> 3

Details the published checkpoint depends on:
* "Resolution" is the configured 256 halved per level, not the input's size: with attn_resolutions [32] only the
  last encoder level (256 / 8 = 32) and the first decoder level have attention, whatever size is encoded.
* The decoder's levels are stored highest resolution first (taming prepends each new one): decoder.up.0 is the
  ch * ch_mult[0] level, decoder.up.3 the ch * ch_mult[-1] one with the attention blocks, and the upsampling
  convs live in decoder.up.1 .. decoder.up.3. (LlamaGen stores them the other way round.)
* The encoder has no time embedding (temb_ch 0), so the res blocks hold no temb_proj; dropout 0 holds no weights.
* The codes are not normalised: the nearest code is argmin ||z - e||^2 over the raw codebook (VectorQuantizer2,
  remap None, so no "used" buffer), and the decoder is fed the raw code vector.

The flow and the codebook scale
-------------------------------
`LdmVQ.codebook` is the raw (K, 4) codebook, the vectors the lookup and the decoder use. train.py runs the flow on
it as it is by default; `--codebook-scale rms` runs it on E / rms(E). Snapping to the nearest code is unchanged by
a global scale, so the tokenizer's own codebook is never modified.
"""

import contextlib
import pickle
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from support import files
from support.llamagen import AttnBlock, Downsample, ResBlock, Upsample, check_layout, group_norm

LDM_CONFIGS = {
    "ldm-vq8": dict(ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(32,), resolution=256,
                    z_channels=4, embed_dim=4, n_embed=16384),
}
CHECKPOINT_FILES = {"ldm-vq8": "vq-f8/model.ckpt"}  # as latent-diffusion lays out models/first_stage_models/
CHECKPOINT_URLS = {"ldm-vq8": "https://ommer-lab.com/files/latent-diffusion/vq-f8.zip"}
TRAINING_ONLY = "loss."  # the Lightning state dict's VQLPIPSWithDiscriminator weights: not part of the tokenizer
LOOKUP_CHUNK = 1024  # latent vectors compared with the whole codebook at once: a (1024, K) distance matrix

# PyTorch Lightning 1.x (latent-diffusion pins 1.4.2) keys checkpoint["callbacks"] by the callback's class, so the
# pickle names this class without building it. The name loads as a stand-in; anything else pickled is refused.
MODEL_CHECKPOINT = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


# ---- Encoder and decoder, with taming's key names --------------------------------------------------------

class Level(nn.Module):
    """One resolution: res blocks `block`, each followed by `attn` when attention is on, then a resampler."""

    def __init__(self, in_channels, out_channels, num_blocks, attention, resample=None):
        super().__init__()
        self.block = nn.ModuleList(ResBlock(in_channels if i == 0 else out_channels, out_channels)
                                   for i in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks if attention else 0))
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels)
        self.resample = resample

    def forward(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[i](x)
        if self.resample == "down":
            x = self.downsample(x)
        elif self.resample == "up":
            x = self.upsample(x)
        return x


class Middle(nn.Module):
    """The bottleneck of both halves: block_1 (res), attn_1, block_2 (res)."""

    def __init__(self, channels):
        super().__init__()
        self.block_1 = ResBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, z_channels, H / ds, W / ds) with ds = 2 ** (len(ch_mult) - 1)."""

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels):
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(3, ch, kernel_size=3, padding=1)
        widths = [ch] + [ch * m for m in ch_mult]  # input width of level i is widths[i], output widths[i + 1]
        self.down = nn.ModuleList(
            Level(widths[i], widths[i + 1], num_res_blocks, attention=(resolution >> i) in attn_resolutions,
                  resample="down" if i < n - 1 else None)
            for i in range(n))
        self.mid = Middle(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], z_channels, kernel_size=3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)  # level i: (B, ch * ch_mult[i], H / 2^(i+1), W / 2^(i+1)), the last one not halved
        h = self.mid(h)  # (B, ch * ch_mult[-1], h, w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z_channels, h, w)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h * ds, w * ds). Runs from the lowest resolution up; `up` is stored the
    other way, up[0] being the highest resolution."""

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels):
        super().__init__()
        n = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)
        self.mid = Middle(block_in)
        up = []
        for i in reversed(range(n)):  # i = n - 1 (lowest resolution) first, as taming builds them
            block_out = ch * ch_mult[i]
            up.insert(0, Level(block_in, block_out, num_res_blocks + 1,
                               attention=(resolution >> i) in attn_resolutions, resample="up" if i > 0 else None))
            block_in = block_out
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, kernel_size=3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))  # (B, ch * ch_mult[-1], h, w)
        for level in reversed(self.up):
            h = level(h)  # up[i]: ch * ch_mult[i] channels; H, W doubled after every level but up[0]
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, h * ds, w * ds)


# ---- Quantizer: nearest code by Euclidean distance -------------------------------------------------------

class VectorQuantizer(nn.Module):
    """The codebook (K, d), used as stored."""

    def __init__(self, n_embed, embed_dim):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def lookup(self, z):
        """(..., d) latent vectors -> (...) index of the nearest code, argmin_k ||z - e_k||^2.

        The distance is computed as VectorQuantizer2 computes it, (||z||^2 + ||e_k||^2) - 2 <z, e_k> in float32,
        and argmin takes the first of equal values: ||z||^2 is the same for every code, yet adding it rounds, so
        it decides near-ties as upstream does.
        """
        codebook = self.embedding.weight  # (K, d)
        code_norms = codebook.pow(2).sum(dim=1)  # ||e_k||^2, (K,)
        flat = z.reshape(-1, z.shape[-1])  # (N, d)
        indices = torch.cat([(chunk.pow(2).sum(dim=1, keepdim=True) + code_norms - 2 * (chunk @ codebook.T))
                             .argmin(dim=1) for chunk in flat.split(LOOKUP_CHUNK)])  # (N,)
        return indices.view(z.shape[:-1])


# ---- The tokenizer ---------------------------------------------------------------------------------------

class LdmVQ(nn.Module):
    """images (B, 3, H, W) in [-1, 1] <-> code indices (B, H / ds, W / ds) into a (K, d) codebook."""

    def __init__(self, ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(32,), resolution=256,
                 z_channels=4, embed_dim=4, n_embed=16384):
        super().__init__()
        shape = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                     resolution=resolution, z_channels=z_channels)
        self.encoder = Encoder(**shape)
        self.decoder = Decoder(**shape)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        self.downsample = 2 ** (len(ch_mult) - 1)

    @property
    def codebook(self):
        """(K, d) the codebook as stored: the vectors the lookup compares with and the decoder receives."""
        return self.quantize.embedding.weight.detach()

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
        z = self.codebook[codes].permute(0, 3, 1, 2)  # (B, d, h, w), the raw code vectors
        images = self.decoder(self.post_quant_conv(z))  # (B, 3, h * ds, w * ds)
        return images.clamp(-1, 1)


# ---- Loading the published checkpoint --------------------------------------------------------------------

def state_dict_shapes(name):
    """{key: shape} of the tokenizer `name`'s state dict, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in LdmVQ(**LDM_CONFIGS[name]).state_dict().items()}


def check_state_dict(name, found, where):
    """ValueError, naming `where`, unless `found` ({key: shape}) is the state dict of tokenizer `name`."""
    check_layout(state_dict_shapes(name), found, name, where, article="an")


class NamedOnly:
    """What MODEL_CHECKPOINT loads as. Never built: a pickled instance would need Lightning's code, so it is refused."""

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError(f"GLOBAL {MODEL_CHECKPOINT} is built, not only named")


def read_checkpoint(ckpt_path, expected):
    """torch.load without running pickled code: tensors, plain containers and numbers, and MODEL_CHECKPOINT as a
    name. ValueError naming the file, and the class where one was refused, otherwise."""
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; older ones refuse a Lightning 1.x file
    with allow([(NamedOnly, MODEL_CHECKPOINT)]) if allow else contextlib.nullcontext():
        try:
            return files.load_torch(ckpt_path, expected)
        except ValueError as e:  # load_torch keeps torch's own error as the context: it names a refused class
            refused = re.search(r"GLOBAL ([\w.]+)", str(e.__context__))
            if refused is None:
                raise
            raise ValueError(f"{ckpt_path}: holds a pickled {refused[1]}, refused (loading it could run code); "
                             f"expected {expected}") from None


def load_ldm(name, ckpt_path, device="cpu"):
    """The tokenizer `name` (a key of LDM_CONFIGS) with the weights of `ckpt_path`, frozen, in eval mode.

    Accepts the published Lightning checkpoint ({"state_dict": state_dict, ...}) or a bare state dict. The loss's
    "loss." weights are dropped; every other key must be the tokenizer's, with its shape. Raises FileNotFoundError
    or ValueError naming the file for a missing or unreadable file, a pickled object other than plain data,
    missing or unexpected keys, or a tensor of the wrong shape.
    """
    if name not in LDM_CONFIGS:
        raise ValueError(f"unknown latent-diffusion tokenizer '{name}'; choose from: {', '.join(LDM_CONFIGS)}")
    expected = f"latent-diffusion's {CHECKPOINT_FILES[name]} (unzipped from {CHECKPOINT_URLS[name]})"
    checkpoint = read_checkpoint(ckpt_path, expected)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("kind"), str):  # one of this repo's own files
        raise ValueError(f"{ckpt_path}: a checkpoint of kind {checkpoint['kind']!r}; expected {expected}")
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{ckpt_path}: expected a state dict of tensors under 'state_dict', as in {expected}")
    state = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY)}
    check_state_dict(name, {k: tuple(v.shape) for k, v in state.items()}, ckpt_path)

    with torch.device("meta"):
        model = LdmVQ(**LDM_CONFIGS[name])
    model.load_state_dict(state, assign=True)
    return model.float().to(device).eval().requires_grad_(False)
