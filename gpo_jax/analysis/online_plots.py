"""The online report's figure: gold vs sqrt KL of every online and offline method on one axis, trajectories and frontiers."""

from __future__ import annotations

import pathlib

import numpy as np

from gpo_jax.analysis import plots

GOLD = "gold/reward"


def frontier_figure(rep, out_dir: pathlib.Path, name: str = "online_frontier") -> list[pathlib.Path]:
  """Draws ``name.{png,svg}`` for an :class:`~gpo_jax.analysis.online.OnlineReport`; returns the paths."""
  families = list(rep.online_families) + list(rep.offline_families)
  style = plots.family_style(families)
  offline = set(rep.offline_families)
  fig, ax = plots.figure(figsize=(7.0, 4.8))
  for fam in families:
    st = style[fam]
    g = rep.table[rep.table["family"] == fam]
    for _, mg in g.groupby(["stage", "member"], sort=True):
      mg = mg.sort_values("step")
      ax.plot(mg["sqrt_kl"], mg[GOLD], color=st["color"], marker=st["marker"], markersize=2.5,
              linewidth=0.5, alpha=0.25)
    fr = rep.frontiers.get(fam)
    if fr is None:
      continue
    x, y = fr.line()
    ax.plot(x, y, color=st["color"], linestyle="--" if fam in offline else "-", linewidth=1.6,
            marker=st["marker"], markersize=4, markerfacecolor="none",
            label=fam)
  if np.isfinite(rep.budget) and rep.budget > 0:
    ax.axvline(np.sqrt(rep.budget), color="0.4", linestyle=":", linewidth=1.0,
               label="matched-KL budget sqrt K")
  ax.set(xlabel="sqrt KL(π‖π_ref)  [sqrt nats]", ylabel="gold reward (ref-subtracted)",
         title="Online (solid) vs offline (dashed): frontiers over β and steps")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6, ncol=2)
  return plots.save(fig, out_dir, name)
