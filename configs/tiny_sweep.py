"""A seconds-long GPO sweep for tests: the ``tiny`` lab, 2 families x 2 betas, 6 steps.

Run (~1 minute on 2 CPU cores including compilation, plus ~30 s to build the tiny lab)::

  python -m gpo_jax.main --config configs/tiny_sweep.py --workdir /tmp/runs/tiny
"""

import ml_collections

from gpo_jax.run import presets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """4 members, 6 steps, evaluations at steps 0, 3, 6 (``arg`` unused)."""
  if arg:
    raise ValueError(f"configs/tiny_sweep.py takes no argument, got {arg!r} (it always uses the "
                     "tiny lab).")
  c = presets.base("gpo", "tiny", presets.gpo_eval())
  c.sweep = ml_collections.ConfigDict(dict(
      families=("logistic", "squared"),
      betas=ml_collections.ConfigDict({"logistic": (0.1, 1.0), "squared": (0.1, 1.0)}),
      beta_effs=(), seeds=(0,), lrs=(3e-4,), gammas=(0.0,), data_sizes=(0,)))
  c.train.update(dict(steps=6, batch_size=8, warmup_steps=0, log_every=2))
  c.eval.update(dict(every=3, n_prompts=8, samples_per_prompt=4, ref_samples_per_prompt=8,
                     n_test_pairs=32, member_chunk=4, bon_n=(1, 2, 4, 8)))
  c.checkpoint.every = 2
  # Tests run in processes whose JAX backend is already up: leave the device count alone.
  c.mesh.cpu_devices = 0
  c.analyze = False
  c.lock()
  return c
