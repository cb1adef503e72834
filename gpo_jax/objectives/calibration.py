"""Expected calibration error of predicted preference probabilities (NumPy only).

A preference-trained policy implies ``P(y_w > y_l) = sigmoid(beta rho)``; in the lab the
gold preference probability is known, so calibration can be measured against it
directly (``expected_calibration_error``) or against sampled 0/1 outcomes
(``expected_calibration_error_hard``). NumPy only, so analysis code can use it without
initialising JAX.

References:
  Naeini, Cooper, Hauskrecht 2015, "Obtaining Well Calibrated Probabilities Using
  Bayesian Binning" (ECE); Guo et al. 2017, arXiv 1706.04599.
  Kim et al. 2024, arXiv 2410.03145 (MMPO: calibration of preference models).
"""

import numpy as np


def _validate(pred_p, true_p, n_bins: int, true_name: str) -> tuple[np.ndarray, np.ndarray]:
  pred = np.asarray(pred_p, np.float64).reshape(-1)
  true = np.asarray(true_p, np.float64).reshape(-1)
  if pred.shape != true.shape:
    raise ValueError(
        f"pred_p and {true_name} must have the same number of entries, "
        f"got {pred.shape[0]} and {true.shape[0]}.")
  if pred.size == 0:
    raise ValueError("expected calibration error needs at least one prediction, got none.")
  if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
    raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
  for name, x in (("pred_p", pred), (true_name, true)):
    bad = ~((x >= 0) & (x <= 1))  # also catches nan
    if bad.any():
      raise ValueError(f"{name} must lie in [0, 1]; got {x[bad][:5]} (first bad entries).")
  return pred, true


def reliability_table(pred_p, true_p, n_bins: int = 10) -> dict[str, np.ndarray]:
  """Per-bin statistics of predictions binned by predicted probability.

  Bins are ``n_bins`` equal-width intervals of ``[0, 1]``, ``[k/n, (k+1)/n)`` with the
  last bin closed at 1.

  Args:
    pred_p: predicted probabilities, any shape.
    true_p: target probabilities (or 0/1 outcomes), same number of entries.
    n_bins: number of bins.

  Returns:
    Dict of ``[n_bins]`` arrays: ``count``, ``mean_pred``, ``mean_true`` (nan for empty
    bins), and ``edges`` (``[n_bins + 1]``).
  """
  pred, true = _validate(pred_p, true_p, n_bins, "true_p")
  b = np.minimum((pred * n_bins).astype(np.int64), n_bins - 1)
  count = np.bincount(b, minlength=n_bins).astype(np.float64)
  sum_pred = np.bincount(b, weights=pred, minlength=n_bins)
  sum_true = np.bincount(b, weights=true, minlength=n_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_pred = np.where(count > 0, sum_pred / count, np.nan)
    mean_true = np.where(count > 0, sum_true / count, np.nan)
  return {"count": count, "mean_pred": mean_pred, "mean_true": mean_true,
          "edges": np.linspace(0.0, 1.0, n_bins + 1)}


def expected_calibration_error(pred_p, true_p, n_bins: int = 10) -> float:
  """ECE of predicted preference probabilities against gold probabilities.

  ``ECE = sum_k (n_k / N) |mean(pred in bin k) - mean(true in bin k)|`` with predictions
  binned into ``n_bins`` equal-width bins by predicted probability. ``pred_p`` is
  typically ``sigmoid(beta rho)`` and ``true_p`` the gold Bradley–Terry probability of
  the same ordered pair.

  Args:
    pred_p: predicted probabilities in ``[0, 1]``, any shape.
    true_p: gold probabilities in ``[0, 1]``, same number of entries.
    n_bins: number of equal-width bins.

  Returns:
    ECE in ``[0, 1]`` as a Python float.
  """
  t = reliability_table(pred_p, true_p, n_bins)
  nz = t["count"] > 0
  w = t["count"][nz] / t["count"].sum()
  return float(np.sum(w * np.abs(t["mean_pred"][nz] - t["mean_true"][nz])))


def expected_calibration_error_hard(pred_p, outcomes, n_bins: int = 10) -> float:
  """ECE against sampled binary outcomes (1 when the first response was preferred).

  Same binning as :func:`expected_calibration_error`; the bin's mean outcome estimates
  its true probability, so this ECE is biased upward by sampling noise for small bins.

  Args:
    pred_p: predicted probabilities in ``[0, 1]``.
    outcomes: 0/1 (or bool) outcomes, same number of entries.
    n_bins: number of equal-width bins.

  Returns:
    ECE as a Python float.
  """
  y = np.asarray(outcomes).reshape(-1)
  if not np.all((y == 0) | (y == 1)):
    raise ValueError(f"outcomes must be 0/1, got values {np.unique(y)[:10]}.")
  return expected_calibration_error(pred_p, y.astype(np.float64), n_bins)
