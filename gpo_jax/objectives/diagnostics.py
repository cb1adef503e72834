"""The offline preference diagnostics (TRL's ``rewards/*`` plus ``rho/mean``, ``offline_reg``, ``beta_eff``), defined once.

The train step logs them on its batch and evaluation on held-out pairs; both call
:func:`preference_diagnostics`, so the two can never disagree about a definition. With
``lr_w = log π(y_w|x) − log π_ref(y_w|x)`` and ``lr_l`` likewise (per pair):

* ``rewards/chosen = mean β lr_w``, ``rewards/rejected = mean β lr_l`` (DPO's implicit
  rewards), ``rewards/margins`` their difference, ``rewards/accuracies`` the fraction of
  pairs with chosen above rejected (a tie counts as wrong, so π = π_ref scores 0);
* ``rho/mean = mean ρ`` with ``ρ = lr_w − lr_l`` (SPEC §1's log-ratio margin);
* ``offline_reg = ½ mean ρ²``, the μ-weighted squared regulariser of GPO's Taylor view;
* ``beta_eff = β · f''(0)/|f'(0)|`` (SPEC §1), the scale from
  :func:`gpo_jax.objectives.losses.beta_eff_scales`.

References:
  Tang et al. 2024, "Generalized Preference Optimization", arXiv 2402.05749.
  von Werra et al., TRL ``DPOTrainer`` (metric names).
"""

import jax
import jax.numpy as jnp

Array = jax.Array

NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
         "rho/mean", "offline_reg", "beta_eff")


def preference_diagnostics(logratio_chosen_B: Array, logratio_rejected_B: Array, beta,
                           beta_eff_scale) -> dict[str, Array]:
  """The diagnostics of one member over a batch of pairs (means over the last axis).

  Args:
    logratio_chosen_B: ``[..., B]`` ``log π(y_w) − log π_ref(y_w)``.
    logratio_rejected_B: ``[..., B]`` the same for the rejected responses.
    beta: the member's β (scalar, or ``[..., 1]`` to broadcast over leading axes).
    beta_eff_scale: ``f''(0)/|f'(0)|`` of the member's family, shaped like ``beta``.

  Returns:
    ``{name: [...]}`` for every name in :data:`NAMES`.
  """
  chosen = beta * logratio_chosen_B
  rejected = beta * logratio_rejected_B
  rho = logratio_chosen_B - logratio_rejected_B
  return {
      "rewards/chosen": jnp.mean(chosen, axis=-1),
      "rewards/rejected": jnp.mean(rejected, axis=-1),
      "rewards/margins": jnp.mean(chosen - rejected, axis=-1),
      "rewards/accuracies": jnp.mean((chosen > rejected).astype(jnp.float32), axis=-1),
      "rho/mean": jnp.mean(rho, axis=-1),
      "offline_reg": 0.5 * jnp.mean(jnp.square(rho), axis=-1),
      # shaped like the means: beta is a scalar, or [..., 1] beside [..., B] log-ratios
      "beta_eff": jnp.broadcast_to(beta * beta_eff_scale, chosen.shape[:-1] + (1,))[..., 0],
  }
