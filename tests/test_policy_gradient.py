"""Tests for gpo_jax.objectives.policy_gradient in a tabular bandit with a softmax policy.

The policy is ``pi = softmax(theta)`` over ``A`` actions and each "prompt" draws ``k``
actions from it. The RLOO surrogate must satisfy ``E[grad rloo_loss] = -grad J(theta)``
with ``J`` the exact KL-regularised objective: checked exactly by enumerating every tuple
of sampled actions, and by Monte Carlo against a standard-error band that also rejects
deliberately wrong estimators.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpo_jax.objectives import policy_gradient as PG


@jax.jit
def exact_grad(theta, pi_ref, r, kl_coef):
  """``grad_theta J(softmax(theta))`` by autodiff of the exact tabular objective."""
  return jax.grad(
      lambda th: PG.kl_regularised_objective_exact(jax.nn.softmax(th), pi_ref, r, kl_coef))(theta)


def prompt_loss(theta, actions_k, pi_ref, r, kl_coef):
  """RLOO loss of one prompt whose ``k`` sampled actions are ``actions_k``."""
  logp_all = jax.nn.log_softmax(theta)
  logp = logp_all[actions_k]
  reward = PG.kl_regularised_reward(r[actions_k], logp, jnp.log(pi_ref)[actions_k], kl_coef)
  return PG.rloo_loss(logp[None], reward[None])


def uncorrected_mean_baseline_loss(theta, actions_k, pi_ref, r, kl_coef):
  """WRONG: baseline is the mean including the sample itself, without the K/(K-1) factor."""
  logp = jax.nn.log_softmax(theta)[actions_k]
  reward = jax.lax.stop_gradient(r[actions_k] - kl_coef * (logp - jnp.log(pi_ref)[actions_k]))
  adv = reward - reward.mean()
  return -jnp.mean(adv * logp)


def no_kl_loss(theta, actions_k, pi_ref, r, kl_coef):
  """WRONG for kl_coef > 0: the KL penalty is left out of the reward."""
  del kl_coef
  return prompt_loss(theta, actions_k, pi_ref, r, 0.0)


def batched_grads(loss_fn):
  """jit(vmap(grad)) of a one-prompt loss over a leading axis of sampled-action tuples."""
  return jax.jit(jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, None, None, None)))


GRADS = {fn.__name__: batched_grads(fn)
         for fn in (prompt_loss, uncorrected_mean_baseline_loss, no_kl_loss)}


def random_bandit(seed, n_actions):
  rng = np.random.default_rng(seed)
  theta = rng.normal(size=n_actions)
  r = rng.normal(size=n_actions)
  pi_ref = rng.dirichlet(np.ones(n_actions))
  return theta, pi_ref, r


# ---------------------------------------------------------------- (a) exact expectation


@functools.partial(jax.jit, static_argnums=0)
def expected_grad(loss_name, theta, tuples_NxK, pi_ref, r, kl_coef):
  """``sum_n P(tuple_n) grad loss(tuple_n)`` over all sampled-action tuples."""
  weights = jnp.prod(jax.nn.softmax(theta)[tuples_NxK], axis=1)
  return weights @ GRADS[loss_name](theta, tuples_NxK, pi_ref, r, kl_coef), weights.sum()


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_rloo_gradient_is_exactly_unbiased_by_enumeration(k, seed):
  n_actions = 3
  with jax.enable_x64(True):
    theta, pi_ref, r = (jnp.asarray(a, jnp.float64) for a in random_bandit(seed, n_actions))
    tuples = jnp.asarray(list(itertools.product(range(n_actions), repeat=k)), jnp.int32)
    assert tuples.shape == (n_actions ** k, k)
    for kl_coef in [0.0, 0.1, 1.0, 3.0]:
      expected, total = expected_grad("prompt_loss", theta, tuples, pi_ref, r, kl_coef)
      np.testing.assert_allclose(float(total), 1.0, rtol=1e-12)
      target = -np.asarray(exact_grad(theta, pi_ref, r, kl_coef))
      assert np.max(np.abs(target)) > 1e-3  # a non-trivial gradient
      np.testing.assert_allclose(np.asarray(expected), target, rtol=1e-9, atol=1e-12)
      # The self-including mean baseline shrinks the gradient by exactly (k - 1) / k.
      wrong, _ = expected_grad("uncorrected_mean_baseline_loss", theta, tuples, pi_ref, r,
                               kl_coef)
      np.testing.assert_allclose(np.asarray(wrong), (k - 1) / k * target, rtol=1e-9,
                                 atol=1e-12)
      assert not np.allclose(np.asarray(wrong), target, rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------- (b) Monte Carlo


N_ACTIONS, K_SAMPLES, N_PROMPTS = 4, 4, 20000


@jax.jit
def sample_actions(seed, theta):
  """``[P, k]`` actions, k i.i.d. draws from ``softmax(theta)`` for each of P prompts."""
  return jax.random.categorical(jax.random.PRNGKey(seed), jax.nn.log_softmax(theta),
                                shape=(N_PROMPTS, K_SAMPLES))


def per_prompt_grads(loss_fn, theta, pi_ref, r, kl_coef, seed):
  """``[P, A]`` per-prompt gradients of ``loss_fn`` for P prompts of k sampled actions each."""
  actions = sample_actions(seed, theta)
  grads = GRADS[loss_fn.__name__](theta, actions, pi_ref, r, kl_coef)
  return np.asarray(grads, np.float64), actions


@jax.jit
@jax.grad
def batched_grad(theta, actions_PxK, pi_ref, r, kl_coef):
  """Gradient of the RLOO loss of all P prompts at once (one ``[P, K]`` call)."""
  logp = jax.nn.log_softmax(theta)[actions_PxK]
  reward = PG.kl_regularised_reward(r[actions_PxK], logp, jnp.log(pi_ref)[actions_PxK], kl_coef)
  return PG.rloo_loss(logp, reward)


def z_scores(grads_PxA, target_A):
  """``|mean - target| / SE`` per coordinate, SE from the spread of per-prompt gradients."""
  se = grads_PxA.std(axis=0, ddof=1) / np.sqrt(grads_PxA.shape[0])
  assert np.all(se > 0)
  return np.abs(grads_PxA.mean(axis=0) - target_A) / se


@pytest.mark.parametrize("seed,kl_coef", [(2, 0.0), (3, 0.5), (4, 2.0)])
def test_rloo_monte_carlo_within_four_standard_errors(seed, kl_coef):
  theta, pi_ref, r = (jnp.asarray(a, jnp.float32) for a in random_bandit(seed, N_ACTIONS))
  target = -np.asarray(exact_grad(theta, pi_ref, r, kl_coef), np.float64)
  grads, actions = per_prompt_grads(prompt_loss, theta, pi_ref, r, kl_coef, seed)
  assert np.all(z_scores(grads, target) < 4.0), (grads.mean(axis=0), target)
  # The batched [P, K] loss averages the per-prompt gradients.
  np.testing.assert_allclose(np.asarray(batched_grad(theta, actions, pi_ref, r, kl_coef)),
                             grads.mean(axis=0), rtol=1e-4, atol=2e-5)


def test_monte_carlo_check_detects_uncorrected_mean_baseline():
  # Uniform policy, spread rewards, no KL: E[wrong] = (K-1)/K * grad, a bias of 0.25 * grad.
  theta = jnp.zeros(N_ACTIONS)
  pi_ref = jnp.full(N_ACTIONS, 1.0 / N_ACTIONS)
  r = jnp.array([0.0, 1.0, 2.0, 3.0])
  target = -np.asarray(exact_grad(theta, pi_ref, r, 0.0), np.float64)
  good, _ = per_prompt_grads(prompt_loss, theta, pi_ref, r, 0.0, seed=5)
  bad, _ = per_prompt_grads(uncorrected_mean_baseline_loss, theta, pi_ref, r, 0.0, seed=5)
  assert np.all(z_scores(good, target) < 4.0)
  assert np.max(z_scores(bad, target)) > 4.0


def test_monte_carlo_check_detects_missing_kl_penalty():
  # Policy far from the reference: the KL term dominates the gradient.
  theta = jnp.array([2.0, 0.0, -1.0, 0.5])
  pi_ref = jnp.array([0.05, 0.45, 0.45, 0.05])
  r = jnp.array([0.3, -0.2, 0.1, 0.0])
  kl_coef = 1.0
  target = -np.asarray(exact_grad(theta, pi_ref, r, kl_coef), np.float64)
  good, _ = per_prompt_grads(prompt_loss, theta, pi_ref, r, kl_coef, seed=6)
  bad, _ = per_prompt_grads(no_kl_loss, theta, pi_ref, r, kl_coef, seed=6)
  assert np.all(z_scores(good, target) < 4.0)
  assert np.max(z_scores(bad, target)) > 4.0


# ---------------------------------------------------------------- (c) pieces


def test_rloo_advantages_match_loop_and_sum_to_zero():
  reward = np.random.default_rng(7).normal(size=(6, 5))
  adv = np.asarray(PG.rloo_advantages(jnp.asarray(reward)))
  want = np.empty_like(reward)
  for p in range(reward.shape[0]):
    for i in range(reward.shape[1]):
      others = [reward[p, j] for j in range(reward.shape[1]) if j != i]
      want[p, i] = reward[p, i] - sum(others) / len(others)
  np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(adv.sum(axis=1), 0.0, atol=1e-5)


def test_rloo_advantages_two_samples_and_k_equal_one():
  np.testing.assert_allclose(np.asarray(PG.rloo_advantages(jnp.array([[1.0, 4.0]]))),
                             [[-3.0, 3.0]])
  with pytest.raises(ValueError, match="K = 2"):
    PG.rloo_advantages(jnp.ones((3, 1)))
  with pytest.raises(ValueError, match="K = 2"):
    PG.rloo_loss(jnp.ones((3, 1)), jnp.ones((3, 1)))


def test_stop_gradients():
  reward = jnp.array([[1.0, 2.0, 4.0]])
  g = jax.grad(lambda x: PG.rloo_advantages(x).sum() + (PG.rloo_advantages(x) ** 2).sum())(reward)
  np.testing.assert_array_equal(np.asarray(g), 0.0)
  # The loss differentiates only through logp: grad wrt logp is -A / (P K).
  logp = jnp.array([[-1.0, -2.0, -0.5]])
  g_logp, g_reward = jax.grad(PG.rloo_loss, argnums=(0, 1))(logp, reward)
  np.testing.assert_allclose(np.asarray(g_logp), -np.asarray(PG.rloo_advantages(reward)) / 3,
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(g_reward), 0.0)
  g = jax.grad(lambda s, lp, lr: PG.kl_regularised_reward(s, lp, lr, 0.5).sum(),
               argnums=(0, 1, 2))(jnp.ones(3), logp[0], jnp.zeros(3))
  for gi in g:
    np.testing.assert_array_equal(np.asarray(gi), 0.0)


def test_kl_regularised_reward_value():
  got = PG.kl_regularised_reward(jnp.array([1.0, 2.0]), jnp.array([-1.0, -3.0]),
                                 jnp.array([-2.0, -1.0]), 0.5)
  np.testing.assert_allclose(np.asarray(got), [1.0 - 0.5 * 1.0, 2.0 - 0.5 * -2.0])


def test_exact_objective_matches_numpy_and_handles_zero_probabilities():
  pi = np.array([0.5, 0.3, 0.2, 0.0])
  pi_ref = np.array([0.25, 0.25, 0.4, 0.1])
  r = np.array([1.0, -1.0, 2.0, 100.0])
  kl = sum(p * np.log(p / q) for p, q in zip(pi, pi_ref) if p > 0)
  got = PG.kl_regularised_objective_exact(jnp.asarray(pi), jnp.asarray(pi_ref), jnp.asarray(r),
                                          0.7)
  np.testing.assert_allclose(float(got), pi @ r - 0.7 * kl, rtol=1e-6)
  # KL(pi || pi) = 0.
  np.testing.assert_allclose(
      float(PG.kl_regularised_objective_exact(jnp.asarray(pi), jnp.asarray(pi), jnp.asarray(r),
                                              3.0)), pi @ r, rtol=1e-6)


@pytest.mark.parametrize("kl_coef", [-0.1, float("nan"), float("inf")])
def test_bad_kl_coef_raises(kl_coef):
  with pytest.raises(ValueError, match="kl_coef"):
    PG.kl_regularised_reward(jnp.ones(2), jnp.zeros(2), jnp.zeros(2), kl_coef)
  with pytest.raises(ValueError, match="kl_coef"):
    PG.kl_regularised_objective_exact(jnp.ones(2) / 2, jnp.ones(2) / 2, jnp.ones(2), kl_coef)


def test_rloo_loss_shape_mismatch_raises():
  with pytest.raises(ValueError, match="same shape"):
    PG.rloo_loss(jnp.ones((2, 3)), jnp.ones((3, 2)))
