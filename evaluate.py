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
Beside FID-LeNet its floor, `fid_floor`: the FID-LeNet of as many real images (the first n of the TRAINING split,
at most all of it; None where its files are absent) against the test split, what a perfect sampler would score;
where it is more than half the FID-LeNet, a warning on stderr says the sample set is too small to rank by it.
Samples belong to the class they were conditioned on (the .npz's `labels`), or to their predicted class when
the .npz has none; `accuracy` is then absent. FID-LeNet values are comparable only between runs scored by the
same classifier file, and not at all with Inception FID: metrics.json records the classifier and its test
accuracy. A cache file that is unreadable or made for another dataset is an error, never silently replaced:
delete it to retrain. The file records the data it was trained on (`data`: the MD5s of the decompressed training
and test images files, support/datasets.py), and scoring against a --data-dir whose test images differ is refused;
a file from before that record is checked by its test accuracy instead, which on other data falls far from the
recorded one. Samples of a flow trained on another dataset's codes (as the samples' settings say, or the code set
meta in the checkpoint they name, while it is still at the same step) are refused too.

The reconstructions of the test split through a VQ tokenizer (--reference-tokenizer) are the ceiling of any
flow over its codes: a flow can at best reproduce the tokenizer's codes of real images.
"""

import functools
import json
import os
import sys
import zipfile
import zlib

import numpy as np
import torch
from tqdm import tqdm

from support import config, datasets, files, tokenizers
from support.cli import ArgumentParser, UserError, make_dir, run_command, user_errors
from support.datasets import CLASS_NAMES, load_mnist, read_mnist
from support.images import to_float, to_uint8
from support.lenet import default_classifier_path, extract, load_classifier
from support.metrics import COVERAGE_K, coverage, coverage_radii, frechet_distance, gaussian_fit

IMAGE_SHAPE = (28, 28)  # MNIST-sized images only; ImageNet samples go to fid.py


# ---- Scoring a set of images -----------------------------------------------------------------------------

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
    """The key of the classifier and the real side (dataset, data_dir, classifier path, its mtime), and
    _prepared_cached of it: trains and caches the classifier first if its file is absent."""
    path = os.path.abspath(classifier_path or default_classifier_path(dataset))
    if not os.path.exists(path):
        load_classifier(dataset, data_dir, path)
    key = (dataset, os.path.abspath(data_dir), path, os.stat(path).st_mtime_ns)
    return key, _prepared_cached(*key)


@functools.lru_cache(maxsize=2)
def _prepared_cached(dataset, data_dir, path, mtime_ns):
    """(model, info, test features, test labels, test Gaussian, per-class coverage radii); kept for repeated
    calls in one process."""
    images, labels, identity = read_mnist(dataset, data_dir, "test")
    model, info = load_classifier(dataset, data_dir, path, test_split=(images, labels, identity))
    features, _ = extract(model, images, desc="features of the test split")
    radii = [coverage_radii(features[labels == c], COVERAGE_K) for c in range(len(CLASS_NAMES[dataset]))]
    return model, info, features, labels, gaussian_fit(features), radii


def evaluate_images(images, labels, dataset, data_dir, classifier_path=None):
    """Metrics of uint8 images (N, 28, 28, 1) against the real test split of `dataset`.

    labels: the class each image was conditioned on (N,), or None for unconditional samples. Returns a
    JSON-ready dict: accuracy (None without labels), fid, coverage (the mean over classes), and per class:
    accuracy_per_class, coverage_per_class, class_histogram (counts of predicted classes), class_names."""
    if dataset not in CLASS_NAMES:
        raise ValueError(f"unknown dataset '{dataset}'; choose from: {', '.join(CLASS_NAMES)}")
    names = CLASS_NAMES[dataset]
    images, labels = check_images(images, labels, len(names))
    key, (model, info, real_features, real_labels, (real_mu, real_sigma), radii) = _prepared(dataset, data_dir,
                                                                                              classifier_path)
    features, predictions = extract(model, images, desc="features of the samples")
    floor, floor_images = fid_floor(key, len(images))
    groups = labels if labels is not None else predictions
    accuracy_per_class, coverage_per_class = [], []
    for c in range(len(names)):
        mine = groups == c
        hits = predictions[mine] == c
        accuracy_per_class.append(float(hits.mean()) if labels is not None and mine.any() else None)
        coverage_per_class.append(coverage(real_features[real_labels == c], features[mine], radii=radii[c]))
    return dict(
        dataset=dataset,
        num_samples=len(images),
        num_real=len(real_labels),
        classifier=info["path"],
        classifier_test_accuracy=info["test_accuracy"],
        accuracy=float(np.mean(predictions == labels)) if labels is not None else None,
        fid=frechet_distance(*gaussian_fit(features), real_mu, real_sigma),
        fid_floor=floor,
        fid_floor_images=floor_images,
        coverage=float(np.mean(coverage_per_class)),
        samples_grouped_by="conditioning label" if labels is not None else "predicted class",
        class_names=list(names),
        accuracy_per_class=accuracy_per_class,
        coverage_per_class=coverage_per_class,
        class_histogram=np.bincount(predictions, minlength=len(names)).tolist(),
    )


@functools.lru_cache(maxsize=8)
def fid_floor(key, n):
    """(FID-LeNet of the first n real training images (all of them if fewer) against the test split's Gaussian, how
    many there were): the sampling floor of n samples' FID-LeNet, by the classifier of `key` (_prepared's). (None,
    0) where the training split is absent."""
    dataset, data_dir = key[:2]
    model, _, _, _, (real_mu, real_sigma), _ = _prepared_cached(*key)
    try:
        images, _, _ = read_mnist(dataset, data_dir, "train")
    except FileNotFoundError:  # a cached classifier scores with the test split alone
        return None, 0
    features, _ = extract(model, images[:n], desc="features of real training images (the floor)")
    return frechet_distance(*gaussian_fit(features), real_mu, real_sigma), len(features)


def floor_warning(title, m):
    """Print a one-line warning (and return True) where the FID floor of `m` is more than half its FID-LeNet."""
    if m["fid_floor"] is None or m["fid_floor"] <= m["fid"] / 2:
        return False
    print(f"warning: {title}: FID-LeNet {m['fid']:.3f} and its floor {m['fid_floor']:.3f} (of {m['fid_floor_images']} "
          f"real images), more than half of it: at {m['num_samples']} images FID-LeNet is mostly sampling noise; "
          f"draw more (sample.py --num-samples)", file=sys.stderr)
    return True


@torch.no_grad()
def reconstruct(tokenizer, images, batch_size=500):
    """uint8 images (N, 28, 28) -> uint8 (N, 28, 28, 1) through tokenizer.decode(tokenizer.encode(x)), on the
    CPU, with x float (B, 1, 28, 28) in [-1, 1] (the layout and range of vq.py)."""
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="reconstructing the test split", leave=False):
        x = to_float(images[i:i + batch_size])  # (B, 1, 28, 28)
        out.append(to_uint8(tokenizer.decode(tokenizer.encode(x))))  # (B, 28, 28, 1)
    return np.concatenate(out)


def reference_metrics(tokenizer, dataset, data_dir, classifier_path=None, batch_size=500, name=None):
    """evaluate_images of the test split's reconstructions through a VQ tokenizer, with the true labels: the
    ceiling of a flow over its codes. `tokenizer`: the path of a `tokenizer.py train` checkpoint (RUN/tokenizer.pt),
    or an object with encode (B, 1, 28, 28) -> codes and decode codes -> (B, 1, 28, 28), then named by `name`."""
    if isinstance(tokenizer, (str, os.PathLike)):
        name = os.path.abspath(tokenizer)
        tokenizer = tokenizers.load(str(tokenizer))
    images, labels = load_mnist(dataset, data_dir, "test")
    metrics = evaluate_images(reconstruct(tokenizer, images, batch_size), labels, dataset, data_dir,
                              classifier_path)
    return dict(reference="VQ reconstructions of the test split", tokenizer=name, **metrics)


# ---- Command line ----------------------------------------------------------------------------------------

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


def samples_origin(path):
    """(dataset, images MD5 or None, where it is said) of the codes the flow behind samples.npz was trained on, as
    sample.py records them in its settings, or None where the file does not say."""
    try:
        with np.load(path, allow_pickle=False) as f:
            settings = json.loads(str(f["settings"].item())) if "settings" in f.files else None
    except Exception:  # the samples themselves were read by load_samples; their settings are optional
        return None
    if not isinstance(settings, dict):
        return None
    data = settings.get("data") if isinstance(settings.get("data"), dict) else {}
    dataset = settings.get("dataset", data.get("dataset"))
    if not isinstance(dataset, str):
        return None
    return dataset, data.get("images_md5"), f"{path} (its settings)"


def check_samples_dataset(path, dataset):
    """ValueError naming `path` when its samples come from a flow trained on another dataset's codes."""
    origin = samples_origin(path)
    if origin is None:
        return
    name, images_md5, where = origin
    name = datasets.known_dataset(str(images_md5)) or name  # the contents of the codes' images, whatever their name
    if name != dataset:
        hint = f"; score them with --dataset {name} and its --data-dir" if name in CLASS_NAMES else ""
        raise ValueError(f"{path}: samples of a flow trained on {name} codes ({where}), not {dataset}'s{hint}")


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
        ["FID-LeNet floor", *("-" if m["fid_floor"] is None else f"{m['fid_floor']:.3f}" for _, m in columns)],
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
        if args.samples:
            check_samples_dataset(args.samples, args.dataset)
        tokenizer = tokenizers.load(args.reference_tokenizer) if args.reference_tokenizer else None
        if args.samples:
            columns.append(("samples", evaluate_images(images, labels, args.dataset, args.data_dir, classifier)))
        if args.reference_tokenizer:
            columns.append(("tokenizer", reference_metrics(tokenizer, args.dataset, args.data_dir, classifier,
                                                           name=os.path.abspath(args.reference_tokenizer))))
    print(format_table(columns))
    for title, m in columns:
        floor_warning(title, m)
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
    args = config.parse_args(p, argv, "evaluate")
    if not args.samples and not args.reference_tokenizer:
        p.error("give --samples, --reference-tokenizer or both")
    return args


def main(argv=None):
    run_command(lambda: evaluate(parse_args(argv)))


if __name__ == "__main__":
    main()
