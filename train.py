"""
Train a flow over VQ codes: one loop for every dataset and objective (Purrception and its three baselines).

    python train.py --codes runs/fmnist-codes --model DiT-T/1 --objective purrception --out runs/fmnist-flow
    torchrun --nproc_per_node=8 train.py --codes /data/imagenet-codes --model DiT-XL/2 --out runs/in256

One process on a CPU or a GPU with plain `python`; data-parallel under `torchrun` (NCCL on GPUs, gloo on CPUs):
the global batch is split over ranks, each rank is seeded with seed * world_size + rank, every rank reads its
share of each epoch's permutation (DistributedSampler with set_epoch), rank 0 logs and writes checkpoints, and
the logged loss is all-reduced. Checkpoints (flows.py says what they hold) are written atomically, so a kill
mid-write leaves the previous one intact. `--resume` continues exactly where the last checkpoint left off: a
run of --steps 2N stopped at step N and resumed with the same flags gives the same weights as one run of 2N
steps (the learning-rate schedule, and so --lr-final's decay, depends on --steps).

A reflow student: --codes a coupling set of `sample.py --couplings` (grids with the noise z0 the teacher's
sampler started from) trains the same objective on those fixed pairs instead of fresh noise, so that the path
from each z0 is straight and one Euler step lands on its grid; --init starts it from the teacher's EMA weights.
"""

import contextlib
import copy
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import distributed
import files
import flows
import images
import tokenizers
import vfm
from cli import (ArgumentParser, UserError, check_fraction, check_non_negative, check_output_files, check_positive,
                 check_seed, make_dir, run_command, user_errors)
from data import Batches, CodeSet
from dit import DiT_models
from schedule import learning_rate

T_BINS = 10  # the loss is also logged by t in [0, 0.1), [0.1, 0.2), ...


# ----------------------------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------------------------

class LossByT:
    """The mean loss, and the mean loss in T_BINS bins of t, over the micro-batches since the last log.

    Where the loss is high tells where the model struggles (minRF logs it the same way): for Purrception the
    posterior is broad near noise (t -> 0) and sharp near data (t -> 1)."""

    def __init__(self, device):
        self.sums = torch.zeros(1 + 2 * T_BINS, device=device)  # [loss, sum by bin, count by bin]
        self.first_nonfinite = torch.zeros((), dtype=torch.long, device=device)  # 0: every loss so far finite

    def flag(self, value, step):
        """Remember `step` (1-based) if value is nan or infinite. On the device: no synchronisation per step."""
        bad = (self.first_nonfinite == 0) & ~torch.isfinite(value.detach())
        self.first_nonfinite = torch.where(bad, step, self.first_nonfinite)

    def add(self, loss, per_sample, t, weight, step):
        """Add one micro-batch of step `step` (1-based)."""
        self.flag(loss, step)
        b = (t * T_BINS).long().clamp(max=T_BINS - 1)  # (B,) the bin of each sample's t
        self.sums[0] += loss.detach() * weight
        self.sums[1:1 + T_BINS].index_add_(0, b, per_sample.float())
        self.sums[1 + T_BINS:].index_add_(0, b, torch.ones_like(per_sample, dtype=torch.float))

    def reduce(self, steps, world):
        """(mean loss per step, [mean loss in each bin]) over every rank, and reset. The one all-reduce of
        the loop, and only when it logs."""
        stats = distributed.all_reduce_mean(self.sums.clone(), world)
        self.sums.zero_()
        by_t = stats[1:1 + T_BINS] / stats[1 + T_BINS:].clamp_min(1e-9)
        return stats[0].item() / steps, by_t.tolist()

    def check_finite(self, world, last_checkpoint):
        """UserError naming the first step, on any rank, whose loss or gradient was nan or infinite. Called before
        every log line and every checkpoint, so that neither ever holds a non-finite loss or the weights it
        produced."""
        first = self.first_nonfinite.clone()
        if world > 1:  # the earliest over ranks; 0 (all finite) counts as never
            first = torch.where(first == 0, torch.iinfo(torch.long).max, first)
            with distributed.peers():
                dist.all_reduce(first, op=dist.ReduceOp.MIN)
            first = torch.where(first == torch.iinfo(torch.long).max, 0, first)
        if first.item():
            kept = (f"the last checkpoint, of step {last_checkpoint}, is kept" if last_checkpoint else
                    "no checkpoint was written")
            raise UserError(f"step {first.item()}: the loss or its gradient is not a finite number; training stopped "
                            f"and {kept} (try a lower --lr)")


def build_optimizer(model, lr, weight_decay, device):
    """AdamW; on GPUs its fused kernel (one launch for every parameter)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")


@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def train_step(model, raw_model, ema, objective, opt, scaler, autocast, micro_batches, lr, grad_clip, ema_decay,
               loss_by_t=None, step=0):
    """One optimizer step over the micro-batches [(codes, labels or None, noise or None), ...]: forward and
    backward each, clip the gradient norm, step, and update the EMA. Returns the gradient norm before clipping.

    model is what runs (compiled and/or DDP-wrapped), raw_model the module under it (what the EMA follows)."""
    for group in opt.param_groups:
        group["lr"] = lr
    for i, (codes, labels, z0) in enumerate(micro_batches):
        # DDP all-reduces the gradients in every backward; the micro-batches before the last only accumulate.
        last = i == len(micro_batches) - 1
        with (model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext()), autocast:
            loss, per_sample, t = objective.loss(model, codes, labels, z0=z0)
        # fp16 gradients underflow: the GradScaler multiplies the loss before backward and divides the gradients
        # after. It is disabled (a pass-through) in fp32 and bf16.
        scaler.scale(loss / len(micro_batches)).backward()
        if loss_by_t is not None:
            loss_by_t.add(loss, per_sample, t, 1 / len(micro_batches), step + 1)
    scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    scaler.step(opt)  # skipped by the scaler when an fp16 gradient overflowed
    scaler.update()
    opt.zero_grad(set_to_none=True)
    update_ema(ema, raw_model, ema_decay)
    return grad_norm


# ----------------------------------------------------------------------------------------------------------
# Resume or start, checkpoints
# ----------------------------------------------------------------------------------------------------------

def checked_resume(args, codes, ckpt_path, rank):
    """The checkpoint to continue from, or None for a fresh run; refuses to overwrite a run without --resume and
    to resume with codes or settings that the checkpoint's weights do not fit."""
    if not os.path.exists(ckpt_path):
        if args.resume and rank == 0:
            print(f"--resume: no checkpoint at {ckpt_path} yet, so this run starts from step 0", file=sys.stderr)
        return None
    if not args.resume:
        raise UserError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    with user_errors():
        ckpt = flows.load_checkpoint(ckpt_path)
    check_fits(ckpt, ckpt_path, ckpt_path, args, codes,
               ("model", "objective", "seed", "codebook_scale", "time_dist"))
    return ckpt


def check_fits(ckpt, path, where, args, codes, keys):
    """UserError (prefixed by `where`) unless the checkpoint at `path` was trained on codes like these (grid,
    classes, codebook) and with these args' values of `keys`."""
    for key, what in (("grid", "code grid"), ("num_classes", "number of classes")):
        if ckpt["codes_meta"][key] != codes.meta[key]:  # grids are lists in both
            raise UserError(f"{where}: trained on codes with {what} {ckpt['codes_meta'][key]}, but {args.codes} has "
                            f"{codes.meta[key]}")
    with user_errors():
        tokenizers.check_codebook(codes.codebook, ckpt["codebook"], path)
    trained_with = flows.trained_args(ckpt["args"])
    for key in keys:
        if trained_with[key] != getattr(args, key):
            raise UserError(f"{where}: trained with --{key.replace('_', '-')} {trained_with[key]}, not "
                            f"{getattr(args, key)}")


def check_couplings(args, codes):
    """A coupling set (codes with the noise each was drawn from) trains a continuous flow (not DFM) on the
    codebook scale of the teacher that drew it: the same noise means another path on another scale."""
    if not codes.has_noise:
        return
    if args.objective == "dfm":
        raise UserError(f"{args.codes}: a coupling set of noise and codes; DFM starts from masks, not noise")
    scale = codes.meta.get("teacher", {}).get("codebook_scale") if isinstance(codes.meta.get("teacher"), dict) else None
    if scale is None:
        raise UserError(f"{args.codes}/meta.json: a coupling set without its teacher's settings; expected one "
                        f"written by `python sample.py --couplings`")
    if scale != args.codebook_scale:
        raise UserError(f"{args.codes}: couplings of a teacher on the {scale} codebook, not --codebook-scale "
                        f"{args.codebook_scale}")


def initial_weights(args, codes, model):
    """The EMA weights of --init (a reflow student starts from its teacher), checked against this run."""
    with user_errors():
        ckpt = flows.load_checkpoint(args.init)
    check_fits(ckpt, args.init, f"--init {args.init}", args, codes, ("model", "objective", "codebook_scale"))
    with user_errors():
        flows.check_weights(args.init, ckpt["ema"], model, ckpt["args"])
    return ckpt["ema"]


def drop_log_after(path, step):
    """After a resume from `step`, log.jsonl keeps only the lines up to it: the steps after the checkpoint will be
    trained (and logged) again. A line cut short by a kill is dropped too."""
    if not os.path.exists(path):
        return
    kept = []
    for line in open(path, errors="replace").read().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    files.write_text(path, "".join(kept))


@torch.no_grad()
def check_ranks_in_sync(model, world):
    """Every rank must hold the same weights; compare a float64 checksum at each checkpoint."""
    if world == 1:
        return
    mine = torch.stack([p.double().sum() for p in model.parameters()]).sum().reshape(1)
    every = [torch.zeros_like(mine) for _ in range(world)]
    with distributed.peers():
        dist.all_gather(every, mine)
    if any(not torch.equal(other, every[0]) for other in every):
        raise RuntimeError(f"ranks hold different weights: checksums {[x.item() for x in every]}")


def save_checkpoint(path, rank, world, device, batches, **state):
    """Every rank's data position and RNG state go with the weights; rank 0 writes, the others wait."""
    check_ranks_in_sync(state["model"], world)
    rngs = distributed.all_gather_object(distributed.rng_state(device), world)
    datas = distributed.all_gather_object(batches.state(), world)
    if rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        payload = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}
        files.save_torch(path, dict(format=flows.CHECKPOINT_FORMAT, data=datas, rng=rngs, **payload))
    distributed.barrier(world)


def restore(ckpt, rank, world, device, batches, **modules):
    """Load every module's state, this rank's data position and RNG state from ckpt; returns the step (0 without
    a checkpoint). A run resumed on another number of ranks restarts the data from rank 0's position."""
    if ckpt is None:
        return 0
    for key, module in modules.items():
        module.load_state_dict(ckpt[key])
    batches.load_state(ckpt["data"][rank] if len(ckpt["data"]) == world else ckpt["data"][0])
    if len(ckpt["rng"]) == world:
        distributed.set_rng_state(ckpt["rng"][rank], device)
    return ckpt["step"]


def log(log_file, bar, **record):
    """One line of log.jsonl, and the loss and throughput beside the progress bar."""
    log_file.write(json.dumps(record, allow_nan=False) + "\n")
    log_file.flush()
    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")


def save_preview(ema, objective, codes, path, device, seed):
    """A quick look during training: 8 EMA samples per class (up to 10 classes), 50 Euler steps."""
    try:
        tokenizer = tokenizers.load_for_codes(codes.meta, codes.codebook, device)
    except (ValueError, OSError) as e:
        print(f"no sample grid: {e}", file=sys.stderr)
        return
    ema.eval()
    labels = flows.preview_labels(codes.num_classes, 8)
    images.save_grid(flows.generate(ema, objective, tokenizer, labels, codes.grid, seed, steps=50, device=device),
                     path, nrow=8)


@contextlib.contextmanager
def finish_step_on_ctrl_c(world):
    """Yield a list that becomes non-empty on Ctrl-C, so the loop can finish its step, save it and quit rather
    than lose the steps since the last checkpoint; a second Ctrl-C quits at once. One process only: under
    torchrun, its own signal handling stops every rank together."""
    stop = []
    if world > 1:
        yield stop
        return

    def on_interrupt(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------

def check_args(args):
    """Numbers that make no sense are refused before anything runs."""
    check_positive(args, "steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "lr")
    check_non_negative(args, "warmup_steps", "weight_decay", "z_loss", "keep_every", "sample_every")
    check_fraction(args, "ema_decay", "p_uncond", "lr_final")
    check_seed(args)
    if not args.grad_clip > 0:  # a negative norm would scale the gradient by a negative factor and climb
        raise UserError(f"--grad-clip {args.grad_clip}: expected a number > 0 (inf: no clipping)")
    try:
        vfm.parse_time_dist(args.time_dist)
    except ValueError as e:
        raise UserError(f"--time-dist: {e}") from None
    if args.keep_every % args.ckpt_every:
        raise UserError(f"--keep-every {args.keep_every}: expected a multiple of --ckpt-every {args.ckpt_every}")


def train(args):
    check_args(args)
    for sub in ("", "checkpoints", "samples"):
        make_dir(os.path.join(args.out, sub))
    check_output_files(args.out, "log.jsonl", "args.json")
    check_output_files(os.path.join(args.out, "checkpoints"), "last.pt", "last.pt.tmp")
    log_path = os.path.join(args.out, "log.jsonl")
    if os.path.isfile(log_path) and os.path.getsize(log_path) and not args.resume and not os.path.exists(
            os.path.join(args.out, "checkpoints", "last.pt")):
        raise UserError(f"{log_path} exists (a run that stopped before its first checkpoint): pass --resume to "
                        f"start it again, or choose another --out")
    with distributed.processes() as (rank, world, device):
        _train(args, rank, world, device)


def _train(args, rank, world, device):
    # Data, and the checkpoint to resume from
    with user_errors():
        codes = CodeSet(args.codes)
    if args.batch_size % (world * args.grad_accum):
        raise UserError(f"--batch-size {args.batch_size} is not divisible by world size {world} x "
                        f"--grad-accum {args.grad_accum}")
    local_batch = args.batch_size // (world * args.grad_accum)
    check_couplings(args, codes)
    ckpt_path = os.path.join(args.out, "checkpoints", "last.pt")
    ckpt = checked_resume(args, codes, ckpt_path, rank)

    # Model, EMA, optimizer: the same initial weights on every rank, then each rank its own noise and times
    torch.manual_seed(args.seed)
    codebook = torch.from_numpy(codes.codebook).float()
    with user_errors():
        raw_model, objective = flows.build(args.model, args.objective, codebook, codes.grid, codes.num_classes,
                                           args.p_uncond, args.z_loss, args.codebook_scale, args.time_dist)
        if ckpt is not None:
            flows.check_weights(ckpt_path, ckpt["model"], raw_model, ckpt["args"])
    if ckpt is None and args.init:
        raw_model.load_state_dict(initial_weights(args, codes, raw_model))
    elif ckpt is not None and args.init and rank == 0:
        print(f"--init {args.init} is not used: the run resumes from {ckpt_path}", file=sys.stderr)
    raw_model.to(device)
    objective.to(device)
    ema = copy.deepcopy(raw_model).requires_grad_(False)  # synced once (decay 0), then updated every step
    torch.manual_seed(args.seed * world + rank)
    np.random.seed((args.seed * world + rank) % 2**32)
    opt = build_optimizer(raw_model, args.lr, args.weight_decay, device)
    precision, autocast = distributed.autocast_context(args.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    with user_errors():
        batches = Batches(codes, local_batch, rank, world, args.seed)
    step = restore(ckpt, rank, world, device, batches, model=raw_model, ema=ema, opt=opt, scaler=scaler)
    model = torch.compile(raw_model) if args.compile else raw_model  # checkpoints save raw_model: no prefixes
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if rank == 0:
        describe_run(args, raw_model, codes, world, device, precision, local_batch, step)
        if step >= args.steps:
            print(f"the checkpoint is at step {step}, not before --steps {args.steps}: nothing to train",
                  file=sys.stderr)
        drop_log_after(os.path.join(args.out, "log.jsonl"), step)

    def checkpoint():
        if not all(torch.isfinite(p).all() for p in raw_model.parameters()):  # an update can overflow them
            raise UserError(f"step {step}: the weights are no longer finite numbers; training stopped and the last "
                            f"checkpoint{f', of step {last_checkpoint},' if last_checkpoint else ''} is kept "
                            f"(try a lower --lr)")
        save_checkpoint(ckpt_path, rank, world, device, batches, model=raw_model, ema=ema, opt=opt, scaler=scaler,
                        step=step, args=vars(args), codebook=codebook, codes_meta=codes.meta)

    loss_by_t, last_time, last_step, last_checkpoint = LossByT(device), time.time(), step, step
    labels = codes.num_classes > 0
    raw_model.train()
    with (open(os.path.join(args.out, "log.jsonl"), "a") if rank == 0 else contextlib.nullcontext()) as log_file, \
            tqdm(total=args.steps, initial=step, disable=rank != 0, dynamic_ncols=True) as bar, \
            finish_step_on_ctrl_c(world) as stop:
        while step < args.steps:
            # One training step
            lr = learning_rate(step, args.steps, args.lr, args.warmup_steps, final=args.lr_final)
            ema_decay = min(args.ema_decay, (1 + step) / (10 + step)) if args.ema_warmup else args.ema_decay
            with user_errors():  # codes out of range in a shard are met as they are read
                micro_batches = [(c.to(device, non_blocking=True), y.to(device, non_blocking=True) if labels else None,
                                  None if z0 is None else z0.to(device, non_blocking=True))
                                 for c, y, z0 in (batches.next() for _ in range(args.grad_accum))]
            grad_norm = train_step(model, raw_model, ema, objective, opt, scaler, autocast, micro_batches, lr,
                                   args.grad_clip, ema_decay, loss_by_t, step)
            step += 1
            bar.update(1)
            if not scaler.is_enabled():  # with fp16 loss scaling, an overflowing step is skipped, not a fault
                loss_by_t.flag(grad_norm, step)
            log_now = step % args.log_every == 0 or step == args.steps
            checkpoint_now = step % args.ckpt_every == 0 or step == args.steps or stop
            if log_now or checkpoint_now:
                loss_by_t.check_finite(world, last_checkpoint)

            # Logging: all ranks reduce, rank 0 writes
            if log_now:
                loss, by_t = loss_by_t.reduce(step - last_step, world)
                rate, last_time, last_step = (step - last_step) / (time.time() - last_time), time.time(), step
                if rank == 0:
                    norm = grad_norm.item()  # inf on a step the fp16 loss scaler skipped: logged as null
                    log(log_file, bar, step=step, loss=round(loss, 5), lr=lr,
                        grad_norm=round(norm, 4) if math.isfinite(norm) else None,
                        steps_per_s=round(rate, 3), images_per_s=round(rate * args.batch_size, 1),
                        loss_by_t=[round(v, 4) for v in by_t])

            # Checkpoints and previews
            if checkpoint_now:
                checkpoint()
                last_checkpoint = step
            if args.keep_every and step % args.keep_every == 0 and rank == 0:
                files.copy(ckpt_path, os.path.join(args.out, "checkpoints", f"step-{step:07d}.pt"))
            if args.sample_every and (step % args.sample_every == 0 or step == args.steps) and rank == 0:
                save_preview(ema, objective, codes, os.path.join(args.out, "samples", f"step-{step:07d}.png"),
                             device, args.seed)
            if stop:
                bar.close()
                print(f"\ninterrupted: checkpoint saved at step {step}; rerun with --resume to continue",
                      file=sys.stderr)
                raise KeyboardInterrupt
    if rank == 0:
        print(f"done: {step} steps; checkpoint {ckpt_path}")


def describe_run(args, model, codes, world, device, precision, local_batch, step):
    """args.json in the run directory, and one line on the console."""
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    files.write_json(os.path.join(args.out, "args.json"), dict(vars(args), world_size=world, precision=precision))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.objective} | {args.model} ({n_params / 1e6:.2f}M parameters) | {len(codes)} code grids "
          f"{codes.grid} K={codes.num_codes} | {world} process(es) on {device.type}, {precision} | "
          f"batch {args.batch_size} = {world} x {args.grad_accum} x {local_batch}" +
          (f" | resumed at step {step}" if step else ""))


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = ArgumentParser(description="Train a flow (Purrception or a baseline) over VQ code grids.")
    p.add_argument("--codes", required=True, help="a code set written by `python vq.py encode`, or a coupling set "
                   "of `python sample.py --couplings` (a reflow student trains on its fixed noise)")
    p.add_argument("--init", help="start from the EMA weights of this train.py checkpoint (a reflow student from "
                   "its teacher); the optimizer and the step start afresh")
    p.add_argument("--model", default="DiT-T/1", choices=list(DiT_models))
    p.add_argument("--objective", default="purrception", choices=list(vfm.OBJECTIVES))
    p.add_argument("--out", required=True, help="run directory: checkpoints/, samples/, log.jsonl")
    p.add_argument("--steps", type=int, default=400_000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=256, help="global batch, split over ranks and --grad-accum")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up")
    p.add_argument("--lr-final", type=float, default=1.0,
                   help="the learning rate that a half cosine after the warm-up reaches at the end of the run, as a "
                   "fraction of --lr (schedule.py); 1 holds it constant, as DiT")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--ema-warmup", action="store_true",
                   help="EMA decay min(--ema-decay, (1 + n) / (10 + n)) at step n, so a short run's EMA is not "
                   "held back by its first weights")
    p.add_argument("--p-uncond", type=float, default=vfm.P_UNCOND, help="label-drop probability (for guidance)")
    p.add_argument("--z-loss", type=float, default=vfm.Z_LOSS_WEIGHT, help="z-loss weight (Purrception and DFM)")
    p.add_argument("--codebook-scale", default="raw", choices=vfm.CODEBOOK_SCALES,
                   help="the flow runs on the raw codebook (the paper's) or on E / rms(E); see vfm.py")
    p.add_argument("--time-dist", default="uniform",
                   help="training times: 'uniform' on [1e-3, 1) (the paper's) or 'logit-normal:M:S', "
                   "sigmoid(M + S n), fewer times near noise and data; see vfm.py")
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
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run_command(train, args)


if __name__ == "__main__":
    main()
