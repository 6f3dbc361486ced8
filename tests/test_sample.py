"""sample.py: the .npz for the FID evaluators, the grid, every sampling flag, torchrun, bad input."""

import json
import shutil

import numpy as np
import pytest
import torch

import baselines
import sample
import train
import vfm
from PIL import Image

from conftest import FASHION_MNIST, fill_the_disk, one_line_error, run_cli, workers_said
from support import checkpoint, images
from support.codesets import CodeSet


def load(out):
    with np.load(out / "samples.npz") as f:
        return {k: f[k] for k in f.files}


def test_samples_npz_grid_and_settings(flow_ckpts, tmp_path):
    out = tmp_path / "s"
    sample.main(["--ckpt", str(flow_ckpts["purrception"]), "--num-samples", "23", "--temperature", "0.9",
                 "--cfg-scale", "1.5", "--steps", "4", "--solver", "heun", "--seed", "1", "--batch-size", "10",
                 "--out", str(out)])
    npz = load(out)
    assert npz["arr_0"].shape == (23, 28, 28, 1) and npz["arr_0"].dtype == np.uint8
    assert np.array_equal(npz["labels"], np.arange(23) % 10)
    settings = json.loads(str(npz["settings"]))
    assert settings == json.loads((out / "settings.json").read_text())
    assert (settings["temperature"], settings["cfg_scale"], settings["steps"], settings["solver"]) == \
        ("0.9", 1.5, 4, "heun")
    assert settings["weights"] == "ema" and settings["nfe"] == 2 * 7  # Heun: 2 * 4 - 1 evaluations, doubled by CFG
    assert (settings["precision"], settings["classes"], settings["dfm_sampler"]) == ("fp32", None, None)  # on CPU
    assert settings["dataset"] == "fashion-mnist" and settings["data"]["images_md5"]  # what evaluate.py checks
    assert (out / "grid.png").read_bytes()[:4] == b"\x89PNG" and not (out / ".parts").exists()
    # 2 or 3 samples of each of 10 classes: 2 rows of 5 classes x 2 samples, 28-px tiles doubled, no empty cell
    assert Image.open(out / "grid.png").size == ((10 * 30 + 2) * 2, (2 * 30 + 2) * 2)


def test_same_seed_same_images_and_each_option_changes_them(flow_ckpts, tmp_path):
    base = ["--ckpt", str(flow_ckpts["purrception"]), "--num-samples", "20", "--steps", "3"]
    tokenizer = torch.load(flow_ckpts["purrception"], weights_only=False)["codes_meta"]["tokenizer"]["path"]
    runs = {"a": [], "b": [], "seed": ["--seed", "5"], "no-ema": ["--no-ema"],
            "schedule": ["--temperature", "linear:3:0.3"], "cfg": ["--cfg-scale", "3"], "tokenizer": ["--tokenizer", tokenizer]}
    out = {}
    for name, extra in runs.items():
        sample.main(base + extra + ["--out", str(tmp_path / name)])
        out[name] = load(tmp_path / name)
    assert np.array_equal(out["a"]["arr_0"], out["b"]["arr_0"])
    assert np.array_equal(out["a"]["arr_0"], out["tokenizer"]["arr_0"])  # the same tokenizer, named explicitly
    for name in ("seed", "no-ema", "schedule", "cfg"):
        assert not np.array_equal(out["a"]["arr_0"], out[name]["arr_0"]), f"{name} left the samples unchanged"
    settings = {name: json.loads(str(npz["settings"])) for name, npz in out.items()}
    assert settings["no-ema"]["weights"] == "model" and settings["a"]["weights"] == "ema"
    assert settings["schedule"]["temperature"] == "linear:3:0.3" and settings["seed"]["seed"] == 5


def test_dfm_samples_with_its_discrete_sampler(flow_ckpts, tmp_path):
    sample.main(["--ckpt", str(flow_ckpts["dfm"]), "--num-samples", "4", "--steps", "3", "--out", str(tmp_path)])
    assert load(tmp_path)["arr_0"].shape == (4, 28, 28, 1)
    rc, _, err = run_cli("sample.py", "--ckpt", flow_ckpts["dfm"], "--solver", "heun", "--out", tmp_path / "x")
    assert rc == 2 and "discrete Euler step only" in err and "Traceback" not in err


def test_dfm_sampler_redraw_is_the_authors_and_is_recorded(flow_ckpts, tmp_path, capsys):
    """--dfm-sampler redraw: the authors' sampler (baselines.DFM), steps - 1 network evaluations from t = 1e-4;
    a DFM option only."""
    base = ["--ckpt", str(flow_ckpts["dfm"]), "--num-samples", "6", "--steps", "4", "--cfg-scale", "2"]
    out = {}
    for name in ("reveal", "redraw"):
        sample.main(base + ["--dfm-sampler", name, "--out", str(tmp_path / name)])
        out[name] = load(tmp_path / name)
    settings = {name: json.loads(str(npz["settings"])) for name, npz in out.items()}
    assert (settings["reveal"]["dfm_sampler"], settings["reveal"]["nfe"]) == ("reveal", 2 * 4)
    assert (settings["redraw"]["dfm_sampler"], settings["redraw"]["nfe"]) == ("redraw", 2 * 3)
    flow = checkpoint.Flow(str(flow_ckpts["dfm"]))
    redrawn = sample.generate(flow, sample.sample_labels(6, 10), sample.batch_seed(0, 0), steps=4, cfg_scale=2.0,
                              dfm_sampler="redraw")
    assert np.array_equal(out["redraw"]["arr_0"], redrawn) and not np.array_equal(redrawn, out["reveal"]["arr_0"])
    capsys.readouterr()  # the runs' progress bars
    line = one_line_error(capsys, sample.main, ["--ckpt", flow_ckpts["purrception"], "--dfm-sampler", "redraw",
                                                "--out", tmp_path / "p"])
    assert "--dfm-sampler redraw:" in line and "is a purrception model, not DFM" in line
    assert not (tmp_path / "p" / "samples.npz").exists()


def test_classes_draws_those_classes_in_turn_and_records_them(flow_ckpts, tmp_path, capsys):
    ckpt = flow_ckpts["purrception"]
    sample.main(["--ckpt", str(ckpt), "--num-samples", "7", "--steps", "3", "--cfg-scale", "2", "--classes", "7,2,9",
                 "--out", str(tmp_path / "c")])
    npz, labels = load(tmp_path / "c"), np.array([7, 2, 9, 7, 2, 9, 7])
    assert np.array_equal(npz["labels"], labels) and json.loads(str(npz["settings"]))["classes"] == [7, 2, 9]
    flow = checkpoint.Flow(str(ckpt))
    assert np.array_equal(npz["arr_0"], sample.generate(flow, labels, sample.batch_seed(0, 0), steps=3, cfg_scale=2.0))
    for spec, message in (("10", "class 10 is out of range: " + f"{ckpt} has 10 classes, 0 to 9"),
                          ("1,x", "expected class indices separated by commas"), ("-1", "expected class indices"),
                          ("", "expected class indices")):
        capsys.readouterr()  # the runs' progress bars
        line = one_line_error(capsys, sample.main, ["--ckpt", ckpt, "--classes", spec, "--out", tmp_path / "x"])
        assert f"--classes {spec}: " in line and message in line
        assert not (tmp_path / "x" / "samples.npz").exists()


def test_precision_bf16_runs_on_cpu_and_is_recorded(flow_ckpts, tmp_path, monkeypatch):
    """--precision bf16 runs the network under bf16 autocast, on a CPU too (test_vfm.py checks that only the
    network does); auto is fp32 on CPU."""
    base = ["--ckpt", str(flow_ckpts["purrception"]), "--num-samples", "5", "--steps", "3", "--cfg-scale", "2"]
    generate, used = sample.generate, []
    monkeypatch.setattr(sample, "generate", lambda *a, **k: used.append(k.get("precision", "fp32")) or generate(*a, **k))
    for precision in ("bf16", "auto"):
        sample.main(base + ["--precision", precision, "--out", str(tmp_path / precision)])
    assert used[:2] == ["bf16", "fp32"]  # what the network ran at
    flow = checkpoint.Flow(str(flow_ckpts["purrception"]))
    labels = sample.sample_labels(5, 10)
    npz = {precision: load(tmp_path / precision) for precision in ("bf16", "auto")}
    assert [json.loads(str(npz[p]["settings"]))["precision"] for p in ("bf16", "auto")] == ["bf16", "fp32"]
    assert np.array_equal(npz["bf16"]["arr_0"], sample.generate(flow, labels, sample.batch_seed(0, 0), steps=3,
                                                                cfg_scale=2.0, precision="bf16"))
    assert np.array_equal(npz["auto"]["arr_0"], sample.generate(flow, labels, sample.batch_seed(0, 0), steps=3,
                                                                cfg_scale=2.0))


def test_grid_is_a_compact_picture_of_the_samples_drawn():
    """grid.png: the classes in the order drawn, a row of each (or several classes a row, when each has few
    samples), at most 8 rows and 10 columns, every cell a sample; 256-px images shrink to 128-px tiles."""

    def tiles(n, size, labels, channels=3):  # image i a flat grey of 10 * i % 250
        return np.atleast_3d(images.sample_grid(
            np.stack([np.full((size, size, channels), 10 * i % 250, np.uint8) for i in range(n)]), labels))

    def at(picture, row, col, tile, scale=1):  # the value at the centre of a tile (pad 2, before enlarging)
        return picture[scale * (2 + row * (tile + 2) + tile // 2), scale * (2 + col * (tile + 2) + tile // 2), 0]

    # 16 samples over 64 classes (one each, classes 0-15): 2 rows of 8, 256-px images as 128-px tiles
    picture = tiles(16, 256, np.arange(16) % 64)
    assert picture.shape[:2] == (2 * 130 + 2, 8 * 130 + 2)
    assert [[at(picture, r, c, 128) for c in range(8)] for r in range(2)] == \
        [[10 * (8 * r + c) for c in range(8)] for r in range(2)]
    # 1,000 samples over 10 classes: a row for each of the first 8, its first 10 samples; 32-px images doubled
    picture = tiles(1000, 32, np.arange(1000) % 10, channels=1)
    assert picture.shape == (2 * (8 * 34 + 2), 2 * (10 * 34 + 2), 1)
    assert [at(picture, r, 3, 32, scale=2) for r in range(8)] == [10 * (r + 10 * 3) % 250 for r in range(8)]
    # --classes 7,2,9: rows in the order drawn; an unconditional model's 16 samples fill 2 rows of 8
    picture = tiles(30, 64, np.array([7, 2, 9] * 10))
    assert picture.shape[:2] == (3 * 66 + 2, 10 * 66 + 2) and [at(picture, r, 0, 64) for r in range(3)] == [0, 10, 20]
    assert tiles(16, 64, np.zeros(16, np.int64)).shape[:2] == (2 * 66 + 2, 8 * 66 + 2)


def test_torchrun_gives_the_same_samples_and_couplings_as_one_process(flow_ckpts, tmp_path):
    args = ["--ckpt", flow_ckpts["purrception"], "--num-samples", "13", "--steps", "3", "--batch-size", "4",
            "--couplings"]
    rc, _, err = run_cli("torchrun --standalone --nproc_per_node=2 sample.py", *args, "--out", tmp_path / "two")
    assert rc == 0, workers_said(err)
    sample.main([str(a) for a in args] + ["--out", str(tmp_path / "one")])
    two, one = load(tmp_path / "two"), load(tmp_path / "one")
    assert two["arr_0"].shape[0] == 13 and np.array_equal(two["arr_0"], one["arr_0"])
    pairs = {n: CodeSet(str(tmp_path / n / "couplings")) for n in ("one", "two")}
    assert all(np.array_equal(a, b) for a, b in zip(pairs["one"].get(np.arange(13)), pairs["two"].get(np.arange(13))))
    assert np.array_equal(pairs["one"].get_noise(np.arange(13)), pairs["two"].get_noise(np.arange(13)))


def test_bad_input(flow_ckpts, tmp_path):
    rc, _, err = run_cli("sample.py", "--ckpt", tmp_path / "missing.pt", "--out", tmp_path / "o")
    assert rc == 2 and "missing.pt: no such file" in err and "Traceback" not in err
    rc, _, err = run_cli("sample.py", "--ckpt", flow_ckpts["purrception"], "--temperature", "warm", "--out", tmp_path)
    assert rc == 2 and "bad temperature 'warm'" in err
    import tokenizer  # a second tokenizer, trained from another seed: its codebook differs from the codes'
    tokenizer.main(["train", "--dataset", "fashion-mnist", "--data-dir", FASHION_MNIST, "--out", str(tmp_path / "vq2"),
             "--limit", "64", "--steps", "2", "--batch-size", "32", "--seed", "1"])
    rc, _, err = run_cli("sample.py", "--ckpt", flow_ckpts["purrception"],
                         "--tokenizer", tmp_path / "vq2" / "tokenizer.pt", "--out", tmp_path / "o2")
    assert rc == 2 and "does not match" in err and "Traceback" not in err
    assert not (tmp_path / "o2" / "samples.npz").exists()


def test_an_earlier_samples_file_is_kept_unless_forced(flow_ckpts, tmp_path):
    args = ["--ckpt", flow_ckpts["purrception"], "--num-samples", "4", "--steps", "2", "--out", tmp_path]
    sample.main([str(a) for a in args])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    rc, _, err = run_cli("sample.py", *args, "--seed", "3")
    assert rc == 2 and "samples.npz exists: pass --force" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    sample.main([str(a) for a in args] + ["--seed", "3", "--force"])
    assert json.loads((tmp_path / "settings.json").read_text())["seed"] == 3


@pytest.mark.parametrize("args, message", [
    (["--cfg-scale", "nan"], "--cfg-scale nan: expected a finite number"),
    (["--temperature", "linear:inf:1"], "bad temperature 'linear:inf:1'"),
    (["--num-samples", "0"], "--num-samples 0: expected a positive number"),
    (["--out", "FILE"], "exists and is not a directory"),
    (["--out", "FILE/sub"], "cannot create the output directory"),
])
def test_bad_numbers_and_paths_are_one_line_before_any_work(flow_ckpts, tmp_path, args, message):
    (tmp_path / "FILE").write_text("mine")
    args = [str(tmp_path / a) if a.startswith("FILE") else a for a in args]
    out = [] if "--out" in args else ["--out", tmp_path / "o"]
    rc, _, err = run_cli("sample.py", "--ckpt", flow_ckpts["purrception"], "--num-samples", 2, "--steps", 1, *out, *args)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "FILE").read_text() == "mine" and not (tmp_path / "o").exists()


def test_guidance_on_a_model_without_labels_is_ignored_and_not_counted(codes_dir, tmp_path, capsys):
    codes = tmp_path / "codes"
    shutil.copytree(codes_dir, codes)
    meta = json.loads((codes / "meta.json").read_text())
    (codes / "meta.json").write_text(json.dumps(dict(meta, num_classes=0)))
    train.main(["--codes", str(codes), "--out", str(tmp_path / "run"), "--steps", "1", "--model", "DiT-T/1",
                "--batch-size", "8", "--sample-every", "0"])
    rc, _, err = run_cli("sample.py", "--ckpt", tmp_path / "run" / "checkpoints" / "last.pt", "--num-samples", "3",
                         "--steps", "5", "--cfg-scale", "2", "--out", tmp_path / "s")
    assert rc == 0 and "--cfg-scale 2.0 is ignored" in err
    assert json.loads((tmp_path / "s" / "settings.json").read_text())["nfe"] == 5
    capsys.readouterr()
    line = one_line_error(capsys, sample.main, ["--ckpt", tmp_path / "run" / "checkpoints" / "last.pt", "--classes",
                                                "1", "--out", tmp_path / "c"])
    assert "--classes 1: " in line and "was trained without labels, so it has no classes" in line


def test_a_failed_sampling_run_leaves_no_batches_behind(flow_ckpts, tmp_path, monkeypatch):
    fill_the_disk(monkeypatch, at="samples.npz")
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(flow_ckpts["purrception"]), "--num-samples", "6", "--steps", "2",
                     "--batch-size", "2", "--out", str(tmp_path)])
    assert e.value.code == 2 and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_checkpoint_samples_with_the_codebook_scale_it_was_trained_with(flow_ckpts, codes_dir, tmp_path):
    """sample.py draws what the objective at the checkpoint's own scale draws, and the same weights on the other
    scale draw other images."""
    run = tmp_path / "raw"
    train.main(["--codes", str(codes_dir), "--out", str(run), "--steps", "1", "--model", "DiT-T/1",
                "--batch-size", "8", "--sample-every", "0"])
    raw_ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert raw_ckpt["settings"]["codebook_scale"] == "raw"  # the default, the paper's
    E = raw_ckpt["codebook"]
    assert torch.equal(checkpoint.Flow(str(run / "checkpoints" / "last.pt")).objective.codebook, E)
    path = flow_ckpts["purrception"]  # trained with --codebook-scale rms, far enough to depend on the noise
    flow = checkpoint.Flow(str(path))
    assert torch.equal(flow.objective.codebook, vfm.flow_codebook(E, "rms"))

    def draw(scale):
        flow.objective = baselines.build_objective("purrception", E, 10, codebook_scale=scale)
        return sample.generate(flow, sample.sample_labels(10, 10), sample.batch_seed(0, 0), steps=3)

    sample.main(["--ckpt", str(path), "--num-samples", "10", "--steps", "3", "--out", str(tmp_path / "s")])
    got = load(tmp_path / "s")["arr_0"]
    assert np.array_equal(got, draw("rms")) and not np.array_equal(got, draw("raw"))
    assert json.loads((tmp_path / "s" / "settings.json").read_text())["codebook_scale"] == "rms"


def test_a_checkpoint_whose_weights_do_not_fit_its_model_is_one_clear_line(flow_ckpts, tmp_path):
    """Weights of another shape than the model its settings describe (here DFM tokens embedded into d = 8)."""
    ckpt = torch.load(flow_ckpts["dfm"], weights_only=False)
    for key in ("model", "ema"):
        ckpt[key]["token_embedder.weight"] = torch.zeros(257, 8)
        ckpt[key]["patch_embed.weight"] = torch.zeros(128, 8)
    torch.save(ckpt, tmp_path / "other.pt")
    rc, _, err = run_cli("sample.py", "--ckpt", tmp_path / "other.pt", "--out", tmp_path / "s")
    assert rc == 2 and "other.pt: its weights do not fit DiT-T/1 for dfm" in err
    assert len(err.strip().splitlines()) == 1


def test_cfg_interval_guides_only_inside_and_counts_the_passes(flow_ckpts, tmp_path):
    # a strong scale: the session's 40-step model barely tells classes apart, and guidance must move its codes
    base = ["--ckpt", str(flow_ckpts["purrception"]), "--num-samples", "20", "--steps", "4", "--cfg-scale", "50"]
    runs = {"plain": [], "everywhere": ["--cfg-interval", "0:1"], "window": ["--cfg-interval", "0.25:0.5"],
            "unguided": ["--cfg-scale", "1"]}
    out = {}
    for name, extra in runs.items():
        sample.main(base + extra + ["--out", str(tmp_path / name)])
        out[name] = load(tmp_path / name)
    settings = {name: json.loads(str(npz["settings"])) for name, npz in out.items()}
    assert np.array_equal(out["plain"]["arr_0"], out["everywhere"]["arr_0"])
    assert not np.array_equal(out["window"]["arr_0"], out["plain"]["arr_0"])
    assert not np.array_equal(out["window"]["arr_0"], out["unguided"]["arr_0"])
    # Euler at t = 0, 0.25, 0.5, 0.75: two passes at 0.25 and 0.5, one at the others
    assert (settings["plain"]["nfe"], settings["window"]["nfe"], settings["unguided"]["nfe"]) == (8, 6, 4)
    assert settings["window"]["cfg_interval"] == [0.25, 0.5] and settings["plain"]["cfg_interval"] == [0.0, 1.0]
    rc, _, err = run_cli("sample.py", "--ckpt", flow_ckpts["purrception"], "--cfg-interval", "0.6:0.2", "--out",
                         tmp_path / "bad")
    assert rc == 2 and "bad guidance interval '0.6:0.2'" in err and len(err.strip().splitlines()) == 1


def test_couplings_are_the_noise_each_sample_started_from_and_the_codes_it_reached(flow_ckpts, couplings_dir):
    pairs = CodeSet(str(couplings_dir / "couplings"))
    flow = checkpoint.Flow(str(flow_ckpts["purrception"]))
    npz = load(couplings_dir)
    assert pairs.has_noise and len(pairs) == 40 and pairs.meta["teacher"]["cfg_scale"] == 2.0
    assert pairs.meta["teacher"]["codebook_scale"] == "rms" and pairs.meta["tokenizer"] == flow.meta["tokenizer"]
    codes, labels = pairs.get(np.arange(40))
    noise = pairs.get_noise(np.arange(40))
    assert np.array_equal(labels, npz["labels"])
    assert np.array_equal(npz["arr_0"], images.to_uint8(flow.tokenizer.decode(torch.from_numpy(codes))))
    for b, (lo, hi) in enumerate([(0, 16), (16, 32), (32, 40)]):  # each batch's noise, drawn as sample.py draws it
        g = torch.Generator().manual_seed(sample.batch_seed(4, b))
        z0 = flow.objective.noise((hi - lo, *flow.grid), g)
        assert np.array_equal(noise[lo:hi], z0.numpy())
        reached = flow.objective.sample(flow.model, (hi - lo, *flow.grid), y=torch.from_numpy(labels[lo:hi]), steps=3,
                                        cfg_scale=2.0, z0=z0)
        assert np.array_equal(codes[lo:hi], reached.numpy())
    assert len(np.unique(noise.reshape(40, -1), axis=0)) == 40


def test_couplings_of_dfm_and_over_earlier_ones_are_one_line(flow_ckpts, couplings_dir, tmp_path):
    rc, _, err = run_cli("sample.py", "--ckpt", flow_ckpts["dfm"], "--couplings", "--num-samples", 2, "--steps", 1,
                         "--out", tmp_path / "d")
    assert rc == 2 and "has no couplings to write" in err and len(err.strip().splitlines()) == 1
    shutil.copytree(couplings_dir / "couplings", tmp_path / "c" / "couplings")
    rc, _, err = run_cli("sample.py", "--ckpt", flow_ckpts["purrception"], "--couplings", "--num-samples", 2,
                         "--steps", 1, "--out", tmp_path / "c")
    assert rc == 2 and "couplings exists: pass --force" in err and len(err.strip().splitlines()) == 1
    sample.main(["--ckpt", str(flow_ckpts["purrception"]), "--couplings", "--num-samples", "2", "--steps", "1",
                 "--out", str(tmp_path / "c"), "--force"])
    assert len(CodeSet(str(tmp_path / "c" / "couplings"))) == 2 and not (tmp_path / "c" / ".couplings.tmp").exists()
