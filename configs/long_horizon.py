"""The offline overoptimisation question (SPEC §7.3, §7.6): long horizons × data sizes.

Rafailov et al. 2024 (arXiv 2406.02900) report that DPO/IPO/SLiC gold vs sqrt KL is
hump-shaped across β, often within one epoch. This config trains {logistic, squared, hinge}
on a dense β_eff grid for ``EPOCHS`` passes over a fixed number of preference pairs (10x
the ~2.3 epochs of the README's main job), logging gold, KL, EOS fraction, length and the
implicit reward's accuracy against the gold ordering (``rewards/gold_accuracies``) at
``EVALS`` points, every member on all of the lab's eval prompts.

``arg`` is ``<scale>,<data_size>[,<lab_seed>]``:

* ``cpu,<n>``: the ``small`` lab with the coherent gold, 3 seeds, one learning rate, one
  sample on each of the 256 eval prompts; sized for 2 CPU cores (``cpu,512`` took 35 min
  with 54 members and 2 samples per prompt while other jobs shared the cores; the committed runs are ``cpu,512`` and ``cpu,1024`` on lab
  seed 0, ``cpu,512,1`` and a network-gold control with one data-order seed:
  experiments/results/long_horizon/README.md has the exact commands and runtimes).
* ``full,<n>``: the ``large`` lab (65 536 pairs: n from 1024 to 65536), 5 seeds, learning
  rates (1e-4, 3e-4, 1e-3), for an accelerator.

``data_size`` must divide into whole batches; steps = ``EPOCHS · data_size / batch``. Run
one workdir per (data size, lab seed) and compare them::

  python -m gpo_jax.main --config configs/long_horizon.py:cpu,512 --workdir runs/lh/n512_lab0
  python -m gpo_jax.main --config configs/long_horizon.py:cpu,512,1 --workdir runs/lh/n512_lab1
  python -m gpo_jax.analysis runs/lh/n512_lab0 runs/lh/n2048_lab0 --out runs/lh/comparison

A lab seed changes π_ref's training data and initialisation, the gold network and the pairs
(``lab.seed``); the corpus (the world) stays the same.
"""

import ml_collections

from gpo_jax.run import presets

EPOCHS = 23                      # 10x the main job's 300 steps x 32 / 4096 pairs
EVALS = 12                       # evaluations per run (plus step 0)
FAMILIES = ("logistic", "squared", "hinge")
# x2 spacing in beta_eff (the main job's grid is x3.16)
BETA_EFF_GRID = {"cpu": (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08),
                 "full": (0.00125, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16)}


def _parse(arg):
  parts = (arg or "cpu,512").split(",")
  if len(parts) not in (2, 3) or parts[0] not in BETA_EFF_GRID:
    raise ValueError(f"configs/long_horizon.py takes '<scale>,<data_size>[,<lab_seed>]' with scale "
                     f"in {sorted(BETA_EFF_GRID)}, got {arg!r}")
  try:
    n, lab_seed = int(parts[1]), int(parts[2]) if len(parts) == 3 else 0
  except ValueError:
    raise ValueError(f"configs/long_horizon.py: data_size and lab_seed must be integers, "
                     f"got {arg!r}") from None
  return parts[0], n, lab_seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Locked config; ``arg`` = ``<scale>,<data_size>[,<lab_seed>]`` (default ``cpu,512``)."""
  scale, n, lab_seed = _parse(arg)
  cpu = scale == "cpu"
  c = presets.base("gpo", "small" if cpu else "large",
                   presets.gpo_eval(n_prompts=0, samples_per_prompt=1 if cpu else 4,
                                    ref_samples_per_prompt=32 if cpu else 64,
                                    bon_n=(1, 2, 4, 8, 16, 32) if cpu else (1, 2, 4, 8, 16, 32, 64)))
  c.lab.seed = lab_seed
  c.lab.gold_kind = "coherent"
  batch = c.train.batch_size
  if n % batch or n < batch:
    raise ValueError(f"data_size={n} must be a positive multiple of the batch size {batch}")
  if n > c.lab.n_train_pairs:
    raise ValueError(f"data_size={n} exceeds the {scale} lab's {c.lab.n_train_pairs} pairs")
  steps = EPOCHS * n // batch
  c.train.steps = steps
  c.eval.every = max(1, steps // EVALS)
  c.checkpoint.every = max(c.eval.every, steps // 4)
  c.sweep = ml_collections.ConfigDict(dict(
      families=FAMILIES,
      beta_effs=BETA_EFF_GRID[scale],
      betas=(),
      seeds=(0, 1, 2) if cpu else (0, 1, 2, 3, 4),
      lrs=(3e-4,) if cpu else (1e-4, 3e-4, 1e-3),
      gammas=(0.0,),
      data_sizes=(n,)))
  c.lock()
  return c
