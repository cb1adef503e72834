"""The README's main job: 3 GPO families x 4 betas x 3 seeds on 512 pairs of the ``small`` CPU lab, coherent gold.

Run (about 6 minutes on 2 CPU cores after the ``small`` lab is built, which takes ~3.5 minutes
the first time; README "Quick start" has the measured times)::

  python -m gpo_jax.main --config configs/cpu_sweep.py --workdir runs/cpu_sweep

What it is sized to show (chosen from the long-horizon runs in
``experiments/results/long_horizon``): on 512 preference pairs, gold rises for ~2 epochs and
then falls while KL keeps growing at small β (overoptimisation without any proxy, as
Rafailov et al. 2024 report for direct alignment), and larger β trades KL for a slower
rise and a later, smaller fall (the regularisation trade-off). 150 steps are ~9 epochs.
Three data-order seeds give the frontier-overlap test its seed-vs-seed null; every member
is evaluated on all 256 eval prompts (one sample each), so every comparison is paired by
prompt. The gold is the lab's ``coherent`` gold (network + exact corpus log-likelihood −
a penalty for running into the length cap; ``gpo_jax/lab/gold.py``).

Override any field (the config is locked, so typos fail), e.g. all six families
(``--config.sweep.families='("logistic", "hinge", "squared", "exponential",
"truncated_quadratic", "savage")'``, about twice the time), the network-only gold
(``--config.lab.gold_kind=network``: another lab) or all 4096 pairs
(``--config.sweep.data_sizes='(0,)'``). ``arg`` picks the lab variant
(``configs/cpu_sweep.py:tiny`` for a quick look).

The grid is given in ``beta_eff = beta f''(0)/|f'(0)|`` units (SPEC §1) and converted per
family by autodiff (``gpo_jax.objectives.losses.beta_from_beta_eff``; hinge, with
``f''(0) = 0``, by its target margin: ``beta = beta_eff``). To give raw betas instead:
``--config.sweep.beta_effs='()' --config.sweep.betas='(0.1, 1.0)'``.
"""

import ml_collections

from gpo_jax.run import presets

FAMILIES = ("logistic", "squared", "hinge")
BETA_EFF_GRID = (0.01, 0.04, 0.16, 0.64)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Locked sweep config; ``arg`` = lab variant (default ``small``)."""
  variant = arg or "small"
  c = presets.base("gpo", variant, presets.gpo_eval(every=25, n_prompts=0, samples_per_prompt=1))
  c.lab.gold_kind = "coherent"
  c.train.steps = 150
  c.sweep = ml_collections.ConfigDict(dict(
      families=FAMILIES,
      beta_effs=BETA_EFF_GRID,
      betas=(),                    # raw betas instead (tuple or {family: tuple})
      seeds=(0, 1, 2),
      lrs=(3e-4,),
      gammas=(0.0,),               # 0 = hard labels from the dataset
      # 512 of the lab's 4096 pairs (0 = all); the tiny lab has 512 in all
      data_sizes=(512,)))
  c.lock()
  return c
