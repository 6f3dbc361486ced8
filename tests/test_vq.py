"""The MNIST VQ tokenizer (vq.py): the quantizer against exact answers, the autoencoder's interface and its
loading; then both commands of tokenizer.py on a slice of the real Fashion-MNIST (the `tokenizer_run` and `codes_dir`
fixtures of conftest.py) and their one-line errors."""

import errno
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import tokenizer
import vq
from conftest import FASHION_MNIST, contents, run_cli
from support import codesets, datasets, files, images, tokenizers

# ---- the quantizer ----------------------------------------------------------------------------------------

def test_lookup_picks_the_nearest_code():
    quantizer = vq.VectorQuantizer(num_codes=64, dim=8).eval()
    z = torch.randn(4, 8, 5, 5) * 3  # (B, d, h, w), any norm
    _, indices, _ = quantizer(z)
    flat = F.normalize(z.double().permute(0, 2, 3, 1).reshape(-1, 8), dim=1)  # (N, d)
    dist2 = (flat[:, None, :] - quantizer.codebook.double()[None]).pow(2).sum(-1)  # (N, K) brute force
    chosen = dist2.gather(1, indices.reshape(-1, 1)).squeeze(1)
    assert torch.all(chosen <= dist2.min(dim=1).values + 1e-9)
    top2 = dist2.topk(2, dim=1, largest=False).values
    clear = top2[:, 1] - top2[:, 0] > 1e-6  # no near-tie that float32 rounding could flip
    assert clear.float().mean() > 0.95
    assert torch.equal(indices.reshape(-1)[clear], dist2.argmin(dim=1)[clear])


def test_straight_through_gradient_passes_unchanged():
    quantizer = vq.VectorQuantizer(num_codes=16, dim=4).eval()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    upstream = torch.randn(2, 4, 3, 3)
    z_q, indices, _ = quantizer(z)
    assert torch.equal(z_q.detach(), quantizer.codebook[indices].permute(0, 3, 1, 2))  # forward: the codes
    (z_q * upstream).sum().backward()
    z_ref = z.detach().clone().requires_grad_(True)
    (F.normalize(z_ref, dim=1) * upstream).sum().backward()  # backward: as if quantizing were the identity
    assert torch.allclose(z.grad, z_ref.grad, atol=1e-6)


def test_commitment_loss_on_a_known_input():
    quantizer = vq.VectorQuantizer(num_codes=2, dim=2, beta=0.25).eval()
    quantizer.embedding.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    angle = math.pi / 6
    z = 3 * torch.tensor([math.cos(angle), math.sin(angle)]).view(1, 2, 1, 1)  # normalised to unit length
    _, indices, loss = quantizer(z)
    assert indices.item() == 0
    # |z - e_0|^2 = 2 - 2 cos(30 deg), averaged over d = 2 entries, times beta
    assert loss.item() == pytest.approx(0.25 * (2 - 2 * math.cos(angle)) / 2, rel=1e-6)


def clusters(centres, n, spread=0.01):
    """(n * len(centres), d, 1, 1) points scattered tightly around each centre."""
    points = centres.repeat_interleave(n, dim=0) + spread * torch.randn(n * len(centres), centres.shape[1])
    return points[:, :, None, None]


def test_initialisation_finds_every_cluster():
    centres = F.normalize(torch.randn(8, 6), dim=1)
    quantizer = vq.VectorQuantizer(num_codes=8, dim=6).train()
    _, indices, _ = quantizer(clusters(centres, 50))
    assert quantizer.initialized
    assert vq.codebook_usage(vq.code_counts(indices, 8)) == 1.0
    similarity = centres @ quantizer.codebook.T  # (8, 8)
    assert torch.all(similarity.max(dim=1).values > 0.99)


def test_dead_codes_are_restarted_from_encoder_outputs():
    quantizer = vq.VectorQuantizer(num_codes=8, dim=4, dead_after=3).train()
    codes = torch.cat([torch.eye(4), -torch.eye(4)])  # the data lie near +e_i: codes 4..7 are never used
    quantizer.embedding.copy_(codes)
    quantizer.ema_sum.copy_(codes)
    quantizer.initialized.fill_(True)
    for step in range(3):
        batch = clusters(torch.eye(4), 10, spread=0.1)
        quantizer(batch)
        if step < 2:
            assert quantizer.restarts == 0 and torch.equal(quantizer.codebook[4:], codes[4:])
    assert quantizer.restarts == 4
    flat = F.normalize(batch.reshape(-1, 4), dim=1)  # the last batch's encoder outputs
    distance_to_batch = torch.cdist(quantizer.codebook[4:], flat).min(dim=1).values
    assert torch.all(distance_to_batch < 1e-6)  # each restarted code is one of them
    assert torch.all((quantizer.codebook[:4] * torch.eye(4)).sum(1) > 0.9)  # the used codes were kept
    assert torch.all(quantizer.unused_for[4:] == 0)


def test_usage_and_perplexity():
    K = 32
    uniform = vq.code_counts(torch.arange(K).repeat(3), K)
    assert vq.perplexity(uniform) == pytest.approx(K, rel=1e-12)
    assert vq.codebook_usage(uniform) == 1.0
    single = vq.code_counts(torch.full((5, 7, 7), 3), K)
    assert vq.perplexity(single) == pytest.approx(1.0, rel=1e-12)
    assert vq.codebook_usage(single) == 1 / K


# ---- the autoencoder --------------------------------------------------------------------------------------

def test_autoencoder_interface():
    model = vq.MnistVQ().eval()
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    codes = model.encode(x)
    assert codes.dtype == torch.long and codes.shape == (3, 7, 7)
    assert codes.min() >= 0 and codes.max() < 256
    decoded = model.decode(codes)
    assert decoded.dtype == torch.float32 and decoded.shape == (3, 1, 28, 28)
    assert decoded.min() >= -1 and decoded.max() <= 1
    assert model.codebook.shape == (256, 8) and model.codebook.dtype == torch.float32
    assert torch.allclose(model.codebook.norm(dim=1), torch.ones(256))
    assert model.grid_size == 7 and model.image_shape == (1, 28, 28)
    reconstruction, indices, loss = model.train()(x)
    assert reconstruction.shape == (3, 1, 28, 28) and indices.shape == (3, 7, 7) and loss.dim() == 0


# ---- tokenizer.py train and encode -------------------------------------------------------------------------------

def test_train_writes_a_run(tokenizer_run):
    assert sorted(p.name for p in tokenizer_run.iterdir()) == ["metrics.json", "recon.png", "tokenizer.pt"]
    metrics = json.loads((tokenizer_run / "metrics.json").read_text())
    assert metrics["steps"] == 20 and metrics["train_images"] == 512 and metrics["test_images"] == 512
    assert metrics["test_psnr"] == pytest.approx(10 * math.log10(4 / metrics["test_mse"]))  # peak-to-peak 2
    with Image.open(tokenizer_run / "recon.png") as preview:  # 10 classes, originals above reconstructions
        assert preview.size == (4 * (10 * 30 + 2), 4 * (2 * 30 + 2))  # 28-pixel images, 2-pixel borders, x4
    tokenizer = tokenizers.load(str(tokenizer_run / "tokenizer.pt"))
    assert not tokenizer.training and not any(p.requires_grad for p in tokenizer.parameters())
    ckpt = torch.load(tokenizer_run / "tokenizer.pt", weights_only=True)
    assert ckpt["kind"] == tokenizers.MNIST_KIND and ckpt["metrics"] == metrics
    # the test metrics again, from the saved tokenizer and the first 512 test images, computed here directly
    pixels, _ = datasets.load_mnist("fashion-mnist", FASHION_MNIST, "test")
    x = torch.from_numpy(pixels[:512]).float().div(127.5).sub(1).unsqueeze(1)  # (512, 1, 28, 28)
    codes = tokenizer.encode(x)
    assert metrics["test_mse"] == pytest.approx((tokenizer.decode(codes) - x).pow(2).mean().item(), rel=1e-5)
    p = torch.bincount(codes.flatten(), minlength=256).double() / codes.numel()
    assert metrics["test_usage"] == pytest.approx((p > 0).double().mean().item())
    nonzero = p[p > 0]
    assert metrics["test_perplexity"] == pytest.approx(torch.exp(-(nonzero * nonzero.log()).sum()).item())


def test_train_flags(tmp_path):
    def run(out, seed):
        tokenizer.main(["train", "--dataset", "fashion-mnist", "--data-dir", FASHION_MNIST, "--out", str(out),
                 "--steps", "3", "--batch-size", "32", "--limit", "64", "--lr", "1e-3", "--codebook-size", "64",
                 "--seed", str(seed), "--download"])  # the files are there: --download fetches nothing
        return tokenizers.load(str(out / "tokenizer.pt"))

    first, again = run(tmp_path / "a", 3), run(tmp_path / "b", 3)
    assert first.codebook.shape == (64, 8)
    assert torch.equal(first.codebook, again.codebook)  # the seed fixes the weights, the codes and the batches
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["steps"] == 3


def test_encode_writes_the_tokenizers_codes(tokenizer_run, codes_dir):
    codes = codesets.CodeSet(str(codes_dir))
    tokenizer = tokenizers.load(str(tokenizer_run / "tokenizer.pt"))
    pixels, labels = datasets.load_mnist("fashion-mnist", FASHION_MNIST, "train")
    expected = torch.cat([tokenizer.encode(images.to_float(pixels[lo:min(lo + 500, 512)])) for lo in (0, 500)])
    stored, stored_labels = codes.get(np.arange(512))
    assert len(codes) == 512 and codes.views == 1 and codes.grid == (7, 7) and codes.num_classes == 10
    assert np.array_equal(stored, expected.numpy()) and np.array_equal(stored_labels, labels[:512])
    assert np.array_equal(codes.codebook, tokenizer.codebook.numpy())
    assert codes.meta["tokenizer"] == {"kind": tokenizers.MNIST_KIND, "path": str(tokenizer_run / "tokenizer.pt")}
    assert codes.meta["class_names"] == datasets.CLASS_NAMES["fashion-mnist"] and codes.meta["image_shape"] == [1, 28, 28]


def test_encode_refuses_an_existing_code_set_without_force(tokenizer_run, tmp_path, capsys):
    args = ["encode", "--tokenizer", str(tokenizer_run / "tokenizer.pt"), "--dataset", "fashion-mnist",
            "--data-dir", FASHION_MNIST, "--split", "test", "--limit", "100", "--batch-size", "32",
            "--out", str(tmp_path / "codes")]
    tokenizer.main(args)
    assert len(codesets.CodeSet(str(tmp_path / "codes"))) == 100
    before = contents(tmp_path / "codes")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        tokenizer.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip().splitlines() == [
        f"error: {tmp_path / 'codes'}: a code set already exists; pass --force to overwrite"]
    assert contents(tmp_path / "codes") == before
    meta = tokenizer.main(args + ["--force", "--limit", "50"])
    assert meta["split"] == "test" and len(codesets.CodeSet(str(tmp_path / "codes"))) == 50


# ---- loading and user errors ------------------------------------------------------------------------------

def test_load_rejects_bad_files(tmp_path, tokenizer_run):
    corrupt, wrong_kind, wrong_weights = tmp_path / "corrupt.pt", tmp_path / "wrong.pt", tmp_path / "weights.pt"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"kind": "dit", "model": {}, "config": {}}, wrong_kind)
    ckpt = torch.load(tokenizer_run / "tokenizer.pt", weights_only=True)
    del ckpt["model"]["decoder.net.0.weight"]
    torch.save(ckpt, wrong_weights)
    expected = "expected a tokenizer written by `python tokenizer.py train`"
    cases = [(tmp_path / "missing.pt", FileNotFoundError, ["no such file", expected]),
             (corrupt, ValueError, ["not a readable PyTorch file", expected]),
             (wrong_kind, ValueError, ["kind 'dit'", expected]),
             (wrong_weights, ValueError, ["weights do not fit its config (first mismatch: decoder.net.0.weight)"])]
    for path, kind, reasons in cases:
        with pytest.raises(kind) as error:
            tokenizers.load(str(path))
        message = str(error.value)
        assert str(path) in message and all(r in message for r in reasons) and "\n" not in message
    path = str(tokenizer_run / "tokenizer.pt")
    assert tokenizers.load(tokenizers.MNIST_KIND, ckpt=path).codebook.shape == (256, 8)  # by registry name
    with pytest.raises(ValueError, match="needs the path of its weights"):
        tokenizers.load(tokenizers.MNIST_KIND)
    with pytest.raises(ValueError, match="holds its own weights"):
        tokenizers.load(path, ckpt=path)


def test_cli_user_errors_exit_2_with_one_line(tmp_path, tokenizer_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tokenizer.main(["train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "nowhere" in err and "Traceback" not in err
    rc, _, err = run_cli("tokenizer.py", "encode", "--tokenizer", tmp_path / "none.pt", "--dataset", "mnist",
                         "--data-dir", FASHION_MNIST, "--out", tmp_path / "codes")
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "none.pt" in err
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 64)
    rc, _, err = run_cli("tokenizer.py", "encode", "--tokenizer", tmp_path / "junk.pt", "--dataset", "fashion-mnist",
                         "--data-dir", FASHION_MNIST, "--out", tmp_path / "codes")
    assert rc == 2 and err.count("\n") == 1 and f"{tmp_path / 'junk.pt'}: not a readable PyTorch file" in err
    with pytest.raises(SystemExit) as exit_info:
        tokenizer.main(["train", "--dataset", "mnist", "--data-dir", FASHION_MNIST, "--out", str(tmp_path / "run"),
                 "--steps", "0"])
    assert exit_info.value.code == 2 and "--steps 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        tokenizer.main(["encode", "--tokenizer", str(tokenizer_run / "tokenizer.pt"), "--tokenizer-ckpt", "x.pt",
                 "--dataset", "fashion-mnist", "--data-dir", FASHION_MNIST, "--out", str(tmp_path / "codes")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--tokenizer-ckpt goes with a pretrained --tokenizer" in err


def test_an_interrupted_write_leaves_no_file(tmp_path):
    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(str(tmp_path / "tokenizer.pt"), interrupted)
    assert list(tmp_path.iterdir()) == []


# ---- a user's mistakes: one line, exit status 2, before any work, and the files already there untouched ------

def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("error: ")]


@pytest.fixture
def old_run(tokenizer_run, tmp_path):
    """A copy of the session's tokenizer run, for a test to try to overwrite."""
    import shutil
    shutil.copytree(tokenizer_run, tmp_path / "run")
    return tmp_path / "run"


def train_args(out, *extra):
    return ["train", "--dataset", "fashion-mnist", "--data-dir", FASHION_MNIST, "--out", str(out), "--limit", "64",
            "--steps", "3", "--batch-size", "32", *extra]


@pytest.mark.parametrize("extra,message", [
    (["--lr", "1e30", "--force"], "step 1: the loss is nan, not a finite number"),
    (["--lr", "1e30", "--force", "--steps", "1"], "step 0: after its update the test reconstruction MSE is nan"),
])
def test_a_diverging_run_stops_with_one_line_and_keeps_the_last_good_run(old_run, capsys, extra, message):
    before = contents(old_run)
    with pytest.raises(SystemExit) as exit_info:
        tokenizer.main(train_args(old_run, *extra))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert len(error_lines(err)) == 1 and message in error_lines(err)[0] and "lower --lr" in err
    assert contents(old_run) == before


def test_train_refuses_to_replace_a_tokenizer_without_force(old_run, capsys):
    before = contents(old_run)
    rc, _, err = run_cli("tokenizer.py", *train_args(old_run))
    assert rc == 2 and err.strip().splitlines() == [
        f"error: {old_run / 'tokenizer.pt'} exists: pass --force to replace it, or choose another --out"]
    assert contents(old_run) == before
    tokenizer.main(train_args(old_run, "--force"))
    assert contents(old_run)["tokenizer.pt"] != before["tokenizer.pt"]
    assert json.loads((old_run / "metrics.json").read_text())["steps"] == 3
    assert not list(old_run.glob("*.tmp"))
    with pytest.raises(SystemExit):
        tokenizer.parse_args(["train", "--help"])
    assert "--force" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (train_args("OUT", "--lr", "nan"), "--lr nan: expected a positive number"),
    (train_args("OUT", "--lr", "inf"), "--lr inf: expected a positive number"),
    (train_args("OUT", "--lr", "-1"), "--lr -1.0: expected a positive number"),
    (train_args("OUT", "--steps", "0"), "--steps 0: expected a positive number"),
    (train_args("OUT", "--batch-size", "-2"), "--batch-size -2: expected a positive number"),
    (train_args("OUT", "--limit", "0"), "--limit 0: expected a positive number"),
    (train_args("OUT", "--codebook-size", "1"), "--codebook-size 1: expected 2 to 65536 codes"),
    (train_args("OUT", "--codebook-size", "65537"), "--codebook-size 65537: expected 2 to 65536 codes"),
    (train_args("OUT", "--seed", str(2 ** 70)), f"--seed {2 ** 70}: expected an integer in [0, 2^32)"),
    (["encode", "--tokenizer", "TOKENIZER", "--dataset", "mnist", "--data-dir", FASHION_MNIST, "--out", "OUT",
      "--batch-size", "0"], "--batch-size 0: expected a positive number"),
    (["encode", "--tokenizer", "TOKENIZER", "--dataset", "mnist", "--data-dir", FASHION_MNIST, "--out", "OUT",
      "--limit", "-5"], "--limit -5: expected a positive number"),
])
def test_bad_numbers_are_one_line_before_any_work(tmp_path, tokenizer_run, capsys, args, message):
    swap = {"OUT": str(tmp_path / "out"), "TOKENIZER": str(tokenizer_run / "tokenizer.pt")}
    with pytest.raises(SystemExit) as exit_info:
        tokenizer.main([swap.get(a, a) for a in args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case,message", [
    ("out is a file", "{tmp}/FILE: exists and is not a directory"),
    ("out under a file", "{tmp}/FILE/run: cannot create the output directory (Not a directory)"),
    ("data-dir is a file", "{tmp}/FILE: a file, not a directory (expected the fashion-mnist IDX files there)"),
    ("data-dir is a code set", "{codes}/train-images-idx3-ubyte[.gz]: missing fashion-mnist train file"),
    ("tokenizer is a samples.npz", "{tmp}/samples.npz: not a readable PyTorch file"),
    ("tokenizer is a run directory", "{run}: a directory; expected a tokenizer written by `python tokenizer.py train`"),
    ("tokenizer is pretrained", "--tokenizer llamagen-vq16 encodes colour images (--dataset imagefolder)"),
])
def test_bad_paths_and_files_are_one_line_before_any_work(tmp_path, tokenizer_run, codes_dir, monkeypatch, capsys,
                                                          case, message):
    (tmp_path / "FILE").write_text("mine")
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 28, 28, 1), np.uint8))
    encode = ["encode", "--tokenizer", str(tokenizer_run / "tokenizer.pt"), "--dataset", "fashion-mnist",
              "--data-dir", FASHION_MNIST, "--out", str(tmp_path / "codes")]
    args = {"out is a file": train_args(tmp_path / "FILE"),
            "out under a file": train_args(tmp_path / "FILE" / "run"),
            "data-dir is a file": train_args(tmp_path / "run", "--data-dir", str(tmp_path / "FILE")),
            "data-dir is a code set": encode + ["--data-dir", str(codes_dir)],
            "tokenizer is a samples.npz": encode + ["--tokenizer", str(tmp_path / "samples.npz")],
            "tokenizer is a run directory": encode + ["--tokenizer", str(tokenizer_run)],
            "tokenizer is pretrained": encode + ["--tokenizer", "llamagen-vq16", "--tokenizer-ckpt", "x.pt"]}[case]
    if case.startswith("out"):  # the output is checked before the data is read
        monkeypatch.setattr(datasets, "load_mnist", lambda *a, **k: pytest.fail("read the data before checking --out"))
    run_before, codes_before = contents(tokenizer_run), contents(codes_dir)
    with pytest.raises(SystemExit) as exit_info:
        tokenizer.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert message.format(tmp=tmp_path, run=tokenizer_run, codes=codes_dir) in err
    assert (tmp_path / "FILE").read_text() == "mine"
    assert contents(tokenizer_run) == run_before and contents(codes_dir) == codes_before


def test_a_full_disk_is_one_line_and_leaves_the_old_run_whole(old_run, monkeypatch, capsys):
    def full_disk(obj, f, *args, **kwargs):
        f.write(b"the first bytes")
        raise OSError(errno.ENOSPC, "No space left on device")
    before = contents(old_run)
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        tokenizer.main(train_args(old_run, "--force"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert len(error_lines(err)) == 1 and "No space left on device" in error_lines(err)[0]
    assert contents(old_run) == before and not list(old_run.glob("*.tmp"))


def test_a_tokenizer_that_diverged_is_refused(tokenizer_run, tmp_path):
    ckpt = torch.load(tokenizer_run / "tokenizer.pt", weights_only=True)
    ckpt["model"]["decoder.net.0.weight"][0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="nan.pt: its weights are not all finite numbers"):
        tokenizers.load(str(tmp_path / "nan.pt"))


def test_a_code_set_that_names_no_tokenizer(codes_dir):
    codebook = np.load(codes_dir / "codebook.npy")
    for meta in ({}, {"tokenizer": "runs/vq/tokenizer.pt"}, {"tokenizer": {"path": 3}}):
        with pytest.raises(ValueError, match="meta.json names no tokenizer; give the tokenizer's path"):
            tokenizers.load_for_codes(meta, codebook)
