"""
Every tokenizer this repo can load, by name, and the check that a flow and its tokenizer share one codebook.

A tokenizer is a frozen module with `codebook` (K, d), `encode(images (B, C, H, W) in [-1, 1]) -> codes (B, h, w)`
and `decode(codes) -> images`. It is named either by the path of a checkpoint written by `python tokenizer.py train`
(vq.py), or by a key of TOKENIZERS together with the path of its published weights (llamagen.py, ldm_vq.py).
A code set's meta.json records which one made it (`record`), so sample.py can decode its codes again.
"""

import os

import torch

import vq
from support import files, ldm_vq, llamagen

MNIST_KIND = "mnist-vq"  # the "kind" of a checkpoint written by `python tokenizer.py train`


def mnist_checkpoint(model, **extra):
    """What `python tokenizer.py train` saves: the kind, the constructor's config and the weights."""
    return dict(kind=MNIST_KIND, config=model.config, model=model.state_dict(), **extra)


def load_mnist_vq(path, device="cpu"):
    """A tokenizer written by `python tokenizer.py train`, frozen, in eval mode; ValueError naming the file
    otherwise."""
    expected = f"a tokenizer written by `python tokenizer.py train` (kind {MNIST_KIND!r})"
    ckpt = files.load_torch(path, expected)
    kind = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if kind != MNIST_KIND or not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("config"), dict):
        raise ValueError(f"{path}: checkpoint of kind {kind!r}; expected {expected}")
    config = ckpt["config"]
    positive_int = lambda x: isinstance(x, int) and x > 0
    if (set(config) != {"num_codes", "code_dim", "channels"} or not positive_int(config["num_codes"])
            or not positive_int(config["code_dim"]) or not isinstance(config["channels"], (list, tuple))
            or len(config["channels"]) != 3 or not all(map(positive_int, config["channels"]))):
        raise ValueError(f"{path}: config {config}; expected num_codes, code_dim and 3 channels, positive integers")
    model = vq.MnistVQ(**config)
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) if torch.is_tensor(v) else None for k, v in ckpt["model"].items()}
    if found != wanted:
        bad = sorted(set(wanted) ^ set(found)) or [k for k in wanted if wanted[k] != found[k]]
        raise ValueError(f"{path}: weights do not fit its config (first mismatch: {bad[0]})")
    if not all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()):
        raise ValueError(f"{path}: its weights are not all finite numbers (a run that diverged); train it again "
                         f"with a lower --lr")
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval().requires_grad_(False)


TOKENIZERS = {
    MNIST_KIND: lambda ckpt, device: load_mnist_vq(ckpt, device),
    "llamagen-vq16": lambda ckpt, device: llamagen.load_llamagen("llamagen-vq16", ckpt, device),  # vq_ds16_c2i.pt
    "llamagen-vq8": lambda ckpt, device: llamagen.load_llamagen("llamagen-vq8", ckpt, device),  # vq_ds8_c2i.pt
    "ldm-vq8": lambda ckpt, device: ldm_vq.load_ldm("ldm-vq8", ckpt, device),  # latent-diffusion's vq-f8 model.ckpt
}
PRETRAINED = tuple(name for name in TOKENIZERS if name != MNIST_KIND)


def load(path, ckpt=None, device="cpu"):
    """A frozen tokenizer in eval mode: `path` is a checkpoint of `tokenizer.py train`, or a name in TOKENIZERS whose
    weights are at `ckpt`."""
    if path in TOKENIZERS:
        if ckpt is None:
            raise ValueError(f"tokenizer '{path}' needs the path of its weights (--tokenizer-ckpt)")
        return TOKENIZERS[path](ckpt, device)
    if ckpt is not None:
        raise ValueError(f"{path}: a checkpoint of `tokenizer.py train` holds its own weights; a separate checkpoint "
                         f"({ckpt}) goes only with a tokenizer name: {', '.join(PRETRAINED)}")
    return load_mnist_vq(path, device)


def record(path, ckpt=None):
    """What a code set's meta.json stores to find its tokenizer again."""
    if path in TOKENIZERS:
        return {"kind": path, "name": path, "ckpt": os.path.abspath(ckpt)}
    return {"kind": MNIST_KIND, "path": os.path.abspath(path)}


def check_codebook(expected, found, where):
    """ValueError unless the two (K, d) codebooks are the same."""
    expected, found = torch.as_tensor(expected).float().cpu(), torch.as_tensor(found).float().cpu()
    if expected.shape != found.shape:
        raise ValueError(f"{where}: its codebook {tuple(found.shape)} does not match the codebook "
                         f"{tuple(expected.shape)} of the codes")
    if not torch.allclose(expected, found):
        raise ValueError(f"{where}: its codebook does not match the codebook of the codes (the same shape "
                         f"{tuple(found.shape)}, other vectors: another tokenizer)")


def load_for_codes(meta, codebook, device="cpu", path=None, ckpt=None):
    """The tokenizer named in a code set's meta (or the one at `path`), checked against the codes' codebook."""
    info = meta.get("tokenizer")
    info = info if isinstance(info, dict) else {}
    name = path or info.get("path") or info.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("the code set's meta.json names no tokenizer; give the tokenizer's path (--tokenizer)")
    tokenizer = load(name, ckpt=ckpt or info.get("ckpt"), device=device)
    check_codebook(codebook, tokenizer.codebook.detach(), f"tokenizer {name}")
    return tokenizer
