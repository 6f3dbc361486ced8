"""
Sample images from a trained flow: a PNG grid (a row per class) and an .npz for the FID evaluators.

    python sample.py --ckpt runs/fmnist-flow/checkpoints/last.pt --num-samples 1000 --temperature 1.0 \\
        --cfg-scale 1.5 --steps 100 --solver euler --out runs/fmnist-samples
    torchrun --nproc_per_node=8 sample.py --ckpt ... --num-samples 50000 --out ...   # data-parallel

OUT/samples.npz holds `arr_0`, uint8 N x H x W x C (the layout the standard FID evaluators read), `labels`
(the class each sample was conditioned on) and `settings` (every sampling setting, as JSON, also written to
OUT/settings.json; its `nfe` counts network passes, two for a guided evaluation). The EMA weights are used
unless --no-ema. `--cfg-interval LO:HI` guides only the network evaluations with LO <= t <= HI, one
conditional pass elsewhere. `--couplings` also writes OUT/couplings, a code set of the grids drawn with the
noise z0 each started from: the fixed pairs a reflow student trains on (`python train.py --codes
OUT/couplings --init CKPT`, then sampled with `--steps 1`). Sample i depends only on --seed and i, not on
the number of processes (flows.py: batch b is seeded with batch_seed(seed, b)): under torchrun each rank draws
its share of the batches and rank 0 writes exactly N.
"""

import json
import os
import shutil
import sys
import time

import numpy as np
from tqdm import tqdm

import data
import distributed
import files
import flows
import images
import vfm
from cli import (ArgumentParser, UserError, check_finite, check_output_files, check_positive, check_seed, make_dir,
                 refuse_overwrite, run_command, user_errors)


def sample(args):
    check_positive(args, "num_samples", "steps", "batch_size")
    for name, most in (("steps", 100_000), ("num_samples", 100_000_000)):
        if getattr(args, name) > most:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected at most {most:,}")
    check_finite(args, "cfg_scale")
    check_seed(args)
    with user_errors():
        vfm.parse_temperature(args.temperature)
        args.cfg_interval = vfm.parse_cfg_interval(args.cfg_interval)
    make_dir(args.out)
    check_output_files(args.out, "samples.npz", "settings.json", "grid.png")
    for name in (".parts", "couplings", ".couplings.tmp"):
        path = os.path.join(args.out, name)
        if os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f"{path}: not a directory; move it away or choose another --out")
    if args.couplings and os.path.exists(os.path.join(args.out, "couplings")) and not args.force:
        raise UserError(f"{os.path.join(args.out, 'couplings')} exists: pass --force to replace it, or choose "
                        f"another --out")
    if not args.force:
        refuse_overwrite(os.path.join(args.out, "samples.npz"))
    with distributed.processes() as (rank, world, device):
        _sample(args, rank, world, device)


def _sample(args, rank, world, device):
    with user_errors():
        flow = flows.Flow(args.ckpt, device, use_ema=not args.no_ema, tokenizer=args.tokenizer,
                          tokenizer_ckpt=args.tokenizer_ckpt)
    if flow.name == "dfm" and args.solver != "euler":
        raise UserError(f"{args.ckpt}: a DFM model samples with its discrete Euler step only, not --solver "
                        f"{args.solver}")
    if flow.name == "dfm" and args.couplings:
        raise UserError(f"{args.ckpt}: a DFM model starts from masks, not noise, so it has no couplings to write")
    if not flow.num_classes and args.cfg_scale != 1 and rank == 0:
        print(f"--cfg-scale {args.cfg_scale} is ignored: {args.ckpt} was trained without labels, so there is "
              f"nothing to guide towards", file=sys.stderr)
    labels = flows.sample_labels(args.num_samples, flow.num_classes)
    settings = dict(ckpt=os.path.abspath(args.ckpt), step=flow.step, weights="model" if args.no_ema else "ema",
                    objective=flow.name, model=flow.args["model"], codebook_scale=flow.objective.codebook_scale,
                    num_samples=args.num_samples, temperature=args.temperature, cfg_scale=args.cfg_scale,
                    cfg_interval=list(args.cfg_interval), steps=args.steps, solver=args.solver, seed=args.seed,
                    batch_size=args.batch_size,
                    # network passes per sample: a guided evaluation is two
                    nfe=vfm.guided_evaluations(args.steps, args.solver, args.cfg_scale, args.cfg_interval,
                                               guidable=flow.num_classes > 0))

    # Every rank draws batches b = rank, rank + world, ... into OUT/.parts; rank 0 then packs them in order.
    parts = os.path.join(args.out, ".parts")
    if rank == 0:
        os.makedirs(parts, exist_ok=True)
        if args.couplings:  # replaced (--force): the old set goes now, so a run that fails leaves none, not a stale one
            shutil.rmtree(os.path.join(args.out, "couplings"), ignore_errors=True)
    distributed.barrier(world)
    num_batches = (args.num_samples + args.batch_size - 1) // args.batch_size
    start = time.time()
    try:
        for b in tqdm(range(rank, num_batches, world), disable=rank != 0, desc=f"sampling ({world} process(es))"):
            batch = flow.generate(labels, args.seed, b, args.batch_size, steps=args.steps, solver=args.solver,
                                  temperature=args.temperature, cfg_scale=args.cfg_scale,
                                  cfg_interval=args.cfg_interval, couplings=args.couplings)
            if args.couplings:
                batch, codes, noise = batch
                files.save_npy(os.path.join(parts, f"codes-{b:06d}.npy"), codes.cpu().numpy())
                files.save_npy(os.path.join(parts, f"noise-{b:06d}.npy"), noise.cpu().numpy())
            files.save_npy(os.path.join(parts, f"batch-{b:06d}.npy"), batch)
        distributed.barrier(world)
        if rank == 0:
            pack(args, flow, labels, settings, parts, num_batches, start, world)
            if args.couplings:
                pack_couplings(args, flow, labels, settings, parts, num_batches)
    finally:  # finished, failed or interrupted: the batches go (rank 0 removes them once every rank is done)
        if rank == 0:
            shutil.rmtree(parts, ignore_errors=True)
            shutil.rmtree(os.path.join(args.out, ".couplings.tmp"), ignore_errors=True)


def pack(args, flow, labels, settings, parts, num_batches, start, world):
    """samples.npz (the first N images, in order), settings.json and grid.png from the batches of every rank."""
    samples = np.concatenate([np.load(os.path.join(parts, f"batch-{b:06d}.npy")) for b in range(num_batches)])
    settings["seconds"] = round(time.time() - start, 2)
    settings["seconds_per_sample"] = round(settings["seconds"] * world / args.num_samples, 4)
    npz = os.path.join(args.out, "samples.npz")
    kw = dict(labels=labels) if flow.num_classes else {}
    files.atomic_write(npz, lambda f: np.savez(f, arr_0=samples, settings=json.dumps(settings), **kw))
    files.write_json(os.path.join(args.out, "settings.json"), settings)
    images.save_grid(images.class_grid(samples, labels), os.path.join(args.out, "grid.png"), nrow=10)
    print(f"{len(samples)} samples {samples.shape[1:]} in {settings['seconds']:.1f} s -> {npz}, "
          f"{os.path.join(args.out, 'grid.png')}")


def pack_couplings(args, flow, labels, settings, parts, num_batches):
    """OUT/couplings: a code set (data.py) of the grids drawn, their labels and the noise z0 each started from,
    which train.py reads like any code set and trains on with that noise held fixed (a reflow student). Written
    to a temporary directory and renamed, so it is whole or absent."""
    out, tmp = os.path.join(args.out, "couplings"), os.path.join(args.out, ".couplings.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    codes = np.concatenate([np.load(os.path.join(parts, f"codes-{b:06d}.npy")) for b in range(num_batches)])
    noise = np.concatenate([np.load(os.path.join(parts, f"noise-{b:06d}.npy")) for b in range(num_batches)])
    data.write_shard(tmp, 0, codes[:, None], labels, noise)
    meta = {k: v for k, v in flow.meta.items() if k not in data.META_KEYS + ("format", "num_images", "split")}
    data.write_meta(tmp, flow.codebook.numpy(), 1, grid=list(flow.grid), num_classes=flow.num_classes, views=1,
                    **dict(meta, noise=True, teacher=settings))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"{len(codes)} couplings (noise, codes, label) -> {out}")


def parse_args(argv=None):
    p = ArgumentParser(description="Sample a trained flow into a PNG grid and an FID-ready .npz.")
    p.add_argument("--ckpt", required=True, help="a checkpoint of train.py (RUN/checkpoints/last.pt)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--temperature", default="1.0",
                   help="softmax temperature: a number, 'linear:T0:T1' or 'cosine:T0:T1' over t")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale s: uncond + s (cond - uncond)")
    p.add_argument("--cfg-interval", default="0:1",
                   help="LO:HI: guidance acts only at network evaluations with LO <= t <= HI (t = 0 is noise); "
                   "the others make one conditional pass")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--solver", default="euler", choices=vfm.SOLVERS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--tokenizer", help="the tokenizer to decode with, if it moved since the codes were written")
    p.add_argument("--tokenizer-ckpt", help="its weights, for a pretrained tokenizer named by --tokenizer")
    p.add_argument("--out", required=True)
    p.add_argument("--couplings", action="store_true",
                   help="also write OUT/couplings: the code grids with the noise each started from, a code set for "
                   "training a reflow student (train.py --codes OUT/couplings --init CKPT)")
    p.add_argument("--force", action="store_true", help="replace the samples.npz (and couplings) of an earlier run "
                   "in --out")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run_command(sample, args)


if __name__ == "__main__":
    main()
