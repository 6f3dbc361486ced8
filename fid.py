"""
ImageNet FID and Inception Score of sample.py's samples, in PyTorch (the 28 x 28 metrics are evaluate.py's):

    python fid.py --samples runs/in256-samples/samples.npz --reference VIRTUAL_imagenet256_labeled.npz \\
        --inception pt_inception-2015-12-05-6726825d.pth [--batch-size 100] [--out DIR]

Two files to download once: --reference, ADM's reference batch (REFERENCE_URL; what guided-diffusion's
evaluations/evaluator.py reads: `mu` and `sigma`, the pool_3 statistics of the whole training set, and 10,000
images `arr_0`), whose stored statistics are used when present, as ADM's evaluator does, else computed from its
arr_0; and --inception, pytorch-fid's weights (support/inception.py). FID is the Frechet distance between the
Gaussian fit of the samples' pool_3 features and the reference statistics; the Inception Score is
exp(E KL(p(y|x) || p(y))) averaged over splits of 5,000 samples in order, the last one shorter, as ADM's evaluator
splits them (50,000 samples: 10 splits; 12,000: 5,000, 5,000 and 2,000), with its standard deviation over the
splits (ADM reports the mean alone). Both depend on the sample count (the standard is 50,000): OUT/metrics.json
records it (OUT: the samples' directory unless --out). Runs on the GPU if there is one, in fp32. The Inception
network sees its input as in ADM's evaluator (TensorFlow 1's bilinear resize to 299 x 299 and (x - 128) / 128, as
torch-fidelity computes them), but runs PyTorch's arithmetic, not the TensorFlow graph's (support/inception.py):
the scores are not the evaluator's bit for bit, and where a number must be exactly comparable with published
ones, use ADM's.
"""

import math
import os
import time
import zipfile
import zlib

import numpy as np
import torch
from tqdm import tqdm

from support import files, inception
from support.cli import ArgumentParser, UserError, check_output_files, make_dir, run_command, user_errors
from support.metrics import frechet_distance, gaussian_fit

REFERENCE_FILE = "VIRTUAL_imagenet256_labeled.npz"
REFERENCE_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
                 + REFERENCE_FILE)
SPLIT_SIZE = 5000  # samples in each split of the Inception Score, as ADM's evaluator


def load_npz(path, names):
    """{name: array} for those of `names` that an .npz holds, and the names it holds; ValueError naming it."""
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"PK":  # np.load would try a pickle here
                raise ValueError("not a zip archive of arrays")
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in names if name in npz.files}, npz.files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # truncated, damaged or foreign
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None


def load_images(path):
    """arr_0: uint8 images N x H x W x 3, N >= 2 (a covariance needs two)."""
    arrays, found = load_npz(path, ["arr_0"])
    images = arrays.get("arr_0")
    if images is None or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) < 2:
        got = f"arr_0 is {images.dtype} {images.shape}" if images is not None else f"no arr_0 (found: {found})"
        raise ValueError(f"{path}: {got}; expected uint8 images N x H x W x 3, N >= 2")
    return images


@torch.no_grad()
def inception_outputs(model, images, batch_size, device, desc):
    """pool_3 features (N, 2048) and logits (N, 1008) in float64, a batch at a time."""
    features, logits = [], []
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for i in tqdm(range(0, len(images), batch_size), desc=desc):
            f, l = model(torch.from_numpy(images[i:i + batch_size]).to(device))
            features.append(f.double().cpu().numpy())
            logits.append(l.double().cpu().numpy())
    return np.concatenate(features), np.concatenate(logits)


def inception_score(logits, split_size=SPLIT_SIZE):
    """(mean, std) of exp(E_x KL(p(y|x) || p(y))) over consecutive splits of `split_size` samples, the last one
    shorter when the count is not a multiple (ADM's evaluator's compute_inception_score)."""
    scores = []
    for part in torch.as_tensor(logits, dtype=torch.float64).split(split_size):
        log_p = torch.log_softmax(part, dim=1)  # log p(y|x)
        log_marginal = torch.logsumexp(log_p, dim=0) - math.log(len(part))  # log p(y)
        scores.append(math.exp((log_p.exp() * (log_p - log_marginal)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def reference_statistics(path, model, batch_size, device):
    """(mu, sigma, how): the stored `mu` and `sigma` of the reference batch, else those of its images."""
    stats, _ = load_npz(path, ["mu", "sigma"])
    if len(stats) == 2:
        mu, sigma = stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)
        if mu.shape != (inception.FEATURES,) or sigma.shape != (inception.FEATURES,) * 2:
            raise ValueError(f"{path}: mu {mu.shape}, sigma {sigma.shape}; expected pool_3 statistics "
                             f"({inception.FEATURES},) and ({inception.FEATURES}, {inception.FEATURES})")
        return mu, sigma, "stored mu and sigma"
    images = load_images(path)
    features, _ = inception_outputs(model, images, batch_size, device, f"reference {os.path.basename(path)}")
    return *gaussian_fit(features), f"computed from its {len(images)} images"


def check_file(path, expected):
    if not os.path.isfile(path):
        raise UserError(f"{path}: {'a directory' if os.path.isdir(path) else 'no such file'}; expected {expected}")


def score(args):
    start = time.time()
    check_file(args.samples, "the samples.npz of sample.py (python sample.py ... --out DIR writes DIR/samples.npz)")
    check_file(args.reference, f"ADM's reference batch, e.g. {REFERENCE_FILE}, published at {REFERENCE_URL}")
    check_file(args.inception, f"the FID Inception weights {inception.WEIGHTS_FILE}, at {inception.WEIGHTS_URL}")
    out = args.out or os.path.dirname(os.path.abspath(args.samples))
    make_dir(out)
    check_output_files(out, "metrics.json")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with user_errors():
        model = inception.load(args.inception, device)
        images = load_images(args.samples)  # before the reference's features: its mistakes are said at once
        mu_ref, sigma_ref, how = reference_statistics(args.reference, model, args.batch_size, device)
        features, logits = inception_outputs(model, images, args.batch_size, device,
                                             f"samples {os.path.basename(args.samples)}")
    is_mean, is_std = inception_score(logits)
    result = dict(fid=frechet_distance(*gaussian_fit(features), mu_ref, sigma_ref), inception_score=is_mean,
                  inception_score_std=is_std, inception_score_splits=math.ceil(len(images) / SPLIT_SIZE),
                  num_samples=len(images), samples=os.path.abspath(args.samples),
                  reference=os.path.abspath(args.reference), reference_statistics=how,
                  inception=os.path.abspath(args.inception), device=device, seconds=round(time.time() - start, 1))
    path = os.path.join(out, "metrics.json")
    files.write_json(path, result)
    print(f"FID {result['fid']:.3f}  Inception Score {is_mean:.2f} +- {is_std:.2f}  ({len(images):,} samples, "
          f"reference: {how}) -> {path}")
    return result


def parse_args(argv=None):
    p = ArgumentParser(description="FID and Inception Score of 256 x 256 samples against ADM's reference batch.")
    p.add_argument("--samples", required=True, help="the samples.npz of sample.py (arr_0: uint8 N x H x W x 3)")
    p.add_argument("--reference", required=True, help=f"the reference batch .npz ({REFERENCE_FILE}: {REFERENCE_URL})")
    p.add_argument("--inception", required=True, help=f"the weights file ({inception.WEIGHTS_URL})")
    p.add_argument("--batch-size", type=int, default=100, help="images per forward pass")
    p.add_argument("--out", help="the directory of metrics.json (default: the samples' directory)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: expected a positive integer")
    return args


def main(argv=None):
    return run_command(lambda: score(parse_args(argv)))


if __name__ == "__main__":
    main()
