"""
Purrception: variational flow matching over vector-quantized latents (arXiv 2510.01478). The three baselines
of the paper's comparative study are in baselines.py, on the same backbone and training loop.

Conventions, stated once and used by every file in this repo
------------------------------------------------------------
* Time runs from noise to data: t = 0 is noise, t = 1 is data.
* A sample is a grid of code indices c of shape (B, *S) (S = (h, w) for images, (N,) for the toys) into a
  codebook E of shape (K, d); its embedding is z1 = E[c], of shape (B, *S, d), channels last.
* Source z0 ~ N(0, I) in the embedding space; path z_t = (1 - t) z0 + t z1 (the straight, rectified-flow path).
* Training times t ~ U[t_min, 1) with t_min = 1e-3, as in the authors' code (time_dist = "uniform", the
  default). The option "logit-normal:M:S" draws t = sigmoid(M + S n), n ~ N(0, 1), clamped to
  [t_min, 1 - t_min] (Esser et al. 2024, arXiv 2403.03206): it spends fewer training times near t = 0, where
  the posterior is still the prior of the codes and there is little to learn, and near t = 1, where the code
  is already plain to see. It changes where training looks, not the loss or the sampler.
* Codebook scale: the flow runs on the raw codebook E with N(0, I) noise, as the authors' code does
  (codebook_scale = "raw", the default). The option "rms" runs it on E / rms(E) (rms over all K * d entries),
  codes with the per-dimension scale of the source: sqrt(8) * E for LlamaGen's unit-sphere codes in d = 8.
  A global scale s leaves every nearest code unchanged (the tokenizer never sees it), and the flow on s E is
  the paper's flow under the time change t' = s t / (1 + (s - 1) t): the point at time t of the path to s e is
  (1 - t + s t) times the point at time t' of the path to e, from the same z0. For s > 1 (codes smaller than
  the noise) it spends training times and solver steps nearer the data: with s = sqrt(8), t' < 1/2 only for
  t < 0.26.
* Classes: y in [0, num_classes); the null class ("no label") is the index num_classes. During training labels
  are replaced by the null class with probability p_uncond = 0.1 (as DiT), so the same network is also the
  unconditional model that guidance needs. With num_classes = 0 every label is the null class.
* Classifier-free guidance: out = uncond + s * (cond - uncond). s = 1 is the conditional model (guidance off),
  s = 0 the unconditional one. It acts on the logits for Purrception and DFM (before the temperature), on the
  velocity for CFM and on the predicted endpoint for CFM-endpoint.
  A guidance interval [lo, hi] (Kynkäänniemi et al. 2024, arXiv 2404.07724) applies it only at the network
  evaluations with lo <= t <= hi; the others make one conditional pass. [0, 1], the default, is guidance
  everywhere.
* Sampling steps: `steps` is the number of intervals of the uniform grid 0 = t_0 < ... < t_steps = 1.
* Memory: samplers keep the network output in its dtype (bf16 under autocast), the rest CHUNK values at a time.

Purrception in the paper's notation
-----------------------------------
In the blog post's and the paper's symbols (READING.md maps each to the code): codes e_k, k in [0, K), the
rows of E; a position's code c, its embedding z1 = e_c. The network's logits l_theta(z_t, t) over the K codes
give pi_t^theta(z_t) = softmax(l_theta), a mean-field categorical posterior q_theta(c | z_t) = Cat(c | pi_t^theta).
Training is the cross-entropy -log q_theta(c | z_t) plus a z-loss lambda * mean(logsumexp(l)^2) that keeps the
log-partition from drifting (the paper names it; lambda = 1e-5 is the lambda_z of the authors' code). Sampling
integrates dz_t/dt = u_t(z_t) = (mu_t(z_t) - z_t) / (1 - t), mu_t(z_t) = sum_k pi_t^k(z_t) e_k the posterior mean
of z1, with pi_t^theta = softmax(l_theta / tau) at temperature tau, then snaps the end point to the nearest code.
"""

import math

import torch

SOLVERS = ("euler", "heun", "midpoint")
CODEBOOK_SCALES = ("raw", "rms")  # the first is the authors' code's and the default
T_MIN = 1e-3
Z_LOSS_WEIGHT = 1e-5
P_UNCOND = 0.1
EPS = 1e-6  # floor on 1 - t where the velocity divides by it
CHUNK = 2 ** 26  # float32 values a sampler handles at once: 256 MiB, 4,096 positions at K = 16,384 (not 67 GB)


# ---- Path, times, codebook scale -------------------------------------------------------------------------

def flow_codebook(codebook, scale="raw"):
    """The codebook the flow runs on: E itself ("raw", the authors' code's) or E / rms(E) ("rms")."""
    codebook = torch.as_tensor(codebook, dtype=torch.float32)
    if scale not in CODEBOOK_SCALES:
        raise ValueError(f"unknown codebook scale '{scale}'; choose from: {', '.join(CODEBOOK_SCALES)}")
    return codebook if scale == "raw" else codebook / codebook.pow(2).mean().sqrt().clamp_min(1e-12)


def sample_t(n, device, generator=None, t_min=T_MIN):
    """Training times t ~ U[t_min, 1)."""
    return t_min + (1 - t_min) * torch.rand(n, device=device, generator=generator)


def parse_time_dist(spec):
    """A training-time distribution spec -> a function (n, device, generator, t_min) -> t (n,).

    "uniform"             t ~ U[t_min, 1), the authors' code's
    "logit-normal:M:S"    t = sigmoid(M + S n), n ~ N(0, 1), clamped to [t_min, 1 - t_min]; M = 0, S = 1 is
                          Esser et al.'s, centred on t = 1/2; M > 0 moves the times toward the data
    """
    kind, *rest = str(spec).split(":")
    try:
        values = [float(v) for v in rest]
    except ValueError:
        values = []
    if kind == "uniform" and not rest:
        return sample_t
    if kind == "logit-normal" and len(values) == 2 and all(math.isfinite(v) for v in values) and values[1] > 0:
        m, s = values

        def logit_normal(n, device, generator=None, t_min=T_MIN):
            n01 = torch.randn(n, device=device, generator=generator)
            return torch.sigmoid(m + s * n01).clamp(t_min, 1 - t_min)

        return logit_normal
    raise ValueError(f"bad training-time distribution '{spec}': expected 'uniform' or 'logit-normal:M:S' with "
                     f"finite M and S > 0")


def interpolate(z0, z1, t):
    """z_t = (1 - t) z0 + t z1, with t of shape (B,) broadcast over the remaining dimensions."""
    t = t.view(-1, *([1] * (z1.dim() - 1)))
    return (1 - t) * z0 + t * z1


def chunks(rows, width):
    """Slices of `rows` rows of `width` values each, CHUNK values (and at least one row) a slice."""
    step = max(1, CHUNK // max(1, width))
    return [slice(lo, lo + step) for lo in range(0, rows, step)]


def snap(z, codebook):
    """Nearest codebook entry of every position: (B, *S, d) -> (B, *S) code indices, a chunk of positions at a time."""
    flat, norms = z.reshape(-1, z.shape[-1]).float(), codebook.pow(2).sum(1)  # (B*S, d), (K,)
    nearest = [(f.pow(2).sum(1, keepdim=True) - 2 * f @ codebook.T + norms).argmin(1)  # (n, K) -> (n,)
               for f in (flat[rows] for rows in chunks(len(flat), len(codebook)))]
    return torch.cat(nearest).view(z.shape[:-1])


def drop_labels(y, num_classes, p_uncond, generator=None):
    """Replace each label by the null class (index num_classes) with probability p_uncond."""
    if y is None:
        return None
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p_uncond
    return torch.where(drop, torch.full_like(y, num_classes), y)


def null_labels(batch, num_classes, device):
    return torch.full((batch,), num_classes, dtype=torch.long, device=device)


# ---- Temperature: a constant, or a schedule over t -------------------------------------------------------

def parse_temperature(spec):
    """A temperature spec -> a function t -> tau.

    "0.9"               constant tau = 0.9
    "linear:1.2:0.8"    tau goes linearly from 1.2 at t = 0 to 0.8 at t = 1
    "cosine:1.2:0.8"    the same ends, along a half cosine (flat at both ends)
    A number or a callable passes through.
    """
    if callable(spec):
        return spec
    if isinstance(spec, (int, float)):
        values, kind = [float(spec)], "constant"
    else:
        kind, *rest = str(spec).split(":") if ":" in str(spec) else ("constant", str(spec))
        try:
            values = [float(v) for v in rest]
        except ValueError:
            values = []
    if kind == "constant" and len(values) == 1:
        tau0 = tau1 = values[0]
    elif kind in ("linear", "cosine") and len(values) == 2:
        tau0, tau1 = values
    else:
        raise ValueError(f"bad temperature '{spec}': expected a number, 'linear:T0:T1' or 'cosine:T0:T1'")
    if not all(0 < tau < math.inf for tau in (tau0, tau1)):
        raise ValueError(f"bad temperature '{spec}': temperatures must be finite numbers > 0")
    if kind == "cosine":
        return lambda t: tau1 + (tau0 - tau1) * 0.5 * (1 + math.cos(math.pi * t))
    return lambda t: tau0 + (tau1 - tau0) * t


def parse_cfg_interval(spec):
    """'LO:HI' (or a pair) -> (lo, hi) with 0 <= lo <= hi <= 1: the times at which guidance acts."""
    try:
        lo, hi = (float(v) for v in (spec.split(":") if isinstance(spec, str) else spec))
    except (ValueError, TypeError):
        lo = hi = math.nan
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"bad guidance interval '{spec}': expected LO:HI with 0 <= LO <= HI <= 1")
    return lo, hi


def guidance_at(t, cfg_scale, cfg_interval=(0.0, 1.0)):
    """The guidance scale of an evaluation at time t: cfg_scale inside the interval, 1 (no guidance) outside. The
    ends are inclusive up to 1e-9, so that a grid time such as 3 / 10 (0.30000000000000004 in floating point)
    is inside [0, 0.3]."""
    lo, hi = cfg_interval
    return cfg_scale if lo - 1e-9 <= t <= hi + 1e-9 else 1.0


# ---- ODE solvers over the grid t_0 = 0 < ... < t_steps = 1 -----------------------------------------------

def solve_ode(velocity, z, steps, solver="euler"):
    """Integrate dz/dt = velocity(z, t) from t = 0 to t = 1 in `steps` uniform steps.

    euler     1 evaluation a step, at t_i: t = 1 is never evaluated.
    midpoint  2 evaluations a step, at t_i and t_i + h/2: t = 1 is never evaluated.
    heun      2 evaluations a step (predictor at t_i, corrector at t_i+1), except the last step, which is an
              Euler step: its corrector would sit at t = 1, where (mu - z) / (1 - t) is singular. Nothing is
              lost: an Euler step of length 1 - t on u = (mu - z)/(1 - t) lands exactly on mu.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver '{solver}'; choose from: {', '.join(SOLVERS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ts = torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist()
    for i in range(steps):
        t, h = ts[i], ts[i + 1] - ts[i]
        v = velocity(z, t)
        if solver == "midpoint":
            z = z + h * velocity(z + 0.5 * h * v, t + 0.5 * h)
        elif solver == "heun" and i < steps - 1:
            z_pred = z + h * v
            z = z + 0.5 * h * (v + velocity(z_pred, ts[i + 1]))
        else:
            z = z + h * v
    return z


def evaluation_times(steps, solver):
    """The times t at which solve_ode (and DFM's sampler, as "euler") evaluates the network, in order: t_i for
    each step, and t_i + h/2 (midpoint) or t_i+1 (heun, every step but the last) for the second evaluation."""
    times = []
    solve_ode(lambda z, t: times.append(t) or z, torch.zeros(()), steps, solver)
    return times


def num_evaluations(steps, solver):
    """Network evaluations per sample (NFE) of solve_ode: steps (euler), 2 steps (midpoint), 2 steps - 1 (heun)."""
    return len(evaluation_times(steps, solver))


def guided_evaluations(steps, solver, cfg_scale, cfg_interval=(0.0, 1.0), guidable=True, times=None):
    """Network passes per sample (what sample.py records as `nfe`): two at each evaluation where guidance acts
    (cfg_scale not 0 or 1, as Objective.guided, and t in the interval), one elsewhere. guidable=False (a model
    without classes): one everywhere. times: the evaluation times, where not solve_ode's (DFM.schedule's)."""
    on = guidable and cfg_scale not in (0, 1)
    return sum(2 if on and guidance_at(t, cfg_scale, cfg_interval) != 1 else 1
               for t in (evaluation_times(steps, solver) if times is None else times))


# ---- Objectives ------------------------------------------------------------------------------------------

def cross_entropy_with_z_loss(logits, codes, z_loss_weight):
    """Per-sample loss (B,) of logits (B, *S, K) against codes (B, *S): -log softmax(l)_c + lambda * logsumexp(l)^2,
    averaged over the positions. Purrception's and DFM's loss."""
    lse = torch.logsumexp(logits, dim=-1)  # (B, *S): one pass over the K logits serves both terms
    ce = lse - logits.gather(-1, codes.unsqueeze(-1)).squeeze(-1)  # (B, *S): -log softmax(l)_c
    per_position = ce + z_loss_weight * lse.pow(2)  # (B, *S)
    return per_position.reshape(codes.shape[0], -1).mean(1)  # (B,)


class Objective:
    """What a method trains and how it samples: a ContinuousFlow (Purrception, and the baselines CFM and
    CFMEndpoint of baselines.py) or DFM (baselines.py).

    The network is any callable model(x, t, y): x (B, *S, d) float (or (B, *S) long for DFM), t (B,) in [0, 1],
    y (B,) long with the null class num_classes; it returns (B, *S, out_dim).
    Every objective takes the same keywords: p_uncond (label dropout), t_min (the least training time),
    z_loss_weight (lambda of the z-loss of Purrception and DFM; the CFM baselines do not use it),
    codebook_scale ("raw" or "rms") and time_dist (the training times: "uniform" or "logit-normal:M:S"; see the
    conventions above).
    """

    name = None

    def __init__(self, codebook, num_classes=0, *, p_uncond=P_UNCOND, t_min=T_MIN, z_loss_weight=Z_LOSS_WEIGHT,
                 codebook_scale="raw", time_dist="uniform"):
        self.codebook = flow_codebook(codebook, codebook_scale)  # (K, d)
        self.codebook_scale = codebook_scale
        self.time_dist, self._draw_times = time_dist, parse_time_dist(time_dist)
        self.num_codes, self.code_dim = self.codebook.shape
        self.num_classes, self.p_uncond, self.t_min = num_classes, p_uncond, t_min
        self.z_loss_weight = z_loss_weight

    def model_io(self):
        """Keyword arguments that size the network: in_dim, out_dim, input_vocab."""
        raise NotImplementedError

    def loss(self, model, codes, y=None, generator=None, z0=None):
        """Returns (scalar loss, per-sample loss (B,), t (B,)): the last two for loss-by-t logging. z0 (B, *S, d):
        the source noise of each sample, where it is fixed (a reflow student's couplings); fresh otherwise."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, model, shape, *, y=None, steps=100, solver="euler", temperature=1.0, cfg_scale=1.0,
               generator=None, callback=None, cfg_interval=(0.0, 1.0), z0=None):
        """Generate code grids of shape (B, *S). callback(t, z, out) sees every network evaluation; guidance acts
        at the evaluations with t in cfg_interval; z0 (B, *S, d): the noise to start from (drawn from generator
        otherwise, as noise() draws it)."""
        raise NotImplementedError

    def noise(self, shape, generator=None):
        """The source noise z0 of shape (B, *S, d); DFM, whose source is all masks, raises ValueError."""
        raise NotImplementedError

    def to(self, device):
        self.codebook = self.codebook.to(device)
        return self

    def embed(self, codes):
        return self.codebook.to(codes.device)[codes]  # (B, *S, d)

    def labels(self, y, batch, device):
        return null_labels(batch, self.num_classes, device) if y is None else y

    def guided_rows(self, model, x, t, y, cfg_scale):
        """The model's output under classifier-free guidance, uncond + s * (cond - uncond), in float32 a chunk of
        positions at a time: (shape (B, *S, out_dim), iterator of (rows, out (n, out_dim))), rows a slice of the
        B * prod(S) positions. The model's output stays in its dtype; each chunk gets the arithmetic of the whole."""
        B = x.shape[0]
        null = null_labels(B, self.num_classes, x.device)
        t = torch.full((B,), float(t), device=x.device) if not torch.is_tensor(t) else t
        if y is None or cfg_scale in (0, 1):
            parts = [model(x, t, null if y is None or cfg_scale == 0 else y)]
        else:  # cond and uncond: the two halves of one pass
            parts = list(model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2))
        flat = [p.reshape(-1, p.shape[-1]) for p in parts]  # (B * prod(S), out_dim) views
        guide = (lambda c: c[0]) if len(flat) == 1 else (lambda c: c[1] + cfg_scale * (c[0] - c[1]))  # c: cond, uncond
        return parts[0].shape, ((r, guide([p[r].float() for p in flat])) for r in chunks(*flat[0].shape))

    def guided(self, model, x, t, y, cfg_scale):
        """The model's whole output under guidance, (B, *S, out_dim) float32: what a sampler's callback sees."""
        shape, rows = self.guided_rows(model, x, t, y, cfg_scale)
        return torch.cat([out for _, out in rows]).view(shape)

    def _draw_t(self, codes, generator):
        return self._draw_times(codes.shape[0], codes.device, generator, self.t_min)


class ContinuousFlow(Objective):
    """A flow on the straight path from z0 ~ N(0, I) to z1 = E[c]: the loss scores the network output at z_t with
    per_sample_loss; the sampler integrates its velocity to t = 1 and snaps to the nearest code. A subclass says
    what the network outputs: model_io, per_sample_loss and velocity."""

    def noise(self, shape, generator=None):
        """z0 ~ N(0, I) of shape (B, *S, d): the source of the flow."""
        return torch.randn(*shape, self.code_dim, device=self.codebook.device, generator=generator)

    def loss(self, model, codes, y=None, generator=None, z0=None):
        t, y, z0 = self.draw(codes, y, generator, z0)
        per_sample = self.scored(model, codes, t, y, z0)  # (B,)
        return per_sample.mean(), per_sample.detach(), t

    def draw(self, codes, y=None, generator=None, z0=None):
        """The loss's random part: t (B,), the labels y (B,) with some dropped, and z0 (B, *S, d) unless given."""
        z0 = torch.randn(*codes.shape, self.code_dim, device=codes.device, generator=generator) if z0 is None else z0
        t = self._draw_t(codes, generator)  # (B,)
        y = drop_labels(self.labels(y, codes.shape[0], codes.device), self.num_classes, self.p_uncond, generator)
        return t, y, z0

    def scored(self, model, codes, t, y, z0):
        """The rest of the loss, free of randomness: the per-sample loss (B,) of the network's output at z_t."""
        z1 = self.embed(codes)  # (B, *S, d)
        return self.per_sample_loss(model(interpolate(z0, z1, t), t, y).float(), codes, z0, z1)  # (B,)

    def per_sample_loss(self, out, codes, z0, z1):
        """The loss of each sample (B,) from the network output at z_t (B, *S, out_dim), the codes and z0, z1."""
        raise NotImplementedError

    def velocity(self, out, z, t, tau):
        """The velocity u(z, t), (B, *S, d), from the (guided) network output (B, *S, out_dim) at z (B, *S, d),
        at temperature tau; position by position, so that the sampler can take it a chunk of positions at a time."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, model, shape, *, y=None, steps=100, solver="euler", temperature=1.0, cfg_scale=1.0,
               generator=None, callback=None, cfg_interval=(0.0, 1.0), z0=None):
        tau = parse_temperature(temperature)
        z = self.noise(shape, generator) if z0 is None else z0  # (B, *S, d): z0 ~ N(0, I)

        def u(z, t):  # (B, *S, d): velocity() chunk by chunk of positions, or of the whole output a callback sees
            shape, rows = self.guided_rows(model, z, t, y, guidance_at(t, cfg_scale, cfg_interval))
            if callback is not None:
                out = torch.cat([o for _, o in rows]).view(shape)  # (B, *S, out_dim)
                callback(t, z, out)
                return self.velocity(out, z, t, tau(t))
            flat = z.reshape(-1, z.shape[-1])  # (B * prod(S), d)
            return torch.cat([self.velocity(out, flat[r], t, tau(t)) for r, out in rows]).view_as(z)

        return snap(solve_ode(u, z, steps, solver), self.codebook)  # (B, *S)


class Purrception(ContinuousFlow):
    """Variational flow matching with a categorical posterior over the codes (the paper's method, in its notation
    above): logits l_theta(z_t, t) over the K codes, cross-entropy plus the z-loss, u = (mu - z) / (1 - t)."""

    name = "purrception"

    def model_io(self):
        return dict(in_dim=self.code_dim, out_dim=self.num_codes, input_vocab=None)

    def per_sample_loss(self, logits, codes, z0, z1):
        """-log q_theta(c | z_t) + lambda * logsumexp(l)^2 (the z-loss), averaged over the positions: (B,)."""
        return cross_entropy_with_z_loss(logits, codes, self.z_loss_weight)

    def posterior_mean(self, logits, tau):
        """mu = softmax(l / tau) @ E: the expected code embedding under the posterior at temperature tau, (B, *S, K)
        (any float dtype) -> (B, *S, d) float32, a chunk of positions at a time."""
        flat = logits.reshape(-1, logits.shape[-1])  # (B * prod(S), K)
        mu = [torch.softmax(flat[rows].float() / tau, dim=-1) @ self.codebook for rows in chunks(*flat.shape)]
        return torch.cat(mu).view(*logits.shape[:-1], self.code_dim)  # (n, K) @ (K, d) -> (n, d), chunk by chunk

    def velocity(self, logits, z, t, tau):
        """u = (mu - z) / (1 - t), (B, *S, d), from the logits (B, *S, K) at z (B, *S, d)."""
        return (self.posterior_mean(logits, tau) - z) / max(1 - t, EPS)  # (B, *S, d)

