"""
A trained flow: what a train.py checkpoint holds, the model and objective it describes, and images from it.

    CHECKPOINT/last.pt = {format, model, ema, opt, scaler, step, args, codebook, codes_meta, data, rng}

`model` and `ema` are the raw module's state dicts (no `module.` or `_orig_mod.` prefixes); `args` are
train.py's arguments, `codebook` the (K, d) codebook of the codes as the tokenizer uses it, `codes_meta` the
code set's meta.json (grid, classes, tokenizer), `data` and `rng` every rank's position and random state.

Images are drawn in batches of a fixed size; batch b starts from the noise of a generator seeded with
`batch_seed(seed, b)`, so sample i depends only on the seed and i, never on how many processes drew it.
"""

import numpy as np
import torch

import files
import images
import tokenizers
import vfm
from dit import build_dit

CHECKPOINT_FORMAT = "purrception-flow/1"
CHECKPOINT_KEYS = ("model", "ema", "opt", "scaler", "step", "args", "codebook", "codes_meta", "data", "rng")


def build(model_name, objective_name, codebook, grid, num_classes, p_uncond=vfm.P_UNCOND,
          z_loss_weight=vfm.Z_LOSS_WEIGHT, codebook_scale="raw", time_dist="uniform"):
    """(model, objective): the objective and the DiT sized for it, logits over K (Purrception, DFM) or d
    channels (CFM, CFM-endpoint)."""
    if grid[0] != grid[1]:
        raise ValueError(f"the DiT wants a square code grid, got {grid[0]} x {grid[1]}")
    objective = vfm.build_objective(objective_name, codebook, num_classes, p_uncond=p_uncond,
                                    z_loss_weight=z_loss_weight, codebook_scale=codebook_scale,
                                    time_dist=time_dist)
    model = build_dit(model_name, grid_size=grid[0], num_classes=num_classes, **objective.model_io())
    return model, objective


def load_checkpoint(path):
    """A checkpoint written by train.py, or FileNotFoundError / ValueError naming the file."""
    expected = f"a checkpoint of train.py (format {CHECKPOINT_FORMAT!r})"
    ckpt = files.load_torch(path, expected, weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not {expected}")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} in it; expected {expected}")
    return ckpt


def check_weights(path, weights, model, args):
    """ValueError naming `path` when a checkpoint's state dict does not fit the model its args describe."""
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if {k: tuple(v.shape) for k, v in weights.items()} != wanted:
        old_dfm = (" (a DFM checkpoint from before its tokens were embedded straight into the model width, which "
                   "this version cannot load)" if args["objective"] == "dfm" else "")
        raise ValueError(f"{path}: its weights do not fit {args['model']} for {args['objective']}{old_dfm}")


def trained_args(args):
    """A checkpoint's train.py args, with what checkpoints from before an option did in its place: they ran on
    E / rms(E) (codebook_scale) and drew t uniformly (time_dist)."""
    return dict(dict(codebook_scale="rms", time_dist="uniform"), **args)


def batch_seed(seed, b):
    """The seed of batch b's generator."""
    return seed * 1_000_003 + b


def sample_labels(n, num_classes):
    """Labels 0, 1, ..., num_classes - 1, 0, 1, ... (all the null class, 0 here, for an unconditional model)."""
    return np.arange(n) % num_classes if num_classes else np.zeros(n, dtype=np.int64)


def preview_labels(num_classes, per_class, max_classes=10):
    """`per_class` labels of each of the first classes, for a picture with a row per class."""
    if num_classes == 0:
        return np.zeros(per_class * 4, dtype=np.int64)
    return np.repeat(np.arange(min(num_classes, max_classes)), per_class)


@torch.no_grad()
def generate(model, objective, tokenizer, labels, grid, seed, steps=100, solver="euler", temperature=1.0,
             cfg_scale=1.0, cfg_interval=(0.0, 1.0), device="cpu", couplings=False):
    """Images uint8 (B, H, W, C) for labels (B,); the noise comes from a generator seeded with `seed`.
    couplings=True: (images, codes (B, *S), noise z0 (B, *S, d)), the same images with the grids they decode and
    the noise the sampler started from (a continuous flow only)."""
    g = torch.Generator(device).manual_seed(seed)
    y = torch.as_tensor(labels, device=device) if objective.num_classes else None
    z0 = objective.noise((len(labels), *grid), g) if couplings else None  # what sample() would draw first
    codes = objective.sample(model, (len(labels), *grid), y=y, steps=steps, solver=solver,
                             temperature=temperature, cfg_scale=cfg_scale, cfg_interval=cfg_interval, generator=g,
                             z0=z0)
    pictures = images.to_uint8(tokenizer.decode(codes))
    return (pictures, codes, z0) if couplings else pictures


class Flow:
    """A train.py checkpoint ready to sample: model (EMA weights unless use_ema=False) in eval mode, objective,
    tokenizer, code-set meta, step and training args."""

    def __init__(self, path, device="cpu", use_ema=True, tokenizer=None, tokenizer_ckpt=None):
        ckpt = load_checkpoint(path)
        self.path, self.device, self.step, self.args = path, device, ckpt["step"], trained_args(ckpt["args"])
        self.meta, self.codebook = ckpt["codes_meta"], ckpt["codebook"]
        self.grid, self.num_classes = tuple(self.meta["grid"]), self.meta["num_classes"]
        self.model, self.objective = build(self.args["model"], self.args["objective"], self.codebook, self.grid,
                                           self.num_classes, self.args["p_uncond"], self.args["z_loss"],
                                           self.args["codebook_scale"], self.args["time_dist"])
        weights = ckpt["ema" if use_ema else "model"]
        check_weights(path, weights, self.model, self.args)
        self.model.load_state_dict(weights)
        self.model.to(device).eval()
        self.objective.to(device)
        self.tokenizer = tokenizers.load_for_codes(self.meta, self.codebook, device, tokenizer, tokenizer_ckpt)

    name = property(lambda self: self.args["objective"])
    dataset = property(lambda self: self.meta.get("dataset", "unknown"))

    def generate(self, labels, seed, batch, batch_size, **settings):
        """Images uint8 of batch `batch` of size `batch_size` among samples with these labels."""
        lo, hi = batch * batch_size, min((batch + 1) * batch_size, len(labels))
        return generate(self.model, self.objective, self.tokenizer, labels[lo:hi], self.grid,
                        batch_seed(seed, batch), device=self.device, **settings)

    def sample(self, n, seed=0, batch_size=250, **settings):
        """(images uint8 (n, H, W, C), labels (n,)): what `python sample.py --seed S --batch-size B` draws."""
        labels = sample_labels(n, self.num_classes)
        batches = range((n + batch_size - 1) // batch_size)
        parts = [self.generate(labels, seed, b, batch_size, **settings) for b in batches]
        return np.concatenate(parts), labels
