"""The ImageNet path on a tiny ImageFolder tree and random LlamaGen weights: encode (with flips, sharded over 2
torchrun ranks, resumable), train on the 2-view codes, sample through the pretrained tokenizer, bad input."""

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import tokenizer
import train
from conftest import run_cli, workers_said
from support import codesets, datasets, files, tokenizers
from support.cli import UserError
from support.llamagen import LLAMAGEN_CONFIGS, LlamaGenVQ


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """ImageFolder root with 2 classes of 5 random images of odd sizes, and random VQ-16 weights."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("n01440764", "n01443537")):
        (root / "train" / name).mkdir(parents=True)
        for i in range(5):
            size = (rng.integers(40, 90), rng.integers(40, 90))
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "train" / name / f"{i}.png")
    (root / "train" / "n01443537" / "notes.txt").write_text("not an image")
    torch.manual_seed(0)
    torch.save({"model": LlamaGenVQ(**LLAMAGEN_CONFIGS["llamagen-vq16"]).state_dict()}, root / "vq_ds16_c2i.pt")
    return root


def encode_args(tree, out, *extra):
    return ["encode", "--tokenizer", "llamagen-vq16", "--tokenizer-ckpt", str(tree / "vq_ds16_c2i.pt"),
            "--dataset", "imagefolder", "--data-dir", str(tree / "train"), "--image-size", "32",
            "--shard-size", "3", "--workers", "0", "--batch-size", "2", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def codes(tree):
    out = tree / "codes"
    rc, _, err = run_cli("torchrun --standalone --nproc_per_node=2 tokenizer.py", *encode_args(tree, out))
    assert rc == 0, workers_said(err)
    return out


def test_codes_hold_both_flips_of_the_center_crop(tree, codes):
    cs = codesets.CodeSet(str(codes))
    assert len(cs) == 10 and cs.views == 2 and cs.grid == (2, 2) and cs.num_classes == 2
    assert cs.meta["shard_sizes"] == [3, 3, 3, 1] and cs.meta["class_names"] == ["n01440764", "n01443537"]
    tokenizer = tokenizers.load("llamagen-vq16", str(tree / "vq_ds16_c2i.pt"))
    paths, labels, _ = datasets.list_imagefolder(str(tree / "train"))
    images = torch.stack([datasets.read_image(path, 32) for path in paths])  # (10, 3, 32, 32)
    plain, flipped = cs.get(np.arange(10), np.zeros(10, int)), cs.get(np.arange(10), np.ones(10, int))
    assert np.array_equal(plain[0], tokenizer.encode(images).numpy())
    assert np.array_equal(flipped[0], tokenizer.encode(images.flip(3)).numpy())
    assert np.array_equal(plain[1], labels)
    assert torch.allclose(torch.from_numpy(cs.codebook), tokenizer.codebook)


def test_encode_resumes_shard_by_shard(tree, codes, tmp_path):
    out = tmp_path / "codes"
    tokenizer.main(encode_args(tree, out))
    os.remove(out / "meta.json")
    os.remove(out / "codes-00002.npy")
    kept = os.stat(out / "codes-00001.npy").st_mtime_ns
    tokenizer.main(encode_args(tree, out))
    assert os.stat(out / "codes-00001.npy").st_mtime_ns == kept and (out / "codes-00002.npy").exists()
    assert np.array_equal(codesets.CodeSet(str(out)).get(np.arange(10))[0], codesets.CodeSet(str(codes)).get(np.arange(10))[0])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, _, err = run_cli("tokenizer.py", *encode_args(tree, out))
    assert rc == 2 and err.strip().splitlines() == [
        f"error: {out}: a code set already exists; pass --force to overwrite"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    tokenizer.main(encode_args(tree, out, "--force"))


def test_train_and_sample_through_the_pretrained_tokenizer(tree, codes, tmp_path):
    run = tmp_path / "run"
    train.main(["--codes", str(codes), "--model", "DiT-T/1", "--batch-size", "4", "--steps", "2",
                "--sample-every", "2", "--out", str(run)])
    assert (run / "samples" / "step-0000002.png").exists()
    sample.main(["--ckpt", str(run / "checkpoints" / "last.pt"), "--num-samples", "3", "--steps", "2",
                 "--tokenizer", "llamagen-vq16", "--tokenizer-ckpt", str(tree / "vq_ds16_c2i.pt"),
                 "--out", str(tmp_path / "s")])
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["arr_0"].shape == (3, 32, 32, 3) and f["arr_0"].dtype == np.uint8
        assert json.loads(str(f["settings"]))["num_samples"] == 3


def test_bad_input(tree, tmp_path):
    rc, _, err = run_cli("tokenizer.py", *encode_args(tree, tmp_path / "c")[:-2], "--data-dir", tmp_path, "--out",
                         tmp_path / "c")
    assert rc == 2 and "not an ImageFolder tree" in err and "Traceback" not in err
    args = encode_args(tree, tmp_path / "c")
    args[args.index("--tokenizer-ckpt") + 1] = str(tmp_path / "missing.pt")
    rc, _, err = run_cli("tokenizer.py", *args)
    assert rc == 2 and "missing.pt" in err and len(err.strip().splitlines()) == 1
    args = encode_args(tree, tmp_path / "c")
    args[args.index("--image-size") + 1] = "40"
    rc, _, err = run_cli("tokenizer.py", *args)
    assert rc == 2 and "not a multiple of the tokenizer's downsampling factor 16" in err
    assert not (tmp_path / "c" / "meta.json").exists()


def test_an_unreadable_image_is_one_line_from_a_worker(tree, tmp_path):
    root = tmp_path / "train"
    (root / "n01440764").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 40)).save(root / "n01440764" / f"{i}.png")
    (root / "n01440764" / "1.png").write_bytes(b"not a png")
    args = encode_args(tree, tmp_path / "c")
    args[args.index("--data-dir") + 1], args[args.index("--workers") + 1] = str(root), "1"
    rc, _, err = run_cli("tokenizer.py", *args)
    bad = root / "n01440764" / "1.png"
    assert rc == 2 and "Traceback" not in err  # above the error: only the progress bar
    assert err.strip().splitlines()[-1] == f"error: {bad}: not a readable image (cannot identify image file '{bad}')"
    item = datasets.ImageFolderImages([str(root / "n01440764" / "1.png")], [0], 32)[0]
    assert item[0].shape == (3, 32, 32) and item[1] == 0 and "1.png: not a readable image" in item[2]


def test_an_unreadable_image_is_named_by_the_rank_that_met_it(tree, tmp_path):
    """Rank 1 encodes shards 1 and 3 (images 3-5 and 9 of the sorted list): image 4 is the last of the first class."""
    root = tmp_path / "train"
    shutil.copytree(tree / "train", root)
    bad = root / "n01440764" / "4.png"
    bad.write_bytes(b"not a png")
    args = encode_args(tree, tmp_path / "c")
    args[args.index("--data-dir") + 1] = str(root)
    rc, _, err = run_cli("torchrun --standalone --nproc_per_node=2 tokenizer.py", *args)
    assert rc != 0
    assert f"error: rank 1: {bad}: not a readable image (cannot identify image file '{bad}')" in err.splitlines()
    # rank 0 says why in one line rather than a gloo traceback: at the barrier, or stopped by torchrun's SIGTERM
    assert ({"error: another process of this run stopped (its error is above)",
             "stopped by SIGTERM: a preemption, or another process of this run stopped (its error is above)"}
            & set(err.splitlines()))
    assert "gloo" not in err and "Connection closed" not in err
    assert not (tmp_path / "c" / "meta.json").exists()


def test_a_full_disk_writing_a_shard_is_one_line_from_its_rank(tree, tmp_path, monkeypatch, capsys):
    def full_disk(f, array, *args, **kwargs):
        f.write(b"the first bytes")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files.np, "save", full_disk)
    out = tmp_path / "c"
    with pytest.raises(UserError) as error:
        tokenizer.encode(tokenizer.parse_args(encode_args(tree, out)))
    assert error.value.rank_local and str(error.value) == f"{out}: cannot write shard 0 (No space left on device)"
    with pytest.raises(SystemExit) as exit_info:
        tokenizer.main(encode_args(tree, out))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"error: {out}: cannot write shard 0 (No space left on device)"
    assert os.listdir(out) == []  # no shard, no half of one


def test_an_output_that_is_a_file_is_one_line_before_any_work(tree, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("mine")
    monkeypatch.setattr(datasets, "list_imagefolder", lambda root: pytest.fail("listed the images before checking --out"))
    for out in (tmp_path / "file", tmp_path / "file" / "codes"):
        with pytest.raises(SystemExit) as exit_info:
            tokenizer.main(encode_args(tree, out))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and str(tmp_path / "file") in err
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("flag,value,message", [
    ("--image-size", "0", "--image-size 0: expected a positive number"),
    ("--shard-size", "-1", "--shard-size -1: expected a positive number"),
    ("--workers", "-1", "--workers -1: expected 0 (decode in this process) or more"),
    ("--batch-size", "0", "--batch-size 0: expected a positive number"),
])
def test_bad_numbers_are_one_line(tree, tmp_path, capsys, flag, value, message):
    args = encode_args(tree, tmp_path / "c")
    args[args.index(flag) + 1] = value
    with pytest.raises(SystemExit) as exit_info:
        tokenizer.main(args)
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "c").exists()
