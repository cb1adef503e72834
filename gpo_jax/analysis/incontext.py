"""``write(path)``: the in-context alignment report (SPEC §6, §7.7) — ICDPO and Inverse-Q* (our reconstruction) beside offline GPO and best-of-N on one gold-vs-sqrt-KL figure, gold at matched KL with paired SEs, and findings.

Input: an incontext pipeline directory (``configs/incontext.py``) holding any of

* ``offline/``: an offline GPO run (families logistic/squared/hinge, relabelled as
  :func:`gpo_jax.analysis.online.offline_name` does: ``offline_dpo``, ``offline_ipo``,
  ``offline_slic``);
* ``inverse_q/``: an Inverse-Q* run — **our reconstruction** of Xia et al. 2024, who publish
  no equations (families ``iq_<retriever>``, columns ``beta`` and ``kl_coef``);
* ``icdpo/``: an ICDPO evaluation (no training; :mod:`gpo_jax.incontext.icdpo` writes it and
  its docstring defines every number), read here directly from ``icdpo.jsonl``,
  ``icdpo_per_prompt.npz`` (``<method>__k<k>__<retriever>__<contrast>__<measure>`` →
  ``[E, len(ns)]``), ``icdpo_reward.jsonl`` and ``icdpo_info.json``, so that the analysis
  never imports JAX.

Every stage evaluates on the first ``E`` eval prompts of the same lab and subtracts π_ref's
per-prompt mean gold from its own π_ref samples (``R(0) = 0``); the offline and Inverse-Q*
evaluators share one π_ref pool, ICDPO draws its own, so cross-stage gold differs by pool
noise. Every comparison is paired by prompt, so that noise (independent across prompts)
is inside the paired SEs; the report quantifies it (step 0 against ICDPO's best-of-1).

**KL of ICDPO.** ICDPO's selection policy has no closed-form KL; the evaluation brackets it,
``k1 ≤ KL(π_sel‖π_ref) ≤ k1 + log N − (N − 1)/N`` (``kl_lower`` and ``kl``). Points are drawn
at the upper end with a bar to the lower end; gaps to a frontier are quoted as a bracket.
SPEC §6's ``kl_icl + log N`` is **not a valid bound** and appears only in ``icdpo.csv``,
renamed ``kl_spec_formula_not_a_bound``.

* **Figure**: gold vs sqrt KL: offline families' trajectories (faint) and frontiers (dashed);
  Inverse-Q* (reconstruction) trajectories and frontiers (solid); every ICDPO config (faint)
  and the highest-gold config per N (with its KL bracket); best-of-N by likelihood and by
  gold (the oracle ceiling) from the ICDPO stage; π_ref's gold-selected best-of-n from the
  offline run's ``bon.json``.
* **Gold at matched KL** (``matched_kl.csv``): each ICDPO config at its largest N and each
  Inverse-Q* family's Pareto points, against every offline family's (member, step) with the
  nearest KL (within :data:`KL_TOL_REL` relative or :data:`KL_TOL_ABS` nats, else "no offline
  point near that KL"); paired per-prompt gold difference and its prompt-clustered SE. The
  offline point is chosen by KL alone, so all prompts measure it.
* **Findings**: (i) what in-context scoring buys over best-of-N with the same N (paired
  per-prompt differences; the best (config, N) chosen on the even prompts and measured on
  the odd ones; how many configs beat best-of-N by likelihood); (ii) ICDPO's scorer as a
  reward model (accuracy against ½); (iii) Inverse-Q* (reconstruction) against offline GPO at
  matched KL (held-out, as :mod:`gpo_jax.analysis.online`); (iv) whether ICDPO and Inverse-Q*
  sit on the offline frontier (descriptive).

Writes ``<path>/report/incontext.md``, ``incontext_frontier.{png,svg}``, ``icdpo.csv`` and
``matched_kl.csv``; reruns write identical bytes (markdown, CSVs, SVG).

References:
  Song et al. 2024, "ICDPO: Effectively Borrowing Alignment Capability of Others via
  In-context Direct Preference Optimization", arXiv 2402.09320.
  Xia et al. 2024, "Inverse-Q*: Token Level Reinforcement Learning for Aligning Large
  Language Models Without Preference Data", arXiv 2408.14874 (no equations published; the
  run here is our reconstruction).
  Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment policy",
  arXiv 2401.01879 (the KL bracket).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

import numpy as np
import pandas as pd

from gpo_jax.analysis import frontier as frontier_lib
from gpo_jax.analysis import incontext_pool
from gpo_jax.analysis import inference
from gpo_jax.analysis import online
from gpo_jax.analysis.findings import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Finding, Thresholds, fmt, render_findings
from gpo_jax.analysis.report import md_table
from gpo_jax.analysis.table import METRICS_FILE, Run, load_run, read_jsonl

OFFLINE, INVERSE_Q, ICDPO = "offline", "inverse_q", "icdpo"
ICDPO_POOL = incontext_pool.STAGE
#: other runs on the same lab drawn beside the in-context methods: ``{stage: relative path}``
COMPARE_FILE = "compare.json"
ONLINE, RL_PROXY = "online", "rl_proxy"
COMPARE_STAGES = (ONLINE, RL_PROXY)
REPORT_DIR, REPORT_FILE, FIGURE_NAME = "report", "incontext.md", "incontext_frontier"
ICDPO_CSV, MATCHED_CSV = "icdpo.csv", "matched_kl.csv"
ROWS_FILE, REWARD_FILE, PER_PROMPT_FILE, INFO_FILE = (
    "icdpo.jsonl", "icdpo_reward.jsonl", "icdpo_per_prompt.npz", "icdpo_info.json")
ICDPO_METHODS = ("icdpo", "icl_sample", "bon_likelihood", "bon_icdpo_score", "bon_gold")
ROW_REQUIRED = ("method", "n", "k", "retriever", "contrast", "gold", "kl")
IQ_LABEL = "Inverse-Q* (reconstruction)"
RECONSTRUCTION = ("Inverse-Q* here is our reconstruction of Xia et al. 2024, who publish no "
                  "equations: dense token rewards from π_ref conditioned on two good retrieved "
                  "demonstrations (gpo_jax.algorithms.inverse_q); its numbers are the "
                  "reconstruction's, not the paper's method.")
SPEC_COLUMN = "kl_spec_formula_not_a_bound"
#: a matched offline point's KL must be within max(KL_TOL_REL · KL, KL_TOL_ABS) of the target's
KL_TOL_REL, KL_TOL_ABS = 0.25, 0.05
#: the bar of findings (iii) and (iv): an effect counts when it is this many SEs from 0
Z_BAR = 2.0
GOLD = "gold/reward"
_FLOAT_FORMAT = "%.6g"
#: differences and SEs below this are float32 rounding of identical samples (π_ref vs π_ref)
_TIE_TOL = 1e-6


# ------------------------------------------------------------------------------- loading
@dataclasses.dataclass
class ICDPOStage:
  """A stored ICDPO evaluation, read without :mod:`gpo_jax.incontext` (no JAX)."""
  path: pathlib.Path
  rows: pd.DataFrame              # icdpo.jsonl
  per_prompt: dict                # (method, k, retriever, contrast, measure) -> [E, len(ns)]
  ns: list[int]
  reward: pd.DataFrame            # icdpo_reward.jsonl (empty when absent or skipped)
  info: dict                      # icdpo_info.json ({} when absent)

  def array(self, method: str, k: int, retriever: str, contrast: str,
            measure: str = "gold") -> np.ndarray | None:
    """``[E, len(ns)]`` per-prompt estimates of one method/config, None when not stored."""
    return self.per_prompt.get((method, int(k), retriever, contrast, measure))

  @property
  def n_prompts(self) -> int:
    """Prompts of the per-prompt arrays (0 without them)."""
    return next((int(a.shape[0]) for a in self.per_prompt.values()), 0)

  def configs(self) -> list[tuple[int, str, str]]:
    """``(k, retriever, contrast)`` of the ``icdpo`` rows, in file order."""
    r = self.rows[self.rows["method"] == "icdpo"]
    return list(dict.fromkeys((int(a), str(b), str(c)) for a, b, c in
                              zip(r["k"], r["retriever"], r["contrast"])))


def parse_key(key: str) -> tuple[str, int, str, str, str]:
  """``"icdpo__k2__bm25__bad__gold"`` → ``("icdpo", 2, "bm25", "bad", "gold")``."""
  parts = key.split("__")
  if len(parts) != 5 or not parts[1].startswith("k") or not parts[1][1:].isdigit():
    raise ValueError(f"per-prompt key {key!r} is not <method>__k<k>__<retriever>__<contrast>__"
                     "<measure>")
  return parts[0], int(parts[1][1:]), parts[2], parts[3], parts[4]


def load_icdpo(path) -> ICDPOStage:
  """Reads ``<path>/icdpo.jsonl`` (required) and the optional per-prompt, reward and info files."""
  p = pathlib.Path(path)
  if not (p / ROWS_FILE).exists():
    raise FileNotFoundError(f"{p / ROWS_FILE} not found: is {p} an ICDPO evaluation directory?")
  raw = read_jsonl(p / ROWS_FILE)
  if not raw:
    raise ValueError(f"{p / ROWS_FILE}: no rows")
  rows = pd.DataFrame(raw)
  missing = [c for c in ROW_REQUIRED if c not in rows.columns]
  if missing:
    raise ValueError(f"{p / ROWS_FILE}: missing columns {missing}; expected {list(ROW_REQUIRED)}")
  bad = sorted(set(rows["method"]) - set(ICDPO_METHODS))
  if bad:
    raise ValueError(f"{p / ROWS_FILE}: unknown methods {bad}; expected {list(ICDPO_METHODS)}")
  rows["n"], rows["k"] = rows["n"].astype(int), rows["k"].astype(int)
  for c in ("method", "retriever", "contrast"):
    rows[c] = rows[c].astype(str)
  info = json.loads((p / INFO_FILE).read_text()) if (p / INFO_FILE).exists() else {}
  ns = [int(n) for n in info.get("ns", sorted(set(rows["n"])))]
  per_prompt = {}
  if (p / PER_PROMPT_FILE).exists():
    with np.load(p / PER_PROMPT_FILE) as z:
      for key in z.files:
        a = np.asarray(z[key], np.float64)
        if a.ndim != 2 or a.shape[1] != len(ns):
          raise ValueError(f"{p / PER_PROMPT_FILE}: {key!r} has shape {a.shape}; expected "
                           f"[prompts, {len(ns)}] (one column per N in {ns})")
        per_prompt[parse_key(key)] = a
  shapes = sorted({a.shape[0] for a in per_prompt.values()})
  if len(shapes) > 1:
    raise ValueError(f"{p / PER_PROMPT_FILE}: arrays cover different numbers of prompts {shapes}")
  reward = (pd.DataFrame(read_jsonl(p / REWARD_FILE)) if (p / REWARD_FILE).exists()
            and (p / REWARD_FILE).read_text().strip() else pd.DataFrame())
  return ICDPOStage(path=p, rows=rows, per_prompt=per_prompt, ns=ns, reward=reward, info=info)


def locate(path) -> dict[str, pathlib.Path]:
  """``{stage: dir}`` of the stages present in an incontext pipeline directory."""
  p = pathlib.Path(path)
  found = {s: p / s for s, f in ((OFFLINE, METRICS_FILE), (INVERSE_Q, METRICS_FILE),
                                 (ICDPO, ROWS_FILE), (ICDPO_POOL, incontext_pool.JSON))
           if (p / s / f).exists()}
  if not found:
    raise FileNotFoundError(f"{p} is not an incontext pipeline directory: none of "
                            f"{OFFLINE}/{METRICS_FILE}, {INVERSE_Q}/{METRICS_FILE}, "
                            f"{ICDPO}/{ROWS_FILE}")
  return found


def stage_table(run: Run, stage: str) -> pd.DataFrame:
  """A run's valid rows with a ``stage`` column; offline families relabelled (``offline_dpo`` …),
  RL-against-a-proxy families (selector names) as ``RL vs <selector>``."""
  t = run.valid.copy()
  t["stage"] = stage
  if stage == OFFLINE:
    t["family"] = t["family"].map(online.offline_name)
  elif stage == RL_PROXY:
    t["family"] = [f"RL vs {f}" for f in t["family"]]
  return t


def load_compare(root: pathlib.Path) -> dict[str, Run]:
  """The runs ``<root>/compare.json`` names (``{"online": path, "rl_proxy": path}``, paths
  relative to ``root``): other methods on the same lab, drawn on the figure and matched by KL."""
  path = root / COMPARE_FILE
  if not path.exists():
    return {}
  spec = json.loads(path.read_text())
  bad = sorted(set(spec) - set(COMPARE_STAGES))
  if bad:
    raise ValueError(f"{path}: unknown stages {bad}; valid choices: {list(COMPARE_STAGES)}")
  out = {}
  for stage, rel in spec.items():
    d = (root / rel).resolve()
    if not (d / METRICS_FILE).exists():
      raise FileNotFoundError(f"{path}: {stage} run {d} has no {METRICS_FILE}")
    out[stage] = load_run(d)
  return out


def same_lab(a: Run | None, b: Run | None) -> bool:
  """Whether two runs' configs name the same lab (section ``lab`` equal)."""
  la = (a.config or {}).get("lab") if a is not None and isinstance(a.config, dict) else None
  lb = (b.config or {}).get("lab") if b is not None and isinstance(b.config, dict) else None
  return la is not None and la == lb


def ext_points(fronts: dict, families: list[str], stage: str, gold: dict,
               kl_max: float) -> list[dict]:
  """One point per family of another run (``source`` = its stage): its highest-gold Pareto
  point past step 0 with KL ≤ ``kl_max`` (the offline runs' largest KL, where a match can exist)."""
  out = []
  for fam in families:
    fr = fronts.get(fam)
    if fr is None:
      continue
    best = None
    for _, r in fr.pareto.iterrows():
      key = (stage, int(r["member"]), int(r["step"]))
      if int(r["step"]) == 0 or key not in gold or not float(r["kl"]) <= kl_max:
        continue
      if best is None or float(r[GOLD]) > float(best[GOLD]):
        best = r
    if best is not None:
      key = (stage, int(best["member"]), int(best["step"]))
      out.append({"source": stage, "method": fam, "point": "best Pareto point", "n": np.nan,
                  "member": key[1], "beta": float(best["beta"]), "step": key[2],
                  "kl_lower": float(best["kl"]), "kl": float(best["kl"]), "gold_E": gold[key]})
  return out


def prompt_gold(run: Run, stage: str) -> dict[tuple, np.ndarray]:
  """``{(stage, member, step): [E]}``: per-prompt reference-subtracted gold, where saved."""
  try:
    steps, vals = run.prompt_matrix(GOLD)
  except KeyError:
    return {}
  return {(stage, m, int(st)): vals[i, m] for i, st in enumerate(steps)
          for m in range(vals.shape[1])}


# ------------------------------------------------------------------- (i) ICDPO vs BoN
PAIRED_COLUMNS = ("config", "k", "retriever", "contrast", "n", "gold", "lik_gold", "icl_gold",
                  "ceiling_gold", "kl_lower", "kl", "lik_kl", "d_lik", "d_lik_se", "d_lik_z",
                  "d_lik_p", "d_lik_mde", "d_icl", "d_icl_se", "d_icl_z", "sel_d_lik")


def config_name(k: int, retriever: str, contrast: str) -> str:
  """``k2/bm25/bad``."""
  return f"k{int(k)}/{retriever}/{contrast}"


def _row(rows: pd.DataFrame, **match) -> pd.Series | None:
  m = np.ones(len(rows), bool)
  for c, v in match.items():
    m &= (rows[c] == v).to_numpy()
  return rows[m].iloc[0] if m.any() else None


def icdpo_paired(st: ICDPOStage, e: int, halves) -> pd.DataFrame:
  """Per ICDPO config and N: paired per-prompt gold differences to best-of-N by likelihood and to plain in-context sampling.

  ``d_lik`` (SE, z, one-sided p, MDE) is ``icdpo − bon_likelihood`` at the same N over the
  first ``e`` prompts; ``d_icl`` is ``icdpo − icl_sample`` (same k and retriever);
  ``sel_d_lik`` is ``d_lik`` on the selection half ``halves[0]``. Empty without per-prompt
  arrays or without the ``bon_likelihood`` baseline.
  """
  lik = st.array("bon_likelihood", 0, "-", "-")
  ceil = st.array("bon_gold", 0, "-", "-")
  out = []
  if lik is None:
    return pd.DataFrame(columns=list(PAIRED_COLUMNS))
  for k, ret, con in st.configs():
    a = st.array("icdpo", k, ret, con)
    if a is None:
      continue
    icl = st.array("icl_sample", k, ret, "-")
    for j, n in enumerate(st.ns):
      t = inference.paired(a[:e, j], lik[:e, j])
      row = {"config": config_name(k, ret, con), "k": k, "retriever": ret, "contrast": con,
             "n": n, "gold": float(a[:e, j].mean()), "lik_gold": float(lik[:e, j].mean()),
             "icl_gold": float(icl[:e, j].mean()) if icl is not None else float("nan"),
             "ceiling_gold": float(ceil[:e, j].mean()) if ceil is not None else float("nan"),
             "d_lik": t.diff, "d_lik_se": t.se, "d_lik_z": t.z, "d_lik_p": t.p,
             "d_lik_mde": t.mde,
             "sel_d_lik": float((a[halves[0], j] - lik[halves[0], j]).mean())
             if len(halves[0]) else float("nan")}
      r = _row(st.rows, method="icdpo", k=k, retriever=ret, contrast=con, n=n)
      row["kl_lower"] = float(r.get("kl_lower", np.nan)) if r is not None else float("nan")
      row["kl"] = float(r["kl"]) if r is not None else float("nan")
      rl = _row(st.rows, method="bon_likelihood", n=n)
      row["lik_kl"] = float(rl["kl"]) if rl is not None else float("nan")
      if icl is not None:
        ti = inference.paired(a[:e, j], icl[:e, j])
        row.update(d_icl=ti.diff, d_icl_se=ti.se, d_icl_z=ti.z)
      out.append(row)
  return pd.DataFrame(out, columns=list(PAIRED_COLUMNS))


def held_out_best(st: ICDPOStage, paired_df: pd.DataFrame, halves) -> dict | None:
  """The (config, N ≥ 2) with the largest ``d_lik`` on the selection half, measured on the other half.

  Returns ``{"row": the paired_df row, "lik": Paired, "icl": Paired or None}`` (None when
  nothing can be chosen). With only ``N = 1`` in the sweep that N is used.
  """
  if paired_df.empty or len(halves[1]) < 2:
    return None
  cand = paired_df[paired_df["n"] >= 2]
  cand = cand if not cand.empty else paired_df
  cand = cand[np.isfinite(cand["sel_d_lik"].to_numpy(float))]
  if cand.empty:
    return None
  best = cand.loc[cand["sel_d_lik"].idxmax()]
  j = st.ns.index(int(best["n"]))
  a = st.array("icdpo", best["k"], best["retriever"], best["contrast"])
  lik = st.array("bon_likelihood", 0, "-", "-")
  icl = st.array("icl_sample", best["k"], best["retriever"], "-")
  mea = halves[1]
  return {"row": best, "lik": inference.paired(a[mea, j], lik[mea, j]),
          "icl": inference.paired(a[mea, j], icl[mea, j]) if icl is not None else None}


def paired_tied(a_E, b_E) -> inference.Paired:
  """:func:`~gpo_jax.analysis.inference.paired`, with float32 rounding of identical samples read as an exact tie."""
  t = inference.paired(a_E, b_E)
  if abs(t.diff) < _TIE_TOL and np.isfinite(t.se) and t.se < _TIE_TOL:
    return inference.Paired(0.0, 0.0, 0.0, 0.5, t.n, 0.0)
  return t


def _pm(t) -> str:
  return f"{fmt(t.diff)} ± {fmt(t.se)} (z = {fmt(t.z)}, MDE {fmt(t.mde)})"


def scoring_finding(st: ICDPOStage | None, paired_df: pd.DataFrame, best: dict | None,
                    halves, th: Thresholds) -> Finding:
  """(i) What does in-context scoring buy over best-of-N with the same number of samples?"""
  q = "What does in-context scoring buy over best-of-N with the same number of samples?"
  key = "icdpo_vs_bon"
  if st is None:
    return Finding(key, q, INCONCLUSIVE, "No ICDPO stage (icdpo/icdpo.jsonl): nothing to compare.")
  if paired_df.empty:
    return Finding(key, q, INCONCLUSIVE,
                   f"No per-prompt arrays ({PER_PROMPT_FILE}) with both ICDPO and best-of-N by "
                   "likelihood: no paired comparison. The rows' d_gold (icdpo.csv) are the "
                   "all-prompt paired differences, unselected.")
  if best is None or not np.isfinite(best["lik"].z):
    return Finding(key, q, INCONCLUSIVE,
                   f"Too few prompts ({fmt(len(halves[0]) + len(halves[1]))}) for a held-out "
                   "comparison (at least 2 per half).")
  crit = inference.normal_quantile(1 - th.alpha)
  n_max = max(st.ns)
  last = paired_df[paired_df["n"] == n_max]
  m = int(last["d_lik_z"].notna().sum())
  sig = last[last["d_lik_z"] >= crit]
  p_count = inference.binomial_tail(len(sig), m, th.alpha) if m else float("nan")
  b = best["row"]
  ceil = b["ceiling_gold"] - b["lik_gold"]
  rule = (f"Test: per-prompt paired gold difference ICDPO − best-of-N by likelihood (π_ref(·|x), "
          f"the same N, no demonstrations), SE clustered by prompt. The (k, retriever, contrast, "
          f"N ≥ 2) with the largest difference on the {fmt(len(halves[0]))} even prompts is "
          f"measured on the {fmt(len(halves[1]))} odd ones (no winner's curse). Rule: supported "
          f"if that held-out difference is above 0 at one-sided α = {fmt(th.alpha)} (z ≥ "
          f"{fmt(crit)}); not supported if it is not and no more configs beat best-of-N at "
          f"N = {fmt(n_max)} on all prompts than chance allows (binomial p ≥ {fmt(th.alpha)}); "
          "inconclusive otherwise.")
  text = (f"{rule} Chosen: ICDPO {b['config']} at N = {fmt(b['n'])}; on the held-out prompts "
          f"ICDPO − best-of-N by likelihood = {_pm(best['lik'])}"
          + (f", ICDPO − plain in-context sampling (icl_sample, its N = 1) = {_pm(best['icl'])}"
             if best["icl"] is not None else "")
          + f". On all prompts at that N: ICDPO gold {fmt(b['gold'])} (KL between "
          f"{fmt(b['kl_lower'])} and {fmt(b['kl'])}) vs best-of-N by likelihood "
          f"{fmt(b['lik_gold'])} (KL {fmt(b['lik_kl'])}); the gold-selected best-of-N ceiling "
          f"is {fmt(ceil)} above best-of-N by likelihood. Across configs at N = {fmt(n_max)}: "
          f"{fmt(len(sig))} of {fmt(m)} beat best-of-N by likelihood at one-sided "
          f"α = {fmt(th.alpha)} on all prompts ({fmt(th.alpha * m)} expected by chance; binomial "
          f"p = {fmt(p_count)}, approximate: configs share prompts and samples)"
          + (f"; largest: {last.loc[last['d_lik'].idxmax(), 'config']} with "
             f"{fmt(last['d_lik'].max())}" if m else "") + ".")
  scorer = st.rows[(st.rows["method"] == "bon_icdpo_score") & (st.rows["n"] == n_max)]
  if "d_gold" in scorer and scorer["d_gold"].notna().any():
    top = scorer.loc[scorer["d_gold"].idxmax()]
    text += (f" ICDPO's score as a selector on π_ref(·|x)'s own samples (bon_icdpo_score, "
             f"N = {fmt(n_max)}) differs from selecting by likelihood by "
             f"{fmt(scorer['d_gold'].min())} to {fmt(scorer['d_gold'].max())} (best "
             f"{config_name(top['k'], top['retriever'], top['contrast'])}: {fmt(top['d_gold'])} ± "
             f"{fmt(top.get('d_gold_se', np.nan))}).")
  z = best["lik"].z
  if z >= crit:
    return Finding(key, q, SUPPORTED,
                   text + " In-context scoring beats best-of-N by likelihood with the same N.")
  if np.isfinite(p_count) and p_count < th.alpha:
    return Finding(key, q, INCONCLUSIVE,
                   text + " More configs beat best-of-N on all prompts than chance allows, but "
                   "the held-out test of the chosen one does not confirm it.")
  worse = " Best-of-N by likelihood is significantly better." if z <= -crit else ""
  return Finding(key, q, NOT_SUPPORTED,
                 text + f" No gain over best-of-N by likelihood is detected: a true gain of "
                 f"{fmt(best['lik'].mde)} would have been found with power {fmt(th.power)}."
                 + worse)


# ------------------------------------------------------------------- (ii) reward model
def reward_finding(st: ICDPOStage | None, th: Thresholds) -> Finding:
  """(ii) Does ICDPO's scorer work as a reward model (held-out pair accuracy against ½)?"""
  q = "Does ICDPO's scorer work as a reward model (accuracy on held-out pairs vs ½)?"
  key = "icdpo_reward"
  if st is None:
    return Finding(key, q, INCONCLUSIVE, "No ICDPO stage.")
  rw = st.reward
  sc = rw[rw["reward"] == "icdpo"] if "reward" in rw else rw.iloc[:0]
  if sc.empty:
    return Finding(key, q, INCONCLUSIVE,
                   f"No reward-model accuracy ({REWARD_FILE} absent or empty: n_test_pairs = -1).")
  acc, n = sc["accuracy"].to_numpy(float), sc["n_pairs"].to_numpy(float)
  se = sc["accuracy_se"].to_numpy(float)
  with np.errstate(divide="ignore", invalid="ignore"):
    z = np.where(se > 0, (acc - 0.5) / se, np.sign(acc - 0.5) * np.inf)
  m = len(sc)
  crit = inference.normal_quantile(1 - th.alpha)
  crit_m = inference.normal_quantile(1 - th.alpha / m)
  i = int(np.argmax(acc))
  b = sc.iloc[i]
  mde = inference.min_detectable(0.5 / math.sqrt(max(n[i], 1)), th.alpha, th.power)
  cite = lambda r, zz: (f"{config_name(r['k'], r['retriever'], r['contrast'])}: "  # noqa: E731
                        f"{fmt(r['accuracy'])} ± {fmt(r['accuracy_se'])} (z = {fmt(zz)})")
  text = (f"Test: accuracy of S(chosen) − S(rejected) against the gold ordering on "
          f"{fmt(n[i])} held-out test pairs with distinct gold (binomial SE; a zero difference "
          f"counts as wrong), against ½, one-sided. Rule: supported if the best of the {fmt(m)} "
          f"configs clears ½ at the Bonferroni level α/{fmt(m)} (z ≥ {fmt(crit_m)}); not "
          f"supported if none clears it even at α = {fmt(th.alpha)} (z ≥ {fmt(crit)}); "
          f"inconclusive otherwise. Best: {cite(b, z[i])}; "
          f"{fmt(int((z >= crit).sum()))} of {fmt(m)} clear α unadjusted; range "
          f"{fmt(acc.min())} to {fmt(acc.max())}. MDE over ½: {fmt(mde)} (power {fmt(th.power)}).")
  base = rw[rw["reward"] == "likelihood"] if "reward" in rw else rw.iloc[:0]
  if not base.empty:
    text += (f" For context, log π_ref(y|x) as the reward scores {fmt(base['accuracy'].iloc[0])} "
             f"± {fmt(base['accuracy_se'].iloc[0])}")
    icl = rw[rw["reward"] == "icl_likelihood"]
    if not icl.empty:
      text += (f", log π_ref(y|D⁺, x) {fmt(icl['accuracy'].min())} to "
               f"{fmt(icl['accuracy'].max())}")
    text += " (same pairs; descriptive)."
  if z[i] >= crit_m:
    return Finding(key, q, SUPPORTED, text + " The in-context score orders pairs better than chance.")
  if not (z >= crit).any():
    return Finding(key, q, NOT_SUPPORTED,
                   text + " No configuration orders pairs better than chance at this resolution.")
  return Finding(key, q, INCONCLUSIVE,
                 text + " Some configs clear ½ unadjusted, none after correcting for the search.")


# ------------------------------------------------------------------------ matched KL
MATCHED_COLUMNS = ("source", "method", "point", "n", "member", "beta", "step", "kl_lower",
                   "kl", "offline", "offline_member", "offline_beta", "offline_step",
                   "offline_kl", "matched", "gold", "offline_gold", "diff", "diff_se", "z",
                   "mde", "n_prompts")


def kl_tolerance(kl: float) -> float:
  """How far (nats) an offline point's KL may be from ``kl`` to count as matched."""
  return max(KL_TOL_REL * max(kl, 0.0), KL_TOL_ABS)


def nearest(offline: pd.DataFrame, kl: float) -> pd.Series | None:
  """The offline row with KL nearest ``kl`` (ties: first in member, step order); None if empty."""
  if offline.empty:
    return None
  g = offline.sort_values(["member", "step"], kind="stable")
  return g.loc[(g["kl"] - kl).abs().idxmin()]


def matched_table(points: list[dict], off_table: pd.DataFrame, off_gold: dict, e: int,
                  th: Thresholds) -> pd.DataFrame:
  """Each point (``source, method, point, n, member, beta, step, kl_lower, kl, gold_E``) against every offline family's nearest-KL (member, step)."""
  fams = list(dict.fromkeys(off_table["family"])) if not off_table.empty else []
  have = off_table[[(OFFLINE, int(m), int(s)) in off_gold
                    for m, s in zip(off_table["member"], off_table["step"])]] \
      if not off_table.empty else off_table
  rows = []
  for p in points:
    if p.get("gold_E") is None or e < 2:
      continue
    g = np.asarray(p["gold_E"], np.float64)[:e]
    for fam in fams:
      r = {c: p.get(c, np.nan) for c in MATCHED_COLUMNS[:9]}
      r.update(offline=fam, gold=float(g.mean()), n_prompts=e)
      near = nearest(have[have["family"] == fam], p["kl"])
      if near is None:
        rows.append({**r, "matched": False})
        continue
      r.update(offline_member=int(near["member"]), offline_beta=float(near["beta"]),
               offline_step=int(near["step"]), offline_kl=float(near["kl"]))
      og = off_gold[(OFFLINE, int(near["member"]), int(near["step"]))][:e]
      r["offline_gold"] = float(og.mean())
      r["matched"] = bool(abs(float(near["kl"]) - p["kl"]) <= kl_tolerance(p["kl"]))
      if r["matched"]:
        t = paired_tied(g, og)
        r.update(diff=t.diff, diff_se=t.se, z=t.z,
                 mde=inference.min_detectable(t.se, th.alpha, th.power))
      rows.append(r)
  return pd.DataFrame(rows, columns=list(MATCHED_COLUMNS))


def icdpo_points(st: ICDPOStage) -> list[dict]:
  """Each ICDPO config at its largest N, with its KL bracket and per-prompt gold (None when not stored)."""
  out = []
  for k, ret, con in st.configs():
    a = st.array("icdpo", k, ret, con)
    sub = st.rows[(st.rows["method"] == "icdpo") & (st.rows["k"] == k)
                  & (st.rows["retriever"] == ret) & (st.rows["contrast"] == con)]
    r = sub.loc[sub["n"].idxmax()]
    j = st.ns.index(int(r["n"])) if int(r["n"]) in st.ns else None
    out.append({"source": ICDPO, "method": "icdpo", "point": config_name(k, ret, con),
                "n": int(r["n"]), "kl_lower": float(r.get("kl_lower", np.nan)),
                "kl": float(r["kl"]), "gold_E": a[:, j] if a is not None and j is not None
                else None})
  return out


def iq_points(fronts: dict, iq_fams: list[str], iq_gold: dict) -> list[dict]:
  """Each Inverse-Q* family's Pareto points past step 0, with per-prompt gold."""
  out = []
  for fam in iq_fams:
    fr = fronts.get(fam)
    if fr is None:
      continue
    for _, r in fr.pareto.iterrows():
      key = (INVERSE_Q, int(r["member"]), int(r["step"]))
      if int(r["step"]) == 0 or key not in iq_gold:
        continue
      out.append({"source": INVERSE_Q, "method": fam, "point": "Pareto point", "n": np.nan,
                  "member": int(r["member"]), "beta": float(r["beta"]), "step": int(r["step"]),
                  "kl_lower": float(r["kl"]), "kl": float(r["kl"]), "gold_E": iq_gold[key]})
  return out


# ------------------------------------------------------ (iii) Inverse-Q* vs offline, held out
IQ_COLUMNS = ("a", "b", "budget", "a_member", "a_beta", "a_step", "a_kl", "b_member", "b_beta",
              "b_step", "b_kl", "a_gold", "b_gold", "diff", "se", "z", "mde", "n_prompts")


def iq_vs_offline(cands: pd.DataFrame, gold: dict, iq_fams: list[str], off_fams: list[str],
                  halves, th: Thresholds) -> pd.DataFrame:
  """Per (Inverse-Q* family A, offline family B): each side's (member, step) with ``kl ≤ K`` and the highest selection-half gold, ``K = min(max KL_A, max KL_B)``; paired ``A − B`` on the held-out half."""
  rows = []
  mea = halves[1]
  for a in iq_fams:
    for b in off_fams:
      c = cands[cands["family"].isin([a, b])]
      if set(c["family"]) != {a, b}:
        continue
      sel, budget = online.select_matched_kl(c)
      if set(sel["family"]) != {a, b}:
        continue
      ra, rb = (sel[sel["family"] == f].iloc[0] for f in (a, b))
      ga = gold[(ra["stage"], int(ra["member"]), int(ra["step"]))]
      gb = gold[(rb["stage"], int(rb["member"]), int(rb["step"]))]
      t = paired_tied(ga[mea], gb[mea])
      rows.append({"a": a, "b": b, "budget": budget,
                   **{f"{s}_{c}": r[c] for s, r in (("a", ra), ("b", rb))
                      for c in ("member", "beta", "step", "kl")},
                   "a_gold": float(ga[mea].mean()), "b_gold": float(gb[mea].mean()),
                   "diff": t.diff, "se": t.se, "z": t.z,
                   "mde": inference.min_detectable(t.se, th.alpha, th.power), "n_prompts": t.n})
  return pd.DataFrame(rows, columns=list(IQ_COLUMNS))


def iq_finding(table: pd.DataFrame, iq_fams: list[str], off_fams: list[str], halves,
               th: Thresholds) -> Finding:
  """(iii) Where does Inverse-Q* (reconstruction) sit against offline GPO at matched KL?"""
  q = f"Where does {IQ_LABEL} sit against offline GPO at matched KL?"
  key = "iq_vs_offline"
  if not iq_fams or not off_fams:
    return Finding(key, q, INCONCLUSIVE,
                   ("No Inverse-Q* stage (inverse_q/metrics.jsonl)." if not iq_fams else
                    "No offline stage (offline/metrics.jsonl) to compare against.")
                   + " " + RECONSTRUCTION)
  if table.empty:
    return Finding(key, q, INCONCLUSIVE,
                   "No matched-KL pair could be formed (no per-prompt gold in per_prompt/, or "
                   "fewer than 2 held-out prompts). " + RECONSTRUCTION)
  rule = (f"Test: for each {IQ_LABEL} family A and offline family B, K = the smaller of their "
          f"largest KLs; each chooses its (member, step) with KL ≤ K and the highest gold on the "
          f"{fmt(len(halves[0]))} even prompts; A − B is the paired per-prompt gold difference on "
          f"the {fmt(len(halves[1]))} odd prompts, SE clustered by prompt. Claim tested: the "
          f"reconstruction reaches higher gold than offline GPO at equal KL. Rule: supported if "
          f"every pair is at least {fmt(Z_BAR)} SE above 0, not supported if any is {fmt(Z_BAR)} "
          "SE below, inconclusive otherwise.")
  ent = "; ".join(f"{r['a']} − {r['b']} = {fmt(r['diff'])} ± {fmt(r['se'])} (z = {fmt(r['z'])}, "
                  f"MDE {fmt(r['mde'])}; K = {fmt(r['budget'])}, KL {fmt(r['a_kl'])} vs "
                  f"{fmt(r['b_kl'])})" for _, r in table.iterrows())
  text = f"{rule} Pairs: {ent}. {RECONSTRUCTION}"
  ties = table[(table["a_step"] == 0) & (table["b_step"] == 0)]
  if len(ties):
    text += (f" In {fmt(len(ties))} of {fmt(len(table))} pairs both chosen points are at step 0 "
             "(π_ref itself): a tie by construction.")
  z = table["z"].to_numpy(float)
  if (z <= -Z_BAR).any():
    worse = table[z <= -Z_BAR]
    return Finding(key, q, NOT_SUPPORTED,
                   text + " Below offline GPO at matched KL: "
                   + ", ".join(f"{r['a']} vs {r['b']}" for _, r in worse.iterrows()) + ".")
  if np.all(z >= Z_BAR):
    return Finding(key, q, SUPPORTED,
                   text + f" Every {IQ_LABEL} family beats every offline family at matched KL.")
  return Finding(key, q, INCONCLUSIVE,
                 text + " Not every pair clears the bar and none falls below it.")


# ----------------------------------------------------------- (iv) on the offline frontier
POSITION_COLUMNS = ("method", "point", "sqrt_kl_lo", "sqrt_kl_hi", "gold", "gap_lo", "gap_hi",
                    "se", "beyond", "position")


def _position(lo: float, hi: float, se: float, beyond: bool = False) -> str:
  """above / below / on the frontier by the Z_BAR rule; above it past its KL range is not judged."""
  if not (np.isfinite(lo) and np.isfinite(hi)):
    return "n/a"
  if np.isfinite(se) and se > 0:
    if lo >= Z_BAR * se:
      return "past range" if beyond else "above"
    if hi <= -Z_BAR * se:
      return "below"
  return "on"


def frontier_positions(off_front, points: list[dict], st: ICDPOStage | None, fronts: dict,
                       iq_fams: list[str]) -> pd.DataFrame:
  """Gap to the pooled offline frontier (polyline through its Pareto points): ICDPO configs at their largest N (a bracket over their KL bracket) and each Inverse-Q* family's frontier (signed mean gap over the common range)."""
  rows = []
  if off_front is None:
    return pd.DataFrame(columns=list(POSITION_COLUMNS))
  hi_x = off_front.range[1]
  for p in points:
    if p["source"] != ICDPO:
      continue
    r = _row(st.rows, method="icdpo", n=p["n"], **dict(zip(
        ("k", "retriever", "contrast"), _parse_config(p["point"]))))
    gold = float(r["gold"])
    gse = float(r.get("gold_se", np.nan))
    x_lo, x_hi = math.sqrt(max(p["kl_lower"], 0.0)), math.sqrt(max(p["kl"], 0.0))
    f_lo, f_hi = off_front.polyline([x_lo, x_hi])
    se = math.sqrt(gse ** 2 + nearest_se(off_front, x_hi) ** 2)
    lo, hi = gold - f_hi, gold - f_lo       # the frontier is non-decreasing
    rows.append({"method": "icdpo", "point": p["point"], "sqrt_kl_lo": x_lo, "sqrt_kl_hi": x_hi,
                 "gold": gold, "gap_lo": lo, "gap_hi": hi, "se": se, "beyond": x_hi > hi_x,
                 "position": _position(lo, hi, se, x_lo > hi_x)})
  if iq_fams:
    m = online.matched_kl({**fronts, OFFLINE: off_front}, [f for f in iq_fams if f in fronts],
                          [OFFLINE])
    for fam, g in m.groupby("online", sort=False):
      gap = float(g["gap"].iloc[0])
      se = float(np.nanmedian(g["diff_se"])) if g["diff_se"].notna().any() else float("nan")
      rows.append({"method": fam, "point": "frontier (mean gap)",
                   "sqrt_kl_lo": float(g["sqrt_kl_lo"].iloc[0]),
                   "sqrt_kl_hi": float(g["sqrt_kl_hi"].iloc[0]), "gold": float("nan"),
                   "gap_lo": gap, "gap_hi": gap, "se": se, "beyond": False,
                   "position": _position(gap, gap, se)})
  return pd.DataFrame(rows, columns=list(POSITION_COLUMNS))


def nearest_se(fr, x: float) -> float:
  """``gold/reward_se`` of the frontier's Pareto point nearest to sqrt-KL ``x`` (NaN without it)."""
  p = fr.pareto
  if "gold/reward_se" not in p:
    return float("nan")
  return float(p["gold/reward_se"].iloc[int(np.argmin(np.abs(p["sqrt_kl"].to_numpy(float) - x)))])


def _parse_config(name: str) -> tuple[int, str, str]:
  k, ret, con = name.split("/")
  return int(k[1:]), ret, con


def frontier_finding(pos: pd.DataFrame, has_offline: bool, off_range: float,
                     th: Thresholds) -> Finding:
  """(iv) Do ICDPO and Inverse-Q* (reconstruction) sit on the offline frontier? Descriptive."""
  q = f"Do ICDPO and {IQ_LABEL} sit on the offline frontier?"
  key = "on_frontier"
  if not has_offline:
    return Finding(key, q, INCONCLUSIVE, "No offline stage: no frontier to place them against.")
  ok = pos[~pos["position"].isin(["n/a", "past range"])]
  if ok.empty:
    return Finding(key, q, INCONCLUSIVE,
                   "No point can be placed: no ICDPO config with per-prompt arrays, no "
                   f"{IQ_LABEL} frontier sharing a KL range with the offline one, or every ICDPO "
                   "point lies above the offline frontier wholly past its KL range.")
  text = (f"Descriptive: the offline frontier pools every offline family (polyline through its "
          f"Pareto points, flat past its largest sqrt KL); an ICDPO config's gap is a bracket "
          f"(gold − frontier at sqrt(kl) to gold − frontier at sqrt(kl_lower)), since its true KL "
          f"lies in [kl_lower, kl]; an {IQ_LABEL} family's gap is the signed mean gap between "
          f"frontiers over their common range. SE: the point's (or frontier difference's median) "
          f"unpaired SE with the nearest offline Pareto point's. Rule: a point is above (below) "
          f"when its whole bracket is at least {fmt(Z_BAR)} SE above (below) 0; supported if all "
          "are on it, not supported if any is above or below. A frontier is a maximum over noisy "
          "points (biased up), so 'above' is conservative and 'below' generous. ")
  parts = []
  for method, g in ok.groupby("method", sort=False):
    counts = g["position"].value_counts()
    lo, hi = fmt(g["gap_lo"].min()), fmt(g["gap_hi"].max())
    parts.append(f"{method}: " + ", ".join(f"{fmt(counts.get(s, 0))} {s}" for s in
                                           ("above", "on", "below") if counts.get(s, 0))
                 + (f" (gap {lo}, SE {fmt(g['se'].iloc[0])})" if len(g) == 1 and lo == hi
                    else f" (gaps {lo} to {hi})"))
  text += "; ".join(parts) + "."
  beyond = pos[pos["beyond"].astype(bool)]
  if len(beyond):
    n_past = int((pos["position"] == "past range").sum())
    text += (f" {fmt(len(beyond))} ICDPO point(s) reach past the offline frontier's largest sqrt "
             f"KL ({fmt(off_range)}) and are compared with its last point: below it they are "
             "dominated (less gold at more KL)"
             + (f"; {fmt(n_past)} lie above it wholly past that range and are not judged (the "
                "offline runs never went there)." if n_past else "."))
  off = ok[ok["position"] != "on"]
  if len(off):
    return Finding(key, q, NOT_SUPPORTED,
                   text + " Off the frontier: " + ", ".join(
                       f"{r['method']} {r['point']} ({r['position']})" for _, r in off.iterrows())
                   + ".")
  return Finding(key, q, SUPPORTED, text + " Every point is on the offline frontier within the bar.")


# ------------------------------------------------------------------------------ report
@dataclasses.dataclass
class InContextReport:
  """Everything :func:`write` computes; the findings cite the tables."""
  root: pathlib.Path
  out_dir: pathlib.Path
  offline: Run | None
  inverse_q: Run | None
  icdpo: ICDPOStage | None
  table: pd.DataFrame            # valid offline and Inverse-Q* rows (``stage`` column)
  gold: dict                     # (stage, member, step) -> [E] per-prompt gold, offline/inverse_q
  n_prompts: int                 # E: the prompts every paired comparison uses
  halves: tuple
  offline_families: list[str]
  iq_families: list[str]
  others: dict                   # stage -> Run of compare.json
  other_families: dict           # stage -> its families (with a frontier)
  pool: incontext_pool.PoolStage | None   # ICDPO on the proxy setting's pool
  frontiers: dict                # per family, plus OFFLINE: the pooled offline frontier
  icdpo_rows: pd.DataFrame       # icdpo.csv
  paired: pd.DataFrame           # (i): per ICDPO config and N
  best: dict | None              # (i): the held-out choice
  matched: pd.DataFrame          # matched_kl.csv
  iq_pairs: pd.DataFrame         # (iii)
  positions: pd.DataFrame        # (iv)
  notes: list[str]
  thresholds: Thresholds
  findings: list[Finding]
  figures: dict = dataclasses.field(default_factory=dict)
  path: pathlib.Path | None = None


ICDPO_CSV_COLUMNS = ("method", "n", "k", "retriever", "contrast", "n_prompts", "gold", "gold_se",
                     "d_gold", "d_gold_se", "d_icl", "d_icl_se", "win_rate", "win_rate_se",
                     "k1", "k1_se", "kl_lower", "kl", "sqrt_kl", "kl_icl", "kl_icl_se",
                     SPEC_COLUMN, "response_len", "response_len_se", "eos_frac", "eos_frac_se")


def icdpo_csv(st: ICDPOStage, paired_df: pd.DataFrame) -> pd.DataFrame:
  """The ICDPO rows with the SPEC formula renamed and ``d_icl`` (ICDPO − icl_sample, paired) added."""
  t = st.rows.rename(columns={"kl_spec_bound": SPEC_COLUMN}).copy()
  t["d_icl"], t["d_icl_se"] = np.nan, np.nan
  for _, r in paired_df.iterrows():
    m = ((t["method"] == "icdpo") & (t["k"] == r["k"]) & (t["retriever"] == r["retriever"])
         & (t["contrast"] == r["contrast"]) & (t["n"] == r["n"]))
    t.loc[m, "d_icl"], t.loc[m, "d_icl_se"] = r["d_icl"], r["d_icl_se"]
  cols = [c for c in ICDPO_CSV_COLUMNS if c in t] + sorted(c for c in t if c not in
                                                          ICDPO_CSV_COLUMNS)
  return t[cols].reset_index(drop=True)


def _eval_cfg(run: Run | None) -> dict:
  return ((run.config or {}).get("eval") or {}) if run is not None and isinstance(
      run.config, dict) else {}


def _notes(rep_parts: dict) -> list[str]:
  """Comparability of the stages: prompts, π_ref pools and baselines, ICDPO's KL columns."""
  off, iq, st = rep_parts["offline"], rep_parts["inverse_q"], rep_parts["icdpo"]
  gold, e, sizes = rep_parts["gold"], rep_parts["n_prompts"], rep_parts["sizes"]
  notes = []
  if iq is not None:
    notes.append(RECONSTRUCTION)
  if len(set(sizes.values())) > 1:
    notes.append("The stages' per-prompt arrays cover different numbers of eval prompts ("
                 + ", ".join(f"{s} {fmt(n)}" for s, n in sizes.items())
                 + f"); every paired comparison uses the first {fmt(e)}, which all stages share.")
  if off is not None and iq is not None:
    ce_off, ce_iq = _eval_cfg(off), _eval_cfg(iq)
    diff = [k for k in ("n_prompts", "seed", "samples_per_prompt", "ref_samples_per_prompt")
            if ce_off.get(k) != ce_iq.get(k)]
    if diff:
      notes.append("The offline and Inverse-Q* eval configs differ in " + ", ".join(
          f"{k} ({ce_off.get(k)} offline, {ce_iq.get(k)} inverse_q)" for k in diff) + ".")
    a = [g for (s, _, stp), g in sorted(gold.items()) if s == OFFLINE and stp == 0]
    b = [g for (s, _, stp), g in sorted(gold.items()) if s == INVERSE_Q and stp == 0]
    if a and b:
      d = float(np.max(np.abs(a[0][:e] - b[0][:e])))
      notes.append("Check: at step 0 (π_ref) the offline and Inverse-Q* per-prompt gold "
                   + (f"agree (max |Δ| = {fmt(d)}): one π_ref pool, one reference subtraction."
                      if d <= 1e-5 else f"differ by up to {fmt(d)}: their π_ref pools differ."))
  if st is not None:
    ref0 = [(s, g) for s in (OFFLINE, INVERSE_Q) for (s2, _, stp), g in sorted(gold.items())
            if s2 == s and stp == 0]
    lik = st.array("bon_likelihood", 0, "-", "-")
    if ref0 and lik is not None and 1 in st.ns:
      t = inference.paired(ref0[0][1][:e], lik[:e, st.ns.index(1)])
      notes.append(
          f"Cross-stage baseline: ICDPO subtracts π_ref's mean gold over its own "
          f"{fmt(st.info.get('ref_samples_per_prompt', np.nan))} x-only samples per prompt, the "
          f"offline/Inverse-Q* evaluator over its own pool. π_ref evaluated by both ({ref0[0][0]} "
          f"step 0 − ICDPO's best-of-1 by likelihood, which is 0 by construction) differs by "
          f"{fmt(t.diff)} ± {fmt(t.se)} (paired over {fmt(t.n)} prompts): the pool and sampling "
          "noise inside every cross-stage gold difference; the paired SEs include it.")
    bon = (off.bon if off is not None else None) or (iq.bon if iq is not None else None)
    if bon is not None and "ref_gold_mean" in bon and "ref_gold_mean" in st.info:
      d = float(bon["ref_gold_mean"]) - float(st.info["ref_gold_mean"])
      notes.append(f"π_ref's raw mean gold: {fmt(bon['ref_gold_mean'])} in the offline "
                   f"evaluator's pool, {fmt(st.info['ref_gold_mean'])} in ICDPO's: ICDPO's "
                   f"reference-subtracted gold sits {fmt(abs(d))} {'above' if d >= 0 else 'below'} "
                   "the offline scale on average from the baselines alone (pool noise: both "
                   "estimate the same mean).")
    r = st.rows
    ic = r[r["method"] == "icdpo"]
    if len(ic) and "kl_spec_bound" in ic and "kl_lower" in ic:
      below = int((ic["kl_spec_bound"] < ic["kl_lower"] - 1e-9).sum())
      notes.append(
          "ICDPO's KL is a bracket k1 ≤ KL(π_sel‖π_ref) ≤ k1 + log N − (N−1)/N (kl_lower, kl; "
          "Beirami et al. 2024); points are drawn at kl with a bar to kl_lower. SPEC §6's "
          f"kl_icl + log N is not a valid bound (ICDPO selects for a large log-ratio); it is in "
          f"{ICDPO_CSV} as {SPEC_COLUMN} only"
          + (f", and falls below the valid lower end k1 in {fmt(below)} of {fmt(len(ic))} "
             "ICDPO rows." if below else "."))
    if "d_gold" in r:
      notes.append(rep_parts["d_gold_check"])
  for name, run in (("offline", off), ("inverse_q", iq)):
    if run is None:
      continue
    div = run.table[run.table["diverged"]].drop_duplicates("member")
    if len(div):
      notes.append(f"{name}: {fmt(len(div))} member(s) diverged; their diverged rows are left "
                   "out of frontiers and comparisons.")
    if not any(s == name for s, _, _ in gold):
      notes.append(f"{name}: no per-prompt gold (per_prompt/): no paired comparisons with it.")
  return [n for n in notes if n]


def compute(path, out_dir=None, *, thresholds: Thresholds | None = None) -> InContextReport:
  """All tables and findings of an incontext pipeline directory; writes nothing (see :func:`write`)."""
  th = thresholds or Thresholds()
  root = pathlib.Path(path)
  dirs = locate(root)
  off = load_run(dirs[OFFLINE]) if OFFLINE in dirs else None
  iq = load_run(dirs[INVERSE_Q]) if INVERSE_Q in dirs else None
  st = load_icdpo(dirs[ICDPO]) if ICDPO in dirs else None
  pool_st = incontext_pool.load(dirs[ICDPO_POOL]) if ICDPO_POOL in dirs else None
  others = load_compare(root)
  runs = [(s, r) for s, r in ((OFFLINE, off), (INVERSE_Q, iq)) if r is not None]
  off_fams = list(dict.fromkeys(online.offline_name(f) for f in off.table["family"])) if off else []
  iq_fams = list(dict.fromkeys(iq.table["family"])) if iq else []
  clash = sorted(set(off_fams) & set(iq_fams))
  if clash:
    raise ValueError(f"Inverse-Q* families {clash} clash with the relabelled offline families")
  table = (pd.concat([stage_table(r, s) for s, r in runs], ignore_index=True) if runs
           else pd.DataFrame(columns=["stage", "family", "member", "step", "kl", "sqrt_kl", GOLD]))
  gold = {}
  for s, r in runs:
    gold.update(prompt_gold(r, s))
  sizes = {}
  for s in (OFFLINE, INVERSE_Q):
    es = {g.shape[0] for (ss, _, _), g in gold.items() if ss == s}
    if es:
      sizes[s] = min(es)
  if st is not None and st.n_prompts:
    sizes[ICDPO] = st.n_prompts
  e = min(sizes.values()) if sizes else 0
  gold = {k: v[:e] for k, v in gold.items()}
  halves = inference.split_halves(e)
  # Other methods' runs (compare.json): their rows join the table (own families and
  # frontiers); their per-prompt gold joins the paired comparisons only on the same lab and
  # with at least the E prompts every stage shares (the lab's first eval prompts).
  ext_fams: dict[str, list[str]] = {}
  ext_paired: dict[str, bool] = {}
  for s, r in others.items():
    t = stage_table(r, s)
    ext_fams[s] = list(dict.fromkeys(t["family"]))
    table = pd.concat([table, t], ignore_index=True)
    g = prompt_gold(r, s)
    ext_paired[s] = bool(g) and same_lab(r, off or iq) and all(v.shape[0] >= e for v in g.values())
    if ext_paired[s]:
      gold.update({k: v[:e] for k, v in g.items()})

  fronts = frontier_lib.family_frontiers(table) if len(table) else {}
  off_rows = table[table["stage"] == OFFLINE] if len(table) else table
  off_front = frontier_lib.frontier_of(off_rows, OFFLINE) if len(off_rows) else None
  off_fams = [f for f in off_fams if f in fronts]
  iq_fams_f = [f for f in iq_fams if f in fronts]

  paired_df = (icdpo_paired(st, e, halves) if st is not None and e
               else pd.DataFrame(columns=list(PAIRED_COLUMNS)))
  best = held_out_best(st, paired_df, halves) if st is not None else None
  points = (icdpo_points(st) if st is not None else []) + iq_points(
      fronts, iq_fams_f, {k: v for k, v in gold.items() if k[0] == INVERSE_Q})
  kl_off = float(off_rows["kl"].max()) if len(off_rows) else float("nan")
  for s, fams in ext_fams.items():
    points += ext_points(fronts, fams, s, {k: v for k, v in gold.items() if k[0] == s}, kl_off)
  matched = matched_table(points, off_rows if off is not None else pd.DataFrame(),
                          {k: v for k, v in gold.items() if k[0] == OFFLINE}, e, th)
  cands = online.candidates(table, {k: v[:, None] for k, v in gold.items()}, halves) \
      if len(table) and gold and e >= 4 else pd.DataFrame()
  iq_pairs = (iq_vs_offline(cands, gold, iq_fams_f, off_fams, halves, th) if not cands.empty
              else pd.DataFrame(columns=list(IQ_COLUMNS)))
  positions = frontier_positions(off_front, points, st, fronts, iq_fams_f)

  check = ""
  if st is not None and not paired_df.empty and "d_gold" in st.rows:
    rr = st.rows[st.rows["method"] == "icdpo"].merge(
        paired_df[["k", "retriever", "contrast", "n", "d_lik"]],
        on=["k", "retriever", "contrast", "n"])
    dd = float(np.nanmax(np.abs(rr["d_gold"] - rr["d_lik"]))) if len(rr) else float("nan")
    check = (f"Check: the paired differences recomputed from {PER_PROMPT_FILE} match the rows' "
             f"d_gold (max |Δ| = {fmt(dd)})." if dd <= 1e-6 else
             f"The paired differences recomputed from {PER_PROMPT_FILE} on the first {fmt(e)} "
             f"prompts differ from the rows' d_gold by up to {fmt(dd)} (the rows use all "
             f"{fmt(st.n_prompts)} ICDPO prompts).") if np.isfinite(dd) else ""
  notes = _notes({"offline": off, "inverse_q": iq, "icdpo": st, "gold": gold, "n_prompts": e,
                  "sizes": sizes, "d_gold_check": check})
  for s, r in others.items():
    notes.append(f"Beside the in-context methods: the {s} run `{r.path.name}` "
                 f"({fmt(r.table['member'].nunique())} members: {', '.join(ext_fams[s])}); "
                 + ("its per-prompt gold is paired with the offline stage's (same lab, same first "
                    f"{fmt(e)} eval prompts; its own π_ref pool for the reference subtraction)."
                    if ext_paired[s] else "not the same lab or too few per-prompt arrays: drawn "
                    "on the figure only, no paired comparison."))
  found = [scoring_finding(st, paired_df, best, halves, th), reward_finding(st, th),
           iq_finding(iq_pairs, iq_fams_f if iq is not None else [], off_fams, halves, th),
           frontier_finding(positions, off_front is not None,
                            off_front.range[1] if off_front is not None else float("nan"), th)]
  if pool_st is not None:
    found.append(incontext_pool.finding(pool_st, th))
  return InContextReport(
      root=root, out_dir=pathlib.Path(out_dir) if out_dir else root / REPORT_DIR, offline=off,
      inverse_q=iq, icdpo=st, table=table, gold=gold, n_prompts=e, halves=halves,
      offline_families=off_fams, iq_families=iq_fams_f, others=others,
      other_families={s: [f for f in fams if f in fronts] for s, fams in ext_fams.items()},
      pool=pool_st,
      frontiers={**fronts, **({OFFLINE: off_front} if off_front is not None else {})},
      icdpo_rows=icdpo_csv(st, paired_df) if st is not None else pd.DataFrame(
          columns=list(ICDPO_CSV_COLUMNS)),
      paired=paired_df, best=best, matched=matched, iq_pairs=iq_pairs, positions=positions,
      notes=notes, thresholds=th, findings=found)


# ---------------------------------------------------------------------------- markdown
PAIRED_MD = {"config": "ICDPO config", "n": "N", "gold": "gold", "kl_lower": "KL from",
             "kl": "KL to", "lik_gold": "BoN-lik gold", "lik_kl": "BoN-lik KL", "d_lik": "− BoN-lik",
             "d_lik_se": "se", "d_lik_z": "z", "d_icl": "− icl_sample", "d_icl_se": "se ",
             "d_icl_z": "z "}
BY_N_MD = {"n": "N", "gold": "ICDPO gold", "kl_lower": "KL from", "kl": "KL to",
           "lik_gold": "BoN-lik gold", "lik_kl": "BoN-lik KL", "ceiling_gold": "BoN-gold (ceiling)",
           "icl_gold": "icl_sample gold", "d_lik": "ICDPO − BoN-lik", "d_lik_se": "se",
           "d_icl": "ICDPO − icl_sample", "d_icl_se": "se "}
MATCHED_MD = {"method": "method", "point": "point", "n": "N", "member": "member", "step": "step",
              "kl_lower": "KL from", "kl": "KL to", "offline": "offline", "offline_member": "member ",
              "offline_beta": "β", "offline_step": "step ", "offline_kl": "offline KL",
              "gold": "gold", "offline_gold": "offline gold", "diff": "difference",
              "diff_se": "se (paired)", "z": "z"}
IQ_MD = {"a": "Inverse-Q* (reconstruction)", "b": "offline", "budget": "K", "a_beta": "β",
         "a_step": "step", "a_kl": "KL", "b_beta": "β ", "b_step": "step ", "b_kl": "KL ",
         "diff": "difference (held-out)", "se": "se", "z": "z", "mde": "MDE"}
POSITION_MD = {"method": "method", "point": "point", "sqrt_kl_lo": "sqrt KL from",
               "sqrt_kl_hi": "sqrt KL to", "gold": "gold", "gap_lo": "gap from", "gap_hi": "gap to",
               "se": "se", "position": "position", "beyond": "past offline KL range"}
REWARD_MD = {"reward": "reward", "k": "k", "retriever": "retriever", "contrast": "contrast",
             "accuracy": "accuracy", "accuracy_se": "se", "n_pairs": "pairs"}

FIGURE_CAPTION = (
    "Gold (reference-subtracted) vs sqrt KL(π‖π_ref). Offline GPO: faint member trajectories, "
    "dashed frontiers (upper envelope over β and steps). Inverse-Q* (our reconstruction; Xia et al. "
    "publish no equations): faint trajectories, solid frontiers. ICDPO: small faint markers are "
    "every (k, retriever, contrast) at every N; large markers the highest-gold config at each N, "
    "drawn at the upper end of its KL bracket with a bar to the lower end (k1). Best-of-N from "
    "π_ref(·|x) by likelihood and by gold (the oracle ceiling) from the ICDPO stage, and π_ref's "
    "gold-selected best-of-n from the offline evaluator (bon.json), as curves over N. Runs named "
    "in compare.json (online methods: dotted; RL against a proxy selector: dash-dot) are drawn "
    "as frontiers only, each with its own π_ref pool as the zero of gold.")


def _stage_line(rep: InContextReport) -> str:
  rel = lambda p: pathlib.Path(os.path.relpath(p, rep.root)).as_posix()  # noqa: E731
  parts = []
  if rep.offline is not None:
    n = rep.offline.table["member"].nunique()
    parts.append(f"offline GPO `{rel(rep.offline.path)}` ({fmt(n)} members: "
                 f"{', '.join(rep.offline_families)}; logistic = offline_dpo, squared = "
                 "offline_ipo, hinge = offline_slic)")
  else:
    parts.append("no offline stage")
  if rep.inverse_q is not None:
    n = rep.inverse_q.table["member"].nunique()
    parts.append(f"{IQ_LABEL} `{rel(rep.inverse_q.path)}` ({fmt(n)} members: "
                 f"{', '.join(rep.iq_families)})")
  else:
    parts.append("no Inverse-Q* stage")
  if rep.icdpo is not None:
    st = rep.icdpo
    parts.append(f"ICDPO evaluation `{rel(st.path)}` ({fmt(len(st.configs()))} configs (k, "
                 f"retriever, contrast), N ∈ {{{', '.join(fmt(n) for n in st.ns)}}}, pools of "
                 f"{fmt(st.info.get('pool_per_prompt', np.nan))} in-context candidates per prompt)")
  else:
    parts.append("no ICDPO stage")
  for stage, run in (rep.others or {}).items():
    parts.append(f"{stage} run `{rel(run.path)}` (from `{COMPARE_FILE}`)")
  if rep.pool is not None:
    parts.append(f"ICDPO on the proxy setting's pool `{rel(rep.pool.path)}`")
  return "; ".join(parts) + "."


def render_markdown(rep: InContextReport) -> str:
  """The text of ``incontext.md``."""
  th = rep.thresholds
  rel = lambda p: pathlib.Path(os.path.relpath(p, rep.out_dir)).as_posix()  # noqa: E731
  sel, mea = rep.halves
  out = ["# In-context alignment: ICDPO and Inverse-Q* (our reconstruction) vs offline GPO", ""]
  out += [_stage_line(rep) + (f" Paired comparisons use the first {fmt(rep.n_prompts)} eval "
                              f"prompts (held-out choices: {fmt(len(sel))} even prompts choose, "
                              f"{fmt(len(mea))} odd ones measure)." if rep.n_prompts else
                              " No per-prompt arrays: no paired comparisons."), ""]
  out += [f"- {n}" for n in rep.notes] + ([""] if rep.notes else [])
  out += render_findings(rep.findings, f"Every test is at level {fmt(th.alpha)} (one-sided); "
                         f"minimum detectable effects (MDE) are at {fmt(100 * th.power)}% power.")
  if FIGURE_NAME in rep.figures:
    png, svg = rep.figures[FIGURE_NAME]
    out += ["## Gold vs KL", "", f"![in-context methods vs offline GPO]({rel(png)})", "",
            f"*{FIGURE_CAPTION}* ([svg]({rel(svg)}))", ""]
  out += ["## ICDPO vs best-of-N with the same N", ""]
  if rep.paired.empty:
    out += ["No paired comparison (no ICDPO stage or no per-prompt arrays).", ""]
  else:
    n_max = max(rep.icdpo.ns)
    out += [f"Each config at N = {fmt(n_max)}: paired per-prompt gold differences (SE clustered "
            "by prompt) to best-of-N by likelihood (BoN-lik, same N) and to plain in-context "
            f"sampling (icl_sample); every N in `{ICDPO_CSV}` (d_gold, d_icl).", "",
            md_table(rep.paired[rep.paired["n"] == n_max], PAIRED_MD), ""]
    if rep.best is not None:
      b = rep.best["row"]
      by_n = rep.paired[rep.paired["config"] == b["config"]]
      out += [f"The held-out choice, {b['config']}, at every N (all prompts):", "",
              md_table(by_n, BY_N_MD), ""]
  if rep.icdpo is not None and not rep.icdpo.reward.empty:
    out += ["## ICDPO's scorer as a reward model", "",
            "Accuracy on held-out test pairs against the gold ordering (binomial SE); "
            "likelihood and icl_likelihood are baselines.", "",
            md_table(rep.icdpo.reward, REWARD_MD), ""]
  out += incontext_pool.render(rep.pool)
  out += ["## Gold at matched KL", ""]
  if rep.matched.empty:
    out += ["No point to match (needs the offline stage and ICDPO or Inverse-Q*)." if
            rep.offline is None else "No ICDPO config or Inverse-Q* Pareto point to match.", ""]
  else:
    tol = f"max({fmt(KL_TOL_REL)} × KL, {fmt(KL_TOL_ABS)} nats)"
    out += [f"Each ICDPO config at its largest N (KL from kl_lower to kl, matched at kl) and each "
            f"{IQ_LABEL} Pareto point past step 0 (and, for the runs in "
            f"`{COMPARE_FILE}`, each family's highest-gold Pareto point within the offline KL range), against each offline family's (member, step) "
            f"with the nearest KL, when within {tol}; the difference is paired over all "
            f"{fmt(rep.n_prompts)} prompts (the offline point is chosen by KL, not gold). Inverse-Q* "
            "Pareto points and the compared runs' best points were chosen by gold on all prompts "
            "(biased up). `matched_kl.csv`.", ""]
    ok = rep.matched[rep.matched["matched"].astype(bool)]
    miss = rep.matched[~rep.matched["matched"].astype(bool)]
    if len(ok):
      out += [md_table(ok, MATCHED_MD), ""]
    if len(miss):
      items = []
      for (_, method, point), g in miss.groupby(["source", "method", "point"], sort=False):
        near = g["offline_kl"].to_numpy(float)
        near = near[np.isfinite(near)]
        k = int(np.argmin(np.abs(near - g["kl"].iloc[0]))) if near.size else -1
        items.append(f"{method} {point} (KL {fmt(g['kl'].iloc[0])}; "
                     + (f"nearest offline KL {fmt(near[k])}" if k >= 0 else "no offline point")
                     + (f"; {', '.join(g['offline'])})" if len(g) < len(rep.offline_families)
                        else ")"))
      kl_max = rep.table.loc[rep.table["stage"] == OFFLINE, "kl"].max()
      out += [f"No offline point near that KL ({fmt(len(miss))} of {fmt(len(rep.matched))} "
              f"(point, offline family) pairs; the offline run's largest KL is {fmt(kl_max)}): "
              + "; ".join(items) + ".", ""]
  if not rep.iq_pairs.empty:
    out += [f"### {IQ_LABEL} vs offline GPO, held out", "",
            "Each side's (member, step) chosen on the even prompts with KL ≤ K; difference on "
            "the odd prompts.", "", md_table(rep.iq_pairs, IQ_MD), ""]
  if not rep.positions.empty:
    out += ["## Position against the offline frontier", "",
            "Gap = gold − offline frontier (pooled over offline families).", "",
            md_table(rep.positions, POSITION_MD), ""]
  return "\n".join(out)


def write(path, *, log=print, out_dir=None, figures: bool = True,
          thresholds: Thresholds | None = None) -> pathlib.Path:
  """Writes the in-context report; returns the path of ``incontext.md``.

  Args:
    path: an incontext pipeline directory (any of ``offline/``, ``inverse_q/``, ``icdpo/``).
    log: called with a one-line summary per finding.
    out_dir: where to write (default ``<path>/report``).
    figures: draw ``incontext_frontier.{png,svg}``.
    thresholds: test level and power.

  Reruns write byte-identical markdown, CSVs and SVG.
  """
  rep = compute(path, out_dir, thresholds=thresholds)
  rep.out_dir.mkdir(parents=True, exist_ok=True)
  if figures:
    from gpo_jax.analysis import incontext_plots   # matplotlib only when drawing
    rep.figures = {FIGURE_NAME: incontext_plots.frontier_figure(rep, rep.out_dir, FIGURE_NAME)}
  incontext_pool.write_csv(rep.pool, rep.out_dir)
  for df, name in ((rep.icdpo_rows, ICDPO_CSV), (rep.matched, MATCHED_CSV)):
    df.to_csv(rep.out_dir / name, index=False, float_format=_FLOAT_FORMAT, lineterminator="\n")
  rep.path = rep.out_dir / REPORT_FILE
  rep.path.write_text(render_markdown(rep))
  for f in rep.findings:
    log(f"incontext report: {f.question} {f.verdict}")
  return rep.path
