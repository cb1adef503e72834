"""Findings for SPEC §7 items 1–3, written from the computed statistics with explicit pass/fail criteria."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from gpo_jax.analysis import inference

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """Decision rules behind the findings (stated in the report next to each verdict).

  Attributes:
    alpha: level of every test (one-sided where the claim has a direction).
    power: the power at which minimum detectable effects are quoted.
  """
  alpha: float = 0.05
  power: float = 0.8

  def __post_init__(self):
    if not 0 < self.alpha < 0.5 or not 0.5 <= self.power < 1:
      raise ValueError(f"Thresholds need 0 < alpha < 0.5 and 0.5 <= power < 1, got "
                       f"alpha={self.alpha}, power={self.power}")


@dataclasses.dataclass(frozen=True)
class Finding:
  """One generated finding: a verdict on a paper claim and the sentence(s) citing its numbers."""
  key: str
  question: str
  verdict: str
  text: str


def render_findings(findings, closing: str) -> list[str]:
  """A report's ``## Findings`` section as markdown lines: each finding numbered with its
  question and verdict, then its text, then ``closing`` (how the report states its tests'
  level and power)."""
  out = ["## Findings", ""]
  for i, f in enumerate(findings, 1):
    out += [f"### {i}. {f.question} — **{f.verdict}**", "", f.text, ""]
  return out + [closing, ""]


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


def frontier_overlap(pairs: pd.DataFrame, null: pd.DataFrame, overlap: pd.DataFrame,
                     th: Thresholds) -> Finding:
  """SPEC §7.1: do the families' gold-vs-KL frontiers coincide, measured against seed noise?"""
  q = "Do the gold-vs-KL frontiers of the families overlap (beyond seed-to-seed noise)?"
  ok = overlap.dropna(subset=["gap"])
  if ok.empty:
    return Finding("overlap", q, INCONCLUSIVE,
                   "Cannot compare frontiers: fewer than two families share a sqrt-KL range.")
  w = ok.loc[ok["gap"].idxmax()]
  largest = (f"The largest mean absolute gap between two families' frontiers (all seeds pooled) is "
             f"{fmt(w['gap'])} ({w['family_a']} vs {w['family_b']}, sqrt-KL {fmt(w['lo'])} to "
             f"{fmt(w['hi'])}).")
  tested = pairs.dropna(subset=["p"]) if not pairs.empty else pairs
  if null.empty or tested.empty:
    return Finding("overlap", q, INCONCLUSIVE,
                   largest + " There is no null to judge it by: each family needs at least two "
                   "seeds (at least three for a pair to be able to reach p < 0.05), so a gap "
                   "cannot be told from seed-to-seed noise.")
  differ = tested[tested["p"] < th.alpha]
  n = len(tested)
  top = tested.loc[tested["cross_gap"].idxmax()]
  text = (f"{largest} Seed by seed, the largest cross-family gap is {fmt(top['cross_gap'])} "
          f"({top['family_a']} vs {top['family_b']}) against a within-family seed-vs-seed gap of "
          f"{fmt(top['null_gap'])} on average (max {fmt(top['null_max'])}); one-sided "
          f"Mann–Whitney p = {fmt(top['p'])}. Over all {fmt(n)} family pairs, the mean seed-vs-seed "
          f"gap is {fmt(null['gap'].mean())}: frontier differences of about that size cannot be "
          f"told from seed noise with these seeds. ")
  k = len(differ)
  p_count = inference.binomial_tail(k, n, th.alpha)
  names = "; ".join(f"{r['family_a']} vs {r['family_b']} (gap {fmt(r['cross_gap'])}, p = {fmt(r['p'])})"
                    for _, r in differ.iterrows())
  text += (f"{fmt(k)} of {fmt(n)} pairs differ by more than seeds do at p < {fmt(th.alpha)}"
           + (f" ({names})" if k else "") + f"; {fmt(th.alpha * n)} would by chance (binomial p = "
           f"{fmt(p_count)}, approximate: pairs share families). ")
  if k == 0 or p_count >= th.alpha:
    text += ("No more pairs differ than chance allows, so the frontiers overlap within what this "
             "run can resolve.")
    return Finding("overlap", q, SUPPORTED, text)
  text += "More pairs differ than chance allows: the frontiers do not all overlap."
  return Finding("overlap", q, NOT_SUPPORTED, text)


def best_beta_alignment(shifts: pd.DataFrame, best: pd.DataFrame, th: Thresholds) -> Finding:
  """SPEC §7.2: does the best β differ per family as f''(0)/|f'(0)| predicts? By curve registration."""
  q = "Does the best β differ per family as f''(0)/|f'(0)| predicts?"
  if shifts.empty:
    edge = best[best["edge"] != ""] if not best.empty else best
    return Finding("best_beta", q, INCONCLUSIVE,
                   "No registration: it needs per-prompt results and at least 3 β values for at "
                   f"least 2 families with f''(0) > 0. The argmax table (best β per family at step "
                   f"{fmt(best['step'].max()) if not best.empty else 'n/a'}) is descriptive only"
                   + (f"; the best β is at the grid edge for {fmt(len(edge))} families." if len(edge) else "."))
  informative = shifts[np.abs(shifts["beta_pred"]) > 1e-9]
  ref = shifts["reference"].iloc[0]
  parts = [f"{r['family']}: δ = {fmt(r['shift'])} [{fmt(r['lo'])}, {fmt(r['hi'])}] "
           f"(raw-β prediction {fmt(r['beta_pred'])})" for _, r in shifts.iterrows()]
  text = (f"Registering each family's gold-vs-log β_eff curve at step {fmt(shifts['step'].iloc[0])} on "
          f"{ref}'s (whole-curve shift δ in log β_eff units, prompt-bootstrap interval at level "
          f"1 − α; grid spacing {fmt(shifts['grid_step'].median())}): " + "; ".join(parts) + ". "
          "If f''(0)/|f'(0)| sets the best β, δ = 0; if raw β does, δ = log(c_f/c_ref). ")
  if informative.empty:
    return Finding("best_beta", q, INCONCLUSIVE,
                   text + "No family has a curvature different from the reference's, so the "
                   "two predictions coincide and the data cannot separate them.")
  yes = informative[informative["curvature_in"] & ~informative["beta_in"]]
  no = informative[~informative["curvature_in"]]
  both = informative[informative["curvature_in"] & informative["beta_in"]]
  if len(yes) == len(informative):
    text += (f"For all {fmt(len(yes))} families whose curvature differs from {ref}'s, the interval "
             "contains 0 and excludes the raw-β prediction: the curvature ratio accounts for the "
             "different best β.")
    return Finding("best_beta", q, SUPPORTED, text)
  if len(no):
    text += (f"The interval excludes 0 for {_names(no['family'])}: those curves do not line up in "
             "β_eff, contrary to the prediction.")
    return Finding("best_beta", q, NOT_SUPPORTED, text)
  text += (f"For {_names(both['family'])} the interval contains both predictions: the grid and the "
           "noise cannot tell them apart (a denser β grid or more prompts would).")
  return Finding("best_beta", q, INCONCLUSIVE, text)


def overoptimization(summary: pd.DataFrame, tests: pd.DataFrame, th: Thresholds) -> Finding:
  """SPEC §7.3: does gold peak and then fall while KL keeps growing (per member, held-out test)?"""
  q = "Is overoptimisation visible (a member's gold peaks, then falls as its KL grows)?"
  if tests.empty:
    return Finding("overopt", q, INCONCLUSIVE,
                   "No per-prompt results (per_prompt/) in this run, so the held-out peak test "
                   "cannot be run; rerun with the current evaluator.")
  n, k = len(tests), int(tests["falls"].sum())
  p_all = inference.binomial_tail(k, n, th.alpha)
  rule = (f"(test: peak step chosen on half of the prompts, drop to the largest-KL step measured "
          f"on the other half as a paired difference, one-sided at {fmt(th.alpha)})")
  top = tests.loc[tests["drop_z"].idxmax()]
  cite = (f"{top['family']} β = {fmt(top['beta'])}: gold {fmt(top['peak_gold'])} at step "
          f"{fmt(top['peak_step'])} (KL {fmt(top['kl_at_peak'])}), {fmt(top['end_gold'])} at step "
          f"{fmt(top['end_step'])} (KL {fmt(top['kl_end'])}); drop {fmt(top['drop'])} ± "
          f"{fmt(top['drop_se'])}, z = {fmt(top['drop_z'])}")
  mde = float(tests["mde"].median())
  text = (f"{fmt(k)} of {fmt(n)} members' gold falls after its own peak {rule}; "
          f"{fmt(th.alpha * n)} would by chance (binomial p = {fmt(p_all)}). Strongest: {cite}. "
          f"The median minimum detectable drop (power {fmt(th.power)}) is {fmt(mde)}.")
  sig = summary[summary["p_count"] < th.alpha] if not summary.empty else summary
  if k > 0 and p_all < th.alpha:
    text += (" Per family, more members fall than chance allows in "
             + (_names(sig["family"]) if len(sig) else "no single family") + ".")
    return Finding("overopt", q, SUPPORTED, text)
  text += (f" Gold does not peak and fall beyond chance in this run: a fall smaller than about "
           f"{fmt(mde)} per member would not have been detected.")
  return Finding("overopt", q, NOT_SUPPORTED, text)
