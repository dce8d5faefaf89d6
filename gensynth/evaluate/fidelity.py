"""Fidelity and diversity in a feature space: FID, KID, precision/recall, class consistency.

Features are float arrays [n, d] (the extractor's penultimate layer). All of these are biased at
small n in some way, so a number only means something next to the same metric computed the same way
on two disjoint real sets of the same sizes (the "floor"; gensynth/evaluate/synthetic.py does that).

- FID (Heusel et al. 2017): Frechet distance between Gaussians fitted to the two feature sets.
- KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets; unbiased, so a perfect generator scores
  about 0 at any n (can be slightly negative).
- Precision / recall (Kynkaanniemi et al. 2019): each set's manifold is the union of balls around
  its points reaching their k-th nearest neighbour (k = 3 in the paper); precision = share of fake
  points inside the real manifold (fidelity), recall = share of real points inside the fake one
  (diversity).
- Class consistency: share of generated samples the classifier assigns to the class they were
  generated for.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    if len(f) < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {len(f)}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)); a tiny ridge when the product is singular
    (as in the reference implementation, pytorch-fid)."""
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product (dead ReLU features) is expected and handled below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(sigma1)) * 1e-6
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3."""
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(features_a: np.ndarray, features_b: np.ndarray, subset_size: int = 1000, subsets: int = 100,
        seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased polynomial MMD^2 over `subsets` random subsets of `subset_size`."""
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    values = [polynomial_mmd2(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


def pairwise_distances(x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Euclidean distances [len(x), len(y)], float32, computed in row chunks."""
    out = torch.empty(len(x), len(y))
    y_sq = (y * y).sum(1)
    for i in range(0, len(x), chunk):
        xi = x[i:i + chunk]
        d2 = (xi * xi).sum(1, keepdim=True) + y_sq[None, :] - 2 * xi @ y.T
        out[i:i + chunk] = d2.clamp_min_(0).sqrt_()
    return out


def knn_radii(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance of each point to its k-th nearest other point of the same set."""
    if len(x) <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {len(x)}")
    radii = torch.empty(len(x))
    for i in range(0, len(x), chunk):
        d = pairwise_distances(x[i:i + chunk], x, chunk)
        radii[i:i + chunk] = d.kthvalue(k + 1, dim=1).values  # the 0 to itself is the first
    return radii


def coverage_of(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> float:
    """Share of `queries` inside at least one ball (points[j], radii[j])."""
    inside = 0
    for i in range(0, len(queries), chunk):
        d = pairwise_distances(queries[i:i + chunk], points, chunk)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / max(len(queries), 1)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    r = torch.as_tensor(np.asarray(real), dtype=torch.float32)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float32)
    precision = coverage_of(f, r, knn_radii(r, k))
    recall = coverage_of(r, f, knn_radii(f, k))
    return precision, recall


def class_consistency(predicted: np.ndarray, labels: np.ndarray) -> tuple[float, dict[int, float]]:
    """(overall share of predicted == labels, the same per label)."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    per_class = {int(c): float((predicted[labels == c] == c).mean()) for c in np.unique(labels)}
    overall = float((predicted == labels).mean()) if len(labels) else float("nan")
    return overall, per_class
