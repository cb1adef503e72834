"""``write(path)``: the online-vs-offline report (SPEC §6, §7.5) — one frontier figure, gold at matched KL, held-out head-to-head win rates under the gold preference, and findings.

Input: an online pipeline directory (``offline/`` optional, ``online/``; ``configs/online.py``)
or a single online run directory (its sibling ``offline/`` is used when there is one). Both
stages evaluate on the same prompts and save every sample's reference-subtracted gold
(``per_prompt/<step>.npz``: ``sample/gold_all`` ``[M, E, n]``). Offline families are
relabelled so they do not clash with the online names: logistic → ``offline_dpo``, squared →
``offline_ipo``, hinge → ``offline_slic``, any other ``f`` → ``offline_<f>``.

* **Gold at matched KL**: each online family's frontier (upper envelope of gold over β and
  steps, :meth:`~gpo_jax.analysis.frontier.Frontier.polyline`) minus each offline family's,
  averaged over their common sqrt-KL range (a signed :func:`~gpo_jax.analysis.frontier.frontier_gap`),
  and both frontiers at a few common KL points with the nearest Pareto point's SE.
* **Head-to-head win rates** (Calandriello et al. 2024, Table 2): under the gold
  Bradley–Terry preference, ``W[A, B] = mean_e w_e`` with
  ``w_e = mean_{i,j} σ((g_A[e, i] − g_B[e, j]) / label_temp)`` over the held-out prompts,
  SE clustered by prompt (``std(w_e, ddof=1)/sqrt(E)``), ``z = (W − ½)/SE``. Each family's
  policy is chosen on the even prompts and measured on the odd ones
  (:func:`~gpo_jax.analysis.inference.split_halves`), so the choice's upward bias (winner's
  curse) does not enter. Two matrices: *final* (each family's member at its last eval step)
  and *matched KL* (each family's (member, step) with ``kl ≤ K``, ``K`` the smallest of the
  families' largest KLs).
* **Findings**: (i) do online IPO and IPO-MD beat the offline methods at equal KL (the
  matched-KL win rates)? (ii) do the frontiers order the same way (signed gaps)?

Writes ``<online run>/report/online.md``, ``online_frontier.{png,svg}``, ``matched_kl.csv``,
``win_rates_final.csv`` and ``win_rates_matched_kl.csv``; reruns write identical bytes.

References:
  Calandriello et al. 2024, "Human Alignment of Large Language Models through Online
  Preference Optimisation", arXiv 2403.08635.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib

import numpy as np
import pandas as pd
from scipy import special

from gpo_jax.analysis import frontier as frontier_lib
from gpo_jax.analysis import inference
from gpo_jax.analysis.findings import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Finding, Thresholds, fmt, render_findings
from gpo_jax.analysis.report import md_table
from gpo_jax.analysis.table import CONFIG_FILE, METRICS_FILE, Run, load_run

ONLINE, OFFLINE = "online", "offline"
REPORT_DIR, REPORT_FILE, FIGURE_NAME = "report", "online.md", "online_frontier"
GOLD_SAMPLES = "sample/gold_all"
#: offline GPO families under the names of the methods they are
OFFLINE_NAMES = {"logistic": "offline_dpo", "squared": "offline_ipo", "hinge": "offline_slic"}
#: the verdict bar of finding (i): a win rate counts when it is this many SEs from ½
Z_BAR = 2.0
#: where in the common sqrt-KL range the two frontiers are quoted (fractions of the range)
KL_POINTS = (0.25, 0.5, 1.0)
_FLOAT_FORMAT = "%.6g"
_GRID = 512
#: win rates and SEs closer than this to ½ and 0 are ties (float32 rounding of identical samples)
_TIE_TOL = 1e-6
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 spells it trapz


def offline_name(family: str) -> str:
  """The report's name of an offline GPO family: ``offline_dpo`` for logistic, etc."""
  return OFFLINE_NAMES.get(family, f"offline_{family}")


def is_paper_family(family: str) -> bool:
  """Online IPO or IPO-MD (any mixture coefficient): the methods Calandriello et al. found best."""
  return family in ("online_ipo", "ipo_md") or family.startswith("ipo_md_m")


# ------------------------------------------------------------------------------- loading
def is_online(path) -> bool:
  """Whether ``path`` is an online run (its config's algorithm) or a pipeline dir holding one."""
  import json
  p = pathlib.Path(path)
  for d in (p, p / ONLINE):
    cfg = d / CONFIG_FILE
    if cfg.exists():
      try:
        if json.loads(cfg.read_text()).get("algorithm") == ONLINE:
          return True
      except (ValueError, OSError):
        return False
  return False


def locate(path) -> tuple[pathlib.Path, pathlib.Path | None]:
  """``(online_dir, offline_dir or None)`` of a pipeline directory or an online run directory."""
  p = pathlib.Path(path)
  if (p / ONLINE / METRICS_FILE).exists():
    off = p / OFFLINE
    return p / ONLINE, off if (off / METRICS_FILE).exists() else None
  if (p / METRICS_FILE).exists():
    off = p.parent / OFFLINE
    sibling = p.name == ONLINE and (off / METRICS_FILE).exists()
    return p, off if sibling else None
  raise FileNotFoundError(f"{p} is neither an online pipeline directory (no {ONLINE}/{METRICS_FILE}) "
                          f"nor a run directory (no {METRICS_FILE})")


def label_temp_of(run: Run) -> float:
  """``lab.label_temp`` of a run's config.json (1 when absent)."""
  lab = (run.config or {}).get("lab") if isinstance(run.config, dict) else None
  t = lab.get("label_temp", 1.0) if isinstance(lab, dict) else 1.0
  t = float(1.0 if t is None else t)
  if not t > 0:
    raise ValueError(f"{run.path / CONFIG_FILE}: lab.label_temp = {t}; it must be > 0")
  return t


def stage_table(run: Run, stage: str) -> pd.DataFrame:
  """The valid rows of one stage, with a ``stage`` column; offline families relabelled."""
  t = run.valid.copy()
  t["stage"] = stage
  if stage == OFFLINE:
    t["family"] = t["family"].map(offline_name)
  return t


def gold_samples(run: Run, stage: str) -> dict[tuple, np.ndarray]:
  """``{(stage, member, step): [E, n]}``: every sample's reference-subtracted gold, where saved."""
  out = {}
  for step, arrays in run.per_prompt.items():
    g = arrays.get(GOLD_SAMPLES)
    if g is None:
      continue
    if g.ndim != 3:
      raise ValueError(f"{run.path}: {GOLD_SAMPLES} at step {step} has shape {g.shape}; "
                       "expected [members, prompts, samples]")
    for m in range(g.shape[0]):
      out[(stage, m, int(step))] = np.asarray(g[m], np.float64)
  return out


def candidates(table: pd.DataFrame, samples: dict, halves) -> pd.DataFrame:
  """Valid rows whose per-sample gold is saved and finite, with selection/held-out-half mean gold.

  ``sel_gold`` is the mean gold on the selection prompts (``halves[0]``), ``held_gold`` on
  the measuring prompts (``halves[1]``).
  """
  sel, mea = halves
  keep, sg, hg = [], [], []
  for i, r in table.iterrows():
    g = samples.get((r["stage"], int(r["member"]), int(r["step"])))
    if g is None or not np.isfinite(g).all():
      continue
    per_prompt = g.mean(axis=1)
    keep.append(i)
    sg.append(float(per_prompt[sel].mean()) if len(sel) else float("nan"))
    hg.append(float(per_prompt[mea].mean()) if len(mea) else float("nan"))
  out = table.loc[keep].copy()
  out["sel_gold"], out["held_gold"] = sg, hg
  return out


# ----------------------------------------------------------------------------- selection
def _best(group: pd.DataFrame) -> pd.Series:
  """The row with the highest selection-half gold (ties: the first in stage/member/step order)."""
  g = group.sort_values(["stage", "member", "step"], kind="stable")
  return g.loc[g["sel_gold"].idxmax()]


def select_final(cands: pd.DataFrame, last_steps: dict[str, int] | None = None) -> pd.DataFrame:
  """Per family, of its members at the family's last eval step, the one with the highest selection-half gold.

  Args:
    cands: :func:`candidates` rows.
    last_steps: each family's last eval step (default: its last step among ``cands``);
      a family none of whose members has a candidate row there is left out.
  """
  rows = []
  for fam, g in cands.groupby("family", sort=False):
    last = g["step"].max() if last_steps is None else last_steps.get(fam, g["step"].max())
    at = g[g["step"] == last]
    if not at.empty:
      rows.append(_best(at))
  return pd.DataFrame(rows).reset_index(drop=True) if rows else cands.iloc[:0].copy()


def kl_budget(cands: pd.DataFrame) -> float:
  """``K``: the smallest, over families, of the largest KL any of the family's points reached."""
  if cands.empty:
    return float("nan")
  return float(cands.groupby("family", sort=False)["kl"].max().min())


def select_matched_kl(cands: pd.DataFrame, budget: float | None = None) -> tuple[pd.DataFrame, float]:
  """Per family, its (member, step) with ``kl ≤ K`` and the highest selection-half gold; returns ``(rows, K)``."""
  k = kl_budget(cands) if budget is None else float(budget)
  rows = [_best(g[g["kl"] <= k]) for _, g in cands.groupby("family", sort=False)
          if (g["kl"] <= k).any()]
  return (pd.DataFrame(rows).reset_index(drop=True) if rows else cands.iloc[:0].copy()), k


# ----------------------------------------------------------------------------- win rates
def prompt_win_rates(g_a, g_b, label_temp: float = 1.0) -> np.ndarray:
  """``w_e = mean_{i,j} σ((g_a[e, i] − g_b[e, j]) / label_temp)`` per prompt ``e`` (``[E, n_a]``, ``[E, n_b]``)."""
  a, b = np.asarray(g_a, np.float64), np.asarray(g_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
    raise ValueError(f"per-sample gold must be [prompts, samples] on the same prompts; got "
                     f"{a.shape} and {b.shape}")
  if not label_temp > 0:
    raise ValueError(f"label_temp = {label_temp}; it must be > 0")
  return special.expit((a[:, :, None] - b[:, None, :]) / label_temp).mean(axis=(1, 2))


def win_rate(g_a, g_b, label_temp: float = 1.0, prompts=None, *,
             power: float = inference.POWER, alpha: float = inference.ALPHA) -> dict:
  """A's win rate over B on ``prompts`` (default all) with its prompt-clustered SE, z against ½ and MDE."""
  w = prompt_win_rates(g_a, g_b, label_temp)
  if prompts is not None:
    w = w[np.asarray(prompts)]
  n = int(w.size)
  mean = float(w.mean()) if n else float("nan")
  se = float(w.std(ddof=1) / math.sqrt(n)) if n >= 2 else float("nan")
  # Identical samples (two members both at π_ref, step 0) tie up to float32 rounding.
  se = 0.0 if se < _TIE_TOL else se
  dev = 0.0 if abs(mean - 0.5) < _TIE_TOL else mean - 0.5
  if not se > 0:
    z = float("nan") if not np.isfinite(se) else (0.0 if dev == 0 else math.copysign(math.inf, dev))
  else:
    z = dev / se
  mde = inference.min_detectable(se, alpha, power) if se > 0 else float("nan")
  return {"win_rate": mean, "se": se, "z": float(z), "mde": mde, "n_prompts": n}


_POLICY_COLS = ("member", "beta", "step", "kl")


def win_matrix(selected: pd.DataFrame, samples: dict, label_temp: float, prompts, *,
               th: Thresholds | None = None) -> pd.DataFrame:
  """Every ordered pair ``A ≠ B`` of selected policies: ``W[A, B]`` on ``prompts``, long format."""
  th = th or Thresholds()
  cols = (["a", "b", "win_rate", "se", "z", "mde", "n_prompts"]
          + [f"{s}_{c}" for s in "ab" for c in ("stage",) + _POLICY_COLS])
  rows = []
  for _, ra in selected.iterrows():
    ga = samples[(ra["stage"], int(ra["member"]), int(ra["step"]))]
    for _, rb in selected.iterrows():
      if ra["family"] == rb["family"]:
        continue
      gb = samples[(rb["stage"], int(rb["member"]), int(rb["step"]))]
      r = {"a": ra["family"], "b": rb["family"],
           **win_rate(ga, gb, label_temp, prompts, power=th.power, alpha=th.alpha)}
      for s, src in (("a", ra), ("b", rb)):
        r[f"{s}_stage"] = src["stage"]
        for c in _POLICY_COLS:
          r[f"{s}_{c}"] = src[c]
      rows.append(r)
  return pd.DataFrame(rows, columns=cols)


# ------------------------------------------------------------------------- matched KL
MATCHED_COLUMNS = ("online", "offline", "sqrt_kl_lo", "sqrt_kl_hi", "gap", "sqrt_kl", "kl",
                   "online_gold", "online_se", "offline_gold", "offline_se", "diff", "diff_se")


def _nearest_se(fr: frontier_lib.Frontier, x: float) -> float:
  """``gold/reward_se`` of the Pareto point nearest to sqrt-KL ``x`` (NaN without the column)."""
  p = fr.pareto
  if "gold/reward_se" not in p:
    return float("nan")
  i = int(np.argmin(np.abs(p["sqrt_kl"].to_numpy(float) - x)))
  return float(p["gold/reward_se"].iloc[i])


def signed_gap(a: frontier_lib.Frontier, b: frontier_lib.Frontier, num: int = _GRID) -> dict:
  """Mean of ``F_a − F_b`` over the common sqrt-KL range (polylines); ``{"gap", "lo", "hi"}``, NaN gap without overlap."""
  lo, hi = max(a.range[0], b.range[0]), min(a.range[1], b.range[1])
  if not hi > lo:
    return {"gap": float("nan"), "lo": lo, "hi": hi}
  grid = np.linspace(lo, hi, num)
  diff = a.polyline(grid) - b.polyline(grid)
  return {"gap": float(_trapezoid(diff, grid) / (hi - lo)), "lo": lo, "hi": hi}


def matched_kl(frontiers: dict, online: list[str], offline: list[str],
               points=KL_POINTS) -> pd.DataFrame:
  """Each online family's frontier against each offline family's over their common sqrt-KL range.

  One row per (online, offline, point): the signed mean gap (online − offline) over the
  range, and at ``lo + q (hi − lo)`` for ``q`` in ``points`` both frontiers' values, the
  nearest Pareto point's SE, their difference and its unpaired SE. Pairs whose ranges do
  not overlap get one row with NaN values.
  """
  rows = []
  for on in online:
    for off in offline:
      a, b = frontiers[on], frontiers[off]
      g = signed_gap(a, b)
      base = {"online": on, "offline": off, "sqrt_kl_lo": g["lo"], "sqrt_kl_hi": g["hi"],
              "gap": g["gap"]}
      if not np.isfinite(g["gap"]):
        rows.append(base)
        continue
      for q in points:
        x = g["lo"] + q * (g["hi"] - g["lo"])
        ya, yb = float(a.polyline([x])[0]), float(b.polyline([x])[0])
        sa, sb = _nearest_se(a, x), _nearest_se(b, x)
        rows.append({**base, "sqrt_kl": x, "kl": x * x, "online_gold": ya, "online_se": sa,
                     "offline_gold": yb, "offline_se": sb, "diff": ya - yb,
                     "diff_se": math.sqrt(sa ** 2 + sb ** 2)})
  return pd.DataFrame(rows, columns=list(MATCHED_COLUMNS))


# ------------------------------------------------------------------------------ findings
def _entry_text(r) -> str:
  return (f"{r['a']} vs {r['b']}: W = {fmt(r['win_rate'])} ± {fmt(r['se'])}, z = {fmt(r['z'])}, "
          f"MDE {fmt(r['mde'])} (KL {fmt(r['a_kl'])} vs {fmt(r['b_kl'])})")


def _paper_entries(wins: pd.DataFrame, offline: list[str]) -> pd.DataFrame:
  if wins.empty:
    return wins
  return wins[wins["a"].map(is_paper_family) & wins["b"].isin(offline)]


def win_rate_finding(wins_matched: pd.DataFrame, wins_final: pd.DataFrame, online: list[str],
                     offline: list[str], budget: float, n_select: int, n_measure: int,
                     th: Thresholds) -> Finding:
  """(i) Do online IPO and IPO-MD beat the offline methods at equal KL (held-out win rates)?"""
  q = "Do online IPO and IPO-MD beat the offline methods at equal KL (held-out gold win rates)?"
  paper = [f for f in online if is_paper_family(f)]
  if not offline:
    return Finding("online_beats_offline", q, INCONCLUSIVE,
                   "No offline stage (offline/ with metrics.jsonl) next to the online run: nothing "
                   "to compare against.")
  if not paper:
    return Finding("online_beats_offline", q, INCONCLUSIVE,
                   f"Neither online IPO nor IPO-MD was run (online families: {', '.join(online)}).")
  ent = _paper_entries(wins_matched, offline)
  if ent.empty:
    return Finding("online_beats_offline", q, INCONCLUSIVE,
                   f"No matched-KL win rate of {', '.join(paper)} against an offline family could "
                   "be computed (no per-sample gold, or no point within the KL budget).")
  z = ent["z"].to_numpy(float)
  rule = (f"Test: W[A, B] (gold Bradley–Terry preference) on the {fmt(n_measure)} odd (held-out) "
          f"prompts, each family's policy chosen on the {fmt(n_select)} even prompts among its "
          f"points with KL ≤ K = {fmt(budget)}; SE clustered by prompt; rule: supported if every "
          f"entry is at least {fmt(Z_BAR)} SE above ½, not supported if any is {fmt(Z_BAR)} SE below.")
  mde = ent.loc[ent["se"] > 0, "mde"].to_numpy(float)
  span = (fmt(mde.min()) if fmt(mde.min()) == fmt(mde.max()) else
          f"{fmt(mde.min())} to {fmt(mde.max())}") if mde.size else ""
  power = (f"Power: each entry detects an excess over ½ of {span} (one-sided α = "
           f"{fmt(th.alpha)}, power {fmt(th.power)})." if mde.size else
           "Power: no entry has a nonzero SE.")
  text = f"{rule} Entries: " + "; ".join(_entry_text(r) for _, r in ent.iterrows()) + f". {power}"
  ties = ent[(ent["a_step"] == 0) & (ent["b_step"] == 0)]
  if len(ties):
    text += (f" In {fmt(len(ties))} of {fmt(len(ent))} entries both chosen policies are at step 0 "
             "(π_ref itself, no trained point within the budget did better on the selection "
             "prompts): a tie by construction, not evidence either way.")
  fin = _paper_entries(wins_final, offline)
  if not fin.empty:
    text += (" For context, the final policies (KL not matched): "
             + "; ".join(f"{r['a']} vs {r['b']} W = {fmt(r['win_rate'])} ± {fmt(r['se'])} "
                         f"(KL {fmt(r['a_kl'])} vs {fmt(r['b_kl'])})" for _, r in fin.iterrows()) + ".")
  below = ent[z <= -Z_BAR]
  if len(below):
    return Finding("online_beats_offline", q, NOT_SUPPORTED,
                   text + " This disagrees with Calandriello et al. 2024 (online IPO and IPO-MD "
                   "preferred to offline methods): "
                   + ", ".join(f"{r['a']} loses to {r['b']}" for _, r in below.iterrows()) + ".")
  if np.all(z >= Z_BAR):
    return Finding("online_beats_offline", q, SUPPORTED,
                   text + " As Calandriello et al. 2024 report, online IPO and IPO-MD beat every "
                   "offline family at equal KL.")
  return Finding("online_beats_offline", q, INCONCLUSIVE,
                 text + " Not every entry clears the bar and none falls below it: the run neither "
                 "confirms nor contradicts Calandriello et al. 2024 at this resolution.")


def frontier_finding(matched: pd.DataFrame, wins_matched: pd.DataFrame, online: list[str],
                     offline: list[str], th: Thresholds) -> Finding:
  """(ii) Do the frontiers order the same way (online IPO / IPO-MD above offline, signed matched-KL gaps)?"""
  q = ("Do the frontiers order the same way (online IPO and IPO-MD above the offline families "
       "at matched KL)?")
  paper = [f for f in online if is_paper_family(f)]
  if not offline or not paper:
    return Finding("frontier_order", q, INCONCLUSIVE,
                   "No offline stage to compare against." if not offline else
                   f"Neither online IPO nor IPO-MD was run (online families: {', '.join(online)}).")
  m = matched[matched["online"].isin(paper)]
  pairs = []
  for (on, off), g in m.groupby(["online", "offline"], sort=False):
    se = float(np.nanmedian(g["diff_se"])) if g["diff_se"].notna().any() else float("nan")
    pairs.append({"online": on, "offline": off, "gap": float(g["gap"].iloc[0]), "se": se,
                  "lo": float(g["sqrt_kl_lo"].iloc[0]), "hi": float(g["sqrt_kl_hi"].iloc[0])})
  pairs = [p for p in pairs if np.isfinite(p["gap"])]
  if not pairs:
    return Finding("frontier_order", q, INCONCLUSIVE,
                   "No online IPO / IPO-MD frontier shares a sqrt-KL range with an offline one.")
  p = pd.DataFrame(pairs)
  text = ("Test: the signed mean gap between the two frontiers (online − offline, polylines "
          f"through the Pareto points) over their common sqrt-KL range, against the median "
          f"unpaired SE of the frontier difference at {', '.join(fmt(x) for x in KL_POINTS)} of "
          f"that range; rule: supported if every gap is at least {fmt(Z_BAR)} SE above 0, not "
          f"supported if any is {fmt(Z_BAR)} SE below. Descriptive: a frontier is a maximum over "
          "noisy points chosen on all prompts (biased up, more so with more points); the "
          "held-out win rates above are the test. Gaps: "
          + "; ".join(f"{r['online']} − {r['offline']} = {fmt(r['gap'])} (SE ≈ {fmt(r['se'])}, "
                      f"MDE {fmt(inference.min_detectable(r['se'], th.alpha, th.power))}; "
                      f"sqrt-KL {fmt(r['lo'])} to {fmt(r['hi'])})" for _, r in p.iterrows()) + ".")
  ent = _paper_entries(wins_matched, offline)
  if not ent.empty:
    # ties (W = ½ exactly: both policies π_ref) have no direction to agree with
    sign = {(r["a"], r["b"]): np.sign(r["win_rate"] - 0.5) for _, r in ent.iterrows()
            if abs(r["win_rate"] - 0.5) >= _TIE_TOL}
    gaps = p.set_index(["online", "offline"])["gap"]
    both = [k for k in gaps.index if k in sign]
    if both:
      agree = sum(int(np.sign(gaps.loc[k]) == sign[k]) for k in both)
      text += (f" The gap's sign agrees with the matched-KL win rate's (W − ½) in {fmt(agree)} of "
               f"{fmt(len(both))} pairs (ties left out).")
  ratio = p["gap"] / p["se"]
  if (ratio <= -Z_BAR).any():
    worse = p[ratio <= -Z_BAR]
    return Finding("frontier_order", q, NOT_SUPPORTED,
                   text + " This disagrees with Calandriello et al. 2024: the frontier of "
                   + ", ".join(f"{r['online']} lies below {r['offline']}" for _, r in worse.iterrows())
                   + ".")
  if (ratio >= Z_BAR).all():
    return Finding("frontier_order", q, SUPPORTED,
                   text + " Every online IPO / IPO-MD frontier lies above every offline one, as in "
                   "Calandriello et al. 2024.")
  return Finding("frontier_order", q, INCONCLUSIVE,
                 text + " The frontiers are not separated by the bar in either direction.")


# ------------------------------------------------------------------------------- report
@dataclasses.dataclass
class OnlineReport:
  """Everything :func:`write` computes; ``findings`` cite the tables."""
  online: Run
  offline: Run | None
  out_dir: pathlib.Path
  label_temp: float
  table: pd.DataFrame          # valid rows of both stages (``stage`` column), offline relabelled
  all_rows: pd.DataFrame       # every row of both stages, diverged included
  candidates: pd.DataFrame     # valid rows with per-sample gold, sel_gold / held_gold
  samples: dict                # (stage, member, step) -> [E, n] per-sample gold
  halves: tuple
  online_families: list[str]
  offline_families: list[str]
  frontiers: dict
  matched: pd.DataFrame
  budget: float
  selected_final: pd.DataFrame
  selected_matched: pd.DataFrame
  wins_final: pd.DataFrame
  wins_matched: pd.DataFrame
  notes: list[str]
  thresholds: Thresholds
  findings: list[Finding]
  figures: dict = dataclasses.field(default_factory=dict)
  path: pathlib.Path | None = None


def _comparability(on: Run, off: Run | None, label_temp: float) -> list[str]:
  """Notes on whether the two stages were evaluated alike (config.json's eval and lab)."""
  if off is None:
    return []
  notes = []
  ce = lambda r, k: ((r.config or {}).get(k) or {}) if isinstance(r.config, dict) else {}  # noqa: E731
  diff = [k for k in ("n_prompts", "seed", "samples_per_prompt", "ref_samples_per_prompt")
          if ce(on, "eval").get(k) != ce(off, "eval").get(k)]
  if diff:
    notes.append("The stages' eval configs differ in " + ", ".join(
        f"{k} ({ce(on, 'eval').get(k)} online, {ce(off, 'eval').get(k)} offline)" for k in diff)
        + ": win rates assume the same prompts and reference samples.")
  lab_on, lab_off = ce(on, "lab"), ce(off, "lab")
  lab_diff = sorted(k for k in set(lab_on) | set(lab_off) if lab_on.get(k) != lab_off.get(k))
  if lab_diff:
    notes.append(f"The stages' lab configs differ in {', '.join(lab_diff)}.")
  if label_temp_of(off) != label_temp:
    notes.append(f"The offline stage's label_temp is {fmt(label_temp_of(off))}; the win rates use "
                 f"the online stage's {fmt(label_temp)}.")
  return notes


def _step0_note(samples: dict) -> str | None:
  """At step 0 every member is π_ref: do the two stages see the same per-prompt gold there?"""
  a = [g for (s, _, st), g in samples.items() if s == ONLINE and st == 0]
  b = [g for (s, _, st), g in samples.items() if s == OFFLINE and st == 0]
  if not a or not b or a[0].shape != b[0].shape:
    return None
  d = float(np.max(np.abs(a[0].mean(1) - b[0].mean(1))))
  if d <= 1e-5:
    return ("Check: at step 0 (every member is π_ref) the two stages' per-prompt gold agree "
            f"(max |Δ| = {fmt(d)}): same prompts, same reference subtraction.")
  return (f"Check: at step 0 (every member is π_ref) the two stages' per-prompt gold differ by up "
          f"to {fmt(d)}; if their eval prompts or reference samples differ, the win rates across "
          "stages are not like for like.")


def compute(path, out_dir=None, *, thresholds: Thresholds | None = None) -> OnlineReport:
  """All tables and findings of an online (pipeline) directory; writes nothing (see :func:`write`)."""
  th = thresholds or Thresholds()
  on_dir, off_dir = locate(path)
  on = load_run(on_dir)
  off = load_run(off_dir) if off_dir is not None else None
  label_temp = label_temp_of(on)
  stages = [(ONLINE, on)] + ([(OFFLINE, off)] if off is not None else [])
  online_fams = list(dict.fromkeys(on.table["family"]))
  offline_fams = list(dict.fromkeys(offline_name(f) for f in off.table["family"])) if off else []
  clash = sorted(set(online_fams) & set(offline_fams))
  if clash:
    raise ValueError(f"online families {clash} clash with the relabelled offline families; rename "
                     "them (offline families become offline_<name>)")
  table = pd.concat([stage_table(r, s) for s, r in stages], ignore_index=True)
  all_rows = pd.concat([r.table.assign(stage=s, family=r.table["family"].map(offline_name)
                                       if s == OFFLINE else r.table["family"]) for s, r in stages],
                       ignore_index=True)
  samples = {}
  for s, r in stages:
    samples.update(gold_samples(r, s))
  shapes = sorted({(k[0], g.shape[0]) for k, g in samples.items()})
  n_prompts = sorted({e for _, e in shapes})
  if len(n_prompts) > 1:
    raise ValueError(f"per-sample gold covers different numbers of eval prompts: {shapes} "
                     "(stage, prompts); the stages must evaluate on the same prompts")
  halves = inference.split_halves(n_prompts[0] if n_prompts else 0)
  cands = candidates(table, samples, halves)
  last = all_rows.groupby("family", sort=False)["step"].max().to_dict()
  sel_final = select_final(cands, last)
  sel_matched, budget = select_matched_kl(cands)
  wf = win_matrix(sel_final, samples, label_temp, halves[1], th=th)
  wm = win_matrix(sel_matched, samples, label_temp, halves[1], th=th)
  fronts = frontier_lib.family_frontiers(table)
  online_fams = [f for f in online_fams if f in fronts]
  offline_fams = [f for f in offline_fams if f in fronts]
  matched = matched_kl(fronts, online_fams, offline_fams)

  notes = _comparability(on, off, label_temp)
  n0 = _step0_note(samples)
  if n0:
    notes.append(n0)
  if not samples:
    notes.append(f"No per-sample gold ({GOLD_SAMPLES} in per_prompt/): rerun with "
                 "eval.gold_samples = True for the win rates.")
  div = all_rows[all_rows["diverged"]].drop_duplicates(["stage", "member"])
  if len(div):
    notes.append(f"{fmt(len(div))} member(s) diverged ("
                 + ", ".join(f"{r['family']} β = {fmt(r['beta'])}" for _, r in div.iterrows())
                 + "): their diverged rows are left out of frontiers and win rates.")
  fams = list(dict.fromkeys(all_rows["family"])) if samples else []
  for name, sel in (("final", sel_final), ("matched-KL", sel_matched)):
    miss = [f for f in fams if f not in set(sel["family"])]
    if miss:
      notes.append(f"Left out of the {name} win rates (no valid point with per-sample gold"
                   + (" at the family's last eval step" if name == "final" else " within K")
                   + f"): {', '.join(miss)}.")
  found = [win_rate_finding(wm, wf, online_fams, offline_fams, budget, len(halves[0]),
                            len(halves[1]), th),
           frontier_finding(matched, wm, online_fams, offline_fams, th)]
  return OnlineReport(
      online=on, offline=off, out_dir=pathlib.Path(out_dir) if out_dir else on.path / REPORT_DIR,
      label_temp=label_temp, table=table, all_rows=all_rows, candidates=cands, samples=samples,
      halves=halves, online_families=online_fams, offline_families=offline_fams,
      frontiers=fronts, matched=matched, budget=budget, selected_final=sel_final,
      selected_matched=sel_matched, wins_final=wf, wins_matched=wm, notes=notes, thresholds=th,
      findings=found)


# ----------------------------------------------------------------------------- markdown
SELECTED_COLUMNS = {"family": "family", "stage": "stage", "member": "member", "beta": "β",
                    "step": "step", "kl": "KL", "gold/reward": "gold (all prompts)",
                    "sel_gold": "gold (selection half)", "held_gold": "gold (held-out half)"}
GAP_COLUMNS = {"online": "online", "offline": "offline", "sqrt_kl_lo": "sqrt-KL from",
               "sqrt_kl_hi": "sqrt-KL to", "gap": "mean gap (online − offline)"}
POINT_COLUMNS = {"online": "online", "offline": "offline", "sqrt_kl": "sqrt KL", "kl": "KL",
                 "online_gold": "online gold", "online_se": "se", "offline_gold": "offline gold",
                 "offline_se": "se ", "diff": "difference", "diff_se": "se (unpaired)"}


def matrix_markdown(wins: pd.DataFrame, families: list[str]) -> str:
  """``W[row, column] ± SE (z)``; the diagonal is ½ by definition; a last column averages the row."""
  cell = {(r["a"], r["b"]): r for _, r in wins.iterrows()}
  lines = ["| A \\ B | " + " | ".join(families) + " | mean vs others |",
           "|" + "---|" * (len(families) + 2)]
  for a in families:
    cells, ws = [], []
    for b in families:
      if a == b:
        cells.append("½")
        continue
      r = cell.get((a, b))
      if r is None:
        cells.append("n/a")
        continue
      ws.append(float(r["win_rate"]))
      cells.append(f"{fmt(r['win_rate'])} ± {fmt(r['se'])} ({fmt(r['z'])})")
    lines.append(f"| {a} | " + " | ".join(cells) + f" | {fmt(np.mean(ws)) if ws else 'n/a'} |")
  return "\n".join(lines)


FIGURE_CAPTION = ("Gold (reference-subtracted) vs sqrt KL(π‖π_ref) for every method on one axis: "
                  "faint points and lines are each member's trajectory over eval steps; the thick "
                  "line is each family's frontier (upper envelope over β and steps, through its "
                  "Pareto points); online solid, offline dashed; the dotted vertical line is the "
                  "matched-KL budget sqrt K of the win rates.")


def render_markdown(rep: OnlineReport) -> str:
  """The text of ``online.md``."""
  th = rep.thresholds
  rel = lambda p: pathlib.Path(os.path.relpath(p, rep.out_dir)).as_posix()  # noqa: E731
  # runs named relative to the pipeline directory (the online run's parent): no absolute paths
  run_name = lambda p: pathlib.Path(os.path.relpath(p, rep.online.path.parent)).as_posix()  # noqa: E731
  sel, mea = rep.halves
  ns = sorted({g.shape[1] for g in rep.samples.values()})
  n_members = rep.all_rows.drop_duplicates(["stage", "member"]).groupby("stage").size().to_dict()
  out = ["# Online vs offline preference optimisation", ""]
  out += [f"Online run `{run_name(rep.online.path)}` ({fmt(n_members.get(ONLINE, 0))} members: "
          f"{', '.join(rep.online_families)})"
          + (f"; offline run `{run_name(rep.offline.path)}` ({fmt(n_members.get(OFFLINE, 0))} members: "
             f"{', '.join(rep.offline_families)}; logistic = offline_dpo, squared = offline_ipo, "
             "hinge = offline_slic)." if rep.offline is not None else "; no offline stage.")
          + f" Gold Bradley–Terry preference with label_temp = {fmt(rep.label_temp)}; "
          + (f"{fmt(len(sel) + len(mea))} eval prompts, {'/'.join(fmt(n) for n in ns)} samples "
             f"per prompt; policies chosen on the {fmt(len(sel))} even prompts, win rates "
             f"measured on the {fmt(len(mea))} odd ones." if rep.samples else
             "no per-sample gold, so no win rates."), ""]
  out += [f"- {n}" for n in rep.notes] + ([""] if rep.notes else [])
  out += render_findings(rep.findings, f"Every test is at level {fmt(th.alpha)} (one-sided); "
                         f"minimum detectable effects (MDE) are at {fmt(100 * th.power)}% power.")
  if FIGURE_NAME in rep.figures:
    png, svg = rep.figures[FIGURE_NAME]
    out += ["## Frontiers", "", f"![online vs offline frontiers]({rel(png)})", "",
            f"*{FIGURE_CAPTION}* ([svg]({rel(svg)}))", ""]
  out += ["## Gold at matched KL", ""]
  if rep.matched.empty:
    out += ["No offline families to compare with." if not rep.offline_families else
            "No online family to compare.", ""]
  else:
    pairs = rep.matched.drop_duplicates(["online", "offline"])
    out += ["Signed mean gap between each online and each offline family's frontier over their "
            "common sqrt-KL range (online − offline; n/a: the ranges do not overlap); `matched_kl.csv`.",
            "", md_table(pairs, GAP_COLUMNS), "",
            f"Both frontiers at {', '.join(fmt(q) for q in KL_POINTS)} of the common range, each "
            "with the SE of its nearest Pareto point (the difference's SE ignores that the "
            "stages share prompts).", "", md_table(rep.matched.dropna(subset=["sqrt_kl"]),
                                                   POINT_COLUMNS), ""]
  out += ["## Head-to-head win rates under the gold preference", "",
          "W[A, B] = mean over held-out prompts e of mean_{i,j} σ((g_A[e,i] − g_B[e,j]) / "
          "label_temp): the probability that a sample of A's policy is preferred to one of B's "
          "under the gold Bradley–Terry model. Cells: W ± SE (z against ½), SE clustered by "
          "prompt; W[A, B] + W[B, A] = 1. Each family's policy is the one with the highest gold "
          "on the selection prompts; the win rates use only the other half.", ""]
  for title, sel_df, wins, csv, how in (
      ("Final policies", rep.selected_final, rep.wins_final, "win_rates_final.csv",
       "each family's member at its last eval step"),
      (f"At matched KL (K = {fmt(rep.budget)})", rep.selected_matched, rep.wins_matched,
       "win_rates_matched_kl.csv", "each family's (member, step) with KL ≤ K, K the smallest of "
       "the families' largest KLs")):
    out += [f"### {title}", ""]
    if sel_df.empty:
      out += ["No policies to compare (no per-sample gold).", ""]
      continue
    fams = list(sel_df["family"])
    out += [f"Chosen: {how}.", "", md_table(sel_df, SELECTED_COLUMNS), "",
            f"`{csv}`:", "", matrix_markdown(wins, fams), ""]
  return "\n".join(out)


CSV_NAMES = {"matched": "matched_kl.csv", "wins_final": "win_rates_final.csv",
             "wins_matched": "win_rates_matched_kl.csv"}


def write(path, *, log=print, out_dir=None, figures: bool = True,
          thresholds: Thresholds | None = None) -> pathlib.Path:
  """Writes the online-vs-offline report; returns the path of ``online.md``.

  Args:
    path: a pipeline directory (``online/``, optionally ``offline/``) or an online run
      directory (a sibling ``offline/`` is used when present).
    log: called with a one-line summary per finding.
    out_dir: where to write (default ``<online run>/report``).
    figures: draw ``online_frontier.{png,svg}``.
    thresholds: test level and power.

  Reruns write byte-identical markdown, CSVs and SVG.
  """
  rep = compute(path, out_dir, thresholds=thresholds)
  rep.out_dir.mkdir(parents=True, exist_ok=True)
  if figures:
    from gpo_jax.analysis import online_plots   # matplotlib only when drawing
    rep.figures = {FIGURE_NAME: online_plots.frontier_figure(rep, rep.out_dir, FIGURE_NAME)}
  for attr, name in CSV_NAMES.items():
    getattr(rep, attr).to_csv(rep.out_dir / name, index=False, float_format=_FLOAT_FORMAT,
                              lineterminator="\n")
  rep.path = rep.out_dir / REPORT_FILE
  rep.path.write_text(render_markdown(rep))
  for f in rep.findings:
    log(f"online report: {f.question} {f.verdict}")
  return rep.path
