"""
Training throughput of the DiT on the Purrception objective: steps/s, images/s, achieved TFLOP/s and MFU.

    python experiments/bench.py --models DiT-B/2 DiT-XL/2 --batch-size 32 --dtype bf16 --out BENCHMARKS.md     # one GPU
    python experiments/bench.py --models DiT-T/2 DiT-S/2 --batch-size 8 --dtype fp32 bf16 --steps 5 --warmup 2  # a CPU

What is timed: train.py's training step (train.train_step) on the Purrception objective (cross-entropy over the
K codes at every grid position plus the z-loss): forward, backward, gradient clipping, AdamW and the EMA update,
on random code grids of --grid x --grid (32 x 32 is ImageNet-256 with an 8x tokenizer: 256 tokens at patch
size 2) with codes of dimension --in-dim. The network outputs K = --codebook-size logits per position; the
model and the objective are built as train.py builds them (its default settings), on the device. --warmup
steps are run first (torch.compile compiles during them), then --steps steps are timed, with the device
synchronised before each clock read. A configuration that does not fit in the device's memory is an OOM row.
--compile compiles as train.py --compile does: the network and its loss as one graph (train.compile_trainee);
--compiled-loss off compiles the network alone, the loss eager, and `both` measures both ways.

Memory: "peak mem" is the most memory tensors held on the GPU during the warm-up and timed steps (weights,
optimizer state and all; CUDA only). "loss peak" is the most one forward and backward of the batch
(train.forward_backward, run once after the timed steps) held above what was held before it: the activations,
the logits and what the loss makes of them, and the weights' gradients. "sampling pass peak" is the same for one
network pass without gradients, as a sampler makes it, in multiples of its output (the K logits at every
position): the output itself and what the pass makes beside it. On CUDA from the allocator's statistics, on a
CPU from the allocations and frees torch.profiler records (profile_memory).

FLOPs are the model's analytic count (flops_per_forward below: every matrix product, a multiply-add counted as
2 FLOPs, the output head over the K codes included) times 3 for a training step (forward, and a backward that
costs twice the forward). The loss, the optimizer and element-wise work are not counted.
MFU = achieved FLOP/s / the device's dense peak: bf16 for --dtype bf16, TF32 for --dtype fp32 (TF32 matmuls are
enabled on CUDA), looked up by device name or given with --peak-tflops. On a CPU without --peak-tflops: n/a.
"""

import copy
import dataclasses
import datetime
import gc
import os
import platform
import shlex
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
import train
import vfm
from dit import FREQUENCY_DIM, DiT_models
from support import checkpoint, distributed, files
from support.cli import ArgumentParser, UserError, check_non_negative, check_positive, check_seed, make_dir, run_command
from support.loss_by_t import LossByT

# Dense (no sparsity) peak TFLOP/s from the vendors' data sheets: (name fragment, bf16, tf32), first match wins.
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.4, 494.7),  # SXM
    ("H200", 989.4, 494.7),
    ("A100", 312.0, 156.0),
]
COLUMNS = ["model", "params (M)", "dtype", "compile", "compiled loss", "batch", "steps/s", "images/s",
           "GFLOP/image/step", "TFLOP/s", "MFU", "peak mem (GiB)", "loss peak (MiB)", "sampling pass peak"]
NEW_FILE_HEADER = "# Benchmarks\n\nTraining throughput measured by `bench.py`; its docstring says what is measured.\n"


# ---- FLOPs of the DiT ------------------------------------------------------------------------------------

def flops_per_forward(model):
    """Analytic FLOPs of one forward pass of a DiT (dit.py) for ONE sample, a multiply-add counted as 2 FLOPs.

    Counts every matrix product: the patch embedding, the time MLP, per block the adaLN modulation (once per
    sample, not per token), qkv, attention scores and weighted sum, output projection and MLP, and the final
    layer including its output head D -> p * p * out_dim (large when out_dim is K codes). Element-wise work
    (norms, softmax, activations) and lookups are left out. A training step costs about 3x this.
    """
    T, D, p = model.num_tokens, model.hidden_size, model.patch_size
    mlp_hidden = int(D * model.mlp_ratio)
    patch_embed = T * (p * p * model.in_dim) * D
    time_mlp = FREQUENCY_DIM * D + D * D
    block = (6 * D * D  # adaLN modulation, per sample
             + T * 3 * D * D  # qkv
             + 2 * T * T * D  # scores q k^T and weighted sum of v
             + T * D * D  # output projection
             + T * 2 * D * mlp_hidden)  # MLP
    final = 2 * D * D + T * D * (p * p * model.out_dim)  # adaLN modulation and output head
    multiply_adds = patch_embed + time_mlp + model.depth * block + final
    return 2 * multiply_adds


# ---- Device, precision, peak -----------------------------------------------------------------------------

def describe_device(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads)")


def peak_tflops(device, dtype, override=None):
    """The dense peak for this dtype (TF32 for fp32), or None where it is unknown."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, bf16, tf32 in PEAK_TFLOPS:
        if fragment in name:
            return bf16 if dtype == "bf16" else tf32
    return None


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_allocated(fn, device):
    """The most bytes allocated on the device while fn() runs, above what was allocated when it began."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:  # nbytes: + an allocation, - a free
        held += e.nbytes()
        peak = max(peak, held)
    return peak


# ---- One configuration -----------------------------------------------------------------------------------

def build(name, args, device):
    """(model, objective) as train.py builds them with its default settings (the same graph, whose compiled
    kernels torch may then find in its cache), for a random codebook, on the device."""
    settings = dict(dataclasses.asdict(train.Settings(codes="", out="")), model=name, objective="purrception")
    with torch.device(device):
        codebook = torch.randn(args.codebook_size, args.in_dim)
        return checkpoint.build(settings, codebook, (args.grid, args.grid), args.num_classes)


def time_training(name, dtype, compiled, compiled_loss, args, device):
    """(seconds per training step, peak memory in GiB (CUDA only), the loss's peak in bytes) for one model, dtype
    and compile setting: train.py's own step (forward, backward, gradient clipping, the loss scaler, AdamW, the
    EMA update)."""
    torch.manual_seed(args.seed)
    B, G, K = args.batch_size, args.grid, args.codebook_size
    raw_model, objective = build(name, args, device)
    model, scores = train.compile_trainee(raw_model, objective, compiled_loss) if compiled else (raw_model, False)
    ema = copy.deepcopy(raw_model).requires_grad_(False)
    opt = train.build_optimizer(raw_model, 1e-4, 0.0, device)
    precision, autocast = distributed.autocast_context(dtype, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    codes = torch.randint(K, (B, G, G), device=device)
    y = torch.randint(args.num_classes, (B,), device=device) if args.num_classes else None
    loss_by_t = LossByT(device)
    trainee = train.Trainee(model, raw_model, ema, opt, scaler, autocast, scores)

    def step():
        train.train_step(trainee, objective, [(codes, y, None)], lr=1e-4, grad_clip=1.0, ema_decay=0.9999,
                         loss_by_t=loss_by_t)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    loss_peak = peak_allocated(lambda: train.forward_backward(trainee, objective, codes, y, None), device)
    opt.zero_grad(set_to_none=True)
    return seconds, memory, loss_peak, sampling_pass_peak(raw_model, objective, codes, y, autocast, device)


@torch.no_grad()
def sampling_pass_peak(model, objective, codes, y, autocast, device):
    """The most memory a sampler's network pass (no gradients, the batch's codes as z_1 of a noisy z_t) holds above
    what was held before it, as a multiple of the pass's output (the K logits at every position)."""
    t = torch.full((len(codes),), 0.5, device=device)
    zt = vfm.interpolate(objective.noise(codes.shape), objective.embed(codes), t)
    outputs = []
    with autocast:
        peak = peak_allocated(lambda: outputs.append(model(zt, t, y)), device)
    return peak / (outputs[0].numel() * outputs[0].element_size())


def run_config(name, dtype, compiled, compiled_loss, args, device, flops_per_image, params):
    """One row of the table: the measurement, or OOM where the configuration does not fit."""
    row = {"model": name, "params (M)": f"{params / 1e6:.1f}", "dtype": dtype, "compile": "yes" if compiled else "no",
           "compiled loss": ("yes" if compiled_loss else "no") if compiled else "-", "batch": str(args.batch_size),
           "GFLOP/image/step": f"{flops_per_image / 1e9:.4g}"}
    try:
        seconds, memory, loss_peak, pass_peak = time_training(name, dtype, compiled, compiled_loss, args, device)
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError, or the CPU allocator's "can't allocate memory"
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        row.update({"steps/s": "OOM", "images/s": "OOM", "TFLOP/s": "-", "MFU": "-", "peak mem (GiB)": "-",
                    "loss peak (MiB)": "-", "sampling pass peak": "-"})
        return row
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    images_per_s = args.batch_size / seconds
    achieved = flops_per_image * images_per_s / 1e12
    peak = peak_tflops(device, dtype, args.peak_tflops)
    row.update({"steps/s": f"{1 / seconds:.3g}", "images/s": f"{images_per_s:.3g}", "TFLOP/s": f"{achieved:.3g}",
                "MFU": f"{100 * achieved / peak:.1f}%" if peak else "n/a",
                "peak mem (GiB)": f"{memory:.1f}" if memory is not None else "n/a",
                "loss peak (MiB)": f"{loss_peak / 2**20:.1f}", "sampling pass peak": f"{pass_peak:.2f} x output"})
    return row


# ---- Report ----------------------------------------------------------------------------------------------

def report_section(rows, args, device, command):
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    setup = (f"Grid {args.grid} x {args.grid}, code dimension {args.in_dim}, K = {args.codebook_size} codes, "
             f"{args.num_classes} classes; {args.warmup} warm-up and {args.steps} timed steps.")
    return (f"## {when}: {describe_device(device)}, torch {torch.__version__}\n\n"
            f"```\n{command}\n```\n\n{setup}\n\n{table(rows)}")


def table(rows):
    return files.markdown_table(COLUMNS, [[row[c] for c in COLUMNS] for row in rows])


def read_markdown(path):
    """The text of the markdown file to append to (a new one starts with a title), or a UserError saying why it
    cannot be one."""
    if os.path.isdir(path):
        raise UserError(f"--out {path}: a directory; expected a markdown file")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UserError(f"--out {path}: its directory does not exist")
    make_dir(os.path.dirname(os.path.abspath(path)))  # writable, or one line saying why not
    if not os.path.exists(path):
        return NEW_FILE_HEADER
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise UserError(f"--out {path}: not a text file; expected a markdown file to append to") from None
    except OSError as e:
        raise UserError(f"--out {path}: cannot read ({e.strerror})") from None


def append_markdown(path, text):
    """Append a section to a markdown file, written atomically."""
    files.write_text(path, read_markdown(path).rstrip("\n") + "\n\n" + text)


# ---- Command line ----------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = ArgumentParser(description="Training throughput and MFU of the DiT on the Purrception objective.")
    p.add_argument("--models", nargs="+", default=["DiT-B/2"], choices=list(DiT_models), metavar="MODEL",
                   help=f"one or more of: {', '.join(DiT_models)}")
    p.add_argument("--dtype", nargs="+", default=["bf16"], choices=["bf16", "fp32"],
                   help="bf16: autocast to bfloat16; fp32: float32 (TF32 matmuls on CUDA)")
    p.add_argument("--compile", nargs="?", const="on", default="off", choices=["off", "on", "both"],
                   help="torch.compile as train.py does; `--compile both` measures eager and compiled")
    p.add_argument("--compiled-loss", default=None, choices=["off", "on", "both"],
                   help="the compiled rows: the network and its loss in one graph (on, train.py's and the default), "
                        "the network alone (off), or both")
    p.add_argument("--batch-size", type=int, default=32, help="images per step on the one device")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--grid", type=int, default=32, help="code grid side: 32 for ImageNet-256 with an 8x tokenizer")
    p.add_argument("--in-dim", type=int, default=8, help="code embedding dimension d")
    p.add_argument("--codebook-size", type=int, default=16384, help="K, the number of logits per position")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU, instead of the table")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads); default: torch's")
    p.add_argument("--seed", type=int, default=0, help="an integer in [0, 2^32)")
    p.add_argument("--out", default=None, help="append a dated section with the table to this markdown file (in a "
                   "directory that exists)")
    return p.parse_args(argv)


def bench(args, command):
    check_positive(args, "batch_size", "steps", "grid", "in_dim", "codebook_size", "threads", "peak_tflops")
    check_non_negative(args, "warmup", "num_classes")
    check_seed(args)
    if args.compiled_loss and args.compile == "off":
        raise UserError(f"--compiled-loss {args.compiled_loss}: it chooses what the compiled rows compile; add "
                        f"--compile on or both")
    if args.out:
        read_markdown(args.out)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device}: not a device torch knows") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device}: this benchmark runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}, but CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Size every model on the meta device first: a bad --grid fails here, before anything is timed.
    sizes = {}
    for name in args.models:
        try:
            model, _ = build(name, args, "meta")
        except ValueError as e:
            raise UserError(f"{name}: {e}") from None
        sizes[name] = (3 * flops_per_forward(model), model.num_params())

    settings = {"off": [False], "on": [True], "both": [False, True]}
    runs = [(compiled, compiled_loss) for compiled in settings[args.compile]
            for compiled_loss in (settings[args.compiled_loss or "on"] if compiled else [False])]
    print(f"device: {describe_device(device)}, torch {torch.__version__}")
    rows = []
    for name in args.models:
        for dtype in args.dtype:
            for compiled, compiled_loss in runs:
                row = run_config(name, dtype, compiled, compiled_loss, args, device, *sizes[name])
                print(f"{name} {dtype} compile={row['compile']} compiled loss={row['compiled loss']}: "
                      f"{row['steps/s']} steps/s, {row['images/s']} images/s, {row['TFLOP/s']} TFLOP/s, "
                      f"MFU {row['MFU']}, loss peak {row['loss peak (MiB)']} MiB", flush=True)
                rows.append(row)

    print()
    print(table(rows), end="")
    if args.out:
        append_markdown(args.out, report_section(rows, args, device, command))
        print(f"appended to {args.out}")
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    return run_command(bench, args, shlex.join(["python", "experiments/bench.py", *argv]))


if __name__ == "__main__":
    main()
