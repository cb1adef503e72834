"""KL-regularised policy gradient with the REINFORCE leave-one-out (RLOO) estimator.

Every function here is pure math on per-sequence log-probabilities and scalar rewards;
nothing sees a model or sampler. Shape suffixes: ``B`` batch, ``P`` prompts, ``K``
samples per prompt (estimator functions) or actions (tabular functions).

The objective is the KL-regularised expected reward

  ``J(pi) = E_{y ~ pi}[r(y)] - kl_coef * KL(pi || pi_ref)
          = E_{y ~ pi}[r(y) - kl_coef * (log pi(y) - log pi_ref(y))]``.

Its score-function gradient is ``E[(r(y) - kl_coef log(pi/pi_ref)(y)) grad log pi(y)]``:
the extra ``-kl_coef E[grad log pi(y)]`` from differentiating ``log pi`` inside the
reward vanishes because ``E[grad log pi] = 0``. So the KL-penalised reward of
:func:`kl_regularised_reward` is treated as a constant (stop-gradient) and fed to the
estimator. RLOO draws ``K >= 2`` samples per prompt and uses, for each sample, the mean
reward of the other ``K - 1`` as its baseline; the baseline is independent of the sample
it is subtracted from, so the estimator stays unbiased while its variance drops.

References:
  Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
  Learning from Human Feedback in LLMs" (RLOO for RLHF), arXiv 2402.14740.
  Kool, van Hoof, Welling 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!",
  ICLR 2019 Deep RL Meets Structured Prediction workshop.
  Williams 1992, "Simple Statistical Gradient-Following Algorithms for Connectionist
  Reinforcement Learning" (REINFORCE).
  Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (KL-penalised
  reward), arXiv 1909.08593.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlogy

from gpo_jax.core import compat

Array = jax.Array


def _check_kl_coef(kl_coef) -> None:
  """Raises ValueError unless a concrete ``kl_coef`` is finite and ``>= 0``; traced passes."""
  c = compat.concrete_value(kl_coef)
  if c is None:
    return
  if c.dtype.kind not in "fiu" or not np.all(np.isfinite(c)) or not np.all(c >= 0):
    raise ValueError(f"kl_coef must be finite and >= 0, got {kl_coef!r}.")


def kl_regularised_reward(score_B: Array, logp_B: Array, logp_ref_B: Array, kl_coef) -> Array:
  """KL-penalised reward ``score - kl_coef * (log pi(y) - log pi_ref(y))``, stop-gradient.

  The per-sample log-ratio is an unbiased single-sample estimate of
  ``KL(pi || pi_ref)``; subtracting it from the score turns the expected reward into the
  KL-regularised objective. The result is wrapped in ``stop_gradient``: in the
  score-function estimator the reward is a constant weight on ``grad log pi`` (see the
  module docstring for why that stays unbiased).

  Args:
    score_B: ``[B]`` reward-model (or gold) scores.
    logp_B: ``[B]`` sequence log-probs under the policy.
    logp_ref_B: ``[B]`` sequence log-probs under the reference policy.
    kl_coef: non-negative KL coefficient (scalar or broadcastable; may be traced).

  Returns:
    ``reward_B``, with no gradient to any input.

  References:
    Ziegler et al. 2019, arXiv 1909.08593; Ahmadian et al. 2024, arXiv 2402.14740.
  """
  _check_kl_coef(kl_coef)
  return jax.lax.stop_gradient(score_B - kl_coef * (logp_B - logp_ref_B))


def rloo_advantages(reward_PxK: Array) -> Array:
  """Leave-one-out advantages ``A_i = r_i - mean_{j != i} r_j`` within each prompt.

  Equivalently ``A_i = K / (K - 1) * (r_i - mean_j r_j)``, the form used here; the
  advantages of one prompt sum to zero.

  Args:
    reward_PxK: ``[P, K]`` rewards of ``K >= 2`` samples for each of ``P`` prompts (any
      leading shape; samples on the last axis).

  Returns:
    ``[P, K]`` advantages, stop-gradient.

  Raises:
    ValueError: if the last axis has fewer than two samples (static shape check).

  References:
    Kool et al. 2019 (leave-one-out baseline); Ahmadian et al. 2024, arXiv 2402.14740.
  """
  r = jnp.asarray(reward_PxK)
  if r.ndim < 1 or r.shape[-1] < 2:
    raise ValueError(
        "RLOO needs at least K = 2 samples per prompt on the last axis, "
        f"got reward shape {tuple(r.shape)}.")
  k = r.shape[-1]
  centred = r - r.mean(axis=-1, keepdims=True)
  return jax.lax.stop_gradient(centred * (k / (k - 1)))


def rloo_loss(logp_PxK: Array, reward_PxK: Array) -> Array:
  """Scalar RLOO surrogate loss ``-mean_{p, i}(stop_gradient(A_pi) * log pi(y_pi))``.

  Minimising it ascends the reward: its gradient is minus the RLOO estimate of
  ``grad E_pi[r]``, averaged over prompts, where ``r`` may already hold the KL penalty
  (:func:`kl_regularised_reward`), making it an estimate of ``-grad J``. The loss value
  itself is not an estimate of anything useful; only its gradient is.

  Args:
    logp_PxK: ``[P, K]`` policy sequence log-probs of the sampled responses (carries the
      gradient).
    reward_PxK: ``[P, K]`` their rewards (gradient is stopped).

  Returns:
    Scalar loss.

  Raises:
    ValueError: on mismatched shapes or ``K < 2``.

  References:
    Ahmadian et al. 2024, arXiv 2402.14740; Kool et al. 2019; Williams 1992.
  """
  logp = jnp.asarray(logp_PxK)
  reward = jnp.asarray(reward_PxK)
  if logp.shape != reward.shape:
    raise ValueError(
        f"logp_PxK and reward_PxK must have the same shape, got {tuple(logp.shape)} and "
        f"{tuple(reward.shape)}.")
  return -jnp.mean(rloo_advantages(reward) * logp)


def kl_regularised_objective_exact(pi_K: Array, pi_ref_K: Array, r_K: Array, kl_coef) -> Array:
  """Tabular KL-regularised objective ``sum_a pi(a) r(a) - kl_coef * KL(pi || pi_ref)``.

  Exact (no sampling) over ``K`` actions, for bandit tests and analysis. Actions with
  ``pi(a) = 0`` contribute nothing (``0 log 0 = 0``); ``pi(a) > 0 = pi_ref(a)`` gives an
  infinite KL (and so ``nan`` when ``kl_coef = 0``, as ``0 * inf``).

  Args:
    pi_K: ``[..., K]`` policy probabilities (summing to one on the last axis).
    pi_ref_K: ``[..., K]`` reference probabilities.
    r_K: ``[..., K]`` rewards per action.
    kl_coef: non-negative KL coefficient (may be traced).

  Returns:
    ``[...]`` objective values (scalar for 1-D inputs).

  References:
    Ziegler et al. 2019, arXiv 1909.08593; Ahmadian et al. 2024, arXiv 2402.14740.
  """
  _check_kl_coef(kl_coef)
  expected_reward = jnp.sum(pi_K * r_K, axis=-1)
  kl = jnp.sum(xlogy(pi_K, pi_K) - xlogy(pi_K, pi_ref_K), axis=-1)
  return expected_reward - kl_coef * kl


# ----------------------------------------------------------------------- token level


def returns_to_go(r_BxT: Array, mask_BxT: Array) -> Array:
  """``G_t = Σ_{t' ≥ t} r_t'`` over the masked (response) positions; 0 where masked out."""
  r = r_BxT * mask_BxT
  return jnp.flip(jnp.cumsum(jnp.flip(r, -1), -1), -1) * mask_BxT


def token_rloo_loss(logp_PxKxT: Array, r_PxKxT: Array, mask_PxKxT: Array) -> Array:
  """Token-level REINFORCE surrogate with returns-to-go and a leave-one-out baseline.

  Sample ``k`` of prompt ``p`` contributes ``−Σ_t log π(a_t|s_t)·sg(G_t − b_t)``, where
  ``G_t`` is its return from ``t`` on (:func:`returns_to_go`: a token's action cannot change
  the rewards before it, so only later rewards multiply its score) and ``b_t`` the mean of
  the other ``K − 1`` samples' ``G_t`` at the same position (independent of the sample, so
  the estimator stays unbiased; positions past a sample's end count as 0). The mean over
  prompts and samples is returned; its gradient estimates ``−∇ E_π[Σ_t r_t]`` for
  rewards ``r`` held constant (stop-gradient).
  """
  k = logp_PxKxT.shape[1]
  if k < 2:
    raise ValueError(f"token_rloo_loss needs K >= 2 samples per prompt, got K={k}.")
  g = jax.lax.stop_gradient(returns_to_go(r_PxKxT, mask_PxKxT))
  baseline = (jnp.sum(g, axis=1, keepdims=True) - g) / (k - 1)
  adv = jax.lax.stop_gradient((g - baseline) * mask_PxKxT)
  return -jnp.mean(jnp.sum(logp_PxKxT * mask_PxKxT * adv, axis=-1))
