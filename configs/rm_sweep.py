"""Bradley–Terry reward models (proxies) on the ``small`` CPU lab: 3 seeds x 3 data sizes x {hard, MMPO soft} labels.

Run (measured 3 min 26 s wall on the 2-core CPU machine, 18 members x 400 steps with 5
evaluations, two XLA:CPU devices; the ``small`` lab is shared with ``configs/cpu_sweep.py``
and built on first use, ~4 minutes)::

  python -m gpo_jax.main --config configs/rm_sweep.py --workdir runs/rm

Each member is a reward model with π_ref's trunk and a head drawn from its seed, trained on
the first ``data_size`` pairs; ``gamma = 0`` uses the dataset's sampled (noisy) labels,
``gamma > 0`` MMPO soft labels ``σ(γ (g_w − g_l))`` from the stored gold scores. Metrics
(``rm/gold_accuracy``, ``rm/gold_corr``, ``rm/ece``, ...) are measured on all held-out pairs
at every evaluation; ``rm_reference.json`` holds the labels' own agreement with gold.
``arg`` picks the lab variant.
"""

import ml_collections

from gpo_jax.run import presets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Locked reward-model sweep; ``arg`` = lab variant (default ``small``)."""
  c = presets.base("reward_model", arg or "small", presets.rm_eval(every=100))
  c.sweep = ml_collections.ConfigDict(dict(
      seeds=(0, 1, 2),
      lrs=(1e-3,),
      gammas=(0.0, 1.0),            # 0 = hard (sampled) labels; 1 = MMPO soft labels
      data_sizes=(256, 1024, 0)))   # 0 = all training pairs
  c.train.update(dict(steps=400, batch_size=32, warmup_steps=20, weight_decay=0.0))
  c.lock()
  return c
