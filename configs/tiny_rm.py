"""A seconds-long reward-model sweep for tests: the ``tiny`` lab, 2 seeds x {hard, soft} labels.

Run (~1 minute on 2 CPU cores including compilation, plus ~30 s to build the tiny lab)::

  python -m gpo_jax.main --config configs/tiny_rm.py --workdir /tmp/runs/tiny_rm
"""

import ml_collections

from gpo_jax.run import presets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """4 members, 50 steps (~3 epochs of the tiny lab's 512 pairs; hard-label members overfit
  soon after: at 150 steps their held-out gold accuracy fell from 0.64-0.66 to 0.57-0.59)."""
  if arg:
    raise ValueError(f"configs/tiny_rm.py takes no argument, got {arg!r} (it always uses the "
                     "tiny lab).")
  c = presets.base("reward_model", "tiny", presets.rm_eval(every=25, member_chunk=4))
  c.sweep = ml_collections.ConfigDict(dict(seeds=(0, 1), lrs=(3e-3,), gammas=(0.0, 1.0),
                                           data_sizes=(0,)))
  c.train.update(dict(steps=50, batch_size=32, warmup_steps=10, log_every=10))
  c.checkpoint.every = 25
  c.mesh.cpu_devices = 0        # tests run where the JAX backend is already up
  c.analyze = False
  c.lock()
  return c
