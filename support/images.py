"""
Images as this repo passes them around, and pictures of them.

Two layouts, one conversion each way:
  * float (B, C, H, W) in [-1, 1]: what tokenizers encode and decode (pixel / 127.5 - 1);
  * uint8 (B, H, W, C): what is saved, scored and shown (the layout of the FID evaluators' .npz files).
"""

import numpy as np
import torch
from PIL import Image

from support import files


def to_uint8(images):
    """(B, C, H, W) floats in [-1, 1] -> (B, H, W, C) uint8 numpy."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, C, H, W)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)


def to_float(images):
    """uint8 (B, H, W) or (B, H, W, C) -> float (B, C, H, W) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images)).float()
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # (B, C, H, W)
    return x.div(127.5).sub(1).clone(memory_format=torch.contiguous_format)  # NCHW strides, even for C = 1


def image_grid(images, nrow, scale=None, pad=2):
    """uint8 (B, H, W, C) images as one PIL image, `nrow` images a row on a white ground; small images are
    enlarged (to at least 64 pixels, or by `scale`) with nearest-neighbour pixels."""
    B, H, W, C = images.shape
    rows = (B + nrow - 1) // nrow
    canvas = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, C), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, nrow)
        canvas[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = image
    picture = Image.fromarray(canvas[..., 0] if C == 1 else canvas)
    scale = scale or max(1, 64 // H)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture


def save_grid(images, path, nrow, scale=None):
    """image_grid as a PNG file, written atomically."""
    save_picture(image_grid(images, nrow, scale), path)


def save_picture(picture, path):
    """A PIL image as a PNG file, written atomically."""
    files.atomic_write(path, lambda f: picture.save(f, format="PNG"))


def shrink(images, factor):
    """uint8 (B, H, W, C) images `factor` times smaller, with a box filter."""
    B, H, W, C = images.shape
    size = (max(1, W // factor), max(1, H // factor))
    small = [np.asarray(Image.fromarray(im[..., 0] if C == 1 else im).resize(size, Image.BOX)) for im in images]
    return np.stack(small).reshape(B, size[1], size[0], C)


def sample_grid(images, labels, max_rows=8, max_columns=10, max_pixels=2000, pad=2):
    """A compact picture (PIL image) of samples uint8 (B, H, W, C) with labels (B,): the classes in the order
    first drawn, k samples of each side by side and g classes a row (k g <= max_columns), up to max_rows rows,
    in the layout that shows the most samples with no cell empty (then the widest, then the largest k). One
    class (an unconditional model) fills the rows with its samples. Tiles are halved while the picture would
    be wider or taller than max_pixels: 256-px images make 128-px tiles; small ones are enlarged as image_grid
    does."""
    labels = np.asarray(labels)
    _, first = np.unique(labels, return_index=True)
    groups = [images[labels == c] for c in labels[np.sort(first)]]
    if len(groups) == 1:
        n = len(images)
        columns = max(range(1, min(max_columns, n) + 1), key=lambda c: (c * min(max_rows, n // c), c))
        rows = min(max_rows, n // columns)
        picked = images[labels == labels[0]][:rows * columns]
    else:
        fewest = min(len(group) for group in groups)
        _, columns, k, g = max((k * g * min(max_rows, len(groups) // g), k * g, k, g)
                               for k in range(1, min(max_columns, fewest) + 1)
                               for g in range(1, min(max_columns // k, len(groups)) + 1))
        rows = min(max_rows, len(groups) // g)
        picked = np.concatenate([group[:k] for group in groups[:rows * g]])
    H, W, factor = picked.shape[1], picked.shape[2], 1
    while max(columns * (W // factor + pad), rows * (H // factor + pad)) + pad > max_pixels and min(H, W) > factor:
        factor *= 2
    return image_grid(shrink(picked, factor) if factor > 1 else picked, columns, pad=pad)


def class_grid(images, labels, per_row=10, max_classes=10):
    """(per_row * classes, H, W, C): up to `per_row` images of each of the first classes, a row per class,
    short rows filled with white."""
    rows = []
    for c in np.unique(labels)[:max_classes]:
        pick = images[labels == c][:per_row]
        if len(pick) < per_row:
            pick = np.concatenate([pick, np.full((per_row - len(pick), *images.shape[1:]), 255, np.uint8)])
        rows.append(pick)
    return np.concatenate(rows)
