"""Findings for SPEC §7 items 1–3, written from the computed statistics with explicit pass/fail criteria."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """Decision rules behind the findings (stated in the report next to each verdict).

  Attributes:
    overlap_rel_gap: frontiers overlap when the largest pairwise mean absolute gap,
      divided by the spread of frontier gold, is below this.
    drop_z: a peak-to-end drop must be at least this many standard errors...
    min_rel_drop: ...and at least this fraction of the peak to count as "gold falls".
  """
  overlap_rel_gap: float = 0.1
  drop_z: float = 3.0
  min_rel_drop: float = 0.05


@dataclasses.dataclass(frozen=True)
class Finding:
  """One generated finding: a verdict on a paper claim and the sentence(s) citing its numbers."""
  key: str
  question: str
  verdict: str
  text: str


def fmt(x) -> str:
  """Numbers as cited in findings: 3 significant digits, integers exact."""
  x = float(x)
  if not np.isfinite(x):
    return "n/a"
  if x.is_integer() and abs(x) < 1e6:
    return str(int(x))
  return f"{x:.3g}"


def _names(fams) -> str:
  return ", ".join(fams)


def frontier_overlap(overlap: pd.DataFrame, overview: dict, th: Thresholds) -> Finding:
  """SPEC §7.1: do the families' gold-vs-KL frontiers coincide?"""
  q = "Do the gold-vs-KL frontiers of the families overlap?"
  ok = overlap.dropna(subset=["rel_gap"])
  if ok.empty:
    return Finding("overlap", q, INCONCLUSIVE,
                   "Cannot compare frontiers: fewer than two families share a sqrt-KL range.")
  w = ok.loc[ok["rel_gap"].idxmax()]
  overlaps = w["rel_gap"] < th.overlap_rel_gap
  text = (f"The frontiers of the {fmt(overview['n_families'])} families {'overlap' if overlaps else 'do not overlap'}: "
          f"the largest mean absolute gap between two frontiers over their common sqrt-KL range is "
          f"{fmt(w['gap'])} ({w['family_a']} vs {w['family_b']}, sqrt-KL {fmt(w['lo'])} to {fmt(w['hi'])}), "
          f"which is {fmt(w['rel_gap'])} of the frontier gold spread {fmt(w['scale'])}, "
          f"{'below' if overlaps else 'not below'} the threshold {fmt(th.overlap_rel_gap)}. "
          f"Averaged over all {fmt(overview['n_pairs'])} pairs the relative gap is {fmt(overview['mean_rel_gap'])}.")
  if not overlaps:
    text += (f" {fmt(overview['n_pairs_above'])} of {fmt(overview['n_pairs'])} pairs exceed the threshold, "
             "so the data do not show GPO's similar trade-offs across families.")
  return Finding("overlap", q, SUPPORTED if overlaps else NOT_SUPPORTED, text)


def best_beta_alignment(best: pd.DataFrame, overview: dict) -> Finding:
  """SPEC §7.2: is the best β explained by f''(0)/|f'(0)|, i.e. do best beta_eff values align?"""
  q = "Does the best β differ per family as f''(0)/|f'(0)| predicts?"
  pos = best[best["best_beta_eff"] > 0]
  excluded = list(best.loc[~(best["best_beta_eff"] > 0), "family"])
  if len(pos) < 2:
    return Finding("best_beta", q, INCONCLUSIVE,
                   f"Fewer than two families have a positive best beta_eff ({fmt(len(pos))}); cannot compare spreads.")
  lo_b, hi_b = pos.loc[pos["best_beta"].idxmin()], pos.loc[pos["best_beta"].idxmax()]
  lo_e, hi_e = pos.loc[pos["best_beta_eff"].idxmin()], pos.loc[pos["best_beta_eff"].idxmax()]
  sb, se = overview["spread_beta"], overview["spread_beta_eff"]
  closer = se < sb
  def span(col, lo, hi):
    if lo[col] == hi[col]:
      return f"is {fmt(lo[col])} for every family compared"
    return f"ranges from {fmt(lo[col])} ({lo['family']}) to {fmt(hi[col])} ({hi['family']})"
  text = (f"At step {fmt(overview['step_budget'])}, the best β {span('best_beta', lo_b, hi_b)}, a max/min ratio of "
          f"{fmt(sb)}; the best beta_eff = β·f''(0)/|f'(0)| {span('best_beta_eff', lo_e, hi_e)}, a ratio of {fmt(se)}. ")
  if closer:
    text += ("The best beta_eff values are closer together than the best β values, as the prediction says: "
             "families need different β and the curvature ratio f''(0)/|f'(0)| accounts for the difference.")
  else:
    text += ("The best beta_eff values are not closer together than the best β values, so the data do not "
             "support the prediction that f''(0)/|f'(0)| sets the best β.")
  if excluded:
    text += f" Excluded from both ratios: {_names(excluded)} (beta_eff is 0 there because f''(0) = 0)."
  edge = best[best["edge"] != ""]
  if len(edge):
    text += (f" The best β is at the edge of the swept grid for {_names(edge['family'])}, "
             "so the optimum may lie outside the grid and these spreads are bounds.")
  return Finding("best_beta", q, SUPPORTED if closer else NOT_SUPPORTED, text)


def overoptimization(fam: pd.DataFrame, overview: dict, th: Thresholds) -> Finding:
  """SPEC §7.3: does gold peak and then fall while KL keeps growing?"""
  q = "Is overoptimisation visible (gold peaks, then falls as KL grows)?"
  if fam.empty:
    return Finding("overopt", q, INCONCLUSIVE, "No valid points.")
  w = fam.loc[fam["drop"].idxmax()]
  rule = (f"(criterion: a drop of at least {fmt(th.min_rel_drop)} of the peak and at least "
          f"{fmt(th.drop_z)} standard errors)")
  cite = (f"{w['family']}: peak gold {fmt(w['peak_gold'])} at KL {fmt(w['kl_at_peak'])}, then "
          f"{fmt(w['gold_at_kl_max'])} at the largest KL reached, {fmt(w['kl_max'])} "
          f"(drop {fmt(w['drop'])}"
          + (f", {fmt(w['rel_drop'])} of the peak" if np.isfinite(w["rel_drop"]) else "")
          + (f", {fmt(w['drop_z'])} standard errors)" if np.isfinite(w["drop_z"]) else "; no standard errors logged)"))
  n_fall, n = overview["n_families_falling"], overview["n_families"]
  members = (f" Per member, {fmt(overview['n_members_falling'])} of {fmt(overview['n_members'])} "
             "trajectories fall after their own peak.")
  if n_fall > 0:
    falling = list(fam.loc[fam["falls"], "family"])
    text = (f"Gold peaks and then falls while KL keeps growing in {fmt(n_fall)} of {fmt(n)} families "
            f"({_names(falling)}) {rule}. Largest drop, {cite}.{members}")
    rest = list(fam.loc[~fam["falls"], "family"])
    if rest:
      text += f" Gold does not fall in {_names(rest)}."
    return Finding("overopt", q, SUPPORTED, text)
  text = (f"Gold does not peak and fall in any of the {fmt(n)} families {rule}; the largest drop from the peak to "
          f"the value at the largest KL is in {cite}. This run does not show overoptimisation.{members}")
  return Finding("overopt", q, NOT_SUPPORTED, text)
