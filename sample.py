"""
Sample images from a trained flow: a PNG grid (a row per class) and an .npz for the FID evaluators.

    python sample.py --ckpt runs/fmnist-flow/checkpoints/last.pt --num-samples 1000 --temperature 1.0 \\
        --cfg-scale 1.5 --steps 100 --solver euler --out runs/fmnist-samples
    torchrun --nproc_per_node=8 sample.py --ckpt ... --num-samples 50000 --out ...   # data-parallel

OUT/samples.npz holds `arr_0`, uint8 N x H x W x C (the layout the standard FID evaluators read), `labels`
(the class each sample was conditioned on) and `settings` (every sampling setting, as JSON, also written to
OUT/settings.json). The EMA weights are used unless --no-ema. Sample i depends only on --seed and i, not on
the number of processes: under torchrun each rank draws its share of the batches and rank 0 writes exactly N.
"""

import argparse
import json
import os
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import vfm
from data import UserError, run_command
from train import build, check_codebook, load_checkpoint, setup_distributed


# ----------------------------------------------------------------------------------------------------------
# Loading a run
# ----------------------------------------------------------------------------------------------------------

def load_codes_tokenizer(meta, codebook, device, path=None, ckpt=None):
    """The tokenizer named in a code set's meta (or the one at `path`), checked against the flow's codebook."""
    import vq
    info = meta.get("tokenizer") or {}
    name = path or info.get("path") or info.get("name", "")
    tokenizer = vq.load_tokenizer(name, ckpt=ckpt or info.get("ckpt"), device=device)
    check_codebook(codebook.float().cpu(), tokenizer.codebook.detach().float().cpu(), f"tokenizer {name}")
    return tokenizer


def load_flow(ckpt_path, device, use_ema=True):
    """(model, objective, checkpoint) from a train.py checkpoint, in eval mode."""
    ckpt = load_checkpoint(ckpt_path)
    meta = ckpt["codes_meta"]
    args = ckpt["args"]
    model, objective = build(args["model"], args["objective"], ckpt["codebook"], meta["grid"],
                             meta["num_classes"], args["p_uncond"], args["z_loss"])
    try:
        model.load_state_dict(ckpt["ema" if use_ema else "model"])
    except RuntimeError as e:
        raise UserError(f"{ckpt_path}: weights do not fit {args['model']} ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), objective.to(device), ckpt


# ----------------------------------------------------------------------------------------------------------
# Generating
# ----------------------------------------------------------------------------------------------------------

def grid_labels(num_classes, per_class, max_classes=10):
    """Labels for a preview grid: `per_class` samples of each of the first classes (the null class if none)."""
    if num_classes == 0:
        return torch.zeros(per_class * 4, dtype=torch.long)
    return torch.arange(min(num_classes, max_classes)).repeat_interleave(per_class)


def to_uint8(images):
    """(B, C, H, W) floats in [-1, 1] -> (B, H, W, C) uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate(model, objective, tokenizer, labels, grid, steps=100, solver="euler", temperature=1.0,
             cfg_scale=1.0, seed=0, device="cpu"):
    """Images (B, H, W, C) uint8 for the given labels; the noise comes from a generator seeded with `seed`."""
    g = torch.Generator(device).manual_seed(seed)
    y = labels.to(device) if objective.num_classes else None
    codes = objective.sample(model, (len(labels), *grid), y=y, steps=steps, solver=solver,
                             temperature=temperature, cfg_scale=cfg_scale, generator=g)
    return to_uint8(tokenizer.decode(codes))


def save_grid(images, path, nrow, scale=None):
    """Save uint8 (B, H, W, C) images as one PNG, `nrow` images a row; small images are enlarged."""
    B, H, W, C = images.shape
    rows = (B + nrow - 1) // nrow
    canvas = np.full((rows * (H + 2) + 2, nrow * (W + 2) + 2, C), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        canvas[2 + r * (H + 2): 2 + r * (H + 2) + H, 2 + c * (W + 2): 2 + c * (W + 2) + W] = img
    picture = Image.fromarray(canvas[..., 0] if C == 1 else canvas)
    scale = scale or max(1, 64 // H)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    tmp = path + ".tmp.png"
    picture.save(tmp)
    os.replace(tmp, path)


def class_grid(images, labels, per_row=10, max_classes=10):
    """Pick up to `per_row` samples of each of the first classes: a row per class."""
    rows = []
    for c in np.unique(labels)[:max_classes]:
        pick = images[labels == c][:per_row]
        if len(pick) < per_row:
            pick = np.concatenate([pick, np.full((per_row - len(pick), *images.shape[1:]), 255, np.uint8)])
        rows.append(pick)
    return np.concatenate(rows)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def sample(args):
    rank, world, device = setup_distributed()
    try:
        _sample(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _sample(args, rank, world, device):
    model, objective, ckpt = load_flow(args.ckpt, device, use_ema=not args.no_ema)
    meta = ckpt["codes_meta"]
    tokenizer = load_codes_tokenizer(meta, ckpt["codebook"], device, args.tokenizer, args.tokenizer_ckpt)
    if ckpt["args"]["objective"] == "dfm" and args.solver != "euler":
        raise UserError(f"{args.ckpt}: a DFM model samples with its discrete Euler step only, not --solver {args.solver}")
    vfm.parse_temperature(args.temperature)  # fail early on a bad spec
    num_classes = meta["num_classes"]
    labels = (np.arange(args.num_samples) % num_classes) if num_classes else np.zeros(args.num_samples, np.int64)
    settings = dict(ckpt=os.path.abspath(args.ckpt), step=ckpt["step"], weights="model" if args.no_ema else "ema",
                    objective=ckpt["args"]["objective"], model=ckpt["args"]["model"],
                    num_samples=args.num_samples, temperature=args.temperature, cfg_scale=args.cfg_scale,
                    steps=args.steps, solver=args.solver, seed=args.seed, batch_size=args.batch_size,
                    nfe=vfm.num_evaluations(args.steps, args.solver) * (2 if args.cfg_scale not in (0, 1) else 1))
    parts = os.path.join(args.out, ".parts")
    if rank == 0:
        os.makedirs(parts, exist_ok=True)
    if world > 1:
        dist.barrier()
    num_batches = (args.num_samples + args.batch_size - 1) // args.batch_size
    mine = list(range(rank, num_batches, world))  # batch b covers samples [b * B, (b + 1) * B), seed (seed, b)
    start = time.time()
    for b in tqdm(mine, disable=rank != 0, desc=f"sampling ({world} process(es))"):
        lo, hi = b * args.batch_size, min((b + 1) * args.batch_size, args.num_samples)
        images = generate(model, objective, tokenizer, torch.from_numpy(labels[lo:hi]), tuple(meta["grid"]),
                          args.steps, args.solver, args.temperature, args.cfg_scale,
                          seed=args.seed * 1_000_003 + b, device=device)
        np.save(os.path.join(parts, f"batch-{b:06d}.tmp.npy"), images)
        os.replace(os.path.join(parts, f"batch-{b:06d}.tmp.npy"), os.path.join(parts, f"batch-{b:06d}.npy"))
    if world > 1:
        dist.barrier()
    if rank != 0:
        return
    images = np.concatenate([np.load(os.path.join(parts, f"batch-{b:06d}.npy")) for b in range(num_batches)])
    settings["seconds"] = round(time.time() - start, 2)
    settings["seconds_per_sample"] = round(settings["seconds"] * world / args.num_samples, 4)
    npz = os.path.join(args.out, "samples.npz")
    kw = dict(labels=labels) if num_classes else {}
    with open(npz + ".tmp", "wb") as f:
        np.savez(f, arr_0=images, settings=json.dumps(settings), **kw)
    os.replace(npz + ".tmp", npz)
    with open(os.path.join(args.out, "settings.json"), "w") as f:
        json.dump(settings, f, indent=2)
    save_grid(class_grid(images, labels), os.path.join(args.out, "grid.png"), nrow=10)
    shutil.rmtree(parts)
    print(f"{len(images)} samples {images.shape[1:]} in {settings['seconds']:.1f} s -> {npz}, "
          f"{os.path.join(args.out, 'grid.png')}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample a trained flow into a PNG grid and an FID-ready .npz.")
    p.add_argument("--ckpt", required=True, help="a checkpoint of train.py (RUN/checkpoints/last.pt)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--temperature", default="1.0",
                   help="softmax temperature: a number, 'linear:T0:T1' or 'cosine:T0:T1' over t")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale s: uncond + s (cond - uncond)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--solver", default="euler", choices=vfm.SOLVERS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--tokenizer", help="the tokenizer to decode with, if it moved since the codes were written")
    p.add_argument("--tokenizer-ckpt", help="its weights, for a pretrained tokenizer named by --tokenizer")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.steps < 1 or args.batch_size < 1:
        p.error("--num-samples, --steps and --batch-size must be >= 1")
    try:
        vfm.parse_temperature(args.temperature)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    run_command(sample, args)


if __name__ == "__main__":
    main()
