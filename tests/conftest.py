import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so its answer does not depend on test order."""
    torch.manual_seed(0)
    np.random.seed(0)


# ---- a small real pipeline on a slice of Fashion-MNIST, built once per test session ------------------------

@pytest.fixture(scope="session")
def tokenizer_run(tmp_path_factory):
    """A VQ tokenizer trained for a few steps on 512 Fashion-MNIST images: RUN/tokenizer.pt."""
    import vq
    out = tmp_path_factory.mktemp("vq")
    vq.main(["train", "--dataset", "fashion-mnist", "--data-dir", FASHION_MNIST, "--out", str(out),
             "--limit", "512", "--steps", "20", "--batch-size", "64"])
    return out


def encode(tokenizer, out, limit):
    """`vq.py encode` of the first `limit` Fashion-MNIST training images into the code set `out`."""
    import vq
    vq.main(["encode", "--tokenizer", str(tokenizer), "--dataset", "fashion-mnist", "--data-dir", FASHION_MNIST,
             "--split", "train", "--limit", str(limit), "--out", str(out)])
    return out


@pytest.fixture(scope="session")
def codes_dir(tokenizer_run, tmp_path_factory):
    """The code set of those 512 images."""
    return encode(tokenizer_run / "tokenizer.pt", tmp_path_factory.mktemp("codes") / "codes", 512)


@pytest.fixture(scope="session")
def flow_ckpts(codes_dir, tmp_path_factory):
    """A Purrception and a DFM checkpoint of 40 steps on the session's codes: enough for the posterior to depend on
    z_t, so that the seed, the temperature and guidance change the samples; the EMA (decay 0.5) differs from the
    raw weights, so that --no-ema does too. The flow runs on E / rms(E): on the raw unit-norm codes, 40 steps
    learn little more than the marginal code frequencies, the same whatever the noise."""
    import train
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
    import sample
    out = tmp_path_factory.mktemp("couplings")
    sample.main(["--ckpt", str(flow_ckpts["purrception"]), "--num-samples", "40", "--steps", "3", "--batch-size", "16",
                 "--cfg-scale", "2", "--seed", "4", "--couplings", "--out", str(out)])
    return out


def fill_the_disk(monkeypatch, at=""):
    """From now on files.atomic_write behaves as on a disk that fills up mid-write, for every path containing `at`:
    it writes the content, then fails with ENOSPC."""
    import errno
    import files
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
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if script.startswith("torchrun "):  # torchrun of this Python, whatever is first on PATH
        cmd = [sys.executable, "-m", "torch.distributed.run", *script.split()[1:]]
    else:
        cmd = [sys.executable, os.path.join(root, script)]
    return cmd + [str(a) for a in args], dict(cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def run_cli(script, *args, env=None):
    """Run one of the repo's scripts in a subprocess: (return code, stdout, stderr)."""
    import subprocess
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
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == code and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " if code == 2 else "interrupted"), lines
    return lines[0]
