"""
Stand-ins for ImageNet and LlamaGen's tokenizer, to run the tier-3 commands end to end where neither is at hand
(experiments/gpu_check.sh): an ImageFolder tree of random JPEGs and a LlamaGen VQ checkpoint of random weights.

    python experiments/random_imagenet.py --out W --classes 1000 --images-per-class 1     # W/imgs, W/vq_ds8_c2i.pt
    python tokenizer.py encode --tokenizer llamagen-vq8 --tokenizer-ckpt W/vq_ds8_c2i.pt --dataset imagefolder \\
        --data-dir W/imgs --out W/codes

The tree is OUT/imgs/nNNNNNNNN/I.JPEG (ImageNet's layout), each image uniform noise of --height x --width. The
checkpoint is what LlamaGen publishes, {"model": state dict}, of a LlamaGenVQ of the named configuration
initialised at random: the codes, losses and samples it gives mean nothing; what runs, and how fast, does.
"""

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from support.cli import UserError, check_positive, make_dir, run_command
from support.llamagen import CHECKPOINT_FILES, LLAMAGEN_CONFIGS, LlamaGenVQ


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="A random ImageFolder tree and a random-weight LlamaGen VQ checkpoint.")
    p.add_argument("--out", required=True, help="writes OUT/imgs and OUT/vq_ds8_c2i.pt (or vq_ds16_c2i.pt)")
    p.add_argument("--classes", type=int, default=16, help="class folders")
    p.add_argument("--images-per-class", type=int, default=8)
    p.add_argument("--height", type=int, default=288, help="image height (pixels)")
    p.add_argument("--width", type=int, default=272, help="image width (pixels)")
    p.add_argument("--tokenizer", default="llamagen-vq8", choices=list(LLAMAGEN_CONFIGS))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build(args):
    check_positive(args, "classes", "images_per_class", "height", "width")
    root = os.path.join(args.out, "imgs")
    if os.path.exists(root):
        raise UserError(f"{root} exists; choose another --out")
    rng = np.random.default_rng(args.seed)
    for c in range(args.classes):
        folder = os.path.join(root, f"n{c:08d}")
        make_dir(folder)
        for i in range(args.images_per_class):
            pixels = rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i}.JPEG"), format="JPEG", quality=90)
    torch.manual_seed(args.seed)
    ckpt = os.path.join(args.out, CHECKPOINT_FILES[args.tokenizer])
    torch.save({"model": LlamaGenVQ(**LLAMAGEN_CONFIGS[args.tokenizer]).state_dict()}, ckpt)
    print(f"{args.classes} x {args.images_per_class} random {args.height} x {args.width} JPEGs in {root}; "
          f"random {args.tokenizer} weights in {ckpt}")


def main(argv=None):
    run_command(build, parse_args(argv))


if __name__ == "__main__":
    main()
