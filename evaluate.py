"""
Score generated MNIST-sized images: classifier accuracy, FID-LeNet and per-class coverage.

    python evaluate.py --samples runs/fmnist-samples/samples.npz --dataset fashion-mnist \\
        --data-dir /usr/share/datasets/fashion-mnist
    python evaluate.py ... --reference-tokenizer runs/fmnist-vq/tokenizer.pt   # adds the tokenizer's ceiling

FID proper needs Inception weights and 299 x 299 colour images; on MNIST and Fashion-MNIST the usual stand-in
is a small classifier trained on the dataset itself. Here a LeNet-style CNN is trained once on the training
split (5 epochs, seed 0, on the CPU: about 2 min of CPU time, less on several cores; 91.3-91.5 % test accuracy
on Fashion-MNIST, ~99 % expected on MNIST) and cached at ~/.cache/purrception/classifier-{dataset}.pt
($XDG_CACHE_HOME is honoured; --classifier picks another file). The seed fixes the network up to the last
digits of floating point, which vary with the CPU and its thread count: the cached file, not the seed, defines
the metric, and 1,000 real training images score FID-LeNet 2.46 and 2.49 under two such networks.
Against the real TEST split it gives:

  accuracy         the fraction of samples it assigns to the class they were conditioned on;
  fid              FID-LeNet: the Frechet distance between Gaussian fits of its 128-d penultimate features
                   (after the ReLU) of the samples and of the test split;
  coverage         per class (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative
                   Models"): the fraction of real test images of the class whose ball out to their 5th
                   nearest real neighbour (in feature space, within the class) holds at least one sample of
                   the class, and the mean over classes;
  class_histogram  how many samples it puts in each class.

Both FID and coverage depend on the number of samples: real Fashion-MNIST training images score FID-LeNet
2.9 +- 0.6 and coverage 0.38 by 1,000 (8 random draws), 0.47 and 0.97 by 10,000. Compare sets of equal size.
Samples belong to the class they were conditioned on (the .npz's `labels`), or to their predicted class when
the .npz has none; `accuracy` is then absent. FID-LeNet values are comparable only between runs scored by the
same classifier file, and not at all with Inception FID: metrics.json records the classifier and its test
accuracy. A cache file that is unreadable or made for another dataset is an error, never silently replaced:
delete it to retrain.

The reconstructions of the test split through a VQ tokenizer (--reference-tokenizer) are the ceiling of any
flow over its codes: a flow can at best reproduce the tokenizer's codes of real images.
"""

import functools
import os
import sys
import time
import zipfile
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import files
import tokenizers
from cli import ArgumentParser, UserError, make_dir, run_command, user_errors
from data import CLASS_NAMES, load_mnist
from images import to_float, to_uint8

CLASSIFIER_FORMAT = "purrception-classifier/1"
COVERAGE_K = 5          # the k of coverage's k-nearest-neighbour balls (Naeem et al. use 5)
IMAGE_SHAPE = (28, 28)  # MNIST-sized images only; ImageNet samples go to the standard Inception evaluator


# ----------------------------------------------------------------------------------------------------------
# The classifier: LeNet-style, its penultimate layer gives the features of FID-LeNet
# ----------------------------------------------------------------------------------------------------------

class LeNet(nn.Module):
    """Two 3x3 conv blocks and two linear layers; `features` is the 128-d penultimate layer after its ReLU."""

    def __init__(self, num_classes=10, feature_dim=128):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 7, 7)
        )
        self.fc = nn.Linear(64 * 7 * 7, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)
        self.to(memory_format=torch.channels_last)  # CPU convolutions run about 1.6x faster channels-last

    def features(self, x):  # x: (B, 1, 28, 28) in [-1, 1]
        x = x.contiguous(memory_format=torch.channels_last)
        return F.relu(self.fc(self.conv(x).flatten(1)))  # (B, 128)

    def forward(self, x):
        return self.head(self.dropout(self.features(x)))  # (B, num_classes)


@torch.no_grad()
def extract(model, images, batch_size=1000, desc="features"):
    """Penultimate features (N, 128) float64 and predicted classes (N,) int64 of uint8 images."""
    model.eval()
    features, predictions = [], []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, leave=False):
        f = model.features(to_float(images[i:i + batch_size]))  # (B, 128)
        features.append(f.double().numpy())
        predictions.append(model.head(f).argmax(1).numpy())
    if not features:
        return np.zeros((0, model.fc.out_features)), np.zeros(0, dtype=np.int64)
    return np.concatenate(features), np.concatenate(predictions)


def train_classifier(dataset, data_dir, epochs=5, batch_size=128, lr=2e-3, seed=0, limit=None):
    """Train a LeNet on the training split (its first `limit` images if given) with Adam and a one-cycle
    learning rate. Returns (model in eval mode, info): info holds test_accuracy (on the whole test split),
    train_images, epochs, seed and seconds. The caller's random state is left untouched."""
    start = time.time()
    images, labels = load_mnist(dataset, data_dir, "train")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    steps_per_epoch = (len(images) + batch_size - 1) // batch_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LeNet(len(CLASS_NAMES[dataset]))
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps_per_epoch)
        model.train()
        progress = tqdm(total=epochs * steps_per_epoch, desc=f"training the {dataset} classifier")
        for epoch in range(epochs):
            order = torch.randperm(len(images)).numpy()
            for i in range(steps_per_epoch):
                batch = order[i * batch_size:(i + 1) * batch_size]
                loss = F.cross_entropy(model(to_float(images[batch])), torch.from_numpy(labels[batch]))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                progress.update()
                progress.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
        progress.close()
    model.eval()
    test_images, test_labels = load_mnist(dataset, data_dir, "test")
    _, predictions = extract(model, test_images, desc="classifier test accuracy")
    info = dict(test_accuracy=float(np.mean(predictions == test_labels)), train_images=len(images),
                epochs=epochs, seed=seed, seconds=round(time.time() - start, 1))
    return model, info


# ----------------------------------------------------------------------------------------------------------
# The classifier cache
# ----------------------------------------------------------------------------------------------------------

def default_classifier_path(dataset):
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "purrception", f"classifier-{dataset}.pt")


def load_classifier(dataset, data_dir, path=None, **train_kwargs):
    """(model, info) from the cache file at `path` (default: default_classifier_path(dataset)); when the file
    does not exist, train the classifier (train_kwargs go to train_classifier) and write it there first.

    info: path, dataset, test_accuracy, train_images, epochs, seed, seconds (of training). A file that is not a
    classifier of `dataset` is a ValueError naming it, never silently replaced."""
    path = path or default_classifier_path(dataset)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: a directory; expected a classifier file of evaluate.py, or the name of "
                                f"one to write")
    if not os.path.exists(path):
        model, info = train_classifier(dataset, data_dir, **train_kwargs)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        files.save_torch(path, dict(format=CLASSIFIER_FORMAT, dataset=dataset, **info, model=model.state_dict()))
        print(f"classifier: test accuracy {info['test_accuracy']:.2%} after {info['seconds']:.0f} s -> {path}",
              file=sys.stderr)
    fix = "delete it to train a new one, or pass another --classifier"
    record = files.load_torch(path, f"a classifier file of evaluate.py (format {CLASSIFIER_FORMAT}); {fix}")
    if not isinstance(record, dict) or record.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{path}: not a classifier file of evaluate.py (format {CLASSIFIER_FORMAT}); {fix}")
    if record.get("dataset") != dataset:
        raise ValueError(f"{path}: a classifier of {record.get('dataset')}, not of {dataset}; {fix}")
    model = LeNet(len(CLASS_NAMES[dataset]))
    weights = record.get("model")
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) if torch.is_tensor(v) else None for k, v in weights.items()} \
        if isinstance(weights, dict) else None
    if found != wanted:
        raise ValueError(f"{path}: its weights do not fit the classifier of evaluate.py; {fix}")
    model.load_state_dict(weights)
    info = {k: v for k, v in record.items() if k not in ("format", "model")}
    return model.eval(), dict(path=os.path.abspath(path), **info)


# ----------------------------------------------------------------------------------------------------------
# Metrics: Frechet distance and coverage
# ----------------------------------------------------------------------------------------------------------

def gaussian_fit(features):
    """Mean (D,) and covariance (D, D) of features (N, D), in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(sigma):
    """The symmetric square root of a symmetric PSD matrix; round-off below zero is clipped."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2):

        ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    With A = sigma1^(1/2) sigma2^(1/2), sigma1 sigma2 is similar to A A^T, so tr((sigma1 sigma2)^(1/2)) is the
    sum of the singular values of A. Square roots of symmetric matrices and one SVD replace the usual
    scipy.linalg.sqrtm of the product: no complex parts to drop, and no square roots of eigenvalues that
    round-off left near zero (rank-deficient covariances, e.g. of features after a ReLU, are common)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shapes do not match: {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    a = _psd_sqrt(sigma1) @ _psd_sqrt(sigma2)
    trace_sqrt = np.linalg.svd(a, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _distances(a, b):
    """Exact Euclidean distances (len(a), len(b)) in float64, computed from differences, not a Gram matrix."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def coverage(real_features, fake_features, k=COVERAGE_K, chunk=1024):
    """The fraction of real points whose ball out to their k-th nearest real neighbour (the point itself not
    counted) holds at least one fake point (Naeem et al. 2020). The balls are closed (<=): the authors' code
    uses <, which differs only for a fake point exactly on a boundary. No fake points: 0."""
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float64)
    if len(real) <= k:
        raise ValueError(f"coverage with k = {k} needs more than {k} real points, got {len(real)}")
    if len(fake) == 0:
        return 0.0
    covered = []
    for i in range(0, len(real), chunk):
        block = real[i:i + chunk]
        radius = _distances(block, real).kthvalue(k + 1, dim=1).values  # the 1st is the point itself
        covered.append(_distances(block, fake).min(dim=1).values <= radius)
    return float(torch.cat(covered).double().mean())


# ----------------------------------------------------------------------------------------------------------
# Scoring a set of images
# ----------------------------------------------------------------------------------------------------------

def check_images(images, labels=None, num_classes=10, where="images"):
    """Check uint8 MNIST-sized images (N, 28, 28, 1) or (N, 28, 28) and optional labels (N,) in range."""
    images = np.asarray(images)
    if (images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[1:3] != IMAGE_SHAPE
            or (images.ndim == 4 and images.shape[3] != 1)):
        raise ValueError(f"{where}: expected MNIST-sized uint8 images (N, 28, 28, 1), got {images.dtype} "
                         f"{images.shape}; ImageNet-sized samples go to the standard Inception FID evaluator")
    if len(images) < 2:
        raise ValueError(f"{where}: {len(images)} image(s); FID needs at least 2")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{where}: expected {len(images)} integer labels, got {labels.dtype} {labels.shape}")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"{where}: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return images, labels


def _prepared(dataset, data_dir, classifier_path):
    """The classifier and the real side: trains and caches the classifier first if its file is absent."""
    path = os.path.abspath(classifier_path or default_classifier_path(dataset))
    if not os.path.exists(path):
        load_classifier(dataset, data_dir, path)
    return _prepared_cached(dataset, os.path.abspath(data_dir), path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _prepared_cached(dataset, data_dir, path, mtime_ns):
    """(model, info, test features, test labels, test Gaussian); kept for repeated calls in one process."""
    model, info = load_classifier(dataset, data_dir, path)
    images, labels = load_mnist(dataset, data_dir, "test")
    features, _ = extract(model, images, desc="features of the test split")
    return model, info, features, labels, gaussian_fit(features)


def evaluate_images(images, labels, dataset, data_dir, classifier_path=None):
    """Metrics of uint8 images (N, 28, 28, 1) against the real test split of `dataset`.

    labels: the class each image was conditioned on (N,), or None for unconditional samples. Returns a
    JSON-ready dict: accuracy (None without labels), fid, coverage (the mean over classes), and per class:
    accuracy_per_class, coverage_per_class, class_histogram (counts of predicted classes), class_names."""
    if dataset not in CLASS_NAMES:
        raise ValueError(f"unknown dataset '{dataset}'; choose from: {', '.join(CLASS_NAMES)}")
    names = CLASS_NAMES[dataset]
    images, labels = check_images(images, labels, len(names))
    model, info, real_features, real_labels, (real_mu, real_sigma) = _prepared(dataset, data_dir, classifier_path)
    features, predictions = extract(model, images, desc="features of the samples")
    groups = labels if labels is not None else predictions
    accuracy_per_class, coverage_per_class = [], []
    for c in range(len(names)):
        mine = groups == c
        hits = predictions[mine] == c
        accuracy_per_class.append(float(hits.mean()) if labels is not None and mine.any() else None)
        coverage_per_class.append(coverage(real_features[real_labels == c], features[mine]))
    return dict(
        dataset=dataset,
        num_samples=len(images),
        num_real=len(real_labels),
        classifier=info["path"],
        classifier_test_accuracy=info["test_accuracy"],
        accuracy=float(np.mean(predictions == labels)) if labels is not None else None,
        fid=frechet_distance(*gaussian_fit(features), real_mu, real_sigma),
        coverage=float(np.mean(coverage_per_class)),
        samples_grouped_by="conditioning label" if labels is not None else "predicted class",
        class_names=list(names),
        accuracy_per_class=accuracy_per_class,
        coverage_per_class=coverage_per_class,
        class_histogram=np.bincount(predictions, minlength=len(names)).tolist(),
    )


@torch.no_grad()
def reconstruct(tokenizer, images, batch_size=500):
    """uint8 images (N, 28, 28) -> uint8 (N, 28, 28, 1) through tokenizer.decode(tokenizer.encode(x)), on the
    CPU, with x float (B, 1, 28, 28) in [-1, 1] (the layout and range of mnist_vq.py)."""
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="reconstructing the test split", leave=False):
        x = to_float(images[i:i + batch_size])  # (B, 1, 28, 28)
        out.append(to_uint8(tokenizer.decode(tokenizer.encode(x))))  # (B, 28, 28, 1)
    return np.concatenate(out)


def reference_metrics(tokenizer, dataset, data_dir, classifier_path=None, batch_size=500, name=None):
    """evaluate_images of the test split's reconstructions through a VQ tokenizer, with the true labels: the
    ceiling of a flow over its codes. `tokenizer`: the path of a `vq.py train` checkpoint (RUN/tokenizer.pt),
    or an object with encode (B, 1, 28, 28) -> codes and decode codes -> (B, 1, 28, 28), then named by `name`."""
    if isinstance(tokenizer, (str, os.PathLike)):
        name = os.path.abspath(tokenizer)
        tokenizer = tokenizers.load(str(tokenizer))
    images, labels = load_mnist(dataset, data_dir, "test")
    metrics = evaluate_images(reconstruct(tokenizer, images, batch_size), labels, dataset, data_dir,
                              classifier_path)
    return dict(reference="VQ reconstructions of the test split", tokenizer=name, **metrics)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def load_samples(path):
    """(images (N, 28, 28, 1) uint8, labels (N,) or None) from an .npz of sample.py: arr_0 and labels."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: a directory (expected the samples.npz of sample.py)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected the samples.npz of sample.py)")
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"PK":  # np.load would try a pickle here
                raise ValueError("not a zip archive of arrays")
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in ("arr_0", "labels") if name in f.files}
            found = f.files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # truncated, damaged or foreign
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None
    if "arr_0" not in arrays:
        listed = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ValueError(f"{path}: no array 'arr_0' (found: {listed or 'none'}); expected uint8 images "
                         f"N x H x W x C as sample.py writes them")
    return check_images(arrays["arr_0"], arrays.get("labels"), where=path)


def _percent(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(columns):
    """The metrics of one or more sets side by side, as markdown; columns: [(title, metrics of evaluate_images)]."""
    first = columns[0][1]
    titles = [title for title, _ in columns]
    summary = files.markdown_table(["", *titles], [
        ["images", *(f"{m['num_samples']:,}" for _, m in columns)],
        ["accuracy", *(_percent(m["accuracy"]) for _, m in columns)],
        ["FID-LeNet", *(f"{m['fid']:.3f}" for _, m in columns)],
        ["coverage (mean)", *(f"{m['coverage']:.3f}" for _, m in columns)],
    ])
    per_class = files.markdown_table(
        ["class", *(f"{title} {column}" for title in titles for column in ("acc", "cov", "pred"))],
        [[name, *(cell for _, m in columns for cell in (_percent(m["accuracy_per_class"][c]),
                                                        f"{m['coverage_per_class'][c]:.3f}", m["class_histogram"][c]))]
         for c, name in enumerate(first["class_names"])])
    return (f"{first['dataset']}: scored against its {first['num_real']:,} test images by the classifier "
            f"{first['classifier']} (test accuracy {_percent(first['classifier_test_accuracy'])})\n\n{summary}\n"
            f"{per_class}\n(acc: predicted as the class; cov: coverage, k = {COVERAGE_K}; pred: samples predicted "
            f"as the class; samples grouped by {first['samples_grouped_by']})")


def output_path(args):
    """--out, or metrics.json beside the samples (reference-metrics.json beside the tokenizer without samples)."""
    if args.out:
        return args.out
    if args.samples:
        return os.path.join(os.path.dirname(os.path.abspath(args.samples)), "metrics.json")
    return os.path.join(os.path.dirname(os.path.abspath(args.reference_tokenizer)), "reference-metrics.json")


def evaluate(args):
    # Every file this run writes, checked before the work: the metrics, and the classifier when it is trained
    out = output_path(args)
    if not out.endswith(".json"):
        raise UserError(f"--out {out}: expected the name of a .json file")
    if os.path.isdir(out):
        raise UserError(f"--out {out}: a directory; expected the name of a .json file")
    make_dir(os.path.dirname(os.path.abspath(out)))
    classifier = args.classifier or default_classifier_path(args.dataset)
    if not os.path.exists(classifier):
        make_dir(os.path.dirname(os.path.abspath(classifier)))

    columns = []
    with user_errors():  # the samples, the dataset, the classifier file and the tokenizer are the user's files
        images, labels = load_samples(args.samples) if args.samples else (None, None)
        tokenizer = tokenizers.load(args.reference_tokenizer) if args.reference_tokenizer else None
        if args.samples:
            columns.append(("samples", evaluate_images(images, labels, args.dataset, args.data_dir, classifier)))
        if args.reference_tokenizer:
            columns.append(("tokenizer", reference_metrics(tokenizer, args.dataset, args.data_dir, classifier,
                                                           name=os.path.abspath(args.reference_tokenizer))))
    print(format_table(columns))
    if args.samples:
        result = dict(samples=os.path.abspath(args.samples), **columns[0][1])
        if args.reference_tokenizer:
            result["reference"] = columns[1][1]
    else:
        result = columns[0][1]
    files.write_json(out, result)
    print(f"-> {out}")
    return result


def parse_args(argv=None):
    p = ArgumentParser(description="Score MNIST-sized samples: classifier accuracy, FID-LeNet and "
                                            "per-class coverage against the real test split.")
    p.add_argument("--samples", help="the samples.npz of sample.py (arr_0: uint8 N x 28 x 28 x 1, labels)")
    p.add_argument("--dataset", required=True, choices=list(CLASS_NAMES))
    p.add_argument("--data-dir", required=True, help="the directory of the dataset's IDX files")
    p.add_argument("--classifier", help="the classifier file, trained and written there if absent "
                                        "(default: ~/.cache/purrception/classifier-DATASET.pt)")
    p.add_argument("--reference-tokenizer", metavar="RUN/tokenizer.pt",
                   help="also score the test split's reconstructions through this tokenizer: the ceiling")
    p.add_argument("--out", help="the .json file to write (default: metrics.json beside the samples, or "
                                 "reference-metrics.json beside the tokenizer)")
    args = p.parse_args(argv)
    if not args.samples and not args.reference_tokenizer:
        p.error("give --samples, --reference-tokenizer or both")
    return args


def main(argv=None):
    args = parse_args(argv)
    run_command(evaluate, args)


if __name__ == "__main__":
    main()
