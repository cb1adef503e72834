"""The in-context report's figure: gold vs sqrt KL of offline GPO, Inverse-Q* (our reconstruction), ICDPO and best-of-N on one axis."""

from __future__ import annotations

import pathlib

import numpy as np

from gpo_jax.analysis import plots

GOLD = "gold/reward"
IQ_LABEL = "Inverse-Q* (reconstruction)"
ICDPO_COLOR, LIK_COLOR, CEIL_COLOR, BON_COLOR = "darkmagenta", "0.35", "0.1", "0.55"


def _sqrt(x) -> np.ndarray:
  return np.sqrt(np.clip(np.asarray(x, float), 0.0, None))


def _families(ax, rep, families, style, linestyle, suffix: str, trajectories: bool = True,
              linewidth: float = 1.6):
  for fam in families:
    st = style[fam]
    g = rep.table[rep.table["family"] == fam]
    for _, mg in (g.groupby(["stage", "member"], sort=True) if trajectories else ()):
      mg = mg.sort_values("step")
      ax.plot(mg["sqrt_kl"], mg[GOLD], color=st["color"], marker=st["marker"], markersize=2.5,
              linewidth=0.5, alpha=0.25)
    fr = rep.frontiers.get(fam)
    if fr is None:
      continue
    x, y = fr.line()
    ax.plot(x, y, color=st["color"], linestyle=linestyle, linewidth=linewidth,
            marker=st["marker"], markersize=4, markerfacecolor="none", label=fam + suffix)


def _icdpo(ax, rows):
  """Every ICDPO config faintly; the highest-gold config per N with its KL bracket."""
  ic = rows[rows["method"] == "icdpo"]
  if ic.empty:
    return
  ax.plot(_sqrt(ic["kl"]), ic["gold"], linestyle="none", marker=".", markersize=3,
          color=ICDPO_COLOR, alpha=0.3)
  best = ic.sort_values(["n", "gold"], ascending=[True, False], kind="stable").groupby(
      "n", sort=True).head(1)
  x_hi, x_lo = _sqrt(best["kl"]), _sqrt(best["kl_lower"] if "kl_lower" in best else best["kl"])
  y = best["gold"].to_numpy(float)
  ax.hlines(y, x_lo, x_hi, color=ICDPO_COLOR, linewidth=1.2)
  ax.plot(x_hi, y, color=ICDPO_COLOR, marker="*", markersize=7, linewidth=0.8,
          label="ICDPO, best config per N (bar: KL bracket k1 to kl)")
  for xi, yi, n in zip(x_hi, y, best["n"]):
    ax.annotate(f"N={int(n)}", (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=5,
                color=ICDPO_COLOR)


def _curve(ax, rows, method, **kw):
  g = rows[rows["method"] == method].sort_values("n")
  if len(g):
    ax.plot(_sqrt(g["kl"]), g["gold"], **kw)


def _pool_curves(ax, pool):
  """Best-of-n on the proxy setting's pool: the held-out best ICDPO config and proxy selector."""
  from gpo_jax.analysis import incontext_pool
  from gpo_jax.evaluation import bon as bon_lib
  c = incontext_pool.compare(pool)
  x = _sqrt(bon_lib.kl_bon(np.asarray(pool.ns)))
  for choice, color, marker, label in ((c.icdpo, ICDPO_COLOR, "P", "best-of-n by ICDPO score"),
                                       (c.proxy, "tab:brown", "s", "best-of-n by proxy")):
    if choice is None:
      continue
    y = pool.per_prompt[choice[0]].mean(axis=0)
    ax.plot(x, y, color=color, marker=marker, markersize=3, linewidth=0.9, linestyle=(0, (3, 1)),
            label=f"{label} {choice[0].split('/', 1)[1]} (proxy setting's pool)")


def frontier_figure(rep, out_dir: pathlib.Path, name: str = "incontext_frontier") -> list[pathlib.Path]:
  """Draws ``name.{png,svg}`` for an :class:`~gpo_jax.analysis.incontext.InContextReport`; returns the paths."""
  others = getattr(rep, "other_families", {}) or {}
  families = (list(rep.offline_families) + list(rep.iq_families)
              + [f for fams in others.values() for f in fams])
  style = plots.family_style(families)
  fig, ax = plots.figure(figsize=(7.4, 5.6) if not others else (8.4, 6.6))
  _families(ax, rep, rep.offline_families, style, "--", " (offline GPO)")
  _families(ax, rep, rep.iq_families, style, "-", f" — {IQ_LABEL}")
  # other methods' runs on the same lab (compare.json): frontiers only, thin
  for stage, fams in others.items():
    _families(ax, rep, fams, style, ":" if stage == "online" else "-.",
              " (online)" if stage == "online" else "", trajectories=False, linewidth=1.0)
  if rep.icdpo is not None:
    rows = rep.icdpo.rows
    _icdpo(ax, rows)
    _curve(ax, rows, "bon_likelihood", color=LIK_COLOR, marker="x", linestyle=":", markersize=4,
           label="best-of-N by likelihood (π_ref, ICDPO stage)")
    _curve(ax, rows, "bon_gold", color=CEIL_COLOR, marker="^", linestyle="-.", markersize=3,
           markerfacecolor="none", label="best-of-N by gold: oracle ceiling (ICDPO stage)")
  pool = getattr(rep, "pool", None)
  if pool is not None:
    _pool_curves(ax, pool)
  bon = rep.offline.bon if rep.offline is not None else None
  if bon is not None:
    ax.plot(_sqrt(bon["kl"]), bon["gold"], color=BON_COLOR, marker="v", linestyle=(0, (1, 1)),
            markersize=3, label=f"π_ref best-of-n by {bon['selector']} (offline evaluator)")
  ax.axhline(0.0, color="0.8", linewidth=0.6)
  ax.set(xlabel="sqrt KL(π‖π_ref)  [sqrt nats]", ylabel="gold reward (ref-subtracted)",
         title="In-context methods vs offline GPO (dashed) and Inverse-Q* reconstruction (solid)")
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    fig.legend(loc="outside lower center", fontsize=5.5, ncol=3)
  return plots.save(fig, out_dir, name)
