"""
Processes, devices and precision: one process with plain `python`, data-parallel under `torchrun`.

As in nanoGPT, distributed mode is on only when torchrun set RANK: NCCL on GPUs, gloo on CPUs. Every script
that can run on several processes (train.py, sample.py, `vq.py encode`) opens `with processes() as (rank,
world, device):`, which also tears the process group down on the way out.
"""

import contextlib
import os

import numpy as np
import torch
import torch.distributed as dist



@contextlib.contextmanager
def processes():
    """(rank, world_size, device): DDP when torchrun set RANK, else one process on the GPU if there is one.
    On GPUs, float32 matrix products use TF32 (as DiT and nanoGPT do)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if "RANK" not in os.environ:
        yield 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        device = torch.device("cuda", local)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    try:
        yield rank, world, device
    finally:
        dist.destroy_process_group()


class PeerStopped(Exception):
    """A collective failed because another process of the run stopped; that process has said why."""


@contextlib.contextmanager
def peers():
    """Around a collective: a peer that stopped (after saying why) makes it fail; say so in one line."""
    try:
        yield
    except RuntimeError:
        raise PeerStopped("another process of this run stopped (its error is above)") from None


def barrier(world):
    if world > 1:
        with peers():
            dist.barrier()


def all_reduce_mean(x, world):
    """The mean of tensor x over ranks, in place."""
    if world > 1:
        with peers():
            dist.all_reduce(x)
        x /= world
    return x


def all_gather_object(obj, world):
    """[obj of rank 0, obj of rank 1, ...]."""
    if world == 1:
        return [obj]
    every = [None] * world
    with peers():
        dist.all_gather_object(every, obj)
    return every


def autocast_context(precision, device):
    """(precision, context): one autocast context chosen up front. auto: bf16 on GPUs that have it, fp16 (with a
    GradScaler in train.py) on older GPUs, fp32 on CPU; bf16 autocast also runs on CPUs."""
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return precision, contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return precision, torch.autocast(device.type, dtype=dtype)


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
