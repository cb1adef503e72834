"""Inverse-Q*-style token-level RL from π_ref's in-context policy (our reconstruction, SPEC §6) on the CPU lab.

Run (``small``; results in ``experiments/results/inverse_q``)::

  python -m gpo_jax.main --config configs/inverse_q.py --workdir runs/inverse_q

Members: guidance (how each training prompt's two good demonstrations are retrieved from
the lab's gold-labelled pairs: random within the top gold quartile, BM25 over prompt
n-grams, π_ref embeddings) × β (the in-context reward's scale; the optimum tilts π_ref by
``(π̂*/π_ref)^(β/kl_coef)``, so β = 1 imitates the in-context policy and β > 1 pushes past
it) × one seed; each step samples 4 responses for each of 16 training prompts; evaluated
like offline GPO (on-policy KL, gold, win rate on the lab's eval prompts).

``arg``: the lab variant (``small`` default, ``tiny`` for tests). Override any field, e.g.
``--config.sweep.betas='(1.0,)'``.
"""

import ml_collections

from gpo_jax.run import presets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "small"
  tiny = variant == "tiny"
  c = presets.base("inverse_q", variant, presets.gpo_eval(
      every=10 if tiny else 25, n_prompts=16 if tiny else 128, samples_per_prompt=4,
      ref_samples_per_prompt=16 if tiny else 64, member_chunk=4,
      bon_n=(1, 4, 16) if tiny else (1, 4, 16, 64)))
  c.lab.gold_kind = "coherent"
  c.inverse_q = ml_collections.ConfigDict(dict(
      k=2,                     # demonstrations in the guidance (<= lab.corpus.max_demos)
      samples_per_prompt=4,    # responses per prompt per step (leave-one-out baseline)
      gold_quantile=0.25,      # "good" = the top quarter of the pool by gold
      retrieval_seed=0))
  c.sweep = ml_collections.ConfigDict(dict(
      guidances=("random", "bm25", "embedding"),
      betas=(1.0, 4.0) if tiny else (1.0, 2.0, 4.0),
      kl_coefs=(1.0,), seeds=(0,), lrs=(1e-3,) if tiny else (3e-4,)))
  c.train.update(dict(steps=20 if tiny else 150, batch_size=16 if not tiny else 8,
                      warmup_steps=5, log_every=10))
  c.checkpoint.every = 10 if tiny else 50
  if tiny:
    c.mesh.cpu_devices = 0
  c.lock()
  return c
