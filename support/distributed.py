"""
Processes, devices, precision and signals: one process with plain `python`, data-parallel under `torchrun`.

As in nanoGPT, distributed mode is on only when torchrun set RANK: NCCL on GPUs, gloo on CPUs. Every script
that can run on several processes (train.py, sample.py, `tokenizer.py encode`) opens `with processes() as (rank,
world, device):`, which also tears the process group down on the way out; such a process then ends without
finalizing the interpreter (`end_process`). Every command turns SIGTERM into an exception, as Ctrl-C is
(support/cli.py's run_command); train.py's loop instead stops at a step boundary on either, with a checkpoint,
every rank together (`stop_requests`).
"""

import contextlib
import os
import shutil
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from support import files


_ran_process_group = False  # this process joined a process group (processes() under torchrun)


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
    global _ran_process_group
    _ran_process_group = True
    try:
        yield rank, world, device
    finally:
        dist.destroy_process_group()


def end_process(status):
    """Once a process that ran a process group has said why it stops (run_command), end it with exit status
    `status` (None: 0), flushing stdout and stderr but not finalizing the interpreter; elsewhere, do nothing.
    destroy_process_group leaves gloo's worker threads running, and one of them can still be releasing the last
    collective's tensors, which takes the GIL; CPython ends a thread that asks for it during finalization
    (pthread_exit), and the C++ runtime then aborts the process (SIGABRT, "terminate called without an active
    exception") now and then, more often on busy cores, after the run had finished and saved its work."""
    if not _ran_process_group:
        return
    if status is None:
        status = 0
    elif not isinstance(status, int):  # sys.exit("message"), as the interpreter would: say it, exit 1
        print(status, file=sys.stderr)
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


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


def autocast_model(model, precision, device):
    """(precision, model): the network run under autocast at `precision` (as autocast_context), resolved; only the
    network, so that what a sampler computes from its output (the posterior mean, guidance, the solver) stays
    float32."""
    device = torch.device(device)
    precision, _ = autocast_context(precision, device)
    if precision == "fp32":
        return precision, model

    def run(x, t, y):
        with autocast_context(precision, device)[1]:
            return model(x, t, y)

    return precision, run


def part_path(folder, name, b):
    """Where gather_batches writes array `name` of batch b."""
    return os.path.join(folder, f"{name}-{b:06d}.npy")


def gather_batches(folder, num_batches, make_batch, rank, world, desc="batches", kept=None):
    """Batches b = rank, rank + world, ... of make_batch(b) -> {name: array}, made by every rank and written to
    `folder`; on rank 0, each name's arrays of every batch concatenated in order of b (None on the other ranks).
    The folder goes once every rank is done with it: finished, failed or interrupted. Given `kept` (the same list
    on every rank: the batches an earlier run left whole in the folder), those are not made again, the others are
    shared out among the ranks in turn, and the folder stays, whatever happens, for the caller to remove."""
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
    barrier(world)
    todo = range(num_batches) if kept is None else sorted(set(range(num_batches)) - set(kept))
    try:
        for b in tqdm(todo[rank::world], disable=rank != 0, desc=desc):
            for name, array in make_batch(b).items():
                files.save_npy(part_path(folder, name, b), array)
        barrier(world)
        if rank != 0:
            return None
        names = sorted({f.rsplit("-", 1)[0] for f in os.listdir(folder) if f.endswith(".npy")})
        return {name: np.concatenate([np.load(part_path(folder, name, b)) for b in range(num_batches)])
                for name in names}
    finally:
        if rank == 0 and kept is None:
            shutil.rmtree(folder, ignore_errors=True)


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


# ---- Signals: SIGTERM raises as Ctrl-C does; a training loop stops at a step boundary on either ----------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# On GPUs the ranks agree on a stop every 10 steps: reading the agreed flag (.item()) waits for the queued work
# of the step, a sync a step cannot afford; on CPUs the all-reduce of one number costs little, so every step.
AGREE_EVERY_GPU = 10
REPEAT_S = 1.0  # a SIGTERM within this of the first is the same request twice (SLURM signals every process of
#                 a job step, and torchrun forwards its own copy to its workers)


class Interrupted(KeyboardInterrupt):
    """Stopped by a signal: support/cli.py's run_command says `message` in one line and exits with 128 + signum
    (130 for SIGINT, Ctrl-C; 143 for SIGTERM), after every `finally` on the way out has run."""

    def __init__(self, signum=signal.SIGINT, message="interrupted"):
        super().__init__(message)
        self.signum, self.message = int(signum), message


def interrupt(signum, frame):
    """A signal handler: raise Interrupted, as Python's own handler raises KeyboardInterrupt on Ctrl-C. Under
    torchrun a SIGTERM is a preemption, or torchrun stopping the run because another of its processes stopped."""
    if signum == signal.SIGTERM and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise Interrupted(signum, "stopped by SIGTERM: a preemption, or another process of this run stopped (its "
                                  "error is above)")
    raise Interrupted(signum)


@contextlib.contextmanager
def signal_handlers(handler, signums=STOP_SIGNALS):
    """Handle these signals with `handler` inside the block; on the way out, the handlers of SIGINT and SIGTERM
    are again those before it (whatever the block set). Only the main thread can set handlers: in any other, the
    block runs with those there are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in signums:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            if h is not None:  # None: set outside Python, so it cannot be put back
                signal.signal(s, h)


def ignore_signals():
    """From now on SIGINT and SIGTERM do nothing (until a signal_handlers block around this restores them)."""
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)


class StopRequests:
    """SIGINT or SIGTERM, on any rank, as a request to stop at a step boundary. The handler only notes it; then
    `requested(step)`, called by every rank at every step, says whether any rank has noted one: in one process
    at once, under torchrun by an all-reduce (MAX) of one number at the same steps on every rank. It returns the
    signal (SIGTERM wins over SIGINT), 0 for none. A second signal to a process raises Interrupted at once (a
    checkpoint being written is then left whole: saves are atomic)."""

    def __init__(self, world, device):
        self.world, self.device = world, device
        self.every = AGREE_EVERY_GPU if device.type == "cuda" else 1
        self.signum, self.since, self.agreed = 0, 0.0, 0

    def on_signal(self, signum, frame):
        if self.signum and not (signum == self.signum == signal.SIGTERM and time.monotonic() - self.since < REPEAT_S):
            raise Interrupted(signum)
        if not self.signum:
            self.signum, self.since = signum, time.monotonic()

    def requested(self, step):
        if self.world == 1:
            self.agreed = self.signum
        elif step % self.every == 0:
            flag = torch.tensor([self.signum], device=self.device)
            with peers():
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.agreed = int(flag.item())
        return self.agreed


@contextlib.contextmanager
def stop_requests(world, device):
    """A StopRequests, its handler in place of the process's for SIGINT and SIGTERM inside the block: a training
    loop finishes its step, every rank saves it together, and each leaves, rather than lose the steps since the
    last checkpoint when a cluster stops the job (SLURM, Kubernetes: SIGTERM, then SIGKILL after a grace period),
    torchrun passes its own SIGTERM or SIGINT on, or one worker alone is signalled. Left on a stop, signals stay
    ignored (torchrun signals every other worker as soon as one exits, which must not replace a rank's line on
    its way out); run_command, which the process leaves through, then restores the handlers before it."""
    stops = StopRequests(world, device)
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, stops.on_signal) for s in STOP_SIGNALS} if main else {}
    try:
        yield stops
    finally:
        for s, h in previous.items():
            if stops.agreed or h is not None:  # None: set outside Python, so it cannot be put back
                signal.signal(s, signal.SIG_IGN if stops.agreed else h)
