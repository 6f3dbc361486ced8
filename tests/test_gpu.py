"""On a CUDA GPU: the compiled bf16 training step, resuming a compiled run, sampling under bf16 autocast and its
peak memory; skipped where CUDA is not available. The scripts pick the GPU themselves (support/distributed.py: cuda
when available); run alone with `python -m pytest tests/test_gpu.py` (experiments/gpu_check.sh does). The tests
train on the session's Fashion-MNIST codes where conftest finds the files, else on a random code set of the same
shapes (what they check holds for any codes), which a test of its own checks on any machine."""

import json
import shutil

import numpy as np
import pytest
import torch

import conftest
import sample
import train
import vfm
import vq
from support import checkpoint, codesets, distributed, tokenizers
from test_dit import perturb_final_layer, tiny, unpatchified
from test_train import assert_same_state, weights
from test_vfm import Made

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL = ["--model", "DiT-T/1", "--batch-size", "8", "--log-every", "2", "--sample-every", "0"]
COMPILED_BF16 = ["--compile", "--precision", "bf16"]


def random_codes(out, n=512, seed=0):
    """OUT/codes: a code set of the Fashion-MNIST one's shapes (n grids of 7 x 7 codes, 10 classes, images of 1 x 28 x
    28), its codes drawn at random, its tokenizer OUT/tokenizer.pt a vq.MnistVQ of random weights as `tokenizer.py
    train` saves one. train.py and sample.py run on it as on real codes; its images mean nothing."""
    torch.manual_seed(seed)
    tokenizer = vq.MnistVQ()
    torch.save(tokenizers.mnist_checkpoint(tokenizer), out / "tokenizer.pt")
    rng = np.random.default_rng(seed)
    K, g = tokenizer.config["num_codes"], tokenizer.grid_size
    codesets.write_shard(str(out / "codes"), 0, rng.integers(0, K, (n, 1, g, g)), rng.integers(0, 10, n))
    codesets.write_meta(str(out / "codes"), tokenizer.codebook.numpy(), 1, grid=[g, g], num_classes=10, views=1,
                        image_shape=list(tokenizer.image_shape), tokenizer=tokenizers.record(str(out / "tokenizer.pt")))
    return out / "codes"


@pytest.fixture(scope="module")
def codes(request, tmp_path_factory):
    """The session's Fashion-MNIST codes (conftest's codes_dir) where the files are there, else random_codes. Both
    reached by name at run time: conftest marks a test whose code names the dataset's fixtures or helpers as needing
    the files, and these run without them."""
    if not conftest.missing_fashion_mnist():
        return request.getfixturevalue("codes_dir")
    return random_codes(tmp_path_factory.mktemp("random"))


@pytest.fixture(scope="module")
def purrception_ckpt(codes, tmp_path_factory):
    """A Purrception checkpoint of 40 steps on those codes, EMA decay 0.5 (conftest's flow_ckpts, on them)."""
    run = tmp_path_factory.mktemp("purrception")
    train.main(["--codes", str(codes), "--out", str(run), "--steps", "40", "--model", "DiT-T/1", "--batch-size", "8",
                "--sample-every", "0", "--lr", "3e-3", "--ema-decay", "0.5", "--codebook-scale", "rms"])
    return run / "checkpoints" / "last.pt"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles afresh: torch.compile falls back to eager, silently, once a function has been recompiled
    more times than its cache allows (a new model per run is a recompile)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_the_random_code_set_trains_and_samples_as_real_codes_do(tmp_path):
    """On any machine: the stand-in for Fashion-MNIST's codes is a code set train.py and sample.py take, and
    sample.py decodes it through its random tokenizer into 28 x 28 images."""
    code_dir = random_codes(tmp_path)
    cs = codesets.CodeSet(str(code_dir))
    assert len(cs) == 512 and cs.grid == (7, 7) and cs.num_codes == 256 and cs.num_classes == 10
    train.main(["--codes", str(code_dir), "--out", str(tmp_path / "run"), "--steps", "2", *SMALL])
    sample.main(["--ckpt", str(tmp_path / "run" / "checkpoints" / "last.pt"), "--num-samples", "3", "--steps", "2",
                 "--cfg-scale", "2", "--out", str(tmp_path / "samples")])
    with np.load(tmp_path / "samples" / "samples.npz") as f:
        assert f["arr_0"].shape == (3, 28, 28, 1) and f["arr_0"].dtype == np.uint8


@gpu
def test_compiled_bf16_training_step_on_the_gpu(codes, tmp_path, capsys):
    run = tmp_path / "run"
    train.main(["--codes", str(codes), "--out", str(run), "--steps", "4", "--ckpt-every", "2", *SMALL,
                *COMPILED_BF16])
    assert "1 process(es) on cuda, bf16" in capsys.readouterr().out
    ckpt = weights(run)
    assert ckpt["step"] == 4 and ckpt["settings"]["compile"] and ckpt["settings"]["precision"] == "bf16"
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])  # the raw module is saved
    assert all(torch.isfinite(v).all() for key in ("model", "ema") for v in ckpt[key].values())
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] is not None and np.isfinite(r["grad_norm"]) for r in records)
    assert json.loads((run / "settings.json").read_text())["precision"] == "bf16"
    flow = checkpoint.Flow(str(run / "checkpoints" / "last.pt"), torch.device("cuda"))  # loads strictly: no prefixes
    assert next(flow.model.parameters()).is_cuda


def distance(a, b, keys=("model", "ema")):
    """The L2 distance between two checkpoints' weights, over every tensor of model and EMA."""
    return sum((a[k][n].double() - b[k][n].double()).pow(2).sum() for k in keys for n in a[k]).sqrt().item()


@gpu
def test_a_resumed_compiled_run_ends_where_an_uninterrupted_one_does(codes, tmp_path):
    common = ["--codes", str(codes), *SMALL, *COMPILED_BF16, "--lr", "1e-3", "--ema-decay", "0.9",
              "--ckpt-every", "3"]
    train.main(common + ["--out", str(tmp_path / "full"), "--steps", "6"])
    train.main(common + ["--out", str(tmp_path / "again"), "--steps", "6"])
    train.main(common + ["--out", str(tmp_path / "split"), "--steps", "3"])
    shutil.copy(tmp_path / "split" / "checkpoints" / "last.pt", tmp_path / "step-3.pt")
    train.main(common + ["--out", str(tmp_path / "split"), "--steps", "6", "--resume"])
    full, again, split = weights(tmp_path / "full"), weights(tmp_path / "again"), weights(tmp_path / "split")
    at_3 = torch.load(tmp_path / "step-3.pt", map_location="cpu", weights_only=False)
    assert split["step"] == full["step"] == 6 and split["data"] == full["data"]
    try:
        assert_same_state(full, again)
    except AssertionError:  # this GPU's compiled step is not bitwise reproducible: see below
        deterministic = False
    else:
        deterministic = True
    if deterministic:  # two uninterrupted runs agree bitwise, so a resumed one must too
        assert_same_state(full, split)
        return
    # Not bitwise reproducible: the CUDA backward accumulates some gradients with atomic adds (the embedding and
    # cross-entropy gathers' scatter-adds, and Triton reductions under compile), whose order varies from run to
    # run, so the float32 sums differ in their last bits, and bf16 autocast can then round a product one bf16 ulp
    # (2^-8, 0.4%) apart. Over the 3 Adam steps after the resume point that moves the weights by well under 1% of
    # the distance those steps move them. A resume that got anything wrong (the optimizer moments, the random
    # state, the data position, the EMA) takes other steps altogether: tens of percent of that distance or more.
    # So the resumed run must be within 2% of that distance of the uninterrupted one (the distance between the
    # two uninterrupted runs, the noise floor, is in the message).
    moved, off, noise = distance(full, at_3), distance(full, split), distance(full, again)
    assert off <= 0.02 * moved, (f"resumed run {off:.3g} from the uninterrupted one, {100 * off / moved:.2f}% of "
                                 f"the {moved:.3g} steps 4-6 moved it; two uninterrupted runs: {noise:.3g}")


@gpu
def test_sampling_under_bf16_autocast_on_the_gpu(purrception_ckpt, tmp_path, monkeypatch):
    """sample.py --precision bf16 on the GPU writes its samples and records bf16; auto is bf16 where the GPU has
    it. Only the network runs in bf16: its output is bf16, the posterior mean and the solver's state float32."""
    ckpt = str(purrception_ckpt)
    base = ["--ckpt", ckpt, "--num-samples", "6", "--steps", "3", "--cfg-scale", "2", "--batch-size", "4"]
    for precision in ("bf16", "auto"):
        sample.main(base + ["--precision", precision, "--out", str(tmp_path / precision)])
    settings = {p: json.loads((tmp_path / p / "settings.json").read_text()) for p in ("bf16", "auto")}
    assert settings["bf16"]["precision"] == "bf16"
    assert settings["auto"]["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    with np.load(tmp_path / "bf16" / "samples.npz") as f:
        assert f["arr_0"].shape == (6, 28, 28, 1) and f["arr_0"].dtype == np.uint8
        assert json.loads(str(f["settings"])) == settings["bf16"]

    with distributed.processes() as (_, _, device):  # the scripts' device: the GPU
        flow = checkpoint.Flow(ckpt, device)
    assert device.type == "cuda" and next(flow.model.parameters()).is_cuda
    network, means, states = probe_sampler(flow, monkeypatch)
    with Made() as made:
        network.made = made
        pictures = sample.generate(flow, sample.sample_labels(4, flow.num_classes), 0, steps=3, cfg_scale=2.0,
                                   precision="bf16")
    assert pictures.shape == (4, 28, 28, 1)
    assert network.outputs and set(network.outputs) == {torch.bfloat16}  # the network's output
    # guidance (vfm.guided_rows) takes the bf16 output a chunk at a time to float32: the posterior mean's logits
    assert means and set(means) == {(torch.float32, torch.float32)}
    assert states and set(states) == {torch.float32}  # the solver's state z and its velocity
    floats = {(d, inside) for _, d, inside in made.made if d.is_floating_point}
    assert (torch.bfloat16, True) in floats
    assert {d for d, inside in floats if not inside} - {torch.float64} == {torch.float32}  # all else float32


def probe_sampler(flow, monkeypatch):
    """Hooks that record the dtypes of the network's outputs (and mark the ops it makes for a Made probe), of the
    posterior mean's logits and result, and of the solver's state and velocity."""
    class Network:
        made, outputs = None, []

        @classmethod
        def enter(cls, module, args):
            cls.made.inside = True

        @classmethod
        def leave(cls, module, args, out):
            cls.made.inside = False
            cls.outputs.append(out.dtype)

    flow.model.register_forward_pre_hook(Network.enter)
    flow.model.register_forward_hook(Network.leave)
    means, states = [], []
    posterior_mean, solve_ode = flow.objective.posterior_mean, vfm.solve_ode

    def mean(logits, tau):
        mu = posterior_mean(logits, tau)
        means.append((logits.dtype, mu.dtype))
        return mu

    def solve(velocity, z, steps, solver="euler"):
        def tracked(z, t):
            u = velocity(z, t)
            states.extend([z.dtype, u.dtype])
            return u
        z = solve_ode(tracked, z, steps, solver)
        states.append(z.dtype)
        return z

    monkeypatch.setattr(flow.objective, "posterior_mean", mean)
    monkeypatch.setattr(vfm, "solve_ode", solve)
    return Network, means, states


@gpu
def test_a_sampling_pass_makes_its_output_once_on_the_gpu():
    """Without gradients the final layer writes the p * p positions of every patch into one output (as on the CPU,
    tests/test_dit.py): the numbers of unpatchify(linear(x)), and a pass in bf16 peaks at the output and one p^2-th
    of it beside what was held before (the copy of an unpatchify would make it twice the output)."""
    model = tiny(grid_size=16, patch_size=2, out_dim=8192).cuda()  # the output, 4 x 16 x 16 x 8192 bf16: 16 MiB
    perturb_final_layer(model)
    x, t, y = torch.randn(4, 16, 16, 4).cuda(), torch.rand(4).cuda(), torch.randint(0, 11, (4,)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = unpatchified(model, x, t, y)
        with torch.no_grad():
            model(x, t, y)  # the first pass sets up the matrix products' workspaces
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = model(x, t, y)
            peak = torch.cuda.max_memory_allocated() - before
    torch.testing.assert_close(out, expected)
    size = out.numel() * out.element_size()
    assert size == 2**24 and size * 5 // 4 <= peak < size * 3 // 2  # the rest: hidden states, weights in bf16 (~1 MiB)
