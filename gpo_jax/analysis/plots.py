"""Figures of a run (matplotlib Agg, PNG + SVG); families differ by marker and line style, not colour only."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib import ticker  # noqa: E402

from gpo_jax.analysis import gao  # noqa: E402

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<")
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 3)), (0, (6, 2, 1, 2)))
GOLD, GOLD_SE = "gold/reward", "gold/reward_se"
FORMATS = ("png", "svg")
# Text stays text in SVG (smaller, faster, searchable).
RC = {"svg.fonttype": "none", "svg.hashsalt": "gpo_jax", "figure.dpi": 100, "font.size": 8,
      "legend.fontsize": 6}


def figure(*args, **kwargs):
  """``plt.subplots`` with constrained layout, so saving needs no second "tight" render pass."""
  with plt.rc_context(RC):
    return plt.subplots(*args, layout="constrained", **kwargs)


def plain_log(ax, axis: str = "x", ticks=None):
  """Log scale with plain-number tick labels (mathtext labels are slow to lay out), ticks at ``ticks``."""
  getattr(ax, f"set_{axis}scale")("log")
  a = getattr(ax, f"{axis}axis")
  if ticks is not None:
    t = np.unique(np.asarray(ticks, float))
    t = t[np.isfinite(t) & (t > 0)]
    if len(t) > 8:  # keep labels legible: every k-th value
      t = t[:: int(np.ceil(len(t) / 8))]
    a.set_major_locator(ticker.FixedLocator(t))
  a.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  a.set_minor_locator(ticker.NullLocator())
  a.set_minor_formatter(ticker.NullFormatter())


def beta_colorbar(fig, norm, cmap, axes, betas):
  """A β colour bar with ticks at the swept β values."""
  cbar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="β", shrink=0.8)
  plain_log(cbar.ax, "y", ticks=betas)
  return cbar


def family_style(families) -> dict[str, dict]:
  """Marker, line style and (redundant) colour per family, stable in the given order."""
  return {f: {"marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[i % len(LINESTYLES)],
              "color": plt.get_cmap("tab10")(i % 10)}
          for i, f in enumerate(families)}


def save(fig, out_dir: pathlib.Path, name: str) -> list[pathlib.Path]:
  """Writes ``name.png`` and ``name.svg`` and closes the figure."""
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = []
  for ext in FORMATS:
    p = out_dir / f"{name}.{ext}"
    with plt.rc_context(RC):
      # No creation date in the file: a rerun writes identical bytes.
      fig.savefig(p, metadata={"Date": None} if ext == "svg" else None)
    paths.append(p)
  plt.close(fig)
  return paths


def _grid(n: int, width: float = 3.6, height: float = 3.0):
  cols = min(3, n)
  rows = int(np.ceil(n / cols))
  fig, axes = figure(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
  for ax in axes.flat[n:]:
    ax.set_visible(False)
  return fig, list(axes.flat)


def _beta_norm(table: pd.DataFrame):
  b = table["beta"].to_numpy(float)
  b = b[np.isfinite(b) & (b > 0)]
  return mcolors.LogNorm(vmin=b.min(), vmax=b.max() * (1.0001 if b.min() == b.max() else 1.0))


def _plot_bon(ax, bon: dict | None):
  if bon is None:
    return
  d = np.sqrt(np.asarray(bon["kl"], float))
  ax.errorbar(d, bon["gold"], yerr=bon["gold_se"], color="0.35", marker="x", linestyle=(0, (1, 1)),
              markersize=5, label=f"best-of-n ({bon['selector']}, N={bon['N']})")


def plot_all_frontiers(frontiers, style, bon, out_dir, name="frontiers_all"):
  """All families' frontiers (running max of gold over sqrt-KL) on one axis, with best-of-n."""
  fig, ax = figure(figsize=(6.4, 4.4))
  for f, fr in frontiers.items():
    st = style[f]
    ax.step(fr.x, fr.envelope, where="post", color=st["color"], linestyle=st["linestyle"], label=f)
    ax.plot(fr.pareto["sqrt_kl"], fr.pareto[GOLD], linestyle="none", marker=st["marker"],
            color=st["color"], markerfacecolor="none", markersize=5)
  _plot_bon(ax, bon)
  ax.set(xlabel="sqrt KL(π‖π_ref)  [sqrt nats]", ylabel="gold reward (ref-subtracted)",
         title="Frontiers: upper envelope over β and steps")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  return save(fig, out_dir, name)


def plot_family_frontiers(valid, frontiers, fits, bon, out_dir, name="frontiers_by_family"):
  """One panel per family: points coloured by β, the frontier, fitted Gao curves, best-of-n."""
  fams = list(frontiers)
  fig, axes = _grid(len(fams))
  norm, cmap = _beta_norm(valid), plt.get_cmap("viridis")
  sc = None
  for k, (ax, f) in enumerate(zip(axes, fams)):
    g = valid[valid["family"] == f]
    sc = ax.scatter(g["sqrt_kl"], g[GOLD], c=g["beta"], cmap=cmap, norm=norm, s=12, marker="o")
    fr = frontiers[f]
    ax.step(fr.x, fr.envelope, where="post", color="k", linewidth=1.2, label="frontier")
    grid = np.linspace(0, fr.x[-1], 200)
    for form, ls in (("bon", "--"), ("rl", ":")):
      fit = fits.get((f, form))
      if fit is not None:
        ax.plot(grid, gao.gao_curve(form, fit.alpha, fit.beta, grid), color="k", linestyle=ls,
                label=f"Gao {form}-form fit")
    _plot_bon(ax, bon)
    ax.set(title=f, xlabel="sqrt KL", ylabel="gold reward")
    ax.grid(alpha=0.3)
    if k == 0:  # one legend: the line styles mean the same in every panel
      ax.legend(fontsize=6)
  if sc is not None:
    beta_colorbar(fig, norm, cmap, axes[:len(fams)], valid["beta"])
  return save(fig, out_dir, name)


def plot_gold_vs_beta(by_beta, style, out_dir, name="gold_vs_beta"):
  """Gold at the step budget vs β and vs beta_eff = β f''(0)/|f'(0)| (families with beta_eff = 0 omitted there)."""
  fig, axes = figure(1, 2, figsize=(10, 4), sharey=True)
  for f, g in by_beta.groupby("family", sort=False):
    st = style[f]
    kw = dict(marker=st["marker"], linestyle=st["linestyle"], color=st["color"], capsize=2, label=f)
    axes[0].errorbar(g["beta"], g["gold"], yerr=g["gold_se"], **kw)
    pos = g[g["beta_eff"] > 0]
    if len(pos):
      axes[1].errorbar(pos["beta_eff"], pos["gold"], yerr=pos["gold_se"], **kw)
  step = by_beta["step"].iloc[0] if len(by_beta) else float("nan")
  plain_log(axes[0], ticks=by_beta["beta"])
  plain_log(axes[1], ticks=by_beta.loc[by_beta["beta_eff"] > 0, "beta_eff"])
  axes[0].set(xlabel="β", ylabel=f"gold reward at step {step:g}", title="gold vs β")
  axes[1].set(xlabel="beta_eff = β f''(0)/|f'(0)|", title="gold vs beta_eff (beta_eff > 0)")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  return save(fig, out_dir, name)


def plot_offline_reg_vs_kl(valid, style, out_dir, name="offline_reg_vs_kl"):
  """The μ-weighted squared loss on held-out pairs against on-policy KL."""
  fig, ax = figure(figsize=(6, 4.2))
  for f, g in valid.groupby("family", sort=False):
    st = style[f]
    ax.plot(g["kl"], g["offline_reg"], linestyle="none", marker=st["marker"], color=st["color"],
            markerfacecolor="none", markersize=4, label=f)
  ax.set(xlabel="KL(π‖π_ref) [nats]", ylabel="offline_reg = ½ mean ρ² (held-out pairs)",
         title="offline regulariser vs KL")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return save(fig, out_dir, name)


def plot_training_curves(table, out_dir, name="training_curves"):
  """Per family: gold (top row) and KL (bottom row) vs step, one line per member coloured by β."""
  fams = list(dict.fromkeys(table["family"]))
  n = len(fams)
  fig, axes = figure(2, n, figsize=(2.6 * n, 4.6), squeeze=False, sharex=True, sharey="row")
  norm, cmap = _beta_norm(table), plt.get_cmap("viridis")
  for j, f in enumerate(fams):
    g = table[table["family"] == f]
    for i, (_, mg) in enumerate(g.groupby("member", sort=False)):
      kw = dict(color=cmap(norm(mg["beta"].iloc[0])), linestyle=LINESTYLES[i % len(LINESTYLES)],
                marker=MARKERS[i % len(MARKERS)], markersize=2.5)
      axes[0, j].plot(mg["step"], mg[GOLD], **kw)
      axes[1, j].plot(mg["step"], mg["kl"], **kw)
    axes[0, j].set_title(f)
    axes[1, j].set_xlabel("step")
  axes[0, 0].set_ylabel("gold reward")
  axes[1, 0].set_ylabel("KL [nats]")
  beta_colorbar(fig, norm, cmap, axes[:, -1].tolist(), table["beta"])
  return save(fig, out_dir, name)


REWARD_COLUMNS = ("proxy/reward", "rewards/margins")


def plot_reward_vs_gold(valid, style, out_dir, name="reward_vs_gold"):
  """Proxy reward and offline implicit-reward margin against gold, for the columns present; None if none."""
  cols = [c for c in REWARD_COLUMNS if c in valid and valid[c].notna().any()]
  if not cols:
    return None
  fig, axes = figure(1, len(cols), figsize=(5 * len(cols), 4), squeeze=False)
  for ax, c in zip(axes.flat, cols):
    for f, g in valid.groupby("family", sort=False):
      st = style[f]
      ax.plot(g[c], g[GOLD], linestyle="none", marker=st["marker"], color=st["color"],
              markerfacecolor="none", markersize=4, label=f)
    ax.set(xlabel=c, ylabel="gold reward", title=f"{c} vs gold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  return save(fig, out_dir, name)


def plot_compare_frontiers(runs_frontiers: dict[str, dict], out_dir, name="compare_frontiers"):
  """Frontiers of several runs: one panel per family, one line style per run."""
  fams = list(dict.fromkeys(f for fr in runs_frontiers.values() for f in fr))
  fig, axes = _grid(len(fams))
  for ax, f in zip(axes, fams):
    for i, (label, frs) in enumerate(runs_frontiers.items()):
      if f in frs:
        fr = frs[f]
        ax.step(fr.x, fr.envelope, where="post", linestyle=LINESTYLES[i % len(LINESTYLES)],
                color=plt.get_cmap("tab10")(i % 10), label=label)
        ax.plot(fr.pareto["sqrt_kl"], fr.pareto[GOLD], linestyle="none", marker=MARKERS[i % len(MARKERS)],
                color=plt.get_cmap("tab10")(i % 10), markerfacecolor="none", markersize=4)
    ax.set(title=f, xlabel="sqrt KL", ylabel="gold reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  return save(fig, out_dir, name)
