"""
A training run's checkpoint: what it holds, the run directory it is written in, writing and restoring it, the
checks that it fits a run, and a trained flow loaded from it to sample from.

    RUN/checkpoints/last.pt = {format, model, ema, opt, scaler, step, settings, codebook, codes_meta, data, rng}
    RUN/checkpoints/step-NNNNNNN.pt = {format (EMA_FORMAT), ema, step, settings, codebook, codes_meta}

`model` and `ema` are the raw module's state dicts (no `module.` or `_orig_mod.` prefixes); `settings` is
train.py's settings record as a dict, `codebook` the (K, d) codebook of the codes as the tokenizer uses it,
`codes_meta` the code set's meta.json (grid, classes, tokenizer), `data` and `rng` every rank's position in the
data and random state. It is written atomically by rank 0, so a kill mid-write leaves the previous one whole.
last.pt is the one file a run resumes from (`load`). The steps train.py keeps (--keep-every, and the last step) are
EMA-only files (`save_ema`): what sampling needs, a quarter of last.pt with its raw weights and AdamW's two moments
(3.0 GB of 12 for Purrception's DiT-XL/2 on 16,384 codes). `Flow` and --init read either kind (`load_any`).
"""

import os
import sys

import torch
import torch.distributed as dist

import baselines
from dit import build_dit
from support import distributed, files, tokenizers
from support.cli import UserError, check_output_files, make_dir, user_errors

FORMAT = "purrception-flow/1"
KEYS = ("model", "ema", "opt", "scaler", "step", "settings", "codebook", "codes_meta", "data", "rng")
EMA_FORMAT = "purrception-ema/1"  # a kept step: the EMA weights and what sampling them needs, nothing to resume
EMA_KEYS = ("ema", "step", "settings", "codebook", "codes_meta")


def build(settings, codebook, grid, num_classes):
    """(model, objective) that a settings dict describes: the objective and the DiT sized for it, logits over
    K (Purrception, DFM) or d channels (CFM, CFM-endpoint)."""
    if grid[0] != grid[1]:
        raise ValueError(f"the DiT wants a square code grid, got {grid[0]} x {grid[1]}")
    objective = baselines.build_objective(
        settings["objective"], codebook, num_classes, p_uncond=settings["p_uncond"],
        z_loss_weight=settings["z_loss"], codebook_scale=settings["codebook_scale"],
        time_dist=settings["time_dist"])
    model = build_dit(settings["model"], grid_size=grid[0], num_classes=num_classes, time_scale=settings["time_scale"],
                      **objective.model_io())
    return model, objective


# ---- Reading and writing ---------------------------------------------------------------------------------

def load(path):
    """A checkpoint written by train.py to resume from (last.pt), or FileNotFoundError / ValueError naming the file.
    Its tensors are mapped from the file, not read: the processes of a node share one copy in the page cache."""
    ckpt = load_any(path)
    if ckpt["format"] == EMA_FORMAT:
        raise ValueError(f"{path}: an EMA-only file of a kept step (format {EMA_FORMAT!r}), which holds no optimizer "
                         f"state to resume from; expected a checkpoint of train.py (format {FORMAT!r}), such as "
                         f"RUN/checkpoints/last.pt")
    return ckpt


def load_any(path):
    """A checkpoint of train.py to sample from: last.pt (format FORMAT) or a kept step's EMA-only file (EMA_FORMAT).
    ValueError naming the file when it is neither, or lacks what its format holds."""
    expected = f"a checkpoint of train.py (format {FORMAT!r}, or {EMA_FORMAT!r} for a kept step)"
    ckpt = files.load_torch(path, expected, weights_only=False, mmap=True)
    kind = ckpt.get("format") if isinstance(ckpt, dict) else None
    if kind not in (FORMAT, EMA_FORMAT):
        raise ValueError(f"{path}: not {expected}")
    missing = [k for k in (KEYS if kind == FORMAT else EMA_KEYS) if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} in it; expected {expected}")
    return ckpt


def check_weights(path, weights, model, settings):
    """ValueError naming `path` when a state dict does not fit the model its settings describe."""
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if {k: tuple(v.shape) for k, v in weights.items()} != wanted:
        raise ValueError(f"{path}: its weights do not fit {settings['model']} for {settings['objective']}")


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


def save(path, rank, world, device, batches, **state):
    """Called on every rank: each rank's data position and RNG state go with the weights; rank 0 writes, the
    others wait. state: model, ema, opt, scaler (saved as state dicts), step, settings, codebook, codes_meta."""
    check_ranks_in_sync(state["model"], world)
    rngs = distributed.all_gather_object(distributed.rng_state(device), world)
    datas = distributed.all_gather_object(batches.state(), world)
    if rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        payload = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}
        files.save_torch(path, dict(format=FORMAT, data=datas, rng=rngs, **payload))
    distributed.barrier(world)


def save_ema(path, ema, step, settings, codebook, codes_meta):
    """A kept step's EMA-only file (EMA_FORMAT), written atomically; rank 0 alone calls it."""
    files.save_torch(path, dict(format=EMA_FORMAT, ema=ema.state_dict(), step=step, settings=settings,
                                codebook=codebook, codes_meta=codes_meta))


def restore(ckpt, rank, world, device, batches, **modules):
    """Load every module's state, this rank's data position and RNG state from ckpt; returns the step (0 without
    a checkpoint). A run resumed on another number of ranks restarts the data from rank 0's position. Nothing
    restored keeps a tensor of ckpt, so that the file it maps is let go with it."""
    if ckpt is None:
        return 0
    for key, module in modules.items():
        module.load_state_dict(ckpt[key])
        if isinstance(module, torch.optim.Optimizer):  # it keeps the tensors already of its dtype and device
            mapped = {id(v) for state in ckpt[key]["state"].values() for v in state.values()}
            for state in module.state.values():
                state.update({k: v.clone() for k, v in state.items() if id(v) in mapped})
    batches.load_state(ckpt["data"][rank] if len(ckpt["data"]) == world else ckpt["data"][0])
    if len(ckpt["rng"]) == world:
        distributed.set_rng_state(ckpt["rng"][rank], device)
    return ckpt["step"]


# ---- Checks that a checkpoint fits a run: resume, --init, coupling sets ----------------------------------

def check_fits(ckpt, path, where, settings, codes, keys):
    """UserError (prefixed by `where`) unless the checkpoint at `path` was trained on codes like these (grid,
    classes, codebook) and with these settings' values of `keys`."""
    for key, what in (("grid", "code grid"), ("num_classes", "number of classes")):
        if ckpt["codes_meta"][key] != codes.meta[key]:  # grids are lists in both
            raise UserError(f"{where}: trained on codes with {what} {ckpt['codes_meta'][key]}, but {settings.codes} "
                            f"has {codes.meta[key]}")
    with user_errors():
        tokenizers.check_codebook(codes.codebook, ckpt["codebook"], path)
    for key in keys:
        if ckpt["settings"][key] != getattr(settings, key):
            raise UserError(f"{where}: trained with --{key.replace('_', '-')} {ckpt['settings'][key]}, not "
                            f"{getattr(settings, key)}")


def prepare_run_dir(out, resume):
    """(OUT/log.jsonl, OUT/checkpoints/last.pt) of a run directory made ready to write: refuses files it cannot
    write, and the log of a run that stopped before its first checkpoint unless it is resumed."""
    for sub in ("", "checkpoints", "samples"):
        make_dir(os.path.join(out, sub))
    check_output_files(out, "log.jsonl", "settings.json")
    check_output_files(os.path.join(out, "checkpoints"), "last.pt", "last.pt.tmp")
    log_path, ckpt_path = os.path.join(out, "log.jsonl"), os.path.join(out, "checkpoints", "last.pt")
    if os.path.isfile(log_path) and os.path.getsize(log_path) and not resume and not os.path.exists(ckpt_path):
        raise UserError(f"{log_path} exists (a run that stopped before its first checkpoint): pass --resume to "
                        f"start it again, or choose another --out")
    return log_path, ckpt_path


def resume_point(settings, codes, path, rank, world):
    """The checkpoint to continue from, or None for a fresh run; refuses to overwrite a run without --resume and
    to resume with codes or settings that the checkpoint's weights do not fit. One decision for every rank: where
    a rank does not see what rank 0 sees (--out not on a filesystem every node shares), every rank stops rather
    than one of them start over."""
    seen = distributed.all_gather_object(os.path.exists(path), world)  # rank r sees a checkpoint: seen[r]
    if len(set(seen)) > 1:
        others = [r for r in range(world) if seen[r] != seen[0]]
        raise UserError(f"{path}: rank 0 {'sees' if seen[0] else 'does not see'} it, rank(s) "
                        f"{', '.join(map(str, others))} {'do not' if seen[0] else 'do'}; --out and --codes must be on "
                        f"a filesystem every node shares")
    exists = seen[0]
    if not exists:
        if settings.resume and rank == 0:
            print(f"--resume: no checkpoint at {path} yet, so this run starts from step 0", file=sys.stderr)
        return None
    if not settings.resume:
        raise UserError(f"{path} exists: pass --resume to continue that run, or choose another --out")
    with user_errors():
        ckpt = load(path)
    check_fits(ckpt, path, path, settings, codes,
               ("model", "objective", "seed", "codebook_scale", "time_dist", "time_scale", "no_flip"))
    return ckpt


def initial_weights(settings, codes, model):
    """The EMA weights of --init (a reflow student starts from its teacher), checked against this run."""
    with user_errors():
        ckpt = load_any(settings.init)
    check_fits(ckpt, settings.init, f"--init {settings.init}", settings, codes,
               ("model", "objective", "codebook_scale", "time_scale"))
    with user_errors():
        check_weights(settings.init, ckpt["ema"], model, ckpt["settings"])
    return ckpt["ema"]


def check_couplings(settings, codes):
    """A coupling set (codes with the noise each was drawn from) trains a continuous flow (not DFM) on the
    codebook scale of the teacher that drew it: the same noise means another path on another scale."""
    if not codes.has_noise:
        return
    if settings.objective == "dfm":
        raise UserError(f"{settings.codes}: a coupling set of noise and codes; DFM starts from masks, not noise")
    teacher = codes.meta.get("teacher")
    scale = teacher.get("codebook_scale") if isinstance(teacher, dict) else None
    if scale is None:
        raise UserError(f"{settings.codes}/meta.json: a coupling set without its teacher's settings; expected one "
                        f"written by `python sample.py --couplings`")
    if scale != settings.codebook_scale:
        raise UserError(f"{settings.codes}: couplings of a teacher on the {scale} codebook, not --codebook-scale "
                        f"{settings.codebook_scale}")


# ---- A trained flow, ready to sample ---------------------------------------------------------------------

class Flow:
    """A train.py checkpoint ready to sample: model (EMA weights unless use_ema=False) in eval mode, objective,
    tokenizer, the code set's meta, the step and the training settings (a dict). Either last.pt or a kept step's
    EMA-only file, which has no raw weights: use_ema=False is refused there."""

    def __init__(self, path, device="cpu", use_ema=True, tokenizer=None, tokenizer_ckpt=None):
        ckpt = load_any(path)
        if not use_ema and ckpt["format"] == EMA_FORMAT:
            raise ValueError(f"{path}: an EMA-only file of a kept step holds no raw weights; sample its EMA (no "
                             f"--no-ema), or the raw weights of RUN/checkpoints/last.pt")
        self.path, self.device, self.step, self.settings = path, device, ckpt["step"], ckpt["settings"]
        self.meta, self.codebook = ckpt["codes_meta"], ckpt["codebook"]
        self.grid, self.num_classes = tuple(self.meta["grid"]), self.meta["num_classes"]
        self.model, self.objective = build(self.settings, self.codebook, self.grid, self.num_classes)
        weights = ckpt["ema" if use_ema else "model"]
        check_weights(path, weights, self.model, self.settings)
        self.model.load_state_dict(weights)
        self.model.to(device).eval()
        self.objective.to(device)
        self.tokenizer = tokenizers.load_for_codes(self.meta, self.codebook, device, tokenizer, tokenizer_ckpt)

    name = property(lambda self: self.settings["objective"])
    dataset = property(lambda self: self.meta.get("dataset", "unknown"))
