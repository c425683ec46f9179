"""Generation metrics over feature vectors: FID, Inception Score, precision / recall, class accuracy.

All of them take features (or class probabilities) from any :mod:`hita.eval.features` extractor, so
the same code scores the classifier's space and Inception's. Definitions:

- FID (Heusel et al. 2017): ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` with scipy's ``sqrtm``;
  when the product is near-singular, ``eps`` is added to both diagonals (the usual remedy).
- IS (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))``, mean and std over ``splits`` parts.
- Precision / recall (Kynkäänniemi et al. 2019): each real feature spans a ball reaching its k-th
  nearest real neighbour; precision is the share of generated features inside some real ball, recall
  the share of real features inside some generated ball (balls from the generated set).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hita.eval.optional import scipy_linalg

__all__ = ["GaussianStats", "frechet_distance", "inception_score", "precision_recall", "class_accuracy"]


@dataclass(frozen=True, eq=False)
class GaussianStats:
    """Mean (D,) and covariance (D, D) of ``n`` feature vectors, float64."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def of(cls, features: np.ndarray) -> "GaussianStats":
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or len(f) < 2:
            raise ValueError(f"FID statistics need at least 2 feature vectors (N, D), got shape {f.shape}")
        return cls(f.mean(0), np.cov(f, rowvar=False), len(f))


def frechet_distance(a: GaussianStats, b: GaussianStats, eps: float = 1e-6) -> float:
    """Fréchet distance between two Gaussians (the FID when the features are Inception pool3)."""
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"statistics of different feature sizes ({a.mu.shape[0]} vs {b.mu.shape[0]}); "
                         "compute both with the same feature extractor")
    import warnings

    linalg = scipy_linalg()
    diff = a.mu - b.mu
    with warnings.catch_warnings():  # a singular product (fewer images than features) is handled below
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(a.sigma @ b.sigma)
        if not np.isfinite(covmean).all():
            offset = np.eye(a.sigma.shape[0]) * eps
            covmean = linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
    if np.iscomplexobj(covmean):
        # Round-off leaves tiny imaginary parts; large ones mean the statistics are broken.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: the covariance product has a large imaginary part "
                             f"({np.abs(covmean.imag).max():.3g}); use more images")
        covmean = covmean.real
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * np.trace(covmean))


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Mean and std of exp(E KL(p(y|x) || p(y))) over ``splits`` equal parts of ``probs`` (N, K)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) < splits:
        raise ValueError(f"IS needs (N, K) probabilities with N >= splits={splits}, got shape {p.shape}")
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(np.clip(part, 1e-12, None)) - np.log(np.clip(py, 1e-12, None)))).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_radii(f: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of every row of ``f`` to its k-th nearest other row."""
    out = []
    for i in range(0, len(f), chunk):
        d = torch.cdist(f[i:i + chunk], f)  # (c, N), includes the 0 to itself
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def _covered(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """Whether each query row lies within radius of some ref row."""
    out = []
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i:i + chunk], ref)  # (c, M)
        out.append((d <= radii[None, :]).any(1))
    return torch.cat(out)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall of ``fake`` against ``real`` features, k-NN balls (k = 3 by default)."""
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    g = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if r.dim() != 2 or g.dim() != 2 or r.shape[1] != g.shape[1]:
        raise ValueError(f"precision/recall need (N, D) features of one width, got {tuple(r.shape)} and {tuple(g.shape)}")
    if min(len(r), len(g)) <= k:
        raise ValueError(f"precision/recall with k={k} need more than {k} real and generated images")
    precision = _covered(g, r, _kth_radii(r, k, chunk), chunk).double().mean()
    recall = _covered(r, g, _kth_radii(g, k, chunk), chunk).double().mean()
    return float(precision), float(recall)


def class_accuracy(predicted: np.ndarray, wanted: np.ndarray, num_classes: int) -> tuple[float, np.ndarray]:
    """Share of images whose predicted class is the wanted one: overall and per wanted class (NaN when absent)."""
    predicted, wanted = np.asarray(predicted), np.asarray(wanted)
    hit = predicted == wanted
    per = np.array([hit[wanted == c].mean() if (wanted == c).any() else np.nan for c in range(num_classes)])
    return float(hit.mean()), per
