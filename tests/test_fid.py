"""fid.py and support/inception.py: the Inception Score and FID on exact answers, the network's layout against the
published weights' shapes, its TensorFlow pools, and the TensorFlow graph's input (TF1's bilinear resize, worked by
hand, and (x - 128) / 128), then fid.py end to end on random weights (8 images at 299 x 299 on the CPU: a few
seconds a forward pass)."""

import json
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fid
from conftest import one_line_error
from support import inception, metrics

# ---- Exact answers ---------------------------------------------------------------------------------------

def test_fid_of_a_sample_set_against_its_own_statistics_is_zero():
    rng = np.random.default_rng(0)
    for n, d in ((500, 64), (8, 256)):  # full rank, and rank-deficient as 8 images' pool_3 features are
        features = rng.gamma(2.0, size=(n, d))
        mu, sigma = metrics.gaussian_fit(features)
        assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def confident(classes, num_classes=inception.CLASSES):
    """Logits whose p(y|x) is one-hot on each sample's class (to e^-50)."""
    return 50 * F.one_hot(torch.as_tensor(classes), num_classes).double()


def test_inception_score_counts_confident_distinct_classes():
    four = confident(torch.arange(40) % 4)  # 4 classes, equally often
    assert fid.inception_score(four)[0] == pytest.approx(4, rel=1e-6)  # one split of 40
    assert fid.inception_score(four, split_size=4) == pytest.approx((4, 0), rel=1e-6)  # 10 splits, one a class each
    assert fid.inception_score(torch.zeros(40, inception.CLASSES)) == pytest.approx((1, 0))  # uniform p(y|x)
    assert fid.inception_score(four[:3], split_size=1) == pytest.approx((1, 0))  # 3 splits of one image: IS 1 each


def test_inception_score_splits_as_adms_evaluator():
    # classes 0, 1, 2, 2, 3 in splits of 2: [0, 1] has IS 2, [2, 2] and the short last split [3] have IS 1:
    # mean 4/3, standard deviation sqrt(((2/3)^2 + 2 (1/3)^2) / 3) = sqrt(2) / 3
    assert fid.inception_score(confident([0, 1, 2, 2, 3]), split_size=2) == pytest.approx((4 / 3, 2 ** 0.5 / 3))
    # 12,000 samples split 5,000, 5,000, 2,000 by default: two classes alternating, then 2,000 of a third
    classes = torch.cat([torch.arange(10_000) % 2, torch.full((2_000,), 5)])
    assert fid.inception_score(confident(classes, 8)) == pytest.approx((5 / 3, 2 ** 0.5 / 3))  # IS 2, 2, 1


# ---- The network: the published weights' layout, TensorFlow's pools, the TensorFlow graph's input --------

# Shapes of the published weights (pytorch-fid loads them strictly into torchvision's Inception3 with
# num_classes=1008 and aux_logits=False; the shapes from torchvision/models/inception.py's layer definitions)
PUBLISHED_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_4.conv.weight": (192, 192, 7, 1),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
# torchvision's Inception_V3_Weights meta "num_params": 27,161,264 with AuxLogits and 1000 classes; less AuxLogits
# (conv0 768 -> 128 1x1, conv1 128 -> 768 5x5, each with BatchNorm, fc 768 -> 1000), plus 8 more classes
PUBLISHED_PARAMETERS = (27_161_264 - (768 * 128 + 2 * 128) - (128 * 768 * 25 + 2 * 768) - (768 * 1000 + 1000)
                        + 8 * (2048 + 1))  # 23,850,960


def test_the_layout_is_the_published_weights():
    model = inception.InceptionV3()
    state = model.state_dict()
    for key, shape in PUBLISHED_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    stored = [k for k in state if not k.endswith("num_batches_tracked")]
    assert len(stored) == 94 * 5 + 2  # 94 BasicConv2d (conv weight, BatchNorm's 4) and fc: no AuxLogits
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS == 23_850_960
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.001}  # BasicConv2d's


def random_weights(seed=0):
    """A state dict in the published layout whose random values keep activations of order 1 (He-normal
    convolutions, BatchNorm near identity), with a large fc bias (the logits must leave it out); without
    num_batches_tracked, as the file converted from TensorFlow."""
    g = torch.Generator().manual_seed(seed)
    state = inception.InceptionV3().state_dict()
    for key, v in state.items():
        if key.endswith("conv.weight"):
            v.normal_(0, (2 / v[0].numel()) ** 0.5, generator=g)
        elif key.endswith(("running_mean", "bn.bias")):
            v.normal_(0, 0.1, generator=g)
        elif key.endswith("running_var"):
            v.uniform_(0.5, 2, generator=g)
        elif key.startswith("fc."):
            v.normal_(0, 0.05 if key == "fc.weight" else 10, generator=g)
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def tf_mean_pool(x):
    """The 3x3 mean over the pixels inside the image (TensorFlow's SAME average pool), as sum / count."""
    return F.avg_pool2d(x, 3, 1, 1) / F.avg_pool2d(torch.ones_like(x), 3, 1, 1)


# block: (its input channels, its pool branch's channels, the pool before the branch's 1x1 convolution, or None
# where the pool is the branch); from torchvision's Inception3 and pytorch-fid's FID blocks
POOL_BRANCHES = {
    "Mixed_5b": (192, 32, tf_mean_pool), "Mixed_5c": (256, 64, tf_mean_pool), "Mixed_5d": (288, 64, tf_mean_pool),
    "Mixed_6a": (288, 288, None),
    **{f"Mixed_6{b}": (768, 192, tf_mean_pool) for b in "bcde"},
    "Mixed_7a": (768, 768, None),
    "Mixed_7b": (1280, 192, tf_mean_pool),
    "Mixed_7c": (2048, 192, lambda x: F.max_pool2d(x, 3, 1, 1)),  # FIDInceptionE_2: max, not average
}


@torch.no_grad()
def test_the_pool_branches_are_tensorflows():
    model = inception.InceptionV3().eval()
    model.load_state_dict(random_weights())
    for name, (in_channels, channels, pool) in POOL_BRANCHES.items():
        block, x = getattr(model, name), torch.rand(2, in_channels, 9, 9)
        expected = F.max_pool2d(x, 3, 2) if pool is None else block.branch_pool(pool(x))
        torch.testing.assert_close(block(x)[:, -channels:], expected, msg=name)


def test_the_resize_is_tensorflow_1s_bilinear_worked_by_hand():
    image = torch.tensor([[0.0, 50, 100], [200, 150, 250]])[None, None]  # (1, 1, 2, 3)
    # width 3 -> 5: output column j samples s = j * 3/5 = 0, 0.6, 1.2, 1.8, 2.4, between x0 = floor(s) and
    # x1 = min(x0 + 1, 2); e.g. input row 1 gives 200 + (150 - 200) * 0.6 = 170 at j = 1, 250 at j = 4 (x0 = x1).
    # Height 2 -> 4: output row i samples i * 2/4 = 0, 0.5, 1, 1.5: output row 1 is the mean of the two input rows,
    # e.g. (30 + 170) / 2 = 100 at j = 1, and output row 3 repeats the last input row (x0 = x1 = 1).
    expected = torch.tensor([[0.0, 30, 60, 90, 100],
                             [100, 100, 115, 160, 175],
                             [200, 170, 170, 230, 250],
                             [200, 170, 170, 230, 250]])
    torch.testing.assert_close(inception.resize_bilinear_tf1(image, (4, 5))[0, 0], expected, atol=1e-4, rtol=0)
    # one row: 2 -> 5 samples 0, 0.4, 0.8, 1.2, 1.6 (PyTorch's half-pixel centres would give 0, 10, 50, 90, 100);
    # 5 -> 2 samples 0 and 2.5 (PyTorch: 0.75 and 3.25, so 7.5 and 32.5)
    row = inception.resize_bilinear_tf1(torch.tensor([[[[0.0, 100]]]]), (1, 5))
    torch.testing.assert_close(row.flatten(), torch.tensor([0.0, 40, 80, 100, 100]), atol=1e-4, rtol=0)
    row = inception.resize_bilinear_tf1(torch.tensor([[[[0.0, 10, 20, 30, 40]]]]), (1, 2))
    torch.testing.assert_close(row.flatten(), torch.tensor([0.0, 25]), atol=1e-4, rtol=0)


def test_preprocess_is_the_tensorflow_graphs_input():
    ramp = torch.arange(256, dtype=torch.uint8).expand(256, 256)  # pixel (r, c) = c
    x = inception.preprocess(torch.stack([ramp, ramp.T, ramp], -1)[None])  # (1, 3, 299, 299)
    # on a ramp the resize returns the sample point s = i * 256/299 itself, up to the last pixel, 255
    source = (torch.arange(299) * (256 / 299)).clamp(max=255)
    torch.testing.assert_close(x[0, 0], ((source - 128) / 128).expand(299, 299), atol=1e-5, rtol=0)
    torch.testing.assert_close(x[0, 1], ((source - 128) / 128)[:, None].expand(299, 299), atol=1e-5, rtol=0)
    extremes = inception.preprocess(torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 64, 64, 3))
    torch.testing.assert_close(extremes, torch.tensor([-1.0, 127 / 128]).view(2, 1, 1, 1).expand(2, 3, 299, 299))
    images = torch.randint(0, 256, (2, 299, 299, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(inception.preprocess(images), (images.permute(0, 3, 1, 2).float() - 128) / 128)  # no resize


# ---- fid.py end to end, on random weights ----------------------------------------------------------------

def random_images(rng, n):
    """Noise around a random colour per image, so that the images' features differ."""
    base = rng.integers(0, 256, (n, 1, 1, 3))
    return np.clip(base + rng.normal(0, 40, (n, 256, 256, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Random weights in a file, 8 images A in samples.npz, and their features, logits and Mixed_7c map from
    one forward pass of the network as inception.load gives it."""
    d = tmp_path_factory.mktemp("fid")
    weights = d / inception.WEIGHTS_FILE
    torch.save(random_weights(), weights)
    rng = np.random.default_rng(0)
    a, b = random_images(rng, 8), random_images(rng, 8)
    np.savez(d / "samples.npz", arr_0=a)
    model = inception.load(str(weights))
    seen = {}
    model.Mixed_7c.register_forward_hook(lambda module, inputs, output: seen.update(mixed_7c=output))
    with torch.no_grad():
        features, logits = model(torch.from_numpy(a))
    return types.SimpleNamespace(dir=d, weights=weights, samples=d / "samples.npz", a=a, b=b, model=model,
                                 features=features.double().numpy(), logits=logits, mixed_7c=seen["mixed_7c"])


def test_the_outputs_are_pool_3_and_the_logits_without_bias(setup):
    assert setup.features.shape == (8, 2048) and setup.logits.shape == (8, 1008)
    assert setup.mixed_7c.shape == (8, 2048, 8, 8)
    np.testing.assert_allclose(setup.features, setup.mixed_7c.mean((2, 3)).double().numpy(), rtol=1e-5)
    weight = setup.model.fc.weight
    torch.testing.assert_close(setup.logits, torch.from_numpy(setup.features).float() @ weight.T)
    assert setup.model.fc.bias.abs().mean() > 1  # a bias included would move the logits by this much


def run_fid(monkeypatch, argv, out):
    """fid.main(argv) with the Frechet distance recorded, not computed (in 2048 dimensions it costs ~10 s of CPU
    here; tests/test_evaluate.py and the first test above check it): (metrics.json, [(mu, sigma of the samples,
    mu, sigma of the reference)])."""
    calls = []
    monkeypatch.setattr(fid, "frechet_distance", lambda *stats: calls.append(stats) or 12.5)
    fid.main([str(a) for a in argv])
    result = json.loads((out / "metrics.json").read_text())
    assert {"fid", "inception_score", "inception_score_std", "num_samples"} <= set(result) and result["fid"] == 12.5
    assert np.isfinite(result["inception_score"]) and result["inception_score"] >= 1 - 1e-9
    return result, calls


def assert_fit(mu, sigma, features):
    """mu, sigma are the Gaussian fit of these features, to float32 round-off (a batch of 3 or 8 images)."""
    expected_mu, expected_sigma = metrics.gaussian_fit(features)
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-4, atol=1e-6 * np.abs(expected_mu).max())
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-3, atol=1e-4 * np.abs(expected_sigma).max())


def test_fid_uses_the_stored_statistics_of_the_reference(setup, monkeypatch):
    mu, sigma = metrics.gaussian_fit(setup.features)
    reference = setup.dir / "ref-stats.npz"
    np.savez(reference, mu=mu + 1, sigma=sigma, arr_0=setup.b)  # the images B must not be used
    out = setup.dir / "out-stats"
    result, calls = run_fid(monkeypatch, ["--samples", setup.samples, "--reference", reference, "--inception",
                                          setup.weights, "--batch-size", "3", "--out", out], out)
    assert result["num_samples"] == 8 and result["reference_statistics"] == "stored mu and sigma"
    assert result["inception_score_splits"] == 1  # 8 samples: one split, shorter than 5,000
    (mu_samples, sigma_samples, mu_ref, sigma_ref), = calls
    assert_fit(mu_samples, sigma_samples, setup.features)  # in batches of 3 as in one of 8
    assert np.array_equal(mu_ref, mu + 1) and np.array_equal(sigma_ref, sigma)


def test_fid_of_samples_against_their_own_images_is_zero(setup, monkeypatch):
    np.savez(setup.dir / "four.npz", arr_0=setup.a[:4])
    np.savez(setup.dir / "ref-images.npz", arr_0=setup.a[:4])  # no mu, sigma: computed from arr_0
    result, calls = run_fid(monkeypatch, ["--samples", setup.dir / "four.npz", "--reference",
                                          setup.dir / "ref-images.npz", "--inception", setup.weights],
                            setup.dir)  # metrics.json beside the samples
    assert result["reference_statistics"] == "computed from its 4 images" and result["num_samples"] == 4
    (mu_samples, sigma_samples, mu_ref, sigma_ref), = calls  # the same fit twice, so FID 0
    assert_fit(mu_samples, sigma_samples, setup.features[:4])
    assert_fit(mu_ref, sigma_ref, setup.features[:4])


def test_each_missing_or_foreign_file_is_one_line(setup, capsys, tmp_path):
    args = dict(samples=setup.samples, reference=setup.samples, inception=setup.weights)
    for flag, published in (("samples", "sample.py"), ("reference", fid.REFERENCE_URL),
                            ("inception", inception.WEIGHTS_URL)):
        argv = [a for k, v in {**args, flag: tmp_path / "absent"}.items() for a in (f"--{k}", v)]
        line = one_line_error(capsys, fid.main, argv + ["--out", tmp_path])
        assert str(tmp_path / "absent") in line and published in line
    broken = {**torch.load(setup.weights), "Mixed_6b.branch1x1.conv.weight": torch.zeros(192, 768, 3, 3)}
    torch.save(broken, tmp_path / "broken.pth")
    line = one_line_error(capsys, fid.main, ["--samples", setup.samples, "--reference", setup.samples,
                                             "--inception", tmp_path / "broken.pth", "--out", tmp_path])
    assert "Mixed_6b.branch1x1.conv.weight has shape (192, 768, 3, 3)" in line and inception.WEIGHTS_URL in line
    np.savez(tmp_path / "no-images.npz", labels=np.zeros(3))
    line = one_line_error(capsys, fid.main, ["--samples", tmp_path / "no-images.npz", "--reference", setup.samples,
                                             "--inception", setup.weights, "--out", tmp_path])
    assert "no arr_0" in line
