"""Figures of the proxy report: best-of-n by selector class, Gao et al.'s Figure 1 for best-of-n and for RL, and best-of-n against RL per selector.

Selector kinds (SPEC §5's classes) are labelled and styled alike in every figure
(:data:`KIND_STYLE`): the gold-selected oracle in grey, proxy RMs blue, ensembles purple,
offline policies' implicit rewards green dash-dotted.

Every function takes the objects :mod:`gpo_jax.analysis.proxy_evidence` computes (best-of-n
results, the RL result; duck-typed, so this module does not import it) and returns the paths
:func:`gpo_jax.analysis.plots.save` wrote.
"""

from __future__ import annotations

import pathlib

import numpy as np

from gpo_jax.analysis import gao, plots

MAX_PANELS = 12
_ORACLE_COLOR, _BON_COLOR = "0.6", "k"
# Per selector kind (SPEC §5's classes, labelled): gold colour, line style, legend label.
KIND_STYLE = {"single": ("C0", "-", "proxy RM"), "ensemble": ("C4", "--", "ensemble"),
              "implicit": ("C2", "-.", "implicit reward")}
_KIND_ORDER = ("single", "implicit", "ensemble")


def _grid(n: int, width: float = 3.4, height: float = 2.8):
  cols = min(4, max(1, n))
  rows = int(np.ceil(max(1, n) / cols))
  fig, axes = plots.figure(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
  for ax in axes.flat[n:]:
    ax.set_visible(False)
  return fig, list(axes.flat)


def _beta_colors(betas) -> dict[float, tuple]:
  """One viridis colour per KL coefficient (0 allowed, so no log norm)."""
  vals = sorted({float(b) for b in betas if np.isfinite(b)})
  cmap = plots.plt.get_cmap("viridis")
  return {b: cmap(0.85 * i / max(1, len(vals) - 1)) for i, b in enumerate(vals)}


def _band(ax, x, y, se, color, label, linestyle="-"):
  ax.plot(x, y, color=color, linestyle=linestyle, marker="o", markersize=2.5, label=label)
  if se is not None and np.any(np.isfinite(se)):
    s = np.nan_to_num(np.asarray(se, float))
    ax.fill_between(x, y - s, y + s, color=color, alpha=0.18, linewidth=0)


def _kind_rank(kind: str) -> int:
  return _KIND_ORDER.index(kind) if kind in _KIND_ORDER else len(_KIND_ORDER)


def _selectors(bon: dict, limit: int = MAX_PANELS) -> list[str]:
  """Up to ``limit`` non-oracle selectors, taken from each kind in turn (so every kind shows), in kind order."""
  by_kind: dict[str, list[str]] = {}
  for n in sorted(n for n, b in bon.items() if b.kind != "oracle"):
    by_kind.setdefault(bon[n].kind, []).append(n)
  queues = [by_kind[k] for k in sorted(by_kind, key=lambda k: (_kind_rank(k), k))]
  picked: list[str] = []
  while len(picked) < limit and any(queues):
    for q in queues:
      if q and len(picked) < limit:
        picked.append(q.pop(0))
  return sorted(picked, key=lambda n: (_kind_rank(bon[n].kind), n))


def _style(kind: str) -> tuple[str, str, str]:
  return KIND_STYLE.get(kind, ("C0", "-", kind))


def plot_bon(bon: dict, out_dir: pathlib.Path, name: str = "proxy_bon") -> list[pathlib.Path]:
  """Gao's Figure 1 for best-of-n: per selector, gold and proxy vs sqrt KL, the Gao fit, the oracle in grey."""
  names = _selectors(bon)
  oracle = next((b for b in bon.values() if b.kind == "oracle"), None)
  fig, axes = _grid(len(names))
  shown: set[str] = set()
  for ax, n in zip(axes, names):
    b = bon[n]
    color, ls, label = _style(b.kind)
    if oracle is not None:
      ax.plot(oracle.sqrt_kl, oracle.gold, color=_ORACLE_COLOR, linewidth=1.0, label="gold-selected (oracle)")
    _band(ax, b.sqrt_kl, b.gold, b.gold_se, color, f"gold ({label} selects)", linestyle=ls)
    ax.plot(b.sqrt_kl, b.proxy, color="C1", linestyle="--", marker="s", markersize=2.5, label="proxy (selector score)")
    if b.fit is not None:
      grid = np.linspace(0, b.sqrt_kl[-1], 100)
      ax.plot(grid, gao.gao_curve("bon", b.fit.alpha, b.fit.beta, grid), color=color, linestyle=":",
              label="Gao BoN fit")
    pk = b.peak.peak_index
    ax.axvline(b.sqrt_kl[pk], color="C3", linewidth=0.6, alpha=0.6)
    ax.set(title=f"{n} ({label})", xlabel="sqrt KL (BoN)", ylabel="reward (ref-subtracted)")
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    if b.kind not in shown:   # one legend per kind
      shown.add(b.kind)
      ax.legend(fontsize=6)
  return plots.save(fig, pathlib.Path(out_dir), name)


def plot_bon_kinds(bon: dict, out_dir: pathlib.Path, name: str = "proxy_bon_kinds") -> list[pathlib.Path]:
  """Every selector's best-of-n gold vs sqrt KL on one axis, styled by class: oracle ceiling, proxy RMs, ensembles, implicit rewards."""
  fig, axes = plots.figure(1, 1, figsize=(6.0, 4.2), squeeze=False)
  ax = axes[0, 0]
  oracle = next((b for b in bon.values() if b.kind == "oracle"), None)
  if oracle is not None:
    _band(ax, oracle.sqrt_kl, oracle.gold, oracle.gold_se, _ORACLE_COLOR, "gold-selected (oracle ceiling)")
    ax.lines[-1].set_linewidth(2.2)
  labelled: set[str] = set()
  for n in sorted((n for n, b in bon.items() if b.kind != "oracle"),
                  key=lambda n: (_kind_rank(bon[n].kind), n)):
    b = bon[n]
    color, ls, label = _style(b.kind)
    ax.plot(b.sqrt_kl, b.gold, color=color, linestyle=ls, linewidth=1.0, alpha=0.8,
            label=label if b.kind not in labelled else None)
    labelled.add(b.kind)
  ax.set(title="Best-of-n gold by selector class", xlabel="sqrt KL (BoN)",
         ylabel="gold (ref-subtracted)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return plots.save(fig, pathlib.Path(out_dir), name)


def plot_rl(rl, out_dir: pathlib.Path, name: str = "proxy_rl") -> list[pathlib.Path] | None:
  """Gao's Figure 1 for RL: per selector, members coloured by KL coefficient, gold solid, proxy dashed, Gao RL fits."""
  t = rl.trajectories
  if t.empty:
    return None
  fams = sorted(t["family"].unique())[:MAX_PANELS]
  colors = _beta_colors(t["beta"])
  fits = rl.tests.set_index("member") if not rl.tests.empty else None
  fig, axes = _grid(len(fams))
  for ax, f in zip(axes, fams):
    seen = set()
    for m, g in t[t["family"] == f].groupby("member", sort=True):
      b = float(g["beta"].iloc[0])
      c = colors.get(b, "k")
      lab = f"β_KL = {b:g}" if b not in seen else None
      seen.add(b)
      ax.errorbar(g["sqrt_kl"], g["gold"], yerr=g["gold_se"], color=c, marker="o", markersize=2.5,
                  capsize=1.5, linewidth=1.0, label=lab)
      if g["proxy"].notna().any():
        ax.plot(g["sqrt_kl"], g["proxy"], color=c, linestyle="--", linewidth=0.9)
      if fits is not None and m in fits.index and "gao_alpha" in fits.columns:
        a, be = fits.loc[m, "gao_alpha"], fits.loc[m, "gao_beta"]
        if np.isfinite(a) and np.isfinite(be):
          grid = np.linspace(0, float(g["sqrt_kl"].max()), 100)
          ax.plot(grid, gao.gao_curve("rl", a, be, grid), color=c, linestyle=":", linewidth=0.9)
    ax.set(title=f"RL against {f}", xlabel="sqrt KL", ylabel="reward (ref-subtracted)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, title="solid gold, dashed proxy, dotted Gao RL fit", title_fontsize=5)
  return plots.save(fig, pathlib.Path(out_dir), name)


def plot_bon_vs_rl(bon: dict, rl, out_dir: pathlib.Path, name: str = "proxy_bon_vs_rl"
                   ) -> list[pathlib.Path] | None:
  """Per selector with RL members: BoN gold and the members' gold trajectories vs sqrt KL on one axis."""
  t = rl.trajectories
  fams = sorted(f for f in t["family"].unique() if f in bon)[:MAX_PANELS] if not t.empty else []
  if not fams:
    return None
  colors = _beta_colors(t["beta"])
  fig, axes = _grid(len(fams))
  for ax, f in zip(axes, fams):
    b = bon[f]
    _band(ax, b.sqrt_kl, b.gold, b.gold_se, _BON_COLOR, f"best-of-n (N = {int(b.n[-1])})")
    seen = set()
    for _, g in t[t["family"] == f].groupby("member", sort=True):
      be = float(g["beta"].iloc[0])
      ax.errorbar(g["sqrt_kl"], g["gold"], yerr=g["gold_se"], color=colors.get(be, "C0"), marker="o",
                  markersize=2.5, capsize=1.5, linewidth=1.0,
                  label=f"RL β_KL = {be:g}" if be not in seen else None)
      seen.add(be)
    ax.set(title=f, xlabel="sqrt KL", ylabel="gold (ref-subtracted)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  return plots.save(fig, pathlib.Path(out_dir), name)


def make_figures(rep) -> dict[str, list[pathlib.Path]]:
  """All figures of a :class:`~gpo_jax.analysis.proxy.ProxyReport` into ``rep.out_dir/figures``."""
  fig_dir = rep.out_dir / "figures"
  figs = {"proxy_bon_kinds": plot_bon_kinds(rep.bon, fig_dir), "proxy_bon": plot_bon(rep.bon, fig_dir)}
  rl = plot_rl(rep.rl, fig_dir)
  if rl is not None:
    figs["proxy_rl"] = rl
  bvr = plot_bon_vs_rl(rep.bon, rep.rl, fig_dir)
  if bvr is not None:
    figs["proxy_bon_vs_rl"] = bvr
  return figs
