"""sample.py: the .npz for the FID evaluators, the grid, every sampling flag, torchrun, a stopped run resumed, bad
input."""

import json
import os
import re
import shutil
import signal
import textwrap

import numpy as np
import pytest
import torch

import baselines
import sample
import train
import vfm
from PIL import Image

from conftest import FASHION_MNIST, contents, fill_the_disk, one_line_error, run_cli, workers_said
from support import checkpoint, files, images
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


def test_large_images_are_decoded_a_few_at_a_time_into_the_same_pictures(flow_ckpts, monkeypatch):
    """The tokenizer decodes at most DECODE_PIXELS pixels at once (its activations at a batch of 250 images of 256 x
    256 would need tens of GB); the pictures are those of one decode of the whole batch."""
    flow = checkpoint.Flow(str(flow_ckpts["purrception"]))
    labels = np.arange(7) % 10
    whole = sample.generate(flow, labels, seed=3, steps=2)
    decode, sizes = flow.tokenizer.decode, []
    monkeypatch.setattr(flow.tokenizer, "decode", lambda codes: sizes.append(len(codes)) or decode(codes))
    monkeypatch.setattr(sample, "DECODE_PIXELS", 3 * 28 * 28)  # three 28 x 28 images a decode
    assert np.array_equal(sample.generate(flow, labels, seed=3, steps=2), whole)
    assert sizes == [3, 3, 1]


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


def drawn_batches(monkeypatch):
    """From now on, the batches sample.py draws, by index, in the order drawn."""
    generate_batch, drawn = sample.generate_batch, []
    monkeypatch.setattr(sample, "generate_batch", lambda flow, labels, seed, b, *a, **k:
                        drawn.append(b) or generate_batch(flow, labels, seed, b, *a, **k))
    return drawn


def assert_same_samples(a, b):
    """Two runs' samples.npz hold the same arrays and settings, but for how long they took and what was kept."""
    a, b = load(a), load(b)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a if k != "settings")
    timed = ("seconds", "seconds_per_sample", "batches_kept")
    a, b = ({k: v for k, v in json.loads(str(npz["settings"])).items() if k not in timed} for npz in (a, b))
    assert a == b


def test_a_run_stopped_by_sigterm_resumes_to_the_samples_of_an_uninterrupted_one(flow_ckpts, tmp_path, monkeypatch,
                                                                                  capsys):
    """SIGTERM once batch 0 is written whole and batch 1 only in part (its images, not yet its codes and noise): the
    run keeps batch 0, says so in its one line, and --resume draws batches 1-3 into the samples and couplings of a
    run never stopped; OUT/.parts goes then."""
    args = ["--ckpt", str(flow_ckpts["purrception"]), "--num-samples", "13", "--batch-size", "4", "--steps", "3",
            "--cfg-scale", "2", "--seed", "4", "--couplings"]
    sample.main(args + ["--out", str(tmp_path / "whole")])
    out, save, saved = tmp_path / "stopped", files.save_npy, []

    def save_then_stop(path, array):  # images, codes and noise of batch 0, then the images of batch 1
        save(path, array)
        saved.append(os.path.basename(path))
        if len(saved) == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(files, "save_npy", save_then_stop)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample.main(args + ["--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 143 and "Traceback" not in err
    assert err.rstrip().splitlines()[-1] == (f"interrupted: 1 of 4 batches kept in {out / '.parts'}; rerun with "
                                             f"--resume to continue")
    assert saved[3] == "images-000001.npy" and sorted(os.listdir(out / ".parts")) == \
        ["codes-000000.npy", "drawn-with.json", "images-000000.npy", "images-000001.npy", "noise-000000.npy"]
    assert not (out / "samples.npz").exists() and not (out / "couplings").exists()
    monkeypatch.undo()
    drawn = drawn_batches(monkeypatch)
    sample.main(args + ["--out", str(out), "--resume"])
    assert drawn == [1, 2, 3]
    assert f"resuming: 1 of 4 batches drawn earlier, in {out / '.parts'}" in capsys.readouterr().out
    assert_same_samples(tmp_path / "whole", out)
    assert not (out / ".parts").exists()
    assert json.loads((out / "settings.json").read_text())["batches_kept"] == 1
    whole, stopped = (CodeSet(str(tmp_path / n / "couplings")) for n in ("whole", "stopped"))
    assert all(np.array_equal(a, b) for a, b in zip(whole.get(np.arange(13)), stopped.get(np.arange(13))))
    assert np.array_equal(whole.get_noise(np.arange(13)), stopped.get_noise(np.arange(13)))


# Under torchrun: once rank 0 has written its first batch, it stops torchrun as a cluster stops a job (SIGTERM),
# and torchrun passes the signal on to every worker.
STOP_TORCHRUN = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, os.getcwd())
    import sample
    from support import files

    save = files.save_npy

    def save_then_stop(path, array):
        save(path, array)
        if os.environ["RANK"] == "0":
            os.kill(os.getppid(), signal.SIGTERM)
            time.sleep(120)  # until torchrun's SIGTERM reaches this worker

    files.save_npy = save_then_stop
    sample.main()
""")


def test_torchrun_resumes_a_run_torchrun_stopped_to_the_samples_of_one_process(flow_ckpts, tmp_path):
    """A two-process run stopped by SIGTERM keeps the batches its ranks drew (rank 0: batch 0, rank 1: those it
    finished) and says so; `torchrun ... --resume` shares out the others as rank 0 counts them and writes the
    samples of one uninterrupted process."""
    args = ["--ckpt", flow_ckpts["purrception"], "--num-samples", "13", "--steps", "3", "--batch-size", "2",
            "--cfg-scale", "2"]
    (tmp_path / "stop.py").write_text(STOP_TORCHRUN)
    out = tmp_path / "two"
    rc, _, err = run_cli(f"torchrun --standalone --nproc_per_node=2 {tmp_path / 'stop.py'}", *args, "--out", out)
    kept = sorted(int(p.stem[7:]) for p in (out / ".parts").glob("images-*.npy"))
    said = re.search(r"stopped by SIGTERM: a preemption, or another process of this run stopped \(its error is "
                     r"above\); (\d) of 7 batches kept in (\S+); rerun with --resume to continue", err)  # rank 0's
    assert rc != 0 and said and said[2] == str(out / ".parts"), err[-3000:]
    assert kept[0] == 0 and 2 not in kept and 1 <= int(said[1]) <= len(kept) < 7  # rank 1 may finish one more
    for b in kept[1:]:  # batch 0 alone, as a stop right after it leaves them: the ranks' shares of the rest are
        (out / ".parts" / f"images-{b:06d}.npy").unlink()  # then 1, 3, 5 and 2, 4, 6, not those of a fresh run
    rc, stdout, err = run_cli("torchrun --standalone --nproc_per_node=2 sample.py", *args, "--out", out, "--resume")
    assert rc == 0, workers_said(err)
    assert f"resuming: 1 of 7 batches drawn earlier, in {out / '.parts'}" in stdout
    sample.main([str(a) for a in args] + ["--out", str(tmp_path / "one")])
    assert_same_samples(tmp_path / "one", out)
    assert not (out / ".parts").exists()


def test_a_failed_run_keeps_its_batches_and_num_samples_changes_only_the_last(flow_ckpts, tmp_path, monkeypatch,
                                                                              capsys):
    """A full disk at samples.npz: every batch stays in OUT/.parts, a rerun without --resume is refused, and one
    with --resume and more samples keeps the full batches, draws the last one again at its new size and writes the
    samples of a run never stopped."""
    args = ["--ckpt", flow_ckpts["purrception"], "--batch-size", "4", "--steps", "2", "--cfg-scale", "2"]
    out = tmp_path / "s"
    fill_the_disk(monkeypatch, at="samples.npz")
    with pytest.raises(SystemExit) as e:
        sample.main([str(a) for a in args] + ["--num-samples", "13", "--out", str(out)])
    assert e.value.code == 2 and sorted(os.listdir(out)) == [".parts"]
    assert sorted(os.listdir(out / ".parts")) == ["drawn-with.json"] + [f"images-00000{b}.npy" for b in range(4)]
    before = contents(out / ".parts")
    line = one_line_error(capsys, sample.main, args + ["--num-samples", 13, "--out", out])
    assert line == (f"error: {out / '.parts'} holds the batches of a run that stopped: pass --resume to finish it, "
                    f"or --force to draw afresh, or choose another --out")
    assert contents(out / ".parts") == before
    monkeypatch.undo()
    drawn = drawn_batches(monkeypatch)
    sample.main([str(a) for a in args] + ["--num-samples", "14", "--out", str(out), "--resume"])
    assert drawn == [3]  # 1 sample in the last batch of 13, 2 in that of 14
    sample.main([str(a) for a in args] + ["--num-samples", "14", "--out", str(tmp_path / "whole")])
    assert_same_samples(tmp_path / "whole", out)
    assert not (out / ".parts").exists()


def test_resume_refuses_batches_drawn_with_other_settings_or_weights(flow_ckpts, tmp_path, monkeypatch, capsys):
    """--resume checks how the batches in OUT/.parts were drawn against each setting that changes the samples, the
    weights sampled and the tokenizer's, and refuses a difference in one line, leaving them as they were; the same
    weights copied elsewhere, and the same settings written otherwise, are no difference."""
    ckpt = flow_ckpts["purrception"]
    args = ["--num-samples", "6", "--batch-size", "2", "--steps", "2"]
    out = tmp_path / "s"
    with monkeypatch.context() as m:
        fill_the_disk(m, at="samples.npz")
        with pytest.raises(SystemExit):
            sample.main(["--ckpt", str(ckpt), *args, "--out", str(out)])
    before = contents(out / ".parts")
    state = torch.load(ckpt, weights_only=False)
    first = next(iter(state["ema"]))
    state["ema"][first] = state["ema"][first] + 1e-3
    torch.save(state, tmp_path / "other.pt")
    vq = torch.load(state["codes_meta"]["tokenizer"]["path"], weights_only=False)
    first = next(k for k in vq["model"] if k.startswith("decoder."))
    vq["model"][first] = vq["model"][first] + 1e-3  # the same codebook, another decoder
    torch.save(vq, tmp_path / "vq.pt")
    redo = "rerun with the settings they were drawn with, or pass --force instead of --resume to draw afresh"
    for flags, said in [(["--seed", 1], "--seed 0, not --seed 1"),
                        (["--batch-size", 3], "--batch-size 2, not --batch-size 3"),
                        (["--steps", 3], "--steps 2, not --steps 3"),
                        (["--solver", "heun"], "--solver euler, not --solver heun"),
                        (["--temperature", "linear:1:0.5"], "--temperature 1.0, not --temperature linear:1.0:0.5"),
                        (["--cfg-scale", 2], "--cfg-scale 1.0, not --cfg-scale 2.0"),
                        (["--cfg-interval", "0:0.5"], "--cfg-interval 0.0:1.0, not --cfg-interval 0.0:0.5"),
                        (["--classes", "1,2"], "no --classes, not --classes 1,2"),
                        (["--precision", "bf16"], "--precision fp32, not --precision bf16"),
                        (["--no-ema"], "no --no-ema, not --no-ema"),
                        (["--couplings"], "no --couplings, not --couplings")]:
        line = one_line_error(capsys, sample.main, ["--ckpt", ckpt, *args, *flags, "--out", out, "--resume"])
        assert line == f"error: {out / '.parts'}: batches drawn with {said}; {redo}"
    for other in (["--ckpt", tmp_path / "other.pt"], ["--ckpt", ckpt, "--tokenizer", tmp_path / "vq.pt"]):
        line = one_line_error(capsys, sample.main, [*other, *args, "--out", out, "--resume"])
        assert line == (f"error: {out / '.parts'}: batches drawn with other weights ({ckpt} at step 40, or another "
                        f"tokenizer) than {other[1]} at step 40; {redo}")
    assert contents(out / ".parts") == before
    shutil.copytree(out, tmp_path / "unknown")
    (tmp_path / "unknown" / ".parts" / "drawn-with.json").unlink()
    line = one_line_error(capsys, sample.main, ["--ckpt", ckpt, *args, "--out", tmp_path / "unknown", "--resume"])
    assert line == (f"error: {tmp_path / 'unknown' / '.parts'}: batches without a readable drawn-with.json, so how "
                    f"they were drawn is unknown; pass --force instead of --resume to draw afresh")
    shutil.copy(ckpt, tmp_path / "copy.pt")  # another file, another time: the same weights
    drawn = drawn_batches(monkeypatch)
    sample.main(["--ckpt", str(tmp_path / "copy.pt"), *args, "--temperature", "1", "--precision", "fp32", "--out",
                 str(out), "--resume"])
    assert drawn == []
    sample.main(["--ckpt", str(ckpt), *args, "--force", "--out", str(tmp_path / "unknown")])  # drawn afresh
    assert drawn == [0, 1, 2] and not (tmp_path / "unknown" / ".parts").exists()
    assert np.array_equal(load(out)["arr_0"], load(tmp_path / "unknown")["arr_0"])


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
