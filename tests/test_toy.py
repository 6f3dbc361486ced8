"""toy/run.py: every flag, its outputs, and clear errors for bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

from toy import run
from toy.toys import TOYS, make_toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_toys_are_distributions_with_the_stated_support():
    for name in TOYS:
        toy = make_toy(name)
        assert toy.true_histogram().sum().item() == pytest.approx(1.0)
        assert toy.tv(toy.configs[torch.multinomial(toy.probs.float(), 50000, replacement=True)]) < 0.03
    assert len(make_toy("checkerboard").configs) == 32 and make_toy("checkerboard").num_codes == 64
    pairs = make_toy("pairs")
    assert all(a // 4 == b // 4 for a, b in pairs.configs.tolist()) and len(pairs.configs) == 64


def test_tv_of_disjoint_and_identical_histograms():
    toy = make_toy("checkerboard")
    white = torch.tensor([[1]] * 100)  # cell 1 is white: p = 0 there
    assert toy.tv(white) == pytest.approx(1.0)
    assert toy.tv(toy.configs) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("method", run.METHODS)
def test_one_method_writes_metrics(tmp_path, method):
    out = tmp_path / method
    metrics = run.main(["--method", method, "--toy", "pairs", "--iters", "20", "--seed", "3",
                        "--num-samples", "500", "--steps", "5", "--out", str(out)])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics
    assert {"method", "toy", "iters", "tv", "seconds"} <= saved.keys()
    assert saved["method"] == method and saved["toy"] == "pairs" and saved["seed"] == 3
    assert saved["iters"] == (0 if method == "oracle" else 20) and 0 <= saved["tv"] <= 1
    if method == "purrception":
        assert set(saved["kl_by_t"]) == {"0.1", "0.3", "0.5", "0.7", "0.9"}


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


@pytest.mark.parametrize("args,message", [
    (["--method", "gan"], "invalid choice: 'gan'"),
    (["--toy", "moons"], "invalid choice: 'moons'"),
    (["--iters", "0"], "must be positive"),
    (["--steps", "x"], "invalid int value"),
])
def test_bad_flags_exit_with_a_clear_error(args, message):
    proc = subprocess.run([sys.executable, "toy/run.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
