"""ICDPO's score against learned proxies on the proxy setting's π_ref pool: tables and a finding for the in-context report.

Reads ``<incontext dir>/icdpo_pool/`` as :mod:`gpo_jax.incontext.pool_bon` writes it
(``pool_bon.npz``: per-prompt best-of-n gold ``[E, K]`` for every selector — ICDPO configs,
π_ref's likelihood, the gold oracle and every proxy selector of the proxy setting — all
drawn from the *same* pool, so any two curves are paired sample by sample;
``pool_bon.json``: ``ns``, kinds, the regenerated pool's gold check), without JAX.

The finding compares the two ways of choosing from one pool without gold: ICDPO's
in-context score (no training, demonstrations retrieved from the gold-labelled data) and
a proxy reward model trained on the same data. Both choices are made on the even prompts
(the best ``(config, n)`` of each kind by gold) and measured on the odd ones: the paired
difference and its prompt-clustered SE, with the minimum detectable effect. Each kind's
held-out peak-and-fall over ``n`` (:func:`gpo_jax.analysis.inference.held_out_peak_test`)
says whether its best-of-n overoptimises.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pandas as pd

from gpo_jax.analysis import inference
from gpo_jax.analysis.findings import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Finding, Thresholds, fmt
from gpo_jax.analysis.report import md_table

STAGE = "icdpo_pool"
NPZ, JSON = "pool_bon.npz", "pool_bon.json"
CSV = "pool_bon.csv"
ORACLE, LIKELIHOOD = "gold (oracle)", "likelihood"
KINDS = ("icdpo", "proxy", "likelihood", "oracle")
COLUMNS = ("selector", "kind", "n", "gold", "gold_se", "n_prompts")


@dataclasses.dataclass
class PoolStage:
  path: pathlib.Path
  ns: list[int]
  kinds: dict[str, str]
  per_prompt: dict[str, np.ndarray]     # selector -> [E, K]
  info: dict

  @property
  def n_prompts(self) -> int:
    return next((int(a.shape[0]) for a in self.per_prompt.values()), 0)

  def names(self, kind: str) -> list[str]:
    return [n for n in self.per_prompt if self.kinds.get(n) == kind]


def load(path) -> PoolStage:
  """Reads a ``pool_bon`` directory; refuses arrays that do not fit ``ns`` or each other."""
  p = pathlib.Path(path)
  if not (p / JSON).exists() or not (p / NPZ).exists():
    raise FileNotFoundError(f"{p} holds no ICDPO-on-the-proxy-pool result ({JSON}, {NPZ})")
  info = json.loads((p / JSON).read_text())
  ns = [int(n) for n in info["ns"]]
  with np.load(p / NPZ) as z:
    per_prompt = {k.replace("__", "/"): np.asarray(z[k], np.float64) for k in sorted(z.files)}
  shapes = {a.shape for a in per_prompt.values()}
  if len(shapes) != 1 or next(iter(shapes))[1] != len(ns):
    raise ValueError(f"{p / NPZ}: arrays of shapes {sorted(shapes)} do not share [E, {len(ns)}]")
  kinds = {k: str(v) for k, v in info.get("kinds", {}).items()}
  unknown = sorted(set(per_prompt) - set(kinds))
  if unknown:
    raise ValueError(f"{p / JSON}: no kind for selectors {unknown}")
  return PoolStage(path=p, ns=ns, kinds=kinds, per_prompt=per_prompt, info=info)


def table(st: PoolStage) -> pd.DataFrame:
  """Every selector's best-of-n gold at every ``n`` with its prompt-clustered SE."""
  rows = []
  for name, a in st.per_prompt.items():
    for j, n in enumerate(st.ns):
      x = a[:, j]
      rows.append({"selector": name, "kind": st.kinds[name], "n": n, "gold": float(x.mean()),
                   "gold_se": float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else np.nan,
                   "n_prompts": len(x)})
  return pd.DataFrame(rows, columns=list(COLUMNS))


def _best(st: PoolStage, kind: str, sel) -> tuple[str, int] | None:
  """The (selector, n index) of ``kind`` with the highest mean gold on the ``sel`` prompts (n ≥ 2)."""
  best, arg = -np.inf, None
  for name in st.names(kind):
    g = st.per_prompt[name][sel].mean(axis=0)
    for j, n in enumerate(st.ns):
      if n >= 2 and g[j] > best:
        best, arg = g[j], (name, j)
  return arg


@dataclasses.dataclass
class PoolComparison:
  icdpo: tuple[str, int] | None           # held-out choices: (selector, n)
  proxy: tuple[str, int] | None
  icdpo_vs_proxy: inference.Paired | None   # measured on the odd prompts
  icdpo_vs_likelihood: inference.Paired | None   # same n, odd prompts
  peaks: dict[str, inference.PeakTest]      # per chosen selector: does its curve fall over n?


def compare(st: PoolStage, halves=None) -> PoolComparison:
  sel, mea = inference.split_halves(st.n_prompts) if halves is None else halves
  ic, px = _best(st, "icdpo", sel), _best(st, "proxy", sel)
  ns = st.ns
  lik = st.per_prompt.get(LIKELIHOOD)
  pv = (inference.paired(st.per_prompt[ic[0]][mea, ic[1]], st.per_prompt[px[0]][mea, px[1]])
        if ic and px else None)
  pl = (inference.paired(st.per_prompt[ic[0]][mea, ic[1]], lik[mea, ic[1]])
        if ic and lik is not None else None)
  peaks = {}
  for choice in (ic, px):
    if choice and len(ns) >= 2:
      peaks[choice[0]] = inference.held_out_peak_test(st.per_prompt[choice[0]].T,
                                                      halves=(sel, mea))
  return PoolComparison(ic, px, pv, pl, peaks)


BY_N_COLUMNS = ("n", "icdpo", "icdpo_gold", "proxy", "proxy_gold", "likelihood_gold", "diff",
                "diff_se", "z", "mde", "d_lik", "d_lik_se")


def by_n(st: PoolStage, halves=None) -> pd.DataFrame:
  """At each ``n``: the best ICDPO config and the best proxy selector, each chosen on the even
  prompts, compared on the odd ones (paired), and ICDPO against likelihood at that ``n``."""
  sel, mea = inference.split_halves(st.n_prompts) if halves is None else halves
  lik = st.per_prompt.get(LIKELIHOOD)
  rows = []
  for j, n in enumerate(st.ns):
    if n < 2:
      continue
    pick = {}
    for kind in ("icdpo", "proxy"):
      names = st.names(kind)
      if names:
        pick[kind] = max(names, key=lambda a: (st.per_prompt[a][sel, j].mean(), a))
    if len(pick) < 2:
      continue
    a, b = st.per_prompt[pick["icdpo"]][mea, j], st.per_prompt[pick["proxy"]][mea, j]
    t = inference.paired(a, b)
    tl = inference.paired(a, lik[mea, j]) if lik is not None else None
    rows.append({"n": n, "icdpo": pick["icdpo"], "icdpo_gold": float(a.mean()),
                 "proxy": pick["proxy"], "proxy_gold": float(b.mean()),
                 "likelihood_gold": float(lik[mea, j].mean()) if lik is not None else np.nan,
                 "diff": t.diff, "diff_se": t.se, "z": t.z, "mde": t.mde,
                 "d_lik": tl.diff if tl else np.nan, "d_lik_se": tl.se if tl else np.nan})
  return pd.DataFrame(rows, columns=list(BY_N_COLUMNS))


def _pm(t) -> str:
  return f"{fmt(t.diff)} ± {fmt(t.se)} (z = {fmt(t.z)}, MDE {fmt(t.mde)})"


def finding(st: PoolStage | None, th: Thresholds, halves=None) -> Finding:
  """Does ICDPO's in-context score choose better than a trained proxy from the same pool?"""
  q = ("Does ICDPO's in-context score pick better responses than a trained proxy reward model "
       "from the same π_ref pool?")
  if st is None:
    return Finding("icdpo_pool", q, INCONCLUSIVE, "No `icdpo_pool/` stage (it needs the proxy "
                   "setting's RL run: `icdpo_pool.run`).")
  c = compare(st, halves)
  if c.icdpo is None or c.proxy is None or c.icdpo_vs_proxy is None:
    return Finding("icdpo_pool", q, INCONCLUSIVE, "The pool stage has no ICDPO or no proxy "
                   "selector to compare.")
  t = c.icdpo_vs_proxy
  crit = inference.normal_quantile(1 - th.alpha)
  ic_name, ic_j = c.icdpo
  px_name, px_j = c.proxy
  e = st.n_prompts
  n_pool = st.info.get("pool_per_prompt", max(st.ns))
  verdict = SUPPORTED if t.z >= crit else NOT_SUPPORTED
  parts = [f"On the proxy setting's own π_ref pool ({fmt(e)} prompts × {fmt(n_pool)} samples, "
           f"regenerated and checked against its stored gold: "
           f"{fmt(100 * st.info.get('gold_check', {}).get('matching', np.nan))}% of samples "
           "match), each kind's best (selector, n) was chosen on the even prompts and "
           "measured on the odd ones: "
           f"ICDPO {ic_name} at n = {fmt(st.ns[ic_j])} against the proxy selector {px_name} at "
           f"n = {fmt(st.ns[px_j])}: ICDPO − proxy = {_pm(t)}."]
  if c.icdpo_vs_likelihood is not None:
    parts.append(f"ICDPO against best-of-n by π_ref's likelihood at the same n: "
                 f"{_pm(c.icdpo_vs_likelihood)}.")
  for name, pk in c.peaks.items():
    parts.append(f"{name}: gold peaks at n = {fmt(st.ns[pk.peak_index])} and "
                 + (f"falls by {fmt(pk.drop)} ± {fmt(pk.se)} by n = {fmt(st.ns[pk.end_index])} "
                    f"(z = {fmt(pk.z)})" if pk.falls else
                    f"does not fall significantly by n = {fmt(st.ns[pk.end_index])} (drop "
                    f"{fmt(pk.drop)} ± {fmt(pk.se)}, MDE {fmt(pk.mde)})") + ".")
  bn = by_n(st, halves)
  if len(bn):
    worse = int((bn["z"] <= -crit).sum())
    better = int((bn["z"] >= crit).sum())
    parts.append(f"At each n separately (choices on the even prompts, measured on the odd): the "
                 f"proxy is significantly better at {fmt(worse)} of {fmt(len(bn))} n, ICDPO at "
                 f"{fmt(better)}; largest gap {fmt(bn['diff'].min())} at n = "
                 f"{fmt(bn.loc[bn['diff'].idxmin(), 'n'])}.")
  if verdict == NOT_SUPPORTED and t.diff < 0 and -t.z >= crit:
    parts.append("The proxy chooses significantly better than ICDPO's score.")
  elif verdict == NOT_SUPPORTED:
    parts.append(f"No difference detected; an ICDPO advantage smaller than {fmt(t.mde)} would "
                 "go unseen at this power.")
  return Finding("icdpo_pool", q, verdict, " ".join(parts))


def write_csv(st: PoolStage | None, out_dir: pathlib.Path) -> None:
  """``pool_bon.csv``: every selector × n."""
  if st is not None:
    table(st).to_csv(out_dir / CSV, index=False, float_format="%.6g", lineterminator="\n")


def render(st: PoolStage | None) -> list[str]:
  """The report section (markdown lines)."""
  if st is None:
    return []
  df = table(st)
  c = compare(st)
  show = [ORACLE, LIKELIHOOD] + st.names("icdpo")
  if c.proxy is not None:
    show.append(c.proxy[0])
  prox = st.names("proxy")
  wide = df[df["selector"].isin(show)].copy()
  tiny = lambda x: 0.0 if abs(x) < 1e-12 else x  # noqa: E731  (n = 1 is 0 up to rounding)
  wide["cell"] = [f"{fmt(tiny(g))} ± {fmt(tiny(s))}" for g, s in zip(wide["gold"], wide["gold_se"])]
  piv = wide.pivot(index="selector", columns="n", values="cell").reindex(show)
  piv.columns = [f"n={n}" for n in piv.columns]
  piv = piv.reset_index()
  piv.insert(1, "kind", [st.kinds[s] for s in piv["selector"]])
  # the proxies' spread at each n: median and range of every proxy selector's mean gold
  spread = []
  for j, n in enumerate(st.ns):
    g = np.array([st.per_prompt[p][:, j].mean() for p in prox]) if prox else np.array([np.nan])
    spread.append(f"{fmt(tiny(np.median(g)))} [{fmt(tiny(g.min()))}, {fmt(tiny(g.max()))}]")
  piv.loc[len(piv)] = [f"all {len(prox)} proxy selectors: median [min, max]", "proxy"] + spread
  lines = ["## ICDPO's score on the proxy setting's best-of-n pool", "",
           f"Best-of-n gold (reference-subtracted per prompt, prompt-clustered SE) when ICDPO's "
           f"in-context score, π_ref's likelihood, the gold oracle or a trained proxy picks from "
           f"the same π_ref pool ({fmt(st.n_prompts)} prompts × "
           f"{fmt(st.info.get('pool_per_prompt', max(st.ns)))} samples of "
           f"`{st.info.get('source_name', 'the proxy setting RL run')}`); the proxy row shown is "
           f"the held-out choice; every selector × n in `{CSV}`.", "",
           md_table(piv, {c: c for c in piv.columns}), ""]
  bn = by_n(st)
  if len(bn):
    lines += ["At each n, the best ICDPO config and the best proxy selector chosen on the even "
              "prompts, measured on the odd ones (paired differences, prompt-clustered SE):", "",
              md_table(bn, {"n": "n", "icdpo": "ICDPO config", "icdpo_gold": "ICDPO gold",
                            "proxy": "proxy selector", "proxy_gold": "proxy gold",
                            "likelihood_gold": "BoN-lik gold", "diff": "ICDPO − proxy",
                            "diff_se": "se", "z": "z", "mde": "MDE", "d_lik": "ICDPO − BoN-lik",
                            "d_lik_se": "se "}), ""]
  return lines
