"""Kept checkpoints as EMA-only files, and experiments/curve.py: every kept checkpoint of a tiny run sampled as
sample.py samples it and scored as evaluate.py (or fid.py, on random Inception weights) scores it; a stopped sweep
resumes, another sweep into the same --out is refused, bad input is one line, torchrun gives the same scores."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

import evaluate
import sample
import train
from conftest import FASHION_MNIST, one_line_error, run_cli, workers_said
from experiments import curve
from support import checkpoint, inception
from test_fid import random_weights

PNG = b"\x89PNG\r\n\x1a\n"
KEPT = ["step-0000020.pt", "step-0000040.pt", "step-0000041.pt"]  # every 20 steps, and the last
SWEEP = ["--num-samples", "12", "--batch-size", "5", "--steps", "2", "--temperature", "0.8", "--seed", "3"]
TIMES = ("seconds", "sample_seconds", "processes")


@pytest.fixture(scope="module")
def run(codes_dir, tmp_path_factory):
    """41 steps of a tiny run, kept every 20 steps and at the last: by step 40 its samples depend on the noise (as
    those of conftest's flow_ckpts), and its EMA (decay 0.5) moves with each step."""
    out = tmp_path_factory.mktemp("run")
    train.main(["--codes", str(codes_dir), "--out", str(out), "--steps", "41", "--keep-every", "20", "--ckpt-every",
                "10", "--model", "DiT-T/1", "--batch-size", "8", "--sample-every", "0", "--lr", "3e-3", "--ema-decay",
                "0.5", "--codebook-scale", "rms"])
    return out


def lenet(classifier_path, out, *more):
    return ["--run-dir", "RUN", "--metric", "fid-lenet", "--data-dir", FASHION_MNIST, "--classifier",
            str(classifier_path), *SWEEP, "--out", str(out), *more]


def with_run(argv, run):
    return [str(run) if a == "RUN" else str(a) for a in argv]


@pytest.fixture(scope="module")
def sweep(run, classifier, tmp_path_factory):  # noqa: F811
    """The FID-LeNet sweep of the run, in this process: its directory and {step: the images it drew}."""
    out = tmp_path_factory.mktemp("curve")
    with pytest.MonkeyPatch.context() as m:
        draws = record_draws(m)
        curve.main(with_run(lenet(classifier, out), run))
    return out, {step: np.concatenate([x for s, _, x in sorted(draws) if s == step]) for step, _, _ in draws}


def scores(out):
    return {p.name: json.loads(p.read_text()) for p in sorted(out.glob("step-*.json"))}


def record_draws(monkeypatch):
    """[(the checkpoint's step, b, images)] of every batch b drawn from now on."""
    draws, real = [], sample.generate_batch

    def generate_batch(flow, labels, seed, b, *args, **kw):
        draws.append((flow.step, b, real(flow, labels, seed, b, *args, **kw)))
        return draws[-1][2]
    monkeypatch.setattr(sample, "generate_batch", generate_batch)
    return draws


def test_kept_checkpoints_are_ema_only_and_sample_as_last_pt(run, tmp_path, capsys):
    ckpts = run / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["last.pt", *KEPT]
    full = checkpoint.load(str(ckpts / "last.pt"))
    for name in KEPT:
        kept = torch.load(ckpts / name, weights_only=False)
        assert set(kept) == {"format", "ema", "step", "settings", "codebook", "codes_meta"}
        assert kept["format"] == checkpoint.EMA_FORMAT and kept["step"] == int(name[5:12])
        assert kept["settings"] == full["settings"] and kept["codes_meta"] == full["codes_meta"]
        assert (ckpts / name).stat().st_size < 0.5 * (ckpts / "last.pt").stat().st_size  # no raw weights, no AdamW
    last = torch.load(ckpts / KEPT[-1], weights_only=False)["ema"]
    assert all(torch.equal(v, full["ema"][k]) for k, v in last.items()) and last.keys() == full["ema"].keys()
    drawn = {name: sample.draw(checkpoint.Flow(str(ckpts / name)), 12, seed=1, batch_size=5, steps=2)[0]
             for name in ("last.pt", *KEPT)}
    assert np.array_equal(drawn["last.pt"], drawn[KEPT[-1]])
    assert not np.array_equal(drawn[KEPT[0]], drawn[KEPT[-1]])  # each kept step its own EMA
    with pytest.raises(ValueError, match="EMA-only file of a kept step holds no raw weights"):
        checkpoint.Flow(str(ckpts / KEPT[0]), use_ema=False)
    line = one_line_error(capsys, sample.main, ["--ckpt", ckpts / KEPT[0], "--no-ema", "--out", tmp_path / "s"])
    assert "no raw weights" in line
    with pytest.raises(ValueError, match="no optimizer state to resume from"):
        checkpoint.load(str(ckpts / KEPT[0]))


def test_the_sweep_scores_every_kept_checkpoint_as_sample_py_and_evaluate_py_do(run, sweep, classifier,  # noqa: F811
                                                                               tmp_path):
    out, drawn = sweep
    records = scores(out)
    assert list(records) == [name.replace(".pt", ".json") for name in KEPT] and list(drawn) == [20, 40, 41]
    assert [r["step"] for r in records.values()] == [20, 40, 41] and not list(out.glob(".parts-*"))
    settings = records["step-0000040.json"]["settings"]
    assert settings["temperature"] == "0.8" and settings["num_samples"] == 12 and settings["seed"] == 3
    assert settings["run_dir"] == str(run) and settings["cfg_interval"] == [0.0, 1.0]
    assert settings["precision"] == "fp32" and settings["classifier"] == str(classifier)
    sample.main(["--ckpt", str(run / "checkpoints" / KEPT[1]), "--out", str(tmp_path), *SWEEP])
    with np.load(tmp_path / "samples.npz") as f:
        assert np.array_equal(drawn[40], f["arr_0"])
        expected = evaluate.evaluate_images(f["arr_0"], f["labels"], "fashion-mnist", FASHION_MNIST, str(classifier))
    assert len(np.unique(drawn[40].reshape(12, -1), axis=0)) > 1, "the samples must depend on the noise"
    assert {k: records["step-0000040.json"][k] for k in ("fid", "accuracy", "coverage")} == \
        {k: expected[k] for k in ("fid", "accuracy", "coverage")}
    assert records["step-0000020.json"]["fid"] != records["step-0000041.json"]["fid"]
    table = [line for line in (out / "curve.md").read_text().splitlines() if line.startswith("|")]
    assert table[0] == "| step | FID-LeNet | accuracy | coverage | seconds |"
    assert [row.split("|")[1].strip() for row in table[2:]] == ["20", "40", "41"]
    assert f"{records['step-0000041.json']['fid']:.4g}" in table[-1]
    assert (out / "curve.png").read_bytes()[:8] == PNG


def test_a_stopped_sweep_resumes_and_another_sweep_is_refused(run, sweep, classifier, tmp_path,  # noqa: F811
                                                              monkeypatch, capsys):
    out = tmp_path / "curve"
    shutil.copytree(sweep[0], out)
    before = scores(out)
    (out / "step-0000040.json").unlink()  # as if stopped while sampling step 40
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("step-*.json")}
    os.utime(out / "curve.md", (1, 1))
    draws = record_draws(monkeypatch)
    curve.main(with_run(lenet(classifier, out), run))
    assert [(step, b) for step, b, _ in draws] == [(40, 0), (40, 1), (40, 2)]  # 12 samples in batches of 5
    assert {name: (out / name).stat().st_mtime_ns for name in mtimes} == mtimes
    strip = lambda records: {n: {k: v for k, v in r.items() if k not in TIMES} for n, r in records.items()}
    assert strip(scores(out)) == strip(before) and (out / "curve.md").stat().st_mtime > 1
    draws.clear()
    capsys.readouterr()
    for flag, value, said in (("--temperature", "1.0", "--temperature 0.8, not 1.0"),
                              ("--batch-size", "4", "--batch-size 5, not 4"), ("--metric", "fid", "")):
        fid_files = ["--reference", out / "curve.md", "--inception", out / "curve.md"] if flag == "--metric" else []
        line = one_line_error(capsys, curve.main, with_run(lenet(classifier, out, flag, value), run) + fid_files)
        assert f"step-0000020.json: scored with {said or '--metric fid-lenet, not fid'}" in line, line
    assert draws == []


def test_bad_input_is_one_line_before_any_sampling(run, tmp_path, monkeypatch, capsys):
    drawn = record_draws(monkeypatch)
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    shutil.copyfile(run / "checkpoints" / "last.pt", empty / "checkpoints" / "last.pt")
    absent, out = tmp_path / "absent", tmp_path / "out"
    fid_flags = lambda ref, weights: ["--metric", "fid", "--reference", ref, "--inception", weights]
    for argv, said in (
            (["--run", absent], f"{absent}: no such run directory"),
            (["--run", empty], "checkpoints: no kept checkpoints (step-NNNNNNN.pt); train with --keep-every N"),
            (["--run", run, *fid_flags(absent, run / "checkpoints" / "last.pt")],
             f"{absent}: no such file; expected ADM's reference batch"),
            (["--run", run, *fid_flags(run / "checkpoints" / "last.pt", absent)],
             f"{absent}: no such file; expected the FID Inception weights"),
            (["--run", run, "--metric", "fid"], "--metric fid needs --reference"),
            (["--run", run, "--metric", "fid-lenet"], "--metric fid-lenet needs --data-dir"),
            (["--run", run, "--metric", "fid-lenet", "--data-dir", absent], str(absent)),
            (["--run", run, "--metric", "fid-lenet", "--data-dir", FASHION_MNIST, "--temperature", "hot"], "hot")):
        assert said in one_line_error(capsys, curve.main, [*argv, "--out", out])
    assert drawn == [] and not (out.exists() and list(out.glob("step-*")))


def test_fid_on_random_inception_weights(run, tmp_path, monkeypatch):
    """--metric fid's plumbing: the samples' pool_3 statistics (grey images as RGB) against the reference's stored
    ones. The Frechet distance is recorded, not computed (in 2048 dimensions it costs ~10 s of CPU)."""
    weights = tmp_path / inception.WEIGHTS_FILE
    torch.save(random_weights(), weights)
    mu, sigma = np.arange(2048.0), np.eye(2048)
    np.savez(tmp_path / "reference.npz", mu=mu, sigma=sigma)
    calls = []
    monkeypatch.setattr(curve, "frechet_distance", lambda *stats: calls.append(stats) or 12.5 + len(calls))
    curve.main([str(a) for a in ["--run-dir", run, "--metric", "fid", "--reference", tmp_path / "reference.npz",
                                 "--inception", weights, "--num-samples", 2, "--steps", 1, "--out", tmp_path / "c"]])
    records = list(scores(tmp_path / "c").values())
    assert [(r["step"], r["fid"]) for r in records] == [(20, 13.5), (40, 14.5), (41, 15.5)]
    assert all(np.isfinite(r["inception_score"]) and r["inception_score"] >= 1 - 1e-9 for r in records)
    assert all(np.array_equal(c[2], mu) and np.array_equal(c[3], sigma) for c in calls)
    images, _ = sample.draw(checkpoint.Flow(str(run / "checkpoints" / KEPT[-1])), 2, steps=1)
    with torch.no_grad():
        features, _ = inception.load(str(weights))(torch.from_numpy(np.repeat(images, 3, axis=-1)))
    np.testing.assert_allclose(calls[-1][0], features.double().mean(0).numpy(), rtol=1e-4, atol=1e-6)
    assert "| step | FID | Inception Score | seconds |" in (tmp_path / "c" / "curve.md").read_text()


def test_torchrun_gives_the_scores_of_one_process(run, sweep, classifier, tmp_path):  # noqa: F811
    rc, _, err = run_cli("torchrun --standalone --nproc_per_node=2 experiments/curve.py",
                         *with_run(lenet(classifier, tmp_path), run))
    assert rc == 0, workers_said(err)
    two, one = scores(tmp_path), scores(sweep[0])
    assert all(r["processes"] == 2 for r in two.values()) and not list(tmp_path.glob(".parts-*"))
    strip = lambda records: {n: {k: v for k, v in r.items() if k not in TIMES} for n, r in records.items()}
    # The same samples and scores; torchrun's workers run one thread each, whose sums in the classifier round
    # differently, so the floats agree to 1e-6, not to the last bit.
    assert close(strip(two), strip(one))


def close(a, b, rel=1e-6):
    """a == b, floats to a relative 1e-6, through dicts and lists."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(close(x, y, rel) for x, y in zip(a, b))
    return a == pytest.approx(b, rel=rel) if isinstance(a, float) else a == b


def test_config_gives_a_presets_sampler(monkeypatch):
    seen = []
    monkeypatch.setattr(curve, "curve", seen.append)
    curve.main(["--config", "in256-xl2", "--run", "r", "--out", "o", "--num-samples", "10000"])
    assert [(s.run_dir, s.steps, s.temperature, s.cfg_scale, s.num_samples) for s in seen] == [
        ("r", 99, "0.9", 1.0, 10000)]
