"""Shared config sections for ``configs/*.py`` (big_vision style: configs import helpers, never each other by path).

Each config file builds its own sweep next to its run command and takes the sections every
run shares from :func:`base`; :func:`gpo_eval` and :func:`rm_eval` are the evaluation
sections of the two algorithms. The values here are those of the README's main job.
"""

import ml_collections

from gpo_jax.lab import presets as lab_presets

#: the six named GPO families (``gpo_jax.objectives.losses.GPO_FUNCTIONS``)
GPO_FAMILIES = ("logistic", "hinge", "squared", "exponential", "truncated_quadratic", "savage")


def gpo_eval(**overrides) -> ml_collections.ConfigDict:
  """Offline-GPO evaluation: on-policy samples of every member, the π_ref pool, held-out pairs."""
  e = ml_collections.ConfigDict(dict(
      every=50, n_prompts=32, samples_per_prompt=4, ref_samples_per_prompt=64,
      n_test_pairs=256, member_chunk=12, bon_n=(1, 2, 4, 8, 16, 32, 64), seed=0))
  e.update(overrides)
  return e


def rm_eval(**overrides) -> ml_collections.ConfigDict:
  """Reward-model evaluation on the lab's held-out pairs (0 = all of them)."""
  e = ml_collections.ConfigDict(dict(every=50, n_test_pairs=0, member_chunk=8, ece_bins=10))
  e.update(overrides)
  return e


def base(algorithm: str, lab: str, evaluation: ml_collections.ConfigDict
         ) -> ml_collections.ConfigDict:
  """The sections every run shares, unlocked; the caller adds ``sweep`` (and adjusts) then locks.

  Args:
    algorithm: a key of ``gpo_jax.algorithms.REGISTRY``.
    lab: the lab variant (``gpo_jax.lab.presets.VARIANTS``).
    evaluation: the algorithm's eval section (:func:`gpo_eval`, :func:`rm_eval`).
  """
  c = ml_collections.ConfigDict()
  c.algorithm = algorithm
  c.lab = lab_presets.lab_config(lab)
  c.lab.unlock()
  c.lab_root = ""                 # "" = <workdir>/../labs
  c.train = ml_collections.ConfigDict(dict(
      steps=300, batch_size=32, b1=0.9, b2=0.99, eps=1e-8, grad_clip=1.0,
      warmup_steps=10, weight_decay=0.0, length_normalize=False,
      # Members per loop iteration on each device (0 = vmap all members at once). On a CPU
      # a loop over members beats one wide vmap (experiments/BENCH_SWEEP.md).
      member_chunk=1,
      log_every=10))                  # train metrics -> TensorBoard every this many steps
  c.eval = evaluation
  # One CPU device per core (cpu_devices=-1, lowered to divide the members) and the sweep
  # axis over all devices (sweep=-1). cpu_devices only matters where JAX runs on the CPU.
  c.mesh = ml_collections.ConfigDict(dict(preset="dp", sweep=-1, data=1, model=1,
                                          cpu_devices=-1))
  c.checkpoint = ml_collections.ConfigDict(dict(every=100, keep=2))
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=1, process_id=0))
  c.analyze = True
  return c


def offline_gpo_stage(lab: str, evaluation: dict, betas, steps: int) -> ml_collections.ConfigDict:
  """The offline GPO stage the online and in-context pipelines compare against.

  DPO, IPO and SLiC (families logistic, squared, hinge) × ``betas``, one seed, every train
  pair, batches of 16, evaluated with ``evaluation`` (:func:`gpo_eval` overrides), one
  checkpoint at the end.
  """
  off = base("gpo", lab, gpo_eval(**evaluation))
  off.sweep = ml_collections.ConfigDict(dict(
      families=("logistic", "squared", "hinge"), betas=tuple(betas), beta_effs=(),
      seeds=(0,), lrs=(3e-4,), gammas=(0.0,), data_sizes=(0,)))
  off.train.update(dict(steps=steps, batch_size=16, warmup_steps=5, log_every=10))
  off.checkpoint.every = steps
  return off

