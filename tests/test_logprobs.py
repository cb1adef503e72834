"""Tests for gpo_jax.core.logprobs against independent NumPy references and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpo_jax.core import logprobs as lp


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.fixture
def logits():
  return np.random.default_rng(0).normal(size=(3, 5, 7)).astype(np.float32) * 2.0


def test_token_logprobs_matches_numpy(logits):
  targets = np.random.default_rng(1).integers(0, 7, size=(3, 5))
  got = lp.token_logprobs(jnp.asarray(logits), jnp.asarray(targets))
  ref = np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5,
                             err_msg="token log-probs disagree with a float64 log-softmax gather")


def test_sequence_logprobs_sum_and_mean_match_numpy():
  rng = np.random.default_rng(2)
  logp = -rng.exponential(size=(4, 6)).astype(np.float32)
  mask = (rng.random((4, 6)) < 0.6).astype(np.float32)
  mask[0] = 1.0
  got_sum = lp.sequence_logprobs(jnp.asarray(logp), jnp.asarray(mask))
  got_mean = lp.sequence_logprobs(jnp.asarray(logp), jnp.asarray(mask), length_normalize=True)
  ref_sum = (logp * mask).sum(-1)
  ref_mean = ref_sum / np.maximum(mask.sum(-1), 1)
  np.testing.assert_allclose(got_sum, ref_sum, rtol=1e-6, err_msg="masked sum is wrong")
  np.testing.assert_allclose(got_mean, ref_mean, rtol=1e-6,
                             err_msg="length_normalize must divide by the number of unmasked tokens")


def test_sequence_logprobs_ignores_masked_values_even_if_infinite():
  logp = jnp.array([[-1.0, -2.0, -jnp.inf, jnp.nan]])
  mask = jnp.array([[1, 1, 0, 0]])
  for norm, want in ((False, -3.0), (True, -1.5)):
    got = lp.sequence_logprobs(logp, mask, length_normalize=norm)
    assert float(got[0]) == pytest.approx(want), "masked -inf/NaN positions leaked into the sum"


@pytest.mark.parametrize("length_normalize", [False, True])
def test_all_masked_row_is_zero_with_finite_gradient(length_normalize):
  logp = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -jnp.inf, -1.0]])
  mask = jnp.array([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])

  def total(x):
    return jnp.sum(lp.sequence_logprobs(x, mask, length_normalize))

  value = lp.sequence_logprobs(logp, mask, length_normalize)
  grad = jax.grad(total)(logp)
  assert float(value[1]) == 0.0, "an all-masked row must score exactly 0"
  assert np.all(np.isfinite(np.asarray(grad))), f"gradient has NaN/inf: {grad}"
  np.testing.assert_array_equal(grad[1], 0.0, err_msg="all-masked row must get zero gradient")
  want_row0 = np.array([1.0, 0.0, 1.0]) / (2.0 if length_normalize else 1.0)
  np.testing.assert_allclose(grad[0], want_row0, err_msg="gradient must equal mask (/count)")


def test_entropy_matches_numpy_and_closed_forms(logits):
  got = lp.token_entropy(jnp.asarray(logits))
  logq = _np_log_softmax(logits)
  ref = -(np.exp(logq) * logq).sum(-1)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg="entropy vs NumPy")
  uniform = lp.token_entropy(jnp.zeros((1, 1, 7)))
  assert float(uniform[0, 0]) == pytest.approx(np.log(7), rel=1e-6), "uniform entropy must be log V"
  # A -inf logit removes a token: entropy of the remaining 6 equal tokens is log 6, no NaN.
  masked = jnp.zeros((1, 1, 7)).at[..., 0].set(-jnp.inf)
  assert float(lp.token_entropy(masked)[0, 0]) == pytest.approx(np.log(6), rel=1e-6)
  g = jax.grad(lambda x: lp.token_entropy(x).sum())(masked)
  assert np.all(np.isfinite(np.asarray(g))), "entropy gradient must be finite with -inf logits"


def test_kl_matches_numpy_is_nonnegative_and_zero_on_equal(logits):
  other = np.random.default_rng(3).normal(size=logits.shape).astype(np.float32)
  got = lp.token_kl(jnp.asarray(logits), jnp.asarray(other))
  lpp, lqq = _np_log_softmax(logits), _np_log_softmax(other)
  ref = (np.exp(lpp) * (lpp - lqq)).sum(-1)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg="KL(p||q) vs NumPy")
  assert np.all(np.asarray(got) >= 0), "KL must be non-negative"
  self_kl = lp.token_kl(jnp.asarray(logits), jnp.asarray(logits) + 3.0)
  np.testing.assert_allclose(self_kl, 0.0, atol=1e-6,
                             err_msg="KL of identical distributions (logits shifted by a constant) must be 0")
  reverse = lp.token_kl(jnp.asarray(other), jnp.asarray(logits))
  assert not np.allclose(reverse, got), "KL must not be symmetric: argument order is likely ignored"


def test_kl_handles_disjoint_support():
  p = jnp.array([[[0.0, 0.0, -jnp.inf]]])  # p puts no mass on token 2
  q = jnp.array([[[0.0, 1.0, -jnp.inf]]])
  got = float(lp.token_kl(p, q)[0, 0])
  pp = np.array([0.5, 0.5])
  qq = np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum()
  assert got == pytest.approx(float((pp * np.log(pp / qq)).sum()), rel=1e-5)
  full = jnp.zeros((1, 1, 3))
  assert float(lp.token_kl(full, p)[0, 0]) == np.inf, "q = 0 where p > 0 must give +inf"
