"""Fréchet Inception Distance from pool features (numpy + scipy, float64).

FID fits a Gaussian to each set of 2048-d Inception features and measures

  ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)).

The numerics follow pytorch-fid's calculate_frechet_distance step by step
(scipy's sqrtm; eps on the diagonals only when the product is singular; a
tiny imaginary part dropped, a large one an error), so that the same features
give the same number as the reference implementation.
"""

from __future__ import annotations

from absl import logging
import numpy as np
import scipy
from scipy import linalg

# scipy 1.16 deprecated sqrtm's `disp` (and its error estimate); before that,
# disp=False was the quiet way to call it.
_SQRTM_HAS_DISP = tuple(int(v) for v in scipy.__version__.split(".")[:2]) < (
    1, 16)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
  if _SQRTM_HAS_DISP:
    return linalg.sqrtm(matrix, disp=False)[0]
  return linalg.sqrtm(matrix)


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """[N, D] features -> (mean [D], covariance [D, D]), float64, ddof=1."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"statistics: features of shape {features.shape}; "
                     "expected [N, D] with N >= 2 samples.")
  return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

  Raises:
    ValueError: shapes that disagree, or a matrix square root with a large
      imaginary part (covariances that are not positive semi-definite).
  """
  mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(
      mu2).astype(np.float64)
  sigma1 = np.atleast_2d(sigma1).astype(np.float64)
  sigma2 = np.atleast_2d(sigma2).astype(np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or (
      sigma1.shape != mu1.shape * 2):
    raise ValueError(
        f"frechet_distance: means {mu1.shape} and {mu2.shape}, covariances "
        f"{sigma1.shape} and {sigma2.shape}; expected [D] and [D, D] for "
        "both (statistics of the same feature layer).")
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    logging.warning("FID: sigma1 @ sigma2 is singular; adding %g to the "
                    "diagonal of both covariances.", eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(
          "frechet_distance: sqrt(sigma1 @ sigma2) has an imaginary component "
          f"of up to {np.max(np.abs(covmean.imag)):g}; the covariances are "
          "not positive semi-definite (use statistics() of real features).")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2 * np.trace(covmean))


METHODS = ("sqrtm", "low_rank")


def low_rank_frechet(features_a, features_b) -> float:
  """FID of two feature sets without a D x D matrix square root.

  With A = (a - mean) / sqrt(n_a - 1) (so S_a = A^T A) and B likewise, the
  nonzero eigenvalues of S_a S_b are those of (A B^T)(A B^T)^T, hence
  tr sqrt(S_a S_b) = ||A B^T||_* (the sum of its singular values). Exact in
  any rank at O(n_a n_b D) cost: with fewer samples than dimensions it avoids
  a slow 2048^2 sqrtm and its eps regularisation, so it differs slightly from
  pytorch-fid there (which is why "sqrtm" stays the default).
  """
  a = np.asarray(features_a, np.float64)
  b = np.asarray(features_b, np.float64)
  ca = (a - a.mean(0)) / np.sqrt(len(a) - 1)
  cb = (b - b.mean(0)) / np.sqrt(len(b) - 1)
  diff = a.mean(0) - b.mean(0)
  nuclear = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
  return float(diff @ diff + (ca * ca).sum() + (cb * cb).sum() - 2 * nuclear)


def fid(features_a, features_b, method: str = "sqrtm") -> float:
  """FID between two [N, D] feature sets.

  method: "sqrtm" (pytorch-fid's computation, the standard) or "low_rank"
  (`low_rank_frechet`: exact, and fast when N is well below D).
  """
  if method == "sqrtm":
    return frechet_distance(*statistics(features_a), *statistics(features_b))
  if method == "low_rank":
    return low_rank_frechet(features_a, features_b)
  raise ValueError(f"Unknown FID method {method!r}; use one of {METHODS}.")
