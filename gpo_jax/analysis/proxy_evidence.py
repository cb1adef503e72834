"""The computations of Gao's proxy setting (SPEC §6, §7.4): the π_ref pool, best-of-n and RL curves against proxies, and the paired tests behind the proxy findings.

A run against a proxy (``algorithm = rloo``) holds the RL members' metrics and per-prompt
results, and ``bon_pool.npz``: π_ref's pool on the same eval prompts scored by gold and
by every proxy, from which best-of-n under any selector (a single proxy or an ensemble
objective) is computed exactly. Everything here is paired per prompt (SPEC §4):

* :class:`Pool`, :func:`make_pool`, :func:`load_pool`: the pool and its selectors.
* :func:`proxy_table`: the proxies (reward-model runs' final accuracy, calibration; offline
  policies' implicit-reward accuracy) and how well each one ranks the pool.
* :func:`bon_curves`: per selector, the unbiased best-of-n gold and proxy curves, the Gao
  best-of-n fit, the held-out peak-and-fall test and whether the proxy keeps rising. The
  oracle selector (gold itself) is the ceiling; SPEC §5's like-for-like baselines select
  by a proxy reward model (kinds ``single``, ``ensemble``) or by an offline policy's
  implicit reward ``log π − log π_ref`` (kind ``implicit``: a proxy set of kind
  ``implicit``, exported by an offline GPO run). :func:`bon_table` and :func:`bon_tests`
  tabulate them.
* :func:`rl_curves`: the same per RL member (Gao RL form).
* :func:`peak_vs_proxy`, :func:`ensembles_vs_singles`, :func:`ensembles_vs_singles_rl`,
  :func:`bon_vs_rl`: the comparisons of SPEC §7.4, each a paired per-prompt test with its
  minimum detectable effect.

:mod:`gpo_jax.analysis.proxy_findings` writes the verdicts from these tables and
:mod:`gpo_jax.analysis.proxy` the report. Per-prompt arrays use ``E`` for eval prompts,
``N`` for the pool size, ``K`` for the best-of-n grid, ``S``/``M`` for steps/members.

References:
  Gao, Schulman, Hilton 2023, "Scaling Laws for Reward Model Overoptimization"
  (arXiv 2210.10760), Figure 1 and section 3.
  Coste, Anwar, Kirk, Krueger 2023, "Reward Model Ensembles Help Mitigate
  Overoptimization" (arXiv 2310.02743).
  Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment policy"
  (arXiv 2401.01879): ``log n − (n−1)/n`` is an upper bound on best-of-n's KL.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re

import numpy as np
import pandas as pd

from gpo_jax.analysis import evidence, gao, inference
from gpo_jax.analysis.findings import fmt
from gpo_jax.analysis.table import Run, read_jsonl
from gpo_jax.evaluation import bon as bon_lib
from gpo_jax.objectives import ensembles

POOL_FILE = "bon_pool.npz"
ORACLE = "gold"          # the selector that ranks by gold itself: the oracle ceiling
BAR_Z = 3.0              # the project's bar: "peaks and falls by at least 3 paired SEs"
GROUP_KEYS = ("n_layers", "data_size", "labels", "label_noise")
# Proxy-set kinds (``proxies.json``'s ``kind``; absent means a reward model).
REWARD_MODEL, IMPLICIT = "reward_model", "implicit"
SET_KINDS = (REWARD_MODEL, IMPLICIT)
# Selector kinds: the gold-selected ceiling, one proxy RM, an objective over several proxies,
# one offline policy's implicit reward.
SELECTOR_KINDS = ("oracle", "single", "ensemble", "implicit")
PROXY_RM_KINDS = ("single", "ensemble")
_KIND_ORDER = {k: i for i, k in enumerate(SELECTOR_KINDS)}
_ONE_PROXY = ("single", "implicit")   # selectors that rank by one proxy alone
_NAME_RE = re.compile(r"^L(?P<n_layers>\d+)_n(?P<data_size>\d+)_(?P<labels>[a-z]+)"
                      r"(?:_q(?P<label_noise>[0-9.eE+-]+))?(?:_lr[0-9.eE+-]+)?_s(?P<seed>\d+)$")
_IMPLICIT_RE = re.compile(r"^implicit_(?P<family>.+)_be(?P<beta_eff>[0-9.eE+-]+)_n(?P<data_size>\d+)"
                          r"_s(?P<seed>\d+)$")
# Where an implicit reward's count of untied held-out pairs may be logged.
_N_PAIRS_KEYS = ("rewards/gold_n_pairs", "rewards/n_pairs", "rewards/gold_accuracies_n")


# ---------------------------------------------------------------------- the π_ref pool
@dataclasses.dataclass(frozen=True)
class Pool:
  """π_ref's best-of-n pool on the eval prompts, scored by gold and every proxy.

  Attributes:
    gold: ``[E, N]`` normalised gold (not reference-subtracted).
    proxies: ``[P, E, N]`` each proxy's normalised score.
    proxy_names: ``P`` names.
    selector_names: ``S`` names (a single proxy or ``<ensemble>/<objective>``).
    mask: ``[S, P]`` 0/1, the proxies a selector combines.
    objective: ``[S]`` index into :data:`gpo_jax.objectives.ensembles.OBJECTIVES`.
    lam: ``[S]`` UWO's variance penalty.
    proxy_kinds: ``P`` proxy-set kinds (:data:`SET_KINDS`); empty means every proxy is a
      reward model (the pool file does not record it: :func:`with_proxy_kinds` sets it
      from the proxy sets' ``proxies.json``).
  """
  gold: np.ndarray
  proxies: np.ndarray
  proxy_names: tuple[str, ...]
  selector_names: tuple[str, ...]
  mask: np.ndarray
  objective: np.ndarray
  lam: np.ndarray
  proxy_kinds: tuple[str, ...] = ()

  def __post_init__(self):
    e, n = self.gold.shape
    p = len(self.proxy_names)
    if self.proxies.shape != (p, e, n):
      raise ValueError(f"pool proxies have shape {self.proxies.shape}, expected {(p, e, n)} "
                       f"(P proxies × gold's [E, N])")
    s = len(self.selector_names)
    if self.mask.shape != (s, p) or self.objective.shape != (s,) or self.lam.shape != (s,):
      raise ValueError(f"selector table shapes mask {self.mask.shape}, objective "
                       f"{self.objective.shape}, lam {self.lam.shape} do not fit {s} selectors "
                       f"over {p} proxies")
    if self.proxy_kinds and (len(self.proxy_kinds) != p
                             or not set(self.proxy_kinds) <= set(SET_KINDS)):
      raise ValueError(f"proxy_kinds {self.proxy_kinds} must give one of {list(SET_KINDS)} "
                       f"for each of the {p} proxies")

  @property
  def num_prompts(self) -> int:
    return int(self.gold.shape[0])

  @property
  def size(self) -> int:
    """The pool size ``N`` per prompt."""
    return int(self.gold.shape[1])

  def objective_name(self, s: int) -> str:
    return ensembles.OBJECTIVES[int(self.objective[s])]

  def members(self, s: int) -> tuple[str, ...]:
    return tuple(p for p, m in zip(self.proxy_names, self.mask[s]) if m > 0)

  def proxy_kind(self, p: int) -> str:
    """Proxy ``p``'s set kind (:data:`REWARD_MODEL` unless ``proxy_kinds`` says otherwise)."""
    return self.proxy_kinds[p] if self.proxy_kinds else REWARD_MODEL

  def kind(self, s: int) -> str:
    """One proxy under the mean objective: ``"single"`` (a reward model) or ``"implicit"``
    (an offline policy's implicit reward); several proxies or another objective: ``"ensemble"``."""
    used = np.flatnonzero(self.mask[s] > 0)
    if used.size == 1 and self.objective_name(s) == "mean":
      return "implicit" if self.proxy_kind(int(used[0])) == IMPLICIT else "single"
    return "ensemble"

  def scores(self, s: int) -> np.ndarray:
    """Selector ``s``'s score of every pool sample, ``[E, N]`` (as the trainer applies it)."""
    return np.asarray(ensembles.combine(self.proxies, self.objective_name(s), float(self.lam[s]),
                                        self.mask[s]), np.float64)


def make_pool(gold_ExN, proxies_PxExN, proxy_names, ensembles_spec=None,
              objectives=("mean", "wco", "uwo"), uwo_lambda: float = 1.0,
              proxy_kinds=None) -> Pool:
  """A pool with one single selector per proxy and ``<ens>/<objective>`` per ensemble.

  Mirrors the trainer's selector naming (``gpo_jax.proxies.selectors.build``) for pools made
  outside a run (tests, notebooks).

  Args:
    gold_ExN: gold scores of the pool.
    proxies_PxExN: proxy scores of the same samples.
    proxy_names: one name per proxy.
    ensembles_spec: ``{name: [proxy names]}``.
    objectives: the objectives each ensemble gets.
    uwo_lambda: UWO's λ.
    proxy_kinds: ``{name: kind}`` or one kind per proxy (default: all reward models).
  """
  names = list(proxy_names)
  if isinstance(proxy_kinds, dict):
    proxy_kinds = [proxy_kinds.get(n, REWARD_MODEL) for n in names]
  rows, obj, lam, sel = [], [], [], []
  for i, n in enumerate(names):
    m = np.zeros(len(names))
    m[i] = 1
    rows.append(m); obj.append(0); lam.append(0.0); sel.append(n)
  for ens, members in dict(ensembles_spec or {}).items():
    m = np.array([1.0 if n in members else 0.0 for n in names])
    for o in objectives:
      rows.append(m); obj.append(ensembles.OBJECTIVES.index(o))
      lam.append(float(uwo_lambda) if o == "uwo" else 0.0); sel.append(f"{ens}/{o}")
  return Pool(gold=np.asarray(gold_ExN, np.float64), proxies=np.asarray(proxies_PxExN, np.float64),
              proxy_names=tuple(names), selector_names=tuple(sel), mask=np.stack(rows),
              objective=np.asarray(obj, np.int64), lam=np.asarray(lam, np.float64),
              proxy_kinds=tuple(proxy_kinds or ()))


def with_proxy_kinds(pool: Pool, proxies: pd.DataFrame) -> Pool:
  """The pool with each proxy's set kind from :func:`proxy_table`'s ``kind`` column (missing: reward model)."""
  if proxies is None or proxies.empty or "kind" not in proxies.columns:
    return pool
  kinds = dict(zip(proxies["name"], proxies["kind"].fillna(REWARD_MODEL)))
  return dataclasses.replace(pool, proxy_kinds=tuple(str(kinds.get(n, REWARD_MODEL))
                                                     for n in pool.proxy_names))


def load_pool(rl_dir) -> Pool:
  """Reads ``RL_DIR/bon_pool.npz`` (written by the evaluator of a run against a proxy)."""
  path = pathlib.Path(rl_dir) / POOL_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {path.parent} a run against a proxy "
                            "(algorithm rloo with proxies.paths)?")
  with np.load(path) as z:
    return Pool(gold=z["gold"].astype(np.float64), proxies=z["proxies"].astype(np.float64),
                proxy_names=tuple(str(s) for s in z["proxy_names"]),
                selector_names=tuple(str(s) for s in z["selector_names"]),
                mask=z["selector_mask"].astype(np.float64),
                objective=z["selector_objective"].astype(np.int64),
                lam=z["selector_lam"].astype(np.float64),
                proxy_kinds=(tuple(str(s) for s in z["proxy_kinds"]) if "proxy_kinds" in z.files
                             else ()))


def _within_prompt_corr(a_ExN: np.ndarray, b_ExN: np.ndarray) -> float:
  """Mean over prompts of the Pearson correlation across each prompt's samples (what best-of-n ranks by)."""
  a = a_ExN - a_ExN.mean(1, keepdims=True)
  b = b_ExN - b_ExN.mean(1, keepdims=True)
  den = np.sqrt(np.sum(a * a, 1) * np.sum(b * b, 1))
  ok = den > 0
  return float(np.mean(np.sum(a * b, 1)[ok] / den[ok])) if ok.any() else float("nan")


def _pool_corr(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a.ravel(), b.ravel()
  return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


# ---------------------------------------------------------------------- proxies
def parse_proxy_name(name: str) -> dict:
  """The fields of a proxy name ``L<layers>_n<data>_<labels>[_q<noise>][_lr<lr>]_s<seed>``; {} if it does not parse."""
  m = _NAME_RE.match(name)
  if not m:
    return {}
  d = m.groupdict()
  return {"n_layers": int(d["n_layers"]), "data_size": int(d["data_size"]), "labels": d["labels"],
          "label_noise": float(d["label_noise"] or 0.0), "seed": int(d["seed"])}


def implicit_label(family: str, beta_eff) -> str:
  """How an implicit reward is labelled in the tables: its GPO loss and effective β, e.g. ``logistic β_eff 0.1``."""
  return f"{family} β_eff {fmt(beta_eff)}"


def parse_implicit_name(name: str) -> dict:
  """The fields of an implicit-reward name ``implicit_<family>_be<β_eff>_n<data>_s<seed>``; {} if it does not parse."""
  m = _IMPLICIT_RE.match(name)
  if not m:
    return {}
  d = m.groupdict()
  try:
    beta_eff = float(d["beta_eff"])
  except ValueError:
    return {}
  return {"family": d["family"], "beta_eff": beta_eff, "data_size": int(d["data_size"]),
          "seed": int(d["seed"]), "labels": implicit_label(d["family"], beta_eff)}


def _read_json(path: pathlib.Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def proxy_set_kind(run_dir) -> str | None:
  """The kind of the proxy set a run exported (``proxies/proxies.json``; :data:`REWARD_MODEL` when it has no ``kind``), None if unreadable."""
  meta = _read_json(pathlib.Path(run_dir) / "proxies" / "proxies.json")
  return None if meta is None else str(meta.get("kind", REWARD_MODEL))


def _held_out_pairs(run_dir: pathlib.Path) -> int | None:
  """How many of the lab's test pairs a run's evaluator used (its config's ``eval.n_test_pairs``, 0 = all)."""
  cfg = _read_json(run_dir / "config.json") or {}
  try:
    n_lab = int(cfg["lab"]["n_test_pairs"])
    k = int((cfg.get("eval") or {}).get("n_test_pairs", 0))
  except (KeyError, TypeError, ValueError):
    return None
  return n_lab if k <= 0 else min(k, n_lab)


def _finite(x) -> bool:
  try:
    return x is not None and math.isfinite(float(x))
  except (TypeError, ValueError):
    return False


def _final_rows(run_dir: pathlib.Path, key: str) -> dict[int, dict]:
  """Per member, its last non-diverged ``metrics.jsonl`` row with a finite ``key``."""
  path = run_dir / "metrics.jsonl"
  last: dict[int, dict] = {}
  for r in read_jsonl(path) if path.exists() else []:
    if not _finite(r.get(key)) or r.get("diverged") or "member" not in r:
      continue
    m = int(r["member"])
    if m not in last or r["step"] >= last[m]["step"]:
      last[m] = r
  return last


def _num(r: dict, key: str) -> float:
  return float(r[key]) if _finite(r.get(key)) else float("nan")


def _rm_rows(rm_dir: pathlib.Path, meta: dict) -> list[dict]:
  n_layers = int(meta.get("model", {}).get("n_layers", -1))
  last = _final_rows(rm_dir, "rm/gold_accuracy")
  rows = []
  for mem in meta.get("members", []):
    r = last.get(int(mem["member"]), {})
    rows.append({"name": mem["name"], "kind": REWARD_MODEL, "rm_run": rm_dir.name,
                 "rm_member": int(mem["member"]), "n_layers": n_layers,
                 "data_size": int(mem.get("data_size", -1)),
                 "labels": str(mem.get("labels", "")), "label_noise": float(mem.get("label_noise", 0.0)),
                 "gamma": float(mem.get("gamma", float("nan"))), "seed": int(mem.get("seed", -1)),
                 "rm_step": float(r.get("step", float("nan"))),
                 **{k.replace("rm/", ""): _num(r, k)
                    for k in ("rm/gold_accuracy", "rm/gold_accuracy_se", "rm/ece", "rm/gold_corr")},
                 "gold_accuracy_n": _num(r, "rm/n_pairs"),
                 "lab_hash": meta.get("lab_hash"), "n_test_pairs": _held_out_pairs(rm_dir)})
  return rows


def _implicit_rows(run_dir: pathlib.Path, meta: dict) -> list[dict]:
  """An offline GPO run's exported policies: the final-step ``rewards/gold_accuracies`` per member."""
  n_layers = int(meta.get("model", {}).get("n_layers", -1))
  last = _final_rows(run_dir, "rewards/gold_accuracies")
  rows = []
  for mem in meta.get("members", []):
    r = last.get(int(mem["member"]), {})
    beta_eff = float(mem.get("beta_eff", mem.get("beta", float("nan"))))
    family = str(mem.get("family", ""))
    n = next((_num(r, k) for k in _N_PAIRS_KEYS if _finite(r.get(k))), float("nan"))
    rows.append({"name": mem["name"], "kind": IMPLICIT, "rm_run": run_dir.name,
                 "rm_member": int(mem["member"]), "n_layers": n_layers,
                 "data_size": int(mem.get("data_size", -1)), "labels": implicit_label(family, beta_eff),
                 "label_noise": float("nan"), "gamma": float(mem.get("gamma", float("nan"))),
                 "seed": int(mem.get("seed", -1)), "family": family,
                 "beta": float(mem.get("beta", float("nan"))), "beta_eff": beta_eff,
                 "lr": float(mem.get("lr", float("nan"))),
                 "rm_step": float(r.get("step", float("nan"))),
                 "gold_accuracy": _num(r, "rewards/gold_accuracies"), "gold_accuracy_se": float("nan"),
                 "gold_accuracy_n": n, "gold_accuracy_n_from": "logged" if np.isfinite(n) else "",
                 "ece": float("nan"), "gold_corr": float("nan"),
                 "policy_kl": _num(r, "kl"), "policy_gold": _num(r, "gold/reward"),
                 "lab_hash": meta.get("lab_hash"), "n_test_pairs": _held_out_pairs(run_dir)})
  return rows


def _set_rows(run_dir: pathlib.Path) -> list[dict]:
  meta = _read_json(run_dir / "proxies" / "proxies.json")
  if meta is None:
    return []
  if meta.get("kind", REWARD_MODEL) == IMPLICIT:
    return _implicit_rows(run_dir, meta)
  return _rm_rows(run_dir, meta)


def _implicit_se(rows: list[dict]) -> None:
  """Binomial SEs of the implicit rewards' gold accuracies, in place.

  ``n`` is the number of untied held-out pairs: logged by the GPO run, or else the
  ``rm/n_pairs`` of a reward-model set in the same table on the same lab (``lab_hash``) and
  the same leading test pairs (both evaluators use the first ``n_test_pairs`` of the lab's
  test split, so the untied ones are the same pairs); n/a otherwise.
  """
  rm_n = {}
  for r in rows:
    if r.get("kind") == REWARD_MODEL and r.get("lab_hash") and r.get("n_test_pairs") \
        and np.isfinite(r.get("gold_accuracy_n", float("nan"))):
      rm_n.setdefault((r["lab_hash"], r["n_test_pairs"]), (r["gold_accuracy_n"], r["rm_run"]))
  for r in rows:
    if r.get("kind") != IMPLICIT or "gold_accuracy_n" not in r:
      continue
    if not np.isfinite(r["gold_accuracy_n"]):
      hit = rm_n.get((r.get("lab_hash"), r.get("n_test_pairs")))
      if hit is not None:
        r["gold_accuracy_n"], r["gold_accuracy_n_from"] = float(hit[0]), f"rm/n_pairs of {hit[1]}"
    a, n = r["gold_accuracy"], r["gold_accuracy_n"]
    if np.isfinite(a) and np.isfinite(n) and n > 1:
      r["gold_accuracy_se"] = math.sqrt(a * (1 - a) / n)


def proxy_table(rm_dirs, pool: Pool | None = None) -> pd.DataFrame:
  """One row per proxy: its run's final held-out metrics and, with a pool, how it ranks π_ref's samples.

  Columns: ``name, kind`` (:data:`REWARD_MODEL` or :data:`IMPLICIT`, from the set's
  ``proxies.json``), ``rm_run`` (the run the set came from), ``n_layers, data_size, labels,
  label_noise, gamma, seed, rm_step, gold_accuracy (± gold_accuracy_se, over
  gold_accuracy_n untied pairs), ece, gold_corr``. A reward model's come from its run's last
  eval (``rm/*``). An implicit reward (an offline GPO policy scored by ``log π − log
  π_ref``) has ``labels`` = its loss and effective β (``logistic β_eff 0.1``), ``family,
  beta, beta_eff, lr`` from ``proxies.json``, ``gold_accuracy`` = the GPO run's final-step
  ``rewards/gold_accuracies`` for that member, a binomial SE where the number of untied
  held-out pairs is known (see :func:`_implicit_se`), no ECE or gold correlation, and the
  policy's own final ``policy_kl`` and ``policy_gold``. From the pool: ``pool_corr``
  (Pearson correlation of proxy and gold over all pool samples) and ``within_prompt_corr``
  (mean over prompts of the correlation within a prompt's samples: what best-of-n ranks
  by). Proxies of the pool whose run is not readable are described from their name
  (``source = "name"``; ``implicit_*`` names as implicit rewards).

  Args:
    rm_dirs: proxy-set run directories (their ``proxies/proxies.json``, ``metrics.jsonl`` and
      ``config.json``): reward-model runs and offline GPO runs alike.
    pool: the pool to correlate with gold (optional).
  """
  rows = []
  for d in rm_dirs or ():
    for r in _set_rows(pathlib.Path(d)):
      rows.append({**r, "source": "rm run" if r["kind"] == REWARD_MODEL else "policy run"})
  _implicit_se(rows)
  known = {r["name"] for r in rows}
  if pool is not None:
    for name in pool.proxy_names:
      if name in known:
        continue
      imp = parse_implicit_name(name)
      if imp:
        rows.append({"name": name, "kind": IMPLICIT, "source": "name", **imp})
      else:
        rows.append({"name": name, "kind": REWARD_MODEL, "source": "name", **parse_proxy_name(name)})
  t = pd.DataFrame(rows)
  if t.empty:
    return t
  if pool is not None:
    idx = {n: i for i, n in enumerate(pool.proxy_names)}
    t["in_pool"] = t["name"].isin(list(idx))
    t["pool_corr"] = [_pool_corr(pool.proxies[idx[n]], pool.gold) if n in idx else float("nan")
                      for n in t["name"]]
    t["within_prompt_corr"] = [_within_prompt_corr(pool.proxies[idx[n]], pool.gold) if n in idx
                               else float("nan") for n in t["name"]]
  return t.sort_values("name", kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------- best-of-n
@dataclasses.dataclass(frozen=True)
class BonResult:
  """Best-of-n under one selector: per-prompt curves, their means, the Gao fit and the tests.

  Attributes:
    selector: its name (:data:`ORACLE` for the gold-selected ceiling).
    kind: ``"oracle"``, ``"single"`` (one proxy RM), ``"ensemble"`` or ``"implicit"`` (one
      offline policy's implicit reward; :data:`SELECTOR_KINDS`).
    members: the proxies it combines.
    objective: ``mean``/``wco``/``uwo`` (``gold`` for the oracle).
    n, kl, sqrt_kl: the grid, ``kl = kl_bon(n)``.
    gold_ExK, proxy_ExK: per-prompt unbiased estimates, each reference-subtracted by the
      prompt's pool mean (R(0) = 0); the proxy is the selector's own score.
    gold, gold_se, proxy, proxy_se: means and SEs over prompts ``[K]``.
    fit: Gao best-of-n form of gold vs sqrt KL (SE-weighted), None if it cannot be fitted.
    peak: the held-out peak-and-fall test (peak ``n`` chosen on even prompts, drop to the
      largest ``n`` measured on odd prompts).
    proxy_rise: the selector's own score at the largest ``n`` minus at the held-out peak
      ``n``, paired over the measuring prompts (``z > 0``: the proxy keeps rising).
    within_prompt_corr: mean within-prompt correlation of the selector's score with gold.
  """
  selector: str
  kind: str
  members: tuple[str, ...]
  objective: str
  n: np.ndarray
  kl: np.ndarray
  sqrt_kl: np.ndarray
  gold_ExK: np.ndarray
  proxy_ExK: np.ndarray
  gold: np.ndarray
  gold_se: np.ndarray
  proxy: np.ndarray
  proxy_se: np.ndarray
  fit: gao.GaoFit | None
  peak: inference.PeakTest
  proxy_rise: inference.Paired
  within_prompt_corr: float = float("nan")


def default_ns(N: int) -> np.ndarray:
  """Powers of two from 1 up to ``N``, plus ``N``."""
  ns = [1 << k for k in range(int(math.floor(math.log2(N))) + 1)] if N >= 1 else []
  return np.array(sorted(set(ns) | {int(N)}), np.int64)


def _mean_se(x_ExK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  e = x_ExK.shape[0]
  mean = x_ExK.mean(0)
  se = x_ExK.std(0, ddof=1) / math.sqrt(e) if e > 1 else np.full_like(mean, np.nan)
  return mean, se


def _fit(form: str, d, r, se) -> gao.GaoFit | None:
  try:
    return gao.fit_gao(d, r, form, se=se)
  except ValueError:
    return None


def bon_result(selector: str, n, gold_ExK, proxy_ExK, *, kind: str = "single", members=(),
               objective: str = "mean", within_prompt_corr: float = float("nan"),
               alpha: float = inference.ALPHA, power: float = inference.POWER) -> BonResult:
  """A :class:`BonResult` from per-prompt best-of-n estimates (means, fit and tests computed here).

  Args:
    selector: name.
    n: ``[K]`` increasing subset sizes.
    gold_ExK, proxy_ExK: per-prompt reference-subtracted gold and proxy estimates.
    kind, members, objective, within_prompt_corr: descriptive.
    alpha, power: of the held-out test and its minimum detectable drop.
  """
  n = np.asarray(n, np.int64)
  g, p = np.asarray(gold_ExK, np.float64), np.asarray(proxy_ExK, np.float64)
  if g.shape != p.shape or g.ndim != 2 or g.shape[1] != n.size:
    raise ValueError(f"bon_result: gold {g.shape} and proxy {p.shape} must both be [E, K={n.size}]")
  if n.size < 2 or np.any(np.diff(n) <= 0):
    raise ValueError(f"bon_result needs at least 2 increasing n, got {n.tolist()}")
  kl = bon_lib.kl_bon(n)
  d = np.sqrt(kl)
  gold, gold_se = _mean_se(g)
  proxy, proxy_se = _mean_se(p)
  peak = inference.held_out_peak_test(g.T, n.size - 1, alpha=alpha, power=power)
  _, mea = inference.split_halves(g.shape[0])
  rise = inference.paired(p[mea, peak.end_index], p[mea, peak.peak_index])
  return BonResult(selector=selector, kind=kind, members=tuple(members), objective=objective,
                   n=n, kl=kl, sqrt_kl=d, gold_ExK=g, proxy_ExK=p, gold=gold, gold_se=gold_se,
                   proxy=proxy, proxy_se=proxy_se, fit=_fit("bon", d, gold, gold_se), peak=peak,
                   proxy_rise=rise, within_prompt_corr=within_prompt_corr)


def bon_curves(pool: Pool, ns=None, *, alpha: float = inference.ALPHA,
               power: float = inference.POWER) -> dict[str, BonResult]:
  """Best-of-n under every selector of the pool and under gold itself (the oracle ceiling).

  Per prompt, the unbiased estimator (:func:`gpo_jax.evaluation.bon.per_prompt`) gives the
  mean gold (and the selector's own score) at the best of a uniformly random ``n``-subset of
  that prompt's ``N`` pool samples; both are reference-subtracted by the prompt's pool mean,
  so ``n = 1`` gives 0 on every prompt, like the RL members' ``gold/reward``.

  Args:
    pool: the π_ref pool.
    ns: the subset sizes (default :func:`default_ns`).
    alpha, power: of the held-out tests.

  Returns:
    ``{selector: BonResult}``, the oracle (:data:`ORACLE`) first, then the pool's order.
  """
  ns = default_ns(pool.size) if ns is None else np.asarray(sorted({int(v) for v in ns}), np.int64)
  gold_c = pool.gold - pool.gold.mean(1, keepdims=True)
  out = {ORACLE: bon_result(ORACLE, ns, bon_lib.per_prompt(pool.gold, gold_c, ns),
                            bon_lib.per_prompt(pool.gold, gold_c, ns), kind="oracle",
                            objective="gold", within_prompt_corr=1.0, alpha=alpha, power=power)}
  for s, name in enumerate(pool.selector_names):
    if name == ORACLE:
      raise ValueError(f"a selector is named {ORACLE!r}, the oracle's reserved name")
    score = pool.scores(s)
    score_c = score - score.mean(1, keepdims=True)
    out[name] = bon_result(name, ns, bon_lib.per_prompt(score, gold_c, ns),
                           bon_lib.per_prompt(score, score_c, ns), kind=pool.kind(s),
                           members=pool.members(s), objective=pool.objective_name(s),
                           within_prompt_corr=_within_prompt_corr(score, pool.gold),
                           alpha=alpha, power=power)
  return out


def _order(names, kinds) -> list[str]:
  return sorted(names, key=lambda n: (_KIND_ORDER.get(kinds[n], len(_KIND_ORDER)), n))


def bon_table(bon: dict[str, BonResult]) -> pd.DataFrame:
  """Per selector and ``n``: ``kl, sqrt_kl, gold, gold_se, proxy, proxy_se`` (the curves)."""
  rows = []
  for name in _order(bon, {k: b.kind for k, b in bon.items()}):
    b = bon[name]
    for k in range(b.n.size):
      rows.append({"selector": name, "kind": b.kind, "n": int(b.n[k]), "kl": b.kl[k],
                   "sqrt_kl": b.sqrt_kl[k], "gold": b.gold[k], "gold_se": b.gold_se[k],
                   "proxy": b.proxy[k], "proxy_se": b.proxy_se[k]})
  return pd.DataFrame(rows)


def _fit_cols(fit: gao.GaoFit | None, d_max: float) -> dict:
  keys = ("alpha", "alpha_se", "beta", "beta_se", "d_peak", "d_peak_se", "r_peak", "chi2_red")
  if fit is None:
    return {f"gao_{k}": float("nan") for k in keys} | {"gao_peak_inside": False}
  return {f"gao_{k}": float(getattr(fit, k)) for k in keys} | {
      "gao_peak_inside": bool(fit.has_peak and fit.d_peak <= d_max)}


def bon_tests(bon: dict[str, BonResult], alpha: float = inference.ALPHA) -> pd.DataFrame:
  """Per selector: held-out peak and fall, the proxy's rise over the same range, the Gao fit."""
  crit = inference.normal_quantile(1 - alpha)
  rows = []
  for name in _order(bon, {k: b.kind for k, b in bon.items()}):
    b = bon[name]
    t, r = b.peak, b.proxy_rise
    rows.append({"selector": name, "kind": b.kind, "objective": b.objective,
                 "members": "+".join(b.members), "within_prompt_corr": b.within_prompt_corr,
                 "peak_n": int(b.n[t.peak_index]), "kl_at_peak": float(b.kl[t.peak_index]),
                 "end_n": int(b.n[t.end_index]), "kl_end": float(b.kl[t.end_index]),
                 "peak_gold": t.peak_gold, "end_gold": t.end_gold, "drop": t.drop, "drop_se": t.se,
                 "drop_z": t.z, "p": t.p, "mde": t.mde, "falls": t.falls,
                 "falls_3se": bool(np.isfinite(t.z) and t.z >= BAR_Z),
                 "proxy_rise": r.diff, "proxy_rise_se": r.se, "proxy_rise_z": r.z,
                 "proxy_rises": bool(np.isfinite(r.z) and r.z >= crit), "n_measure": t.n_measure,
                 **_fit_cols(b.fit, float(b.sqrt_kl[-1]))})
  return pd.DataFrame(rows)


# ---------------------------------------------------------------------- RL
@dataclasses.dataclass
class RlResult:
  """RL members against proxies: trajectories, per-member tests and the per-prompt matrices.

  Attributes:
    trajectories: per member and eval step: ``member, family, kind, beta`` (the KL
      coefficient), ``seed, lr, step, kl, sqrt_kl, gold, gold_se, proxy, proxy_se``.
    tests: per member: the held-out peak test
      (:func:`gpo_jax.analysis.evidence.member_peak_tests`), the Gao RL fit (``gao_*``) and
      the proxy's rise from the peak step to the end step on the measuring prompts.
    steps: ``[S]`` steps with per-prompt results (empty without ``per_prompt/``).
    gold, proxy: ``[S, M, E]`` per-prompt gold and proxy rewards (None when absent).
  """
  trajectories: pd.DataFrame
  tests: pd.DataFrame
  steps: np.ndarray
  gold: np.ndarray | None
  proxy: np.ndarray | None


def _kind_of(family: str, kinds: dict | None) -> str:
  if kinds and family in kinds:
    return kinds[family]
  return "ensemble" if "/" in family else "single"


def rl_curves(run: Run, kinds: dict[str, str] | None = None, *, alpha: float = inference.ALPHA,
              power: float = inference.POWER) -> RlResult:
  """Per RL member: its gold and proxy trajectory, held-out peak-and-fall test, Gao RL fit, proxy rise.

  Args:
    run: the loaded RL run (``family`` = the selector a member optimises).
    kinds: ``{selector: kind}`` (:data:`SELECTOR_KINDS`; default: a ``/`` in the name means
      ensemble, else single).
    alpha, power: of the tests.
  """
  valid = run.valid.sort_values(["member", "step"], kind="stable")
  traj = pd.DataFrame({
      "member": valid["member"].astype(int), "family": valid["family"],
      "kind": [_kind_of(f, kinds) for f in valid["family"]],
      **{c: valid[c] if c in valid else np.nan for c in ("beta", "seed", "lr", "step", "kl", "sqrt_kl")},
      "gold": valid["gold/reward"],
      "gold_se": valid["gold/reward_se"] if "gold/reward_se" in valid else np.nan,
      "proxy": valid["proxy/reward"] if "proxy/reward" in valid else np.nan,
      "proxy_se": valid["proxy/reward_se"] if "proxy/reward_se" in valid else np.nan,
  }).reset_index(drop=True)
  try:
    steps, gold = run.prompt_matrix("gold/reward")
  except KeyError:
    steps, gold = np.zeros(0, np.int64), None
  proxy = None
  if gold is not None:
    try:
      psteps, proxy = run.prompt_matrix("proxy/reward")
      if not np.array_equal(psteps, steps):
        proxy = None
    except KeyError:
      proxy = None
  tests = evidence.member_peak_tests(run, alpha=alpha, power=power)
  fits = evidence.member_gao_fits(run.valid, "rl")
  if not tests.empty:
    tests.insert(2, "kind", [_kind_of(f, kinds) for f in tests["family"]])
    if not fits.empty:
      fit_cols = {"alpha": "gao_alpha", "alpha_se": "gao_alpha_se", "beta_fit": "gao_beta",
                  "beta_fit_se": "gao_beta_se", "d_peak": "gao_d_peak", "d_peak_se": "gao_d_peak_se",
                  "peak_inside": "gao_peak_inside", "chi2_red": "gao_chi2_red"}
      tests = tests.merge(fits[["member", *fit_cols]].rename(columns=fit_cols), on="member", how="left")
    crit = inference.normal_quantile(1 - alpha)
    rises = []
    for _, r in tests.iterrows():
      if proxy is None:
        rises.append((float("nan"),) * 3)
        continue
      _, mea = inference.split_halves(proxy.shape[-1])
      i_pk = int(np.flatnonzero(steps == int(r["peak_step"]))[0])
      i_end = int(np.flatnonzero(steps == int(r["end_step"]))[0])
      m = int(r["member"])
      t = inference.paired(proxy[i_end, m, mea], proxy[i_pk, m, mea])
      rises.append((t.diff, t.se, t.z))
    tests["proxy_rise"], tests["proxy_rise_se"], tests["proxy_rise_z"] = (
        np.array([x[k] for x in rises], float) for k in range(3))
    tests["proxy_rises"] = tests["proxy_rise_z"] >= crit
    tests["falls_3se"] = tests["drop_z"] >= BAR_Z
    tests = tests.sort_values("member", kind="stable").reset_index(drop=True)
  return RlResult(trajectories=traj, tests=tests, steps=steps, gold=gold, proxy=proxy)


# ---------------------------------------------------------------------- proxy size and data
@dataclasses.dataclass
class PeakVsProxy:
  """Best-of-n peaks of single-proxy selectors against the proxy's size and data.

  Attributes:
    selectors: per single-proxy selector: the proxy's fields, held-out peak (``n``, KL, gold),
      the drop, the Gao fit's ``d*``.
    groups: per ``(n_layers, data_size, labels, label_noise)``, averaged over seeds.
    tests: per factor (``data_size``, ``n_layers``) and adjacent pair of its values with the
      other fields fixed: held-out peak gold (larger − smaller, paired over the measuring
      prompts) and Gao ``d*`` (difference with a prompt-bootstrap SE and interval).
  """
  selectors: pd.DataFrame
  groups: pd.DataFrame
  tests: pd.DataFrame


def _group_key_str(keys, values) -> str:
  return ", ".join(f"{k}={fmt(v) if isinstance(v, (int, float, np.integer, np.floating)) else v}"
                   for k, v in zip(keys, values))


def _boot_d_peak(bs: list[BonResult], idx: np.ndarray) -> float:
  """Mean over the selectors of the Gao BoN ``d*`` refitted on the prompts ``idx``."""
  vals = []
  for b in bs:
    mean, se = _mean_se(b.gold_ExK[idx])
    fit = _fit("bon", b.sqrt_kl, mean, se)
    if fit is None or not fit.has_peak:
      return float("nan")
    vals.append(fit.d_peak)
  return float(np.mean(vals))


def peak_vs_proxy(bon: dict[str, BonResult], proxies: pd.DataFrame, *,
                  alpha: float = inference.ALPHA, power: float = inference.POWER,
                  bootstrap_reps: int = 200, seed: int = 0) -> PeakVsProxy:
  """Does a larger proxy / more proxy data move best-of-n's gold peak up (height) and right (KL)?

  Up: for two groups of proxies that differ in one factor only, the per-prompt gold at
  each selector's own held-out peak ``n``, averaged over the group's seeds, is compared on
  the measuring prompts (the peaks were chosen on the others), larger − smaller, paired.
  Right: the Gao best-of-n ``d*`` (mean over seeds); its difference gets a prompt-bootstrap
  SE (the same resample for both groups; BoN points at different ``n`` share samples, so
  the fit's own SE, which treats them as independent, would be too small).

  Only reward-model proxies take part (selector kind ``single`` and, where the table has
  one, ``kind`` :data:`REWARD_MODEL`): implicit rewards have no grid of proxy sizes.

  Args:
    bon: :func:`bon_curves` results.
    proxies: :func:`proxy_table` (names, ``kind``, ``n_layers``, ``data_size``, ``labels``, ...).
    alpha, power: of the tests.
    bootstrap_reps, seed: of the ``d*`` bootstrap.
  """
  info = proxies.set_index("name") if not proxies.empty else pd.DataFrame()
  if "kind" in info.columns:
    info = info[info["kind"].fillna(REWARD_MODEL) == REWARD_MODEL]
  singles = [b for name, b in sorted(bon.items()) if b.kind == "single" and len(b.members) == 1
             and b.members[0] in info.index and all(k in info.columns for k in GROUP_KEYS)]
  sel_rows = []
  for b in singles:
    pr, t = info.loc[b.members[0]], b.peak
    sel_rows.append({"selector": b.selector, **{k: pr[k] for k in GROUP_KEYS}, "seed": pr.get("seed"),
                     "peak_n": int(b.n[t.peak_index]), "kl_at_peak": float(b.kl[t.peak_index]),
                     "peak_gold": t.peak_gold, "end_gold": t.end_gold, "drop": t.drop,
                     "drop_z": t.z, "gao_d_peak": b.fit.d_peak if b.fit else float("nan"),
                     "gao_d_peak_se": b.fit.d_peak_se if b.fit else float("nan"),
                     "gao_r_peak": b.fit.r_peak if b.fit else float("nan")})
  selectors = pd.DataFrame(sel_rows)
  if selectors.empty:
    return PeakVsProxy(selectors, pd.DataFrame(), pd.DataFrame())
  e = singles[0].gold_ExK.shape[0]
  _, mea = inference.split_halves(e)
  by_name = {b.selector: b for b in singles}
  groups, vecs, members = [], {}, {}
  for key, g in selectors.groupby(list(GROUP_KEYS), sort=True):
    bs = [by_name[s] for s in g["selector"]]
    v = np.mean([b.gold_ExK[mea, b.peak.peak_index] for b in bs], axis=0)
    vecs[key], members[key] = v, bs
    d = g["gao_d_peak"].to_numpy(float)
    groups.append({**dict(zip(GROUP_KEYS, key)), "seeds": len(g), "peak_gold": float(v.mean()),
                   "peak_gold_se": float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan"),
                   "kl_at_peak": float(g["kl_at_peak"].mean()),
                   "peak_n_geomean": float(np.exp(np.log(g["peak_n"].to_numpy(float)).mean())),
                   "gao_d_peak": float(d.mean()) if np.all(np.isfinite(d)) else float("nan"),
                   "no_interior_peak": int(np.sum(~np.isfinite(d))), "drop": float(g["drop"].mean())})
  groups = pd.DataFrame(groups)
  tests = []
  for factor in ("data_size", "n_layers"):
    others = [k for k in GROUP_KEYS if k != factor]
    for fixed, g in groups.groupby(others, sort=True):
      vals = sorted(g[factor].unique())
      for lo, hi in zip(vals[:-1], vals[1:]):
        k_lo = next(k for k in vecs if k[GROUP_KEYS.index(factor)] == lo
                    and all(k[GROUP_KEYS.index(o)] == f for o, f in zip(others, fixed)))
        k_hi = next(k for k in vecs if k[GROUP_KEYS.index(factor)] == hi
                    and all(k[GROUP_KEYS.index(o)] == f for o, f in zip(others, fixed)))
        t = inference.paired(vecs[k_hi], vecs[k_lo])
        g_lo, g_hi = (g[g[factor] == v].iloc[0] for v in (lo, hi))
        stat = lambda idx, a=members[k_hi], b=members[k_lo]: _boot_d_peak(a, idx) - _boot_d_peak(b, idx)  # noqa: E731
        ds = stat(np.arange(e))
        lo_ci, hi_ci, reps = inference.bootstrap_prompts(stat, e, reps=bootstrap_reps, seed=seed,
                                                         level=1 - 2 * alpha)
        ok = reps[np.isfinite(reps)]
        ds_se = float(ok.std(ddof=1)) if ok.size >= max(2, bootstrap_reps // 2) else float("nan")
        tests.append({"factor": factor, "fixed": _group_key_str(others, fixed), "small": lo,
                      "large": hi, "seeds_small": int(g_lo["seeds"]), "seeds_large": int(g_hi["seeds"]),
                      "peak_small": float(vecs[k_lo].mean()), "peak_large": float(vecs[k_hi].mean()),
                      "diff": t.diff, "se": t.se, "z": t.z, "p": t.p, "mde": t.mde, "n": t.n,
                      "kl_peak_small": float(g_lo["kl_at_peak"]), "kl_peak_large": float(g_hi["kl_at_peak"]),
                      "d_peak_small": float(g_lo["gao_d_peak"]), "d_peak_large": float(g_hi["gao_d_peak"]),
                      "d_peak_diff": ds, "d_peak_diff_se": ds_se,
                      "d_peak_z": ds / ds_se if np.isfinite(ds) and ds_se > 0 else float("nan"),
                      "d_peak_lo": lo_ci, "d_peak_hi": hi_ci,
                      "d_peak_mde": inference.min_detectable(ds_se, alpha, power)})
  return PeakVsProxy(selectors.sort_values("selector", kind="stable").reset_index(drop=True),
                     groups, pd.DataFrame(tests))


# ---------------------------------------------------------------------- ensembles
def ensembles_vs_singles(bon: dict[str, BonResult], *, alpha: float = inference.ALPHA,
                         power: float = inference.POWER) -> pd.DataFrame:
  """Each ensemble selector against the mean of its members' single-proxy selectors.

  On the measuring prompts (every selector's peak ``n`` was chosen on the others), per
  prompt: the ensemble's gold at its peak minus the singles' mean gold at their own peaks
  (``peak_gain``), the singles' mean fall (peak − largest ``n``) minus the ensemble's
  (``fall_reduction``: positive = the ensemble falls less, Coste et al.'s claim), and the
  gold at the largest ``n`` (``end_gain``). Each is a paired z-test with its MDE. Ensembles
  none of whose members has a single selector in the pool are skipped.
  """
  singles = {b.members[0]: b for b in bon.values() if b.kind in _ONE_PROXY and len(b.members) == 1}
  rows = []
  for name in sorted(n for n, b in bon.items() if b.kind == "ensemble"):
    b = bon[name]
    ss = [singles[m] for m in b.members if m in singles]
    if not ss:
      continue
    _, mea = inference.split_halves(b.gold_ExK.shape[0])

    def at(x, end=False):
      return x.gold_ExK[mea, x.peak.end_index if end else x.peak.peak_index]

    e_pk, e_end = at(b), at(b, True)
    s_pk = np.mean([at(s) for s in ss], axis=0)
    s_end = np.mean([at(s, True) for s in ss], axis=0)
    gain = inference.paired(e_pk, s_pk)
    red = inference.paired(s_pk - s_end, e_pk - e_end)
    end = inference.paired(e_end, s_end)
    rows.append({"selector": name, "objective": b.objective, "members": "+".join(b.members),
                 "n_members": len(b.members), "n_singles": len(ss),
                 "ens_peak_n": int(b.n[b.peak.peak_index]),
                 "singles_peak_n": "/".join(str(int(s.n[s.peak.peak_index])) for s in ss),
                 "ens_peak_gold": float(e_pk.mean()), "singles_peak_gold": float(s_pk.mean()),
                 "peak_gain": gain.diff, "peak_gain_se": gain.se, "peak_gain_z": gain.z,
                 "peak_gain_mde": gain.mde,
                 "ens_fall": float((e_pk - e_end).mean()), "singles_fall": float((s_pk - s_end).mean()),
                 "fall_reduction": red.diff, "fall_reduction_se": red.se, "fall_reduction_z": red.z,
                 "fall_reduction_p": red.p, "fall_reduction_mde": red.mde,
                 "end_gain": end.diff, "end_gain_se": end.se, "end_gain_z": end.z, "n": red.n})
  return pd.DataFrame(rows)


def ensembles_vs_singles_rl(rl: RlResult, pool: Pool, *, alpha: float = inference.ALPHA,
                            power: float = inference.POWER) -> pd.DataFrame:
  """Each RL member against an ensemble selector vs the RL members against its proxies alone (Coste et al. under RL).

  An ensemble member (selector kind ``"ensemble"``, e.g. ``<ens>/wco``) is compared with the
  single-proxy members at the same KL coefficient (``beta``) and seed whose proxy the
  ensemble contains (the pool's selector mask, :meth:`Pool.members`); with several such
  members, with their per-prompt mean. Every member has its own held-out peak step (chosen
  on the even prompts, :func:`gpo_jax.analysis.evidence.member_peak_tests`) and end step (its
  largest-KL step); on the measuring prompts, per prompt: the ensemble member's gold at its
  peak minus the singles' at theirs (``peak_gain``), the singles' fall (peak − end) minus
  the ensemble member's (``fall_reduction``: positive = the ensemble falls less), and the
  gold at the end steps (``end_gain``). Each is a paired z-test with its one-sided p and
  minimum detectable effect. At one ``beta`` the members need not reach the same KL, so
  the end KLs (``ens_kl_end``, ``singles_kl_end``) are reported next to the falls.

  Args:
    rl: :func:`rl_curves` (its ``tests`` need ``kind``, ``beta`` and ``seed``).
    pool: the pool whose selectors the members optimise.
    alpha, power: of the tests' minimum detectable effects.

  Returns:
    One row per ensemble member with at least one matching single member, in member order;
    empty without per-prompt gold.
  """
  t = rl.tests
  if rl.gold is None or t.empty or not {"kind", "beta", "seed"} <= set(t.columns):
    return pd.DataFrame()
  index = {name: s for s, name in enumerate(pool.selector_names)}
  _, mea = inference.split_halves(rl.gold.shape[-1])

  def at(r, which: str) -> np.ndarray:
    i = int(np.flatnonzero(rl.steps == int(r[f"{which}_step"]))[0])
    return rl.gold[i, int(r["member"]), mea]

  singles = t[t["kind"].isin(list(_ONE_PROXY))]
  rows = []
  for _, r in t[t["kind"] == "ensemble"].iterrows():
    if r["family"] not in index:
      continue
    s = index[r["family"]]
    members = pool.members(s)
    ss = singles[singles["family"].isin(members) & (singles["beta"] == r["beta"])
                 & (singles["seed"] == r["seed"])]
    if ss.empty:
      continue
    e_pk, e_end = at(r, "peak"), at(r, "end")
    s_pk = np.mean([at(q, "peak") for _, q in ss.iterrows()], axis=0)
    s_end = np.mean([at(q, "end") for _, q in ss.iterrows()], axis=0)
    gain = inference.paired(e_pk, s_pk)
    red = inference.paired(s_pk - s_end, e_pk - e_end)
    end = inference.paired(e_end, s_end)
    rows.append({"member": int(r["member"]), "selector": r["family"],
                 "objective": pool.objective_name(s), "members": "+".join(members),
                 "beta": float(r["beta"]), "seed": r["seed"], "n_singles": len(ss),
                 "single_members": "/".join(str(int(m)) for m in ss["member"]),
                 "single_selectors": "/".join(ss["family"]),
                 "ens_peak_step": float(r["peak_step"]), "ens_end_step": float(r["end_step"]),
                 "ens_kl_at_peak": float(r["kl_at_peak"]), "ens_kl_end": float(r["kl_end"]),
                 "singles_kl_at_peak": float(ss["kl_at_peak"].mean()),
                 "singles_kl_end": float(ss["kl_end"].mean()),
                 "ens_peak_gold": float(np.nanmean(e_pk)), "singles_peak_gold": float(np.nanmean(s_pk)),
                 "peak_gain": gain.diff, "peak_gain_se": gain.se, "peak_gain_z": gain.z,
                 "peak_gain_p": gain.p, "peak_gain_mde": inference.min_detectable(gain.se, alpha, power),
                 "ens_fall": float(np.nanmean(e_pk - e_end)), "singles_fall": float(np.nanmean(s_pk - s_end)),
                 "fall_reduction": red.diff, "fall_reduction_se": red.se, "fall_reduction_z": red.z,
                 "fall_reduction_p": red.p,
                 "fall_reduction_mde": inference.min_detectable(red.se, alpha, power),
                 "end_gain": end.diff, "end_gain_se": end.se, "end_gain_z": end.z, "n": red.n})
  return pd.DataFrame(rows)


# ---------------------------------------------------------------------- BoN vs RL
@dataclasses.dataclass
class BonVsRl:
  """Best-of-n against RL at equal KL.

  Attributes:
    points: per RL member eval point with ``kl > 0``: the BoN gold of the member's selector
      at the member's KL (interpolated per prompt, linear in sqrt KL), the RL gold, the
      paired difference (BoN − RL) over the common prompts; ``in_range`` False where the
      KL lies beyond the BoN grid (no comparison).
    summary: per selector and point (``peak``: each member's held-out peak step, measured
      on the measuring prompts; ``end``: its largest-KL step, all prompts): BoN − RL per
      prompt averaged over the selector's members, paired test; plus counts over all
      in-range points.
  """
  points: pd.DataFrame
  summary: pd.DataFrame


def interp_sqrt_kl(b: BonResult, d: float) -> np.ndarray:
  """Per-prompt BoN gold ``[E]`` at sqrt KL ``d`` (linear between the neighbouring ``n``); NaN outside the grid."""
  x = b.sqrt_kl
  if not x[0] <= d <= x[-1]:
    return np.full(b.gold_ExK.shape[0], np.nan)
  j = int(np.clip(np.searchsorted(x, d, side="right") - 1, 0, x.size - 2))
  w = (d - x[j]) / (x[j + 1] - x[j])
  return (1 - w) * b.gold_ExK[:, j] + w * b.gold_ExK[:, j + 1]


def bon_vs_rl(bon: dict[str, BonResult], rl: RlResult, *, alpha: float = inference.ALPHA,
              power: float = inference.POWER) -> BonVsRl:
  """KL efficiency: BoN gold minus RL gold at each RL member's KL, paired per prompt.

  RL evaluates the first ``n_prompts`` eval prompts and the pool the same leading prompts,
  so the common prompts are the leading ``min(E_rl, E_pool)``. The member's KL is its
  sampled mean; its noise (``kl_se``) is not propagated.
  """
  empty = BonVsRl(pd.DataFrame(), pd.DataFrame())
  if rl.gold is None or rl.trajectories.empty:
    return empty
  crit = inference.normal_quantile(1 - alpha)
  peaks = rl.tests.set_index("member") if not rl.tests.empty else pd.DataFrame()
  rows, vecs = [], {}
  for m, g in rl.trajectories.groupby("member", sort=True):
    fam = g["family"].iloc[0]
    if fam not in bon:
      continue
    b = bon[fam]
    e = min(b.gold_ExK.shape[0], rl.gold.shape[-1])
    _, mea = inference.split_halves(e)
    pk = peaks.loc[m] if m in peaks.index else None
    for _, r in g.iterrows():
      if not r["kl"] > 0 or not np.any(rl.steps == int(r["step"])):
        continue
      si = int(np.flatnonzero(rl.steps == int(r["step"]))[0])
      d = float(r["sqrt_kl"])
      bon_v, rl_v = interp_sqrt_kl(b, d)[:e], rl.gold[si, int(m), :e]
      point = ("peak" if pk is not None and int(r["step"]) == int(pk["peak_step"]) else "")
      point = ("end" if pk is not None and int(r["step"]) == int(pk["end_step"]) else point)
      in_range = bool(np.all(np.isfinite(bon_v)))
      t = inference.paired(bon_v, rl_v) if in_range else inference.Paired(*(float("nan"),) * 4, 0, float("nan"))
      rows.append({"member": int(m), "family": fam, "beta": float(r["beta"]), "seed": r["seed"],
                   "step": int(r["step"]), "kl": float(r["kl"]), "sqrt_kl": d, "point": point,
                   "in_range": in_range, "bon_gold": float(np.nanmean(bon_v)) if in_range else float("nan"),
                   "rl_gold": float(np.nanmean(rl_v)), "diff": t.diff, "se": t.se, "z": t.z, "p": t.p,
                   "mde": t.mde, "n": t.n})
      if in_range and pk is not None:
        if int(r["step"]) == int(pk["peak_step"]):
          vecs.setdefault((fam, "peak"), []).append(((bon_v - rl_v)[mea], float(r["kl"])))
        if int(r["step"]) == int(pk["end_step"]):
          vecs.setdefault((fam, "end"), []).append((bon_v - rl_v, float(r["kl"])))
  points = pd.DataFrame(rows)
  if points.empty:
    return empty
  summary = []
  for fam in sorted(points["family"].unique()):
    pts = points[(points["family"] == fam) & points["in_range"]]
    for at in ("peak", "end"):
      vs = vecs.get((fam, at), [])
      base = {"selector": fam, "at": at, "members": len(vs),
              "mean_kl": float(np.mean([k for _, k in vs])) if vs else float("nan"),
              "n_points": len(pts), "n_bon_better": int((pts["z"] >= crit).sum()),
              "n_rl_better": int((pts["z"] <= -crit).sum()),
              "n_out_of_range": int((~points[points["family"] == fam]["in_range"]).sum())}
      if vs:
        diff = np.mean([v for v, _ in vs], axis=0)
        t = inference.paired(diff, np.zeros_like(diff))
        base.update({"diff": t.diff, "se": t.se, "z": t.z, "p": t.p, "mde": t.mde, "n": t.n})
      else:
        base.update({k: float("nan") for k in ("diff", "se", "z", "p", "mde")} | {"n": 0})
      summary.append(base)
  return BonVsRl(points.sort_values(["member", "step"], kind="stable").reset_index(drop=True),
                 pd.DataFrame(summary))
