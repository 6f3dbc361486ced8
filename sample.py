"""
Sample images from a trained flow: a PNG grid (a row per class) and an .npz for the FID evaluators.

    python sample.py --config fmnist --ckpt runs/fmnist-flow/checkpoints/last.pt --out runs/fmnist-samples
    python sample.py --ckpt RUN/checkpoints/last.pt --num-samples 1000 --temperature 0.9 --cfg-scale 1.5 \\
        --steps 100 --solver euler --out runs/samples
    torchrun --nproc_per_node=8 sample.py --ckpt ... --num-samples 50000 --out ...   # data-parallel
    torchrun --nproc_per_node=8 sample.py --ckpt ... --num-samples 50000 --out ... --resume   # after a stop

OUT/samples.npz holds `arr_0`, uint8 N x H x W x C (the layout the standard FID evaluators read), `labels`
(the class each sample was conditioned on) and `settings` (every sampling setting, as JSON, also written to
OUT/settings.json; its `nfe` counts network passes, two for a guided evaluation). Sample i depends only on
--seed and i, not on the number of processes (batch b is seeded with batch_seed(seed, b)): under torchrun each
rank draws its share of the batches and rank 0 writes exactly N. grid.png shows up to 8 rows, each one class
(or several, when a class has few samples), at most 10 images wide. `--couplings` also writes OUT/couplings,
the grids drawn with the noise z0 each started from: the fixed pairs a reflow student trains on (train.py).

Each batch is written to OUT/.parts as soon as it is drawn (under multi-node torchrun, --out must lie on a
filesystem every node sees), and OUT/.parts goes once samples.npz is written. A run stopped by Ctrl-C, SIGTERM or
a failure keeps the batches it drew: the same command with --resume draws only the others, into the samples.npz
an uninterrupted run writes. OUT/.parts/drawn-with.json records what the batches depend on, and --resume refuses
batches drawn otherwise: another seed, batch size or sampler setting, or other weights (a hash of the weights
sampled and the tokenizer's, so a checkpoint copied elsewhere still matches). --num-samples may change: it decides
only the size of the last batch, which is drawn again when its size differs.
"""

import dataclasses
import hashlib
import math
import json
import os
import re
import shutil
import signal
import sys
import time

import numpy as np
import torch

import baselines
import vfm
from support import codesets, config, distributed, files, images
from support.checkpoint import Flow
from support.cli import UserError, check_finite, check_output_files, check_positive, check_seed, make_dir
from support.cli import parse_classes, refuse_overwrite, run_command, user_errors
from support.config import flag

BATCH_SIZE = 250  # sample.py's default batch: sample i is drawn from the noise of batch i // 250
DECODE_PIXELS = 2 ** 22  # pixels decoded at once: 64 images of 256 x 256 (a batch of 250 would need tens of GB)


# ---- Drawing samples: the one way every script and study draws them --------------------------------------

def batch_seed(seed, b):
    """The seed of batch b's generator: sample i depends only on the seed and i, never on how many processes
    drew it."""
    return seed * 1_000_003 + b


def sample_labels(n, num_classes, classes=None):
    """Labels 0, 1, ..., num_classes - 1, 0, 1, ... (all the null class, 0 here, for an unconditional model), or
    the given classes in turn: classes[0], classes[1], ..., classes[0], ..."""
    if classes:
        return np.asarray(classes, dtype=np.int64)[np.arange(n) % len(classes)]
    return np.arange(n) % num_classes if num_classes else np.zeros(n, dtype=np.int64)


@torch.no_grad()
def generate(flow, labels, seed, *, steps=100, solver="euler", temperature=1.0, cfg_scale=1.0,
             cfg_interval=(0.0, 1.0), couplings=False, precision="fp32", dfm_sampler="reveal"):
    """Images uint8 (B, H, W, C) of a Flow (support/checkpoint.py) for labels (B,), from the noise of a generator
    seeded with `seed`. couplings=True: (images, codes (B, *S), noise z0 (B, *S, d)), with the grids they decode
    and the noise the sampler started from (a continuous flow only). precision: the network's ("fp32", "bf16" or
    "auto", sample.py's default: bf16 on GPUs); dfm_sampler: a DFM model's sampler, "reveal" or "redraw"."""
    g = torch.Generator(flow.device).manual_seed(seed)
    y = torch.as_tensor(labels, device=flow.device) if flow.num_classes else None
    shape = (len(labels), *flow.grid)
    z0 = flow.objective.noise(shape, g) if couplings else None  # what sample() would draw first
    _, model = distributed.autocast_model(flow.model, precision, flow.device)
    kw = dict(sampler=dfm_sampler) if flow.name == "dfm" else {}
    codes = flow.objective.sample(model, shape, y=y, steps=steps, solver=solver, temperature=temperature,
                                  cfg_scale=cfg_scale, cfg_interval=cfg_interval, generator=g, z0=z0, **kw)
    per = max(1, DECODE_PIXELS // math.prod(flow.meta.get("image_shape", [3, 256, 256])[1:]))
    pictures = np.concatenate([images.to_uint8(flow.tokenizer.decode(part)) for part in codes.split(per)])
    return (pictures, codes, z0) if couplings else pictures


def generate_batch(flow, labels, seed, b, batch_size=BATCH_SIZE, **settings):
    """Batch b of size `batch_size` among samples with these labels, from the generator of batch_seed(seed, b)."""
    lo, hi = b * batch_size, min((b + 1) * batch_size, len(labels))
    return generate(flow, labels[lo:hi], batch_seed(seed, b), **settings)


def draw(flow, n, seed=0, batch_size=BATCH_SIZE, classes=None, **settings):
    """(images uint8 (n, H, W, C), labels (n,)): what `python sample.py --seed S --batch-size B` draws (with
    precision="auto", its default; this function's is fp32)."""
    labels = sample_labels(n, flow.num_classes, classes)
    parts = [generate_batch(flow, labels, seed, b, batch_size, **settings) for b in range((n - 1) // batch_size + 1)]
    return np.concatenate(parts), labels


# ---- The batches drawn so far, in OUT/.parts: what a stopped run resumes from ---------------------------

PARTS = ".parts"  # OUT/.parts: images-NNNNNN.npy for batch NNNNNN (and codes-, noise- with --couplings)
DRAWN_WITH = "drawn-with.json"  # OUT/.parts/drawn-with.json: what those batches depend on (drawn_with)


def batches_in(parts):
    """The batches in a folder of parts (those whose images are written), in order."""
    found = (re.fullmatch(r"images-(\d+)\.npy", f) for f in os.listdir(parts)) if os.path.isdir(parts) else ()
    return sorted(int(m.group(1)) for m in found if m)


def fingerprint(flow):
    """SHA-256 of what a Flow draws with, besides this command's settings: its training settings, its codebook, the
    weights it samples and its tokenizer's. The same for the same weights, wherever their files lie."""
    h = hashlib.sha256(json.dumps(flow.settings, sort_keys=True, default=str).encode())
    state = {"codebook": flow.codebook, **{f"model.{k}": v for k, v in flow.model.state_dict().items()},
             **{f"tokenizer.{k}": v for k, v in flow.tokenizer.state_dict().items()}}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def drawn_with(args, flow, classes, precision):
    """What batch b's samples depend on besides b: each setting that changes them (one way of writing each: '1' and
    '1.0' are one temperature), the weights (fingerprint) and the arrays written. --num-samples is not among them:
    it sets only the size of the last batch, checked by its length. `ckpt` and `step` name the weights in a
    refusal; they are not compared."""
    kind, *values = args.temperature.split(":") if ":" in args.temperature else ("constant", args.temperature)
    temperature = ":".join(([] if kind == "constant" else [kind]) + [repr(float(v)) for v in values])
    return dict(seed=args.seed, batch_size=args.batch_size, steps=args.steps, solver=args.solver,
                temperature=temperature, cfg_scale=args.cfg_scale, cfg_interval="%r:%r" % tuple(args.cfg_interval),
                classes=",".join(map(str, classes)) if classes else None, precision=precision, no_ema=args.no_ema,
                dfm_sampler=args.dfm_sampler, couplings=args.couplings, ckpt=os.path.abspath(args.ckpt),
                step=flow.step, weights=fingerprint(flow))


def check_drawn_with(parts, now):
    """UserError naming the first way in which the batches in `parts` were drawn otherwise than `now` says."""
    try:
        with open(os.path.join(parts, DRAWN_WITH)) as f:
            earlier = json.load(f)
    except (OSError, ValueError):
        earlier = None
    if not isinstance(earlier, dict):
        raise UserError(f"{parts}: batches without a readable {DRAWN_WITH}, so how they were drawn is unknown; pass "
                        f"--force instead of --resume to draw afresh")

    def said(key, value):  # as on the command line: --seed 1, --no-ema, no --classes
        name = "--" + key.replace("_", "-")
        return name if value is True else f"no {name}" if value is False or value is None else f"{name} {value}"

    redo = "rerun with the settings they were drawn with, or pass --force instead of --resume to draw afresh"
    for key, value in now.items():
        if key in ("ckpt", "step") or earlier.get(key) == value:
            continue
        if key == "weights":
            raise UserError(f"{parts}: batches drawn with other weights ({earlier.get('ckpt')} at step "
                            f"{earlier.get('step')}, or another tokenizer) than {now['ckpt']} at step {now['step']}; "
                            f"{redo}")
        raise UserError(f"{parts}: batches drawn with {said(key, earlier.get(key))}, not {said(key, value)}; {redo}")


def batch_length(args, b):
    """How many samples batch b holds: --batch-size, fewer in the last batch."""
    return min(args.batch_size, args.num_samples - b * args.batch_size)


def whole(parts, b, args):
    """Whether `parts` holds batch b whole: each of its arrays, with as many samples as batch b has in this run."""
    size = batch_length(args, b)
    for name in ("images", "codes", "noise") if args.couplings else ("images",):
        try:
            if np.load(distributed.part_path(parts, name, b), mmap_mode="r").shape[:1] != (size,):
                return False
        except (OSError, ValueError):
            return False
    return True


def keep_parts(args, flow, classes, precision, rank, world):
    """The batches of a stopped run that this one keeps, the same list on every rank. Rank 0 decides: with
    --resume, those in OUT/.parts, if drawn as this run draws them (else UserError, on every rank), each of the
    size it has here; without, none, and OUT/.parts starts afresh with this run's drawn-with.json."""
    parts, num_batches = os.path.join(args.out, PARTS), -(-args.num_samples // args.batch_size)
    message, kept = None, []
    if rank == 0:
        now = drawn_with(args, flow, classes, precision)
        if args.resume and batches_in(parts):
            try:
                check_drawn_with(parts, now)
                kept = [b for b in batches_in(parts) if b < num_batches and whole(parts, b, args)]
                print(f"resuming: {len(kept)} of {num_batches} batches drawn earlier, in {parts}")
            except UserError as e:
                message = str(e)
        else:
            shutil.rmtree(parts, ignore_errors=True)
            os.makedirs(parts)
            files.write_json(os.path.join(parts, DRAWN_WITH), now)
    message, kept = distributed.all_gather_object((message, kept), world)[0]
    if message:
        raise UserError(message)
    return kept


# ---- The command -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Settings:
    """The sampling settings: the flags of this command, recorded in OUT/settings.json with what they drew."""
    ckpt: str = flag(None, "a checkpoint of train.py (RUN/checkpoints/last.pt)", required=True)
    out: str = flag(None, "output directory: samples.npz, grid.png, settings.json; the batches drawn wait in "
                    "OUT/.parts until samples.npz is written (under multi-node torchrun, on a filesystem every node "
                    "sees)", required=True)
    num_samples: int = flag(1000, "how many samples")
    temperature: str = flag("1.0", "softmax temperature: a number, 'linear:T0:T1' or 'cosine:T0:T1' over t")
    cfg_scale: float = flag(1.0, "guidance scale s: uncond + s (cond - uncond); 1 is off")
    cfg_interval: str = flag("0:1", "LO:HI: guidance acts only at network evaluations with LO <= t <= HI (t = 0 is "
                             "noise); the others make one conditional pass")
    steps: int = flag(100, "solver steps over [0, 1]")
    solver: str = flag("euler", "the ODE solver (DFM: its discrete Euler step)", choices=vfm.SOLVERS)
    dfm_sampler: str = flag("reveal", "a DFM model's sampler: reveal (this repo's: masked tokens are revealed, once) "
                            "or redraw (the authors': every token is redrawn at each step)",
                            choices=baselines.DFM_SAMPLERS)
    classes: str = flag(None, "draw only these classes, e.g. 1,5,207 (labels cycle through the list); default: all")
    precision: str = flag("auto", "the network's precision: auto is bf16 autocast on GPUs, fp32 on CPU; the "
                          "posterior mean and the solver stay float32", choices=("auto", "fp32", "bf16"))
    seed: int = flag(0, "sample i depends only on the seed and i")
    batch_size: int = flag(BATCH_SIZE, "samples per batch")
    no_ema: bool = flag(False, "use the raw weights instead of the EMA")
    tokenizer: str = flag(None, "the tokenizer to decode with, if it moved since the codes were written")
    tokenizer_ckpt: str = flag(None, "its weights, for a pretrained tokenizer named by --tokenizer")
    couplings: bool = flag(False, "also write OUT/couplings: the code grids with the noise each started from, a "
                           "code set for a reflow student (train.py --codes OUT/couplings --init CKPT)")
    resume: bool = flag(False, "finish the run that stopped in --out: draw only the batches missing from OUT/.parts "
                        "(refused where those were drawn with other settings or weights)")
    force: bool = flag(False, "replace the samples.npz (and couplings) of an earlier run in --out; without --resume, "
                       "also the batches a stopped run left in OUT/.parts")


def parse_args(argv=None):
    return config.parse(Settings, argv, "sample", "Sample a trained flow into a PNG grid and an FID-ready .npz.")


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
    parse_classes(args.classes)  # its form, before any work; its range once the checkpoint is read
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
    parts = os.path.join(args.out, PARTS)
    if batches_in(parts) and not (args.resume or args.force):
        raise UserError(f"{parts} holds the batches of a run that stopped: pass --resume to finish it, or --force to "
                        f"draw afresh, or choose another --out")
    with distributed.processes() as (rank, world, device):
        _sample(args, rank, world, device)


def _sample(args, rank, world, device):
    with user_errors():
        flow = Flow(args.ckpt, device, use_ema=not args.no_ema, tokenizer=args.tokenizer,
                    tokenizer_ckpt=args.tokenizer_ckpt)
    if flow.name == "dfm" and args.solver != "euler":
        raise UserError(f"{args.ckpt}: a DFM model samples with its discrete Euler step only, not --solver "
                        f"{args.solver}")
    if flow.name == "dfm" and args.couplings:
        raise UserError(f"{args.ckpt}: a DFM model starts from masks, not noise, so it has no couplings to write")
    if flow.name != "dfm" and args.dfm_sampler != "reveal":
        raise UserError(f"--dfm-sampler {args.dfm_sampler}: {args.ckpt} is a {flow.name} model, not DFM")
    classes = parse_classes(args.classes)
    if classes and not flow.num_classes:
        raise UserError(f"--classes {args.classes}: {args.ckpt} was trained without labels, so it has no classes")
    if classes and max(classes) >= flow.num_classes:
        raise UserError(f"--classes {args.classes}: class {max(classes)} is out of range: {args.ckpt} has "
                        f"{flow.num_classes} classes, 0 to {flow.num_classes - 1}")
    if not flow.num_classes and args.cfg_scale != 1 and rank == 0:
        print(f"--cfg-scale {args.cfg_scale} is ignored: {args.ckpt} was trained without labels, so there is "
              f"nothing to guide towards", file=sys.stderr)
    labels = sample_labels(args.num_samples, flow.num_classes, classes)
    precision, _ = distributed.autocast_context(args.precision, device)
    times = [t for t, _ in baselines.DFM.schedule(args.steps, args.dfm_sampler)] if flow.name == "dfm" else None
    settings = dict(ckpt=os.path.abspath(args.ckpt), step=flow.step, weights="model" if args.no_ema else "ema",
                    objective=flow.name, model=flow.settings["model"], codebook_scale=flow.objective.codebook_scale,
                    dataset=flow.dataset, data=flow.meta.get("data"),
                    num_samples=args.num_samples, temperature=args.temperature, cfg_scale=args.cfg_scale,
                    cfg_interval=list(args.cfg_interval), steps=args.steps, solver=args.solver, seed=args.seed,
                    batch_size=args.batch_size, classes=classes, precision=precision,
                    dfm_sampler=args.dfm_sampler if flow.name == "dfm" else None,
                    # network passes per sample: a guided evaluation is two
                    nfe=vfm.guided_evaluations(args.steps, args.solver, args.cfg_scale, args.cfg_interval,
                                               guidable=flow.num_classes > 0, times=times))

    # Every rank draws its share of the batches missing from OUT/.parts; rank 0 then packs them all in order.
    kw = dict(steps=args.steps, solver=args.solver, temperature=args.temperature, cfg_scale=args.cfg_scale,
              cfg_interval=args.cfg_interval, precision=precision, dfm_sampler=args.dfm_sampler)

    def batch(b):
        if not args.couplings:
            return dict(images=generate_batch(flow, labels, args.seed, b, args.batch_size, **kw))
        pictures, codes, noise = generate_batch(flow, labels, args.seed, b, args.batch_size, couplings=True, **kw)
        return dict(images=pictures, codes=codes.cpu().numpy(), noise=noise.cpu().numpy())

    parts, num_batches = os.path.join(args.out, PARTS), -(-args.num_samples // args.batch_size)
    start = time.time()
    try:
        kept = keep_parts(args, flow, classes, precision, rank, world)
        settings["batches_kept"] = len(kept)  # drawn by the run this one resumes
        if rank == 0 and args.couplings:  # replaced (--force): the old set goes now, so a failed run leaves none
            shutil.rmtree(os.path.join(args.out, "couplings"), ignore_errors=True)
        drawn = distributed.gather_batches(parts, num_batches, batch, rank, world, kept=kept,
                                           desc=f"sampling ({world} process(es))")
        if rank == 0:
            here = args.num_samples - sum(batch_length(args, b) for b in kept)
            pack(args, flow, drawn["images"], labels, settings, start, world, here)
            if args.couplings:
                out = os.path.join(args.out, "couplings")
                codesets.write_couplings(out, drawn["codes"], labels, drawn["noise"], flow.codebook.numpy(),
                                         flow.meta, teacher=settings)
                print(f"{len(labels)} couplings (noise, codes, label) -> {out}")
            shutil.rmtree(parts)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the line that says so also says how to go on
        done = [b for b in batches_in(parts) if b < num_batches and whole(parts, b, args)]
        if rank != 0 or not done:
            raise
        said = getattr(e, "message", "interrupted")  # under torchrun, a sentence of its own
        hint = f"{len(done)} of {num_batches} batches kept in {parts}; rerun with --resume to continue"
        raise distributed.Interrupted(getattr(e, "signum", signal.SIGINT),
                                      f"{said}: {hint}" if said == "interrupted" else f"{said}; {hint}") from None
    finally:  # finished, failed or interrupted: no half-written code set, and batches kept only where some were drawn
        if rank == 0:
            shutil.rmtree(os.path.join(args.out, ".couplings.tmp"), ignore_errors=True)
            if not batches_in(parts):
                shutil.rmtree(parts, ignore_errors=True)


def pack(args, flow, samples, labels, settings, start, world, drawn):
    """samples.npz (the N images, in order), settings.json and grid.png; `drawn` of the N were drawn by this run."""
    settings["seconds"] = round(time.time() - start, 2)
    settings["seconds_per_sample"] = round(settings["seconds"] * world / drawn, 4) if drawn else None
    npz = os.path.join(args.out, "samples.npz")
    kw = dict(labels=labels) if flow.num_classes else {}
    files.atomic_write(npz, lambda f: np.savez(f, arr_0=samples, settings=json.dumps(settings), **kw))
    files.write_json(os.path.join(args.out, "settings.json"), settings)
    images.save_picture(images.sample_grid(samples, labels), os.path.join(args.out, "grid.png"))
    print(f"{len(samples)} samples {samples.shape[1:]} in {settings['seconds']:.1f} s -> {npz}, "
          f"{os.path.join(args.out, 'grid.png')}")


def main(argv=None):
    run_command(lambda: sample(parse_args(argv)))


if __name__ == "__main__":
    main()
