"""Summarise long-horizon runs (configs/long_horizon.py) into one markdown page.

  python experiments/long_horizon.py RUN_DIR [RUN_DIR ...] --out experiments/results/long_horizon

For each run: its analysis report (``report/`` inside the output folder, one sub-folder per
run) and one summary row per (family, β): the held-out peak-and-fall test of each seed
(mean over seeds of the gold at the peak and at the largest-KL step, the drop with its
seed-pooled SE, how many seeds' tests reject), KL, length, EOS fraction, the corpus
log-likelihood at the end, and the implicit reward's accuracy against the gold ordering at
the peak and at the end. Writes ``summary.md`` and ``summary.csv``; every number comes from
the runs' files.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys

import numpy as np
import pandas as pd

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpo_jax.analysis import report as report_lib  # noqa: E402
from gpo_jax.analysis import table as table_lib  # noqa: E402
from gpo_jax.analysis.findings import fmt  # noqa: E402


def _at(run, member: int, step: float, col: str) -> float:
  t = run.table
  r = t[(t["member"] == member) & (t["step"] == step)]
  return float(r[col].iloc[0]) if len(r) and col in r else float("nan")


def _nanmean(values) -> float:
  v = np.asarray(values, float)
  return float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else float("nan")


def run_rows(run, rep) -> pd.DataFrame:
  tests = rep.members
  if tests.empty:
    return pd.DataFrame()
  cfg = run.config or {}
  lab = cfg.get("lab", {})
  rows = []
  for (fam, beta), g in tests.groupby(["family", "beta"], sort=False):
    extra = {c: [] for c in ("eos_end", "len_end", "ll_end", "acc_peak", "acc_end")}
    for _, r in g.iterrows():
      m = int(r["member"])
      extra["eos_end"].append(_at(run, m, r["end_step"], "eos_frac"))
      extra["len_end"].append(_at(run, m, r["end_step"], "response_len"))
      extra["ll_end"].append(_at(run, m, r["end_step"], "loglik"))
      extra["acc_peak"].append(_at(run, m, r["peak_step"], "rewards/gold_accuracies"))
      extra["acc_end"].append(_at(run, m, r["end_step"], "rewards/gold_accuracies"))
    k = len(g)
    rows.append({
        "run": run.path.name, "pairs": float(g["data_size"].iloc[0]) if "data_size" in g else float("nan"),
        "lab_seed": lab.get("seed", float("nan")), "gold": lab.get("gold_kind", "network"),
        "family": fam, "beta": float(beta), "beta_eff": float(g["beta_eff"].iloc[0]), "seeds": k,
        "peak_step": float(g["peak_step"].median()), "end_step": float(g["end_step"].median()),
        "kl_peak": float(g["kl_at_peak"].mean()), "kl_end": float(g["kl_end"].mean()),
        "gold_peak": float(g["peak_gold"].mean()), "gold_end": float(g["end_gold"].mean()),
        "drop": float(g["drop"].mean()),
        "drop_se": float(np.sqrt(np.sum(g["drop_se"] ** 2)) / k),
        "falling": int(g["falls"].sum()), "mde": float(g["mde"].median()),
        **{c: _nanmean(v) for c, v in extra.items()}})
  return pd.DataFrame(rows)


COLUMNS = {"family": "family", "beta_eff": "β_eff", "beta": "β", "seeds": "seeds",
           "peak_step": "peak step", "kl_peak": "KL at peak", "gold_peak": "gold at peak",
           "end_step": "end step", "kl_end": "KL at end", "gold_end": "gold at end",
           "drop": "drop", "drop_se": "se", "falling": "seeds falling", "mde": "MDE",
           "len_end": "length at end", "eos_end": "EOS frac at end", "ll_end": "loglik at end",
           "acc_peak": "gold acc. at peak", "acc_end": "gold acc. at end"}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("run_dirs", nargs="+")
  p.add_argument("--out", required=True)
  p.add_argument("--no-figures", action="store_true")
  a = p.parse_args(argv)
  out = pathlib.Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  parts, lines = [], ["# Long-horizon offline runs: summary", ""]
  for d in a.run_dirs:
    run = table_lib.load_run(d)
    rep = report_lib.compute(run, out_dir=out / run.path.name)
    report_lib.write(rep, figures=not a.no_figures)
    for name in ("config.json", "manifest.json", "bon.json"):
      if (run.path / name).exists():
        shutil.copy(run.path / name, out / run.path.name / name)
    rows = run_rows(run, rep)
    parts.append(rows)
    man = run.manifest or {}
    lines += [f"## `{run.path.name}`", "",
              f"{fmt(man.get('members', float('nan')))} members, {fmt(man.get('steps', float('nan')))} steps, "
              f"wall {fmt(man.get('wall_time_s', float('nan')))} s; report: [{run.path.name}/report.md]"
              f"({run.path.name}/report.md).", ""]
    lines += [f"- {f.question} **{f.verdict}**: {f.text}" for f in rep.findings] + [""]
    if not rows.empty:
      cols = {k: v for k, v in COLUMNS.items() if k in rows and rows[k].notna().any()}
      lines += [report_lib.md_table(rows, cols), ""]
  allrows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
  allrows.to_csv(out / "summary.csv", index=False)
  (out / "summary.md").write_text("\n".join(lines))
  print(out / "summary.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
