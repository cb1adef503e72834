"""RLOO and Inverse-Q* score their k samples per prompt with each prompt run once
(``model.grouped_*_logprobs``): checked here against each sample's whole sequence, through
the algorithms' own loss functions (a wrong row order would pair a response with another
sample's log-probs)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpo_jax.algorithms import inverse_q, rloo
from gpo_jax.algorithms.base import SHARED
from gpo_jax.core import model as model_lib
from gpo_jax.core import sampling
from gpo_jax.objectives import policy_gradient as pg
from gpo_jax.proxies import selectors as selectors_lib

CFG = model_lib.TransformerConfig(vocab_size=16, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                                  max_len=16)
B, C, T, K = 3, 5, 6, 4


def _setup():
  graphdef, params, rest = nnx.split(model_lib.Transformer(CFG, rngs=nnx.Rngs(0)), nnx.Param, ...)
  ref = nnx.state(model_lib.Transformer(CFG, rngs=nnx.Rngs(1)), nnx.Param)
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(4, CFG.vocab_size, (B, C)), jnp.int32).at[0, 1:3].set(0)
  return graphdef, params, rest, ref, prompt


def _whole(graphdef, p, rest, ctx, resp, mask):
  return model_lib.response_logprobs(nnx.merge(graphdef, p, rest),
                                     *sampling.concat_response(ctx, resp, mask))


def test_rloo_loss_equals_the_whole_sequence_loss_and_gradient():
  graphdef, params, rest, ref, prompt = _setup()
  # A proxy that reads the responses: 0.1 × (number of valid tokens) + token 5's count.
  score_fn = lambda pr, ctx, resp, mask: pr["w"][:, None] * (  # noqa: E731
      jnp.sum(mask, -1) + 10.0 * jnp.sum((resp == 5) * mask, -1))[None]
  table = {k: jnp.asarray(v) for k, v in selectors_lib.build(("p0",)).table().items()}
  batch = {"prompt": prompt, SHARED: {"ref": ref, "proxies": {"w": jnp.asarray([0.1])},
                                      "selectors": table}}
  hp = {"selector_idx": jnp.int32(0), "beta": jnp.float32(0.3)}
  key = jax.random.key(3)
  loss_fn = rloo.member_loss_fn(graphdef, rest, score_fn, k=K, response_len=T)

  def whole_loss(p):
    sampler = nnx.merge(graphdef, jax.lax.stop_gradient(p), rest)
    resp, mask = sampling.sample(sampler, prompt, key, max_new_tokens=T, repeats=K)
    ctx = jnp.repeat(prompt, K, axis=0)
    logp = _whole(graphdef, p, rest, ctx, resp, mask)
    logp_ref = _whole(graphdef, ref, rest, ctx, resp, mask)
    proxy = selectors_lib.apply(table, score_fn({"w": jnp.asarray([0.1])}, ctx, resp, mask), 0)
    reward = pg.kl_regularised_reward(proxy, logp, logp_ref, 0.3)
    return pg.rloo_loss(logp.reshape(B, K), reward.reshape(B, K)), jnp.mean(logp - logp_ref)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, hp, key)
  (want, kl), want_grads = jax.value_and_grad(whole_loss, has_aux=True)(params)
  assert abs(float(kl)) > 1e-2, "π and π_ref differ, so the KL term is informative"
  np.testing.assert_allclose(float(metrics["rl/kl"]), float(kl), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-5, atol=1e-6)
  for a, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-4, atol=1e-6)


def test_inverse_q_token_logprobs_with_repeats_equal_whole_sequences():
  graphdef, params, rest, ref, prompt = _setup()
  model = nnx.merge(graphdef, params, rest)
  resp, mask = sampling.sample(model, prompt, jax.random.key(1), max_new_tokens=T, repeats=K)
  m = mask.astype(jnp.float32)
  got = inverse_q.response_token_logprobs(model, prompt, resp, m, K)
  ctx = jnp.repeat(prompt, K, axis=0)
  tokens = jnp.concatenate([ctx, resp], axis=1)
  want = jax.nn.log_softmax(model(tokens[:, :-1])[:, C - 1:], axis=-1)
  want = jnp.take_along_axis(want, resp[..., None], axis=-1)[..., 0] * m
  assert got.shape == (B * K, T)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # Sums match the whole-sequence response log-probs row by row.
  np.testing.assert_allclose(np.asarray(jnp.sum(got, -1)),
                             np.asarray(_whole(graphdef, params, rest, ctx, resp, mask)),
                             rtol=1e-5, atol=1e-5)
