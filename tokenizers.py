"""
Every tokenizer this repo can load, by name, and the check that a flow and its tokenizer share one codebook.

A tokenizer is a frozen module with `codebook` (K, d), `encode(images (B, C, H, W) in [-1, 1]) -> codes (B, h, w)`
and `decode(codes) -> images`. It is named either by the path of a checkpoint written by `python vq.py train`
(mnist_vq.py), or by a key of TOKENIZERS together with the path of its published weights (llamagen.py).
A code set's meta.json records which one made it (`record`), so sample.py can decode its codes again.
"""

import os

import torch

import llamagen
import mnist_vq

TOKENIZERS = {
    mnist_vq.KIND: lambda ckpt, device: mnist_vq.load(ckpt, device),
    "llamagen-vq16": lambda ckpt, device: llamagen.load_llamagen("llamagen-vq16", ckpt, device),  # vq_ds16_c2i.pt
    "llamagen-vq8": lambda ckpt, device: llamagen.load_llamagen("llamagen-vq8", ckpt, device),  # vq_ds8_c2i.pt
}
PRETRAINED = tuple(name for name in TOKENIZERS if name != mnist_vq.KIND)


def load(path, ckpt=None, device="cpu"):
    """A frozen tokenizer in eval mode: `path` is a checkpoint of `vq.py train`, or a name in TOKENIZERS whose
    weights are at `ckpt`."""
    if path in TOKENIZERS:
        if ckpt is None:
            raise ValueError(f"tokenizer '{path}' needs the path of its weights (--tokenizer-ckpt)")
        return TOKENIZERS[path](ckpt, device)
    if ckpt is not None:
        raise ValueError(f"{path}: a checkpoint of `vq.py train` holds its own weights; a separate checkpoint "
                         f"({ckpt}) goes only with a tokenizer name: {', '.join(PRETRAINED)}")
    return mnist_vq.load(path, device)


def record(path, ckpt=None):
    """What a code set's meta.json stores to find its tokenizer again."""
    if path in TOKENIZERS:
        return {"kind": path, "name": path, "ckpt": os.path.abspath(ckpt)}
    return {"kind": mnist_vq.KIND, "path": os.path.abspath(path)}


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
