"""
Train a flow over VQ codes: one loop for every dataset and objective (Purrception and its three baselines).

    python train.py --config fmnist --codes runs/fmnist-codes --out runs/fmnist-flow
    torchrun --nproc_per_node=8 train.py --config in256-xl2 --codes /data/in256-codes --out runs/in256

One process on a CPU or a GPU with plain `python`; data-parallel under `torchrun` (NCCL on GPUs, gloo on CPUs):
the global batch is split over ranks, each rank is seeded with seed * world_size + rank, every rank reads its
share of each epoch's permutation, rank 0 logs and writes checkpoints (support/checkpoint.py), and the logged
loss is all-reduced. `--resume` continues exactly where the last checkpoint left off: a run of --steps 2N
stopped at step N and resumed with the same settings gives the same weights as one run of 2N steps (the
learning-rate schedule depends on --steps). Ctrl-C or SIGTERM (a cluster's stop, on every process or on one
worker) finishes the step, saves it on every rank together and exits (130, 143): `--resume` then goes on.

A reflow student trains on a coupling set of `sample.py --couplings` (--codes; each grid with the noise z0 it
was drawn from, held fixed instead of fresh noise) from its teacher's weights (--init).
"""

import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import baselines
import vfm
from dit import TIME_SCALE, DiT_models
from support import checkpoint, config, distributed, files, images, tokenizers
from support.cli import UserError, check_fraction, check_non_negative, check_positive, check_seed, run_command
from support.cli import user_errors
from support.codesets import Batches, CodeSet
from support.config import flag
from support.loss_by_t import LossByT
from support.schedule import learning_rate


@dataclasses.dataclass
class Settings:
    """A run's settings: its flags, saved in every checkpoint. The defaults train DiT's ImageNet recipe (AdamW at
    1e-4 without weight decay, batch 256, 400K steps, EMA 0.9999, labels dropped 1 time in 10) on the tiny DiT-T/1
    with the gradient norm clipped to 1; the presets in configs/ hold each tier's (in256-xl2: DiT-XL/2 compiled)."""
    codes: str = flag(None, "a code set of `tokenizer.py encode`, or a coupling set of `sample.py --couplings`",
                      required=True)
    out: str = flag(None, "run directory: checkpoints/, samples/, log.jsonl, settings.json", required=True)
    init: str = flag(None, "start from the EMA weights of this checkpoint (a reflow student from its teacher)")
    model: str = flag("DiT-T/1", "the DiT preset", choices=list(DiT_models))
    objective: str = flag("purrception", "the method or a baseline", choices=list(baselines.OBJECTIVES))
    steps: int = flag(400_000, "optimizer steps")
    batch_size: int = flag(256, "global batch, split over ranks and --grad-accum")
    grad_accum: int = flag(1, "micro-batches per optimizer step")
    lr: float = flag(1e-4, "peak learning rate (AdamW)")
    warmup_steps: int = flag(0, "linear learning-rate warm-up")
    lr_final: float = flag(1.0, "the rate a half cosine after the warm-up reaches at the last step, as a fraction "
                           "of --lr (support/schedule.py); 1 holds it constant, as DiT")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    grad_clip: float = flag(1.0, "clip the gradient norm to this (inf: no clipping)")
    ema_decay: float = flag(0.9999, "EMA decay")
    ema_warmup: bool = flag(False, "EMA decay min(--ema-decay, (1 + n) / (10 + n)) at step n")
    p_uncond: float = flag(vfm.P_UNCOND, "label-drop probability (for guidance)")
    z_loss: float = flag(vfm.Z_LOSS_WEIGHT, "z-loss weight (Purrception and DFM)")
    codebook_scale: str = flag("raw", "the flow runs on the raw codebook (the authors' code's) or on E / rms(E); see "
                               "vfm.py",
                               choices=vfm.CODEBOOK_SCALES)
    time_dist: str = flag("uniform", "training times: 'uniform' (the authors' code's) or 'logit-normal:M:S'; see "
                          "vfm.py")
    time_scale: float = flag(float(TIME_SCALE), "the DiT embeds sinusoids of time_scale * t (DiT: 1000; authors: 1)")
    no_flip: bool = flag(False, "train on the first view of each code grid (the center crop) only, not on a random "
                         "one of it and its horizontal flip")
    precision: str = flag("auto", "auto: bf16 on GPUs that have it, else fp16 with loss scaling; fp32 on CPU",
                          choices=["auto", "fp32", "bf16", "fp16"])
    compile: bool = flag(False, "torch.compile the network and its loss as one graph (see compile_trainee)")
    seed: int = flag(0, "random seed")
    log_every: int = flag(100, "log a line to log.jsonl this often")
    ckpt_every: int = flag(5000, "overwrite checkpoints/last.pt this often")
    keep_every: int = flag(0, "also keep checkpoints/step-NNNNNNN.pt, the EMA weights alone, this often (a multiple "
                           "of --ckpt-every); the last step's is always kept")
    sample_every: int = flag(5000, "a preview grid in samples/ this often (0: none); it does not change training")
    resume: bool = flag(False, "continue from OUT/checkpoints/last.pt if it exists")


def check(s):
    """Numbers that make no sense are refused before anything runs."""
    check_positive(s, "steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "lr")
    check_non_negative(s, "warmup_steps", "weight_decay", "z_loss", "keep_every", "sample_every")
    check_fraction(s, "ema_decay", "p_uncond", "lr_final")
    check_seed(s)
    if not s.grad_clip > 0:  # a negative norm would scale the gradient by a negative factor and climb
        raise UserError(f"--grad-clip {s.grad_clip}: expected a number > 0 (inf: no clipping)")
    try:
        vfm.parse_time_dist(s.time_dist)
    except ValueError as e:
        raise UserError(f"--time-dist: {e}") from None
    if s.keep_every % s.ckpt_every:
        raise UserError(f"--keep-every {s.keep_every}: expected a multiple of --ckpt-every {s.ckpt_every}")


# ---- One training step -----------------------------------------------------------------------------------

def build_optimizer(model, lr, weight_decay, device):
    """AdamW; on GPUs its fused kernel (one launch for every parameter)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema += (1 - decay) (model - ema), every parameter in one foreach call."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


class NetworkLoss(torch.nn.Module):
    """The network and its objective's per-sample loss as one module, what --compile compiles into one graph:
    forward(codes, *draws) is objective.scored(net, codes, *draws), on the draws objective.draw made outside it
    (random numbers drawn in a compiled graph are not the eager run's). Compiled, the float32 cast of the network's
    bf16 logits fuses into the loss's reductions, which accumulate in float32, and the backward keeps the bf16
    logits, not a float32 copy of them (eager: 2.1 GB at ImageNet's 32 x 1024 x 16384 logits)."""

    def __init__(self, net, objective):
        super().__init__()
        self.net, self.objective = net, objective

    def forward(self, codes, *draws):
        return self.objective.scored(self.net, codes, *draws)  # (B,)


def compile_trainee(raw_model, objective, loss=True):
    """(what a training step runs, whether it is a NetworkLoss): torch.compile of the network and its loss as one
    graph where the objective splits its loss into draw and scored (every objective of baselines.py does), of the
    network alone otherwise or with loss=False."""
    if loss and hasattr(objective, "scored"):
        return torch.compile(NetworkLoss(raw_model, objective)), True
    return torch.compile(raw_model), False


@dataclasses.dataclass
class Trainee:
    """What a training step runs and updates: `model` is what runs (compiled and/or DDP-wrapped), `raw_model` the
    module under it (what the EMA follows and checkpoints save), `scaler` fp16's loss scaler, `autocast` the
    precision's context; `scores`: `model` is a NetworkLoss (the network and its loss), not the network alone."""
    model: torch.nn.Module
    raw_model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: contextlib.AbstractContextManager
    scores: bool = False


def forward_backward(trainee, objective, codes, labels, z0, accumulate=1):
    """The loss of one micro-batch and its backward, scaled by 1 / accumulate: (loss, per-sample loss (B,), t (B,))."""
    with trainee.autocast:
        if trainee.scores:  # the draws eagerly, the rest in the compiled graph
            draws = objective.draw(codes, labels, z0=z0)  # (t, ...)
            per_sample, t = trainee.model(codes, *draws), draws[0]  # (B,), (B,)
            loss, per_sample = per_sample.mean(), per_sample.detach()
        else:
            loss, per_sample, t = objective.loss(trainee.model, codes, labels, z0=z0)
    # fp16 gradients underflow: the GradScaler scales the loss before backward and unscales the gradients after.
    # It is a pass-through in fp32 and bf16.
    trainee.scaler.scale(loss / accumulate).backward()
    return loss, per_sample, t


def train_step(trainee, objective, micro_batches, *, lr, grad_clip, ema_decay, loss_by_t=None, step=0):
    """One optimizer step over the micro-batches [(codes, labels or None, noise or None), ...]: forward and
    backward each, clip the gradient norm, step, and update the EMA. Returns the gradient norm before clipping."""
    model, raw_model, opt, scaler = trainee.model, trainee.raw_model, trainee.opt, trainee.scaler
    for group in opt.param_groups:
        group["lr"] = lr
    for i, (codes, labels, z0) in enumerate(micro_batches):
        # DDP all-reduces the gradients in every backward; the micro-batches before the last only accumulate.
        last = i == len(micro_batches) - 1
        with model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext():
            loss, per_sample, t = forward_backward(trainee, objective, codes, labels, z0, len(micro_batches))
        if loss_by_t is not None:
            loss_by_t.add(loss, per_sample, t, 1 / len(micro_batches), step + 1)
    scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip, foreach=True)
    scaler.step(opt)  # skipped by the scaler when an fp16 gradient overflowed
    scaler.update()
    opt.zero_grad(set_to_none=True)
    update_ema(trainee.ema, raw_model, ema_decay)
    return grad_norm


PREVIEW_STEPS = 50  # Euler steps of a preview grid


@torch.no_grad()
def save_preview(ema, objective, codes, path, device, seed):
    """A look during training: 8 EMA samples per class (up to 10 classes). It draws from its own generator and
    forks the global random state, so a run with previews trains the same weights as one without."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            tokenizer = tokenizers.load_for_codes(codes.meta, codes.codebook, device)
        except (ValueError, OSError) as e:
            print(f"no sample grid: {e}", file=sys.stderr)
            return
        ema.eval()
        n = min(codes.num_classes, 10) or 4
        y = torch.arange(n, device=device).repeat_interleave(8) if codes.num_classes else None
        grids = objective.sample(ema, (8 * n, *codes.grid), y=y, steps=PREVIEW_STEPS,
                                 generator=torch.Generator(device).manual_seed(seed))
        images.save_grid(images.to_uint8(tokenizer.decode(grids)), path, nrow=8)


# ---- The training loop -----------------------------------------------------------------------------------

def train(s):
    """Train the run that settings `s` describe (a Settings record)."""
    check(s)
    log_path, ckpt_path = checkpoint.prepare_run_dir(s.out, s.resume)
    with distributed.processes() as (rank, world, device):
        _train(s, rank, world, device, log_path, ckpt_path)


def _train(s, rank, world, device, log_path, ckpt_path):
    # Data, and the checkpoint to resume from
    with user_errors():
        codes = CodeSet(s.codes)
    if s.batch_size % (world * s.grad_accum):
        raise UserError(f"--batch-size {s.batch_size} is not divisible by world size {world} x --grad-accum "
                        f"{s.grad_accum}")
    local_batch = s.batch_size // (world * s.grad_accum)
    checkpoint.check_couplings(s, codes)
    ckpt = checkpoint.resume_point(s, codes, ckpt_path, rank, world)

    # Model, EMA, optimizer: the same initial weights on every rank, then each rank its own noise and times. The
    # model is built on its device: DiT-XL/2 takes 13 s to initialise on a CPU.
    torch.manual_seed(s.seed)
    codebook = torch.from_numpy(codes.codebook).float()
    with user_errors(), torch.device(device):
        raw_model, objective = checkpoint.build(dataclasses.asdict(s), codebook, codes.grid, codes.num_classes)
        if ckpt is not None:
            checkpoint.check_weights(ckpt_path, ckpt["model"], raw_model, ckpt["settings"])
    if ckpt is None and s.init:
        raw_model.load_state_dict(checkpoint.initial_weights(s, codes, raw_model))
    elif ckpt is not None and s.init and rank == 0:
        print(f"--init {s.init} is not used: the run resumes from {ckpt_path}", file=sys.stderr)
    raw_model.to(device)
    objective.to(device)
    ema = copy.deepcopy(raw_model).requires_grad_(False)  # synced once (decay 0), then updated every step
    torch.manual_seed(s.seed * world + rank)
    np.random.seed((s.seed * world + rank) % 2**32)
    opt = build_optimizer(raw_model, s.lr, s.weight_decay, device)
    precision, autocast = distributed.autocast_context(s.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    with user_errors():
        batches = Batches(codes, local_batch, rank, world, s.seed, flips=not s.no_flip)
    step = checkpoint.restore(ckpt, rank, world, device, batches, model=raw_model, ema=ema, opt=opt, scaler=scaler)
    del ckpt  # restored: the file it maps is let go (last.pt is replaced at the next checkpoint)
    model, scores = compile_trainee(raw_model, objective) if s.compile else (raw_model, False)  # raw_model is saved
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    trainee = Trainee(model, raw_model, ema, opt, scaler, autocast, scores)
    if rank == 0:
        describe_run(s, raw_model, codes, world, device, precision, local_batch, step)
        if step >= s.steps:
            print(f"the checkpoint is at step {step}, not before --steps {s.steps}: nothing to train", file=sys.stderr)
        files.drop_jsonl_after(log_path, step)  # the steps after the checkpoint are trained and logged again

    def save_checkpoint():
        if not all(torch.isfinite(p).all() for p in raw_model.parameters()):  # an update can overflow them
            raise UserError(f"step {step}: the weights are no longer finite numbers; training stopped and the last "
                            f"checkpoint{f', of step {last_checkpoint},' if last_checkpoint else ''} is kept "
                            f"(try a lower --lr)")
        checkpoint.save(ckpt_path, rank, world, device, batches, model=raw_model, ema=ema, opt=opt, scaler=scaler,
                        step=step, settings=dataclasses.asdict(s), codebook=codebook, codes_meta=codes.meta)

    loss_by_t, last_time, last_step, last_checkpoint = LossByT(device), time.time(), step, step
    labels = codes.num_classes > 0
    raw_model.train()
    with (open(log_path, "a") if rank == 0 else contextlib.nullcontext()) as log_file, \
            tqdm(total=s.steps, initial=step, disable=rank != 0, dynamic_ncols=True) as bar, \
            distributed.stop_requests(world, device) as stops:
        while step < s.steps:
            lr = learning_rate(step, s.steps, s.lr, s.warmup_steps, final=s.lr_final)
            ema_decay = min(s.ema_decay, (1 + step) / (10 + step)) if s.ema_warmup else s.ema_decay
            with user_errors():  # codes out of range in a shard are met as they are read
                micro_batches = [(c.to(device, non_blocking=True), y.to(device, non_blocking=True) if labels else None,
                                  None if z0 is None else z0.to(device, non_blocking=True))
                                 for c, y, z0 in (batches.next() for _ in range(s.grad_accum))]
            grad_norm = train_step(trainee, objective, micro_batches, lr=lr, grad_clip=s.grad_clip,
                                   ema_decay=ema_decay, loss_by_t=loss_by_t, step=step)
            step += 1
            bar.update(1)
            if not scaler.is_enabled():  # with fp16 loss scaling, an overflowing step is skipped, not a fault
                loss_by_t.flag(grad_norm, step)
            log_now = step % s.log_every == 0 or step == s.steps
            stop = stops.requested(step)  # SIGINT or SIGTERM on any rank: every rank saves this step and leaves
            checkpoint_now = step % s.ckpt_every == 0 or step == s.steps or stop
            if log_now or checkpoint_now:
                loss_by_t.check_finite(world, last_checkpoint)

            if log_now:  # all ranks reduce, rank 0 writes
                loss, by_t = loss_by_t.reduce(step - last_step, world)
                rate, last_time, last_step = (step - last_step) / (time.time() - last_time), time.time(), step
                if rank == 0:
                    norm = grad_norm.item()  # inf on a step the fp16 loss scaler skipped: logged as null
                    record = dict(step=step, loss=round(loss, 5), lr=lr,
                                  grad_norm=round(norm, 4) if math.isfinite(norm) else None,
                                  steps_per_s=round(rate, 3), images_per_s=round(rate * s.batch_size, 1),
                                  loss_by_t=[round(v, 4) for v in by_t])
                    log_file.write(json.dumps(record, allow_nan=False) + "\n")
                    log_file.flush()
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
            if checkpoint_now:
                save_checkpoint()
                last_checkpoint = step
            if checkpoint_now and rank == 0 and (step == s.steps or s.keep_every and step % s.keep_every == 0):
                checkpoint.save_ema(os.path.join(s.out, "checkpoints", f"step-{step:07d}.pt"), ema, step,
                                    dataclasses.asdict(s), codebook, codes.meta)  # EMA-only: to sample, not resume
            if s.sample_every and (step % s.sample_every == 0 or step == s.steps) and rank == 0:
                save_preview(ema, objective, codes, os.path.join(s.out, "samples", f"step-{step:07d}.png"), device,
                             s.seed)
            if stop:  # every rank leaves with one line and exit status 128 + the signal (run_command)
                said = (f"checkpoint saved at step {step}; rerun with --resume to continue" if rank == 0 else
                        f"rank {rank} stopped at step {step}")
                raise distributed.Interrupted(stop, f"interrupted: {said}")
    if rank == 0:
        print(f"done: {step} steps; checkpoint {ckpt_path}")


def describe_run(s, model, codes, world, device, precision, local_batch, step):
    """settings.json in the run directory, and one line on the console."""
    files.write_json(os.path.join(s.out, "settings.json"),
                     dict(dataclasses.asdict(s), world_size=world, precision=precision))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{s.objective} | {s.model} ({n_params / 1e6:.2f}M parameters) | {len(codes)} code grids {codes.grid} "
          f"K={codes.num_codes} | {world} process(es) on {device.type}, {precision} | batch {s.batch_size} = "
          f"{world} x {s.grad_accum} x {local_batch}" + (f" | resumed at step {step}" if step else ""))


def main(argv=None):
    run_command(lambda: train(config.parse(Settings, argv, "train", "Train a flow (Purrception or a baseline) "
                                           "over VQ code grids.")))


if __name__ == "__main__":
    main()
