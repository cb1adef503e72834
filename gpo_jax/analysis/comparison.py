"""Comparison of several runs (e.g. two offline dataset sizes): overlaid frontiers and where the gold peak moves."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import pandas as pd

from gpo_jax.analysis import plots
from gpo_jax.analysis.findings import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Finding, Thresholds, fmt
from gpo_jax.analysis.report import Report, compute, md_table
from gpo_jax.analysis.table import load_run


@dataclasses.dataclass
class Comparison:
  """Per-run reports (statistics only), the peak table, the finding and the written files."""
  reports: list[Report]
  peaks: pd.DataFrame       # one row per (run, family) plus family "all"
  finding: Finding
  figures: dict
  path: pathlib.Path | None = None


def _labels(reports: list[Report]) -> list[str]:
  """Run labels: data sizes when they tell runs apart, else directory names, else numbered."""
  for labels in ([r.run.label for r in reports], [r.run.path.name for r in reports]):
    if len(set(labels)) == len(labels):
      return labels
  return [f"{i}:{r.run.path.name}" for i, r in enumerate(reports)]


def _peaks(reports: list[Report], labels: list[str]) -> pd.DataFrame:
  rows = []
  for rep, label in zip(reports, labels):
    size = rep.run.table["data_size"].dropna().unique() if "data_size" in rep.run.table else []
    data_size = float(size[0]) if len(size) == 1 else float("nan")
    fs = rep.family_stats
    for _, r in fs.iterrows():
      rows.append({"run": label, "data_size": data_size, "family": r["family"], "peak_gold": r["peak_gold"],
                   "peak_gold_se": r["peak_gold_se"], "kl_at_peak": r["kl_at_peak"]})
    top = fs.loc[fs["peak_gold"].idxmax()]
    rows.append({"run": label, "data_size": data_size, "family": "all", "peak_gold": top["peak_gold"],
                 "peak_gold_se": top["peak_gold_se"], "kl_at_peak": top["kl_at_peak"]})
  return pd.DataFrame(rows)


def peak_shift(peaks: pd.DataFrame, z: float = 2.0) -> Finding:
  """SPEC §7.3 (second half): does more offline data move the gold peak to larger KL and higher gold?

  Runs are ordered by ``data_size``. Per family, "up" means every step to a larger
  dataset raises peak gold by more than ``z`` combined standard errors; "right" means
  every step raises the KL at the peak.
  """
  q = "Does more offline data move the gold peak right (larger KL) and up (higher gold)?"
  runs = peaks.drop_duplicates("run")
  if len(runs) < 2:
    return Finding("data_size", q, INCONCLUSIVE, "Only one run: nothing to compare.")
  if runs["data_size"].isna().any() or runs["data_size"].nunique() < len(runs):
    return Finding("data_size", q, INCONCLUSIVE,
                   "The runs do not have distinct data_size values, so the dataset-size claim cannot be tested.")
  order = list(runs.sort_values("data_size")["run"])
  fams = [f for f in dict.fromkeys(peaks["family"]) if f != "all"
          and (peaks["family"] == f).sum() == len(order)]
  right_up, parts = [], []
  for f in fams:
    g = peaks[peaks["family"] == f].set_index("run").loc[order]
    dg = np.diff(g["peak_gold"].to_numpy())
    se = np.hypot(g["peak_gold_se"].to_numpy()[1:], g["peak_gold_se"].to_numpy()[:-1])
    up = bool(np.all(dg > z * np.where(np.isfinite(se), se, 0.0)))
    right = bool(np.all(np.diff(g["kl_at_peak"].to_numpy()) > 0))
    if up and right:
      right_up.append(f)
  a = peaks[peaks["family"] == "all"].set_index("run").loc[order]
  chain = " → ".join(f"peak gold {fmt(r['peak_gold'])} at KL {fmt(r['kl_at_peak'])} (data_size {fmt(r['data_size'])})"
                     for _, r in a.iterrows())
  text = (f"Best family per run, by increasing data_size: {chain}. In {fmt(len(right_up))} of {fmt(len(fams))} "
          f"families the peak moves both right and up with more data (up: gain above {fmt(z)} standard errors)")
  text += f": {', '.join(right_up)}." if right_up else "."
  if fams and len(right_up) == len(fams):
    verdict = SUPPORTED
    text += " More data moves the peak right and up, as the paper says."
  else:
    verdict = NOT_SUPPORTED
    text += " The data do not show that more data moves the peak right and up in every family."
  return Finding("data_size", q, verdict, text)


def compare(run_dirs, out_dir=None, *, thresholds: Thresholds | None = None, figures: bool = True) -> Comparison:
  """Compares several run directories and writes ``comparison.md`` (+ an overlaid-frontier figure).

  Args:
    run_dirs: two or more trainer work directories.
    out_dir: output directory (default: ``comparison/`` next to the first run).
    thresholds: decision rules passed to every per-run analysis.
    figures: write the overlay figure.
  """
  run_dirs = [pathlib.Path(d) for d in run_dirs]
  if len(run_dirs) < 2:
    raise ValueError(f"compare needs at least two run directories, got {[str(d) for d in run_dirs]}")
  out_dir = pathlib.Path(out_dir) if out_dir else run_dirs[0].parent / "comparison"
  reports = [compute(load_run(d), thresholds=thresholds) for d in run_dirs]
  labels = _labels(reports)
  peaks = _peaks(reports, labels)
  finding = peak_shift(peaks)
  figs = {}
  out_dir.mkdir(parents=True, exist_ok=True)
  if figures:
    figs["compare_frontiers"] = plots.plot_compare_frontiers(
        {lab: r.frontiers for lab, r in zip(labels, reports)}, out_dir / "figures")
  lines = ["# gpo_jax comparison", "", "Runs: " + ", ".join(f"`{lab}` ({r.run.path})" for lab, r in zip(labels, reports)), ""]
  if figs:
    lines += ["![frontiers of every run per family](figures/compare_frontiers.png)", ""]
  lines += ["## Peak gold and KL at the peak", "",
            md_table(peaks, {"run": "run", "family": "family", "peak_gold": "peak gold",
                             "peak_gold_se": "se", "kl_at_peak": "KL at peak"}), "",
            f"## {finding.question} — **{finding.verdict}**", "", finding.text, ""]
  for lab, r in zip(labels, reports):
    lines += [f"## Run `{lab}`", ""] + [f"- {f.question} **{f.verdict}**: {f.text}" for f in r.findings] + [""]
  path = out_dir / "comparison.md"
  path.write_text("\n".join(lines))
  peaks.to_csv(out_dir / "peaks.csv", index=False)
  return Comparison(reports=reports, peaks=peaks, finding=finding, figures=figs, path=path)
