"""Best-of-n baseline: the analytic KL of best-of-n and the unbiased best-of-n estimator over a sample pool."""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import special


def kl_bon(n):
  """KL(π_bon‖π_ref) of best-of-n sampling, ``log n − (n − 1)/n`` nats.

  Exact for a continuous selecting score; with ties it is an upper bound.

  Args:
    n: number of candidates, an integer or array of integers ``>= 1``.

  Returns:
    The KL in nats, same shape as ``n``.

  References:
    Stiennon et al. 2020 (arXiv 2009.01325), appendix; Gao, Schulman, Hilton 2023
    (arXiv 2210.10760), section 2.
  """
  n_arr = np.asarray(n, dtype=np.float64)
  if np.any(~np.isfinite(n_arr)) or np.any(n_arr < 1) or np.any(n_arr != np.round(n_arr)):
    raise ValueError(f"kl_bon needs integer n >= 1, got {n!r}")
  return np.log(n_arr) - (n_arr - 1.0) / n_arr


def bon_weights(N: int, ns=None) -> np.ndarray:
  """Weights of the sorted pool in the unbiased best-of-n estimator.

  ``w[n, i] = C(i − 1, n − 1) / C(N, n)`` for the ``i``-th smallest selecting score
  (1-based ``i >= n``, else 0): the probability that the ``i``-th element is the best
  of a uniformly random ``n``-subset. Computed in log space, so ``N`` in the thousands
  is fine.

  Args:
    N: pool size.
    ns: the subset sizes (default ``1..N``), each in ``[1, N]``.

  Returns:
    ``[len(ns), N]`` weights; every row sums to 1.

  References:
    Nakano et al. 2021 (arXiv 2112.09332), appendix; Gao et al. 2023 (arXiv 2210.10760).
  """
  if int(N) != N or N < 1:
    raise ValueError(f"pool size N must be a positive integer, got {N!r}")
  N = int(N)
  ns_arr = np.arange(1, N + 1) if ns is None else np.asarray(ns, dtype=np.int64).reshape(-1)
  if ns_arr.size == 0 or np.any(ns_arr < 1) or np.any(ns_arr > N):
    raise ValueError(f"every n must lie in [1, N={N}], got {ns_arr.tolist()}")
  i = np.arange(1, N + 1, dtype=np.float64)[None, :]
  n = ns_arr.astype(np.float64)[:, None]
  valid = i >= n
  # log C(a, b) = lgamma(a+1) - lgamma(b+1) - lgamma(a-b+1); clip keeps invalid cells finite.
  a, b = i - 1.0, n - 1.0
  log_num = special.gammaln(a + 1) - special.gammaln(b + 1) - special.gammaln(np.maximum(a - b, 0) + 1)
  log_den = special.gammaln(N + 1.0) - special.gammaln(n + 1) - special.gammaln(N - n + 1)
  return np.where(valid, np.exp(np.where(valid, log_num - log_den, 0.0)), 0.0)


def _tie_averaged(sorted_select_PxN: np.ndarray, sorted_gold_PxN: np.ndarray) -> np.ndarray:
  """Replaces gold by its mean within each run of tied selecting scores (per row)."""
  out = sorted_gold_PxN.copy()
  for p in np.flatnonzero(np.any(np.diff(sorted_select_PxN, axis=1) == 0, axis=1)):
    s, g = sorted_select_PxN[p], sorted_gold_PxN[p]
    _, start, count = np.unique(s, return_index=True, return_counts=True)
    for st, c in zip(start, count):
      if c > 1:
        out[p, st:st + c] = g[st:st + c].mean()
  return out


@dataclasses.dataclass(frozen=True)
class BonCurve:
  """Best-of-n gold estimates for each ``n`` (means and standard errors across prompts)."""
  n: np.ndarray
  kl: np.ndarray
  gold: np.ndarray
  gold_se: np.ndarray
  N: int
  num_prompts: int
  selector: str

  def to_json_dict(self) -> dict:
    """The ``bon.json`` layout of ARCHITECTURE.md ("Metrics on disk")."""
    return {"selector": self.selector, "N": int(self.N), "n": [int(v) for v in self.n],
            "kl": [float(v) for v in self.kl], "gold": [float(v) for v in self.gold],
            "gold_se": [float(v) for v in self.gold_se]}


def per_prompt(select_PxN, measure_PxN=None, ns=None) -> np.ndarray:
  """Per-prompt unbiased best-of-n estimates ``[P, len(ns)]`` of ``measure`` under ``select``.

  The estimator of :func:`best_of_n` before averaging over prompts: row ``p`` holds, for
  each ``n``, the exact mean of ``measure`` at the best (by ``select``) of a uniformly
  random ``n``-subset of prompt ``p``'s pool (ties averaged). ``measure`` may be gold (the
  usual curve) or the selecting proxy itself (the proxy's own curve). Paired tests across
  ``n`` or across selectors use these rows: every curve is on the same prompts.
  """
  s = np.atleast_2d(np.asarray(select_PxN, dtype=np.float64))
  g = s if measure_PxN is None else np.atleast_2d(np.asarray(measure_PxN, dtype=np.float64))
  if s.ndim != 2 or s.shape != g.shape:
    raise ValueError(f"select and gold must both be [P, N]; got {s.shape} and {g.shape}")
  if not (np.all(np.isfinite(s)) and np.all(np.isfinite(g))):
    raise ValueError("best_of_n got non-finite scores; drop those samples first")
  N = s.shape[1]
  order = np.argsort(s, axis=1, kind="stable")
  s_sorted = np.take_along_axis(s, order, axis=1)
  g_sorted = _tie_averaged(s_sorted, np.take_along_axis(g, order, axis=1))
  ns_arr = np.arange(1, N + 1) if ns is None else np.asarray(ns, dtype=np.int64).reshape(-1)
  return g_sorted @ bon_weights(N, ns_arr).T


def best_of_n(select_PxN, gold_PxN=None, ns=None, selector: str = "gold") -> BonCurve:
  """Unbiased best-of-n gold over pools of ``N`` samples per prompt, for every ``n``.

  Per prompt the pool is sorted by the selecting score ``s_(1) <= ... <= s_(N)`` and
  ``E_n = Σ_{i=n}^{N} C(i−1, n−1)/C(N, n) · gold_(i)``, the exact mean gold of the best
  of a uniformly random ``n``-subset of the pool. Ties in the selecting score are
  broken uniformly at random *in expectation*: gold is averaged within each tied group
  before weighting, which is the expectation of the estimator over random tie-breaks.
  The mean is across prompts, the standard error is ``std(ddof=1)/sqrt(P)`` across
  prompts (NaN for one prompt). Pass reference-subtracted gold to get the units of
  ``gold/reward``.

  Args:
    select_PxN: selecting scores (gold itself, or a proxy), ``[P, N]`` or ``[N]``.
    gold_PxN: gold scores of the same samples; ``None`` means select by gold.
    ns: subset sizes to report (default ``1..N``).
    selector: name recorded in the result (e.g. ``"gold"``, ``"proxy"``).

  Returns:
    A ``BonCurve`` with ``kl = kl_bon(n)``.

  References:
    Gao, Schulman, Hilton 2023 (arXiv 2210.10760), appendix on the unbiased estimator.
  """
  est_Pxn = per_prompt(select_PxN, gold_PxN, ns)
  P, N = np.atleast_2d(np.asarray(select_PxN)).shape
  ns_arr = np.arange(1, N + 1) if ns is None else np.asarray(ns, dtype=np.int64).reshape(-1)
  mean = est_Pxn.mean(axis=0)
  se = est_Pxn.std(axis=0, ddof=1) / np.sqrt(P) if P > 1 else np.full_like(mean, np.nan)
  return BonCurve(n=ns_arr, kl=kl_bon(ns_arr), gold=mean, gold_se=se, N=N,
                  num_prompts=P, selector=selector)
