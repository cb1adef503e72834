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


def fit_gao(d, r, form: str) -> GaoFit:
  """Least-squares fit of a Gao form through the origin.

  Both forms are linear in (α, β): best-of-n regresses ``r`` on ``[d, −d²]``, RL on
  ``[d, −d log d]`` (points with ``d <= 0`` carry no information there and are dropped).
  Peaks: best-of-n ``d* = α/(2β)``, ``R* = α²/(4β)``; RL ``d* = exp(α/β − 1)``,
  ``R* = β d*``.

  Args:
    d: sqrt-KL values.
    r: gold rewards (reference-subtracted).
    form: ``"bon"`` or ``"rl"``.

  Returns:
    A ``GaoFit``; ``rmse`` is over the points used.

  References:
    Gao, Schulman, Hilton 2023 (arXiv 2210.10760), section 3.
  """
  if form not in FORMS:
    raise ValueError(f"unknown Gao form {form!r}; choose one of {FORMS}")
  d, r = np.asarray(d, float).ravel(), np.asarray(r, float).ravel()
  keep = np.isfinite(d) & np.isfinite(r) & (d > 0)
  d, r = d[keep], r[keep]
  if d.size < 2 or np.unique(d).size < 2:
    raise ValueError(f"fit_gao({form!r}) needs at least 2 distinct d > 0, got {d.size} points")
  second = d * d if form == "bon" else d * np.log(d)
  design = np.stack([d, -second], axis=1)
  (alpha, beta), *_ = np.linalg.lstsq(design, r, rcond=None)
  alpha, beta = float(alpha), float(beta)
  # exp() overflows past ~709: an RL peak that far out means "no peak" in any reachable KL.
  if beta > 0 and not (form == "rl" and alpha / beta - 1.0 > 700.0):
    if form == "bon" and alpha <= 0:
      d_peak, r_peak = 0.0, 0.0  # decreasing for every d > 0: the best is not to move
    elif form == "bon":
      d_peak, r_peak = alpha / (2 * beta), alpha**2 / (4 * beta)
    else:
      d_peak = float(np.exp(alpha / beta - 1.0))
      r_peak = beta * d_peak
  else:
    d_peak, r_peak = float("inf"), float("nan")
  rmse = float(np.sqrt(np.mean((design @ np.array([alpha, beta]) - r) ** 2)))
  return GaoFit(form=form, alpha=alpha, beta=beta, d_peak=float(d_peak), r_peak=float(r_peak),
                rmse=rmse, n_points=int(d.size))
