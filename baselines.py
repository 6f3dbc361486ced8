"""
The three baselines of Purrception's comparative study (arXiv 2510.01478), trained and sampled with its backbone
and loop, and the registry of all four objectives.

* CFM: conditional flow matching; the network regresses the velocity z1 - z0 of the straight path.
* CFM-endpoint: the network regresses the end point z1; the velocity is (z1_hat - z) / (1 - t).
* DFM: discrete flow matching (Gat et al. 2024) over the code indices themselves, from an all-mask source.

CFM and CFM-endpoint share Purrception's path, loss and sampler (vfm.ContinuousFlow) and differ from it only in
what the network outputs; DFM has its own path and sampler.
"""

import torch

import vfm

DFM_SAMPLERS = ("reveal", "redraw")  # this repo's (the default), and the authors' (github:razvanmatisan/purrception)
REDRAW_T0 = 1e-4  # the first time of the authors' sampler (utils/sample_utils.py, sample_dfm's t_min)


class CFM(vfm.ContinuousFlow):
    """Conditional flow matching: the network outputs the velocity itself, v (B, *S, d), trained by MSE against
    z1 - z0."""

    name = "cfm"

    def model_io(self):
        return dict(in_dim=self.code_dim, out_dim=self.code_dim, input_vocab=None)

    def per_sample_loss(self, v, codes, z0, z1):
        return (v - (z1 - z0)).pow(2).flatten(1).mean(1)  # (B, *S, d) -> (B,)

    def velocity(self, v, z, t, tau):
        return v  # (B, *S, d)


class CFMEndpoint(vfm.ContinuousFlow):
    """Flow matching with an endpoint (data) prediction: the network outputs z1_hat (B, *S, d), trained by MSE
    against z1; the velocity is (z1_hat - z) / (1 - t)."""

    name = "cfm-endpoint"

    def model_io(self):
        return dict(in_dim=self.code_dim, out_dim=self.code_dim, input_vocab=None)

    def per_sample_loss(self, z1_hat, codes, z0, z1):
        return (z1_hat - z1).pow(2).flatten(1).mean(1)  # (B, *S, d) -> (B,)

    def velocity(self, z1_hat, z, t, tau):
        return (z1_hat - z) / max(1 - t, vfm.EPS)  # (B, *S, d)


class DFM(vfm.Objective):
    """Discrete flow matching (Gat et al. 2024) with a masked source and the scheduler kappa_t = t.

    The source is all-mask (token index K); x_t keeps each true code with probability kappa_t = t and masks it
    otherwise. The network embeds each of the K + 1 tokens straight into its width (as the paper's DFM does) and
    predicts p(c | x_t) at every position; the loss is the cross-entropy over all positions plus the z-loss, as
    in the paper's code (masked positions only would weight each sample by about 1 / (1 - t)). The network gives
    K logits (the paper's code gives K + 1, the mask's never a target). Two samplers (`sampler`), both steps of
    r = h * kappa'(t) / (1 - kappa(t)) = h / (1 - t) over [t, t + h], p1 = softmax(l / tau):
      reveal  (this repo's, the default) the discrete Euler step at t_i = i / steps: a masked token is revealed
              with probability r, its code drawn from p1; a revealed token keeps its code; the last step (r = 1)
              reveals every remaining token. `steps` network evaluations.
      redraw  the authors' sampler: every token, masked or not, is redrawn from (1 - r) delta_{x_t} + r p1, so a
              revealed token can change; t_i = 1e-4 + i / steps while t_i <= 1 - 1 / steps, which is steps - 1
              evaluations (their loop), the last of which draws no mask: a masked token takes its code from p1.
    """

    name = "dfm"

    @property
    def mask_token(self):
        return self.num_codes

    def model_io(self):
        return dict(in_dim=None, out_dim=self.num_codes, input_vocab=self.num_codes + 1)

    def noise(self, shape, generator=None):
        raise ValueError(f"{self.name} starts from the all-mask source: it has no noise to fix")

    def loss(self, model, codes, y=None, generator=None, z0=None):
        t, y, keep = self.draw(codes, y, generator, z0)
        per_sample = self.scored(model, codes, t, y, keep)  # (B,)
        return per_sample.mean(), per_sample.detach(), t

    def draw(self, codes, y=None, generator=None, z0=None):
        """The loss's random part: t (B,), the labels y (B,) with some dropped, and the codes x_t keeps (B, *S)."""
        if z0 is not None:
            self.noise(codes.shape)  # raises: DFM has no noise
        t = self._draw_t(codes, generator)  # (B,)
        kappa = t.view(-1, *[1] * (codes.dim() - 1))  # (B, 1, ...)
        keep = torch.rand(codes.shape, device=codes.device, generator=generator) < kappa  # (B, *S)
        y = vfm.drop_labels(self.labels(y, codes.shape[0], codes.device), self.num_classes, self.p_uncond, generator)
        return t, y, keep

    def scored(self, model, codes, t, y, keep):
        """The rest of the loss, free of randomness: the per-sample loss (B,) of the network's logits at x_t."""
        xt = torch.where(keep, codes, torch.full_like(codes, self.mask_token))  # (B, *S)
        return vfm.cross_entropy_with_z_loss(model(xt, t, y).float(), codes, self.z_loss_weight)  # (B,)

    @staticmethod
    def schedule(steps, sampler="reveal"):
        """The steps (t, h) of a sampler: reveal's t_i = i / steps, i < steps; redraw's t_i = 1e-4 + i / steps while
        t_i <= 1 - 1 / steps: steps - 1 of them as in the authors' loop (one for steps = 1, where theirs has none)."""
        if sampler not in DFM_SAMPLERS:
            raise ValueError(f"unknown DFM sampler '{sampler}'; choose from: {', '.join(DFM_SAMPLERS)}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if sampler == "redraw":
            return [(REDRAW_T0 + i / steps, 1 / steps) for i in range(max(steps - 1, 1))]
        ts = torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist()
        return [(ts[i], ts[i + 1] - ts[i]) for i in range(steps)]

    @torch.no_grad()
    def sample(self, model, shape, *, y=None, steps=100, solver="euler", temperature=1.0, cfg_scale=1.0,
               generator=None, callback=None, cfg_interval=(0.0, 1.0), z0=None, sampler="reveal"):
        """As Objective.sample; sampler: "reveal" or "redraw" (the class's docstring). The logits are guided,
        softmaxed and drawn from a chunk of positions at a time (vfm.CHUNK); a callback sees them whole."""
        if z0 is not None:
            self.noise(shape)  # raises: DFM has no noise
        if solver != "euler":
            raise ValueError(f"DFM samples with its discrete Euler step only, not '{solver}'")
        schedule = self.schedule(steps, sampler)
        device = self.codebook.device
        tau = vfm.parse_temperature(temperature)
        x = torch.full(shape, self.mask_token, dtype=torch.long, device=device)  # (B, *S): all masked at t = 0
        for i, (t, h) in enumerate(schedule):
            out_shape, rows = self.guided_rows(model, x, t, y, vfm.guidance_at(t, cfg_scale, cfg_interval))
            if callback is not None:
                whole = torch.cat([out for _, out in rows]).view(out_shape)  # (B, *S, K)
                callback(t, x, whole)
                rows = [(r, whole.view(-1, self.num_codes)[r]) for r in vfm.chunks(x.numel(), self.num_codes)]
            draw = torch.rand(shape, device=device, generator=generator) < min(h / (1 - t), 1.0)  # (B, *S)
            if sampler == "reveal":
                draw &= x == self.mask_token  # the masked tokens revealed in this step; the others keep their codes
            elif i == len(schedule) - 1:
                draw |= x == self.mask_token  # the authors' last step draws no mask
            x, draw = x.clone(), draw.view(-1)  # a new x: a callback may hold the last
            for r, logits in rows:  # (n, K) float32 guided logits of the positions r
                if draw[r].any():
                    probs = torch.softmax(logits[draw[r]] / tau(t), dim=-1)  # (R, K) of those drawn
                    x.view(-1)[r][draw[r]] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return x


OBJECTIVES = {"purrception": vfm.Purrception, "cfm": CFM, "cfm-endpoint": CFMEndpoint, "dfm": DFM}


def build_objective(name, codebook, num_classes=0, **kw):
    """The objective named `name` (a key of OBJECTIVES); kw: p_uncond, t_min, z_loss_weight, codebook_scale,
    time_dist."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective '{name}'; choose from: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](codebook, num_classes, **kw)
