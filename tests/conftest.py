import errno
import inspect
import os
import re
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, ROOT)

# Real Fashion-MNIST in IDX format (Debian: apt-get install dataset-fashion-mnist), or wherever
# PURRCEPTION_FASHION_MNIST points. Tests that need it are skipped where it is missing, unless
# PURRCEPTION_REQUIRE_DATA=1 (CI: .ci/run), which makes a missing dataset an error.
FASHION_MNIST = os.environ.get("PURRCEPTION_FASHION_MNIST") or "/usr/share/datasets/fashion-mnist"
REQUIRE_DATA = os.environ.get("PURRCEPTION_REQUIRE_DATA", "") not in ("", "0")


import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import sample  # noqa: E402
import tokenizer  # noqa: E402
import train  # noqa: E402
from support import datasets, files, lenet  # noqa: E402


# ---- which tests need the Fashion-MNIST files ----------------------------------------------------------------

def missing_fashion_mnist():
    """The IDX files of FASHION_MNIST that are absent (neither plain nor .gz)."""
    return [stem for stems in datasets.MNIST_FILES.values() for stem in stems
            if not any(os.path.isfile(os.path.join(FASHION_MNIST, stem + ext)) for ext in ("", ".gz"))]


def _names_fashion_mnist(func, seen):
    """Whether `func`, or a function of the test modules it calls by name, names the FASHION_MNIST path."""
    code = getattr(func, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    codes = [code]
    while codes:
        c = codes.pop()
        codes += [const for const in c.co_consts if inspect.iscode(const)]  # lambdas, inner functions
        for name in c.co_names:
            value = func.__globals__.get(name)
            if isinstance(value, str) and value == FASHION_MNIST:
                return True
            if (inspect.isfunction(value) and value.__module__.split(".")[-1].startswith(("test_", "conftest"))
                    and _names_fashion_mnist(value, seen)):
                return True
    return False


def needs_fashion_mnist(item):
    """A test needs the files when it, a helper it calls, one of its fixtures (tokenizer_run, codes_dir, ... and
    their helpers) or its parameters name FASHION_MNIST."""
    seen = set()
    if _names_fashion_mnist(getattr(item, "function", None), seen):
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None and FASHION_MNIST in repr(callspec.params):
        return True
    definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return any(_names_fashion_mnist(d.func, seen) for name in getattr(item, "fixturenames", ())
               for d in definitions.get(name, ()))


def pytest_collection_modifyitems(config, items):
    missing = missing_fashion_mnist()
    if not missing:
        return
    needing = [item for item in items if needs_fashion_mnist(item)]
    if not needing:
        return
    where = (f"Fashion-MNIST's IDX files in {FASHION_MNIST} (missing: {', '.join(missing)}); install them with "
             f"`apt-get install dataset-fashion-mnist`, or set PURRCEPTION_FASHION_MNIST to a directory holding them")
    if REQUIRE_DATA:
        raise pytest.UsageError(f"PURRCEPTION_REQUIRE_DATA is set and {len(needing)} tests need {where}")
    skip = pytest.mark.skip(reason=f"needs {where}")
    for item in needing:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so its answer does not depend on test order."""
    torch.manual_seed(0)
    np.random.seed(0)


# ---- a small real pipeline on a slice of Fashion-MNIST, built once per test session ------------------------

@pytest.fixture(scope="session")
def tokenizer_run(tmp_path_factory):
    """A VQ tokenizer trained for a few steps on 512 Fashion-MNIST images: RUN/tokenizer.pt."""
    out = tmp_path_factory.mktemp("vq")
    tokenizer.main(["train", "--dataset", "fashion-mnist", "--data-dir", FASHION_MNIST, "--out", str(out),
             "--limit", "512", "--steps", "20", "--batch-size", "64"])
    return out


def encode(tokenizer_path, out, limit):
    """`tokenizer.py encode` of the first `limit` Fashion-MNIST training images into the code set `out`."""
    tokenizer.main(["encode", "--tokenizer", str(tokenizer_path), "--dataset", "fashion-mnist", "--data-dir", FASHION_MNIST,
             "--split", "train", "--limit", str(limit), "--out", str(out)])
    return out


@pytest.fixture(scope="session")
def codes_dir(tokenizer_run, tmp_path_factory):
    """The code set of those 512 images."""
    return encode(tokenizer_run / "tokenizer.pt", tmp_path_factory.mktemp("codes") / "codes", 512)


@pytest.fixture(scope="session")
def classifier(tmp_path_factory):
    """A small classifier file for evaluate.py (512 images, 1 epoch): the scores mean nothing, the code runs."""
    path = tmp_path_factory.mktemp("classifier") / "classifier.pt"
    lenet.load_classifier("fashion-mnist", FASHION_MNIST, str(path), limit=512, epochs=1)
    return path


@pytest.fixture(scope="session")
def flow_ckpts(codes_dir, tmp_path_factory):
    """A Purrception and a DFM checkpoint of 40 steps on the session's codes: enough for the posterior to depend on
    z_t, so that the seed, the temperature and guidance change the samples; the EMA (decay 0.5) differs from the
    raw weights, so that --no-ema does too. The flow runs on E / rms(E): on the raw unit-norm codes, 40 steps
    learn little more than the marginal code frequencies, the same whatever the noise."""
    ckpts = {}
    for objective in ("purrception", "dfm"):
        run = tmp_path_factory.mktemp(objective)
        train.main(["--codes", str(codes_dir), "--objective", objective, "--out", str(run), "--steps", "40",
                    "--model", "DiT-T/1", "--batch-size", "8", "--sample-every", "0", "--lr", "3e-3",
                    "--ema-decay", "0.5", "--codebook-scale", "rms"])
        ckpts[objective] = run / "checkpoints" / "last.pt"
    return ckpts


@pytest.fixture(scope="session")
def couplings_dir(flow_ckpts, tmp_path_factory):
    """`sample.py --couplings` from the Purrception checkpoint: 40 grids in batches of 16, guided, each with the
    noise it started from."""
    out = tmp_path_factory.mktemp("couplings")
    sample.main(["--ckpt", str(flow_ckpts["purrception"]), "--num-samples", "40", "--steps", "3", "--batch-size", "16",
                 "--cfg-scale", "2", "--seed", "4", "--couplings", "--out", str(out)])
    return out


def fill_the_disk(monkeypatch, at=""):
    """From now on files.atomic_write behaves as on a disk that fills up mid-write, for every path containing `at`:
    it writes the content, then fails with ENOSPC."""

    real = files.atomic_write

    def full_disk(path, write, mode="wb"):
        def write_then_fail(f):
            write(f)
            if at in path:
                raise OSError(errno.ENOSPC, "No space left on device", path)
        real(path, write_then_fail, mode)

    monkeypatch.setattr(files, "atomic_write", full_disk)


def cli(script, *args, env=None):
    """(command, keyword arguments for subprocess) to run one of the repo's scripts, or torchrun of one."""
    if script.startswith("torchrun "):  # torchrun of this Python, whatever is first on PATH
        cmd = [sys.executable, "-m", "torch.distributed.run", *script.split()[1:]]
    else:
        cmd = [sys.executable, os.path.join(ROOT, script)]
    return cmd + [str(a) for a in args], dict(cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workers_said(err, n=2000):
    """The last n characters of a command's stderr, for an assertion's message; under torchrun, those before its
    report of a failed worker (a traceback and a table that would fill the tail and say only an exit code)."""
    report = re.search(r"^[WE]\d{4} [\d:.]+ \d+ \S*torch/distributed/elastic", err, re.M)
    return (err[:report.start()] if report else err)[-n:]


def run_cli(script, *args, env=None):
    """Run one of the repo's scripts in a subprocess: (return code, stdout, stderr)."""
    cmd, kwargs = cli(script, *args, env=env)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    return proc.returncode, proc.stdout, proc.stderr


def contents(directory):
    """{name: bytes} of every file in a directory (None for a folder; an absent directory is empty), to compare
    a directory before and after a command."""
    if not directory.exists():
        return {}
    return {p.name: p.read_bytes() if p.is_file() else None for p in sorted(directory.iterdir())}


def one_line_error(capsys, main, argv, code=2):
    """Run main(argv) in-process, expecting exit `code` with exactly one line on stderr and no traceback: "error:
    ..." for a mistake (2), "interrupted ..." for Ctrl-C (130). Returns the line."""
    capsys.readouterr()  # what earlier calls printed (a warning of a run before this one) is not this call's
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == code and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " if code == 2 else "interrupted"), lines
    return lines[0]


def write_idx(path, array):
    """An uncompressed IDX file of a uint8 array: images (N, 28, 28) or labels (N,)."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.tobytes())


def fake_mnist(directory, monkeypatch=None, n=100, seed=0):
    """Small MNIST-format files in `directory`, both splits: random images, n / 10 labels of each class. With
    `monkeypatch`, support/datasets.py takes them for MNIST's own files (KNOWN_MD5["mnist"] is their checksums);
    without, they are files of no known dataset. Returns the directory as a str."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    known = {}
    for split, (images, labels) in datasets.MNIST_FILES.items():
        write_idx(directory / images, rng.integers(0, 256, (n, 28, 28)))
        write_idx(directory / labels, rng.permutation(np.arange(n) % 10))  # files of distinct contents
        known.update({stem: datasets.md5((directory / stem).read_bytes()) for stem in (images, labels)})
    if monkeypatch is not None:
        monkeypatch.setitem(datasets.KNOWN_MD5, "mnist", known)
    return str(directory)
