"""toy/run.py: every flag, its outputs, and clear errors for bad input."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import baselines
from conftest import ROOT, contents, fill_the_disk, one_line_error
from toy import figures, run
from toy.toys import TOYS, Oracle, make_toy


def test_toys_are_distributions_with_the_stated_support():
    for name in TOYS:
        toy = make_toy(name)
        assert toy.true_histogram().sum().item() == pytest.approx(1.0)
        assert toy.tv(toy.configs[torch.multinomial(toy.probs.float(), 50000, replacement=True)]) < 0.03
    assert len(make_toy("checkerboard").configs) == 32 and make_toy("checkerboard").num_codes == 64
    pairs = make_toy("pairs")
    assert all(a // 4 == b // 4 for a, b in pairs.configs.tolist()) and len(pairs.configs) == 64


def test_tv_of_known_histograms():
    toy = make_toy("checkerboard")
    white = torch.tensor([[1]] * 100)  # cell 1 is white: p = 0 there
    assert toy.tv(white) == pytest.approx(1.0)
    assert toy.tv(toy.configs) == pytest.approx(0.0, abs=1e-12)
    # All mass on one black cell: 1/2 (|1 - 1/32| + 31 * 1/32) = 31/32.
    assert toy.tv(torch.tensor([[0]] * 10)) == pytest.approx(31 / 32, abs=1e-12)
    # Pairs: half on (0, 1) (same row, p = 1/64), half on (0, 4) (rows differ, p = 0): 1 - min(1/2, 1/64) = 63/64.
    assert make_toy("pairs").tv(torch.tensor([[0, 1], [0, 4]] * 5)) == pytest.approx(63 / 64, abs=1e-12)


@pytest.mark.parametrize("method", run.METHODS)
def test_one_method_writes_metrics(tmp_path, method):
    out = tmp_path / method
    metrics = run.main(["--method", method, "--toy", "pairs", "--iters", "20", "--seed", "3",
                        "--num-samples", "500", "--steps", "5", "--out", str(out)])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics
    assert {"method", "toy", "iters", "tv", "seconds"} <= saved.keys()
    assert saved["method"] == method and saved["toy"] == "pairs" and saved["seed"] == 3
    assert saved["iters"] == (0 if method == "oracle" else 20)
    # The same model and samples built by hand from the flags: 20 iterations of seed 3, 500 samples of 5 steps.
    toy = make_toy("pairs")
    objective = baselines.build_objective("purrception" if method == "oracle" else method, toy.codebook)
    model = Oracle(toy, objective.codebook) if method == "oracle" else run.train(toy, objective, 20, 3)
    assert saved["tv"] == round(toy.tv(run.sample(toy, objective, model, 500, 3, steps=5)), 4)
    if method == "purrception":
        assert set(saved["kl_by_t"]) == {"0.1", "0.3", "0.5", "0.7", "0.9"}
        assert all(kl >= 0 for kl in saved["kl_by_t"].values())  # KL(exact || learned) >= 0


def test_the_codebook_scale_flag_reaches_the_objective(tmp_path):
    toy = make_toy("pairs")
    for scale, codebook in (("raw", toy.codebook), ("rms", toy.codebook / toy.codebook.pow(2).mean().sqrt())):
        metrics = run.main(["--method", "oracle", "--toy", "pairs", "--num-samples", "100", "--steps", "2",
                            "--out", str(tmp_path / scale)] + (["--codebook-scale", scale] if scale == "rms" else []))
        assert metrics["codebook_scale"] == scale
        _, oracle, objective, _ = run.run_method(toy, "oracle", 0, 0, 100, 2, codebook_scale=scale)
        assert torch.allclose(objective.codebook, codebook) and torch.equal(oracle.codebook, codebook.double())


def test_oracle_is_within_sampling_error(tmp_path):
    """The exact posterior through 100 Euler steps: its TV is that of n exact draws, below 1/2 sqrt(M / n) for M
    configurations (the bound on the expected TV of n draws from p)."""
    metrics = run.main(["--method", "oracle", "--toy", "rings", "--num-samples", "4000", "--out", str(tmp_path)])
    assert metrics["steps"] == 100 and metrics["tv"] < 0.5 * math.sqrt(len(make_toy("rings").configs) / 4000)


def test_training_lowers_tv(tmp_path):
    args = ["--method", "purrception", "--num-samples", "2000", "--steps", "20"]
    untrained, trained = (run.main(args + ["--iters", iters, "--out", str(tmp_path / iters)])["tv"]
                          for iters in ("1", "100"))
    assert trained < untrained - 0.2, (trained, untrained)


def test_same_seed_same_result(tmp_path):
    args = ["--method", "purrception", "--iters", "10", "--num-samples", "300", "--steps", "4"]
    a = run.main(args + ["--out", str(tmp_path / "a")])
    b = run.main(args + ["--out", str(tmp_path / "b")])
    assert a["tv"] == b["tv"]


def test_all_methods_write_table_and_figures(tmp_path):
    run.main(["--toy", "rings", "--iters", "15", "--num-samples", "400", "--steps", "4", "--out", str(tmp_path)])
    table = (tmp_path / "table.md").read_text().splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == ["oracle", "purrception", "cfm", "cfm-endpoint", "dfm"]
    for name in ("samples.png", "posterior.png", "temperature.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run.main(["--iters", "5", "--num-samples", "100", "--steps", "2", "--no-figures", "--out", str(tmp_path / "nf")])
    assert not (tmp_path / "nf" / "samples.png").exists() and (tmp_path / "nf" / "table.md").exists()



PLASMA_TOP, PLASMA_BOTTOM = (240, 249, 33), (13, 8, 135)  # the colours of the highest entropy and of 0


def pixels_near(image, rgb, tolerance=40):
    """How many pixels of a PIL image are within `tolerance` (Euclidean, in 0-255 units) of the colour rgb."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)  # (H, W, 3)
    return int((np.linalg.norm(pixels - rgb, axis=-1) < tolerance).sum())


def test_animate_writes_the_flow_as_a_gif(tmp_path, capsys):
    """--animate: flow.gif, a frame per figures.frame_steps of the 100 Euler steps. The oracle's points start at
    the prior (every posterior has the entropy of p(c), the top of the colour scale) and end on their codes
    (entropy 0, its bottom); the left half of a frame is all panel, no colour bar."""
    from PIL import Image
    argv = ["--method", "oracle", "--num-samples", "100", "--animate", "--out", tmp_path]
    run.main([str(a) for a in argv])
    with Image.open(tmp_path / "flow.gif") as gif:
        assert gif.n_frames == len(figures.frame_steps(100)) == 48 and gif.size == (460, 390)
        gif.seek(0)
        first = gif.crop((0, 0, 220, 390))
        gif.seek(gif.n_frames - 1)
        last = gif.crop((0, 0, 220, 390))
    assert pixels_near(first, PLASMA_TOP) > 200 and pixels_near(first, PLASMA_BOTTOM) == 0
    assert pixels_near(last, PLASMA_BOTTOM) > 200 and pixels_near(last, PLASMA_TOP) == 0
    (tmp_path / "metrics.json").unlink()
    err = one_line_error(capsys, run.main, argv)  # an earlier flow.gif is kept too, unless --force
    assert f"{tmp_path}/flow.gif exists (an earlier run)" in err


def test_the_toy_preset_is_the_defaults(tmp_path):
    """configs/toy.json's section "toy" sets some flags of toy/run.py, each to its default; a preset's "toy"
    section is the one toy/run.py reads, and a flag on the command line overrides it."""
    with open(os.path.join(ROOT, "configs", "toy.json")) as f:
        preset = json.load(f)["toy"]
    defaults = vars(run.parse_args([]))
    assert {"toy", "iters", "seed", "num_samples", "steps"} <= preset.keys() <= defaults.keys()
    assert vars(run.parse_args(["--config", "toy"])) == dict(defaults, config="toy")
    (tmp_path / "mine.json").write_text(json.dumps({"toy": {"iters": 7, "toy": "rings"}, "train": {"steps": 3}}))
    args = run.parse_args(["--config", str(tmp_path / "mine.json"), "--toy", "pairs"])
    assert (args.iters, args.toy, args.steps) == (7, "pairs", 100)


def test_the_floor_is_the_tv_of_exact_draws(tmp_path):
    """tv_floor: the mean TV of 5 sets of n exact draws from p(c), drawn in turn from a generator of seed 0,
    recomputed here from the draws' counts; metrics.json and table.md carry it beside each TV."""
    for name, n in (("checkerboard", 50), ("pairs", 300)):
        toy, g = make_toy(name), torch.Generator().manual_seed(0)
        p = dict(zip(map(tuple, toy.configs.tolist()), toy.probs.tolist()))
        exact = []
        for _ in range(5):
            drawn = toy.configs[torch.multinomial(toy.probs.float(), n, replacement=True, generator=g)].tolist()
            counts = {c: drawn.count(list(c)) for c in p}  # every drawn tuple lies in the support
            exact.append(0.5 * sum(abs(counts[c] / n - p[c]) for c in p))
        assert run.tv_floor(toy, n) == pytest.approx(sum(exact) / 5, abs=1e-12), name
    metrics = run.main(["--method", "cfm", "--iters", "2", "--num-samples", "50", "--steps", "1",
                        "--out", str(tmp_path / "one")])
    assert metrics["tv_floor"] == round(run.tv_floor(make_toy("checkerboard"), 50), 4) > 0.2
    run.main(["--iters", "2", "--num-samples", "300", "--steps", "1", "--no-figures", "--toy", "pairs",
              "--out", str(tmp_path)])
    floor = round(run.tv_floor(make_toy("pairs"), 300), 4)
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0].split("|")[-2].strip() == "floor"
    assert [row.split("|")[-2].strip() for row in table[2:]] == [f"{floor:.3f}"] * 5
    assert all(json.loads(f.read_text())["tv_floor"] == floor for f in tmp_path.glob("metrics-*.json"))


def test_a_floor_above_half_the_tv_is_a_warning(tmp_path, capsys):
    """Purrception, 300 iterations: at --num-samples 50 its TV is mostly the floor (one line on stderr, naming
    --num-samples, and the run ends as usual); at the default 20,000 it is not. Then the rule on the README's table
    of the default run."""
    argv = ["--method", "purrception", "--iters", "300", "--steps", "20", "--no-figures"]
    metrics = run.main(argv + ["--num-samples", "50", "--out", str(tmp_path / "50")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: at --num-samples 50 the TV of 50 exact draws from p(c)")
    assert "raise --num-samples" in err[0] and metrics["tv_floor"] > metrics["tv"] / 2
    metrics = run.main(argv + ["--out", str(tmp_path / "default")])
    assert metrics["num_samples"] == 20000 and capsys.readouterr().err == ""
    floor = run.tv_floor(make_toy("checkerboard"), 20000)  # the README's default table (oracle, Purrception,
    readme = dict(oracle=0.018, purrception=0.034, cfm=0.492, **{"cfm-endpoint": 0.534}, dfm=0.020)  # ..., DFM)
    rows = [dict(method=m, tv=tv, tv_floor=floor, num_samples=20000) for m, tv in readme.items()]
    assert not run.floor_warning(rows) and capsys.readouterr().err == ""
    assert run.floor_warning([dict(r, tv=r["tv"] / 10) for r in rows])  # ten times better: at the floor
    assert capsys.readouterr().err.startswith("warning: at --num-samples 20000")


# ---- bad input: one line on stderr, exit status 2, files left as they were ---------------------------------

TINY = ["--iters", 2, "--num-samples", 10, "--steps", 1]


@pytest.mark.parametrize("args, message", [
    (["--iters", "0"], "--iters 0: expected a positive number"),
    (["--num-samples", "-5"], "--num-samples -5: expected a positive number"),
    (["--steps", "0"], "--steps 0: expected a positive number"),
    (["--seed", "-1"], "--seed -1: expected an integer in [0, 2^32)"),
    (["--seed", str(2**64)], f"--seed {2**64}: expected an integer in [0, 2^32)"),
    (["--out", "{tmp}/FILE"], "{tmp}/FILE: exists and is not a directory"),
    (["--out", "{tmp}/FILE/out"], "{tmp}/FILE/out: cannot create the output directory"),
    (["--method", "oracle", "--num-samples", str(10**13)], f"out of memory with --num-samples {10**13}"),
    (["--method", "cfm", "--animate"], "--animate --method cfm: flow.gif shows the posterior of oracle or"),
    (["--config", "nosuch"], "--config nosuch: no such preset (expected"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    (tmp_path / "FILE").write_text("mine")
    err = one_line_error(capsys, run.main, TINY + ["--out", tmp_path / "out"] + [a.format(tmp=tmp_path) for a in args])
    assert message.format(tmp=tmp_path) in err
    assert (tmp_path / "FILE").read_text() == "mine"
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("method", ["cfm", None])
def test_an_earlier_run_is_kept_unless_force(tmp_path, capsys, method):
    argv = TINY + ["--out", tmp_path] + (["--method", method] if method else [])
    run.main([str(a) for a in argv])  # fewer than 64 samples: the trajectories show them all
    before = contents(tmp_path)
    assert len(before) == (1 if method else 9)
    err = one_line_error(capsys, run.main, argv + ["--seed", 1])
    assert "exists (an earlier run): pass --force" in err and contents(tmp_path) == before
    run.main([str(a) for a in argv + ["--seed", 1, "--force"]])
    assert list(contents(tmp_path)) == list(before) and contents(tmp_path) != before


def test_a_full_disk_is_one_line_and_leaves_the_earlier_run(tmp_path, monkeypatch, capsys):
    """The disk fills up at the last file: the metrics already written beside theirs replace nothing."""
    argv = TINY + ["--no-figures", "--out", tmp_path]
    run.main([str(a) for a in argv])
    before = contents(tmp_path)
    fill_the_disk(monkeypatch, at="table.md")
    err = one_line_error(capsys, run.main, argv + ["--seed", 1, "--force"])
    assert err.startswith(f"error: {tmp_path}/table.md") and err.endswith(": No space left on device")
    assert contents(tmp_path) == before  # no other file, no temporary one


@pytest.mark.parametrize("args,message", [
    (["--method", "gan"], "invalid choice: 'gan'"),
    (["--toy", "moons"], "invalid choice: 'moons'"),
    (["--steps", "x"], "invalid int value"),
])
def test_bad_flags_exit_with_a_clear_error(args, message):
    proc = subprocess.run([sys.executable, "toy/run.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
