"""Pod-scale sweep: 6 GPO families x 6 betas x 8 seeds x 2 data sizes on the ``large`` lab, fsdp.

Run on every host of a pod slice (one process per host; multi-host needs
``--config.distributed.enabled=True`` plus the coordinator address, process count and id)::

  python -m gpo_jax.main --config configs/pod_sweep.py:32,8,1 --workdir gs://.../pod_sweep

``arg`` is the mesh ``sweep,data,model`` (default ``32,8,1`` = 256 devices); the 576
members must be divisible by ``sweep`` and ``train.batch_size`` by ``data``. Expected
runtime: roughly 1-2 hours on a v4-256 / 256 H100s (not measured here: this machine has
no accelerator); the first run also builds the ``large`` lab (minutes on accelerators).
"""

import ml_collections

from gpo_jax.run import presets

BETA_EFF_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Locked pod config; ``arg`` = ``"sweep,data,model"`` mesh sizes."""
  sweep_n, data_n, model_n = (int(v) for v in (arg or "32,8,1").split(","))
  c = presets.base("gpo", "large", presets.gpo_eval())
  c.sweep = ml_collections.ConfigDict(dict(
      families=presets.GPO_FAMILIES, beta_effs=BETA_EFF_GRID, betas=(),
      seeds=tuple(range(8)), lrs=(3e-4,), gammas=(0.0,),
      data_sizes=(8192, 0)))          # a data-size axis: 8k pairs vs all 64k
  # member_chunk=0: one wide vmap over each device's members (accelerators want big matmuls).
  c.train.update(dict(steps=5000, batch_size=256, warmup_steps=100, member_chunk=0))
  # eval.member_chunk=4: members a device evaluates at once. experiments/POD_PLAN.md measured
  # (XLA:CPU, fsdp, 256 devices, 576 members) 150 GB per device at 16, 64 GB at 8, 38 GB at 4:
  # only 4 fits an H100/H200/v5p (none fits v5e's 16 GB).
  c.eval.update(dict(every=250, n_prompts=256, samples_per_prompt=8,
                     ref_samples_per_prompt=256, n_test_pairs=2048, member_chunk=4,
                     bon_n=(1, 2, 4, 8, 16, 32, 64, 128, 256)))
  c.mesh.update(dict(preset="fsdp", sweep=sweep_n, data=data_n, model=model_n, cpu_devices=0))
  c.checkpoint.update(dict(every=500, keep=3))
  c.lock()
  return c
