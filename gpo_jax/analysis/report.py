"""``analyze(run_dir)``: a run's statistics, figures and a ``report.md`` whose findings cite them."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import pandas as pd

from gpo_jax.analysis import findings as findings_lib
from gpo_jax.analysis import frontier as frontier_lib
from gpo_jax.analysis import evidence, gao, inference, plots, stats
from gpo_jax.analysis.findings import Finding, Thresholds, fmt, render_findings
from gpo_jax.analysis.table import Run, load_run

REPORT_DIR = "report"


@dataclasses.dataclass
class Report:
  """Everything ``analyze`` computed; ``findings`` cite only numbers found in the tables and ``overview``."""
  run: Run
  out_dir: pathlib.Path
  summary: pd.DataFrame          # one row per family
  members: pd.DataFrame          # per member: the held-out peak-and-fall test
  peak_summary: pd.DataFrame     # per family: members falling vs chance
  family_stats: pd.DataFrame     # per family, pooled over β and steps: highest gold and its KL (descriptive)
  best: pd.DataFrame             # best β per family at the step budget (argmax, descriptive)
  by_beta: pd.DataFrame          # gold per (family, β) at the step budget
  shifts: pd.DataFrame           # best β by curve registration, with bootstrap intervals
  overlap: pd.DataFrame          # pairwise frontier gaps (all seeds pooled)
  overlap_tests: pd.DataFrame    # family pairs against the seed-vs-seed null
  seed_gaps: pd.DataFrame        # the null: within-family seed-vs-seed frontier gaps
  member_fits: pd.DataFrame      # Gao RL form per member trajectory, SE-weighted
  frontiers: dict
  fits: dict                     # (family, form) -> GaoFit of the frontier; ("best-of-n", "bon")
  overview: dict                 # scalar statistics the findings use
  thresholds: Thresholds
  findings: list[Finding]
  figures: dict = dataclasses.field(default_factory=dict)   # name -> [png, svg]
  path: pathlib.Path | None = None                          # report.md


def _fit_all(frontiers: dict, bon: dict | None) -> dict:
  """Gao fits per curve: each family's frontier (Pareto points, SE-weighted) and the BoN curve."""
  fits = {}
  for form in gao.FORMS:
    for f, fit in evidence.frontier_gao_fits(frontiers, form).items():
      fits[(f, form)] = fit
  if bon is not None:
    try:
      se = np.asarray(bon.get("gold_se", []), float)
      fits[("best-of-n", "bon")] = gao.fit_gao(
          np.sqrt(np.asarray(bon["kl"], float)), bon["gold"], "bon",
          se=se if se.size == len(bon["gold"]) and np.all(se[1:] > 0) else None)
    except ValueError:
      pass
  return fits


def _summary(families, fam_stats, best, fits, peak_summary, shifts, member_fits) -> pd.DataFrame:
  fs, bb = fam_stats.set_index("family"), best.set_index("family")
  ps = peak_summary.set_index("family") if not peak_summary.empty else None
  sh = shifts.set_index("family") if not shifts.empty else None
  rows = []
  for f in families:
    row = {"family": f}
    if f in fs.index:
      row.update({k: fs.loc[f, k] for k in ("peak_gold", "kl_at_peak")})
    if f in bb.index:
      row.update({k: bb.loc[f, k] for k in ("best_beta", "best_beta_eff", "gold_at_best", "edge")})
    if sh is not None and f in sh.index:
      row.update({"shift": sh.loc[f, "shift"], "shift_lo": sh.loc[f, "lo"], "shift_hi": sh.loc[f, "hi"]})
    if ps is not None and f in ps.index:
      row.update({"members_tested": ps.loc[f, "members"], "members_falling": ps.loc[f, "falling"],
                  "median_mde": ps.loc[f, "median_mde"]})
    if not member_fits.empty:
      mf = member_fits[member_fits["family"] == f]
      row["member_peaks_inside"] = int(mf["peak_inside"].sum())
    for form in gao.FORMS:
      fit = fits.get((f, form))
      for k in ("alpha", "beta", "d_peak", "d_peak_se", "rmse", "chi2_red"):
        row[f"{form}_{k}"] = getattr(fit, k) if fit is not None else float("nan")
    rows.append(row)
  return pd.DataFrame(rows)


def _overview(run, overlap, best, members, step, overlap_tests, seed_gaps, th) -> dict:
  pos = best[best["best_beta_eff"] > 0]
  n_pairs = int(overlap["gap"].notna().sum())
  n_tested = int(len(members))
  n_falling = int(members["falls"].sum()) if n_tested else 0
  n_pair_tests = int(overlap_tests["p"].notna().sum()) if not overlap_tests.empty else 0
  n_differ = int((overlap_tests["p"] < th.alpha).sum()) if not overlap_tests.empty else 0
  return {
      # the numbers the findings quote, computed once here
      "alpha": th.alpha, "power": th.power,
      "n_expected_falling": th.alpha * n_tested,
      "p_members_falling": inference.binomial_tail(n_falling, n_tested, th.alpha) if n_tested else float("nan"),
      "median_mde": float(members["mde"].median()) if n_tested else float("nan"),
      "n_pair_tests": n_pair_tests, "n_pairs_expected_differ": th.alpha * n_pair_tests,
      "n_pairs_differ": n_differ,
      "p_pairs_differ": inference.binomial_tail(n_differ, n_pair_tests, th.alpha) if n_pair_tests else float("nan"),
      "mean_seed_gap": float(seed_gaps["gap"].mean()) if not seed_gaps.empty else float("nan"),
      "n_families": len(run.families), "n_members": int(run.table["member"].nunique()),
      "n_members_tested": n_tested, "n_members_falling": n_falling,
      "n_diverged_members": int(run.table.loc[run.table["diverged"], "member"].nunique()),
      "n_pairs": n_pairs,
      "spread_beta": stats.spread_ratio(pos["best_beta"]),
      "spread_beta_eff": stats.spread_ratio(pos["best_beta_eff"]),
      "step_budget": step,
  }


def compute(run: Run, *, step: float | None = None, thresholds: Thresholds | None = None,
            out_dir=None, bootstrap_reps: int = 200) -> Report:
  """All statistics and findings of a loaded run (no files written)."""
  th = thresholds or Thresholds()
  valid = run.valid
  if valid.empty:
    raise ValueError(f"{run.path}: no valid rows (every member diverged or has non-finite KL/gold)")
  step = stats.budget_step(run.table, step)
  frontiers = frontier_lib.family_frontiers(valid)
  frontiers = {f: frontiers[f] for f in run.families if f in frontiers}
  overlap = frontier_lib.overlap_table(frontiers)
  overlap_tests, seed_gaps = evidence.overlap_against_seeds(run, valid)
  members = evidence.member_peak_tests(run, alpha=th.alpha, power=th.power)
  peak_summary = evidence.family_peak_summary(members, alpha=th.alpha)
  fam_stats = stats.family_overoptimization(valid)
  by_beta = stats.gold_by_beta(run.table, step)
  best = stats.best_beta(run.table, step)
  shifts = evidence.best_beta_shifts(run, step, reps=bootstrap_reps, level=1 - th.alpha)
  member_fits = evidence.member_gao_fits(valid)
  fits = _fit_all(frontiers, run.bon)
  overview = _overview(run, overlap, best, members, step, overlap_tests, seed_gaps, th)
  found = [findings_lib.frontier_overlap(overlap_tests, seed_gaps, overlap, th),
           findings_lib.best_beta_alignment(shifts, best, th),
           findings_lib.overoptimization(peak_summary, members, th)]
  return Report(run=run, out_dir=pathlib.Path(out_dir) if out_dir else run.path / REPORT_DIR,
                summary=_summary(run.families, fam_stats, best, fits, peak_summary, shifts,
                                 member_fits),
                members=members, peak_summary=peak_summary, family_stats=fam_stats, best=best,
                by_beta=by_beta, shifts=shifts, overlap=overlap, overlap_tests=overlap_tests,
                seed_gaps=seed_gaps, member_fits=member_fits, frontiers=frontiers, fits=fits,
                overview=overview, thresholds=th, findings=found)


def make_figures(rep: Report) -> dict:
  """Writes every figure of the report into ``rep.out_dir/figures``; returns name -> paths."""
  fig_dir = rep.out_dir / "figures"
  valid, style = rep.run.valid, plots.family_style(rep.run.families)
  figs = {
      "frontiers_all": plots.plot_all_frontiers(rep.frontiers, style, rep.run.bon, fig_dir),
      "frontiers_by_family": plots.plot_family_frontiers(valid, rep.frontiers, rep.fits, rep.run.bon, fig_dir),
      "gold_vs_beta": plots.plot_gold_vs_beta(rep.by_beta, style, fig_dir),
      "training_curves": plots.plot_training_curves(rep.run.table, fig_dir),
  }
  if "offline_reg" in valid and valid["offline_reg"].notna().any():
    figs["offline_reg_vs_kl"] = plots.plot_offline_reg_vs_kl(valid, style, fig_dir)
  reward = plots.plot_reward_vs_gold(valid, style, fig_dir)
  if reward is not None:
    figs["reward_vs_gold"] = reward
  return figs


def md_table(df: pd.DataFrame, columns: dict[str, str]) -> str:
  """A markdown table of ``df[columns]`` with headers ``columns.values()``; numbers via ``fmt``."""
  def cell(v):
    if isinstance(v, (bool, np.bool_)):
      return "yes" if v else "no"
    if isinstance(v, (int, float, np.integer, np.floating)):
      return fmt(v)
    return str(v) if v is not None and v == v else "n/a"
  lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
  for _, r in df.iterrows():
    lines.append("| " + " | ".join(cell(r.get(c, float("nan"))) for c in columns) + " |")
  return "\n".join(lines)


FIGURE_CAPTIONS = {
    "frontiers_all": "Frontiers of all families (running max of gold over sqrt-KL, across β and steps); "
                     "hollow markers are Pareto points, crosses the best-of-n baseline.",
    "frontiers_by_family": "Per family: every eval point coloured by β, the frontier, Gao fits (dashed best-of-n "
                           "form, dotted RL form), best-of-n baseline.",
    "gold_vs_beta": "Gold at the step budget vs β and vs beta_eff = β f''(0)/|f'(0)|.",
    "offline_reg_vs_kl": "Offline regulariser (½ mean ρ² on held-out pairs) vs on-policy KL.",
    "training_curves": "Gold and KL vs step, one line per member.",
    "reward_vs_gold": "Proxy reward / offline implicit-reward margin vs gold.",
}

SUMMARY_COLUMNS = {
    "family": "family", "peak_gold": "best gold", "kl_at_peak": "KL at best", "best_beta": "best β",
    "best_beta_eff": "best beta_eff", "shift": "δ vs ref", "shift_lo": "δ lo", "shift_hi": "δ hi",
    "rl_alpha": "frontier RL α", "rl_beta": "frontier RL β", "rl_d_peak": "RL d*", "rl_d_peak_se": "d* se",
    "rl_chi2_red": "RL χ²/dof", "members_tested": "members", "members_falling": "falling",
    "median_mde": "median MDE", "member_peaks_inside": "member fits peaking inside",
}

# Token ids of the lab's corpus (ARCHITECTURE.md conventions): content token t prints as w<t-5>.
_SPECIAL = {0: "PAD", 1: "BOS", 2: "SEP", 3: "EOS", 4: "DEMO"}


def _decode(tokens, mask) -> str:
  return " ".join(_SPECIAL.get(int(t), f"w{int(t) - 5}") for t, m in zip(tokens, mask) if m)


def shown_samples(run, n_members: int = 3) -> list[dict]:
  """Sampled responses (saved by the evaluator) of the highest-KL members at the last eval step."""
  pp = run.per_prompt
  steps = [st for st in sorted(pp) if "sample/response" in pp[st]]
  if not steps:
    return []
  step = steps[-1]
  rows = run.valid[run.valid["step"] == step].sort_values("kl", ascending=False).head(n_members)
  out = []
  for _, r in rows.iterrows():
    m = int(r["member"])
    resp, mask = pp[step]["sample/response"][m], pp[step]["sample/mask"][m]
    gold = pp[step].get("sample/gold")
    out.append({"member": m, "family": r["family"], "beta": float(r["beta"]), "step": step,
                "kl": float(r["kl"]), "eos_frac": float(r.get("eos_frac", float("nan"))),
                "response_len": float(r.get("response_len", float("nan"))),
                "responses": [(_decode(resp[i], mask[i]),
                               float(gold[m][i]) if gold is not None else float("nan"))
                              for i in range(resp.shape[0])]})
  return out


def _gold_kind(run) -> str:
  lab = (run.config or {}).get("lab", {}) if isinstance(run.config, dict) else {}
  return str(lab.get("gold_kind", "network")) if isinstance(lab, dict) else "network"


def render_markdown(rep: Report) -> str:
  """The text of ``report.md``."""
  run, ov, th = rep.run, rep.overview, rep.thresholds
  rel = lambda p: p.relative_to(rep.out_dir).as_posix()  # noqa: E731
  out = [f"# gpo_jax sweep report: `{run.path.name}`", ""]
  n_prompts = run.table["n_prompts"].dropna() if "n_prompts" in run.table else pd.Series(dtype=float)
  meta = [f"{fmt(ov['n_families'])} families, {fmt(ov['n_members'])} members "
          f"({fmt(ov['n_diverged_members'])} diverged, excluded from statistics after divergence), "
          f"eval steps up to {fmt(run.table['step'].max())}; step budget for best β: {fmt(ov['step_budget'])}. "
          f"Gold: `{_gold_kind(run)}`"
          + (f"; every member evaluated on the same {fmt(n_prompts.iloc[0])} prompts, standard errors "
             "clustered by prompt." if len(n_prompts) else ".")]
  if run.manifest:
    keys = [k for k in ("lab", "wall_time_s", "mesh", "devices", "versions") if k in run.manifest]
    meta.append("Manifest: " + ", ".join(f"{k} = `{run.manifest[k]}`" for k in keys) + ".")
  out += meta + [""]
  if "frontiers_all" in rep.figures:
    out += [f"![frontiers of all families]({rel(rep.figures['frontiers_all'][0])})", "",
            f"*{FIGURE_CAPTIONS['frontiers_all']}*", ""]
  out += render_findings(rep.findings, f"Every test is at level {fmt(th.alpha)}; minimum "
                         f"detectable effects (MDE) are at {fmt(100 * th.power)}% power.")
  out += ["## Summary per family", "",
          "Best gold and its KL are pooled over β and steps (descriptive: the maximum of noisy points is biased "
          f"up); best β is the argmax at step {fmt(ov['step_budget'])} (descriptive); δ is the registration "
          "shift of the gold-vs-log β_eff curve against the reference family with its bootstrap interval; "
          "Gao RL fits are per frontier (Pareto points, SE-weighted), R(0) = 0, d = sqrt(KL), d* = n/a: no "
          "interior peak; falling = members whose held-out peak test rejects.", "",
          md_table(rep.summary, SUMMARY_COLUMNS), ""]
  bon_fit = rep.fits.get(("best-of-n", "bon"))
  if bon_fit is not None:
    out += [f"Best-of-n baseline ({run.bon['selector']}, pool N = {run.bon['N']}): Gao-BoN fit α = {fmt(bon_fit.alpha)}, "
            f"β = {fmt(bon_fit.beta)}, rmse = {fmt(bon_fit.rmse)}.", ""]
  samples = shown_samples(run)
  if samples:
    out += ["## What the highest-KL policies say", "",
            "First sample on each of the first eval prompts, at the last eval step (gold is reference-subtracted; "
            "`w<k>` is content token k; a response without EOS ran into the length cap).", ""]
    for smp in samples:
      out += [f"- member {smp['member']} ({smp['family']}, β = {fmt(smp['beta'])}, step {fmt(smp['step'])}, "
              f"KL {fmt(smp['kl'])}, mean length {fmt(smp['response_len'])}, EOS fraction {fmt(smp['eos_frac'])}):"]
      out += [f"  - `{text}` (gold {fmt(g)})" for text, g in smp["responses"]]
    out += [""]
  out += ["## Figures", ""]
  for name, paths in rep.figures.items():
    if name == "frontiers_all":
      continue
    out += [f"![{name}]({rel(paths[0])})", "", f"*{FIGURE_CAPTIONS.get(name, name)}* ([svg]({rel(paths[1])}))", ""]
  if not rep.overlap_tests.empty:
    out += ["## Frontier overlap against the seed null", "",
            md_table(rep.overlap_tests, {"family_a": "family A", "family_b": "family B", "seeds": "seeds",
                                         "cross_gap": "cross gap", "null_gap": "seed gap (mean)",
                                         "null_max": "seed gap (max)", "p": "p"}), ""]
  out += ["## Frontier gaps (all seeds pooled)", "",
          md_table(rep.overlap, {"family_a": "family A", "family_b": "family B", "gap": "mean |gap|",
                                 "rel_gap": "relative gap", "lo": "sqrt-KL from", "hi": "sqrt-KL to"}), ""]
  out += ["## Gold per β at the step budget", "",
          md_table(rep.by_beta, {"family": "family", "beta": "β", "beta_eff": "beta_eff", "gold": "gold",
                                 "gold_se": "se", "kl": "KL", "seeds": "seeds"}), ""]
  if not rep.members.empty:
    out += ["## Members: held-out peak-and-fall tests", "",
            md_table(rep.members, {"member": "member", "family": "family", "beta": "β", "seed": "seed",
                                   "peak_step": "peak step", "end_step": "end step", "kl_end": "KL at end",
                                   "peak_gold": "gold at peak", "end_gold": "gold at end", "drop": "drop",
                                   "drop_se": "se", "drop_z": "z", "mde": "MDE", "falls": "falls"}), ""]
  return "\n".join(out)


def write(rep: Report, figures: bool = True) -> pathlib.Path:
  """Writes figures, ``report.md`` and CSVs of the tables into ``rep.out_dir``."""
  rep.out_dir.mkdir(parents=True, exist_ok=True)
  if figures:
    rep.figures = make_figures(rep)
  for name in ("summary", "members", "by_beta", "overlap", "overlap_tests", "seed_gaps", "shifts",
               "member_fits"):
    getattr(rep, name).to_csv(rep.out_dir / f"{name}.csv", index=False)
  rep.path = rep.out_dir / "report.md"
  rep.path.write_text(render_markdown(rep))
  return rep.path


def analyze(run_dir, out_dir=None, *, step: float | None = None, thresholds: Thresholds | None = None,
            figures: bool = True) -> Report:
  """Loads a run directory, computes every statistic, writes figures and ``report.md``.

  Args:
    run_dir: the trainer's work directory (``metrics.jsonl`` and optional JSON side files).
    out_dir: where to write (default ``RUN_DIR/report``).
    step: step budget for the best-β comparison (default: the final eval step).
    thresholds: decision rules for the findings.
    figures: write the figures (PNG + SVG).

  Returns:
    The ``Report``; ``Report.path`` is the written ``report.md``.
  """
  rep = compute(load_run(run_dir), step=step, thresholds=thresholds, out_dir=out_dir)
  write(rep, figures=figures)
  return rep
