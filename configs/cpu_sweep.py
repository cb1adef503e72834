"""The README's main job: 6 GPO families x 7 betas x 1 seed on the ``small`` CPU lab.

Run (measured 281 s wall on the quiet 2-core CPU machine, 300 steps x 42 members with 7
evaluations, two XLA:CPU devices; building the ``small`` lab adds ~4 minutes the first
time)::

  python -m gpo_jax.main --config configs/cpu_sweep.py --workdir runs/cpu_sweep

Override any field (the config is locked, so typos fail), e.g.
``--config.train.steps=200 --config.sweep.seeds='(0, 1)'``. ``arg`` picks the lab variant
(``configs/cpu_sweep.py:tiny`` for a quick look).

The beta grids are per family and span the same ``beta_eff = beta f''(0)/|f'(0)|`` range
(SPEC §1) from strongly over-regularised (gold barely moves) to under-regularised (gold
peaks early and falls as KL keeps growing). Hinge has ``f''(0) = 0``, so its grid is set by
its margin ``1/beta`` instead.
"""

import importlib.util
import os

import ml_collections

FAMILIES = ("logistic", "hinge", "squared", "exponential", "truncated_quadratic", "savage")
# Grids in beta_eff units, converted per family with f''(0)/|f'(0)| (hinge: raw beta).
# 0.003 was added after runs whose grid started at 0.01 found the best beta at that edge
# for 4 of 6 families (README, "What the default run shows").
BETA_EFF_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
_SCALE = {"logistic": 0.5, "hinge": 1.0, "squared": 1.0, "exponential": 1.0,
          "truncated_quadratic": 1.0, "savage": 0.5}


def lab_config(variant: str) -> ml_collections.ConfigDict:
  """The lab config ``configs/lab.py:<variant>`` (loaded by path, next to this file)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lab.py")
  spec = importlib.util.spec_from_file_location("gpo_lab_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Locked sweep config; ``arg`` = lab variant (default ``small``)."""
  c = ml_collections.ConfigDict()
  c.lab = lab_config(arg or "small")
  c.lab.unlock()
  c.lab_root = ""                 # "" = <workdir>/../labs

  c.sweep = ml_collections.ConfigDict()
  c.sweep.families = FAMILIES
  c.sweep.betas = ml_collections.ConfigDict(
      {f: tuple(round(b / _SCALE[f], 6) for b in BETA_EFF_GRID) for f in FAMILIES})
  c.sweep.seeds = (0,)
  c.sweep.lrs = (3e-4,)           # 1e-3 lets even beta_eff = 3 members drift to KL ~ 2-4
  c.sweep.gammas = (0.0,)          # 0 = hard labels from the dataset
  c.sweep.data_sizes = (0,)        # 0 = all training pairs

  c.train = ml_collections.ConfigDict(dict(
      steps=300, batch_size=32, b1=0.9, b2=0.99, eps=1e-8, grad_clip=1.0,
      warmup_steps=10, weight_decay=0.0, length_normalize=False,
      # Members per loop iteration on each device (0 = vmap all members at once). On a CPU
      # a loop over members beats one wide vmap (experiments/BENCH_SWEEP.md).
      member_chunk=1,
      log_every=10))                  # train metrics -> TensorBoard every this many steps
  c.eval = ml_collections.ConfigDict(dict(
      every=50, n_prompts=32, samples_per_prompt=4, ref_samples_per_prompt=64,
      n_test_pairs=256, member_chunk=12, bon_n=(1, 2, 4, 8, 16, 32, 64), seed=0))
  # One CPU device per core (cpu_devices=-1, lowered to divide the members) and the sweep
  # axis over all devices (sweep=-1). cpu_devices only matters where JAX runs on the CPU.
  c.mesh = ml_collections.ConfigDict(dict(preset="dp", sweep=-1, data=1, model=1,
                                          cpu_devices=-1))
  c.checkpoint = ml_collections.ConfigDict(dict(every=100, keep=2))
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=1, process_id=0))
  c.analyze = True
  c.lock()
  return c
