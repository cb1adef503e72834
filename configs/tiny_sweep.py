"""A seconds-long sweep for tests: the ``tiny`` lab, 2 families x 2 betas, a few steps.

Run (~1 minute on 2 CPU cores including compilation, plus ~30 s to build the tiny lab)::

  python -m gpo_jax.main --config configs/tiny_sweep.py --workdir /tmp/runs/tiny
"""

import importlib.util
import os

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``configs/cpu_sweep.py:tiny`` shrunk to 4 members and 6 steps (``arg`` unused)."""
  del arg
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_sweep.py")
  spec = importlib.util.spec_from_file_location("gpo_cpu_sweep_config", path)
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  c = base.get_config("tiny")
  c.unlock()
  c.sweep.families = ("logistic", "squared")
  c.sweep.betas = ml_collections.ConfigDict({"logistic": (0.1, 1.0), "squared": (0.1, 1.0)})
  c.train.steps = 6
  c.train.batch_size = 8
  c.train.warmup_steps = 0
  c.eval.update(dict(every=3, n_prompts=8, samples_per_prompt=4, ref_samples_per_prompt=8,
                     n_test_pairs=32, member_chunk=4, bon_n=(1, 2, 4, 8)))
  c.checkpoint.every = 2
  c.train.log_every = 2
  # Tests run in processes whose JAX backend is already up: leave the device count alone.
  c.mesh.cpu_devices = 0
  c.analyze = False
  c.lock()
  return c
