"""Tests of the proxy analysis (gpo_jax.analysis.proxy, proxy_evidence, proxy_findings): best-of-n estimates against brute force, peak-and-fall detection, ensembles, BoN vs RL, the report."""

import dataclasses
import itertools
import json
import math
import pathlib
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from gpo_jax.analysis import inference, proxy
from gpo_jax.analysis import proxy_evidence as pev
from gpo_jax.analysis import proxy_findings as pfind
from gpo_jax.analysis.__main__ import main as analysis_main
from gpo_jax.analysis.findings import NOT_SUPPORTED, SUPPORTED, Thresholds
from gpo_jax.analysis.table import load_run
from gpo_jax.evaluation import bon as bon_lib


def _heavy_tailed_pool(seed=0, e=128, n=256, df=1.5, scale=0.5, names=("p",), ens=None):
  """Gold ~ N(0, 1) per sample (plus a prompt effect); each proxy = gold + scale·t(df) noise, independent of gold."""
  rng = np.random.default_rng(seed)
  gold = rng.normal(size=(e, n)) + rng.normal(0, 0.5, (e, 1))
  noise = rng.standard_t(df, size=(len(names), e, n)) * scale
  return pev.make_pool(gold, gold[None] + noise, list(names), ens)


# ---------------------------------------------------------------------- (i) Goodhart under heavy tails
def test_heavy_tailed_proxy_peaks_and_falls_and_oracle_does_not():
  pool = _heavy_tailed_pool()
  bon = pev.bon_curves(pool)
  b, oracle = bon["p"], bon[pev.ORACLE]
  # Gao et al.'s Figure 1: the proxy-selected gold peaks at moderate n and falls after it,
  # while the proxy itself keeps rising (extremal Goodhart: the largest proxy scores are noise).
  assert b.peak.z >= pev.BAR_Z, b.peak
  assert b.peak.falls and b.n[b.peak.peak_index] < b.n[-1]
  assert b.proxy_rise.z >= pev.BAR_Z, b.proxy_rise
  assert np.all(np.diff(b.proxy) > 0)
  # Best-of-n by gold is monotone in n per prompt: the oracle ceiling never falls.
  assert not oracle.peak.falls and oracle.peak.drop <= 1e-12
  assert np.all(np.diff(oracle.gold) >= -1e-12)
  assert np.all(oracle.gold >= b.gold - 1e-12)
  tests = pev.bon_tests(bon)
  f = pfind.bon_finding(tests, Thresholds(), pool.size)
  assert f.verdict == SUPPORTED, f.text
  assert "does not fall" in f.text


def test_proxy_equal_to_gold_shows_no_fall():
  rng = np.random.default_rng(1)
  gold = rng.normal(size=(128, 256))
  pool = pev.make_pool(gold, gold[None].copy(), ["exact"])
  b = pev.bon_curves(pool)["exact"]
  assert not b.peak.falls
  assert b.peak.drop <= 1e-12
  np.testing.assert_allclose(b.gold, b.proxy, atol=1e-12)
  f = pfind.bon_finding(pev.bon_tests(pev.bon_curves(pool)), Thresholds(), pool.size)
  assert f.verdict == NOT_SUPPORTED, f.text


def test_held_out_bon_fall_test_keeps_its_level_on_an_uninformative_proxy():
  # Proxy independent of gold: best-of-n gold is flat in n, so a "fall" is a false positive.
  # The n-points share pool samples; choosing the peak on other prompts keeps the rate at α.
  rng = np.random.default_rng(4)
  ns = pev.default_ns(16)
  falls = []
  for _ in range(300):
    gold, score = rng.normal(size=(32, 16)), rng.normal(size=(32, 16))
    b = pev.bon_result("noise", ns, bon_lib.per_prompt(score, gold - gold.mean(1, keepdims=True), ns),
                         bon_lib.per_prompt(score, score - score.mean(1, keepdims=True), ns))
    falls.append(b.peak.falls)
  assert np.mean(falls) < 0.09, np.mean(falls)   # α = 0.05; 0.09 is ~3 binomial SEs above it


# ---------------------------------------------------------------------- (ii) brute force
def _brute_force(select_ExN, measure_ExN, n):
  """Mean of ``measure`` at the argmax of ``select`` over every n-subset, per prompt."""
  e, big_n = select_ExN.shape
  out = np.zeros(e)
  for p in range(e):
    vals = [measure_ExN[p, list(c)[int(np.argmax(select_ExN[p, list(c)]))]]
            for c in itertools.combinations(range(big_n), n)]
    out[p] = np.mean(vals)
  return out


def test_bon_curves_equal_brute_force_for_singles_and_ensembles():
  rng = np.random.default_rng(2)
  e, n_pool = 3, 6
  gold = rng.normal(size=(e, n_pool))
  proxies = gold[None] + rng.normal(size=(3, e, n_pool))
  pool = pev.make_pool(gold, proxies, ["a", "b", "c"], {"abc": ["a", "b", "c"], "ab": ["a", "b"]},
                         uwo_lambda=0.5)
  ns = list(range(1, n_pool + 1))
  bon = pev.bon_curves(pool, ns)
  gold_c = gold - gold.mean(1, keepdims=True)
  # Selector scores by hand (not through ensembles.combine): min, and mean − λ·Var (ddof 0).
  by_hand = {"a": proxies[0], "b": proxies[1], "c": proxies[2],
             "abc/mean": proxies.mean(0), "abc/wco": proxies.min(0),
             "abc/uwo": proxies.mean(0) - 0.5 * proxies.var(0),
             "ab/wco": proxies[:2].min(0), "ab/uwo": proxies[:2].mean(0) - 0.5 * proxies[:2].var(0),
             pev.ORACLE: gold}
  for name, score in by_hand.items():
    score_c = score - score.mean(1, keepdims=True)
    for k, n in enumerate(ns):
      np.testing.assert_allclose(bon[name].gold_ExK[:, k], _brute_force(score, gold_c, n),
                                 atol=1e-12, err_msg=f"{name} gold, n={n}")
      np.testing.assert_allclose(bon[name].proxy_ExK[:, k], _brute_force(score, score_c, n),
                                 atol=1e-12, err_msg=f"{name} proxy, n={n}")
  assert bon["abc/wco"].kind == "ensemble" and bon["a"].kind == "single"
  np.testing.assert_allclose(bon["a"].kl, bon_lib.kl_bon(np.array(ns)))
  np.testing.assert_array_equal(pev.default_ns(6), [1, 2, 4, 6])
  np.testing.assert_array_equal(pev.default_ns(64), [1, 2, 4, 8, 16, 32, 64])


# ---------------------------------------------------------------------- (iii) ensembles
def test_wco_of_independent_noise_proxies_falls_less_than_each_single():
  pool = _heavy_tailed_pool(seed=3, e=64, n=256, names=("a", "b"), ens={"ab": ["a", "b"]})
  bon = pev.bon_curves(pool)
  ens = pev.ensembles_vs_singles(bon).set_index("selector")
  crit = inference.normal_quantile(0.95)
  r = ens.loc["ab/wco"]
  assert r["n_singles"] == 2
  # Sign convention: reduction = members' fall − ensemble's fall; positive = WCO falls less.
  assert r["fall_reduction"] > 0 and r["fall_reduction_z"] >= crit, r
  assert r["ens_fall"] < r["singles_fall"]
  for s in ("a", "b"):
    assert bon["ab/wco"].peak.drop < bon[s].peak.drop
  np.testing.assert_allclose(r["fall_reduction"], r["singles_fall"] - r["ens_fall"], atol=1e-12)
  f = pfind.ensemble_finding(pev.ensembles_vs_singles(bon), Thresholds())
  assert f.verdict == SUPPORTED, f.text


# ---------------------------------------------------------------------- synthetic run directories
def _write_rl_run(path, pool, members, steps, gold_SxMxE, proxy_SxMxE, kl_SxM, rm_dirs=()):
  """A run directory as the trainer writes it against proxies: metrics, per_prompt, bon_pool, config."""
  path = pathlib.Path(path)
  (path / "per_prompt").mkdir(parents=True, exist_ok=True)
  rows = []
  e = gold_SxMxE.shape[-1]
  for si, step in enumerate(steps):
    for m, (family, beta, seed) in enumerate(members):
      g, p = gold_SxMxE[si, m], proxy_SxMxE[si, m]
      kl = float(kl_SxM[si, m])
      rows.append({"step": int(step), "member": m, "family": family,
                   "kind": "ensemble" if "/" in family else "single", "beta": beta,
                   "beta_eff": beta, "seed": seed, "lr": 1e-3, "kl": kl, "kl_se": 0.01,
                   "sqrt_kl": math.sqrt(kl), "gold/reward": float(g.mean()),
                   "gold/reward_se": float(g.std(ddof=1) / math.sqrt(e)),
                   "proxy/reward": float(p.mean()),
                   "proxy/reward_se": float(p.std(ddof=1) / math.sqrt(e)), "n_prompts": e,
                   "diverged": False})
    np.savez(path / "per_prompt" / f"{int(step):08d}.npz", prompt__gold__reward=gold_SxMxE[si],
             prompt__proxy__reward=proxy_SxMxE[si], prompt__kl=np.broadcast_to(
                 kl_SxM[si][:, None], gold_SxMxE[si].shape))
  with open(path / "metrics.jsonl", "w") as fh:
    for r in rows:
      fh.write(json.dumps(r) + "\n")
  (path / "config.json").write_text(json.dumps({"algorithm": "rloo",
                                                "proxies": {"paths": [str(d) for d in rm_dirs]}}))
  np.savez(path / pev.POOL_FILE, gold=pool.gold.astype(np.float32),
           proxies=pool.proxies.astype(np.float32),
           response_len=np.full(pool.gold.shape, 6.0, np.float32),
           proxy_names=np.asarray(pool.proxy_names), selector_names=np.asarray(pool.selector_names),
           selector_mask=pool.mask.astype(np.float32),
           selector_objective=pool.objective.astype(np.int32),
           selector_lam=pool.lam.astype(np.float32))
  return path


LAB_HASH, RM_N_PAIRS = "lab0", 250   # the fixtures' lab; untied pairs among its 256 test pairs


def _write_rm_run(path, n_layers, members, kind=None):
  """A reward-model run with an exported proxy set: metrics.jsonl, config.json and proxies/proxies.json."""
  path = pathlib.Path(path)
  (path / "proxies").mkdir(parents=True, exist_ok=True)
  rows, meta = [], []
  for i, (data_size, seed, acc) in enumerate(members):
    fields = {"member": i, "labels": "hard", "seed": seed, "lr": 3e-3, "gamma": 0.0,
              "label_noise": 0.0, "data_size": data_size}
    for step, a in ((0, 0.5), (50, acc)):
      rows.append({"step": step, **fields, "rm/gold_accuracy": a, "rm/gold_accuracy_se": 0.03,
                   "rm/ece": 0.1, "rm/gold_corr": 2 * (a - 0.5), "rm/n_pairs": RM_N_PAIRS,
                   "diverged": False})
    meta.append({**fields, "name": f"L{n_layers}_n{data_size}_hard_s{seed}"})
  with open(path / "metrics.jsonl", "w") as fh:
    for r in rows:
      fh.write(json.dumps(r) + "\n")
  (path / "config.json").write_text(json.dumps(   # the RM evaluator uses all 256 test pairs
      {"algorithm": "reward_model", "eval": {"n_test_pairs": 0}, "lab": {"n_test_pairs": 256}}))
  (path / "proxies" / "proxies.json").write_text(json.dumps(
      {"schema": 1, **({"kind": kind} if kind else {}), "lab_hash": LAB_HASH,
       "model": {"n_layers": n_layers}, "members": meta}))
  return path


IMPLICIT_SPEC = {  # name: (seed, final rewards/gold_accuracies, t-noise scale of its pool scores)
    "implicit_logistic_be0.1_n1024_s0": (0, 0.62, 0.5),
    "implicit_logistic_be0.1_n1024_s1": (1, 0.58, 0.5),
}


def _write_gpo_run(path, n_layers=2, lab_hash=LAB_HASH, n_pairs_key=None):
  """An offline GPO run that exported its policies' implicit rewards (proxies.json kind "implicit")."""
  path = pathlib.Path(path)
  (path / "proxies").mkdir(parents=True, exist_ok=True)
  rows, meta = [], []
  for i, (name, (seed, acc, _)) in enumerate(IMPLICIT_SPEC.items()):
    fields = {"member": i, "family": "logistic", "beta": 0.2, "lr": 3e-4, "seed": seed,
              "gamma": 0.0, "data_size": 1024}
    for step, a in ((0, 0.0), (20, 0.55), (30, acc)):
      rows.append({"step": step, **fields, "beta_eff": 0.10000000149, "kl": step / 100,
                   "gold/reward": 0.01 * step, "rewards/gold_accuracies": a,
                   **({n_pairs_key: 200} if n_pairs_key else {}), "diverged": False})
    meta.append({**fields, "beta_eff": 0.1, "name": name})
  rows.append({**rows[-1], "step": 40, "rewards/gold_accuracies": 0.99, "diverged": True})
  with open(path / "metrics.jsonl", "w") as fh:
    for r in rows:
      fh.write(json.dumps(r) + "\n")
  (path / "config.json").write_text(json.dumps(   # 256 of the lab's 256 test pairs, as the RMs
      {"algorithm": "gpo", "eval": {"n_test_pairs": 256}, "lab": {"n_test_pairs": 256}}))
  (path / "proxies" / "proxies.json").write_text(json.dumps(
      {"schema": 1, "kind": "implicit", "lab_hash": lab_hash, "model": {"n_layers": n_layers},
       "trunk_layers": 0, "members": meta}))
  return path


# ---------------------------------------------------------------------- (iv) BoN vs RL by hand
def test_bon_vs_rl_interpolates_per_prompt_in_sqrt_kl(tmp_path):
  ns = np.array([1, 2, 4])
  d = np.sqrt(bon_lib.kl_bon(ns))
  gold_ExK = np.array([[0.0, 1.0, 2.0], [0.0, 0.5, 0.7], [0.0, 0.2, 0.6], [0.0, 0.4, 0.0],
                       [0.0, 0.3, 0.3], [0.0, 0.1, 0.9]])   # 6 pool prompts
  b = pev.bon_result("sel", ns, gold_ExK, gold_ExK)
  # One RL member on the first 4 prompts; sqrt KL midway between n = 2 and n = 4 at step 10,
  # a quarter of the way at step 20, beyond n = 4 at step 30.
  sq = [0.0, (d[1] + d[2]) / 2, d[1] + 0.25 * (d[2] - d[1]), d[2] + 0.1]
  rl_gold = np.array([[0.0, 0.1, -0.1, 0.0], [2.0, 0.3, 0.1, 0.2], [0.5, 0.2, 0.0, 0.1],
                      [0.4, 0.1, 0.0, 0.3]])                  # [S, E]
  run_dir = _write_rl_run(tmp_path / "rl", pev.make_pool(np.zeros((6, 4)) + np.arange(4), np.zeros((1, 6, 4)), ["sel"]),
                          [("sel", 0.1, 0)], [0, 10, 20, 30], rl_gold[:, None, :],
                          rl_gold[:, None, :] + 1.0, np.array(sq)[:, None] ** 2)
  rl = pev.rl_curves(load_run(run_dir))
  out = pev.bon_vs_rl({"sel": b}, rl)
  pts = out.points.set_index("step")
  assert list(pts.index) == [10, 20, 30]   # KL 0 is not a comparison
  hand = {10: 0.5 * gold_ExK[:4, 1] + 0.5 * gold_ExK[:4, 2] - rl_gold[1],
          20: 0.75 * gold_ExK[:4, 1] + 0.25 * gold_ExK[:4, 2] - rl_gold[2]}
  for step, diff in hand.items():
    assert pts.loc[step, "in_range"]
    assert pts.loc[step, "n"] == 4
    np.testing.assert_allclose(pts.loc[step, "diff"], diff.mean(), atol=1e-12)
    np.testing.assert_allclose(pts.loc[step, "se"], diff.std(ddof=1) / 2, atol=1e-12)
  assert not pts.loc[30, "in_range"] and np.isnan(pts.loc[30, "diff"])
  # The member's held-out peak (chosen on prompts 0, 2) is step 10; measured on prompts 1, 3.
  assert rl.tests.loc[0, "peak_step"] == 10 and rl.tests.loc[0, "end_step"] == 30
  s = out.summary.set_index("at")
  np.testing.assert_allclose(s.loc["peak", "diff"], hand[10][[1, 3]].mean(), atol=1e-12)
  assert s.loc["end", "members"] == 0 and s.loc["end", "n_out_of_range"] == 1
  np.testing.assert_allclose(pev.interp_sqrt_kl(b, d[2]), gold_ExK[:, 2], atol=1e-12)


# ---------------------------------------------------------------------- (v) ensembles under RL
RL_ENS_MEMBERS = [("a", 0.1, 0), ("b", 0.1, 0), ("ab/wco", 0.1, 0),   # the comparison
                  ("c", 0.1, 0),        # a proxy outside the ensemble: not a counterpart
                  ("a", 0.0, 0),        # another β_KL
                  ("a", 0.1, 1),        # another seed
                  ("ab/wco", 0.0, 1)]   # an ensemble member without a counterpart


def _rl_ensemble_run(path, ens_curve, seed=0, e=64, noise=0.2):
  """RL members against single proxies and a WCO ensemble: singles peak at step 20 and fall; the ensemble follows ``ens_curve``."""
  rng = np.random.default_rng(seed)
  steps = np.arange(0, 60, 10)
  single = np.array([0.0, 0.5, 1.0, 0.6, 0.2, -0.2])
  true = np.stack([np.asarray(ens_curve) if "/" in f else single for f, _, _ in RL_ENS_MEMBERS], 1)
  gold = true[:, :, None] + rng.normal(0, noise, (len(steps), len(RL_ENS_MEMBERS), e))
  kl = np.repeat(0.2 * np.arange(len(steps))[:, None], len(RL_ENS_MEMBERS), 1)
  pool = pev.make_pool(rng.normal(size=(e, 8)), rng.normal(size=(3, e, 8)), ["a", "b", "c"],
                       {"ab": ["a", "b"]})
  run_dir = _write_rl_run(path, pool, RL_ENS_MEMBERS, steps, gold, gold + 1.0, kl)
  kinds = {n: pool.kind(i) for i, n in enumerate(pool.selector_names)}
  return pool, pev.rl_curves(load_run(run_dir), kinds), steps, gold


def test_rl_ensemble_member_falls_less_than_its_single_counterparts(tmp_path):
  pool, rl, steps, gold = _rl_ensemble_run(tmp_path / "rl", [0.0, 0.5, 1.0, 0.95, 0.9, 0.85])
  t = pev.ensembles_vs_singles_rl(rl, pool)
  # Only member 2 has counterparts (same β_KL and seed, a proxy of the ensemble): members 0, 1.
  assert list(t["member"]) == [2], t
  r = t.iloc[0]
  assert r["single_members"] == "0/1" and r["single_selectors"] == "a/b" and r["n_singles"] == 2
  assert r["objective"] == "wco" and r["members"] == "a+b"
  # By hand on the measuring prompts, each member from its own held-out peak to its end step.
  _, mea = inference.split_halves(gold.shape[-1])
  tests = rl.tests.set_index("member")

  def fall(m):
    pk, end = (int(np.flatnonzero(steps == tests.loc[m, k])[0]) for k in ("peak_step", "end_step"))
    return gold[pk, m, mea] - gold[end, m, mea]

  diff = (fall(0) + fall(1)) / 2 - fall(2)
  np.testing.assert_allclose(r["fall_reduction"], diff.mean(), atol=1e-12)
  np.testing.assert_allclose(r["fall_reduction_se"], diff.std(ddof=1) / math.sqrt(diff.size), atol=1e-12)
  np.testing.assert_allclose(r["fall_reduction"], r["singles_fall"] - r["ens_fall"], atol=1e-12)
  # Sign convention: positive = the ensemble falls less; true reduction 1.2 − 0.15 (or 0.1).
  crit = inference.normal_quantile(0.95)
  assert r["ens_fall"] < r["singles_fall"]
  assert r["fall_reduction"] > 0.5 and r["fall_reduction_z"] >= crit and r["fall_reduction_p"] < 0.05, r
  assert abs(r["peak_gain_z"]) < 3, r   # both peak at 1.0
  assert r["fall_reduction_mde"] > 0 and r["n"] == mea.size
  f = pfind.ensemble_finding(pd.DataFrame(), Thresholds(), t)
  assert f.verdict == SUPPORTED, f.text
  assert "RL: member 2 (ab/wco" in f.text and "Best-of-n: no WCO/UWO selector" in f.text


def test_rl_ensemble_member_with_the_same_curve_is_not_rejected(tmp_path):
  pool, rl, _, _ = _rl_ensemble_run(tmp_path / "rl", [0.0, 0.5, 1.0, 0.6, 0.2, -0.2], seed=1)
  t = pev.ensembles_vs_singles_rl(rl, pool)
  r = t.iloc[0]
  crit = inference.normal_quantile(0.95)
  assert abs(r["fall_reduction_z"]) < crit and abs(r["peak_gain_z"]) < crit, r
  f = pfind.ensemble_finding(pd.DataFrame(), Thresholds(), t)
  assert f.verdict == NOT_SUPPORTED, f.text
  assert "would not have been detected" in f.text
  # Without RL comparisons (or per-prompt gold) the table is empty and the finding says so.
  assert pev.ensembles_vs_singles_rl(dataclasses.replace(rl, gold=None), pool).empty
  assert pfind.ensemble_finding(pd.DataFrame(), Thresholds(), None).verdict == "inconclusive"


# ---------------------------------------------------------------------- (vi) the report
PROXY_SPEC = {  # name: (n_layers, data_size, seed, noise scale): more data / layers → less noise
    "L1_n256_hard_s0": (1, 256, 0, 0.8), "L1_n256_hard_s1": (1, 256, 1, 0.8),
    "L1_n1024_hard_s0": (1, 1024, 0, 0.35), "L1_n1024_hard_s1": (1, 1024, 1, 0.35),
    "L2_n1024_hard_s0": (2, 1024, 0, 0.2), "L2_n1024_hard_s1": (2, 1024, 1, 0.2),
}


@pytest.fixture(scope="module")
def proxy_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("proxy_run")
  rng = np.random.default_rng(5)
  e, n = 64, 256
  gold = rng.normal(size=(e, n))
  names = list(PROXY_SPEC) + list(IMPLICIT_SPEC)
  scale = {**{k: v[3] for k, v in PROXY_SPEC.items()}, **{k: v[2] for k, v in IMPLICIT_SPEC.items()}}
  noise = np.stack([rng.standard_t(1.5, size=(e, n)) * scale[k] for k in names])
  # The pool file does not say which proxies are implicit rewards: the report reads it from
  # the proxy sets' proxies.json.
  pool = pev.make_pool(gold, gold[None] + noise, names,
                         {"ens": ["L1_n256_hard_s0", "L1_n256_hard_s1"]})
  rm1 = _write_rm_run(root / "rm_l1", 1, [(256, 0, 0.6), (256, 1, 0.61), (1024, 0, 0.7), (1024, 1, 0.71)])
  rm2 = _write_rm_run(root / "rm_l2", 2, [(1024, 0, 0.75), (1024, 1, 0.74)], kind="reward_model")
  gpo = _write_gpo_run(root / "gpo")
  members = [(f, b, 0) for f in ("L1_n256_hard_s0", "ens/wco") for b in (0.0, 0.1)]
  steps = np.arange(0, 60, 10)
  e_rl = 48   # RL evaluates fewer prompts than the pool holds: the common ones are the first 48
  kl = np.array([[0.6 * s / 10 / (1 + 5 * b) for (_, b, _) in members] for s in steps])
  d = np.sqrt(kl)
  true = d * (0.3 - 0.5 * np.log(np.where(d > 0, d, 1.0)))   # Gao RL form, peak at d = exp(-0.4)
  g = true[:, :, None] + rng.normal(0, 0.15, (len(steps), len(members), e_rl))
  p = 0.8 * d[:, :, None] + rng.normal(0, 0.15, (len(steps), len(members), e_rl))
  rl_dir = _write_rl_run(root / "rl", pool, members, steps, g, p, kl, rm_dirs=(rm1, rm2, gpo))
  return rl_dir


def test_analyze_proxy_writes_deterministic_report(proxy_run, tmp_path):
  outs = [tmp_path / "a", tmp_path / "b"]
  reps = [proxy.analyze_proxy(proxy_run, out, figures=False, bootstrap_reps=50) for out in outs]
  rep = reps[0]
  text = rep.path.read_text()
  for heading in ("## Findings", "## Proxies", "## Best-of-n per selector", "## RL members",
                  "## Peak against proxy size and data", "## Ensembles against their members",
                  "## Ensembles against their members under RL", "## Best-of-n against RL at equal KL"):
    assert heading in text, heading
  assert len(rep.findings) == 5 and text.count("### ") == 5
  for f in rep.findings:
    assert f.verdict in ("supported", "not supported", "inconclusive")
    assert f"— **{f.verdict}**" in text
  files = sorted(p.name for p in outs[0].iterdir())
  for name in ("proxy.md", "proxies.csv", "bon.csv", "bon_tests.csv", "rl_tests.csv",
               "peak_vs_proxy.csv", "ensembles.csv", "ensembles_rl.csv", "bon_vs_rl.csv"):
    assert name in files, name
  assert files == sorted(p.name for p in outs[1].iterdir())
  for name in files:
    assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), f"{name} differs between reruns"
  # The proxies come from both RM runs and the GPO run (config.json's proxies.paths), with
  # the pool's correlations; "kind" from proxies.json (absent: reward model).
  pt = rep.proxies.set_index("name")
  assert set(pt.index) == set(PROXY_SPEC) | set(IMPLICIT_SPEC)
  rm, imp = pt.loc[list(PROXY_SPEC)], pt.loc[list(IMPLICIT_SPEC)]
  assert (rm["kind"] == "reward_model").all() and (rm["source"] == "rm run").all()
  assert (imp["kind"] == "implicit").all() and (imp["source"] == "policy run").all()
  assert pt.loc["L2_n1024_hard_s0", "n_layers"] == 2 and pt.loc["L1_n256_hard_s0", "gold_accuracy"] == 0.6
  assert pt.loc["L2_n1024_hard_s0", "within_prompt_corr"] > pt.loc["L1_n256_hard_s0", "within_prompt_corr"]
  # Implicit rewards: layers from proxies.json's model, the loss and β_eff as labels, gold
  # accuracy = the GPO run's final (non-diverged) rewards/gold_accuracies, its binomial SE
  # over the untied pairs of an RM set on the same lab and test pairs; no ECE.
  for name, (seed, acc, _) in IMPLICIT_SPEC.items():
    r = pt.loc[name]
    assert r["n_layers"] == 2 and r["data_size"] == 1024 and r["seed"] == seed
    assert r["labels"] == "logistic β_eff 0.1" and r["family"] == "logistic" and r["beta_eff"] == 0.1
    assert r["gold_accuracy"] == acc and r["rm_step"] == 30 and r["gold_accuracy_n"] == RM_N_PAIRS
    np.testing.assert_allclose(r["gold_accuracy_se"], math.sqrt(acc * (1 - acc) / RM_N_PAIRS))
    assert np.isnan(r["ece"]) and np.isnan(r["label_noise"])
  assert "| implicit_logistic_be0.1_n1024_s0 | implicit | 2 | 1024 | logistic β_eff 0.1 |" in text
  assert "8 proxies from 2 reward-model runs and 1 offline-policy run (`rm_l1`, `rm_l2`, `gpo`)" in text
  assert "(6 single proxy RMs, 3 ensemble objectives, 2 implicit rewards)" in text
  # Best-of-n: the implicit rewards are their own selector kind, listed after the proxy RMs.
  kinds = rep.bon_tests.set_index("selector")["kind"]
  assert (kinds[list(IMPLICIT_SPEC)] == "implicit").all() and (kinds[list(PROXY_SPEC)] == "single").all()
  assert kinds[pev.ORACLE] == "oracle" and list(rep.bon_tests["kind"])[-2:] == ["implicit", "implicit"]
  assert set(rep.bon_table[rep.bon_table["selector"].isin(list(IMPLICIT_SPEC))]["kind"]) == {"implicit"}
  # Peak against proxy size: RM selectors only (implicit rewards have no size/data grid).
  pvp = rep.peak_vs_proxy
  assert set(pvp.selectors["selector"]) == set(PROXY_SPEC) and len(pvp.groups) == 3
  assert pvp.groups["label_noise"].notna().all() and (pvp.groups["seeds"] == 2).all()
  # The BoN finding counts the proxy RMs and reports the implicit rewards as their own class.
  f0 = rep.findings[0].text
  assert "of 9 proxy-RM selectors fall" in f0, f0
  assert "Implicit-reward selectors" in f0 and "of 2 implicit-reward selectors fall" in f0
  assert "the gold-selected oracle ceiling" in f0 and "proxy RMs" in f0 and "implicit rewards implicit_" in f0
  # Both comparisons of proxy scale exist: data 256 → 1024 (1 layer), layers 1 → 2 (1024 pairs).
  t = rep.peak_vs_proxy.tests
  assert set(t["factor"]) == {"data_size", "n_layers"}
  up = t[t["factor"] == "data_size"].iloc[0]
  assert up["diff"] > 0 and up["z"] > inference.normal_quantile(0.95), up
  # The noisy 256-pair proxies fall under best-of-n; the RL view holds 4 members on 48 prompts.
  assert rep.findings[0].verdict == SUPPORTED, rep.findings[0].text
  # The β_KL = 0 members run to sqrt KL 1.7, far past the true RL peak at 0.67: their gold falls.
  assert rep.findings[1].verdict == SUPPORTED, rep.findings[1].text
  np.testing.assert_allclose(rep.rl.tests["gao_d_peak"], math.exp(-0.4), rtol=0.15)
  assert rep.rl.gold.shape[-1] == 48 and len(rep.rl.tests) == 4
  assert set(rep.bon_vs_rl.points["n"].dropna().astype(int)) <= {48}
  # RL: each ens/wco member against the L1_n256_hard_s0 member (a proxy of "ens") at its β_KL.
  er = rep.ensembles_rl
  assert list(er["member"]) == [2, 3] and list(er["single_members"]) == ["0", "1"], er
  assert list(er["beta"]) == [0.0, 0.1] and (er["n"] == 24).all()
  assert "RL: member 2 (ens/wco" in rep.findings[3].text


def test_analyze_proxy_figures(proxy_run, tmp_path):
  rep = proxy.analyze_proxy(proxy_run, tmp_path / "fig", figures=True, bootstrap_reps=20)
  for name in ("proxy_bon_kinds", "proxy_bon", "proxy_rl", "proxy_bon_vs_rl"):
    png = tmp_path / "fig" / "figures" / f"{name}.png"
    assert png.exists() and png.stat().st_size > 1000, name
    assert f"figures/{name}.png" in rep.path.read_text()


def test_proxy_name_parsing_and_missing_rm_runs(proxy_run):
  assert pev.parse_proxy_name("L2_n512_soft_q0.1_s3") == {
      "n_layers": 2, "data_size": 512, "labels": "soft", "label_noise": 0.1, "seed": 3}
  assert pev.parse_proxy_name("not a proxy") == {}
  assert pev.parse_proxy_name("implicit_logistic_be0.1_n1024_s0") == {}
  assert pev.parse_implicit_name("implicit_truncated_quadratic_be0.05_n512_s2") == {
      "family": "truncated_quadratic", "beta_eff": 0.05, "data_size": 512, "seed": 2,
      "labels": "truncated_quadratic β_eff 0.05"}
  assert pev.parse_implicit_name("L1_n256_hard_s0") == {}
  pool = pev.load_pool(proxy_run)
  t = pev.proxy_table(["/nonexistent/rm"], pool).set_index("name")
  assert (t["source"] == "name").all() and set(t.index) == set(PROXY_SPEC) | set(IMPLICIT_SPEC)
  # Implicit names are described as implicit rewards, never through the RM name parser.
  assert (t.loc[list(IMPLICIT_SPEC), "kind"] == "implicit").all()
  assert (t.loc[list(IMPLICIT_SPEC), "labels"] == "logistic β_eff 0.1").all()
  assert t.loc[list(IMPLICIT_SPEC), "n_layers"].isna().all()
  assert (t.loc[list(PROXY_SPEC), "kind"] == "reward_model").all()
  # The pool's selector kinds follow the proxies' kinds; ensembles stay ensembles.
  kp = pev.with_proxy_kinds(pool, t.reset_index())
  kinds = {n: kp.kind(i) for i, n in enumerate(kp.selector_names)}
  assert {kinds[n] for n in IMPLICIT_SPEC} == {"implicit"} and kinds["ens/wco"] == "ensemble"
  assert {pool.kind(i) for i, n in enumerate(pool.selector_names) if n in IMPLICIT_SPEC} == {"single"}


def test_implicit_gold_accuracy_se_needs_the_number_of_untied_pairs(tmp_path):
  gpo = _write_gpo_run(tmp_path / "gpo")
  # Alone: no count of untied pairs, so no SE (n/a), but the accuracy is there.
  t = pev.proxy_table([gpo]).set_index("name")
  assert (t["kind"] == "implicit").all() and t["gold_accuracy_se"].isna().all()
  assert list(t["gold_accuracy"]) == [v[1] for v in IMPLICIT_SPEC.values()]
  # An RM set on another lab does not lend its count.
  rm = _write_rm_run(tmp_path / "rm", 1, [(256, 0, 0.6)])
  other = _write_gpo_run(tmp_path / "gpo_other", lab_hash="another")
  t = pev.proxy_table([rm, other]).set_index("name")
  assert t.loc[list(IMPLICIT_SPEC), "gold_accuracy_se"].isna().all()
  # A count logged by the GPO run itself is used as is.
  logged = _write_gpo_run(tmp_path / "gpo_logged", n_pairs_key="rewards/gold_n_pairs")
  t = pev.proxy_table([rm, logged]).set_index("name")
  acc = IMPLICIT_SPEC["implicit_logistic_be0.1_n1024_s0"][1]
  assert t.loc["implicit_logistic_be0.1_n1024_s0", "gold_accuracy_n"] == 200
  np.testing.assert_allclose(t.loc["implicit_logistic_be0.1_n1024_s0", "gold_accuracy_se"],
                             math.sqrt(acc * (1 - acc) / 200))
  assert pev.proxy_set_kind(logged) == "implicit" and pev.proxy_set_kind(rm) == "reward_model"
  assert pev.proxy_set_kind(tmp_path / "missing") is None


def test_bon_plot_panels_show_every_selector_kind():
  from types import SimpleNamespace

  from gpo_jax.analysis import proxy_plots
  bon = {pev.ORACLE: SimpleNamespace(kind="oracle"),
         **{f"s{i:02d}": SimpleNamespace(kind="single") for i in range(10)},
         **{f"e{i}/wco": SimpleNamespace(kind="ensemble") for i in range(6)},
         **{f"implicit_{i}": SimpleNamespace(kind="implicit") for i in range(2)}}
  names = proxy_plots._selectors(bon)
  assert len(names) == proxy_plots.MAX_PANELS
  assert [bon[n].kind for n in names] == ["single"] * 5 + ["implicit"] * 2 + ["ensemble"] * 5


def test_cli_writes_the_proxy_report_for_a_run_against_proxies(proxy_run, tmp_path, capsys):
  run_dir = tmp_path / "rl"
  shutil.copytree(proxy_run, run_dir)
  assert analysis_main([str(run_dir), "--no-figures"]) == 0
  out = capsys.readouterr().out.splitlines()
  report, proxy_md = run_dir / "report" / "report.md", run_dir / "report" / "proxy.md"
  assert report.exists() and proxy_md.exists()
  # The standard report first, then the proxy report and its five findings.
  assert out.index(str(report)) < out.index(str(proxy_md))
  proxy_lines = out[out.index(str(proxy_md)) + 1:]
  assert len(proxy_lines) == 5 and all(line.startswith("- ") for line in proxy_lines), out
  headings = re.findall(r"^### \d+\. (.*) — \*\*(.*)\*\*$", proxy_md.read_text(), re.M)
  assert proxy_lines == [f"- {q} {v}" for q, v in headings]
  assert not (run_dir / "report" / "figures").exists()
  # A run without a pool gets the standard report only.
  (run_dir / pev.POOL_FILE).unlink()
  shutil.rmtree(run_dir / "report")
  assert analysis_main([str(run_dir), "--no-figures"]) == 0
  assert (run_dir / "report" / "report.md").exists() and not proxy_md.exists()


def test_moved_pipeline_finds_its_proxy_runs_beside_the_rl_run(tmp_path):
  from gpo_jax.analysis import proxy as proxy_report
  (tmp_path / "rl").mkdir()
  (tmp_path / "proxies_L1").mkdir()
  moved = proxy_report._relocated("/gone/elsewhere/proxies_L1", tmp_path / "rl")
  assert moved == str((tmp_path / "proxies_L1").resolve())
  assert proxy_report._relocated(str(tmp_path / "rl"), tmp_path / "rl") == str(tmp_path / "rl")
  assert proxy_report._relocated("/gone/proxies_X", tmp_path / "rl") == "/gone/proxies_X"
