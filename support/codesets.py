"""
Code sets: the code grids of a whole split, its labels and the codebook, in a few array files, written by
`python tokenizer.py encode` (or `sample.py --couplings`) and read by train.py for every dataset alike; and each
rank's resumable batches of them.

A wrong path raises FileNotFoundError (an OSError), a file that is not what was expected raises ValueError; each
message is one line that names the file and what was expected there.
"""

import json
import os
import shutil

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from support import files

# ---- Code sets: what `tokenizer.py encode` writes and train.py reads -------------------------------------
#   CODES/meta.json          what the codes are: tokenizer, grid (h, w), K, d, classes, views, shard list, and
#                            where they came from: dataset, split and, for MNIST-format files, `data`
#                            {dataset, split, images_md5} (MD5 of the decompressed images file, datasets.KNOWN_MD5)
#   CODES/codebook.npy       float32 (K, d), the codebook as the tokenizer uses it
#   CODES/codes-00000.npy    uint16 (n, V, h, w): V = 1, or 2 when the horizontal flip is stored as a 2nd view
#   CODES/labels-00000.npy   int64 (n,)
#   CODES/noise-00000.npy    float32 (n, h, w, d), only in a coupling set (meta "noise": true): the noise z0
#                            from which a teacher's sampler reached each grid (`sample.py --couplings`)
# Shards are written to a temporary name and renamed, and meta.json is written last, so an interrupted encode
# never leaves a shard or a code set that looks complete. uint16 holds K <= 65,536 codes: 2 KB per 32x32 grid.

CODES_FORMAT = "purrception-codes/1"
META_KEYS = ("num_codes", "code_dim", "shard_sizes", "grid", "num_classes", "views")  # what CodeSet reads


def shard_paths(code_dir, index):
    return (os.path.join(code_dir, f"codes-{index:05d}.npy"), os.path.join(code_dir, f"labels-{index:05d}.npy"))


def noise_path(code_dir, index):
    return os.path.join(code_dir, f"noise-{index:05d}.npy")


def write_shard(code_dir, index, codes, labels, noise=None):
    """Write shard `index`: codes (n, V, h, w) integer, labels (n,) integer and, for a coupling set, noise
    (n, h, w, d) float."""
    codes, labels = np.asarray(codes), np.asarray(labels)
    if codes.ndim != 4 or labels.shape != (len(codes),):
        raise ValueError(f"shard wants codes (n, V, h, w) and labels (n,), got {codes.shape} and {labels.shape}")
    if noise is not None and (np.ndim(noise) != 4 or np.shape(noise)[:3] != (len(codes), *codes.shape[2:])):
        raise ValueError(f"shard wants noise (n, h, w, d) for codes {codes.shape}, got {np.shape(noise)}")
    if codes.size and (codes.min() < 0 or codes.max() > 65535):
        raise ValueError("code indices must lie in [0, 65535] to be stored as uint16")
    os.makedirs(code_dir, exist_ok=True)
    codes_path, labels_path = shard_paths(code_dir, index)
    files.save_npy(labels_path, labels.astype(np.int64))
    if noise is not None:
        files.save_npy(noise_path(code_dir, index), np.asarray(noise, dtype=np.float32))
    files.save_npy(codes_path, codes.astype(np.uint16))  # the codes file last: its presence marks the shard done


def shard_done(code_dir, index):
    return all(os.path.exists(p) for p in shard_paths(code_dir, index))


def write_meta(code_dir, codebook, num_shards, **meta):
    """Finish a code set: the codebook and meta.json (written last). meta needs grid, num_classes, views; a code
    set of MNIST-format files also records data={dataset, split, images_md5} (datasets.read_mnist's identity)."""
    codebook = np.asarray(codebook, dtype=np.float32)
    files.save_npy(os.path.join(code_dir, "codebook.npy"), codebook)
    counts = [len(np.load(shard_paths(code_dir, i)[1], mmap_mode="r")) for i in range(num_shards)]
    meta = dict(format=CODES_FORMAT, num_codes=int(codebook.shape[0]), code_dim=int(codebook.shape[1]),
                num_images=int(sum(counts)), shard_sizes=counts, **meta)
    files.write_json(os.path.join(code_dir, "meta.json"), meta)
    return meta


def _load_npy(path, expected, mmap_mode="r"):
    """np.load (memory-mapped by default), or FileNotFoundError / ValueError naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; expected a file of {expected}")
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy file ({e}); expected a file of {expected}") from None


class CodeSet:
    """A code set on disk, memory-mapped: a 1.28M-image set costs little RAM per process.

    codes[i] is (V, h, w) uint16 and labels[i] an int; `get(indices, view)` gathers a batch across shards.
    """

    def __init__(self, code_dir):
        expected = "a code set written by `python tokenizer.py encode`"
        meta_path = os.path.join(code_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{meta_path}: missing; expected {expected}")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
        except ValueError as e:
            raise ValueError(f"{meta_path}: not readable JSON ({e}); expected {expected}") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != CODES_FORMAT:
            found = self.meta.get("format") if isinstance(self.meta, dict) else None
            raise ValueError(f"{meta_path}: format {found!r}; expected {CODES_FORMAT!r}, {expected}")
        missing = [k for k in META_KEYS if k not in self.meta]
        if missing:
            raise ValueError(f"{meta_path}: no {', '.join(missing)}; expected {expected}")
        natural = lambda x, low=1: isinstance(x, int) and not isinstance(x, bool) and x >= low
        m = self.meta
        wrong = [k for k, ok in [
            ("num_codes", natural(m["num_codes"], 2)), ("code_dim", natural(m["code_dim"])),
            ("num_classes", natural(m["num_classes"], 0)), ("views", natural(m["views"])),
            ("grid", isinstance(m["grid"], list) and len(m["grid"]) == 2 and all(map(natural, m["grid"]))),
            ("shard_sizes", isinstance(m["shard_sizes"], list) and all(natural(n, 0) for n in m["shard_sizes"]))]
            if not ok]
        if wrong:
            raise ValueError(f"{meta_path}: {wrong[0]} {m[wrong[0]]!r} is not what `tokenizer.py encode` writes; "
                             f"expected {expected}")
        self.dir = code_dir
        self.codebook = _load_npy(os.path.join(code_dir, "codebook.npy"), expected, mmap_mode=None)
        if self.codebook.shape != (self.num_codes, self.meta["code_dim"]):
            raise ValueError(f"{code_dir}/codebook.npy: shape {self.codebook.shape}; meta.json says "
                             f"{(self.num_codes, self.meta['code_dim'])}")
        self.codes, self.labels, self.noise = [], [], []
        self.has_noise = self.meta.get("noise") is True
        if self.has_noise and self.views != 1:
            raise ValueError(f"{meta_path}: a coupling set holds one view, not {self.views}")
        for i, n in enumerate(self.meta["shard_sizes"]):
            codes_path, labels_path = shard_paths(code_dir, i)
            codes, labels = _load_npy(codes_path, expected), _load_npy(labels_path, expected)
            if codes.shape != (n, self.views, *self.grid) or codes.dtype != np.uint16:
                raise ValueError(f"{codes_path}: expected {n} uint16 code grids {(n, self.views, *self.grid)} "
                                 f"(n, V, h, w), got {codes.dtype} {codes.shape}")
            if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"{labels_path}: expected {n} integer labels, got {labels.dtype} {labels.shape}")
            self.codes.append(codes)
            self.labels.append(labels)
            if self.has_noise:
                noise = _load_npy(noise_path(code_dir, i), "a coupling set written by `python sample.py --couplings`")
                if noise.shape != (n, *self.grid, self.meta["code_dim"]) or noise.dtype != np.float32:
                    raise ValueError(f"{noise_path(code_dir, i)}: expected {n} float32 noise grids "
                                     f"{(n, *self.grid, self.meta['code_dim'])} (n, h, w, d), got {noise.dtype} "
                                     f"{noise.shape}")
                self.noise.append(noise)
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
        codes = np.empty((len(indices),) + self.grid, dtype=np.int64)
        labels = np.empty(len(indices), dtype=np.int64)
        for s, rows, local in self._by_shard(indices):
            codes[rows] = self.codes[s][local, views[rows]]
            labels[rows] = self.labels[s][local]
            # checked as they are read: a whole 1.28M-image set is too large to scan up front
            if codes[rows].max(initial=0) >= self.num_codes:
                raise ValueError(f"{shard_paths(self.dir, s)[0]}: a code index {codes[rows].max()} is out of range "
                                 f"for the {self.num_codes} codes of meta.json")
            if self.num_classes and not 0 <= labels[rows].min() <= labels[rows].max() < self.num_classes:
                raise ValueError(f"{shard_paths(self.dir, s)[1]}: labels in [{labels[rows].min()}, "
                                 f"{labels[rows].max()}], outside the {self.num_classes} classes of meta.json")
        return codes, labels

    def get_noise(self, indices):
        """The noise (B, h, w, d) float32 of a coupling set's grids at global indices."""
        indices = np.asarray(indices)
        noise = np.empty((len(indices), *self.grid, self.meta["code_dim"]), dtype=np.float32)
        for s, rows, local in self._by_shard(indices):
            noise[rows] = self.noise[s][local]
        return noise

    def _by_shard(self, indices):
        """(shard, rows of `indices` in that shard, their positions in the shard) for each shard they touch, the
        positions in increasing order: memory maps read fastest that way."""
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        for s in np.unique(shard):
            rows = np.nonzero(shard == s)[0]
            local = indices[rows] - self.offsets[s]
            order = np.argsort(local)
            yield s, rows[order], local[order]


# ---- Batches for training: each rank's share of every epoch, resumable at any step -----------------------

class _Indexable:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


class Batches:
    """This rank's batches of (codes, labels, noise), epoch after epoch; state() and load_state() make it resumable.

    Each epoch is a fresh permutation shared by all ranks (DistributedSampler, seeded, set_epoch), of which every
    rank reads its own slice; when the codes hold several views (a horizontal flip), each draw picks one at
    random from a generator seeded by (seed, epoch, rank), so a resumed run sees the same views; flips=False
    always takes the first view (the center crop).
    """

    def __init__(self, codes, batch_size, rank, world, seed, flips=True):
        if len(codes) < batch_size * world:
            raise ValueError(f"{codes.dir}: {len(codes)} code grids, fewer than one global batch of "
                             f"{batch_size * world}")
        self.codes, self.batch_size, self.rank, self.seed = codes, batch_size, rank, seed
        self.num_views = codes.views if flips else 1
        self.sampler = DistributedSampler(_Indexable(len(codes)), num_replicas=world, rank=rank, shuffle=True,
                                          seed=seed, drop_last=True)
        self.epoch, self.cursor = 0, 0
        self._load_epoch()

    def _load_epoch(self):
        self.sampler.set_epoch(self.epoch)
        self.indices = np.fromiter(iter(self.sampler), dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        self.views = rng.integers(0, self.num_views, len(self.indices))

    def next(self):
        """(codes (B, h, w), labels (B,), noise (B, h, w, d) of a coupling set or None)."""
        if self.cursor + self.batch_size > len(self.indices):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._load_epoch()
        s = slice(self.cursor, self.cursor + self.batch_size)
        self.cursor += self.batch_size
        codes, labels = self.codes.get(self.indices[s], self.views[s])
        noise = torch.from_numpy(self.codes.get_noise(self.indices[s])) if self.codes.has_noise else None
        return torch.from_numpy(codes), torch.from_numpy(labels), noise

    def state(self):
        return dict(epoch=self.epoch, cursor=self.cursor)

    def load_state(self, state):
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._load_epoch()


def write_couplings(out, codes, labels, noise, codebook, meta, teacher):
    """A coupling set at `out`: codes (n, h, w) with their labels and the noise z0 (n, h, w, d) a teacher's sampler
    started from, the tokenizer and classes of the code set `meta` it was trained on, and the teacher's settings.
    Written to a temporary directory and renamed, so it is whole or absent."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(os.path.abspath(out))}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_shard(tmp, 0, codes[:, None], labels, noise)
    kept = {k: v for k, v in meta.items() if k not in META_KEYS + ("format", "num_images", "split")}
    write_meta(tmp, codebook, 1, grid=list(codes.shape[1:]), num_classes=meta["num_classes"], views=1,
               **dict(kept, noise=True, teacher=teacher))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
