"""Statistics with power (SPEC §4): prompt-clustered standard errors, paired differences, the held-out peak-and-fall test, minimum detectable effects, curve registration.

Every policy is evaluated on the same prompts, so the unit of replication is the prompt:
samples of one prompt share it and are not independent, and two policies (or two steps of
one policy) are compared prompt by prompt. The evaluator saves per-prompt means
(``per_prompt/<step>.npz``, ``[M, E]``); everything here works on such arrays.

* :func:`cluster_mean_se`: the mean of clustered samples and its cluster-robust (CR1)
  standard error; with equal cluster sizes it is the SE of the cluster means.
* :func:`paired`: the mean of per-prompt differences, its SE, z and one-sided p.
* :func:`held_out_peak_test`: does one member's gold fall after its own peak? The peak
  step is chosen on one half of the prompts and the drop to the final step measured on the
  other half, so the maximum's upward bias (winner's curse) does not enter the test.
* :func:`min_detectable`: the smallest true effect a test detects with the given power.
* :func:`register_shift`: the horizontal shift between two curves on a log axis (used for
  "where is the best β" without an argmax), with :func:`bootstrap_prompts` for intervals.

References:
  Cameron & Miller 2015, "A Practitioner's Guide to Cluster-Robust Inference" (CR1).
  Miller 2024, "Adding Error Bars to Evals" (arXiv 2411.00640): clustered and paired SEs
  for evaluations.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import special, stats

#: one-sided test level and power of every test and minimum detectable effect
ALPHA, POWER = 0.05, 0.8


def normal_quantile(p: float) -> float:
  """Φ⁻¹(p)."""
  if not 0.0 < p < 1.0:
    raise ValueError(f"normal_quantile needs 0 < p < 1, got {p}")
  return float(special.ndtri(p))


def normal_cdf(x: float) -> float:
  return float(special.ndtr(x))


def min_detectable(se: float, alpha: float = ALPHA, power: float = POWER) -> float:
  """Smallest true effect a one-sided z-test at level ``alpha`` detects with ``power``."""
  return float((normal_quantile(1 - alpha) + normal_quantile(power)) * se)


def cluster_mean_se(values, clusters=None) -> tuple[float, float, int]:
  """Mean of samples and its cluster-robust standard error; returns ``(mean, se, n_clusters)``.

  Without ``clusters`` each value is its own cluster (e.g. per-prompt means). The CR1
  estimator ``SE² = G/(G−1) · Σ_g (Σ_{i∈g} (x_i − x̄))² / N²`` reduces to the SE of the
  cluster means when clusters have equal sizes.
  """
  x = np.asarray(values, np.float64).ravel()
  if clusters is None:
    clusters = np.arange(x.size)
  g_ids = np.asarray(clusters).ravel()
  if g_ids.shape != x.shape:
    raise ValueError(f"values {x.shape} and clusters {g_ids.shape} differ in shape")
  keep = np.isfinite(x)
  x, g_ids = x[keep], g_ids[keep]
  _, inv = np.unique(g_ids, return_inverse=True)
  g = int(inv.max()) + 1 if x.size else 0
  if g < 2:
    return (float(x.mean()) if x.size else float("nan")), float("nan"), g
  mean = float(x.mean())
  sums = np.bincount(inv, weights=x - mean, minlength=g)
  se = math.sqrt(g / (g - 1) * float(np.sum(sums ** 2)) / x.size ** 2)
  return mean, se, g


@dataclasses.dataclass(frozen=True)
class Paired:
  """A paired comparison over prompts: ``mean(a − b)``, its SE, z, one-sided p (``a > b``)."""
  diff: float
  se: float
  z: float
  p: float
  n: int
  mde: float

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def paired(a_E, b_E) -> Paired:
  """Paired difference of two per-prompt arrays (NaN prompts dropped from both)."""
  a, b = np.asarray(a_E, np.float64), np.asarray(b_E, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
  d = (a - b)[np.isfinite(a) & np.isfinite(b)]
  n = int(d.size)
  if n < 2:
    return Paired(float(d.mean()) if n else float("nan"), float("nan"), float("nan"),
                  float("nan"), n, float("nan"))
  mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(n))
  z = mean / se if se > 0 else (math.copysign(math.inf, mean) if mean else 0.0)
  return Paired(mean, se, float(z), float(1 - normal_cdf(z)), n, min_detectable(se))


def split_halves(n_prompts: int) -> tuple[np.ndarray, np.ndarray]:
  """The fixed prompt split of the held-out tests: even indices choose, odd ones measure.

  The lab's eval prompts are i.i.d. draws, so any fixed split is a random one.
  """
  idx = np.arange(n_prompts)
  return idx[0::2], idx[1::2]


@dataclasses.dataclass(frozen=True)
class PeakTest:
  """Held-out peak-and-fall test of one trajectory (see :func:`held_out_peak_test`)."""
  peak_index: int        # the step index chosen as the peak (on the selection half)
  end_index: int
  peak_gold: float       # measured on the held-out half
  end_gold: float
  drop: float            # peak_gold − end_gold on the held-out half
  se: float
  z: float
  p: float
  mde: float             # minimum detectable drop (ALPHA, POWER)
  falls: bool
  n_measure: int

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def held_out_peak_test(gold_SxE, end_index: int | None = None, *, alpha: float = ALPHA,
                       power: float = POWER, halves=None) -> PeakTest:
  """Does gold fall after the trajectory's own peak? One member, steps × prompts.

  The peak is the step before ``end_index`` (default: the last) with the highest mean gold
  on the *selection* half of the prompts; the drop from it to ``end_index`` is measured on
  the other half as a paired per-prompt difference. Choosing and measuring on disjoint
  prompts keeps the test's false-positive rate at ``alpha`` on flat trajectories (the
  maximum of noisy means is biased upwards; measured elsewhere it is not). ``falls`` is a
  one-sided z-test at ``alpha``.

  Args:
    gold_SxE: per-prompt gold (reference-subtracted or not: only differences enter) at the
      evaluated steps, in step order.
    end_index: the step compared with the peak (the largest-KL step; default the last).
    alpha: one-sided level.
    power: the power at which the minimum detectable drop is quoted.
    halves: ``(select_idx, measure_idx)`` prompt indices (default :func:`split_halves`).
  """
  g = np.asarray(gold_SxE, np.float64)
  if g.ndim != 2 or g.shape[0] < 2:
    raise ValueError(f"held_out_peak_test needs [steps >= 2, prompts], got shape {g.shape}")
  s = g.shape[0]
  end = s - 1 if end_index is None else int(end_index) % s
  if end == 0:
    raise ValueError("the end step must come after at least one earlier step")
  sel, mea = split_halves(g.shape[1]) if halves is None else halves
  peak = int(np.argmax(np.nanmean(g[:end][:, sel], axis=1)))
  t = paired(g[peak, mea], g[end, mea])
  crit = normal_quantile(1 - alpha)
  falls = bool(np.isfinite(t.z) and t.z >= crit)
  return PeakTest(peak, end, float(np.nanmean(g[peak, mea])), float(np.nanmean(g[end, mea])),
                  t.diff, t.se, t.z, t.p, min_detectable(t.se, alpha, power), falls, t.n)


def binomial_tail(k: int, n: int, p: float) -> float:
  """``P(X >= k)`` for ``X ~ Binomial(n, p)``: how surprising ``k`` rejections of ``n`` tests are."""
  return float(stats.binom.sf(k - 1, n, p))


# ---------------------------------------------------------------------- curve registration
def register_shift(x_ref, y_ref, x, y, *, max_shift: float | None = None, num: int = 401,
                   min_overlap: float = 0.5) -> float:
  """Horizontal shift ``δ`` with ``y(t) ≈ a·y_ref(t − δ) + c``, ``a > 0``: where one curve sits relative to another.

  Each curve is linearly interpolated between its own points (e.g. gold vs log β_eff; the
  abscissae may differ); for each candidate ``δ`` the scale ``a`` and offset ``c`` are the
  least-squares fit over the overlap (curves may peak at different heights and reach
  different gold), and ``δ`` minimises the residual, measured in the reference's units. A
  positive ``δ`` means ``y`` reaches the same shape at larger ``t``. It uses the whole curve, not its argmax, so it resolves shifts finer than the grid.

  Args:
    x_ref, y_ref: the reference curve (NaN points dropped).
    x, y: the curve to place.
    max_shift: search range ``[-max_shift, max_shift]`` (default: half the joint x range).
    num: candidate shifts.
    min_overlap: the shifted curves must overlap on this fraction of the shorter curve's range.
  """
  xa, a = np.asarray(x_ref, np.float64), np.asarray(y_ref, np.float64)
  xb, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
  ka, kb = np.isfinite(a) & np.isfinite(xa), np.isfinite(b) & np.isfinite(xb)
  if ka.sum() < 3 or kb.sum() < 3:
    return float("nan")
  xa, a, xb, b = xa[ka], a[ka], xb[kb], b[kb]
  oa, ob = np.argsort(xa), np.argsort(xb)
  xa, a, xb, b = xa[oa], a[oa], xb[ob], b[ob]
  width = max(xa.max(), xb.max()) - min(xa.min(), xb.min())
  shorter = min(xa.max() - xa.min(), xb.max() - xb.min())
  max_shift = width / 2 if max_shift is None else max_shift
  deltas = np.linspace(-max_shift, max_shift, num)
  lo = np.maximum(xa.min(), xb.min() - deltas)
  hi = np.minimum(xa.max(), xb.max() - deltas)
  ok = hi - lo >= min_overlap * shorter
  if not ok.any():
    return float("nan")
  deltas, lo, hi = deltas[ok], lo[ok], hi[ok]
  t = np.linspace(0.0, 1.0, 64)[None, :]
  grid = lo[:, None] + (hi - lo)[:, None] * t                    # [D, 64]
  u = np.interp(grid, xa, a)
  v = np.interp(grid + deltas[:, None], xb, b)
  du, dv = u - u.mean(1, keepdims=True), v - v.mean(1, keepdims=True)
  scale = np.sum(du * dv, 1) / np.maximum(np.sum(du * du, 1), 1e-300)
  with np.errstate(divide="ignore", invalid="ignore"):
    # in the reference's units; anti-aligned shapes (scale <= 0) are not a registration
    err = np.where(scale > 0, np.mean((dv - scale[:, None] * du) ** 2, 1) / scale ** 2, np.inf)
  if not np.isfinite(err).any():
    return float("nan")
  best = float(deltas[int(np.argmin(err))])
  return best


def bootstrap_prompts(stat, n_prompts: int, *, reps: int = 200, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float, np.ndarray]:
  """Percentile interval of ``stat(prompt_idx)`` over prompt resamples (with replacement).

  ``stat`` receives an index array into the prompt axis; the same resample is used for
  every policy inside one call, so comparisons stay paired.
  """
  rng = np.random.default_rng(seed)
  vals = np.array([stat(rng.integers(0, n_prompts, n_prompts)) for _ in range(reps)], float)
  ok = vals[np.isfinite(vals)]
  if ok.size < reps // 2:
    return float("nan"), float("nan"), vals
  q = (1 - level) / 2
  return float(np.quantile(ok, q)), float(np.quantile(ok, 1 - q)), vals
