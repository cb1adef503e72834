"""The verdicts of Gao's proxy setting (SPEC §7.4): findings on best-of-n and RL overoptimisation, proxy scale, ensembles and KL efficiency, each citing its tests.

Every function takes the tables of :mod:`gpo_jax.analysis.proxy_evidence` and returns a
:class:`~gpo_jax.analysis.findings.Finding` whose verdict follows an explicit rule:

* :func:`bon_finding`, :func:`rl_finding`: (a), (b) does gold peak and fall while the proxy
  keeps rising? Supported when a selector (member) falls by at least
  :data:`~gpo_jax.analysis.proxy_evidence.BAR_Z` paired SEs with its proxy still rising.
  Best-of-n reports SPEC §5's three selector classes, labelled: the gold-selected oracle
  ceiling, the proxy reward models (the verdict's tests) and offline policies' implicit
  rewards (a separate class, the like-for-like baseline).
* :func:`scale_finding`: (c) do larger proxies / more proxy data move the peak up and right?
* :func:`ensemble_finding`: (d) do conservative ensembles fall less than their members, under
  best-of-n and under RL?
* :func:`bon_vs_rl_finding`: (e) is best-of-n more KL-efficient than RL?
* :func:`findings`: all five, in that order.

References:
  Gao, Schulman, Hilton 2023, "Scaling Laws for Reward Model Overoptimization"
  (arXiv 2210.10760).
  Coste, Anwar, Kirk, Krueger 2023, "Reward Model Ensembles Help Mitigate
  Overoptimization" (arXiv 2310.02743).
  Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment policy"
  (arXiv 2401.01879).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gpo_jax.analysis import inference
from gpo_jax.analysis.findings import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Finding, Thresholds, fmt
from gpo_jax.analysis.proxy_evidence import BAR_Z, BonVsRl, PeakVsProxy, RlResult

_BON_CLASSES = (("oracle", "the gold-selected oracle ceiling"), ("rm", "proxy RMs"),
                ("implicit", "implicit rewards"))


def _count_text(k: int, n: int, what: str) -> str:
  return f"{fmt(k)} of {fmt(n)} {what}"


def _overopt_finding(key: str, q: str, tests: pd.DataFrame, unit: str, cite, th: Thresholds,
                     empty_text: str, paper: str) -> Finding:
  if tests.empty:
    return Finding(key, q, INCONCLUSIVE, empty_text)
  crit = inference.normal_quantile(1 - th.alpha)
  z, rz = tests["drop_z"].to_numpy(float), tests["proxy_rise_z"].to_numpy(float)
  n, kc, k3 = len(tests), int(np.sum(z >= crit)), int(np.sum(z >= BAR_Z))
  k3r = int(np.sum((z >= BAR_Z) & (rz >= crit)))
  p_count = inference.binomial_tail(kc, n, th.alpha)
  p_any = 1.0 - inference.normal_cdf(BAR_Z) ** n   # as if the tests were independent
  top = tests.loc[tests["drop_z"].fillna(-np.inf).idxmax()]
  mde = float(tests["mde"].median())
  text = (f"{_count_text(k3, n, unit)} fall after their own held-out peak by at least "
          f"{fmt(BAR_Z)} paired standard errors (the project's bar), {fmt(k3r)} of them while the "
          f"proxy is still rising (z ≥ {fmt(crit)}); {fmt(kc)} fall at the one-sided {fmt(th.alpha)} "
          f"level (z ≥ {fmt(crit)}), where {fmt(th.alpha * n)} would by chance (binomial p = "
          f"{fmt(p_count)}; approximate, the tests share prompts); with no fall anywhere, the chance "
          f"that any of {fmt(n)} reaches z ≥ {fmt(BAR_Z)} is {fmt(p_any)}. Test: peak chosen on the even "
          f"prompts, drop to the largest KL measured on the odd prompts, paired. Strongest: "
          f"{cite(top)}. Median minimum detectable drop (power {fmt(th.power)}): {fmt(mde)}.")
  if k3r >= 1:
    return Finding(key, q, SUPPORTED, text)
  if kc >= 1 and p_count < th.alpha:
    return Finding(key, q, INCONCLUSIVE, text + " Gold falls beyond chance at the 0.05 level, but "
                   f"no {unit[:-1] if unit.endswith('s') else unit} clears the {fmt(BAR_Z)}-SE bar with "
                   "the proxy still rising.")
  return Finding(key, q, NOT_SUPPORTED, text + f" No fall beyond chance: a fall smaller than about "
                 f"{fmt(mde)} would not have been detected. {paper}")


def _bon_cite(r) -> str:
  return (f"{r['selector']}: held-out gold {fmt(r['peak_gold'])} at n = {fmt(r['peak_n'])} "
          f"(KL {fmt(r['kl_at_peak'])}), {fmt(r['end_gold'])} at n = {fmt(r['end_n'])} (KL "
          f"{fmt(r['kl_end'])}); drop {fmt(r['drop'])} ± {fmt(r['drop_se'])}, z = {fmt(r['drop_z'])} "
          f"(MDE {fmt(r['mde'])}); its own score rises {fmt(r['proxy_rise'])} ± "
          f"{fmt(r['proxy_rise_se'])} (z = {fmt(r['proxy_rise_z'])}) over the same range; Gao BoN "
          f"fit d* = {fmt(r['gao_d_peak'])} (KL {fmt(r['gao_d_peak'] ** 2)})")


def _rl_cite(r) -> str:
  return (f"member {fmt(r['member'])} ({r['family']}, β_KL = {fmt(r['beta'])}, seed "
          f"{fmt(r['seed'])}): held-out gold {fmt(r['peak_gold'])} at step {fmt(r['peak_step'])} "
          f"(KL {fmt(r['kl_at_peak'])}), {fmt(r['end_gold'])} at step {fmt(r['end_step'])} (KL "
          f"{fmt(r['kl_end'])}); drop {fmt(r['drop'])} ± {fmt(r['drop_se'])}, z = "
          f"{fmt(r['drop_z'])} (MDE {fmt(r['mde'])}); proxy rises {fmt(r['proxy_rise'])} ± "
          f"{fmt(r['proxy_rise_se'])} (z = {fmt(r['proxy_rise_z'])})")


def _bon_class(tests: pd.DataFrame, cls: str) -> pd.DataFrame:
  """The best-of-n tests of one selector class: ``oracle``, ``implicit`` or ``rm`` (every other kind: single proxy RMs and ensembles)."""
  if tests.empty:
    return tests
  if cls == "rm":
    return tests[~tests["kind"].isin(["oracle", "implicit"])]
  return tests[tests["kind"] == cls]


def _short_bon_cite(r) -> str:
  return (f"{r['selector']}: drop {fmt(r['drop'])} ± {fmt(r['drop_se'])}, z = {fmt(r['drop_z'])}, "
          f"from n = {fmt(r['peak_n'])} (KL {fmt(r['kl_at_peak'])}) to n = {fmt(r['end_n'])}; its own "
          f"score rises z = {fmt(r['proxy_rise_z'])}")


def _implicit_text(imp: pd.DataFrame, th: Thresholds) -> str:
  """The implicit-reward selectors as their own class: how many fall, the strongest fall."""
  crit = inference.normal_quantile(1 - th.alpha)
  z, rz = imp["drop_z"].to_numpy(float), imp["proxy_rise_z"].to_numpy(float)
  k3, kc = int(np.sum(z >= BAR_Z)), int(np.sum(z >= crit))
  k3r = int(np.sum((z >= BAR_Z) & (rz >= crit)))
  top = imp.loc[imp["drop_z"].fillna(-np.inf).idxmax()]
  return (f" Implicit-reward selectors (offline policies ranked by log π − log π_ref, SPEC §5's "
          f"like-for-like baseline; a separate class, not in the counts above): "
          f"{_count_text(k3, len(imp), 'implicit-reward selectors')} fall by at least {fmt(BAR_Z)} "
          f"paired SEs after their held-out peak ({fmt(k3r)} with their own score still rising), "
          f"{fmt(kc)} at z ≥ {fmt(crit)} where {fmt(th.alpha * len(imp))} would by chance; strongest: "
          f"{_short_bon_cite(top)}.")


def _three_classes_text(tests: pd.DataFrame) -> str:
  """The best selector of each class (oracle, proxy RMs, implicit rewards) by held-out peak gold, and its gold at the largest n."""
  parts = []
  for cls, label in _BON_CLASSES:
    t = _bon_class(tests, cls)
    if t.empty:
      continue
    b = t.loc[t["peak_gold"].fillna(-np.inf).idxmax()]
    who = "" if cls == "oracle" else f" {b['selector']}"
    parts.append(f"{label}{who} {fmt(b['peak_gold'])} at n = {fmt(b['peak_n'])} (KL "
                 f"{fmt(b['kl_at_peak'])}), {fmt(b['end_gold'])} at n = {fmt(b['end_n'])}")
  if len(parts) < 2:
    return ""
  return (" Gold of the best selector of each class (by held-out peak gold, the best n before the "
          "largest; measuring prompts): " + "; ".join(parts) + ".")


def bon_finding(tests: pd.DataFrame, th: Thresholds, pool_n: int | None = None) -> Finding:
  """(a) Best-of-n against a proxy: gold peaks and falls while the proxy keeps rising; the oracle does not fall.

  The verdict rests on the proxy reward models' selectors (single and ensemble); the
  implicit-reward selectors (offline policies, kind ``implicit``) are reported beside them
  as their own class, and decide only when the pool has no proxy RM. The gold-selected
  oracle is the ceiling (SPEC §5: all three, labelled).
  """
  q = "Best-of-n against a proxy: does gold peak and fall while the proxy keeps rising (Gao et al. 2023, Fig. 1)?"
  rm, imp = _bon_class(tests, "rm"), _bon_class(tests, "implicit")
  kl_max = float(tests["kl_end"].max()) if not tests.empty else float("nan")
  reach = (f"The pool (N = {fmt(pool_n)}) reaches KL {fmt(kl_max)} nats"
           + ("; SPEC §6 asks for N ≥ 1024 (KL ≈ 6) so that a late fall is within reach"
              if pool_n and pool_n < 1024 else "")
           + ".")
  if rm.empty and not imp.empty:
    f = _overopt_finding("bon_overopt", q, imp, "implicit-reward selectors", _bon_cite, th,
                         "The pool has no proxy selectors.",
                         "The pool has no proxy-RM selector; these are offline policies' implicit "
                         "rewards (SPEC §5's baseline) only.")
    extra = ""
  else:
    f = _overopt_finding("bon_overopt", q, rm, "proxy-RM selectors", _bon_cite, th,
                         "The pool has no proxy selectors.",
                         "This disagrees with Gao et al. 2023 (BoN against a proxy overoptimises), "
                         "within this pool's KL range.")
    extra = _implicit_text(imp, th) if not imp.empty else ""
  extra += _three_classes_text(tests) + " " + reach
  orc = tests[tests["kind"] == "oracle"] if not tests.empty else tests
  if len(orc):
    o = orc.iloc[0]
    if o["falls"]:
      extra += (f" Warning: the gold-selected oracle ceiling falls (drop {fmt(o['drop'])}, z = "
                f"{fmt(o['drop_z'])}), which exact best-of-n by gold cannot do; check the pool.")
      return Finding(f.key, f.question, INCONCLUSIVE, f.text + extra)
    extra += (f" The gold-selected oracle ceiling does not fall (drop {fmt(o['drop'])}, z = "
              f"{fmt(o['drop_z'])}; it reaches {fmt(o['end_gold'])} at n = {fmt(o['end_n'])}).")
  return Finding(f.key, f.question, f.verdict, f.text + extra)


def rl_finding(tests: pd.DataFrame, th: Thresholds) -> Finding:
  """(b) RL against a proxy: per member, gold peaks and falls while the proxy keeps rising."""
  q = "RL against a proxy: does a member's gold peak and fall while its proxy reward keeps rising?"
  return _overopt_finding("rl_overopt", q, tests, "members", _rl_cite, th,
                          "No per-prompt results (per_prompt/) or no member with two eval steps, so "
                          "the held-out test cannot be run.",
                          "Gao et al. 2023 see RL's gold fall at large KL; this run may not reach it.")


def _direction_verdict(up: int, down: int) -> str:
  if up and not down:
    return SUPPORTED
  if up and down:
    return INCONCLUSIVE
  return NOT_SUPPORTED


def scale_finding(pvp: PeakVsProxy, th: Thresholds) -> Finding:
  """(c) More proxy data / a larger proxy moves the best-of-n gold peak right and up."""
  q = "Do larger proxies / more proxy data move the best-of-n gold peak up and right (Gao et al. 2023)?"
  t = pvp.tests
  if t.empty:
    s = pvp.selectors
    desc = ("" if s.empty else f" (data sizes {', '.join(fmt(v) for v in sorted(s['data_size'].unique()))}; "
            f"layers {', '.join(fmt(v) for v in sorted(s['n_layers'].unique()))})")
    return Finding("proxy_scale", q, INCONCLUSIVE,
                   "The single-proxy selectors do not vary data size or depth with the other proxy "
                   f"fields fixed{desc}, so there is nothing to compare.")
  crit = inference.normal_quantile(1 - th.alpha)
  parts = []
  for _, r in t.iterrows():
    name = "data size" if r["factor"] == "data_size" else "layers"
    parts.append(f"{name} {fmt(r['small'])} → {fmt(r['large'])} ({r['fixed']}; "
                 f"{fmt(r['seeds_small'])}/{fmt(r['seeds_large'])} seeds): held-out peak gold "
                 f"{fmt(r['peak_small'])} → {fmt(r['peak_large'])}, difference {fmt(r['diff'])} ± "
                 f"{fmt(r['se'])}, z = {fmt(r['z'])} (MDE {fmt(r['mde'])}); held-out peak KL "
                 f"{fmt(r['kl_peak_small'])} → {fmt(r['kl_peak_large'])}; Gao d* "
                 f"{fmt(r['d_peak_small'])} → {fmt(r['d_peak_large'])}, difference "
                 f"{fmt(r['d_peak_diff'])} ± {fmt(r['d_peak_diff_se'])} (prompt bootstrap), z = "
                 f"{fmt(r['d_peak_z'])}")
  z, dz = t["z"].to_numpy(float), t["d_peak_z"].to_numpy(float)
  up, down = int(np.sum(z >= crit)), int(np.sum(z <= -crit))
  right, left = int(np.sum(dz >= crit)), int(np.sum(dz <= -crit))
  text = ("; ".join(parts) + f". Up (higher held-out peak gold, paired over the measuring prompts): "
          f"{fmt(up)} of {fmt(len(t))} comparisons at z ≥ {fmt(crit)}, {fmt(down)} significantly lower. "
          f"Right (larger d*): {fmt(right)} at z ≥ {fmt(crit)}, {fmt(left)} significantly smaller.")
  verdict = _direction_verdict(up, down)
  if verdict == SUPPORTED and left:
    verdict = INCONCLUSIVE
  if verdict == NOT_SUPPORTED:
    text += (f" This disagrees with Gao et al. 2023 (larger proxies and more data raise the peak) or "
             f"cannot see it: a peak difference smaller than about {fmt(t['mde'].median())} "
             f"(median MDE, power {fmt(th.power)}) would not have been detected.")
  return Finding("proxy_scale", q, verdict, text)


_CONSERVATIVE = ("wco", "uwo")


def _conservative(t: pd.DataFrame | None) -> pd.DataFrame:
  if t is None or t.empty:
    return pd.DataFrame()
  return t[t["objective"].isin(list(_CONSERVATIVE))]


def ensemble_finding(ens: pd.DataFrame, th: Thresholds, ens_rl: pd.DataFrame | None = None) -> Finding:
  """(d) Conservative ensembles (WCO, UWO) flatten the fall relative to their members, under best-of-n and RL.

  The verdict counts both settings' fall-reduction tests together: supported when at least
  one is significantly positive (the ensemble falls less) and none significantly negative.

  Args:
    ens: :func:`gpo_jax.analysis.proxy_evidence.ensembles_vs_singles` (best-of-n).
    th: test level and power.
    ens_rl: :func:`gpo_jax.analysis.proxy_evidence.ensembles_vs_singles_rl` (RL members);
      None or empty when the run has none to compare.
  """
  q = ("Do conservative ensembles (WCO, UWO) flatten the fall relative to their members, under "
       "best-of-n and under RL (Coste et al. 2023)?")
  e, rt = _conservative(ens), _conservative(ens_rl)
  no_bon = "no WCO/UWO selector whose members also appear as single-proxy selectors in the pool"
  no_rl = ("no RL member against a WCO/UWO ensemble has a member at the same β_KL and seed against "
           "one of the ensemble's proxies")
  if e.empty and rt.empty:
    return Finding("ensembles", q, INCONCLUSIVE, f"Best-of-n: {no_bon}; RL: {no_rl}.")
  crit = inference.normal_quantile(1 - th.alpha)
  flat = steep = 0
  if e.empty:
    text = f"Best-of-n: {no_bon}."
  else:
    parts = [f"{r['selector']} ({fmt(r['n_singles'])} members): held-out fall {fmt(r['ens_fall'])} vs "
             f"{fmt(r['singles_fall'])} for its members alone, reduction {fmt(r['fall_reduction'])} ± "
             f"{fmt(r['fall_reduction_se'])}, z = {fmt(r['fall_reduction_z'])} (MDE "
             f"{fmt(r['fall_reduction_mde'])}); peak gold {fmt(r['ens_peak_gold'])} vs "
             f"{fmt(r['singles_peak_gold'])} (z = {fmt(r['peak_gain_z'])}); gold at the largest n "
             f"{fmt(r['end_gain'])} higher (z = {fmt(r['end_gain_z'])})" for _, r in e.iterrows()]
    z = e["fall_reduction_z"].to_numpy(float)
    flat, steep = int(np.sum(z >= crit)), int(np.sum(z <= -crit))
    text = ("Best-of-n: " + "; ".join(parts) + f". {fmt(flat)} of {fmt(len(e))} WCO/UWO ensembles "
            f"fall significantly less than their members (paired over the measuring prompts, z ≥ "
            f"{fmt(crit)}), {fmt(steep)} significantly more.")
  if rt.empty:
    text += f" RL: {no_rl}."
  else:
    parts = [f"member {fmt(x['member'])} ({x['selector']}, β_KL = {fmt(x['beta'])}, seed "
             f"{fmt(x['seed'])}) against member(s) {x['single_members']} ({x['single_selectors']}): "
             f"held-out fall {fmt(x['ens_fall'])} vs {fmt(x['singles_fall'])}, reduction "
             f"{fmt(x['fall_reduction'])} ± {fmt(x['fall_reduction_se'])}, z = "
             f"{fmt(x['fall_reduction_z'])}, p = {fmt(x['fall_reduction_p'])} (MDE "
             f"{fmt(x['fall_reduction_mde'])}); peak gold {fmt(x['ens_peak_gold'])} vs "
             f"{fmt(x['singles_peak_gold'])}, difference {fmt(x['peak_gain'])} ± "
             f"{fmt(x['peak_gain_se'])}, z = {fmt(x['peak_gain_z'])} (MDE {fmt(x['peak_gain_mde'])}); "
             f"KL at the end {fmt(x['ens_kl_end'])} vs {fmt(x['singles_kl_end'])}"
             for _, x in rt.iterrows()]
    z = rt["fall_reduction_z"].to_numpy(float)
    rl_flat, rl_steep = int(np.sum(z >= crit)), int(np.sum(z <= -crit))
    flat, steep = flat + rl_flat, steep + rl_steep
    text += (" RL: " + "; ".join(parts) + f". {fmt(rl_flat)} of {fmt(len(rt))} members against a "
             f"WCO/UWO ensemble fall significantly less than the members against its proxies alone "
             f"at the same β_KL and seed (each from its own held-out peak to its largest-KL step, "
             f"paired over the measuring prompts, z ≥ {fmt(crit)}), {fmt(rl_steep)} significantly "
             "more; at one β_KL the two need not reach the same KL, so a fall difference may partly "
             "be a KL difference.")
  verdict = _direction_verdict(flat, steep)
  if verdict == NOT_SUPPORTED:
    mdes = "; ".join(f"{fmt(t['fall_reduction_mde'].median())} under {name}"
                     for name, t in (("best-of-n", e), ("RL", rt)) if not t.empty)
    text += (f" This disagrees with Coste et al. 2023 or cannot see it: a reduction smaller than "
             f"about {mdes} (median MDE, power {fmt(th.power)}) would not have been detected.")
  return Finding("ensembles", q, verdict, text)


def bon_vs_rl_finding(bvr: BonVsRl, th: Thresholds) -> Finding:
  """(e) Best-of-n is more KL-efficient than RL (more gold at the same KL)."""
  q = "Is best-of-n more KL-efficient than RL (more gold at equal KL; Gao et al. 2023)?"
  s = bvr.summary
  tested = s[s["members"] > 0] if not s.empty else s
  if tested.empty:
    return Finding("bon_vs_rl", q, INCONCLUSIVE,
                   "No RL member's peak or end point (with per-prompt gold and KL > 0) lies inside the "
                   "best-of-n KL range.")
  crit = inference.normal_quantile(1 - th.alpha)
  parts = [f"{r['selector']} at the RL members' {r['at']} ({fmt(r['members'])} members, mean KL "
           f"{fmt(r['mean_kl'])}): BoN − RL = {fmt(r['diff'])} ± {fmt(r['se'])}, z = {fmt(r['z'])} "
           f"(MDE {fmt(r['mde'])})" for _, r in tested.iterrows()]
  z = tested["z"].to_numpy(float)
  better, worse = int(np.sum(z >= crit)), int(np.sum(z <= -crit))
  pts = bvr.points[bvr.points["in_range"]]
  text = ("; ".join(parts) + f". Over all {fmt(len(pts))} in-range RL eval points, BoN is higher at "
          f"{fmt(int((pts['z'] >= crit).sum()))} and lower at {fmt(int((pts['z'] <= -crit).sum()))} "
          f"(z beyond ±{fmt(crit)}; points of one member share prompts). BoN gold is interpolated "
          "per prompt in sqrt KL at the member's sampled KL; the analytic BoN KL is an upper bound "
          "(Beirami et al. 2024), which can only understate BoN's efficiency.")
  verdict = _direction_verdict(better, worse)
  if worse and not better:
    text += " RL reaches more gold than BoN at equal KL here, the opposite of Gao et al. 2023."
  elif verdict == NOT_SUPPORTED:
    text += (f" The two cannot be told apart: a difference smaller than about "
             f"{fmt(tested['mde'].median())} (median MDE, power {fmt(th.power)}) would not have been "
             "detected, so this does not confirm Gao et al. 2023's BoN advantage.")
  return Finding("bon_vs_rl", q, verdict, text)


def findings(bon_tests_df: pd.DataFrame, rl: RlResult, pvp: PeakVsProxy, ens: pd.DataFrame,
             bvr: BonVsRl, thresholds: Thresholds | None = None,
             pool_n: int | None = None, ens_rl: pd.DataFrame | None = None) -> list[Finding]:
  """The five SPEC §7.4 findings: (a) BoN and (b) RL peak and fall, (c) proxy scale, (d) ensembles (BoN and RL), (e) BoN vs RL."""
  th = thresholds or Thresholds()
  return [bon_finding(bon_tests_df, th, pool_n), rl_finding(rl.tests, th), scale_finding(pvp, th),
          ensemble_finding(ens, th, ens_rl), bon_vs_rl_finding(bvr, th)]
