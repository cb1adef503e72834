"""Descriptive per-family statistics: the highest gold reached, gold per β at a step budget, the argmax β."""

from __future__ import annotations

import numpy as np
import pandas as pd

GOLD, GOLD_SE = "gold/reward", "gold/reward_se"


def _se(row_or_rows) -> np.ndarray:
  if GOLD_SE in row_or_rows:
    return np.asarray(row_or_rows[GOLD_SE], float)
  return np.full(np.shape(row_or_rows[GOLD]), np.nan)


def family_overoptimization(valid: pd.DataFrame) -> pd.DataFrame:
  """Per family, pooled over β and steps: the highest gold, its SE and KL (descriptive).

  The maximum over many noisy points is biased upwards; whether gold *falls* is tested per
  member on held-out prompts (:func:`gpo_jax.analysis.evidence.member_peak_tests`).
  """
  rows = []
  for f, g in valid.groupby("family", sort=False):
    se = _se(g)
    ip = int(np.argmax(g[GOLD].to_numpy()))
    peak = g.iloc[ip]
    rows.append({"family": f, "peak_gold": float(peak[GOLD]), "peak_gold_se": float(se[ip]),
                 "kl_at_peak": float(peak["kl"]), "step_at_peak": float(peak["step"]),
                 "beta_at_peak": float(peak["beta"]), "kl_max": float(g["kl"].max())})
  return pd.DataFrame(rows)


def budget_step(table: pd.DataFrame, step: float | None = None) -> float:
  """The step budget: ``step`` if given (must be an evaluated step), else the final eval step."""
  steps = np.unique(table["step"].to_numpy(float))
  if step is None:
    return float(steps.max())
  if not np.any(np.isclose(steps, step)):
    raise ValueError(f"step budget {step} is not an evaluated step; evaluated steps are {steps.tolist()}")
  return float(step)


def at_budget(table: pd.DataFrame, step: float) -> pd.DataFrame:
  """Rows at the step budget of members that have not diverged by then."""
  diverged = table[(table["step"] <= step) & table["diverged"]]["member"].unique()
  rows = table[np.isclose(table["step"], step) & ~table["member"].isin(diverged)]
  return rows[np.isfinite(rows[GOLD])]


def gold_by_beta(table: pd.DataFrame, step: float | None = None) -> pd.DataFrame:
  """Gold (mean over seeds) per (family, β) at the step budget, with beta_eff and KL."""
  step = budget_step(table, step)
  rows = at_budget(table, step)
  out = []
  for (f, b), g in rows.groupby(["family", "beta"], sort=False):
    k = len(g)
    se = g[GOLD].std(ddof=1) / np.sqrt(k) if k > 1 else float(_se(g)[0])
    out.append({"family": f, "beta": float(b), "beta_eff": float(g["beta_eff"].mean()),
                "gold": float(g[GOLD].mean()), "gold_se": float(se), "kl": float(g["kl"].mean()),
                "seeds": k, "step": step})
  out = pd.DataFrame(out)
  order = {f: i for i, f in enumerate(dict.fromkeys(table["family"]))}
  return out.sort_values(["family", "beta"], key=lambda c: c.map(order) if c.name == "family" else c,
                         kind="stable").reset_index(drop=True)


def best_beta(table: pd.DataFrame, step: float | None = None) -> pd.DataFrame:
  """Per family, the β with the highest gold at the step budget, its beta_eff and KL.

  ``edge`` is ``"low"``/``"high"`` when the best β is the smallest/largest β swept for
  the family, i.e. the optimum may lie outside the grid.
  """
  by_beta = gold_by_beta(table, step)
  out = []
  for f, g in by_beta.groupby("family", sort=False):
    i = int(np.argmax(g["gold"].to_numpy()))
    best = g.iloc[i]
    edge = "" if len(g) < 2 else ("low" if i == 0 else "high" if i == len(g) - 1 else "")
    out.append({"family": f, "best_beta": float(best["beta"]), "best_beta_eff": float(best["beta_eff"]),
                "gold_at_best": float(best["gold"]), "kl_at_best": float(best["kl"]),
                "n_betas": int(len(g)), "edge": edge, "step": float(best["step"])})
  return pd.DataFrame(out)


def spread_ratio(values) -> float:
  """max/min of the positive values (NaN with fewer than two)."""
  v = np.asarray(values, float)
  v = v[np.isfinite(v) & (v > 0)]
  return float(v.max() / v.min()) if v.size >= 2 else float("nan")
