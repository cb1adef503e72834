"""ICDPO's in-context score as a best-of-n selector on the proxy setting's own π_ref pool (SPEC §6, §7.7).

The proxy setting (``configs/proxy_setting.py``) draws best-of-n under every proxy and
ensemble from one π_ref pool of ``N`` samples per eval prompt (``bon_pool.npz``: gold and
every proxy's score, no tokens). This module puts ICDPO's scorer on *that* pool, so ICDPO,
π_ref's likelihood, the gold oracle and every proxy selector pick from the same samples
and their best-of-n curves are paired sample by sample:

1. :func:`regenerate` rebuilds the pool's tokens with the run's own evaluator program
   (:meth:`gpo_jax.evaluation.policy.Evaluator.ref_pool`: same lab, seed, prompts and
   keys) and checks them against the stored gold score of every sample (a different lab,
   seed or sampler shows up as a gold mismatch and is refused);
2. :func:`score_pool` scores every sample with ``S(y) = log π_ref(y | D⁺, x) − log π_ref(y |
   C⁻, x)`` per ``(k, retriever, contrast)``, plus ``log π_ref(y | x)``;
3. :func:`curves` turns every selector's scores into per-prompt best-of-n gold ``[E, K]``
   (exact means over random ``n``-subsets of the pool, :func:`gpo_jax.evaluation.bon.per_prompt`),
   gold reference-subtracted per prompt (π_ref's pool mean on the prompt, ``R(0) = 0``).

:func:`run` does all three and writes ``<out>/pool_bon.npz`` (``<selector>`` → ``[E, K]``
and the proxy score of the selected sample under each proxy selector) with
``pool_bon.json`` (selectors, kinds, ``ns``, the gold check, timings); the in-context
report (:mod:`gpo_jax.analysis.incontext`) reads only those, so it needs neither the pool
nor JAX.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from gpo_jax.evaluation import bon as bon_lib
from gpo_jax.incontext import icdpo
from gpo_jax.incontext import retrieval as retrieval_lib
from gpo_jax.runtime import writers

POOL_FILE = "bon_pool.npz"          # what the proxy setting's RL evaluator writes
OUT_NPZ, OUT_JSON = "pool_bon.npz", "pool_bon.json"
#: a regenerated sample's gold must match the stored one within this (float32 scores)
GOLD_TOL = 1e-4
#: the fraction of samples that must match (the rest: sampler ULP differences flipping a token)
MATCH_MIN = 0.99
ORACLE, LIKELIHOOD = "gold (oracle)", "likelihood"


class PoolMismatch(ValueError):
  """The regenerated pool is not the stored one (different lab, seed, prompts or sampler)."""


def _run_eval_config(rl_dir: str):
  from gpo_jax.evaluation import policy
  path = os.path.join(rl_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {rl_dir} is not a run directory")
  with open(path) as f:
    cfg = json.load(f)
  e = dict(cfg["eval"])
  return policy.EvalConfig(n_prompts=int(e["n_prompts"]),
                           ref_samples_per_prompt=int(e["ref_samples_per_prompt"]),
                           seed=int(e["seed"]), n_test_pairs=1,
                           bon_n=tuple(int(v) for v in e["bon_n"])), cfg


def regenerate(lab, rl_dir: str, *, log=None) -> dict[str, Any]:
  """π_ref's pool of the run in ``rl_dir``, tokens included, checked against its ``bon_pool.npz``.

  Returns:
    ``tokens [E, N, T]``, ``mask``, ``gold [E, N]`` (the stored values), ``proxies [P, E, N]``
    and the stored selector table, plus ``check``: the regenerated-vs-stored gold agreement.

  Raises:
    FileNotFoundError: no ``bon_pool.npz`` (run ``configs/proxy_setting.py`` first).
    PoolMismatch: fewer than :data:`MATCH_MIN` of the samples reproduce their stored gold.
  """
  from flax import nnx
  from gpo_jax.evaluation import policy
  log = log or (lambda msg: None)
  path = os.path.join(rl_dir, POOL_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: the proxy setting's RL run writes it (python -m gpo_jax.main "
        "--config configs/proxy_setting.py --workdir runs/proxy_setting); it is not committed")
  with np.load(path) as z:
    stored = {k: z[k] for k in z.files}
  ecfg, _ = _run_eval_config(rl_dir)
  e, n = stored["gold"].shape
  if ecfg.ref_samples_per_prompt != n or (ecfg.n_prompts or len(lab.eval_prompts)) != e:
    raise PoolMismatch(f"{path} holds {e} prompts x {n} samples but the run's eval config says "
                       f"{ecfg.n_prompts} x {ecfg.ref_samples_per_prompt}")
  graphdef, _, rest = nnx.split(lab.policy(), nnx.Param, ...)
  t = time.time()
  pool = policy.Evaluator.from_lab(lab, graphdef, rest, ecfg).ref_pool()
  diff = np.abs(pool["gold"].astype(np.float64) - stored["gold"].astype(np.float64))
  frac = float(np.mean(diff <= GOLD_TOL))
  check = {"samples": int(diff.size), "matching": frac, "max_abs_diff": float(diff.max()),
           "tolerance": GOLD_TOL, "seconds": time.time() - t}
  log(f"regenerated pool {e} x {n}: {100 * frac:.3f}% of samples match the stored gold "
      f"(max |Δ| {diff.max():.2e}) in {check['seconds']:.0f} s")
  if frac < MATCH_MIN:
    raise PoolMismatch(
        f"only {100 * frac:.2f}% of the regenerated pool's samples match {path}'s gold within "
        f"{GOLD_TOL} (need {100 * MATCH_MIN:.0f}%): is the lab ({lab.path}) the one the run used?")
  return {"tokens": pool["tokens"], "mask": pool["mask"], "gold": stored["gold"],
          "regenerated_gold": pool["gold"], "proxies": stored["proxies"],
          "proxy_names": stored["proxy_names"], "selector_names": stored["selector_names"],
          "selector_mask": stored["selector_mask"],
          "selector_objective": stored["selector_objective"],
          "selector_lam": stored["selector_lam"], "check": check}


def config_names(ks, retrievers, contrasts) -> list[tuple[int, str, str]]:
  return [(int(k), r, c) for r in retrievers for k in sorted({int(k) for k in ks})
          for c in contrasts]


def score_pool(lab, tokens_ExNxT: np.ndarray, mask_ExNxT: np.ndarray, *, ks=(2,),
               retrievers=retrieval_lib.RETRIEVERS, contrasts=icdpo.CONTRASTS, seed: int = 0,
               gold_quantile: float = 0.25, retrieval_dir: str | None = None,
               batch_size: int = 512, log=None) -> dict[str, np.ndarray]:
  """ICDPO's score of every sample of a π_ref(·|x) pool on the lab's first ``E`` eval prompts.

  Returns:
    ``{"likelihood": log π_ref(y|x), "icdpo/k<k>/<retriever>/<contrast>": S(y)}``, each
    ``[E, N]`` float64; demonstrations are retrieved for the eval prompts exactly as
    :func:`gpo_jax.incontext.icdpo.evaluate` retrieves them (same settings, same store).
  """
  log = log or (lambda msg: None)
  e, n, t = tokens_ExNxT.shape
  if mask_ExNxT.shape != tokens_ExNxT.shape:
    raise ValueError(f"mask {mask_ExNxT.shape} does not match tokens {tokens_ExNxT.shape}")
  if e > len(lab.eval_prompts):
    raise ValueError(f"the pool has {e} prompts but the lab only {len(lab.eval_prompts)}")
  for k in ks:
    retrieval_lib.check_k(int(k), lab.corpus.cfg, lab.policy_cfg.max_len)
  cfg = icdpo.ICDPOConfig(ns=(1,), ks=tuple(int(k) for k in ks), retrievers=tuple(retrievers),
                          contrasts=tuple(contrasts), gold_quantile=gold_quantile, seed=seed,
                          pool_per_prompt=1, ref_samples_per_prompt=1, batch_size=batch_size)
  runner = icdpo.Runner(lab, cfg)
  model = lab.policy()
  demo_pool = retrieval_lib.DemoPool.from_lab(lab, "train")
  ctx_base = np.asarray(lab.eval_prompts[:e], np.int32)
  queries = retrieval_lib.prompts_from_contexts(ctx_base)
  resp = tokens_ExNxT.reshape(e * n, t).astype(np.int32)
  mask = mask_ExNxT.reshape(e * n, t).astype(np.float32)
  k_max = max(int(k) for k in ks)

  def demos(polarity, retriever):
    s = retrieval_lib.RetrievalSettings(k=k_max, polarity=polarity, retriever=retriever,
                                        seed=seed, gold_quantile=gold_quantile)
    if retrieval_dir is not None:
      return retrieval_lib.load_or_retrieve(retrieval_dir, lab, queries, s, pool=demo_pool,
                                            model=model)
    return retrieval_lib.retrieve(demo_pool, queries, k_max, polarity=polarity,
                                  retriever=retriever, seed=seed, gold_quantile=gold_quantile,
                                  model=model)

  t0 = time.time()
  base = runner.lp_per_context(ctx_base, resp, mask, n)
  out = {LIKELIHOOD: base.reshape(e, n)}
  for retriever in retrievers:
    good = demos("good", retriever)
    bad = demos("bad", retriever) if "bad" in contrasts else None
    for k in sorted({int(k) for k in ks}):
      plus = runner.lp_per_context(good.first(k).context(lab.corpus, queries), resp, mask, n)
      minus = {"base": base}
      if bad is not None:
        minus["bad"] = runner.lp_per_context(bad.first(k).context(lab.corpus, queries), resp,
                                             mask, n)
      for contrast in contrasts:
        out[f"icdpo/k{k}/{retriever}/{contrast}"] = (plus - minus[contrast]).reshape(e, n)
      log(f"pool scored by ICDPO {retriever} k={k} ({time.time() - t0:.0f} s)")
  return out


def curves(scores: dict[str, np.ndarray], gold_ExN: np.ndarray, ns) -> dict[str, np.ndarray]:
  """Per-prompt best-of-n gold ``[E, K]`` for each selector's scores (and the gold oracle)."""
  gold = np.asarray(gold_ExN, np.float64)
  gold = gold - gold.mean(axis=1, keepdims=True)
  out = {name: bon_lib.per_prompt(s, gold, ns) for name, s in scores.items()}
  out[ORACLE] = bon_lib.per_prompt(gold, gold, ns)
  return out


def proxy_scores(pool: dict[str, Any]) -> dict[str, np.ndarray]:
  """Every stored selector's score of the pool, ``{name: [E, N]}`` (as the trainer combines them)."""
  from gpo_jax.objectives import ensembles
  out = {}
  for s, name in enumerate(pool["selector_names"]):
    out[str(name)] = np.asarray(ensembles.combine(
        np.asarray(pool["proxies"], np.float64),
        ensembles.OBJECTIVES[int(pool["selector_objective"][s])],
        float(pool["selector_lam"][s]), np.asarray(pool["selector_mask"][s])), np.float64)
  return out


def run(lab, rl_dir: str, out_dir: str, *, ks=(2,), retrievers=retrieval_lib.RETRIEVERS,
        contrasts=icdpo.CONTRASTS, seed: int = 0, gold_quantile: float = 0.25, ns=None,
        retrieval_dir: str | None = None, log=None) -> str:
  """Regenerates ``rl_dir``'s π_ref pool, scores it by ICDPO and writes the best-of-n curves
  of ICDPO, likelihood, the oracle and every stored proxy selector to ``out_dir``."""
  log = log or (lambda msg: None)
  t0 = time.time()
  pool = regenerate(lab, rl_dir, log=log)
  e, n = pool["gold"].shape
  ns = np.asarray(sorted({int(v) for v in (ns or _default_ns(n)) if 1 <= int(v) <= n}), np.int64)
  t = time.time()
  scores = score_pool(lab, pool["tokens"], pool["mask"], ks=ks, retrievers=retrievers,
                      contrasts=contrasts, seed=seed, gold_quantile=gold_quantile,
                      retrieval_dir=retrieval_dir, log=log)
  t_score = time.time() - t
  prox = proxy_scores(pool)
  per_prompt = curves({**scores, **{f"proxy/{k}": v for k, v in prox.items()}}, pool["gold"], ns)
  kinds = {name: ("oracle" if name == ORACLE else "likelihood" if name == LIKELIHOOD else
                  "icdpo" if name.startswith("icdpo/") else "proxy") for name in per_prompt}
  info = {"source_name": "/".join(os.path.abspath(rl_dir).split(os.sep)[-2:]), "n_prompts": int(e), "pool_per_prompt": int(n),
          "ns": ns.tolist(), "kinds": kinds, "gold_check": pool["check"],
          "icdpo": {"ks": [int(k) for k in ks], "retrievers": list(retrievers),
                    "contrasts": list(contrasts), "seed": seed, "gold_quantile": gold_quantile},
          "proxy_names": [str(p) for p in pool["proxy_names"]],
          "seconds": {"regenerate": pool["check"]["seconds"], "icdpo_scoring": t_score,
                      "total": time.time() - t0}}
  os.makedirs(out_dir, exist_ok=True)
  writers.save_npz_atomic(os.path.join(out_dir, OUT_NPZ),
                          {k.replace("/", "__"): v.astype(np.float64) for k, v in per_prompt.items()})
  writers.save_json_atomic(os.path.join(out_dir, OUT_JSON), info, indent=1, sort_keys=True)
  log(f"ICDPO on the proxy pool: {len(scores) - 1} ICDPO configs, {len(prox)} proxy selectors, "
      f"{time.time() - t0:.0f} s")
  return out_dir


def _default_ns(n: int) -> list[int]:
  return [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if v <= n]
