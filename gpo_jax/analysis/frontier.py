"""Gold-vs-KL frontiers: upper envelopes, Pareto sets, and the gap between two families' frontiers."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pandas as pd

X_COL, Y_COL = "sqrt_kl", "gold/reward"
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 spells it trapz


def running_max(x, y) -> tuple[np.ndarray, np.ndarray]:
  """Upper envelope ``F(x) = max{y_j : x_j <= x}`` at the sorted sample positions.

  Returns:
    ``(x_sorted, F(x_sorted))``, both non-decreasing.
  """
  x, y = np.asarray(x, float), np.asarray(y, float)
  order = np.lexsort((-y, x))
  return x[order], np.maximum.accumulate(y[order])


def envelope_at(x_sorted, env, grid) -> np.ndarray:
  """Evaluates the step-function envelope on ``grid``; NaN left of the first sample."""
  idx = np.searchsorted(x_sorted, np.asarray(grid, float), side="right") - 1
  return np.where(idx >= 0, env[np.clip(idx, 0, None)], np.nan)


def pareto_mask(x, y) -> np.ndarray:
  """Boolean mask of Pareto-optimal points (no other point has less-or-equal x and more y).

  Of exactly duplicated points only one is kept.
  """
  x, y = np.asarray(x, float), np.asarray(y, float)
  order = np.lexsort((-y, x))
  best = np.concatenate([[-np.inf], np.maximum.accumulate(y[order])[:-1]])
  mask = np.zeros(x.shape, bool)
  mask[order] = y[order] > best
  return mask


@dataclasses.dataclass
class Frontier:
  """A family's frontier: the step envelope in sqrt-KL and its Pareto points."""
  family: str
  x: np.ndarray         # sorted sqrt-KL of every valid point
  envelope: np.ndarray  # running max of gold over sqrt-KL <= x
  pareto: pd.DataFrame  # the Pareto-optimal rows, sorted by sqrt-KL

  def __call__(self, grid) -> np.ndarray:
    return envelope_at(self.x, self.envelope, grid)

  def polyline(self, grid) -> np.ndarray:
    """The frontier through its Pareto points, linear between them and flat after the last.

    The staircase :meth:`__call__` lags a rising curve by its slope times the spacing of
    the points, so two families whose runs sample KL at different places differ by the
    sampling alone; the polyline's error is second order in the spacing. NaN left of the
    first point.
    """
    px = self.pareto["sqrt_kl"].to_numpy(float)
    py = self.pareto["gold/reward"].to_numpy(float)
    grid = np.asarray(grid, float)
    out = np.interp(grid, px, py)
    return np.where(grid >= px[0], out, np.nan)

  @property
  def range(self) -> tuple[float, float]:
    return float(self.x[0]), float(self.x[-1])

  def line(self) -> tuple[np.ndarray, np.ndarray]:
    """The points to draw :meth:`polyline`: the Pareto points, then flat from the last one to
    the family's largest sqrt KL."""
    px = self.pareto["sqrt_kl"].to_numpy(float)
    py = self.pareto["gold/reward"].to_numpy(float)
    hi = self.range[1]
    if hi > px[-1]:
      px, py = np.append(px, hi), np.append(py, py[-1])
    return px, py


def frontier_of(points: pd.DataFrame, family: str = "") -> Frontier:
  """The frontier of a set of (sqrt_kl, gold/reward) rows (across β and steps)."""
  if points.empty:
    raise ValueError(f"family {family!r} has no valid (non-diverged, finite) points")
  x, y = points[X_COL].to_numpy(float), points[Y_COL].to_numpy(float)
  xs, env = running_max(x, y)
  pareto = points[pareto_mask(x, y)].sort_values(X_COL)
  return Frontier(family=family, x=xs, envelope=env, pareto=pareto)


def family_frontiers(valid: pd.DataFrame) -> dict[str, Frontier]:
  """One frontier per family from the valid rows of a run table."""
  return {f: frontier_of(g, f) for f, g in valid.groupby("family", sort=False)}


def frontier_gap(a: Frontier, b: Frontier, num: int = 512) -> dict:
  """Mean absolute gap between two frontiers over their common sqrt-KL range.

  This is the area between the two frontiers (:meth:`Frontier.polyline`) divided by the
  width of the range.

  Returns:
    ``{"gap": mean |F_a − F_b|, "lo": .., "hi": ..}``; the gap is NaN if the ranges do
    not overlap.
  """
  lo = max(a.range[0], b.range[0])
  hi = min(a.range[1], b.range[1])
  if not hi > lo:
    return {"gap": float("nan"), "lo": lo, "hi": hi}
  grid = np.linspace(lo, hi, num)
  diff = np.abs(a.polyline(grid) - b.polyline(grid))
  return {"gap": float(_trapezoid(diff, grid) / (hi - lo)), "lo": lo, "hi": hi}


def overlap_table(frontiers: dict[str, Frontier]) -> pd.DataFrame:
  """Pairwise frontier gaps, one row per family pair, with the gap relative to the gold scale.

  The scale is the spread of frontier gold over all families (max − min of every
  envelope), so ``rel_gap`` is comparable across runs with different reward units.
  """
  all_env = np.concatenate([f.envelope for f in frontiers.values()])
  scale = float(all_env.max() - all_env.min()) if all_env.size else float("nan")
  rows = []
  for (na, a), (nb, b) in itertools.combinations(frontiers.items(), 2):
    g = frontier_gap(a, b)
    rows.append({"family_a": na, "family_b": nb, **g, "scale": scale,
                 "rel_gap": g["gap"] / scale if scale > 0 else float("nan")})
  return pd.DataFrame(rows, columns=["family_a", "family_b", "gap", "lo", "hi", "scale", "rel_gap"])
