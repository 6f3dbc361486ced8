"""
Datasets and the on-disk code format.

Two kinds of input reach this repo:
  * MNIST and Fashion-MNIST as the standard IDX files (train-images-idx3-ubyte[.gz], ...), read with numpy.
  * Code sets written by `python vq.py encode`: the code grids of a whole split, its labels and the codebook,
    in a few array files. train.py reads this one format for every dataset, MNIST and ImageNet alike.

Every problem a user can cause (a wrong path, a truncated file, a code set that does not match a checkpoint)
raises UserError with one line naming the file and what was expected; the command-line tools print that line
and exit with a non-zero status instead of a traceback.
"""

import gzip
import json
import os
import sys
import urllib.request

import numpy as np


class UserError(Exception):
    """A mistake in the user's input: the CLIs print its message as one line and exit with status 2."""


def run_command(command, *args):
    """A script's entry point: a UserError becomes one line on stderr (said once, by rank 0, under torchrun, where
    every rank finds the same mistake) and exit status 2; Ctrl-C exits with 130, after whatever the command saves
    on its way out."""
    try:
        return command(*args)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------------------------------------
# MNIST-format IDX files
# ----------------------------------------------------------------------------------------------------------

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
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """Read one IDX file (optionally gzipped) into a numpy array, checking its header against its size."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise UserError(f"{path}: corrupt gzip stream ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path}: not an IDX file (expected a 4-byte magic 00 00 <type> <ndim>)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise UserError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(data_dir, stem):
    for name in (stem, stem + ".gz"):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    return None


def download_mnist(dataset, data_dir):
    """Fetch the four IDX files of `dataset` into data_dir (needs a network)."""
    os.makedirs(data_dir, exist_ok=True)
    for stems in MNIST_FILES.values():
        for stem in stems:
            if _find(data_dir, stem):
                continue
            url, dest = DOWNLOAD_URLS[dataset] + stem + ".gz", os.path.join(data_dir, stem + ".gz")
            try:
                urllib.request.urlretrieve(url, dest + ".part")
            except OSError as e:
                raise UserError(f"cannot download {url} ({e}); copy the IDX files into {data_dir} instead") from None
            os.replace(dest + ".part", dest)


def load_mnist(dataset, data_dir, split="train", download=False):
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one split of MNIST or Fashion-MNIST."""
    if dataset not in MNIST_FILES and dataset not in DOWNLOAD_URLS:
        raise UserError(f"unknown dataset '{dataset}'; choose from: {', '.join(DOWNLOAD_URLS)}")
    if split not in MNIST_FILES:
        raise UserError(f"unknown split '{split}'; choose from: train, test")
    if download:
        download_mnist(dataset, data_dir)
    if not os.path.isdir(data_dir):
        raise UserError(f"{data_dir}: no such directory (expected the {dataset} IDX files there)")
    paths = []
    for stem in MNIST_FILES[split]:
        path = _find(data_dir, stem)
        if path is None:
            hint = "" if download else " (pass --download on a machine with a network)"
            raise UserError(f"{os.path.join(data_dir, stem)}[.gz]: missing {dataset} {split} file{hint}")
        paths.append(path)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise UserError(f"{paths[0]}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise UserError(f"{paths[1]}: expected {len(images)} labels, got shape {labels.shape}")
    return images, labels.astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# Code sets: what `vq.py encode` writes and train.py reads
# ----------------------------------------------------------------------------------------------------------
#   CODES/meta.json          what the codes are: tokenizer, grid (h, w), K, d, classes, views, shard list
#   CODES/codebook.npy       float32 (K, d), the codebook as the tokenizer uses it
#   CODES/codes-00000.npy    uint16 (n, V, h, w): V = 1, or 2 when the horizontal flip is stored as a 2nd view
#   CODES/labels-00000.npy   int64 (n,)
# Shards are written to a temporary name and renamed, and meta.json is written last, so an interrupted encode
# never leaves a shard or a code set that looks complete. uint16 holds K <= 65,536 codes: 2 KB per 32x32 grid.

CODES_FORMAT = "purrception-codes/1"


def _atomic_save(path, array):
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def atomic_write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def shard_paths(code_dir, index):
    return (os.path.join(code_dir, f"codes-{index:05d}.npy"), os.path.join(code_dir, f"labels-{index:05d}.npy"))


def write_shard(code_dir, index, codes, labels):
    """Write shard `index`: codes (n, V, h, w) integer, labels (n,) integer."""
    codes, labels = np.asarray(codes), np.asarray(labels)
    if codes.ndim != 4 or labels.shape != (len(codes),):
        raise ValueError(f"shard wants codes (n, V, h, w) and labels (n,), got {codes.shape} and {labels.shape}")
    if codes.size and (codes.min() < 0 or codes.max() > 65535):
        raise ValueError("code indices must lie in [0, 65535] to be stored as uint16")
    os.makedirs(code_dir, exist_ok=True)
    codes_path, labels_path = shard_paths(code_dir, index)
    _atomic_save(labels_path, labels.astype(np.int64))
    _atomic_save(codes_path, codes.astype(np.uint16))  # the codes file last: its presence marks the shard done


def shard_done(code_dir, index):
    return all(os.path.exists(p) for p in shard_paths(code_dir, index))


def write_meta(code_dir, codebook, num_shards, **meta):
    """Finish a code set: the codebook and meta.json (written last). meta needs grid, num_classes, views."""
    codebook = np.asarray(codebook, dtype=np.float32)
    _atomic_save(os.path.join(code_dir, "codebook.npy"), codebook)
    counts = [len(np.load(shard_paths(code_dir, i)[1], mmap_mode="r")) for i in range(num_shards)]
    meta = dict(format=CODES_FORMAT, num_codes=int(codebook.shape[0]), code_dim=int(codebook.shape[1]),
                num_images=int(sum(counts)), shard_sizes=counts, **meta)
    atomic_write_text(os.path.join(code_dir, "meta.json"), json.dumps(meta, indent=2))
    return meta


class CodeSet:
    """A code set on disk, memory-mapped: a 1.28M-image set costs little RAM per process.

    codes[i] is (V, h, w) uint16 and labels[i] an int; `get(indices, view)` gathers a batch across shards.
    """

    def __init__(self, code_dir):
        meta_path = os.path.join(code_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"{meta_path}: missing; expected a code set written by `python vq.py encode`")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{meta_path}: unreadable ({e})") from None
        if self.meta.get("format") != CODES_FORMAT:
            raise UserError(f"{meta_path}: format {self.meta.get('format')!r}, expected {CODES_FORMAT!r}")
        self.dir = code_dir
        try:
            self.codebook = np.load(os.path.join(code_dir, "codebook.npy"))
            self.codes, self.labels = [], []
            for i, n in enumerate(self.meta["shard_sizes"]):
                codes_path, labels_path = shard_paths(code_dir, i)
                codes, labels = np.load(codes_path, mmap_mode="r"), np.load(labels_path, mmap_mode="r")
                if codes.shape[0] != n or labels.shape != (n,) or codes.dtype != np.uint16:
                    raise UserError(f"{codes_path}: expected {n} uint16 code grids, got {codes.dtype} {codes.shape}")
                self.codes.append(codes)
                self.labels.append(labels)
        except (OSError, ValueError) as e:
            raise UserError(f"{code_dir}: a file of the code set is missing or corrupt ({e})") from None
        if self.codebook.shape != (self.num_codes, self.meta["code_dim"]):
            raise UserError(f"{code_dir}/codebook.npy: shape {self.codebook.shape} does not match meta.json")
        self.offsets = np.cumsum([0] + self.meta["shard_sizes"])

    num_codes = property(lambda self: self.meta["num_codes"])
    num_classes = property(lambda self: self.meta["num_classes"])
    grid = property(lambda self: tuple(self.meta["grid"]))
    views = property(lambda self: self.meta["views"])

    def __len__(self):
        return int(self.offsets[-1])

    def get(self, indices, views=None):
        """Codes (B, h, w) int64 and labels (B,) int64 for global indices; views (B,) picks a stored view each."""
        indices = np.asarray(indices)
        views = np.zeros(len(indices), dtype=np.int64) if views is None else np.asarray(views)
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        codes = np.empty((len(indices),) + self.grid, dtype=np.int64)
        labels = np.empty(len(indices), dtype=np.int64)
        for s in np.unique(shard):
            rows = np.nonzero(shard == s)[0]
            local = indices[rows] - self.offsets[s]
            order = np.argsort(local)  # memory maps read fastest in increasing order
            codes[rows[order]] = self.codes[s][local[order], views[rows[order]]]
            labels[rows[order]] = self.labels[s][local[order]]
        return codes, labels


# ----------------------------------------------------------------------------------------------------------
# ImageFolder trees (ImageNet): root/<class name>/<image>, classes in sorted order
# ----------------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".JPEG")


def list_imagefolder(root):
    """(paths, labels, class_names) of an ImageFolder tree, classes and files in sorted order."""
    if not os.path.isdir(root):
        raise UserError(f"{root}: no such directory (expected an ImageFolder tree: ROOT/<class>/<image>)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(e.name for e in os.scandir(os.path.join(root, name))
                       if e.is_file() and e.name.lower().endswith(tuple(x.lower() for x in IMAGE_EXTENSIONS)))
        paths += [os.path.join(root, name, f) for f in files]
        labels += [label] * len(files)
    if not paths:
        raise UserError(f"{root}: not an ImageFolder tree (expected ROOT/<class>/<image>.jpg|png, found "
                        f"{len(classes)} class directories and no images in them)")
    return paths, np.array(labels, dtype=np.int64), classes


def center_crop(image, size):
    """ADM's preprocessing (used by DiT): halve with a box filter while the short side is >= 2 * size, resize
    the short side to `size` with a bicubic filter, then crop the centre square."""
    from PIL import Image
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageFolderImages:
    """Item i: (image (3, size, size) float32 in [-1, 1], label), for a torch DataLoader with workers."""

    def __init__(self, paths, labels, size):
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(self.paths[i]) as f:
                image = center_crop(f.convert("RGB"), self.size)
        except OSError as e:
            raise UserError(f"{self.paths[i]}: not a readable image ({e})") from None
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1
        return array, int(self.labels[i])
