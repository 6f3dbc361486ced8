"""support/datasets.py and support/codesets.py: IDX files (real Fashion-MNIST and broken copies) and the code-set format."""

import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import tokenizer
from conftest import FASHION_MNIST, ROOT, contents, fake_mnist, one_line_error
from support import codesets, datasets


def test_real_fashion_mnist_loads():
    images, labels = datasets.load_mnist("fashion-mnist", FASHION_MNIST, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and np.array_equal(np.bincount(labels), [1000] * 10)


def _copy_split(tmp_path, transform_images=lambda raw: raw):
    for stem in datasets.MNIST_FILES["test"]:
        raw = gzip.decompress(open(os.path.join(FASHION_MNIST, stem + ".gz"), "rb").read())
        if "images" in stem:
            raw = transform_images(raw)
        (tmp_path / stem).write_bytes(raw)
    return str(tmp_path)


def test_uncompressed_copy_reads_the_same(tmp_path):
    a = datasets.load_mnist("fashion-mnist", _copy_split(tmp_path), "test")
    b = datasets.load_mnist("fashion-mnist", FASHION_MNIST, "test")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.parametrize("damage,message", [
    (lambda raw: raw[:-100], "IDX header says shape (10000, 28, 28)"),
    (lambda raw: b"PK\x03\x04" + raw[4:], "not an IDX file"),
    (lambda raw: raw[:10], "truncated IDX header"),
])
def test_broken_files_name_the_file(tmp_path, damage, message):
    d = _copy_split(tmp_path, damage)
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte") as e:
        datasets.load_mnist("fashion-mnist", d, "test")
    assert message in str(e.value)


def test_corrupt_gzip_and_missing_files(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 50)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: corrupt gzip"):
        datasets.load_mnist("fashion-mnist", str(tmp_path), "test")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*missing fashion-mnist train file"):
        datasets.load_mnist("fashion-mnist", str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="nope: no such directory"):
        datasets.load_mnist("mnist", str(tmp_path / "nope"), "train")
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        datasets.load_mnist("cifar", str(tmp_path), "train")
    with pytest.raises(OSError, match="inside-a-file: cannot read"):
        datasets.read_idx(str(tmp_path / "t10k-labels-idx1-ubyte" / "inside-a-file"))


def test_a_damaged_deflate_stream_names_the_file(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\x07" + b"\x00" * 20)  # a reserved block type
    with pytest.raises(ValueError, match=f"{path}: corrupt gzip stream .*invalid block type"):
        datasets.read_idx(str(path))


def test_labels_out_of_range_and_a_file_for_a_directory(tmp_path):
    def bad_label(raw):
        raw = bytearray(raw)
        raw[8 + 17] = 200  # the 18th label
        return bytes(raw)
    for stem in datasets.MNIST_FILES["test"]:
        raw = gzip.decompress(open(os.path.join(FASHION_MNIST, stem + ".gz"), "rb").read())
        (tmp_path / stem).write_bytes(bad_label(raw) if "labels" in stem else raw)
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte: labels from 0 to 200; expected classes 0 to 9"):
        datasets.load_mnist("fashion-mnist", str(tmp_path), "test")
    with pytest.raises(NotADirectoryError, match="t10k-labels-idx1-ubyte: a file, not a directory"):
        datasets.load_mnist("fashion-mnist", str(tmp_path / "t10k-labels-idx1-ubyte"), "test")
    with pytest.raises(NotADirectoryError, match="t10k-labels-idx1-ubyte: a file, not a directory .*ImageFolder"):
        datasets.list_imagefolder(str(tmp_path / "t10k-labels-idx1-ubyte"))


def test_an_oversized_image_is_one_problem(tmp_path, monkeypatch):
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1,600 pixels is then a decompression bomb
    _, _, problem = datasets.ImageFolderImages([str(tmp_path / "big.png")], [0], 32)[0]
    assert problem.startswith(f"{tmp_path / 'big.png'}: not a readable image (Image size (1600 pixels) exceeds")


def test_code_set_round_trip_across_shards(tmp_path):
    rng = np.random.default_rng(0)
    codes = [rng.integers(0, 1000, (n, 2, 4, 4)) for n in (5, 3)]
    labels = [rng.integers(0, 10, n) for n in (5, 3)]
    for i in range(2):
        codesets.write_shard(str(tmp_path), i, codes[i], labels[i])
    codesets.write_meta(str(tmp_path), rng.normal(size=(1000, 8)), 2, grid=[4, 4], num_classes=10, views=2)
    cs = codesets.CodeSet(str(tmp_path))
    assert len(cs) == 8 and cs.grid == (4, 4) and cs.num_codes == 1000 and cs.views == 2
    all_codes, all_labels = np.concatenate(codes), np.concatenate(labels)
    idx, views = np.array([7, 0, 5, 2, 6]), np.array([1, 0, 1, 1, 0])
    got_codes, got_labels = cs.get(idx, views)
    assert np.array_equal(got_codes, all_codes[idx, views]) and np.array_equal(got_labels, all_labels[idx])
    assert not list(tmp_path.glob("*.tmp*"))


def test_coupling_set_noise_follows_its_codes_across_shards(tmp_path):
    """Unsorted and repeated indices over three shards: each grid comes back with its own noise and label."""
    rng = np.random.default_rng(1)
    sizes = (4, 1, 3)
    codes = [rng.integers(0, 50, (n, 1, 2, 3)) for n in sizes]
    labels = [rng.integers(0, 10, n) for n in sizes]
    noise = [rng.normal(size=(n, 2, 3, 5)).astype(np.float32) for n in sizes]
    for i in range(3):
        codesets.write_shard(str(tmp_path), i, codes[i], labels[i], noise=noise[i])
    codesets.write_meta(str(tmp_path), rng.normal(size=(50, 5)), 3, grid=[2, 3], num_classes=10, views=1, noise=True)
    cs = codesets.CodeSet(str(tmp_path))
    idx = np.array([6, 0, 4, 7, 3, 0, 5, 1])
    got_codes, got_labels = cs.get(idx)
    all_codes, all_labels, all_noise = (np.concatenate(x) for x in (codes, labels, noise))
    assert np.array_equal(got_codes, all_codes[idx, 0]) and np.array_equal(got_labels, all_labels[idx])
    assert np.array_equal(cs.get_noise(idx), all_noise[idx])


def test_code_set_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json: missing; expected a code set"):
        codesets.CodeSet(str(tmp_path))
    codesets.write_shard(str(tmp_path), 0, np.zeros((2, 1, 3, 3)), np.zeros(2))
    codesets.write_meta(str(tmp_path), np.zeros((10, 4)), 1, grid=[3, 3], num_classes=0, views=1)
    assert (tmp_path / "meta.json").read_text().endswith("}\n")
    np.save(tmp_path / "labels-00000.npy", np.zeros(3))
    with pytest.raises(ValueError, match="labels-00000.npy: expected 2 integer labels"):
        codesets.CodeSet(str(tmp_path))
    (tmp_path / "codes-00000.npy").write_bytes(b"\x93NUMPY but cut short")
    with pytest.raises(ValueError, match="codes-00000.npy: not a readable .npy file"):
        codesets.CodeSet(str(tmp_path))
    os.remove(tmp_path / "codes-00000.npy")
    with pytest.raises(FileNotFoundError, match="codes-00000.npy: missing"):
        codesets.CodeSet(str(tmp_path))
    np.save(tmp_path / "labels-00000.npy", np.zeros(2))
    np.save(tmp_path / "codes-00000.npy", np.zeros((2, 2, 3, 3), np.uint16))  # 2 views, meta.json says 1
    with pytest.raises(ValueError, match=r"codes-00000.npy: expected 2 uint16 code grids \(2, 1, 3, 3\)"):
        codesets.CodeSet(str(tmp_path))
    meta = json.loads((tmp_path / "meta.json").read_text())
    for key, value in (("grid", "3x3"), ("shard_sizes", [2.5]), ("views", 0), ("num_codes", True)):
        (tmp_path / "meta.json").write_text(json.dumps(dict(meta, **{key: value})))
        with pytest.raises(ValueError, match=f"meta.json: {key} .* is not what `tokenizer.py encode` writes"):
            codesets.CodeSet(str(tmp_path))
    (tmp_path / "meta.json").write_text('{"format": "purrception-codes/1"}')
    with pytest.raises(ValueError, match="meta.json: no num_codes, code_dim"):
        codesets.CodeSet(str(tmp_path))
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json: not readable JSON"):
        codesets.CodeSet(str(tmp_path))
    with pytest.raises(ValueError, match="uint16"):
        codesets.write_shard(str(tmp_path), 1, np.full((1, 1, 2, 2), 70000), np.zeros(1))


def test_download_fetches_the_four_files(tmp_path, monkeypatch):
    """--download through the real code path, from a file:// mirror of the Debian copy (no network here)."""
    monkeypatch.setitem(datasets.DOWNLOAD_URLS, "fashion-mnist", f"file://{FASHION_MNIST}/")
    target = tmp_path / "fmnist"
    tokenizer.main(["train", "--dataset", "fashion-mnist", "--data-dir", str(target), "--download", "--out",
             str(tmp_path / "run"), "--limit", "64", "--steps", "2", "--batch-size", "32"])
    assert sorted(os.listdir(target)) == sorted(s + ".gz" for pair in datasets.MNIST_FILES.values() for s in pair)
    assert (tmp_path / "run" / "tokenizer.pt").exists()
    monkeypatch.setitem(datasets.DOWNLOAD_URLS, "fashion-mnist", f"file://{tmp_path}/nowhere/")
    with pytest.raises(OSError, match="cannot download"):
        datasets.load_mnist("fashion-mnist", str(tmp_path / "other"), "train", download=True)


# ---- Data are what their name says: MNIST and Fashion-MNIST share file names, their contents tell them apart ----

def _gz(stem):  # the Debian files are gzipped; a PURRCEPTION_FASHION_MNIST copy may not be
    return re.escape(stem) + r"(\.gz)?"


def test_the_known_checksums_are_those_of_the_decompressed_fashion_mnist_files():
    for stems in datasets.MNIST_FILES.values():
        for stem in stems:
            path = datasets._find(FASHION_MNIST, stem)
            assert datasets.known_file(datasets.md5(datasets._read_bytes(path))) == ("fashion-mnist", stem)


def test_fashion_mnist_files_under_mnist_are_one_line_and_nothing_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    line = one_line_error(capsys, tokenizer.main, ["train", "--dataset", "mnist", "--data-dir", FASHION_MNIST,
                                                   "--out", run, "--steps", "2"])
    assert re.search(f"{_gz('train-images-idx3-ubyte')},{_gz('train-labels-idx1-ubyte')}}}: these are "
                     f"Fashion-MNIST's files, not MNIST's; point --data-dir at MNIST's IDX files$", line), line
    assert contents(run) == {}
    # --download finds them in place of the files it would fetch, and says so rather than skipping them
    line = one_line_error(capsys, tokenizer.main, ["train", "--dataset", "mnist", "--data-dir", FASHION_MNIST,
                                                   "--out", run, "--steps", "2", "--download"])
    assert re.search(f"{_gz('t10k-labels-idx1-ubyte')}}}: these are Fashion-MNIST's files, not MNIST's; .*"
                     r"\(--download fetches only missing files, so it would not replace them\)$", line), line
    assert contents(run) == {}


def test_encode_refuses_another_datasets_files_and_keeps_the_old_code_set(tmp_path, tokenizer_run, codes_dir,
                                                                           capsys):
    out = tmp_path / "codes"
    shutil.copytree(codes_dir, out)
    before = contents(out)
    line = one_line_error(capsys, tokenizer.main, ["encode", "--tokenizer", tokenizer_run / "tokenizer.pt",
                                                   "--dataset", "mnist", "--data-dir", FASHION_MNIST, "--split", "test",
                                                   "--out", out, "--force"])
    assert re.search(f"{_gz('t10k-images-idx3-ubyte')},{_gz('t10k-labels-idx1-ubyte')}}}: these are "
                     f"Fashion-MNIST's files, not MNIST's", line), line
    assert contents(out) == before


def test_a_code_set_and_a_tokenizer_record_the_data_they_came_from(tokenizer_run, codes_dir):
    known = datasets.KNOWN_MD5["fashion-mnist"]
    meta = codesets.CodeSet(str(codes_dir)).meta
    assert meta["data"] == {"dataset": "fashion-mnist", "split": "train",
                            "images_md5": known["train-images-idx3-ubyte"]}
    metrics = json.loads((tokenizer_run / "metrics.json").read_text())
    assert metrics["data"] == {"dataset": "fashion-mnist", "train_images_md5": known["train-images-idx3-ubyte"],
                               "test_images_md5": known["t10k-images-idx3-ubyte"]}


def test_mnist_files_read_as_mnist_and_are_refused_as_fashion_mnist(tmp_path, monkeypatch, capsys):
    d = fake_mnist(tmp_path / "mnist", monkeypatch)
    images, labels, identity = datasets.read_mnist("mnist", d, "test")
    assert images.shape == (100, 28, 28) and identity == {
        "dataset": "mnist", "split": "test", "images_md5": datasets.KNOWN_MD5["mnist"]["t10k-images-idx3-ubyte"]}
    assert capsys.readouterr().err == ""  # known files: no warning
    with pytest.raises(ValueError) as e:
        datasets.load_mnist("fashion-mnist", d, "test")
    assert str(e.value) == (f"{d}/{{t10k-images-idx3-ubyte,t10k-labels-idx1-ubyte}}: these are MNIST's files, not "
                            f"Fashion-MNIST's; point --data-dir at Fashion-MNIST's IDX files")
    before = contents(tmp_path / "mnist")
    monkeypatch.setitem(datasets.DOWNLOAD_URLS, "fashion-mnist", f"file://{tmp_path}/nowhere/")
    os.remove(tmp_path / "mnist" / "train-labels-idx1-ubyte")  # one file to fetch, the others in the way
    with pytest.raises(ValueError, match=r"mnist/\{train-images-idx3-ubyte,t10k-images-idx3-ubyte,"
                                         r"t10k-labels-idx1-ubyte\}: these are MNIST's files, not Fashion-MNIST's; "
                                         r".*--download fetches only missing files"):
        datasets.load_mnist("fashion-mnist", d, "train", download=True)
    del before["train-labels-idx1-ubyte"]
    assert contents(tmp_path / "mnist") == before  # nothing fetched


def test_a_test_file_under_a_training_name_is_refused(tmp_path, monkeypatch):
    d = fake_mnist(tmp_path / "mnist", monkeypatch)
    shutil.copy(tmp_path / "mnist" / "t10k-images-idx3-ubyte", tmp_path / "mnist" / "train-images-idx3-ubyte")
    with pytest.raises(ValueError, match=f"^{d}/train-images-idx3-ubyte: this is MNIST's t10k-images-idx3-ubyte, "
                                         f"not its train-images-idx3-ubyte$"):
        datasets.load_mnist("mnist", d, "train")


def test_files_of_no_known_dataset_are_read_with_one_warning(tmp_path, capsys):
    d = fake_mnist(tmp_path / "own")  # a subset, a relabelled copy, one's own 28x28 images: not refused
    first = datasets.load_mnist("mnist", d, "test")
    again = datasets.load_mnist("mnist", d, "test")
    assert np.array_equal(first[0], again[0]) and first[0].shape == (100, 28, 28)
    assert capsys.readouterr().err.splitlines() == [  # said once per process
        f"warning: {d}/{{t10k-images-idx3-ubyte,t10k-labels-idx1-ubyte}}: not MNIST's test files as published "
        f"(unknown MD5 of the contents); read as mnist all the same"]


def test_tests_that_need_fashion_mnist_are_skipped_without_it_or_fail_where_it_is_required(tmp_path):
    """tests/conftest.py: where PURRCEPTION_FASHION_MNIST holds no files, a test that reads them is skipped with the
    way to get them, the others run; with PURRCEPTION_REQUIRE_DATA=1 (CI) the run stops with that reason instead."""
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", "tests/test_data.py", "-k",
            "test_real_fashion_mnist_loads or test_code_set_round_trip_across_shards"]
    for require, code in (("0", 0), ("1", 4)):
        env = dict(os.environ, PURRCEPTION_FASHION_MNIST=str(tmp_path), PURRCEPTION_REQUIRE_DATA=require,
                   OMP_NUM_THREADS="1")
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode == code, out
        assert f"Fashion-MNIST's IDX files in {tmp_path}" in out and "apt-get install dataset-fashion-mnist" in out
        assert "PURRCEPTION_FASHION_MNIST" in out
        assert ("1 passed, 1 skipped" in out) == (require == "0")
