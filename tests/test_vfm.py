"""vfm.py against exact answers: the path, the velocity, the solvers, temperature, guidance, the losses."""

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import baselines
import vfm
from support import distributed
from toy.run import ToyMLP
from toy.toys import Oracle, make_toy


def test_the_raw_codebook_is_the_default_and_rms_rescales_it_keeping_the_nearest_codes():
    E = torch.randn(50, 8)
    E = E / E.norm(dim=1, keepdim=True)  # unit-sphere codes, as LlamaGen's
    assert torch.equal(vfm.flow_codebook(E), E) and torch.equal(vfm.Purrception(E).codebook, E)
    R = vfm.flow_codebook(E, "rms")
    assert torch.allclose(R, E * math.sqrt(8), atol=1e-5)
    assert torch.equal(baselines.DFM(E, codebook_scale="rms").codebook, R)
    assert R.pow(2).mean().item() == pytest.approx(1.0, abs=1e-5)
    z = torch.randn(3, 4, 8)
    assert torch.equal(vfm.snap(z * math.sqrt(8), R), vfm.snap(z, E))  # a global scale of both changes nothing
    assert torch.equal(vfm.snap(E[[3, 7, 9]], E), torch.tensor([3, 7, 9]))
    with pytest.raises(ValueError, match="unknown codebook scale 'unit'"):
        vfm.Purrception(E, codebook_scale="unit")


def test_the_flow_on_scaled_codes_is_the_raw_flow_under_a_time_change():
    """With exact posteriors: the flow on s E at (z, t) knows what the flow on E knows at (z / a, t'), with
    a = 1 - t + s t and t' = s t / a, as vfm.py states. Two tokens, so the posterior couples them."""
    toy = make_toy("pairs")
    E = 3 * toy.codebook  # rms about 3, so that "rms" scales the codes by s of about 1/3
    raw, rms = vfm.Purrception(E), vfm.Purrception(E, codebook_scale="rms")
    s = (rms.codebook.norm() / raw.codebook.norm()).double()
    z, t = torch.randn(6, 2, 2).double(), torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95]).double()
    a = 1 - t + s * t
    on_scaled = Oracle(toy, rms.codebook)(z, t)
    on_raw = Oracle(toy, raw.codebook)(z / a.view(-1, 1, 1), s * t / a)
    assert torch.allclose(torch.log_softmax(on_scaled, -1), torch.log_softmax(on_raw, -1), atol=1e-6)
    assert not torch.allclose(torch.log_softmax(on_scaled, -1), torch.log_softmax(Oracle(toy, raw.codebook)(z, t), -1),
                              atol=1e-2)  # without the time change the two posteriors differ


@pytest.mark.parametrize("positions", [None, 1, 7])  # whole, or chunks of 1 and 7 of the 30 positions
def test_snap_matches_brute_force(positions, monkeypatch):
    E, z = torch.randn(40, 4), torch.randn(5, 6, 4)
    ref = torch.cdist(z.reshape(-1, 4).double(), E.double()).argmin(1).view(5, 6)
    if positions:
        monkeypatch.setattr(vfm, "CHUNK", positions * 40)
    assert torch.equal(vfm.snap(z, E), ref)


def test_path_endpoints_and_times():
    z0, z1 = torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    assert torch.equal(vfm.interpolate(z0, z1, torch.zeros(4)), z0)
    assert torch.equal(vfm.interpolate(z0, z1, torch.ones(4)), z1)
    mid = vfm.interpolate(z0, z1, torch.full((4,), 0.25))
    assert torch.allclose(mid, 0.75 * z0 + 0.25 * z1)
    t = vfm.sample_t(10000, "cpu", torch.Generator().manual_seed(0))
    assert t.min() >= vfm.T_MIN and t.max() < 1


def test_training_times_are_uniform_on_t_min_to_1():
    n, t_min = 100000, 0.2
    t = vfm.sample_t(n, "cpu", torch.Generator().manual_seed(0), t_min=t_min)
    assert t.min() >= t_min and t.max() < 1
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):  # U[t_min, 1) puts a fraction q below t_min + q (1 - t_min)
        below = (t < t_min + q * (1 - t_min)).double().mean().item()
        assert below == pytest.approx(q, abs=4 * math.sqrt(q * (1 - q) / n))


def test_logit_normal_training_times():
    """'logit-normal:M:S' draws sigmoid(M + S n) from the generator's normal draws, clamped to [t_min, 1 - t_min];
    'uniform' is sample_t; anything else is refused."""
    draw = vfm.parse_time_dist("logit-normal:0.5:2")
    t = draw(10000, "cpu", torch.Generator().manual_seed(0), t_min=0.01)
    n = torch.randn(10000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, torch.sigmoid(0.5 + 2 * n).clamp(0.01, 0.99))
    assert t.min() == 0.01 and t.max() == 0.99  # S = 2 reaches both clamps in 10,000 draws
    assert vfm.parse_time_dist("uniform") is vfm.sample_t
    for bad in ("gauss", "uniform:1", "logit-normal:0", "logit-normal:0:-1", "logit-normal:a:1",
                "logit-normal:nan:1", "logit-normal:0:inf"):
        with pytest.raises(ValueError, match="bad training-time distribution"):
            vfm.parse_time_dist(bad)


@pytest.mark.parametrize("name", list(baselines.OBJECTIVES))
def test_every_objective_trains_on_the_times_of_its_time_dist(name):
    """The t that loss() returns (and trains at) follows time_dist: logit-normal:2:0.5 has median sigmoid(2)."""
    codebook = torch.randn(16, 4)
    codes = torch.randint(0, 16, (4000, 3))
    for spec, median in (("uniform", 0.5 + vfm.T_MIN / 2), ("logit-normal:2:0.5", 1 / (1 + math.exp(-2)))):
        objective = baselines.build_objective(name, codebook, time_dist=spec)
        out_dim = objective.model_io()["out_dim"]
        _, _, t = objective.loss(lambda x, t, y: torch.zeros(*codes.shape, out_dim), codes,
                                 generator=torch.Generator().manual_seed(0))
        assert t.median().item() == pytest.approx(median, abs=0.02)


def test_label_dropout_uses_the_null_class():
    y = torch.arange(10)
    assert torch.equal(vfm.drop_labels(y, 10, 0.0), y)
    assert torch.equal(vfm.drop_labels(y, 10, 1.0), torch.full((10,), 10))
    dropped = vfm.drop_labels(torch.zeros(100000, dtype=torch.long), 10, 0.1, torch.Generator().manual_seed(0))
    assert (dropped == 10).float().mean().item() == pytest.approx(0.1, abs=0.005)


# ---- the velocity -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau", [0.5, 1.0, 1.7])
def test_purrception_velocity_matches_float64_reference(tau):
    rng = np.random.default_rng(0)
    E = 2 * rng.normal(size=(16, 3))
    obj = vfm.Purrception(torch.tensor(E, dtype=torch.float32))
    Ef = E  # the flow runs on the raw codebook
    logits, z, t = rng.normal(size=(4, 5, 16)) * 3, rng.normal(size=(4, 5, 3)), 0.37
    l = logits / tau
    p = np.exp(l - l.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = (p @ Ef - z) / (1 - t)
    got = obj.velocity(torch.tensor(logits, dtype=torch.float32), torch.tensor(z, dtype=torch.float32), t, tau)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_temperature_to_zero_gives_the_argmax_code():
    obj = vfm.Purrception(torch.randn(32, 4))
    logits = torch.randn(6, 7, 32)
    mu = obj.posterior_mean(logits, 1e-4)
    assert torch.allclose(mu, obj.codebook[logits.argmax(-1)], atol=1e-5)
    # and a large temperature gives the codebook's mean
    assert torch.allclose(obj.posterior_mean(logits, 1e6), obj.codebook.mean(0).expand(6, 7, 4), atol=1e-4)


def test_temperature_schedules():
    assert vfm.parse_temperature("0.9")(0.3) == pytest.approx(0.9)
    assert vfm.parse_temperature(1.3)(0.8) == pytest.approx(1.3)
    lin = vfm.parse_temperature("linear:1.2:0.8")
    assert (lin(0), lin(0.5), lin(1)) == pytest.approx((1.2, 1.0, 0.8))
    assert lin(0.25) == pytest.approx(1.1)
    cos = vfm.parse_temperature("cosine:1.2:0.8")
    assert (cos(0), cos(0.5), cos(1)) == pytest.approx((1.2, 1.0, 0.8))
    assert cos(0.25) == pytest.approx(0.8 + 0.4 * (1 + math.sqrt(0.5)) / 2)  # a half cosine, not the line (1.1)
    for bad in ("hot", "linear:1", "cosine:a:b", "0", "-1", "linear:1:-2", "nan", "inf", "linear:nan:1", "cosine:1:inf"):
        with pytest.raises(ValueError, match="temperature"):
            vfm.parse_temperature(bad)


# ---- solvers on analytic fields ---------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 4, 25])
def test_solvers_on_a_linear_field_give_their_closed_forms(steps):
    a, z0 = -1.3, torch.tensor([2.0], dtype=torch.float64)
    field = lambda z, t: a * z  # noqa: E731
    h = 1.0 / steps
    euler = vfm.solve_ode(field, z0, steps, "euler")
    assert euler.item() == pytest.approx(2.0 * (1 + a * h) ** steps, rel=1e-12)
    heun = vfm.solve_ode(field, z0, steps, "heun")  # last step is Euler
    assert heun.item() == pytest.approx(2.0 * (1 + a * h + (a * h) ** 2 / 2) ** (steps - 1) * (1 + a * h), rel=1e-12)
    mid = vfm.solve_ode(field, z0, steps, "midpoint")
    assert mid.item() == pytest.approx(2.0 * (1 + a * h + (a * h) ** 2 / 2) ** steps, rel=1e-12)


def test_solver_orders_on_a_time_dependent_field():
    field = lambda z, t: t * z  # noqa: E731  z(1) = z0 exp(1/2)
    z0 = torch.ones(1, dtype=torch.float64)
    for solver, order in (("euler", 1), ("midpoint", 2), ("heun", 2)):
        err = [abs(vfm.solve_ode(field, z0, n, solver).item() - math.exp(0.5)) for n in (64, 128)]
        assert err[0] / err[1] == pytest.approx(2 ** order, rel=0.05), solver


@pytest.mark.parametrize("solver", vfm.SOLVERS)
def test_fixed_posterior_lands_exactly_on_its_mean_and_never_evaluates_t1(solver):
    """With q(c | z) fixed, u = (mu - z)/(1 - t) has the exact solution z_t = mu + (1 - t) (z0 - mu): linear in t,
    so every solver lands exactly on mu."""
    obj = vfm.Purrception(torch.randn(10, 2))
    logits = torch.randn(10)
    seen = []

    def model(z, t, y):
        seen.append(t.max().item())
        return logits.expand(*z.shape[:-1], 10)

    mu = obj.posterior_mean(logits, 1.0)
    vfm.solve_ode(lambda z, t: obj.velocity(model(z, torch.full((z.shape[0],), t), None), z, t, 1.0),
                  torch.randn(3, 4, 2), 7, solver)
    assert max(seen) < 1
    z1 = vfm.solve_ode(lambda z, t: (mu - z) / (1 - t), torch.randn(3, 4, 2, dtype=torch.float64), 7, solver)
    assert torch.allclose(z1, mu.double().expand_as(z1), atol=1e-12)
    codes = obj.sample(model, (3, 4), steps=7, solver=solver, generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes, vfm.snap(mu.expand(3, 4, 2), obj.codebook))


@pytest.mark.parametrize("solver", vfm.SOLVERS)
def test_the_regression_baselines_sample_through_the_shared_flow_with_their_own_velocity(solver):
    """CFM and CFM-endpoint are continuous flows beside Purrception, not kinds of it: the shared sampler starts at
    z0 and integrates their own velocity. A constant velocity v = E[c] - z0 carries CFM from z0 to E[c]; a constant
    end point E[c'] pulls CFM-endpoint onto E[c'], exactly at the last step."""
    for cls in (baselines.CFM, baselines.CFMEndpoint):
        assert issubclass(cls, vfm.ContinuousFlow) and not issubclass(cls, vfm.Purrception)
    E = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [3.0, 3.0], [-3.0, 0.0], [0.0, -3.0]])
    g = torch.Generator().manual_seed(0)
    c, c_end = torch.randint(0, 6, (3, 4), generator=g), torch.randint(0, 6, (3, 4), generator=g)
    for cls, out, target in ((baselines.CFM, lambda z0: E[c] - z0, c),
                             (baselines.CFMEndpoint, lambda z0: E[c_end], c_end)):
        obj = cls(E)
        z0 = obj.noise((3, 4), torch.Generator().manual_seed(1))
        starts = []
        codes = obj.sample(lambda z, t, y: out(z0), (3, 4), steps=5, solver=solver, z0=z0,
                           callback=lambda t, z, o: starts.append(z) if t == 0 else None)
        assert torch.equal(starts[0], z0) and torch.equal(codes, target)


def test_bad_solver_and_steps_raise():
    with pytest.raises(ValueError, match="unknown solver 'rk4'"):
        vfm.solve_ode(lambda z, t: z, torch.zeros(1), 4, "rk4")
    with pytest.raises(ValueError, match="steps"):
        vfm.solve_ode(lambda z, t: z, torch.zeros(1), 0, "euler")
    with pytest.raises(ValueError, match="unknown objective 'flow'"):
        baselines.build_objective("flow", torch.randn(4, 2))
    with pytest.raises(ValueError, match="discrete Euler"):
        baselines.build_objective("dfm", torch.randn(4, 2)).sample(None, (1, 1), solver="heun")
    assert vfm.num_evaluations(10, "heun") == 19


# ---- the oracle: the sampler apart from training ----------------------------------------------------------

@pytest.mark.parametrize("toy_name,bound", [("checkerboard", 0.03), ("rings", 0.03), ("pairs", 0.04)])
def test_oracle_posterior_through_the_sampler_reproduces_p(toy_name, bound):
    toy = make_toy(toy_name)
    obj = vfm.Purrception(toy.codebook)
    codes = obj.sample(Oracle(toy, obj.codebook), (20000, toy.num_tokens), steps=10, solver="heun",
                       generator=torch.Generator().manual_seed(0))
    assert toy.tv(codes) < bound  # the sampling noise of 20,000 draws is about 0.02
    if toy.num_tokens == 2:  # the coupling: tokens drawn independently from the marginals would score 0.75
        indep = torch.stack([codes[torch.randperm(20000), 0], codes[:, 1]], 1)
        assert toy.tv(indep) > 0.6


def test_oracle_posterior_is_exact_for_one_token():
    toy = make_toy("rings")
    obj = vfm.Purrception(toy.codebook)
    z, t = torch.randn(5, 1, 2), torch.full((5,), 0.6)
    E, prior = obj.codebook.double(), toy.probs
    logp = prior.log() - ((z.double()[:, 0, None] - 0.6 * E) ** 2).sum(-1) / (2 * 0.4 ** 2)  # (5, K)
    got = Oracle(toy, obj.codebook)(z, t)[:, 0]
    assert torch.allclose(torch.log_softmax(got.double(), -1), torch.log_softmax(logp, -1), atol=1e-4)


# ---- guidance ---------------------------------------------------------------------------------------------

def test_guidance_scales():
    obj = vfm.Purrception(torch.randn(5, 2), num_classes=3)
    model = lambda x, t, y: (y.float()[:, None, None] + 1) * torch.ones(x.shape[0], 4, 5)  # noqa: E731
    x, y = torch.zeros(2, 4, 2), torch.tensor([0, 2])
    cond, uncond = (y.float() + 1)[:, None, None], 4.0  # the null class is 3
    assert torch.equal(obj.guided(model, x, 0.5, y, 1.0), cond.expand(2, 4, 5))
    assert torch.equal(obj.guided(model, x, 0.5, y, 0.0), torch.full((2, 4, 5), uncond))
    assert torch.allclose(obj.guided(model, x, 0.5, y, 1.3), (uncond + 1.3 * (cond - uncond)).expand(2, 4, 5))
    assert torch.equal(obj.guided(model, x, 0.5, None, 4.0), torch.full((2, 4, 5), uncond))


class Passes(torch.nn.Module):
    """A small model with labels whose output depends on x, t and y; it records (t, batch) of every pass."""

    def __init__(self, out_dim, input_vocab=None, num_classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(input_vocab, 2) if input_vocab else None
        self.net = torch.nn.Linear(2 + 1 + num_classes + 1, out_dim)
        self.num_classes, self.passes = num_classes, []

    def forward(self, x, t, y):
        self.passes.append((round(float(t[0]), 6), x.shape[0]))
        x = self.embed(x) if self.embed is not None else x  # (B, N, 2)
        extra = torch.cat([t[:, None], torch.nn.functional.one_hot(y, self.num_classes + 1).float()], 1)
        return self.net(torch.cat([x, extra[:, None].expand(-1, x.shape[1], -1)], -1)) * 3


@pytest.mark.parametrize("solver,steps,times", [
    ("euler", 1, [0]), ("euler", 4, [0, 0.25, 0.5, 0.75]),
    ("midpoint", 1, [0, 0.5]), ("midpoint", 2, [0, 0.25, 0.5, 0.75]),
    ("heun", 1, [0]), ("heun", 2, [0, 0.5, 0.5]), ("heun", 4, [0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75])])
def test_evaluation_times(solver, steps, times):
    """Where each solver evaluates the network: t_i, and t_i + h/2 (midpoint) or t_i+1 (heun, but not at t = 1)."""
    assert vfm.evaluation_times(steps, solver) == times and vfm.num_evaluations(steps, solver) == len(times)


@pytest.mark.parametrize("name,solver", [("purrception", "midpoint"), ("purrception", "heun"), ("cfm", "euler"),
                                         ("dfm", "euler")])
def test_guidance_interval_guides_inside_and_makes_one_pass_outside(name, solver):
    B, steps, window = 4, 4, (0.25, 0.5)  # both ends are evaluation times: the window holds them
    obj = baselines.build_objective(name, torch.randn(5, 2), 3)
    model = Passes(**{k: v for k, v in obj.model_io().items() if k != "in_dim"})
    y = torch.tensor([0, 1, 2, 0])

    def draw(**kw):
        model.passes.clear()
        codes = obj.sample(model, (B, 3), y=y, steps=steps, solver=solver, generator=torch.Generator().manual_seed(1),
                           **kw)
        return codes, list(model.passes)

    plain, plain_passes = draw(cfg_scale=2.5)
    everywhere, passes = draw(cfg_scale=2.5, cfg_interval=(0.0, 1.0))
    assert torch.equal(everywhere, plain) and passes == plain_passes  # [0, 1] is plain guidance, exactly
    assert all(n == 2 * B for _, n in passes)
    windowed, passes = draw(cfg_scale=2.5, cfg_interval=window)
    times = vfm.evaluation_times(steps, solver)
    assert [t for t, _ in passes] == [round(t, 6) for t in times]
    assert [n for _, n in passes] == [2 * B if window[0] <= t <= window[1] else B for t in times]
    assert 0 < sum(n == B for _, n in passes) < len(times)  # both kinds of evaluation happen here
    assert sum(n // B for _, n in passes) == vfm.guided_evaluations(steps, solver, 2.5, window)
    assert not torch.equal(windowed, plain)
    unguided, _ = draw(cfg_scale=1.0)
    none_inside, passes = draw(cfg_scale=2.5, cfg_interval=(0.95, 0.99))  # no evaluation falls in it
    assert torch.equal(none_inside, unguided) and all(n == B for _, n in passes)


@pytest.mark.parametrize("spec", ["0.5", "0.7:0.3", "-0.1:0.5", "0:1.5", "a:b", "0:nan"])
def test_bad_guidance_intervals_raise(spec):
    with pytest.raises(ValueError, match="expected LO:HI with 0 <= LO <= HI <= 1"):
        vfm.parse_cfg_interval(spec)


def test_guidance_intervals_hold_their_ends_on_decimal_grids():
    assert vfm.parse_cfg_interval("0.25:0.75") == (0.25, 0.75) and vfm.parse_cfg_interval("0:1") == (0.0, 1.0)
    times = vfm.evaluation_times(10, "euler")  # 0, 0.1, ..., 0.9 as linspace computes them
    assert times[3] != 0.3  # 0.30000000000000004: the end must still hold it
    assert [vfm.guidance_at(t, 2.0, (0.1, 0.3)) for t in times] == [1, 2, 2, 2, 1, 1, 1, 1, 1, 1]
    assert vfm.guided_evaluations(10, "euler", 2.0, (0.1, 0.3)) == 13
    assert vfm.guided_evaluations(10, "euler", 0.0, (0.1, 0.3)) == 10  # s = 0: one unconditional pass
    assert vfm.guided_evaluations(10, "euler", 2.0, (0.1, 0.3), guidable=False) == 10


def test_given_noise_is_where_the_sampler_starts_and_what_the_loss_uses():
    obj = vfm.Purrception(torch.randn(5, 2), p_uncond=0.0)
    model = Passes(5, num_classes=0)
    z0 = obj.noise((3, 4), torch.Generator().manual_seed(7))
    drawn = obj.sample(model, (3, 4), steps=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(obj.sample(model, (3, 4), steps=3, z0=z0), drawn)  # noise() draws what sample() draws
    starts = []
    obj.sample(model, (3, 4), steps=3, z0=-z0, callback=lambda t, z, out: starts.append(z) if t == 0 else None)
    assert torch.equal(starts[0], -z0)
    codes, seen = torch.randint(0, 5, (3, 4)), []
    g = torch.Generator().manual_seed(0)
    _, _, t = obj.loss(lambda x, t, y: seen.append(x) or torch.zeros(3, 4, 5), codes, generator=g, z0=z0)
    assert torch.allclose(seen[0], vfm.interpolate(z0, obj.embed(codes), t))
    dfm = baselines.DFM(torch.randn(5, 2))
    for call in (lambda: dfm.loss(model, codes, z0=z0), lambda: dfm.sample(model, (3, 4), z0=z0),
                 lambda: dfm.noise((3, 4))):
        with pytest.raises(ValueError, match="no noise to fix"):
            call()


# ---- the losses -------------------------------------------------------------------------------------------

class Fixed(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out, self.calls = out, []

    def forward(self, x, t, y):
        self.calls.append((x, t, y))
        return self.out


def test_every_objective_takes_the_same_keywords_and_sizes_its_network():
    assert list(baselines.OBJECTIVES) == ["purrception", "cfm", "cfm-endpoint", "dfm"]
    K, d = 6, 2
    io = {"purrception": (d, K, None), "cfm": (d, d, None), "cfm-endpoint": (d, d, None),
          "dfm": (None, K, K + 1)}  # in, out, vocab: DFM's tokens go straight to the model width
    for name in baselines.OBJECTIVES:
        obj = baselines.build_objective(name, torch.randn(K, d), 3, p_uncond=0.2, t_min=0.05, z_loss_weight=0.3,
                                        codebook_scale="rms")
        assert (obj.name, obj.num_classes, obj.p_uncond, obj.t_min, obj.z_loss_weight, obj.codebook_scale) == \
            (name, 3, 0.2, 0.05, 0.3, "rms")
        in_dim, out_dim, input_vocab = io[name]
        assert obj.model_io() == dict(in_dim=in_dim, out_dim=out_dim, input_vocab=input_vocab)
        _, _, t = obj.loss(Fixed(torch.zeros(64, 1, out_dim)), torch.zeros(64, 1, dtype=torch.long))
        assert t.min() >= 0.05


def test_purrception_loss_is_cross_entropy_plus_z_loss():
    obj = vfm.Purrception(torch.randn(6, 2), z_loss_weight=0.01, p_uncond=0.0)
    logits, codes = torch.randn(3, 4, 6) * 4, torch.randint(0, 6, (3, 4))
    loss, per_sample, t = obj.loss(Fixed(logits), codes)
    lse = torch.logsumexp(logits, -1)
    ref = (lse - logits.gather(-1, codes[..., None])[..., 0]) + 0.01 * lse ** 2
    assert torch.allclose(per_sample, ref.mean(1), atol=1e-5) and loss.item() == pytest.approx(ref.mean().item(), abs=1e-5)


@pytest.mark.parametrize("scale", vfm.CODEBOOK_SCALES)
@pytest.mark.parametrize("name", ["cfm", "cfm-endpoint"])
def test_cfm_losses_regress_velocity_and_endpoint(name, scale):
    """A non-zero network output against the target computed in float64 from the same draws: the loss takes
    z0 ~ N(0, I), then t ~ U[t_min, 1), from the generator, in that order."""
    E, codes, out = 2 * torch.randn(6, 2), torch.randint(0, 6, (3, 4)), torch.randn(3, 4, 2)
    obj = baselines.build_objective(name, E, p_uncond=0.0, codebook_scale=scale)
    model = Fixed(out)
    loss, per_sample, t = obj.loss(model, codes, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(3, 4, 2, generator=g).double()
    t_ref = vfm.T_MIN + (1 - vfm.T_MIN) * torch.rand(3, generator=g).double()
    E = E.double()
    z1 = (E if scale == "raw" else E / E.pow(2).mean().sqrt())[codes]
    s = t_ref.view(-1, 1, 1)
    zt, t_seen, _ = model.calls[0]
    assert torch.allclose(t.double(), t_ref) and torch.allclose(t_seen.double(), t_ref)
    assert torch.allclose(zt.double(), (1 - s) * z0 + s * z1, atol=1e-6)
    target = z1 - z0 if name == "cfm" else z1  # the velocity of the straight path, or its end point
    ref = (out.double() - target).pow(2).mean((1, 2))
    assert torch.allclose(per_sample.double(), ref, rtol=1e-5)
    assert loss.item() == pytest.approx(ref.mean().item(), rel=1e-5)


def test_dfm_loss_masks_with_probability_1_minus_t_and_scores_every_token_with_the_z_loss():
    obj = baselines.DFM(torch.randn(6, 2), p_uncond=0.0, z_loss_weight=0.01)
    codes = torch.randint(0, 6, (4000, 8))
    logits = 4 * torch.randn(4000, 8, 6)
    model = Fixed(logits)
    loss, per_sample, t = obj.loss(model, codes, generator=torch.Generator().manual_seed(0))
    xt = model.calls[0][0]
    masked = xt == obj.mask_token
    assert torch.equal(xt[~masked], codes[~masked])
    # each token is masked with probability 1 - t of its own row: test it separately for small and large t, where
    # masking with probability t instead would be off by about 0.5
    for rows in (t < 0.5, t >= 0.5):
        expected = (1 - t[rows]).double()
        se = math.sqrt((expected * (1 - expected)).sum().item() * 8) / (8 * rows.sum().item())
        assert masked[rows].double().mean().item() == pytest.approx(expected.mean().item(), abs=4 * se)
    # the paper's code: cross-entropy over all positions, masked or not, plus the z-loss
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 6), codes.reshape(-1), reduction="none").view(4000, 8)
    ref = (ce + 0.01 * torch.logsumexp(logits, -1).pow(2)).mean(1)
    assert torch.allclose(per_sample, ref, atol=1e-5) and loss.item() == pytest.approx(ref.mean().item(), rel=1e-5)


def test_dfm_sampler_reveals_every_token_with_its_own_positions_code():
    """Logits that name a different code at every sample and position: each revealed token takes its own."""
    obj = baselines.DFM(torch.randn(6, 2))
    target = torch.randint(0, 6, (5, 9), generator=torch.Generator().manual_seed(1))
    model = lambda x, t, y: torch.nn.functional.one_hot(target, 6).float() * 50  # noqa: E731
    codes = obj.sample(model, (5, 9), steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes, target)


def test_dfm_sampler_follows_the_reveal_schedule():
    """With logits that ignore x_t, only the reveal step unmasks: revealing with probability h / (1 - t) over
    [t, t + h] leaves each token masked at t_i = i / steps with probability prod_j (1 - h / (1 - t_j)) = 1 - t_i.
    Revealed tokens keep their code, drawn from softmax(l / tau)."""
    obj = baselines.DFM(torch.randn(6, 2))
    logits, tau, shape, steps = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5, -0.5]), 0.7, (200, 100), 10
    n = shape[0] * shape[1]
    states = []
    codes = obj.sample(lambda x, t, y: logits.expand(*x.shape, 6), shape, steps=steps, temperature=tau,
                       generator=torch.Generator().manual_seed(0), callback=lambda t, x, out: states.append((t, x)))
    assert [t for t, _ in states] == pytest.approx([i / steps for i in range(steps)])
    for t, x in states:
        masked = (x == obj.mask_token).double().mean().item()
        assert masked == pytest.approx(1 - t, abs=4 * math.sqrt(t * (1 - t) / n) + 1e-12)
    for (_, before), (_, after) in zip(states, states[1:] + [(1.0, codes)]):
        revealed = before != obj.mask_token
        assert torch.equal(after[revealed], before[revealed])
    p = torch.softmax(logits.double() / tau, -1)
    freq = torch.bincount(codes.flatten(), minlength=7).double() / n
    assert freq[6] == 0
    assert torch.allclose(freq[:6], p, atol=4 * math.sqrt(0.25 / n))


@pytest.mark.parametrize("name", baselines.OBJECTIVES)
def test_every_objective_learns_the_toy(name):
    toy = make_toy("pairs")  # two tokens, so that DFM's revealed token tells it something about the other
    obj = baselines.build_objective(name, toy.codebook)
    model = ToyMLP(2, **obj.model_io())
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss, _, _ = obj.loss(model, toy.sample(256, g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) - 0.15  # the noise of these means is about 0.01


# ---- memory: the sampler takes the network's output a chunk of positions at a time --------------------------

class Made(TorchDispatchMode):
    """Every tensor an op makes, as (numel, dtype, inside): views and in-place results, which allocate nothing,
    left out; inside: made while `inside` was set (by a model that sets it)."""

    def __init__(self):
        super().__init__()
        self.made, self.inside = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            self.made += [(o.numel(), o.dtype, self.inside) for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
        return out

    def largest(self, dtype=None):
        return max(n for n, d, inside in self.made if not inside and dtype in (None, d))


@pytest.mark.parametrize("positions", [1, 7, 40])
def test_guidance_the_posterior_mean_and_sampling_in_chunks_equal_the_whole(positions, monkeypatch):
    """Guidance acts element by element, so a chunk of it is exactly the whole's; the posterior mean of a chunk is
    the same softmax and matrix product row by row (equal here; allclose is what a BLAS promises); and the sampler
    makes the same codes in chunks as whole, with or without a callback (which sees the whole guided output)."""
    K = 300
    obj, model = vfm.Purrception(torch.randn(K, 2), num_classes=3), Passes(K)
    z, y, s, tau = torch.randn(5, 6, 2), torch.tensor([0, 1, 2, 0, 1]), 1.7, 0.8
    out = model(torch.cat([z, z]), torch.full((10,), 0.3), torch.cat([y, torch.full((5,), 3)])).float()
    cond, uncond = out.chunk(2)
    whole = uncond + s * (cond - uncond)  # (5, 6, K): the unchunked math
    mu = torch.softmax(whole / tau, dim=-1) @ obj.codebook

    def draw(**kw):
        return obj.sample(model, (5, 6), y=y, steps=3, solver="heun", cfg_scale=s, temperature=tau,
                          generator=torch.Generator().manual_seed(1), **kw)

    codes = draw()
    monkeypatch.setattr(vfm, "CHUNK", positions * K)
    assert torch.equal(obj.guided(model, z, 0.3, y, s), whole)
    assert torch.allclose(obj.posterior_mean(whole, tau), mu, rtol=1e-6, atol=1e-7)
    assert torch.allclose(obj.posterior_mean(whole.bfloat16(), tau), torch.softmax(whole.bfloat16().float() / tau, -1)
                          @ obj.codebook, rtol=1e-6, atol=1e-7)  # bf16 logits: each chunk made float32
    assert torch.equal(draw(), codes) and torch.equal(draw(callback=lambda t, z, out: None), codes)


@pytest.mark.parametrize("name", ["purrception", "dfm", "dfm-redraw"])
def test_sampling_memory_follows_the_chunk_not_batch_positions_and_codes(name, monkeypatch):
    """At K = 16,384 with guidance, the largest tensor the sampler makes (outside the network, whose one output is
    a bf16 (2B, *S, K)) is one chunk of positions' worth, not B x S x K float32 logits or copies of them."""
    K, B, S, chunk = 16384, 2, (8, 8), 16  # 128 positions in chunks of 16
    obj = baselines.build_objective(name.split("-")[0], torch.randn(K, 8), 3)
    kw = dict(sampler="redraw") if name == "dfm-redraw" else {}
    out = (3 * torch.randn(2 * B, *S, K)).bfloat16()  # the network's output, made before the probe looks

    def peak(values):
        monkeypatch.setattr(vfm, "CHUNK", values)
        with Made() as probe:
            obj.sample(lambda x, t, y: out[:x.shape[0]], (B, *S), y=torch.tensor([0, 1]), steps=3, cfg_scale=1.5,
                       generator=torch.Generator().manual_seed(0), **kw)
        return probe.largest(torch.float32), probe.largest()

    whole = B * S[0] * S[1] * K
    assert peak(2 ** 40) == (whole, whole)  # one chunk: the probe sees the B x S x K float32 logits
    assert peak(chunk * K) == (chunk * K, chunk * K)  # chunks: no tensor larger than one, of any dtype


def test_bf16_autocast_runs_the_network_alone_in_bf16():
    """distributed.autocast_model (sample.py's): the network's operations in bf16, everything else the sampler
    does (guidance, the posterior mean, the solver's state, snapping) in float32."""
    obj, net, probe = vfm.Purrception(torch.randn(64, 2), num_classes=3), Passes(64), Made()

    def model(x, t, y):
        probe.inside = True
        try:
            return net(x, t, y)
        finally:
            probe.inside = False

    cpu = torch.device("cpu")
    assert distributed.autocast_model(model, "auto", cpu) == ("fp32", model)
    assert distributed.autocast_model(model, "fp32", cpu) == ("fp32", model)
    precision, run = distributed.autocast_model(model, "bf16", cpu)
    with probe:
        codes = obj.sample(run, (4, 3), y=torch.tensor([0, 1, 2, 0]), steps=3, solver="heun", cfg_scale=2.0,
                           generator=torch.Generator().manual_seed(0))
    floats = {(d, inside) for _, d, inside in probe.made if d.is_floating_point}
    assert precision == "bf16" and codes.dtype == torch.long
    outside = {d for d, inside in floats if not inside} - {torch.float64}  # less solve_ode's float64 time grid
    assert (torch.bfloat16, True) in floats and outside == {torch.float32}


# ---- DFM's two samplers ------------------------------------------------------------------------------------

def test_dfm_schedules_and_their_passes():
    reveal, redraw = baselines.DFM.schedule(10, "reveal"), baselines.DFM.schedule(10, "redraw")
    assert [t for t, _ in reveal] == vfm.evaluation_times(10, "euler")
    assert all(h == pytest.approx(0.1) for _, h in reveal + redraw)
    assert [t for t, _ in redraw] == pytest.approx([1e-4 + i / 10 for i in range(9)], abs=1e-12)  # the authors' 9
    assert baselines.DFM.schedule(1, "redraw") == [(1e-4, 1.0)]
    times = [t for t, _ in redraw]
    assert vfm.guided_evaluations(10, "euler", 2.0, (0.3, 1.0), times=times) == 9 + 6  # 0.3001, ..., 0.8001 guided
    for bad, message in (("sometimes", "unknown DFM sampler 'sometimes'"), ("reveal", "steps must be >= 1")):
        with pytest.raises(ValueError, match=message):
            baselines.DFM.schedule(0 if bad == "reveal" else 3, bad)


def test_dfm_redraw_draws_every_token_from_the_authors_mixture():
    """The authors' step: every token, masked or revealed, is drawn from (1 - r) delta_{x_t} + r p1 with
    r = h / (1 - t), t_i = 1e-4 + i h; the last step draws no mask. With logits that ignore x_t, the code after
    each step of the tokens holding a before it is checked against that distribution (4.5 standard errors)."""
    obj = baselines.DFM(torch.randn(6, 2))
    logits, shape, steps, h = torch.tensor([0.0, 0.5, -0.5, 1.0, 0.25, -0.25]), (400, 100), 5, 0.2
    states = []
    codes = obj.sample(lambda x, t, y: logits.expand(*x.shape, 6), shape, steps=steps, sampler="redraw",
                       generator=torch.Generator().manual_seed(0), callback=lambda t, x, out: states.append((t, x)))
    assert [t for t, _ in states] == pytest.approx([1e-4 + i * h for i in range(steps - 1)])
    assert not (codes == obj.mask_token).any()
    p1 = torch.softmax(logits.double(), -1)
    changed = 0
    for i, ((t, before), after) in enumerate(zip(states, [x for _, x in states[1:]] + [codes])):
        r, last = h / (1 - t), i == len(states) - 1
        for a in before.unique().tolist():
            held = before == a
            mixture = torch.cat([r * p1, torch.zeros(1, dtype=p1.dtype)])  # over the codes and the mask
            mixture[a] += 1 - r
            if last and a == obj.mask_token:
                mixture = torch.cat([p1, torch.zeros(1, dtype=p1.dtype)])
            n = held.sum().item()
            freq = torch.bincount(after[held], minlength=7).double() / n  # codes 0-5, then the mask
            assert ((freq - mixture).abs() <= 4.5 * (mixture * (1 - mixture) / n).sqrt() + 1e-12).all(), (i, a)
            changed += (after[held] != a).sum().item() if a != obj.mask_token else 0
    assert changed > 1000  # revealed tokens do change (the reveal sampler never changes one)


@pytest.mark.parametrize("positions", [None, 1000])  # whole, or chunks of 1,000 of the 20,000 positions
def test_dfm_reveal_sampler_in_chunks_follows_the_reveal_schedule(positions, monkeypatch):
    if positions:
        monkeypatch.setattr(vfm, "CHUNK", positions * 6)
    test_dfm_sampler_follows_the_reveal_schedule()
