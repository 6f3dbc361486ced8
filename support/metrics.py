"""
Distances between sets of features, shared by every evaluator in the repo: the Frechet distance of their
Gaussian fits (FID and its stand-ins) and coverage (Naeem et al. 2020).
"""

import numpy as np
import torch

COVERAGE_K = 5  # the k of coverage's k-nearest-neighbour balls (Naeem et al. use 5)


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


def coverage_radii(real_features, k=COVERAGE_K, chunk=1024):
    """The distance from each real point to its k-th nearest real neighbour (the point itself not counted):
    the radii of coverage's balls, which depend on the real side alone (float64 tensor (N,))."""
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64)
    if len(real) <= k:
        raise ValueError(f"coverage with k = {k} needs more than {k} real points, got {len(real)}")
    return torch.cat([_distances(real[i:i + chunk], real).kthvalue(k + 1, dim=1).values  # the 1st: itself
                      for i in range(0, len(real), chunk)])


def coverage(real_features, fake_features, k=COVERAGE_K, chunk=1024, radii=None):
    """The fraction of real points whose ball out to their k-th nearest real neighbour (the point itself not
    counted) holds at least one fake point (Naeem et al. 2020). The balls are closed (<=): the authors' code
    uses <, which differs only for a fake point exactly on a boundary. No fake points: 0. `radii`:
    coverage_radii(real_features, k), for a caller that scores many fake sets against one real set."""
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float64)
    radii = coverage_radii(real, k, chunk) if radii is None else radii
    if len(fake) == 0:
        return 0.0
    covered = [_distances(real[i:i + chunk], fake).min(dim=1).values <= radii[i:i + chunk]
               for i in range(0, len(real), chunk)]
    return float(torch.cat(covered).double().mean())
