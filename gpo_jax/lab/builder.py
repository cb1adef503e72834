"""Builds a lab directory: runs the ``steps`` (π_ref, gold, pairs, statistics) and writes the artifact.

:func:`build` runs the steps of :mod:`gpo_jax.lab.steps` and writes the directory laid out
in :mod:`gpo_jax.lab.store`: the checkpoints, the TFDS dataset and the eval prompts, then
``lab.json`` last (with the SHA-256 of every other file), so its presence marks a complete
build. Callers normally go through :func:`gpo_jax.lab.store.build_or_load`, which builds into
a temporary directory and renames it into place under a lock.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Any

import jax
import numpy as np

from gpo_jax.lab import corpus as corpus_lib
from gpo_jax.lab import gold as gold_lib
from gpo_jax.lab import steps
from gpo_jax.lab import store
from gpo_jax.lab.config import EVAL_PROMPTS, LAB_CODE_VERSION, LAB_JSON, SPLITS, LabConfig
from gpo_jax.core import model as model_lib


def build(cfg: LabConfig, out_dir: str, log=print) -> dict:
  """Builds every part of the lab into ``out_dir`` (lab.json last); returns its statistics."""
  from gpo_jax.lab import dataset as lab_tfds
  t_start = time.time()
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir)
  corpus = corpus_lib.Corpus(cfg.corpus)
  c = cfg.corpus
  bs = cfg.batch_size
  stats: dict[str, Any] = {}
  timings = {}
  cpu0 = time.process_time()
  log(f"building lab {cfg.dirname} into {out_dir}")

  # 1. π_ref by SFT on episodes.
  t = time.time()
  sft = steps.SFTConfig(cfg.sft_steps, cfg.sft_batch, cfg.sft_lr, cfg.sft_warmup,
                        cfg.sft_weight_decay, cfg.sft_eval_every, cfg.sft_eval_episodes)
  graphdef, ref_state, curve = steps.train_sft(cfg.policy_config, corpus, sft, cfg.seed,
                                               log=log)
  timings["sft"] = time.time() - t
  stats["sft/curve"] = [dict(step=s, train=a, heldout=b, heldout_response=r)
                        for s, a, b, r in curve]
  stats["sft/first_heldout"] = curve[0][2]
  stats["sft/final_heldout"] = curve[-1][2]
  stats["sft/final_heldout_response"] = curve[-1][3]
  stats["sft/final_train"] = curve[-1][1]
  stats["ref/params"] = model_lib.param_count(ref_state)

  # 2. Gold model, normalised under π_ref samples on eval-distribution prompts.
  t = time.time()
  gold_graphdef, gold_state = steps.init_gold(cfg.gold_config, cfg.seed + 1,
                                              cfg.gold_init_scale, cfg.gold_pos_scale)
  models = steps.Models(graphdef, ref_state, gold_graphdef, gold_state)
  stats["gold/params"] = model_lib.param_count(gold_state)
  rng = np.random.default_rng([cfg.seed, 0x601D])
  norm_ctx = corpus.context(corpus.sample_prompts(rng, cfg.gold_norm_samples))
  norm_resp, norm_mask = steps.sample_responses(
      graphdef, ref_state, norm_ctx, jax.random.fold_in(jax.random.key(cfg.seed), 0x601D),
      response_len=c.response_len, temperature=cfg.sample_temperature, batch_size=bs)
  raw = steps.score_gold(models, norm_ctx, norm_resp, norm_mask, bs, normalise=False)
  gold_mean, gold_std = float(raw.mean()), float(raw.std())
  if not gold_std > 0:
    raise RuntimeError(f"gold scores of π_ref samples have zero spread (std={gold_std})")
  models = dataclasses.replace(models, gold_mean=gold_mean, gold_std=gold_std)
  terms = gold_lib.GoldTerms()
  if cfg.gold_kind == "coherent":
    # Standardise the log-likelihood, then the combined score, under the same π_ref samples.
    tbl = gold_lib.tables(corpus)
    ll, eos = steps.coherence_inputs(tbl, norm_ctx, norm_resp, norm_mask, bs)
    if not ll.std() > 0:
      raise RuntimeError("the log-likelihood of π_ref samples has zero spread")
    partial = gold_lib.GoldTerms("coherent", cfg.gold_coherence_weight, cfg.gold_cap_penalty,
                                 float(ll.mean()), float(ll.std()))
    combined = np.asarray(gold_lib.combine(partial, (raw - gold_mean) / gold_std, ll, eos),
                          np.float64)
    terms = dataclasses.replace(partial, mean=float(combined.mean()),
                                std=float(combined.std()))
    stats["gold/coherence_corr"] = float(np.corrcoef((raw - gold_mean) / gold_std, ll)[0, 1])
    models = dataclasses.replace(models, gold_terms=terms, tables=tbl)
  timings["gold"] = time.time() - t

  # 3. Statistics of π_ref and gold.
  t = time.time()
  stats.update(steps.ref_and_gold_stats(cfg, corpus, models, norm_ctx, norm_resp, norm_mask))
  stats.update(steps.icl_gain(models, corpus, cfg.n_stat_episodes, cfg.seed, bs))
  timings["stats"] = time.time() - t

  # 4. Preference pairs and eval prompts.
  t = time.time()
  pairs = {}
  for stream, split, n in ((0x7A1, "train", cfg.n_train_pairs), (0x7E5, "test", cfg.n_test_pairs)):
    pairs[split] = steps.make_pairs(
        models, corpus, n, cfg.seed, stream, label_temp=cfg.label_temp, hard=cfg.hard_labels,
        flip=cfg.label_flip, temperature=cfg.sample_temperature, batch_size=bs)
  eval_rng = np.random.default_rng([cfg.seed, 0xE7A])
  eval_prompts = corpus.context(corpus.sample_prompts(eval_rng, cfg.n_eval_prompts))
  np.save(os.path.join(out_dir, EVAL_PROMPTS), eval_prompts)
  stats.update(steps.pair_stats(cfg, pairs["train"]))
  timings["pairs"] = time.time() - t

  # 5. Write the artifact: checkpoints, TFDS, then lab.json (the completion marker).
  t = time.time()
  store._save_state(os.path.join(out_dir, "policy"), ref_state)
  store._save_state(os.path.join(out_dir, "gold"), gold_state)
  scratch = os.path.join(out_dir, "_scratch")
  lab_tfds.write_dataset(pairs, os.path.join(out_dir, "tfds"), scratch, c.prompt_len + 2,
                         c.response_len)
  shutil.rmtree(scratch)
  stats["data/sha256"] = {s: arrays_digest(pairs[s]) for s in SPLITS}
  timings["write"] = time.time() - t
  timings["total"] = time.time() - t_start
  timings["cpu_total"] = time.process_time() - cpu0
  stats["build/seconds"] = timings
  meta = {"name": cfg.name, "hash": cfg.config_hash(), "code_version": LAB_CODE_VERSION,
          "config": cfg.to_dict(), "gold_mean": gold_mean, "gold_std": gold_std,
          "gold_terms": terms.to_dict(),
          "stats": stats, "versions": store._versions(),
          "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "files": {f: store._sha256(os.path.join(out_dir, f)) for f in store._all_files(out_dir)}}
  # lab.json covers itself too: the gold normalisation constants and the statistics cannot
  # change without the load noticing.
  meta[store.META_DIGEST] = store.meta_digest(meta)
  tmp_meta = os.path.join(out_dir, LAB_JSON + ".tmp")
  with open(tmp_meta, "w") as f:
    json.dump(meta, f, indent=1, sort_keys=True)
  os.replace(tmp_meta, os.path.join(out_dir, LAB_JSON))
  return stats


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
  """SHA-256 over the named arrays' dtypes, shapes and bytes (order-independent of dict order)."""
  h = hashlib.sha256()
  for k in sorted(arrays):
    a = np.ascontiguousarray(arrays[k])
    h.update(f"{k}:{a.dtype.str}:{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()

