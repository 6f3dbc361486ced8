"""data.py: IDX files (real Fashion-MNIST and broken copies) and the code-set format."""

import gzip
import json
import os

import numpy as np
import pytest
from PIL import Image

import data
import vq
from conftest import FASHION_MNIST


def test_real_fashion_mnist_loads():
    images, labels = data.load_mnist("fashion-mnist", FASHION_MNIST, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and np.array_equal(np.bincount(labels), [1000] * 10)


def _copy_split(tmp_path, transform_images=lambda raw: raw):
    for stem in data.MNIST_FILES["test"]:
        raw = gzip.decompress(open(os.path.join(FASHION_MNIST, stem + ".gz"), "rb").read())
        if "images" in stem:
            raw = transform_images(raw)
        (tmp_path / stem).write_bytes(raw)
    return str(tmp_path)


def test_uncompressed_copy_reads_the_same(tmp_path):
    a = data.load_mnist("fashion-mnist", _copy_split(tmp_path), "test")
    b = data.load_mnist("fashion-mnist", FASHION_MNIST, "test")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.parametrize("damage,message", [
    (lambda raw: raw[:-100], "IDX header says shape (10000, 28, 28)"),
    (lambda raw: b"PK\x03\x04" + raw[4:], "not an IDX file"),
    (lambda raw: raw[:10], "truncated IDX header"),
])
def test_broken_files_name_the_file(tmp_path, damage, message):
    d = _copy_split(tmp_path, damage)
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte") as e:
        data.load_mnist("fashion-mnist", d, "test")
    assert message in str(e.value)


def test_corrupt_gzip_and_missing_files(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 50)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: corrupt gzip"):
        data.load_mnist("fashion-mnist", str(tmp_path), "test")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*missing fashion-mnist train file"):
        data.load_mnist("fashion-mnist", str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="nope: no such directory"):
        data.load_mnist("mnist", str(tmp_path / "nope"), "train")
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        data.load_mnist("cifar", str(tmp_path), "train")
    with pytest.raises(OSError, match="inside-a-file: cannot read"):
        data.read_idx(str(tmp_path / "t10k-labels-idx1-ubyte" / "inside-a-file"))


def test_a_damaged_deflate_stream_names_the_file(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\x07" + b"\x00" * 20)  # a reserved block type
    with pytest.raises(ValueError, match=f"{path}: corrupt gzip stream .*invalid block type"):
        data.read_idx(str(path))


def test_labels_out_of_range_and_a_file_for_a_directory(tmp_path):
    def bad_label(raw):
        raw = bytearray(raw)
        raw[8 + 17] = 200  # the 18th label
        return bytes(raw)
    for stem in data.MNIST_FILES["test"]:
        raw = gzip.decompress(open(os.path.join(FASHION_MNIST, stem + ".gz"), "rb").read())
        (tmp_path / stem).write_bytes(bad_label(raw) if "labels" in stem else raw)
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte: labels from 0 to 200; expected classes 0 to 9"):
        data.load_mnist("fashion-mnist", str(tmp_path), "test")
    with pytest.raises(NotADirectoryError, match="t10k-labels-idx1-ubyte: a file, not a directory"):
        data.load_mnist("fashion-mnist", str(tmp_path / "t10k-labels-idx1-ubyte"), "test")
    with pytest.raises(NotADirectoryError, match="t10k-labels-idx1-ubyte: a file, not a directory .*ImageFolder"):
        data.list_imagefolder(str(tmp_path / "t10k-labels-idx1-ubyte"))


def test_an_oversized_image_is_one_problem(tmp_path, monkeypatch):
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1,600 pixels is then a decompression bomb
    _, _, problem = data.ImageFolderImages([str(tmp_path / "big.png")], [0], 32)[0]
    assert problem.startswith(f"{tmp_path / 'big.png'}: not a readable image (Image size (1600 pixels) exceeds")


def test_code_set_round_trip_across_shards(tmp_path):
    rng = np.random.default_rng(0)
    codes = [rng.integers(0, 1000, (n, 2, 4, 4)) for n in (5, 3)]
    labels = [rng.integers(0, 10, n) for n in (5, 3)]
    for i in range(2):
        data.write_shard(str(tmp_path), i, codes[i], labels[i])
    data.write_meta(str(tmp_path), rng.normal(size=(1000, 8)), 2, grid=[4, 4], num_classes=10, views=2)
    cs = data.CodeSet(str(tmp_path))
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
        data.write_shard(str(tmp_path), i, codes[i], labels[i], noise=noise[i])
    data.write_meta(str(tmp_path), rng.normal(size=(50, 5)), 3, grid=[2, 3], num_classes=10, views=1, noise=True)
    cs = data.CodeSet(str(tmp_path))
    idx = np.array([6, 0, 4, 7, 3, 0, 5, 1])
    got_codes, got_labels = cs.get(idx)
    all_codes, all_labels, all_noise = (np.concatenate(x) for x in (codes, labels, noise))
    assert np.array_equal(got_codes, all_codes[idx, 0]) and np.array_equal(got_labels, all_labels[idx])
    assert np.array_equal(cs.get_noise(idx), all_noise[idx])


def test_code_set_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json: missing; expected a code set"):
        data.CodeSet(str(tmp_path))
    data.write_shard(str(tmp_path), 0, np.zeros((2, 1, 3, 3)), np.zeros(2))
    data.write_meta(str(tmp_path), np.zeros((10, 4)), 1, grid=[3, 3], num_classes=0, views=1)
    assert (tmp_path / "meta.json").read_text().endswith("}\n")
    np.save(tmp_path / "labels-00000.npy", np.zeros(3))
    with pytest.raises(ValueError, match="labels-00000.npy: expected 2 integer labels"):
        data.CodeSet(str(tmp_path))
    (tmp_path / "codes-00000.npy").write_bytes(b"\x93NUMPY but cut short")
    with pytest.raises(ValueError, match="codes-00000.npy: not a readable .npy file"):
        data.CodeSet(str(tmp_path))
    os.remove(tmp_path / "codes-00000.npy")
    with pytest.raises(FileNotFoundError, match="codes-00000.npy: missing"):
        data.CodeSet(str(tmp_path))
    np.save(tmp_path / "labels-00000.npy", np.zeros(2))
    np.save(tmp_path / "codes-00000.npy", np.zeros((2, 2, 3, 3), np.uint16))  # 2 views, meta.json says 1
    with pytest.raises(ValueError, match=r"codes-00000.npy: expected 2 uint16 code grids \(2, 1, 3, 3\)"):
        data.CodeSet(str(tmp_path))
    meta = json.loads((tmp_path / "meta.json").read_text())
    for key, value in (("grid", "3x3"), ("shard_sizes", [2.5]), ("views", 0), ("num_codes", True)):
        (tmp_path / "meta.json").write_text(json.dumps(dict(meta, **{key: value})))
        with pytest.raises(ValueError, match=f"meta.json: {key} .* is not what `vq.py encode` writes"):
            data.CodeSet(str(tmp_path))
    (tmp_path / "meta.json").write_text('{"format": "purrception-codes/1"}')
    with pytest.raises(ValueError, match="meta.json: no num_codes, code_dim"):
        data.CodeSet(str(tmp_path))
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json: not readable JSON"):
        data.CodeSet(str(tmp_path))
    with pytest.raises(ValueError, match="uint16"):
        data.write_shard(str(tmp_path), 1, np.full((1, 1, 2, 2), 70000), np.zeros(1))


def test_download_fetches_the_four_files(tmp_path, monkeypatch):
    """--download through the real code path, from a file:// mirror of the Debian copy (no network here)."""
    monkeypatch.setitem(data.DOWNLOAD_URLS, "fashion-mnist", f"file://{FASHION_MNIST}/")
    target = tmp_path / "fmnist"
    vq.main(["train", "--dataset", "fashion-mnist", "--data-dir", str(target), "--download", "--out",
             str(tmp_path / "run"), "--limit", "64", "--steps", "2", "--batch-size", "32"])
    assert sorted(os.listdir(target)) == sorted(s + ".gz" for pair in data.MNIST_FILES.values() for s in pair)
    assert (tmp_path / "run" / "tokenizer.pt").exists()
    monkeypatch.setitem(data.DOWNLOAD_URLS, "fashion-mnist", f"file://{tmp_path}/nowhere/")
    with pytest.raises(OSError, match="cannot download"):
        data.load_mnist("fashion-mnist", str(tmp_path / "other"), "train", download=True)
