# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Run explorer
#
# Opens a sweep's run directory (what `python -m gpo_jax.main` writes: `metrics.jsonl`,
# `bon.json`, `config.json`, `manifest.json`) and redraws every figure of its report with
# `gpo_jax.analysis`, next to the summary table, the findings and the tables behind them.
# The last section recomputes the best β at a step budget of your choice.
#
# Set `GPO_RUN_DIR` (or edit `RUN_DIR` below) to point at another run; `GPO_STEP` picks the
# initial step budget (default: the final evaluated step). Nothing is written into the run
# directory: figures go to a temporary folder.

# %%
import os
import pathlib
import tempfile

import pandas as pd
from IPython.display import Image, Markdown, display

import gpo_jax
from gpo_jax import analysis
from gpo_jax.analysis import plots, report, stats

RUN_DIR = pathlib.Path(os.environ.get("GPO_RUN_DIR", "runs/cpu_sweep"))
STEP = float(os.environ["GPO_STEP"]) if os.environ.get("GPO_STEP") else None

if not RUN_DIR.exists() and not RUN_DIR.is_absolute():
  RUN_DIR = pathlib.Path(gpo_jax.__file__).resolve().parents[1] / RUN_DIR  # opened from notebooks/
FIG_DIR = pathlib.Path(tempfile.mkdtemp(prefix="gpo_run_explorer_"))
pd.set_option("display.precision", 4)
pd.set_option("display.max_columns", 40)

# %% [markdown]
# ## The run

# %%
run = analysis.load_run(RUN_DIR)
steps = sorted(run.table["step"].unique())
print(f"{RUN_DIR}: {run.table['member'].nunique()} members, families {run.families}")
print(f"evaluated steps: {steps}")
print(f"diverged members: {sorted(run.table.loc[run.table['diverged'], 'member'].unique().tolist())}")
if run.manifest:
  print({k: run.manifest[k] for k in ("lab", "mesh", "wall_time_s") if k in run.manifest})
run.table.head()

# %% [markdown]
# ## Summary per family and findings
#
# `report.compute` is what `python -m gpo_jax.analysis RUN_DIR` runs, without writing
# anything. Best gold and its KL are pooled over β and steps (descriptive); the best β is
# the argmax at the step budget (descriptive) and δ its registration shift with a prompt
# bootstrap interval; Gao fits are per frontier, SE-weighted, `d = sqrt(KL)`, `R(0) = 0`.

# %%
rep = report.compute(run, step=STEP, out_dir=FIG_DIR)
rep.summary.reindex(columns=list(report.SUMMARY_COLUMNS)).rename(columns=report.SUMMARY_COLUMNS)

# %%
for i, f in enumerate(rep.findings, 1):
  display(Markdown(f"**{i}. {f.question} — {f.verdict}**\n\n{f.text}"))
th = rep.thresholds
display(Markdown(f"*Every test at level {th.alpha}; minimum detectable effects at power {th.power}. "
                 "Peak-and-fall: peak chosen on half of the prompts, drop measured on the other half; "
                 "overlap: family gaps against seed-vs-seed gaps.*"))

# %% [markdown]
# ## Every figure of the report

# %%
rep.figures = report.make_figures(rep)
for name, paths in rep.figures.items():
  display(Markdown(f"**{name}** — {report.FIGURE_CAPTIONS.get(name, '')}"))
  display(Image(filename=str(paths[0])))

# %% [markdown]
# ## Tables behind the figures
#
# Gao fits per frontier (and of the best-of-n baseline) and per member trajectory, frontier
# gaps against the seed null, and each member's held-out peak-and-fall test.

# %%
pd.DataFrame([{"family": f, "form": form, "alpha": fit.alpha, "beta": fit.beta, "d*": fit.d_peak,
               "d* se": fit.d_peak_se, "R*": fit.r_peak, "rmse": fit.rmse, "points": fit.n_points}
              for (f, form), fit in rep.fits.items()])

# %%
rep.member_fits

# %%
rep.overlap_tests if not rep.overlap_tests.empty else rep.overlap

# %%
rep.members

# %% [markdown]
# ## Pick a step budget
#
# The best β of each family after a given number of training steps. Edit `STEP` in the
# first cell (or set `GPO_STEP`) and re-run; with `ipywidgets` installed a slider below the
# static figure redraws it for any evaluated step.

# %%
STYLE = plots.family_style(run.families)


def show_budget(step: float) -> None:
  """Gold vs β / beta_eff and the best β per family at ``step``."""
  by_beta = stats.gold_by_beta(run.table, step)
  paths = plots.plot_gold_vs_beta(by_beta, STYLE, FIG_DIR, name=f"gold_vs_beta_step{step:g}")
  display(Image(filename=str(paths[0])))
  display(stats.best_beta(run.table, step))


show_budget(rep.overview["step_budget"])
try:
  import ipywidgets
except ImportError:
  ipywidgets = None
if ipywidgets is not None:
  ipywidgets.interact(show_budget, step=ipywidgets.SelectionSlider(
      options=steps, value=rep.overview["step_budget"], description="step budget"))
