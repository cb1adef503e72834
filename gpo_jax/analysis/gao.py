"""Gao et al. functional forms of gold reward vs d = sqrt(KL), fitted with R(0) = 0 by least squares."""

from __future__ import annotations

import dataclasses

import numpy as np

FORMS = ("bon", "rl")


@dataclasses.dataclass(frozen=True)
class GaoFit:
  """Coefficients, peak and fit error of one Gao form.

  ``d_peak``/``r_peak`` are ``inf``/NaN when the fitted curve has no interior maximum
  (``beta <= 0``: the fit says gold still grows).
  """
  form: str
  alpha: float
  beta: float
  d_peak: float
  r_peak: float
  rmse: float
  n_points: int
  alpha_se: float = float("nan")
  beta_se: float = float("nan")
  d_peak_se: float = float("nan")
  chi2_red: float = float("nan")   # weighted residual SS / (n − 2); ~1 when the form fits

  @property
  def has_peak(self) -> bool:
    return bool(np.isfinite(self.d_peak))


def gao_curve(form: str, alpha: float, beta: float, d) -> np.ndarray:
  """``R(d) = d(α − β d)`` (best-of-n) or ``R(d) = d(α − β log d)`` (RL; ``R(0) = 0``).

  References:
    Gao, Schulman, Hilton 2023, "Scaling Laws for Reward Model Overoptimization"
    (arXiv 2210.10760), equations 1–2.
  """
  d = np.asarray(d, float)
  if form == "bon":
    return d * (alpha - beta * d)
  if form == "rl":
    with np.errstate(divide="ignore", invalid="ignore"):
      return np.where(d > 0, d * (alpha - beta * np.log(np.where(d > 0, d, 1.0))), 0.0)
  raise ValueError(f"unknown Gao form {form!r}; choose one of {FORMS}")


def fit_gao(d, r, form: str, se=None) -> GaoFit:
  """(Weighted) least-squares fit of a Gao form through the origin, for one curve.

  Both forms are linear in (α, β): best-of-n regresses ``r`` on ``[d, −d²]``, RL on
  ``[d, −d log d]`` (points with ``d <= 0`` carry no information there and are dropped).
  Peaks: best-of-n ``d* = α/(2β)``, ``R* = α²/(4β)``; RL ``d* = exp(α/β − 1)``,
  ``R* = β d*``.

  Fit one curve at a time (one member's trajectory, one best-of-n curve, one frontier),
  never a cloud of unrelated runs (SPEC §5). With ``se`` (the standard error of each ``r``)
  the fit is weighted by ``1/se²`` and the coefficients get standard errors
  ``sqrt(diag((XᵀWX)⁻¹) · max(1, χ²_red))`` (inflated when the form fits worse than the
  noise allows); ``d_peak_se`` follows by the delta method.

  Args:
    d: sqrt-KL values.
    r: gold rewards (reference-subtracted).
    form: ``"bon"`` or ``"rl"``.
    se: optional standard errors of ``r`` (points with a non-finite or non-positive SE are
      dropped from a weighted fit).

  Returns:
    A ``GaoFit``; ``rmse`` (unweighted) is over the points used.

  References:
    Gao, Schulman, Hilton 2023 (arXiv 2210.10760), section 3.
  """
  if form not in FORMS:
    raise ValueError(f"unknown Gao form {form!r}; choose one of {FORMS}")
  d, r = np.asarray(d, float).ravel(), np.asarray(r, float).ravel()
  keep = np.isfinite(d) & np.isfinite(r) & (d > 0)
  w = None
  if se is not None:
    se = np.asarray(se, float).ravel()
    if se.shape != d.shape:
      raise ValueError(f"fit_gao: se has shape {se.shape}, d has {d.shape}")
    keep &= np.isfinite(se) & (se > 0)
  d, r = d[keep], r[keep]
  if se is not None:
    w = 1.0 / se[keep] ** 2
  if d.size < 2 or np.unique(d).size < 2:
    raise ValueError(f"fit_gao({form!r}) needs at least 2 distinct d > 0, got {d.size} points")
  second = d * d if form == "bon" else d * np.log(d)
  design = np.stack([d, -second], axis=1)
  sw = np.ones_like(d) if w is None else np.sqrt(w)
  (alpha, beta), *_ = np.linalg.lstsq(design * sw[:, None], r * sw, rcond=None)
  alpha, beta = float(alpha), float(beta)
  resid = design @ np.array([alpha, beta]) - r
  n = d.size
  cov = np.full((2, 2), np.nan)
  chi2_red = float("nan")
  if n > 2:
    xtwx = design.T @ (design * (sw ** 2)[:, None])
    try:
      inv = np.linalg.inv(xtwx)
    except np.linalg.LinAlgError:
      inv = np.full((2, 2), np.nan)
    if w is None:
      chi2_red = float(np.sum(resid ** 2) / (n - 2))      # σ̂² of an unweighted fit
      cov = inv * chi2_red
    else:
      chi2_red = float(np.sum(w * resid ** 2) / (n - 2))
      cov = inv * max(1.0, chi2_red)
  # exp() overflows past ~709: an RL peak that far out means "no peak" in any reachable KL.
  grad = None
  if beta > 0 and not (form == "rl" and alpha / beta - 1.0 > 700.0):
    if form == "bon" and alpha <= 0:
      d_peak, r_peak = 0.0, 0.0  # decreasing for every d > 0: the best is not to move
    elif form == "bon":
      d_peak, r_peak = alpha / (2 * beta), alpha**2 / (4 * beta)
      grad = np.array([1 / (2 * beta), -alpha / (2 * beta ** 2)])
    else:
      d_peak = float(np.exp(alpha / beta - 1.0))
      r_peak = beta * d_peak
      grad = d_peak * np.array([1 / beta, -alpha / beta ** 2])
  else:
    d_peak, r_peak = float("inf"), float("nan")
  d_peak_se = float("nan")
  if grad is not None and np.all(np.isfinite(grad)) and np.all(np.isfinite(cov)):
    with np.errstate(over="ignore", invalid="ignore"):
      d_peak_se = float(np.sqrt(grad @ cov @ grad))
  rmse = float(np.sqrt(np.mean(resid ** 2)))
  return GaoFit(form=form, alpha=alpha, beta=beta, d_peak=float(d_peak), r_peak=float(r_peak),
                rmse=rmse, n_points=int(n), alpha_se=float(np.sqrt(cov[0, 0])),
                beta_se=float(np.sqrt(cov[1, 1])), d_peak_se=d_peak_se, chi2_red=chi2_red)
