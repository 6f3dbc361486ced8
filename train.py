"""
Train a flow over VQ codes: one loop for every dataset and objective (Purrception and its three baselines).

    python train.py --codes runs/fmnist-codes --model DiT-T/1 --objective purrception --out runs/fmnist-flow
    torchrun --nproc_per_node=8 train.py --codes /data/imagenet-codes --model DiT-XL/2 --out runs/in256

One process on a CPU or a GPU with plain `python`; data-parallel under `torchrun` (NCCL on GPUs, gloo on CPUs):
the global batch is split over ranks, each rank is seeded with seed * world_size + rank, every rank reads its
share of each epoch's permutation (DistributedSampler with set_epoch), rank 0 logs and writes checkpoints, and
the logged loss is all-reduced. Checkpoints hold the raw module (no `module.` or `_orig_mod.` prefixes), the
EMA, the optimizer, the step, the data position and every rank's RNG state; they are written to a temporary
file and renamed, so a kill mid-write leaves the previous one intact. `--resume` continues exactly where the
last checkpoint left off: N steps, a resume and N more give the same weights as 2N steps in one go.
"""

import argparse
import contextlib
import copy
import json
import os
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler
from tqdm import tqdm

import vfm
from data import CodeSet, UserError, run_command
from dit import DiT_models, build_dit

CHECKPOINT_FORMAT = "purrception-flow/1"
T_BINS = 10  # the loss is also logged by t in [0, 0.1), [0.1, 0.2), ...


# ----------------------------------------------------------------------------------------------------------
# Processes, devices, precision
# ----------------------------------------------------------------------------------------------------------

def setup_distributed():
    """(rank, world_size, device): DDP when torchrun set RANK, else one process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return rank, world, torch.device("cuda", local)
    dist.init_process_group("gloo")
    return rank, world, torch.device("cpu")


def autocast_context(precision, device):
    """One autocast context chosen up front: bf16 where supported, fp16 with a GradScaler otherwise, fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return precision, contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return precision, torch.autocast(device.type, dtype=dtype)


def all_reduce_mean(x, world):
    if world > 1:
        dist.all_reduce(x)
        x /= world
    return x


# ----------------------------------------------------------------------------------------------------------
# Data: each rank's share of every epoch, resumable at any step
# ----------------------------------------------------------------------------------------------------------

class _Indexable:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


class Batches:
    """This rank's batches of (codes, labels), epoch after epoch; state() and load_state() make it resumable.

    Each epoch is a fresh permutation shared by all ranks (DistributedSampler, seeded, set_epoch), of which every
    rank reads its own slice; when the codes hold several views (a horizontal flip), each draw picks one at
    random from a generator seeded by (seed, epoch, rank), so a resumed run sees the same views.
    """

    def __init__(self, codes, batch_size, rank, world, seed):
        if len(codes) < batch_size * world:
            raise UserError(f"{codes.dir}: {len(codes)} code grids, fewer than one global batch of "
                            f"{batch_size * world}")
        self.codes, self.batch_size, self.rank, self.seed = codes, batch_size, rank, seed
        self.sampler = DistributedSampler(_Indexable(len(codes)), num_replicas=world, rank=rank, shuffle=True,
                                          seed=seed, drop_last=True)
        self.epoch, self.cursor = 0, 0
        self._load_epoch()

    def _load_epoch(self):
        self.sampler.set_epoch(self.epoch)
        self.indices = np.fromiter(iter(self.sampler), dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        self.views = rng.integers(0, self.codes.views, len(self.indices))

    def next(self):
        if self.cursor + self.batch_size > len(self.indices):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._load_epoch()
        s = slice(self.cursor, self.cursor + self.batch_size)
        self.cursor += self.batch_size
        codes, labels = self.codes.get(self.indices[s], self.views[s])
        return torch.from_numpy(codes), torch.from_numpy(labels)

    def state(self):
        return dict(epoch=self.epoch, cursor=self.cursor)

    def load_state(self, state):
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._load_epoch()


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------

def rng_state(device):
    state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state())
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path, payload):
    """Write atomically: a temporary file in the same directory, then a rename."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """A checkpoint written by this script, or a UserError naming the file."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: pickle, zip and torch all raise their own errors
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint of train.py (expected format {CHECKPOINT_FORMAT!r})")
    return ckpt


def check_codebook(ckpt_codebook, codebook, where):
    if ckpt_codebook.shape != codebook.shape or not torch.allclose(ckpt_codebook, codebook):
        raise UserError(f"{where}: the checkpoint's codebook {tuple(ckpt_codebook.shape)} does not match the "
                        f"codes' codebook {tuple(codebook.shape)}")


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------

def build(model_name, objective_name, codebook, grid, num_classes, p_uncond=vfm.P_UNCOND,
          z_loss_weight=vfm.Z_LOSS_WEIGHT):
    """The objective and the DiT sized for it: logits over K (Purrception, DFM) or d channels (CFM)."""
    if grid[0] != grid[1]:
        raise UserError(f"the DiT wants a square code grid, got {grid[0]} x {grid[1]}")
    kw = dict(z_loss_weight=z_loss_weight) if objective_name == "purrception" else {}
    objective = vfm.build_objective(objective_name, codebook, num_classes, p_uncond=p_uncond, **kw)
    try:
        model = build_dit(model_name, grid_size=grid[0], num_classes=num_classes, **objective.model_io())
    except ValueError as e:
        raise UserError(str(e)) from None
    return model, objective


@torch.no_grad()
def check_ranks_in_sync(model, world):
    """Every rank must hold the same weights; compare a float64 checksum at each checkpoint."""
    if world == 1:
        return
    mine = torch.stack([p.double().sum() for p in model.parameters()]).sum().reshape(1)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    if any(not torch.equal(other, every[0]) for other in every):
        raise RuntimeError(f"ranks hold different weights: checksums {[x.item() for x in every]}")


@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def train(args):
    rank, world, device = setup_distributed()
    try:
        _train(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _train(args, rank, world, device):
    codes = CodeSet(args.codes)
    codebook = torch.from_numpy(codes.codebook).float()
    if args.batch_size % (world * args.grad_accum):
        raise UserError(f"--batch-size {args.batch_size} is not divisible by world size {world} x "
                        f"--grad-accum {args.grad_accum}")
    local_batch = args.batch_size // (world * args.grad_accum)
    ckpt_path = os.path.join(args.out, "checkpoints", "last.pt")
    ckpt = None
    if os.path.exists(ckpt_path):
        if not args.resume:
            raise UserError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
        ckpt = load_checkpoint(ckpt_path)
        check_codebook(ckpt["codebook"], codebook, ckpt_path)
        for key in ("model", "objective"):
            if ckpt["args"][key] != getattr(args, key):
                raise UserError(f"{ckpt_path}: trained with --{key} {ckpt['args'][key]}, not {getattr(args, key)}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    raw_model, objective = build(args.model, args.objective, codebook, codes.grid, codes.num_classes,
                                 args.p_uncond, args.z_loss)
    raw_model.to(device)
    objective.to(device)
    ema = copy.deepcopy(raw_model).requires_grad_(False)  # synced once (decay 0), then updated every step
    torch.manual_seed(args.seed * world + rank)  # then each rank its own noise and times
    np.random.seed(args.seed * world + rank)
    opt = torch.optim.AdamW(raw_model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    precision, autocast = autocast_context(args.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    batches = Batches(codes, local_batch, rank, world, args.seed)
    step = 0
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        batches.load_state(ckpt["data"][rank] if len(ckpt["data"]) == world else ckpt["data"][0])
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank], device)
    model = torch.compile(raw_model) if args.compile else raw_model
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint():
        check_ranks_in_sync(raw_model, world)
        states = [None] * world
        datas = [None] * world
        if world > 1:
            dist.all_gather_object(states, rng_state(device))
            dist.all_gather_object(datas, batches.state())
        else:
            states, datas = [rng_state(device)], [batches.state()]
        if rank == 0:
            save_checkpoint(ckpt_path, dict(
                format=CHECKPOINT_FORMAT, model=raw_model.state_dict(), ema=ema.state_dict(),
                opt=opt.state_dict(), scaler=scaler.state_dict(), step=step, args=vars(args),
                codebook=codebook, codes_meta=codes.meta, data=datas, rng=states))
        if world > 1:
            dist.barrier()

    if rank == 0:
        os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(dict(vars(args), world_size=world, precision=precision), f, indent=2)
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"{args.objective} | {args.model} ({n_params / 1e6:.2f}M parameters) | {len(codes)} code grids "
              f"{codes.grid} K={codes.num_codes} | {world} process(es) on {device.type}, {precision} | "
              f"batch {args.batch_size} = {world} x {args.grad_accum} x {local_batch}" +
              (f" | resumed at step {step}" if step else ""))
    log_file = open(os.path.join(args.out, "log.jsonl"), "a") if rank == 0 else None
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    bin_sum, bin_count = torch.zeros(T_BINS, device=device), torch.zeros(T_BINS, device=device)
    loss_sum, last_time, last_step = torch.zeros((), device=device), time.time(), step
    raw_model.train()
    stop = []  # Ctrl-C in a one-process run: finish the step, save, then quit (a second Ctrl-C quits at once)
    if world == 1:
        def on_interrupt(signum, frame):
            if stop:
                raise KeyboardInterrupt
            stop.append(signum)
        previous_handler = signal.signal(signal.SIGINT, on_interrupt)
    try:
        while step < args.steps:
            lr = args.lr * min(1.0, (step + 1) / max(args.warmup_steps, 1))
            for group in opt.param_groups:
                group["lr"] = lr
            for micro in range(args.grad_accum):
                c, y = batches.next()
                c, y = c.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = micro == args.grad_accum - 1 or world == 1
                with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                    loss, per_sample, t = objective.loss(model, c, y if codes.num_classes else None)
                scaler.scale(loss / args.grad_accum).backward()
                loss_sum += loss.detach() / args.grad_accum
                b = (t * T_BINS).long().clamp(max=T_BINS - 1)
                bin_sum.index_add_(0, b, per_sample.float())
                bin_count.index_add_(0, b, torch.ones_like(per_sample, dtype=torch.float))
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            update_ema(ema, raw_model, args.ema_decay)
            step += 1
            bar.update(1)

            if step % args.log_every == 0 or step == args.steps:
                stats = torch.cat([loss_sum[None] / (step - last_step), bin_sum, bin_count])
                stats = all_reduce_mean(stats, world)  # the one all-reduce: only when logging
                now = time.time()
                if rank == 0:
                    by_t = (stats[1:1 + T_BINS] / stats[1 + T_BINS:].clamp_min(1e-9)).tolist()
                    rate = (step - last_step) / (now - last_time)
                    record = dict(step=step, loss=round(stats[0].item(), 5), lr=lr,
                                  grad_norm=round(grad_norm.item(), 4), steps_per_s=round(rate, 3),
                                  images_per_s=round(rate * args.batch_size, 1),
                                  loss_by_t=[round(v, 4) for v in by_t])
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
                bin_sum.zero_(), bin_count.zero_(), loss_sum.zero_()
                last_time, last_step = now, step
            if step % args.ckpt_every == 0 or step == args.steps:
                checkpoint()
            if args.keep_every and step % args.keep_every == 0 and rank == 0:
                shutil.copyfile(ckpt_path, os.path.join(args.out, "checkpoints", f"step-{step:07d}.pt"))
            if args.sample_every and (step % args.sample_every == 0 or step == args.steps) and rank == 0:
                sample_grid(ema, objective, codes, os.path.join(args.out, "samples", f"step-{step:07d}.png"),
                            device, args.seed)
            if stop:
                checkpoint()
                bar.close()
                print(f"\ninterrupted: checkpoint saved at step {step}; rerun with --resume to continue",
                      file=sys.stderr)
                raise KeyboardInterrupt
    finally:
        if world == 1:
            signal.signal(signal.SIGINT, previous_handler)
        bar.close()
        if log_file:
            log_file.close()
    if rank == 0:
        print(f"done: {step} steps; checkpoint {ckpt_path}")


def sample_grid(ema, objective, codes, path, device, seed):
    """A quick look during training: 8 EMA samples per class (up to 10 classes), 50 Euler steps."""
    import sample  # the sampler and the image grid live in sample.py
    try:
        tokenizer = sample.load_codes_tokenizer(codes.meta, torch.from_numpy(codes.codebook), device)
    except UserError as e:
        print(f"no sample grid: {e}", file=sys.stderr)
        return
    ema.eval()
    labels = sample.grid_labels(codes.num_classes, 8)
    images = sample.generate(ema, objective, tokenizer, labels, codes.grid, steps=50, seed=seed, device=device)
    sample.save_grid(images, path, nrow=8)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a flow (Purrception or a baseline) over VQ code grids.")
    p.add_argument("--codes", required=True, help="a code set written by `python vq.py encode`")
    p.add_argument("--model", default="DiT-T/1", choices=list(DiT_models))
    p.add_argument("--objective", default="purrception", choices=vfm.OBJECTIVES)
    p.add_argument("--out", required=True, help="run directory: checkpoints/, samples/, log.jsonl")
    p.add_argument("--steps", type=int, default=400_000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=256, help="global batch, split over ranks and --grad-accum")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--p-uncond", type=float, default=vfm.P_UNCOND, help="label-drop probability (for guidance)")
    p.add_argument("--z-loss", type=float, default=vfm.Z_LOSS_WEIGHT, help="Purrception's z-loss weight")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on GPUs that have it, else fp16 with loss scaling; fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=5000, help="overwrite checkpoints/last.pt this often")
    p.add_argument("--keep-every", type=int, default=0,
                   help="also keep checkpoints/step-NNNNNNN.pt this often (a multiple of --ckpt-every)")
    p.add_argument("--sample-every", type=int, default=5000, help="0: no sample grids during training")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt if it exists")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.keep_every % args.ckpt_every:
        p.error("--keep-every must be a multiple of --ckpt-every")
    return args


def main(argv=None):
    args = parse_args(argv)
    run_command(train, args)


if __name__ == "__main__":
    main()
