"""
The paper's own limitation, measured: a tokenizer trained together with the flow instead of frozen before it.

Purrception's quality is bounded by its frozen VQ tokenizer; the paper proposes training the autoencoder with the
flow. Three arms on MNIST or Fashion-MNIST at tier 2's sizes (configs/fmnist.json: vq.py's tokenizer, DiT-T/1,
batch 32, the flow's learning rate, EMA and sampler), each with the same T tokenizer updates and F flow updates,
every part on its own schedule over its own updates (the tokenizer's: tokenizer.py's warm-up and cosine to a
tenth; the flow's: the preset's), so that the arms differ only in when the two overlap:

    frozen     tokenizer alone for T steps, then the flow alone for F steps on its frozen codes (tier 2's stages)
    finetune   tokenizer alone for T - J steps, the flow alone for F - J on those codes, then J steps together
    joint      tokenizer alone for W steps (a warm-up), then both together for the remaining F = T - W steps

The tokenizer alone is vq.py's exactly: k-means++ initialisation, EMA codebook updates, dead-code restarts. The
stages an arm shares with another (the tokenizer's first W and T - J steps, from the same seed) are trained once.

The gradient path of a step together. Images x with labels y; u = normalize(enc(x)) at each of the 7 x 7
positions; the codebook E = normalize(V) (K x d, unit rows) with V a parameter of the tokenizer's optimizer;
c = argmax_k <u, e_k>, the nearest code (an argmax: no gradient); sg is stop-gradient.

    L_rec  = |dec(u + sg(e_c - u)) - x|^2          reaches the decoder, and the encoder by straight-through
    L_code = |sg(u) - e_c|^2                       reaches E: the gradient form of the EMA update it replaces
    L_com  = beta |u - sg(e_c)|^2                  reaches the encoder (beta = 0.25, vq.py's)
    L_flow = CE(l_theta(z_t, t, y), c) + lambda lse(l_theta)^2,  z_t = (1 - t) z0 + t z1,  z1 = e_c
             on the first B_flow images of the batch: reaches the DiT, and E through z1 with weight w
    loss   = L_rec + L_code + L_com + L_flow;  dL/dE gets w dL_flow/dE (z1 = sg(e_c) + w (e_c - sg(e_c)))

The flow reaches no encoder or decoder weight: its target c is an argmax and its input z1 the code vector, not
u. What keeps the codes in place: they stay on the unit sphere (E = normalize(V)), so the flow's push cannot
spread them without bound, and L_code holds each used code to the mean direction of its encoder outputs, so
they cannot drift away from what the encoder produces or collapse onto one another while the encoder spreads.
Dead-code restarts stop while the flow trains: re-seeding code k would change what the flow's k-th logit means.
A code no image picks gets no gradient and stays where it is. `--flow-weight W` sets w (1 by default); the
stages without the two together do not depend on it and are shared by every weight, so the frozen arm trains
once.

Per arm: accuracy and FID-LeNet of `num_samples` guided samples (the preset's sampler) against the test split,
the tokenizer's reconstructions of the first `num_samples` training images scored the same way (the ceiling,
on the same footing), the test reconstruction MSE, codebook usage and perplexity on the test split, and the
geometry of the codes: the mean distance from each code to its nearest other code, the mean distance between
two codes (the spread), and how far the codes moved while the flow trained. Each arm saves its own tokenizer and
its flow (ARM/tokenizer.pt, ARM/flow.pt): `python sample.py --config fmnist --ckpt ARM/flow.pt` decodes through
the decoder that moved.
"""

import copy
import dataclasses
import json
import math
import os
import re
import time

import numpy as np
import torch
import torch.nn.functional as F

import evaluate
import train
import vfm
import vq
from experiments.studies.common import (clock, load_flow, need_scoring, refuse_to_replace, score, timed_draw,
                                        write_outputs)
from experiments.studies.joint_report import ARMS, class_rows, figure_curves, figure_pictures, note, table
from support import checkpoint, config, datasets, files, images, tokenizers
from support.cli import UserError, user_errors
from support.schedule import learning_rate
from tokenizer import reconstruction_metrics

BUDGETS = {
    "tiny": dict(tokenizer_steps=6, flow_steps=5, together=2, warmup=1, tokenizer_batch=16, flow_batch=8,
                 limit=256, seeds=2, num_samples=20, sample_steps=2, log_every=2),
    "full": dict(tokenizer_steps=2800, flow_steps=2500, together=1000, warmup=300, tokenizer_batch=128,
                 flow_batch=32, limit=None, seeds=2, num_samples=1000, sample_steps=None, log_every=100),
}
FLOW_WEIGHT = 1.0  # w: the flow's term in the codebook's gradient (--flow-weight)
TOKENIZER_LR, TOKENIZER_WARMUP = 4e-3, 100  # tier 2's tokenizer (configs/fmnist.json, tokenizer.py's warm-up)
PRESETS = {"fashion-mnist": "fmnist", "mnist": "mnist"}


# ---- The codebook moved by gradient ----------------------------------------------------------------------

class GradientCodebook(vq.VectorQuantizer):
    """vq.VectorQuantizer with its codes E = normalize(V) moved by gradient (V a parameter) instead of EMA updates
    and restarts. forward(z) -> (z_q, indices, L_code + L_com), as vq.py's returns (z_q, indices, L_com)."""

    def __init__(self, quantizer):
        super().__init__(quantizer.num_codes, quantizer.dim, quantizer.beta, quantizer.decay, quantizer.dead_after,
                         quantizer.kmeans_iters)
        self.load_state_dict(quantizer.state_dict())
        self.weight = torch.nn.Parameter(self.embedding.clone())  # V, (K, d)

    @property
    def codebook(self):
        return F.normalize(self.weight, dim=1)  # (K, d) unit rows, carrying the gradient to V

    def lookup(self, z):
        return (z @ self.codebook.detach().T).argmax(dim=1)

    def forward(self, z):
        B, d, h, w = z.shape
        flat = F.normalize(z, dim=1).permute(0, 2, 3, 1).reshape(-1, d)  # (N, d) unit vectors u
        indices = self.lookup(flat.detach())  # (N,)
        e = self.codebook[indices]  # (N, d) e_c
        code_loss, commitment_loss = self.losses(flat, e)
        z_q = (flat + (e - flat).detach()).view(B, h, w, d).permute(0, 3, 1, 2)  # forward e_c, backward to u
        return z_q, indices.view(B, h, w), code_loss + commitment_loss

    def losses(self, u, e):
        """(L_code, L_com) of unit encoder outputs u (N, d) and their codes e (N, d)."""
        return F.mse_loss(e, u.detach()), self.beta * F.mse_loss(u, e.detach())


def scale_grad(x, w):
    """x in the forward pass, w times its gradient in the backward."""
    return x.detach() + w * (x - x.detach())


class StepLoss:
    """What train.train_step calls the objective: loss(dit, images, labels) is one step's whole loss. Together,
    the tokenizer's three terms and the flow's, as the module docstring writes them; with the tokenizer frozen,
    the flow's alone on its codes (the first flow_batch images). `terms` holds the last step's terms
    (tensors: rec, vq = L_code + L_com, flow), `parts` their values."""

    def __init__(self, tok, flow, flow_batch, together, flow_weight=FLOW_WEIGHT):
        self.tok, self.flow, self.flow_batch = tok, flow, flow_batch
        self.together, self.flow_weight, self.terms, self.parts = together, flow_weight, {}, {}

    def loss(self, dit, x, y, z0=None):
        parts, n = {}, self.flow_batch
        if self.together:
            z_q, codes, parts["vq"] = self.tok.quantizer(self.tok.encoder(x))
            parts["rec"] = F.mse_loss(self.tok.decoder(z_q), x)
            self.flow.codebook = vfm.flow_codebook(scale_grad(self.tok.quantizer.codebook, self.flow_weight),
                                                   self.flow.codebook_scale)
            codes = codes[:n]
        else:
            codes = self.tok.encode(x[:n])
            self.flow.codebook = vfm.flow_codebook(self.tok.codebook, self.flow.codebook_scale)
        parts["flow"], per_sample, t = self.flow.loss(dit, codes, y[:n])
        self.terms, self.parts = parts, {k: v.item() for k, v in parts.items()}
        return sum(parts.values()), per_sample, t


# ---- One arm's stages ------------------------------------------------------------------------------------

def batch_indices(n_images, batch, step, seed):
    """The images of a step: a fresh permutation each epoch, a function of (seed, epoch) alone, so that a stage
    started from a saved state draws what an unbroken run would."""
    per_epoch = n_images // batch
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[i * batch:(i + 1) * batch]


def code_geometry(codebook):
    """Mean distance from each code to its nearest other code, and the mean distance between two codes."""
    dist = torch.cdist(codebook.double(), codebook.double())  # (K, K)
    K = len(codebook)
    nearest = dist.masked_fill(torch.eye(K, dtype=torch.bool), float("inf")).min(1).values
    return dict(nearest=round(nearest.mean().item(), 4), spread=round((dist.sum() / (K * (K - 1))).item(), 4))


def flow_settings(preset, seed):
    """train.py's settings of the preset's flow, as its checkpoints record them."""
    kw = {k: v for k, v in config.load_preset(preset, "train").items() if k in train.Settings.__dataclass_fields__}
    return train.Settings(codes="(images, encoded as they are read)", out="-", seed=seed, **kw)


class Arm:
    """One arm of one seed: its tokenizer (vq.MnistVQ), flow (DiT, EMA, AdamW), their optimizers and step counts,
    and the log of its training. state() / load() make a stage's end a file the next run starts from."""

    def __init__(self, b, preset, seed, num_codes, flow_weight=FLOW_WEIGHT):
        torch.manual_seed(seed)
        self.flow_weight = flow_weight
        self.tok = vq.MnistVQ(num_codes=num_codes)
        self.tok_opt = torch.optim.Adam(self.tok.parameters(), lr=TOKENIZER_LR)
        self.settings = flow_settings(preset, seed)
        s = dataclasses.asdict(self.settings)
        self.dit, self.flow = checkpoint.build(s, self.tok.codebook, (7, 7), 10)
        self.ema = copy.deepcopy(self.dit).requires_grad_(False)
        self.opt = train.build_optimizer(self.dit, self.settings.lr, self.settings.weight_decay, torch.device("cpu"))
        self.b, self.seed, self.tok_step, self.flow_step, self.log, self.start_codes = b, seed, 0, 0, [], None

    def state(self):
        return dict(tok=self.tok.state_dict(), tok_opt=self.tok_opt.state_dict(), dit=self.dit.state_dict(),
                    ema=self.ema.state_dict(), opt=self.opt.state_dict(), tok_step=self.tok_step,
                    flow_step=self.flow_step, log=self.log, start_codes=self.start_codes,
                    gradient=isinstance(self.tok.quantizer, GradientCodebook))

    def load(self, state):
        if state["gradient"]:
            self.gradient_codebook()
        for key in ("tok", "tok_opt", "dit", "ema", "opt"):
            getattr(self, key).load_state_dict(state[key])
        self.tok_step, self.flow_step, self.log = state["tok_step"], state["flow_step"], state["log"]
        self.start_codes = state["start_codes"]

    def gradient_codebook(self):
        """From here on the codes move by gradient (the tokenizer's optimizer gets V, at its learning rate)."""
        self.tok.quantizer = GradientCodebook(self.tok.quantizer)
        self.tok_opt.add_param_group(dict(params=[self.tok.quantizer.weight]))

    def run(self, stage, steps, pixels, labels):
        """`steps` steps of one stage: "tokenizer" alone, "flow" alone on the frozen tokenizer's codes, or both
        "together"."""
        b, s = self.b, self.settings
        if stage == "together" and not isinstance(self.tok.quantizer, GradientCodebook):
            self.gradient_codebook()
            self.start_codes = self.tok.codebook.clone()
        if stage == "flow" and self.start_codes is None:
            self.start_codes = self.tok.codebook.clone()
        trainee = train.Trainee(self.dit, self.dit, self.ema, self.opt, torch.amp.GradScaler("cpu", enabled=False),
                                torch.autocast("cpu", enabled=False))
        step_loss = StepLoss(self.tok, self.flow, b["flow_batch"], together=stage == "together",
                             flow_weight=self.flow_weight)
        for i in range(steps):
            tokenizer_updates = stage != "flow"
            torch.manual_seed(self.seed * 1_000_003 + self.tok_step * 7919 + self.flow_step)  # a stage-free stream
            batch = b["tokenizer_batch"] if tokenizer_updates else b["flow_batch"]
            pick = batch_indices(len(pixels), batch, self.tok_step if tokenizer_updates else self.flow_step,
                                 self.seed + (0 if tokenizer_updates else 1))
            x, y = images.to_float(pixels[pick]), labels[pick]
            if tokenizer_updates:
                self.tok.train()
                tok_lr = learning_rate(self.tok_step, b["tokenizer_steps"], TOKENIZER_LR, warmup=TOKENIZER_WARMUP,
                                       final=0.1)
                for group in self.tok_opt.param_groups:
                    group["lr"] = tok_lr
            else:
                self.tok.eval()
            if stage == "tokenizer":
                reconstruction, _, vq_loss = self.tok(x)
                parts = dict(rec=F.mse_loss(reconstruction, x), vq=vq_loss)
                sum(parts.values()).backward()
                parts = {k: v.item() for k, v in parts.items()}
            else:
                n = self.flow_step
                train.train_step(trainee, step_loss, [(x, y, None)],
                                 lr=learning_rate(n, b["flow_steps"], s.lr, s.warmup_steps, final=s.lr_final),
                                 grad_clip=s.grad_clip,
                                 ema_decay=min(s.ema_decay, (1 + n) / (10 + n)) if s.ema_warmup else s.ema_decay)
                parts = step_loss.parts
                self.flow_step += 1
            if tokenizer_updates:
                self.tok_opt.step()
                self.tok_opt.zero_grad(set_to_none=True)
                self.tok_step += 1
            if not all(np.isfinite(v) for v in parts.values()):
                raise UserError(f"seed {self.seed}, {stage} at tokenizer step {self.tok_step}, flow step "
                                f"{self.flow_step}: a loss is not a finite number ({parts})")
            if (self.tok_step if stage == "tokenizer" else self.flow_step) % b["log_every"] == 0 or i == steps - 1:
                self.log.append(dict(stage=stage, tokenizer_step=self.tok_step, flow_step=self.flow_step,
                                     **{k: round(v, 5) for k, v in parts.items()},
                                     **code_geometry(self.tok.codebook.detach())))
        self.tok.eval()

    def save(self, arm_dir, dataset):
        """ARM/tokenizer.pt (what `tokenizer.py train` writes, its codebook the final E) and ARM/flow.pt (a kept
        step of train.py: the EMA flow, sampled by sample.py and decoded through that tokenizer)."""
        plain = vq.MnistVQ(**self.tok.config)
        weights = {k: v for k, v in self.tok.state_dict().items() if k != "quantizer.weight"}
        weights["quantizer.embedding"] = self.tok.codebook.detach().clone()
        plain.load_state_dict(weights)
        tok_path, flow_path = os.path.join(arm_dir, "tokenizer.pt"), os.path.join(arm_dir, "flow.pt")
        os.makedirs(arm_dir, exist_ok=True)
        files.save_torch(tok_path, tokenizers.mnist_checkpoint(plain, metrics={}, args={}))
        meta = dict(grid=[7, 7], num_classes=10, views=1, dataset=dataset, num_codes=plain.quantizer.num_codes,
                    code_dim=plain.quantizer.dim, class_names=datasets.CLASS_NAMES[dataset],
                    tokenizer=tokenizers.record(tok_path))
        checkpoint.save_ema(flow_path, self.ema, self.flow_step, dataclasses.asdict(self.settings),
                            plain.codebook.clone(), meta)
        return plain, flow_path


STAGES = {  # arm -> [(stage, steps)] in terms of the budget
    "frozen": lambda b: [("tokenizer", b["tokenizer_steps"]), ("flow", b["flow_steps"])],
    "finetune": lambda b: [("tokenizer", b["tokenizer_steps"] - b["together"]),
                           ("flow", b["flow_steps"] - b["together"]), ("together", b["together"])],
    "joint": lambda b: [("tokenizer", b["warmup"]), ("together", b["tokenizer_steps"] - b["warmup"])],
}


def train_arm(arm_name, seed, b, preset, seed_dir, data, flow_weight=FLOW_WEIGHT):
    """Train one arm stage by stage. The end of each stage is saved in seed_dir (its name the stages so far, with
    the flow weight of a stage together where it is not 1) and reused by a later run, or by another arm or flow
    weight with the same first stages; an arm's first stage, the tokenizer alone, goes on from the longest shorter
    one kept (the tokenizer's schedule, data and random draws are functions of its step, so this is what an
    unbroken run gives). Returns (Arm, {stage: seconds})."""
    arm, done, seconds = Arm(b, preset, seed, num_codes=256, flow_weight=flow_weight), [], {}
    os.makedirs(seed_dir, exist_ok=True)
    for stage, steps in STAGES[arm_name](b):
        done.append(f"{stage}{steps}" + (f"w{flow_weight:g}" if stage == "together" and flow_weight != 1 else ""))
        path = os.path.join(seed_dir, "-".join(done) + ".pt")
        earlier = path if os.path.exists(path) else shorter_first_stage(seed_dir, steps) if len(done) == 1 else None
        spent = 0.0
        if earlier:
            with user_errors():
                state = files.load_torch(earlier, "a stage of the joint study", weights_only=False)
            arm.load(state)
            spent = state["seconds"]
            if earlier == path:
                seconds[stage] = spent
                continue
        left = steps - arm.tok_step if len(done) == 1 else steps
        print(f"  seed {seed} {arm_name}: {stage} for {left} steps", flush=True)
        t0 = time.time()
        arm.run(stage, left, *data)
        seconds[stage] = round(spent + time.time() - t0, 1)
        files.save_torch(path, dict(arm.state(), seconds=seconds[stage]))
    return arm, seconds


def shorter_first_stage(seed_dir, steps):
    """The kept tokenizer-alone stage of the most steps below `steps`, or None."""
    kept = [re.fullmatch(r"tokenizer(\d+)\.pt", n) for n in os.listdir(seed_dir)]
    below = [(int(m.group(1)), m.group(0)) for m in kept if m and int(m.group(1)) < steps]
    return os.path.join(seed_dir, max(below)[1]) if below else None


# ---- The study -------------------------------------------------------------------------------------------

def run(args):
    b, start = BUDGETS[args.budget], clock()
    w = args.flow_weight
    if not 0 <= w < math.inf:
        raise UserError(f"--flow-weight {w}: expected a number >= 0 (0: the flow's loss does not reach the codes)")
    name = f"joint-{args.data}" + ("" if w == 1 else f"-w{w:g}")
    refuse_to_replace(args, name, [name, name + "-samples"])
    need_scoring(args.data, args)
    preset = PRESETS[args.data]
    sampler = config.load_preset(preset, "sample")
    draw_settings = dict(steps=b["sample_steps"] or sampler["steps"], solver=sampler["solver"],
                         cfg_scale=sampler["cfg_scale"], cfg_interval=vfm.parse_cfg_interval(sampler["cfg_interval"]))
    settings = dict(b, tokenizer_lr=TOKENIZER_LR, preset=preset, sampler=draw_settings)  # of every stage kept
    work = os.path.join(args.out, f"joint-{args.data}")  # the stages of every flow weight
    check_settings(work, settings)
    with user_errors():
        pixels, labels = datasets.load_mnist(args.data, args.data_dir, "train")
        test_pixels, _ = datasets.load_mnist(args.data, args.data_dir, "test")
    if b["limit"]:
        pixels, labels, test_pixels = pixels[:b["limit"]], labels[:b["limit"]], test_pixels[:b["limit"]]
    pixels, labels = torch.from_numpy(pixels), torch.from_numpy(labels)
    rows, pictures = [], {}
    for seed in range(args.seed, args.seed + b["seeds"]):
        for arm_name in sorted(ARMS, key=lambda a: STAGES[a](b)[0][1]):  # the shortest first stage first
            seed_dir = os.path.join(work, f"seed-{seed}")
            arm, seconds = train_arm(arm_name, seed, b, preset, seed_dir, (pixels, labels), w)
            weighed = w != 1 and any(stage == "together" for stage, _ in STAGES[arm_name](b))
            arm_dir = os.path.join(seed_dir, arm_name + (f"-w{w:g}" if weighed else ""))
            tok, flow_path = arm.save(arm_dir, args.data)
            flow = load_flow(flow_path, ("purrception",), "the joint study")
            samples, sample_labels, sample_seconds = timed_draw(flow, b["num_samples"], seed, **draw_settings)
            recon = evaluate.reconstruct(tok, pixels[:b["num_samples"]].numpy())  # (n, 28, 28, 1)
            tok_metrics = reconstruction_metrics(tok, test_pixels)
            moved = (tok.codebook - arm.start_codes).norm(dim=1).mean().item()
            rows.append(dict(arm=arm_name, seed=seed, **score(samples, sample_labels, args.data, args),
                             ceiling=score(recon, labels[:b["num_samples"]].numpy(), args.data, args),
                             test_mse=round(tok_metrics["mse"], 5), usage=round(tok_metrics["usage"], 4),
                             perplexity=round(tok_metrics["perplexity"], 1), moved=round(moved, 4),
                             **code_geometry(tok.codebook), seconds=seconds, sample_seconds=round(sample_seconds, 1),
                             tokenizer=os.path.abspath(os.path.join(arm_dir, "tokenizer.pt")),
                             flow=os.path.abspath(flow_path), log=arm.log))
            r = rows[-1]
            print(f"  seed {seed} {arm_name:<8}: accuracy {r['accuracy']:.3f}  FID {r['fid']:.2f}  (ceiling "
                  f"{r['ceiling']['accuracy']:.3f}, {r['ceiling']['fid']:.2f})  usage {r['usage']:.2f}  nearest code "
                  f"{r['nearest']:.3f}  moved {r['moved']:.3f}", flush=True)
            if seed == args.seed:
                real = pixels[:b["num_samples"]].numpy()[..., None]  # (n, 28, 28, 1)
                pictures[arm_name] = class_rows(samples, sample_labels, real, recon, labels[:b["num_samples"]].numpy())
    figures = {name: figure_curves(rows, b, args.data),
               name + "-samples": figure_pictures({a: pictures[a] for a in ARMS})}
    return write_outputs(args, name, table(rows, b), note(b, draw_settings, preset, args.seed, w, TOKENIZER_LR),
                         dict(settings=settings, flow_weight=w, dataset=args.data, seeds=b["seeds"], rows=rows), start,
                         figures)


def check_settings(work, settings):
    """The stages kept in OUT/joint-DATA were trained with these settings, or none are there yet."""
    path = os.path.join(work, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            earlier = json.load(f)
        if earlier != json.loads(json.dumps(settings)):
            raise UserError(f"{work}: stages trained with other settings ({path}); choose another --out, or remove "
                            f"that folder")
    os.makedirs(work, exist_ok=True)
    files.write_json(path, settings)
