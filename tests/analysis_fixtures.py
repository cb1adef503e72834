"""Synthetic run directories with a known frontier, best β and overoptimisation shape, for analysis tests."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np

from gpo_jax.evaluation import bon

# f''(0)/|f'(0)| per family (SPEC §1); beta_eff = beta * this.
CURVATURE = {"logistic": 0.5, "hinge": 0.0, "squared": 1.0, "exponential": 1.0,
             "truncated_quadratic": 1.0, "savage": 0.5}
# The sweep's grid in beta_eff units (as configs/cpu_sweep.py): family f gets β = grid / c_f
# (hinge, c = 0, as logistic), so when the prediction holds every family samples the same KLs.
BETA_EFFS = (0.0125, 0.025, 0.05, 0.1, 0.2)


def betas_of(family: str) -> tuple[float, ...]:
  return tuple(b / (CURVATURE[family] or 0.5) for b in BETA_EFFS)
STEPS = tuple(range(0, 1001, 100))
KL_SCALE = 0.9   # final KL = KL_SCALE / drive, so drive 0.1 lands on d = 3
GOLD_SE = 0.02
GAO_B = 0.5      # RL-form curvature of the true gold curve
N_PROMPTS = 64   # per-prompt values: gold/reward is their mean, gold/reward_se their SE


def true_gold(d, *, peak: bool, d_star: float = 3.0, r_scale: float = 1.0):
  """Gold vs sqrt-KL: Gao RL form peaking at ``d_star`` (value ``r_scale·GAO_B·d_star``), or a rising line."""
  d = np.asarray(d, float)
  if not peak:
    return r_scale * 0.25 * d
  alpha = GAO_B * (1.0 + math.log(d_star))
  return r_scale * np.where(d > 0, d * (alpha - GAO_B * np.log(np.where(d > 0, d, 1.0))), 0.0)


def drive(family: str, beta: float, aligned: bool) -> float:
  """What sets a member's final KL: beta_eff when the GPO prediction holds (hinge: as logistic), else β."""
  if not aligned:
    return beta
  return beta * (CURVATURE[family] or 0.5)


def write_synthetic_run(path, *, peak: bool = True, aligned: bool = True, overlap: bool = True,
                        families=tuple(CURVATURE), betas=None, steps=STEPS, data_size: int = 1000,
                        d_star: float = 3.0, r_scale: float = 1.0, with_bon: bool = True,
                        with_proxy: bool = True, diverge: bool = True, seed: int = 0,
                        seeds=(0, 1, 2), per_prompt: bool = True) -> pathlib.Path:
  """Writes metrics.jsonl (exact ARCHITECTURE.md field names), config.json, manifest.json, bon.json, per_prompt/.

  Members are families × betas × seeds. Each member's KL grows as
  ``KL_SCALE/drive · (1 − exp(−step/250))`` and its gold on each of ``N_PROMPTS`` prompts
  follows ``true_gold(sqrt KL)`` plus a shared prompt effect and independent noise
  (sd ``GOLD_SE·sqrt(N_PROMPTS)``); ``gold/reward`` and its SE are the mean and clustered SE
  of those per-prompt values, which ``per_prompt/<step>.npz`` holds as the evaluator writes
  them. ``overlap=False`` scales the gold of every second family by 0.5; ``diverge`` makes
  the smallest-β exponential members diverge after step 600.
  """
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  rows = []
  members = [(f, b, s) for f in families for b in (betas or betas_of(f)) for s in seeds]
  prompt_effect = rng.normal(0, 0.3, N_PROMPTS)
  prompt_effect -= prompt_effect.mean()
  for step in steps:
    per = np.full((len(members), N_PROMPTS), np.nan)
    for m, (family, beta, member_seed) in enumerate(members):
      fam_scale = 1.0 if overlap or families.index(family) % 2 == 0 else 0.5
      kl = KL_SCALE / drive(family, beta, aligned) * (1.0 - math.exp(-step / 250.0))
      d = math.sqrt(kl)
      x = (fam_scale * true_gold(d, peak=peak, d_star=d_star, r_scale=r_scale) + prompt_effect
           + rng.normal(0, GOLD_SE * math.sqrt(N_PROMPTS), N_PROMPTS))
      gold = float(x.mean())
      gold_se = float(x.std(ddof=1) / math.sqrt(N_PROMPTS))
      diverged = diverge and family == "exponential" and beta == min(betas or betas_of(family)) and step > 600
      if not diverged:
        per[m] = x
      kl_se = 0.02 * kl + 0.01
      row = {
          "step": step, "member": m, "family": family, "beta": beta,
          "beta_eff": beta * CURVATURE[family], "lr": 1e-5, "seed": member_seed, "gamma": 0.0,
          "label_temp": 1.0, "data_size": data_size,
          "kl": kl, "kl_se": kl_se, "kl_k1": kl + rng.normal(0, kl_se), "kl_k1_se": 2 * kl_se,
          "kl_k3": kl + rng.normal(0, kl_se), "kl_k3_se": 1.5 * kl_se, "sqrt_kl": d, "n_samples": 4 * N_PROMPTS,
          "n_prompts": N_PROMPTS, "gold/reward": gold, "gold/reward_se": gold_se,
          "gold/win_rate": 1.0 / (1.0 + math.exp(-gold)), "gold/win_rate_se": 0.01,
          "response_len": 6.0 + d, "response_len_se": 0.1, "eos_frac": max(0.0, 1.0 - 0.05 * d),
          "eos_frac_se": 0.01, "entropy": 20.0 - 1.5 * d, "rewards/chosen": beta * 0.5 * d, "rewards/rejected": -beta * 0.7 * d,
          "rewards/margins": beta * 1.2 * d, "rewards/accuracies": 0.5 + 0.4 * (1 - math.exp(-d)),
          "rewards/gold_accuracies": 0.5 + 0.3 * (1 - math.exp(-d)),
          "rho/mean": 1.2 * d, "offline_reg": 0.5 * (1.2 * d) ** 2 * 0.3, "loss": 0.69 - 0.05 * d,
          "grad_norm": 1.0 / (1.0 + d), "diverged": diverged,
      }
      row.update({"gold/network": gold, "gold/network_se": gold_se, "loglik": -2.0 - 0.1 * d,
                  "loglik_se": 0.01})
      if with_proxy:
        row["proxy/reward"] = gold + 0.3 * d
      if diverged:
        for k in ("kl", "kl_k1", "kl_k3", "sqrt_kl", "gold/reward", "gold/win_rate", "loss", "grad_norm"):
          row[k] = float("nan")
      rows.append(row)
    if per_prompt:
      (path / "per_prompt").mkdir(exist_ok=True)
      np.savez(path / "per_prompt" / f"{step:08d}.npz", prompt__gold__reward=per)
  with open(path / "metrics.jsonl", "w") as fh:
    for row in rows:
      fh.write(json.dumps(row) + "\n")
  (path / "config.json").write_text(json.dumps({"families": list(families), "betas": list(betas or BETA_EFFS),
                                                "data_size": data_size, "seed": seed}))
  (path / "manifest.json").write_text(json.dumps({"versions": {"gpo_jax": "0.1.0"}, "lab": {"hash": "synthetic"},
                                                  "mesh": {"data": 1}, "wall_time_s": 1.0}))
  if with_bon:
    pool = rng.normal(size=(64, 256))
    curve = bon.best_of_n(0.6 * pool, ns=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    (path / "bon.json").write_text(json.dumps(curve.to_json_dict()))
  return path
