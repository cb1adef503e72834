"""The tests behind a run's findings (SPEC §4, §5, §7): held-out peak-and-fall per member, frontier overlap against a seed null, best β by curve registration, Gao fits per curve.

Each function turns a loaded :class:`~gpo_jax.analysis.table.Run` into a table of test
results with their power; :mod:`gpo_jax.analysis.findings` writes the verdicts from them.
Runs without ``per_prompt/`` (written before the evaluator saved it) get empty tables and
the findings say the test could not be run.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from scipy import stats as sp_stats

from gpo_jax.analysis import frontier as frontier_lib
from gpo_jax.analysis import gao, inference, stats

GOLD, GOLD_SE = "gold/reward", "gold/reward_se"
_MEMBER_COLS = ("family", "beta", "beta_eff", "seed", "lr", "gamma", "data_size")


def _member_info(g: pd.DataFrame) -> dict:
  first = g.iloc[0]
  return {c: (first[c] if c == "family" else float(first[c])) for c in _MEMBER_COLS if c in g}


# ---------------------------------------------------------------------- peak and fall
def member_peak_tests(run, alpha: float = inference.ALPHA,
                      power: float = inference.POWER) -> pd.DataFrame:
  """Per member: the held-out peak-and-fall test of its own gold trajectory.

  Steps after the member diverged are dropped; the end step is the member's largest-KL
  step; the peak is chosen among the earlier steps on the even prompts and the drop is
  measured on the odd ones (:func:`gpo_jax.analysis.inference.held_out_peak_test`).
  """
  try:
    steps, gold = run.prompt_matrix(GOLD)
  except KeyError:
    return pd.DataFrame()
  table = run.valid
  rows = []
  for m, g in table.groupby("member", sort=True):
    g = g[g["step"].isin(steps)].sort_values("step")
    if len(g) < 2:
      continue
    idx = np.searchsorted(steps, g["step"].to_numpy(np.int64))
    kl = g["kl"].to_numpy(float)
    end = int(np.argmax(kl))
    if end == 0:
      continue
    t = inference.held_out_peak_test(gold[idx, int(m)], end, alpha=alpha, power=power)
    rows.append({"member": int(m), **_member_info(g),
                 "peak_step": float(g["step"].iloc[t.peak_index]),
                 "end_step": float(g["step"].iloc[t.end_index]),
                 "kl_at_peak": float(kl[t.peak_index]), "kl_end": float(kl[t.end_index]),
                 "peak_gold": t.peak_gold, "end_gold": t.end_gold, "drop": t.drop,
                 "drop_se": t.se, "drop_z": t.z, "p": t.p, "mde": t.mde, "falls": t.falls,
                 "rel_drop": t.drop / t.peak_gold if t.peak_gold > 0 else float("nan"),
                 "n_measure": t.n_measure})
  return pd.DataFrame(rows)


def family_peak_summary(tests: pd.DataFrame, alpha: float = inference.ALPHA) -> pd.DataFrame:
  """Per family: members tested, members whose gold falls, the count expected by chance, its p."""
  rows = []
  if tests.empty:
    return pd.DataFrame(rows)
  for f, g in tests.groupby("family", sort=False):
    n, k = len(g), int(g["falls"].sum())
    top = g.loc[g["drop_z"].idxmax()] if g["drop_z"].notna().any() else g.iloc[0]
    rows.append({"family": f, "members": n, "falling": k, "expected_by_chance": alpha * n,
                 "p_count": inference.binomial_tail(k, n, alpha),
                 "median_mde": float(g["mde"].median()), "max_drop": float(top["drop"]),
                 "max_drop_z": float(top["drop_z"]), "max_drop_member": int(top["member"]),
                 "max_drop_beta": float(top["beta"]), "max_drop_mde": float(top["mde"])})
  return pd.DataFrame(rows)


# ---------------------------------------------------------------------- overlap with a null
def held_out_frontiers(run, valid: pd.DataFrame, by=("family", "seed")) -> dict:
  """Frontiers whose points are chosen on half of the prompts and measured on the other half.

  A frontier is an upper envelope: its points are maxima of noisy estimates, biased upwards
  by an amount that depends on how densely a run samples each KL (two families with the
  same true trade-off but different β grids get different biases). Choosing the Pareto
  points with the even prompts' gold and placing them at the odd prompts' gold removes that
  selection bias. Without per-prompt results the plain (biased) frontiers are returned.

  Returns:
    ``{group key: Frontier}`` for the groups of ``valid`` by ``by``.
  """
  try:
    steps, gold = run.prompt_matrix(GOLD)
  except KeyError:
    return {k: frontier_lib.frontier_of(g, str(k)) for k, g in valid.groupby(list(by), sort=False)}
  sel, mea = inference.split_halves(gold.shape[-1])
  out = {}
  for k, g in valid.groupby(list(by), sort=False):
    g = g[g["step"].isin(steps)]
    if g.empty:
      continue
    si = np.searchsorted(steps, g["step"].to_numpy(np.int64))
    mi = g["member"].to_numpy(int)
    choose = np.nanmean(gold[si, mi][:, sel], axis=1)
    measure = np.nanmean(gold[si, mi][:, mea], axis=1)
    fr = frontier_lib.frontier_of(g.assign(**{GOLD: choose, "_measured": measure}), str(k))
    pareto = fr.pareto.assign(**{GOLD: fr.pareto["_measured"]}).drop(columns="_measured")
    out[k] = frontier_lib.Frontier(family=str(k), x=fr.x, envelope=fr.envelope, pareto=pareto)
  return out


def overlap_against_seeds(run, valid: pd.DataFrame | None = None
                          ) -> tuple[pd.DataFrame, pd.DataFrame]:
  """Frontier gaps between families compared with gaps between seeds of one family.

  For every family and seed the frontier is the upper envelope over β and steps of that
  seed's members (held out: :func:`held_out_frontiers`). The null is the set of
  within-family gaps (seed ``s`` vs seed ``s′``, same family): how far two frontiers of one
  method lie apart by chance. A family pair's gaps are taken seed by seed (family A seed
  ``s`` vs family B seed ``s``) and compared with the two families' null gaps by a one-sided
  Mann–Whitney test (``p`` small: the families' frontiers differ by more than seeds do).

  Returns:
    ``(pairs, null)``: one row per family pair (mean cross gap, mean null gap, U-test p),
    and the within-family seed gaps. ``p`` is NaN where a family has fewer than two seeds.
  """
  valid = run.valid if valid is None else valid
  fronts = held_out_frontiers(run, valid)
  fams = list(dict.fromkeys(valid["family"]))
  seeds = {f: sorted(s for (ff, s) in fronts if ff == f) for f in fams}
  null_rows = []
  for f in fams:
    for s1, s2 in itertools.combinations(seeds[f], 2):
      gap = frontier_lib.frontier_gap(fronts[(f, s1)], fronts[(f, s2)])["gap"]
      null_rows.append({"family": f, "seed_a": s1, "seed_b": s2, "gap": gap})
  null = pd.DataFrame(null_rows, columns=["family", "seed_a", "seed_b", "gap"])
  pair_rows = []
  for fa, fb in itertools.combinations(fams, 2):
    common = sorted(set(seeds[fa]) & set(seeds[fb]))
    cross = np.array([frontier_lib.frontier_gap(fronts[(fa, s)], fronts[(fb, s)])["gap"]
                      for s in common], float)
    cross = cross[np.isfinite(cross)]
    within = null[null["family"].isin([fa, fb])]["gap"].to_numpy(float)
    within = within[np.isfinite(within)]
    p = float("nan")
    if cross.size >= 1 and within.size >= 2:
      p = float(sp_stats.mannwhitneyu(cross, within, alternative="greater").pvalue)
    pair_rows.append({"family_a": fa, "family_b": fb, "seeds": len(common),
                      "cross_gap": float(cross.mean()) if cross.size else float("nan"),
                      "null_gap": float(within.mean()) if within.size else float("nan"),
                      "null_max": float(within.max()) if within.size else float("nan"),
                      "p": p})
  return pd.DataFrame(pair_rows), null


# ---------------------------------------------------------------------- best β by registration
def _curvature(g: pd.DataFrame) -> float:
  """``f''(0)/|f'(0)|`` of a family from its rows (``beta_eff / beta``; 0 for hinge)."""
  c = (g["beta_eff"] / g["beta"]).to_numpy(float)
  c = c[np.isfinite(c)]
  return float(np.median(c)) if c.size else float("nan")


def best_beta_shifts(run, step: float, *, reps: int = 200, seed: int = 0,
                     level: float = 0.95) -> pd.DataFrame:
  """Where each family's gold-vs-β_eff curve sits relative to a reference family's.

  At the step budget, each family's curve is gold (mean over seeds and prompts) against
  ``log β_eff``; :func:`~gpo_jax.analysis.inference.register_shift` finds the horizontal
  shift ``δ`` of the whole curve relative to the reference family (the first with
  ``f''(0) > 0``), and a prompt bootstrap (the same resample for every member) gives its
  interval. Two predictions, in log β_eff units: "the curvature sets the best β"
  (``δ = 0``: curves line up in β_eff) and "β alone sets it" (``δ = log(c_f / c_ref)``,
  ``c = f''(0)/|f'(0)|``: curves line up in raw β). Families with ``c = 0`` (hinge) have no
  curvature prediction and are left out.
  """
  try:
    steps, gold = run.prompt_matrix(GOLD)
  except KeyError:
    return pd.DataFrame()
  if not np.any(steps == int(step)):
    return pd.DataFrame()
  g_ME = gold[int(np.flatnonzero(steps == int(step))[0])]
  rows = stats.at_budget(run.table, step)
  fams = [f for f in dict.fromkeys(rows["family"]) if _curvature(rows[rows["family"] == f]) > 0]
  curves = {}
  for f in fams:
    r = rows[rows["family"] == f]
    by = [(np.log(be), r[r["beta_eff"] == be]["member"].to_numpy(int))
          for be in sorted(r["beta_eff"].unique()) if be > 0]
    if len(by) >= 3:
      curves[f] = by
  if len(curves) < 2:
    return pd.DataFrame()
  ref = next(iter(curves))

  def curve(f, idx):
    return (np.array([x for x, _ in curves[f]]),
            np.array([g_ME[np.ix_(ms, idx)].mean() for _, ms in curves[f]]))

  out = []
  all_idx = np.arange(g_ME.shape[1])
  c_ref = _curvature(rows[rows["family"] == ref])
  for f in curves:
    if f == ref:
      continue
    shift = lambda idx, f=f: inference.register_shift(*curve(ref, idx), *curve(f, idx))  # noqa: E731
    est = shift(all_idx)
    lo, hi, _ = inference.bootstrap_prompts(shift, g_ME.shape[1], reps=reps, seed=seed,
                                            level=level)
    c_f = _curvature(rows[rows["family"] == f])
    raw_pred = float(np.log(c_f / c_ref))
    xs = curve(f, all_idx)[0]
    out.append({"family": f, "reference": ref, "shift": est, "lo": lo, "hi": hi,
                "curvature_pred": 0.0, "beta_pred": raw_pred,
                "curvature_in": bool(lo <= 0.0 <= hi), "beta_in": bool(lo <= raw_pred <= hi),
                "grid_step": float(np.median(np.diff(xs))) if xs.size > 1 else float("nan"),
                "step": float(step)})
  return pd.DataFrame(out)


# ---------------------------------------------------------------------- Gao fits per curve
def member_gao_fits(valid: pd.DataFrame, form: str = "rl") -> pd.DataFrame:
  """Per member: the Gao form fitted to its own trajectory (gold vs sqrt KL over steps), SE-weighted."""
  rows = []
  for m, g in valid.groupby("member", sort=True):
    se = g[GOLD_SE].to_numpy(float) if GOLD_SE in g else None
    try:
      fit = gao.fit_gao(g["sqrt_kl"], g[GOLD], form, se=se)
    except ValueError:
      continue
    d_max = float(g["sqrt_kl"].max())
    rows.append({"member": int(m), **_member_info(g), "form": form, "alpha": fit.alpha,
                 "alpha_se": fit.alpha_se, "beta_fit": fit.beta, "beta_fit_se": fit.beta_se,
                 "d_peak": fit.d_peak, "d_peak_se": fit.d_peak_se, "d_max": d_max,
                 "peak_inside": bool(fit.has_peak and fit.d_peak <= d_max),
                 "chi2_red": fit.chi2_red, "n_points": fit.n_points})
  return pd.DataFrame(rows)


def frontier_gao_fits(frontiers: dict, form: str = "rl") -> dict:
  """Per family: the Gao form fitted to the frontier's Pareto points, weighted by their SEs."""
  fits = {}
  for f, fr in frontiers.items():
    p = fr.pareto
    se = p[GOLD_SE].to_numpy(float) if GOLD_SE in p else None
    try:
      fits[f] = gao.fit_gao(p["sqrt_kl"], p[GOLD], form, se=se)
    except ValueError:
      pass
  return fits
