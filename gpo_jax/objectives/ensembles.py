"""Conservative reward-model ensemble objectives: mean, worst-case and uncertainty-weighted.

Every function here is pure math on an ensemble's scores ``scores_KxB``: ``K`` reward
models (members) each scoring the same ``B`` samples (any trailing shape after ``K`` is
allowed). The functions accept NumPy arrays and JAX arrays alike and never import JAX:
the array namespace is taken from the inputs (``__array_namespace__``), so analysis code
can call them on NumPy data without initialising JAX, while training code can call them
under ``jit``/``vmap``/``grad``.

Objectives, in the order of :data:`OBJECTIVES` (Coste et al. 2023, section 4):

* ``mean``: ``mean_k r_k``, the plain ensemble average;
* ``wco`` (worst-case optimisation): ``min_k r_k``;
* ``uwo`` (uncertainty-weighted optimisation): ``mean_k r_k - lam * Var_k r_k`` with the
  population variance (``ddof = 0``) across members -- the variance, not the standard
  deviation, as in the paper.

An optional member mask ``mask_K`` (0/1 or boolean, shared by all samples) restricts
every statistic to the members with mask 1; masked-out members may hold any value,
including ``inf``/``nan``, without affecting the result.

References:
  Coste, Anwar, Kirk, Krueger 2023, "Reward Model Ensembles Help Mitigate
  Overoptimization", arXiv 2310.02743.
  Gao, Schulman, Hilton 2022, "Scaling Laws for Reward Model Overoptimization",
  arXiv 2210.10760.
"""

import numpy as np

OBJECTIVES = ("mean", "wco", "uwo")


def _namespace(*xs):
  """The array namespace of the first non-NumPy array-API input, else NumPy.

  NumPy scalars, arrays and Python numbers give NumPy; a JAX array or tracer anywhere
  among ``xs`` gives ``jax.numpy`` so that traced selectors and masks stay traced.
  """
  for x in xs:
    if isinstance(x, (np.ndarray, np.generic)):
      continue
    get = getattr(x, "__array_namespace__", None)
    if get is not None:
      return get()
  return np


def _concrete(x):
  """``x`` as a NumPy array, or None when it is a JAX tracer (value not yet known)."""
  try:
    return np.asarray(x)
  except TypeError:  # jax.errors.TracerArrayConversionError and friends are TypeErrors.
    return None


def _check_lam(lam) -> None:
  v = _concrete(lam)
  if v is None:
    return
  if v.dtype.kind not in "fiu" or not np.all(v >= 0):  # also rejects nan
    raise ValueError(f"uwo variance penalty lam must be >= 0, got {lam!r}.")


def _prepare(scores_KxB, mask_K, xp):
  """Validates shapes and returns ``(x, w)``: scores and a ``[K, 1, ...]`` boolean mask or None."""
  x = xp.asarray(scores_KxB)
  if x.ndim < 1 or x.shape[0] < 1:
    raise ValueError(
        f"scores_KxB needs a leading ensemble axis with at least one member, "
        f"got shape {tuple(x.shape)}.")
  if mask_K is None:
    return x, None
  m = xp.asarray(mask_K)
  if tuple(m.shape) != (x.shape[0],):
    raise ValueError(
        f"mask_K must have shape ({x.shape[0]},) to match scores_KxB {tuple(x.shape)}, "
        f"got {tuple(m.shape)}.")
  v = _concrete(mask_K)
  if v is not None:
    if not np.all((v == 0) | (v == 1)):
      raise ValueError(f"mask_K must hold only 0/1 (or booleans), got {v!r}.")
    if not np.any(v == 1):
      raise ValueError("mask_K selects no ensemble member; at least one must be 1.")
  w = (m != 0).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
  return x, w


def _mean(x, w, xp):
  if w is None:
    return x.mean(axis=0)
  n = w.sum(axis=0)
  return xp.where(w, x, 0).sum(axis=0) / n


def _min(x, w, xp):
  if w is None:
    return x.min(axis=0)
  return xp.where(w, x, xp.inf).min(axis=0)


def _var(x, w, mean, xp):
  """Population variance (``ddof = 0``) across members about ``mean``."""
  if w is None:
    return ((x - mean) ** 2).mean(axis=0)
  n = w.sum(axis=0)
  # Select before squaring: a masked-out inf member then gets a zero (not nan) gradient.
  return (xp.where(w, x - mean, 0) ** 2).sum(axis=0) / n


def combine(scores_KxB, objective: str, lam: float = 0.0, mask_K=None):
  """Combines an ensemble's scores into one conservative reward per sample.

  Args:
    scores_KxB: ``[K, ...]`` scores of the same samples by ``K`` ensemble members
      (NumPy or JAX array).
    objective: one of :data:`OBJECTIVES`: ``"mean"``, ``"wco"`` (worst case, ``min_k``)
      or ``"uwo"`` (``mean_k - lam * Var_k``, population variance).
    lam: non-negative variance penalty, used by ``uwo`` only. It may be traced; it is
      validated only when its value is known.
    mask_K: optional ``[K]`` 0/1 or boolean mask, shared by all samples; only members
      with mask 1 take part (masked mean, masked minimum, variance about the masked
      mean). ``None`` uses every member.

  Returns:
    ``[...]`` combined scores (the ``K`` axis reduced), in the namespace of the inputs.

  Raises:
    ValueError: on an unknown objective, a negative (or nan) concrete ``lam``, a mask of
      the wrong shape, or a concrete mask that is not 0/1 or selects no member.

  References:
    Coste et al. 2023, arXiv 2310.02743 (WCO and UWO, their section 4).
  """
  if objective not in OBJECTIVES:
    raise ValueError(
        f"Unknown ensemble objective {objective!r}; expected one of {OBJECTIVES}.")
  _check_lam(lam)
  xp = _namespace(scores_KxB, mask_K, lam)
  x, w = _prepare(scores_KxB, mask_K, xp)
  if objective == "wco":
    return _min(x, w, xp)
  mean = _mean(x, w, xp)
  if objective == "mean":
    return mean
  return mean - lam * _var(x, w, mean, xp)


def combine_switched(scores_KxB, objective_idx, lam, mask_K=None):
  """:func:`combine` with the objective chosen by a (possibly traced) integer.

  All three objectives are computed and the result selected with a ``where`` chain, so
  ``objective_idx``, ``lam`` and ``mask_K`` may all be traced (e.g. one sweep member per
  ``vmap`` lane under ``jit``). An ``objective_idx`` outside ``[0, 3)`` raises when its
  value is known and yields ``nan`` when traced. Gradients flow only through the
  selected objective (the unselected branches receive zero cotangent and are finite
  whenever at least one member is unmasked).

  Args:
    scores_KxB: ``[K, ...]`` member scores (NumPy or JAX array).
    objective_idx: integer scalar, the index into :data:`OBJECTIVES`
      (0 ``mean``, 1 ``wco``, 2 ``uwo``).
    lam: non-negative ``uwo`` variance penalty (scalar; may be traced).
    mask_K: optional ``[K]`` 0/1 or boolean member mask (may be traced).

  Returns:
    ``[...]`` combined scores.

  Raises:
    ValueError: as :func:`combine`, or on a concrete out-of-range ``objective_idx``.

  References:
    Coste et al. 2023, arXiv 2310.02743.
  """
  idx = _concrete(objective_idx)
  if idx is not None:
    if idx.shape != () or idx.dtype.kind not in "iu" or not 0 <= idx < len(OBJECTIVES):
      raise ValueError(
          f"objective_idx must be an integer scalar in [0, {len(OBJECTIVES)}) indexing "
          f"{OBJECTIVES}, got {objective_idx!r}.")
  _check_lam(lam)
  xp = _namespace(scores_KxB, objective_idx, lam, mask_K)
  x, w = _prepare(scores_KxB, mask_K, xp)
  mean = _mean(x, w, xp)
  worst = _min(x, w, xp)
  uwo = mean - lam * _var(x, w, mean, xp)
  return xp.where(objective_idx == 0, mean,
                  xp.where(objective_idx == 1, worst,
                           xp.where(objective_idx == 2, uwo, xp.nan)))
