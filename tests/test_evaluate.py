"""evaluate.py: the Frechet distance and coverage on exact answers, then the metrics of real Fashion-MNIST images
scored by a classifier trained on a slice of the training split."""

import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch

import evaluate
from conftest import FASHION_MNIST, fake_mnist, fill_the_disk, one_line_error, run_cli
from support import datasets, lenet, metrics, tokenizers

# ---- Frechet distance and coverage on exact answers ------------------------------------------------------

def _random_covariance(rng, d):
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d)


def test_frechet_distance_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=64), _random_covariance(rng, 64)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_of_shifted_identities_is_the_squared_shift():
    m = np.arange(1.0, 6.0)
    assert metrics.frechet_distance(np.zeros(5), np.eye(5), m, np.eye(5)) == pytest.approx(m @ m, abs=1e-9)


def test_frechet_distance_of_diagonal_gaussians_has_a_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2, s1, s2 = rng.normal(size=8), rng.normal(size=8), rng.uniform(0, 3, 8), rng.uniform(0, 3, 8)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(exact, rel=1e-10)


def test_frechet_distance_agrees_with_sqrtm_of_the_product():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = _random_covariance(rng, 16), _random_covariance(rng, 16)
    usual = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(usual, rel=1e-8)


def test_coverage_counts_the_real_balls_that_hold_a_sample():
    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])  # k = 1: radii 1, 1, 1, 1, 7
    assert metrics.coverage(real, [[2.5]], k=1) == pytest.approx(2 / 5)  # the balls of 2 and 3
    assert metrics.coverage(real, [[10.0]], k=1) == pytest.approx(1 / 5)  # the ball of 10 only
    assert metrics.coverage(real, [[4.0]], k=1) == pytest.approx(2 / 5)  # on 3's boundary, inside 10's ball
    assert metrics.coverage(real, [[-1.0]], k=1) == pytest.approx(1 / 5)  # on 0's boundary
    assert metrics.coverage(real, real, k=1) == 1.0
    assert metrics.coverage(real, np.zeros((0, 1)), k=1) == 0.0
    with pytest.raises(ValueError, match="more than 5 real points"):
        metrics.coverage(real, real)


# ---- The classifier and its cache ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A classifier trained for 2 epochs on 6,000 training images: (path, info)."""
    path = str(tmp_path_factory.mktemp("classifier") / "classifier.pt")
    lenet.load_classifier("fashion-mnist", FASHION_MNIST, path, limit=6000, epochs=2)
    _, info = lenet.load_classifier("fashion-mnist", FASHION_MNIST, path)
    return path, info


@pytest.fixture(scope="module")
def test_split():
    return datasets.load_mnist("fashion-mnist", FASHION_MNIST, "test")


def test_classifier_is_cached_and_well_above_chance(classifier, tmp_path):
    path, info = classifier
    assert info["dataset"] == "fashion-mnist" and info["train_images"] == 6000 and info["epochs"] == 2
    assert info["test_accuracy"] > 0.75  # chance is 0.10
    assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp" in f]
    mtime = os.stat(path).st_mtime_ns
    _, again = lenet.load_classifier("fashion-mnist", FASHION_MNIST, path)
    assert again == info and os.stat(path).st_mtime_ns == mtime  # read back, not trained again


def test_classifier_training_repeats_exactly():
    first, info1 = lenet.train_classifier("fashion-mnist", FASHION_MNIST, epochs=1, limit=256)
    state = torch.get_rng_state()
    second, info2 = lenet.train_classifier("fashion-mnist", FASHION_MNIST, epochs=1, limit=256)
    assert torch.equal(state, torch.get_rng_state())  # the caller's random state is left alone
    assert info1["test_accuracy"] == info2["test_accuracy"]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_bad_classifier_files_are_errors_not_retrained(classifier, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pt: not a readable PyTorch file.*a classifier file.*delete it"):
        lenet.load_classifier("fashion-mnist", FASHION_MNIST, str(broken))
    with pytest.raises(ValueError, match="a classifier of fashion-mnist, not of mnist"):
        lenet.load_classifier("mnist", FASHION_MNIST, classifier[0])
    record = torch.load(classifier[0], weights_only=True)
    record["model"]["head.weight"] = torch.zeros(3, 128)
    torch.save(record, tmp_path / "misfit.pt")
    with pytest.raises(ValueError, match="misfit.pt: its weights do not fit the classifier.*delete it"):
        lenet.load_classifier("fashion-mnist", FASHION_MNIST, str(tmp_path / "misfit.pt"))


def test_default_classifier_path_honours_xdg_cache_home(monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert lenet.default_classifier_path("mnist") == "/somewhere/purrception/classifier-mnist.pt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    expected = os.path.expanduser("~/.cache/purrception/classifier-fashion-mnist.pt")
    assert lenet.default_classifier_path("fashion-mnist") == expected


# ---- Metrics of real and degenerate image sets -----------------------------------------------------------

def test_the_test_split_against_itself(classifier, test_split):
    path, info = classifier
    images, labels = test_split
    m = evaluate.evaluate_images(images[..., None], labels, "fashion-mnist", FASHION_MNIST, path)
    assert abs(m["fid"]) < 1e-6
    assert m["coverage"] == 1.0 and m["coverage_per_class"] == [1.0] * 10
    assert m["accuracy"] == info["test_accuracy"]
    assert sum(m["class_histogram"]) == 10000 and m["num_samples"] == 10000
    assert m["class_names"] == datasets.CLASS_NAMES["fashion-mnist"]
    json.dumps(m)  # JSON-ready


def test_constant_images_cover_nothing(classifier, test_split):
    images = np.zeros((200, 28, 28, 1), dtype=np.uint8)
    labels = np.arange(10).repeat(20)
    m = evaluate.evaluate_images(images, labels, "fashion-mnist", FASHION_MNIST, classifier[0])
    assert m["coverage"] < 0.01 and m["fid"] > 10
    assert max(m["class_histogram"]) == 200  # every image gets the same prediction


def test_real_training_images_without_labels(classifier, test_split):
    images, labels = datasets.load_mnist("fashion-mnist", FASHION_MNIST, "train")
    m = evaluate.evaluate_images(images[-2000:, :, :, None], None, "fashion-mnist", FASHION_MNIST, classifier[0])
    constant = evaluate.evaluate_images(np.zeros((2000, 28, 28, 1), np.uint8), None, "fashion-mnist",
                                        FASHION_MNIST, classifier[0])
    assert m["accuracy"] is None and m["accuracy_per_class"] == [None] * 10
    assert m["samples_grouped_by"] == "predicted class"
    assert m["fid"] < constant["fid"] / 20
    assert m["coverage"] > 0.5 > constant["coverage"]


def test_coverage_per_class_is_that_of_each_class_real_and_sampled_features(classifier, test_split):
    """evaluate_images keeps each class's ball radii between calls; its scores are metrics.coverage's, from
    scratch, of that class's real features and the samples grouped under it."""
    images, labels = test_split
    model, _ = lenet.load_classifier("fashion-mnist", FASHION_MNIST, classifier[0])
    train, train_labels = datasets.load_mnist("fashion-mnist", FASHION_MNIST, "train")
    real, _ = lenet.extract(model, images)
    fake, _ = lenet.extract(model, train[:300])
    for shift in (0, 1):  # samples conditioned on their own class, then on the next: other balls, other scores
        conditioned = (train_labels[:300] + shift) % 10
        m = evaluate.evaluate_images(train[:300, :, :, None], conditioned, "fashion-mnist", FASHION_MNIST,
                                     classifier[0])
        assert m["coverage_per_class"] == [metrics.coverage(real[labels == c], fake[conditioned == c])
                                           for c in range(10)]


def test_the_fid_floor_is_that_of_as_many_real_training_images(classifier, test_split):
    """fid_floor: FID-LeNet of the first n training images against the test split, by the same classifier."""
    images, labels = test_split
    model, _ = lenet.load_classifier("fashion-mnist", FASHION_MNIST, classifier[0])
    train, _ = datasets.load_mnist("fashion-mnist", FASHION_MNIST, "train")
    test_fit = metrics.gaussian_fit(lenet.extract(model, images)[0])
    floors = []
    for n in (40, 3000):
        m = evaluate.evaluate_images(images[-n:, :, :, None], labels[-n:], "fashion-mnist", FASHION_MNIST,
                                     classifier[0])
        floor = metrics.frechet_distance(*metrics.gaussian_fit(lenet.extract(model, train[:n])[0]), *test_fit)
        assert m["fid_floor"] == pytest.approx(floor, rel=1e-9) and m["fid_floor_images"] == n
        assert m["fid_floor"] > 0.5 * m["fid"]  # real test images: their FID-LeNet is about the floor
        floors.append(m["fid_floor"])
    assert floors[1] < floors[0] / 5  # the floor falls with n


@pytest.mark.parametrize("images,labels,message", [
    (np.zeros((4, 32, 32, 3), np.uint8), None, r"expected MNIST-sized uint8 images .* got uint8 \(4, 32, 32, 3\)"),
    (np.zeros((4, 28, 28, 1), np.float32), None, "got float32"),
    (np.zeros((1, 28, 28, 1), np.uint8), None, "FID needs at least 2"),
    (np.zeros((4, 28, 28, 1), np.uint8), np.zeros(3, np.int64), "expected 4 integer labels"),
    (np.zeros((4, 28, 28, 1), np.uint8), np.array([0, 1, 2, 10]), r"labels must lie in \[0, 10\)"),
])
def test_bad_images_are_value_errors(images, labels, message):
    with pytest.raises(ValueError, match=message):
        evaluate.evaluate_images(images, labels, "fashion-mnist", FASHION_MNIST)


# ---- The tokenizer ceiling, with stand-in tokenizers -----------------------------------------------------

class IdentityTokenizer:
    """Codes are the images themselves: its reconstructions are exact."""

    def encode(self, x):
        assert x.shape[1:] == (1, 28, 28) and x.min() >= -1 and x.max() <= 1
        return x

    def decode(self, codes):
        return codes


class BlockTokenizer:
    """A 7 x 7 grid of 4 grey levels: each 4 x 4 block becomes its quantized mean."""

    def encode(self, x):
        means = torch.nn.functional.avg_pool2d(x, 4)[:, 0]  # (B, 7, 7)
        return ((means + 1) / 2 * 3).round().long()

    def decode(self, codes):
        grey = codes.float() / 3 * 2 - 1  # (B, 7, 7)
        return grey[:, None].repeat_interleave(4, 2).repeat_interleave(4, 3)  # (B, 1, 28, 28)


def test_reference_of_an_exact_tokenizer_is_the_test_split(classifier):
    path, info = classifier
    m = evaluate.reference_metrics(IdentityTokenizer(), "fashion-mnist", FASHION_MNIST, path)
    assert abs(m["fid"]) < 1e-6 and m["coverage"] == 1.0 and m["accuracy"] == info["test_accuracy"]
    assert m["reference"] == "VQ reconstructions of the test split" and m["num_samples"] == 10000


# ---- Command line ----------------------------------------------------------------------------------------

def _write_samples(path, images, labels=None, key="arr_0"):
    extra = {} if labels is None else dict(labels=labels)
    np.savez(path, **{key: images}, settings=json.dumps({"steps": 1}), **extra)
    return str(path)


def test_cli_scores_samples_and_a_tokenizer(classifier, test_split, tmp_path, monkeypatch, capsys):
    images, labels = test_split
    npz = _write_samples(tmp_path / "samples.npz", images[:500, :, :, None], labels[:500])
    monkeypatch.setattr(tokenizers, "load", lambda path: BlockTokenizer())
    (tmp_path / "tokenizer.pt").write_bytes(b"")
    evaluate.main(["--samples", npz, "--dataset", "fashion-mnist", "--data-dir", FASHION_MNIST,
                   "--classifier", classifier[0], "--reference-tokenizer", str(tmp_path / "tokenizer.pt")])
    out = capsys.readouterr().out
    assert "FID-LeNet" in out and "coverage (mean)" in out and "Sneaker" in out and "tokenizer" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_samples"] == 500 and metrics["samples"] == npz
    blocky = metrics["reference"]
    assert blocky["num_samples"] == 10000 and blocky["tokenizer"] == str(tmp_path / "tokenizer.pt")
    assert blocky["fid"] > 1 and blocky["coverage"] < 0.9 and blocky["accuracy"] < classifier[1]["test_accuracy"]

    evaluate.main(["--reference-tokenizer", str(tmp_path / "tokenizer.pt"), "--dataset", "fashion-mnist",
                   "--data-dir", FASHION_MNIST, "--classifier", classifier[0]])
    assert json.loads((tmp_path / "reference-metrics.json").read_text())["fid"] == metrics["reference"]["fid"]


def test_cli_warns_where_the_floor_is_more_than_half_the_fid(classifier, test_split, tmp_path, capsys):
    """30 real test images score about their floor: the table shows it, metrics.json records it, one line on stderr
    warns; 2,000 constant images score far above it: no warning."""
    images, labels = test_split
    npz = _write_samples(tmp_path / "samples.npz", images[:30, :, :, None], labels[:30])
    argv = ["--samples", npz, "--dataset", "fashion-mnist", "--data-dir", FASHION_MNIST, "--classifier", classifier[0]]
    evaluate.main(argv)
    out, err = capsys.readouterr()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["fid_floor_images"] == 30 and 0.5 * saved["fid"] < saved["fid_floor"]
    assert f"| FID-LeNet floor | {saved['fid_floor']:.3f} |" in out
    lines = [line for line in err.splitlines() if line.startswith("warning: samples:")]
    assert len(lines) == 1 and "at 30 images FID-LeNet is mostly sampling noise" in lines[0]
    _write_samples(tmp_path / "samples.npz", np.zeros((2000, 28, 28, 1), np.uint8))
    evaluate.main(argv)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["fid_floor"] < 0.5 * saved["fid"] and "warning" not in capsys.readouterr().err


def test_cli_scores_unconditional_samples_into_out(classifier, test_split, tmp_path, capsys):
    npz = _write_samples(tmp_path / "samples.npz", test_split[0][:300, :, :, None])
    evaluate.main(["--samples", npz, "--dataset", "fashion-mnist", "--data-dir", FASHION_MNIST,
                   "--classifier", classifier[0], "--out", str(tmp_path / "m.json")])
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["accuracy"] is None and "predicted class" in capsys.readouterr().out


def test_cli_on_a_missing_file_prints_one_line_and_exits_2(tmp_path):
    code, out, err = run_cli("evaluate.py", "--samples", tmp_path / "nope.npz", "--dataset", "fashion-mnist",
                             "--data-dir", FASHION_MNIST)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [f"error: {tmp_path / 'nope.npz'}: no such file (expected the samples.npz "
                                        f"of sample.py)"]


@pytest.mark.parametrize("case,message", [
    ("no arr_0", "no array 'arr_0' (found: images, settings)"),
    ("wrong shape", "expected MNIST-sized uint8 images (N, 28, 28, 1), got uint8 (4, 32, 32, 3)"),
    ("not an npz", "samples.npz: not a readable .npz file"),
    ("a single array", "samples.npz: not a readable .npz file (not a zip archive of arrays)"),
    ("truncated npz", "samples.npz: not a readable .npz file (File is not a zip file)"),
    ("damaged npz", "samples.npz: not a readable .npz file (Bad CRC-32 for file 'arr_0.npy')"),
    ("a directory", "samples.npz: a directory (expected the samples.npz of sample.py)"),
    ("a tokenizer", "samples.npz: no array 'arr_0' (found: samples/"),
    ("wrong data dir", "nowhere: no such directory"),
    ("broken classifier", "c.pt: not a readable PyTorch file"),
    ("missing tokenizer", "none.pt: no such file; expected a tokenizer written by `python tokenizer.py train`"),
])
def test_cli_bad_inputs_are_one_line_errors(case, message, tmp_path, capsys):
    npz = tmp_path / "samples.npz"
    args = ["--samples", str(npz), "--dataset", "fashion-mnist", "--data-dir", FASHION_MNIST]
    _write_samples(npz, np.zeros((4, 28, 28, 1), np.uint8))
    if case == "no arr_0":
        _write_samples(npz, np.zeros((4, 28, 28, 1), np.uint8), key="images")
    elif case == "wrong shape":
        _write_samples(npz, np.zeros((4, 32, 32, 3), np.uint8))
    elif case == "not an npz":
        npz.write_text("hello")
    elif case == "a single array":
        with open(npz, "wb") as f:
            np.save(f, np.zeros((4, 28, 28, 1), np.uint8))
    elif case == "truncated npz":
        npz.write_bytes(npz.read_bytes()[:300])
    elif case == "damaged npz":
        raw = bytearray(npz.read_bytes())
        raw[200:240] = b"\xff" * 40  # inside arr_0's data
        npz.write_bytes(bytes(raw))
    elif case == "a directory":
        os.remove(npz)
        npz.mkdir()
    elif case == "a tokenizer":
        torch.save({"kind": "mnist-vq", "model": {f"w{i}": torch.zeros(1) for i in range(20)}}, npz)
    elif case == "wrong data dir":
        args[-1] = str(tmp_path / "nowhere")
    elif case == "broken classifier":
        (tmp_path / "c.pt").write_bytes(b"\x00" * 10)
        args += ["--classifier", str(tmp_path / "c.pt")]
    elif case == "missing tokenizer":
        args = args[2:] + ["--reference-tokenizer", str(tmp_path / "none.pt")]
    with pytest.raises(SystemExit) as e:
        evaluate.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert len(err[0]) < 400  # a line a reader takes in, even for an archive of many arrays


@pytest.mark.parametrize("case,message", [
    ("out is a directory", "--out {tmp}/dir.json: a directory; expected the name of a .json file"),
    ("out is a tokenizer", "--out {tmp}/tokenizer.pt: expected the name of a .json file"),
    ("out under a file", "{tmp}/file: exists and is not a directory"),
    ("classifier under a file", "{tmp}/file: exists and is not a directory"),
    ("classifier is a directory", "{tmp}/dir.json: a directory; expected a classifier file of evaluate.py"),
])
def test_outputs_are_checked_before_the_work(case, message, classifier, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "tokenizer.pt").write_text("a tokenizer")
    (tmp_path / "dir.json").mkdir()
    npz = _write_samples(tmp_path / "samples.npz", np.zeros((4, 28, 28, 1), np.uint8))
    args = ["--samples", npz, "--dataset", "fashion-mnist", "--data-dir", FASHION_MNIST, "--classifier",
            classifier[0]]
    args += {"out is a directory": ["--out", str(tmp_path / "dir.json")],
             "out is a tokenizer": ["--out", str(tmp_path / "tokenizer.pt")],
             "out under a file": ["--out", str(tmp_path / "file" / "m.json")],
             "classifier under a file": ["--classifier", str(tmp_path / "file" / "c.pt")],
             "classifier is a directory": ["--classifier", str(tmp_path / "dir.json")]}[case]
    monkeypatch.setattr(lenet, "train_classifier", lambda *a, **k: pytest.fail("trained before checking"))
    monkeypatch.setattr(evaluate, "extract", lambda *a, **k: pytest.fail("scored before checking"))
    with pytest.raises(SystemExit) as e:
        evaluate.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message.format(tmp=tmp_path) in err[0]
    assert (tmp_path / "file").read_text() == "mine" and (tmp_path / "tokenizer.pt").read_text() == "a tokenizer"
    assert sorted(os.listdir(tmp_path)) == ["dir.json", "file", "samples.npz", "tokenizer.pt"]


def test_a_full_disk_is_one_line_and_leaves_the_old_metrics(classifier, test_split, tmp_path, monkeypatch, capsys):
    npz = _write_samples(tmp_path / "samples.npz", test_split[0][:50, :, :, None], test_split[1][:50])
    (tmp_path / "metrics.json").write_text('{"fid": 1.0}\n')
    fill_the_disk(monkeypatch)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--samples", npz, "--dataset", "fashion-mnist", "--data-dir", FASHION_MNIST,
                       "--classifier", classifier[0]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        f"error: {tmp_path / 'metrics.json'}: No space left on device"]
    assert (tmp_path / "metrics.json").read_text() == '{"fid": 1.0}\n' and not list(tmp_path.glob("*.tmp"))


# ---- The data a classifier and samples come from ---------------------------------------------------------

def _changed_record(classifier, path, **changes):
    """A copy of the module's classifier file at `path` with some entries changed (None: removed)."""
    record = torch.load(classifier[0], weights_only=True)
    for key, value in changes.items():
        if value is None:
            del record[key]
        else:
            record[key] = value
    torch.save(record, path)
    return path


def test_the_classifier_records_its_data(classifier):
    known = datasets.KNOWN_MD5["fashion-mnist"]
    assert classifier[1]["data"] == {"dataset": "fashion-mnist", "train_images_md5": known["train-images-idx3-ubyte"],
                                     "test_images_md5": known["t10k-images-idx3-ubyte"]}


def test_a_classifier_of_fashion_mnist_images_refuses_to_score_mnist(classifier, tmp_path, monkeypatch, capsys):
    """A classifier-mnist.pt whose record names Fashion-MNIST's files, against MNIST's: one line, and nothing is
    trained or written."""
    data_dir = fake_mnist(tmp_path / "mnist", monkeypatch)
    path = _changed_record(classifier, tmp_path / "classifier-mnist.pt", dataset="mnist")
    npz = _write_samples(tmp_path / "samples.npz", np.zeros((4, 28, 28, 1), np.uint8))
    before = path.read_bytes()
    monkeypatch.setattr(lenet, "train_classifier", lambda *a, **k: pytest.fail("trained a new classifier"))
    line = one_line_error(capsys, evaluate.main, ["--samples", npz, "--dataset", "mnist", "--data-dir", data_dir,
                                                  "--classifier", path])
    assert line == (f"error: {path} was trained on Fashion-MNIST's images, not MNIST's; delete it to train a new one, "
                    f"or pass another --classifier")
    assert path.read_bytes() == before and not (tmp_path / "metrics.json").exists()


def test_the_classifier_refuses_a_test_split_it_was_not_tested_on(classifier, tmp_path):
    for stem in datasets.MNIST_FILES["test"]:  # Fashion-MNIST's test split, one pixel changed
        raw = bytearray(datasets._read_bytes(datasets._find(FASHION_MNIST, stem)))
        if "images" in stem:
            raw[1000] ^= 0xFF
        (tmp_path / stem).write_bytes(bytes(raw))
    changed = datasets.md5((tmp_path / "t10k-images-idx3-ubyte").read_bytes())
    recorded = datasets.KNOWN_MD5["fashion-mnist"]["t10k-images-idx3-ubyte"]
    with pytest.raises(ValueError) as e:
        lenet.load_classifier("fashion-mnist", str(tmp_path), classifier[0])
    assert str(e.value) == (f"{classifier[0]} was trained on other images than those in {tmp_path} (test images MD5 "
                            f"{recorded}, not {changed}); delete it to train a new one, or pass another --classifier")


def test_a_classifier_without_a_data_record_is_refused(classifier, tmp_path):
    unknown = _changed_record(classifier, tmp_path / "unknown.pt", data=None)
    with pytest.raises(ValueError, match=r"unknown.pt: no record of the data it was trained on; delete it"):
        lenet.load_classifier("fashion-mnist", FASHION_MNIST, str(unknown))


@pytest.mark.parametrize("origin,where", [
    ("settings", "{npz} (its settings)"),
    ("data", "{npz} (its settings)"),
    ("known images", "{npz} (its settings)"),
])
def test_samples_of_a_flow_of_another_dataset_are_refused_before_any_work(origin, where, tmp_path, monkeypatch,
                                                                          capsys):
    mnist_train = datasets.KNOWN_MD5["mnist"]["train-images-idx3-ubyte"]
    settings = {"settings": {"dataset": "mnist"},
                "data": {"data": {"dataset": "mnist", "split": "train", "images_md5": mnist_train}},
                "known images": {"dataset": "fashion-mnist", "data": {"images_md5": mnist_train}}}[origin]
    npz = tmp_path / "samples.npz"
    np.savez(npz, arr_0=np.zeros((4, 28, 28, 1), np.uint8), settings=json.dumps(settings))
    monkeypatch.setattr(lenet, "train_classifier", lambda *a, **k: pytest.fail("trained before checking"))
    line = one_line_error(capsys, evaluate.main, ["--samples", npz, "--dataset", "fashion-mnist", "--data-dir",
                                                  tmp_path / "data", "--classifier", tmp_path / "c.pt"])
    assert line == (f"error: {npz}: samples of a flow trained on mnist codes ({where.format(npz=npz)}), "
                    f"not fashion-mnist's; score them with --dataset mnist and its --data-dir")
    assert sorted(os.listdir(tmp_path)) == ["samples.npz"]


def test_samples_that_do_not_say_their_dataset_are_scored(tmp_path):
    npz = tmp_path / "samples.npz"
    for settings in ({"ckpt": str(tmp_path / "last.pt"), "step": 40}, {"steps": 1}):
        np.savez(npz, arr_0=np.zeros((4, 28, 28, 1), np.uint8), settings=json.dumps(settings))
        assert evaluate.samples_origin(npz) is None
    np.savez(npz, arr_0=np.zeros((4, 28, 28, 1), np.uint8))  # no settings at all
    assert evaluate.samples_origin(npz) is None
    np.savez(npz, arr_0=np.zeros((4, 28, 28, 1), np.uint8), settings=json.dumps({"dataset": "fashion-mnist"}))
    evaluate.check_samples_dataset(npz, "fashion-mnist")  # the same dataset: no error
