"""``analyze(run_dir)``: a run's statistics, figures and a ``report.md`` whose findings cite them."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import pandas as pd

from gpo_jax.analysis import findings as findings_lib
from gpo_jax.analysis import frontier as frontier_lib
from gpo_jax.analysis import gao, plots, stats
from gpo_jax.analysis.findings import Finding, Thresholds, fmt
from gpo_jax.analysis.table import Run, load_run

REPORT_DIR = "report"


@dataclasses.dataclass
class Report:
  """Everything ``analyze`` computed; ``findings`` cite only numbers found in the tables and ``overview``."""
  run: Run
  out_dir: pathlib.Path
  summary: pd.DataFrame          # one row per family
  members: pd.DataFrame          # per-member overoptimisation
  family_stats: pd.DataFrame     # per-family overoptimisation (pooled over β and steps)
  best: pd.DataFrame             # best β per family at the step budget
  by_beta: pd.DataFrame          # gold per (family, β) at the step budget
  overlap: pd.DataFrame          # pairwise frontier gaps
  frontiers: dict
  fits: dict                     # (family, form) -> GaoFit; ("best-of-n", "bon") for the baseline
  overview: dict                 # scalar statistics the findings use
  thresholds: Thresholds
  findings: list[Finding]
  figures: dict = dataclasses.field(default_factory=dict)   # name -> [png, svg]
  path: pathlib.Path | None = None                          # report.md


def _fit_all(valid: pd.DataFrame, bon: dict | None) -> dict:
  fits = {}
  for f, g in valid.groupby("family", sort=False):
    for form in gao.FORMS:
      try:
        fits[(f, form)] = gao.fit_gao(g["sqrt_kl"], g["gold/reward"], form)
      except ValueError:
        pass  # too few distinct KL values: the family gets no fit, the table says n/a
  if bon is not None:
    try:
      fits[("best-of-n", "bon")] = gao.fit_gao(np.sqrt(np.asarray(bon["kl"], float)), bon["gold"], "bon")
    except ValueError:
      pass
  return fits


def _summary(families, fam_stats, best, fits) -> pd.DataFrame:
  fs, bb = fam_stats.set_index("family"), best.set_index("family")
  rows = []
  for f in families:
    row = {"family": f}
    if f in fs.index:
      row.update({k: fs.loc[f, k] for k in ("peak_gold", "kl_at_peak", "kl_max", "gold_at_kl_max", "drop",
                                            "rel_drop", "drop_z", "falls", "members_falling")})
    if f in bb.index:
      row.update({k: bb.loc[f, k] for k in ("best_beta", "best_beta_eff", "gold_at_best", "kl_at_best", "edge")})
    for form in gao.FORMS:
      fit = fits.get((f, form))
      for k in ("alpha", "beta", "d_peak", "r_peak", "rmse"):
        row[f"{form}_{k}"] = getattr(fit, k) if fit is not None else float("nan")
    rows.append(row)
  return pd.DataFrame(rows)


def _overview(run, overlap, best, fam_stats, members, step, th: Thresholds) -> dict:
  pos = best[best["best_beta_eff"] > 0]
  n_pairs = int(overlap["rel_gap"].notna().sum())
  return {
      "n_families": len(run.families), "n_members": int(len(members)),
      "n_members_falling": int(members["falls"].sum()) if len(members) else 0,
      "n_families_falling": int(fam_stats["falls"].sum()) if len(fam_stats) else 0,
      "n_diverged_members": int(run.table.loc[run.table["diverged"], "member"].nunique()),
      "n_pairs": n_pairs, "mean_rel_gap": float(overlap["rel_gap"].mean()) if n_pairs else float("nan"),
      "max_rel_gap": float(overlap["rel_gap"].max()) if n_pairs else float("nan"),
      "n_pairs_above": int((overlap["rel_gap"] >= th.overlap_rel_gap).sum()),
      "spread_beta": stats.spread_ratio(pos["best_beta"]),
      "spread_beta_eff": stats.spread_ratio(pos["best_beta_eff"]),
      "spread_beta_all": stats.spread_ratio(best["best_beta"]),
      "step_budget": step,
  }


def compute(run: Run, *, step: float | None = None, thresholds: Thresholds | None = None,
            out_dir=None) -> Report:
  """All statistics and findings of a loaded run (no files written)."""
  th = thresholds or Thresholds()
  valid = run.valid
  if valid.empty:
    raise ValueError(f"{run.path}: no valid rows (every member diverged or has non-finite KL/gold)")
  step = stats.budget_step(run.table, step)
  frontiers = frontier_lib.family_frontiers(valid)
  frontiers = {f: frontiers[f] for f in run.families if f in frontiers}
  overlap = frontier_lib.overlap_table(frontiers)
  members = stats.member_overoptimization(valid, drop_z=th.drop_z, min_rel_drop=th.min_rel_drop)
  fam_stats = stats.family_overoptimization(valid, members, drop_z=th.drop_z, min_rel_drop=th.min_rel_drop)
  by_beta = stats.gold_by_beta(run.table, step)
  best = stats.best_beta(run.table, step)
  fits = _fit_all(valid, run.bon)
  overview = _overview(run, overlap, best, fam_stats, members, step, th)
  found = [findings_lib.frontier_overlap(overlap, overview, th),
           findings_lib.best_beta_alignment(best, overview),
           findings_lib.overoptimization(fam_stats, overview, th)]
  return Report(run=run, out_dir=pathlib.Path(out_dir) if out_dir else run.path / REPORT_DIR,
                summary=_summary(run.families, fam_stats, best, fits), members=members,
                family_stats=fam_stats, best=best, by_beta=by_beta, overlap=overlap,
                frontiers=frontiers, fits=fits, overview=overview, thresholds=th, findings=found)


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
    "best_beta_eff": "best beta_eff", "gold_at_best": "gold at best β", "bon_alpha": "Gao-BoN α",
    "bon_beta": "Gao-BoN β", "bon_d_peak": "BoN d*", "bon_rmse": "BoN rmse", "rl_alpha": "Gao-RL α",
    "rl_beta": "Gao-RL β", "rl_d_peak": "RL d*", "rl_rmse": "RL rmse", "drop": "drop from peak",
    "falls": "falls", "members_falling": "members falling",
}


def render_markdown(rep: Report) -> str:
  """The text of ``report.md``."""
  run, ov, th = rep.run, rep.overview, rep.thresholds
  rel = lambda p: p.relative_to(rep.out_dir).as_posix()  # noqa: E731
  out = [f"# gpo_jax sweep report: `{run.path.name}`", ""]
  meta = [f"{fmt(ov['n_families'])} families, {fmt(ov['n_members'])} members "
          f"({fmt(ov['n_diverged_members'])} diverged, excluded from statistics after divergence), "
          f"eval steps up to {fmt(run.table['step'].max())}; step budget for best β: {fmt(ov['step_budget'])}."]
  if run.manifest:
    keys = [k for k in ("lab", "wall_time_s", "mesh", "devices", "versions") if k in run.manifest]
    meta.append("Manifest: " + ", ".join(f"{k} = `{run.manifest[k]}`" for k in keys) + ".")
  out += meta + [""]
  if "frontiers_all" in rep.figures:
    out += [f"![frontiers of all families]({rel(rep.figures['frontiers_all'][0])})", "",
            f"*{FIGURE_CAPTIONS['frontiers_all']}*", ""]
  out += ["## Summary per family", "",
          "Best gold and the KL at which it occurs are pooled over β and steps; best β/beta_eff is the β with the "
          f"highest gold at step {fmt(ov['step_budget'])}; Gao fits use every valid point of the family, "
          "R(0) = 0, d = sqrt(KL); d* = n/a means no interior peak.", "",
          md_table(rep.summary, SUMMARY_COLUMNS), ""]
  bon_fit = rep.fits.get(("best-of-n", "bon"))
  if bon_fit is not None:
    out += [f"Best-of-n baseline ({run.bon['selector']}, pool N = {run.bon['N']}): Gao-BoN fit α = {fmt(bon_fit.alpha)}, "
            f"β = {fmt(bon_fit.beta)}, rmse = {fmt(bon_fit.rmse)}.", ""]
  out += ["## Findings", ""]
  for i, f in enumerate(rep.findings, 1):
    out += [f"### {i}. {f.question} — **{f.verdict}**", "", f.text, ""]
  out += [f"Decision rules: frontiers overlap if max pairwise relative gap < {fmt(th.overlap_rel_gap)}; "
          f"gold falls if the drop is ≥ {fmt(th.min_rel_drop)} of the peak and ≥ {fmt(th.drop_z)} standard errors.", ""]
  out += ["## Figures", ""]
  for name, paths in rep.figures.items():
    if name == "frontiers_all":
      continue
    out += [f"![{name}]({rel(paths[0])})", "", f"*{FIGURE_CAPTIONS.get(name, name)}* ([svg]({rel(paths[1])}))", ""]
  out += ["## Frontier gaps (all pairs)", "",
          md_table(rep.overlap, {"family_a": "family A", "family_b": "family B", "gap": "mean |gap|",
                                 "rel_gap": "relative gap", "lo": "sqrt-KL from", "hi": "sqrt-KL to"}), ""]
  out += ["## Gold per β at the step budget", "",
          md_table(rep.by_beta, {"family": "family", "beta": "β", "beta_eff": "beta_eff", "gold": "gold",
                                 "gold_se": "se", "kl": "KL", "seeds": "seeds"}), ""]
  out += ["## Members", "",
          md_table(rep.members, {"member": "member", "family": "family", "beta": "β", "peak_gold": "peak gold",
                                 "kl_at_peak": "KL at peak", "kl_max": "largest KL",
                                 "gold_at_kl_max": "gold there", "drop": "drop", "drop_z": "drop/se",
                                 "falls": "falls"}), ""]
  return "\n".join(out)


def write(rep: Report, figures: bool = True) -> pathlib.Path:
  """Writes figures, ``report.md`` and CSVs of the tables into ``rep.out_dir``."""
  rep.out_dir.mkdir(parents=True, exist_ok=True)
  if figures:
    rep.figures = make_figures(rep)
  for name in ("summary", "members", "by_beta", "overlap"):
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
