"""Tests for gpo_jax.core.model: causality, shapes, reward model reads, parameter and FLOP counts."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpo_jax.core import logprobs as lp
from gpo_jax.core import model as gm

# Square weight shapes keep the number of distinct XLA compilations (the main test cost) small.
CFG = gm.TransformerConfig(vocab_size=8, d_model=8, n_layers=2, n_heads=2, d_ff=8, max_len=8)


def forward(model, tokens):
  return _jit_call(model, tokens)


_jit_call = nnx.jit(lambda model, tokens: model(tokens))
_jit_rm = nnx.jit(lambda model, tokens, mask: model(tokens, mask))


@pytest.fixture(scope="module")
def lm():
  return gm.Transformer(CFG, rngs=nnx.Rngs(0))


def _tokens(seed, b=3, n=7, vocab=CFG.vocab_size):
  return jnp.asarray(np.random.default_rng(seed).integers(4, vocab, size=(b, n)), jnp.int32)


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="n_heads"):
    gm.TransformerConfig(vocab_size=8, d_model=10, n_layers=1, n_heads=3, d_ff=8, max_len=4)
  with pytest.raises(ValueError, match="float16"):
    gm.TransformerConfig(8, 8, 1, 2, 8, 4, dtype="float16")
  with pytest.raises(ValueError, match="d_ff"):
    gm.TransformerConfig(8, 8, 1, 2, 0, 4)


def test_logits_shape_and_length_check(lm):
  logits = forward(lm, _tokens(0))
  assert logits.shape == (3, 7, CFG.vocab_size) and logits.dtype == jnp.float32
  with pytest.raises(ValueError, match="max_len"):
    lm(_tokens(0, n=CFG.max_len + 1))


def test_causality_by_gradients(lm):
  """d logits[t] / d h[s] must vanish exactly for every s > t and not for s <= t."""
  h_LxD = lm.decoder.embed(_tokens(1, b=1))[0]
  graphdef, state = nnx.split(lm)
  jac_fn = jax.jit(jax.jacrev(lambda h, st: nnx.merge(graphdef, st).forward_embedded(h[None])[0]))
  jac_LxVxLxD = jac_fn(h_LxD, state)
  norm_LxL = np.asarray(jnp.sqrt(jnp.sum(jac_LxVxLxD**2, axis=(1, 3))))
  n = norm_LxL.shape[0]
  future = np.triu(np.ones((n, n), bool), k=1)
  assert np.all(norm_LxL[future] == 0.0), f"logits depend on future inputs:\n{norm_LxL}"
  assert np.all(norm_LxL[~future] > 0.0), f"logits ignore some past inputs:\n{norm_LxL}"


def test_jit_equals_eager(lm):
  tokens = _tokens(2)
  graphdef, state = nnx.split(lm)
  jitted = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, tokens)
  np.testing.assert_allclose(jitted, lm(tokens), rtol=1e-5, atol=1e-6, err_msg="jit != eager")


def test_weights_carry_logical_axis_names(lm):
  state = nnx.state(lm, nnx.Param)
  names = {tuple(v.get_metadata()["out_sharding"]) for v in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))}
  assert ("vocab", "embed") in names and ("embed", "mlp") in names
  assert ("embed", None, "heads", "kv") in names and ("heads", "kv", "embed") in names


def _expected_params(cfg: gm.TransformerConfig) -> int:
  d, f = cfg.d_model, cfg.d_ff
  per_layer = 3 * d * d + d * d + 2 * d * f + 2 * d  # qkv, out, mlp, two norm scales
  unembed = 0 if cfg.tie_embeddings else d * cfg.vocab_size
  return cfg.vocab_size * d + cfg.max_len * d + cfg.n_layers * per_layer + d + unembed


@pytest.mark.parametrize("tie", [False, True])
def test_param_count_closed_form(tie):
  cfg = gm.TransformerConfig(13, 16, 3, 2, 40, 9, tie_embeddings=tie)
  # eval_shape: shapes only, so no initialiser has to compile.
  model = nnx.eval_shape(lambda: gm.Transformer(cfg, rngs=nnx.Rngs(0)))
  assert gm.param_count(model) == _expected_params(cfg)
  assert gm.param_count(nnx.state(model, nnx.Param)) == _expected_params(cfg)
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda st, x: nnx.merge(graphdef, st)(x), state, _tokens(0, vocab=13))
  assert out.shape == (3, 7, 13)


def _dot_flops(jaxpr) -> int:
  """2 x (output size) x (contracted size) summed over every dot_general, sub-jaxprs included."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      contracted = math.prod(lhs_shape[i] for i in lhs_contract)
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * contracted
    for param in eqn.params.values():
      sub = getattr(param, "jaxpr", param)
      if hasattr(sub, "eqns"):
        total += _dot_flops(sub)
  return total


@pytest.mark.parametrize("tie", [False, True])
def test_flops_per_token_counts_every_matmul(tie):
  cfg = gm.TransformerConfig(13, 16, 3, 2, 40, 12, tie_embeddings=tie)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: gm.Transformer(cfg, rngs=nnx.Rngs(0))))
  b, n = 2, 12
  fwd = lambda st, x: nnx.merge(graphdef, st)(x)  # noqa: E731
  jaxpr = jax.make_jaxpr(fwd)(state, _tokens(0, b=b, n=n, vocab=13)).jaxpr
  assert _dot_flops(jaxpr) == gm.flops_per_token(cfg, n) * b * n, (
      "flops_per_token disagrees with the matmuls actually traced in the forward pass")


def test_response_logprobs_matches_manual_gather(lm):
  tokens = _tokens(3)
  mask = jnp.zeros(tokens.shape).at[:, 4:].set(1.0).at[0, 6].set(0.0).at[:, 0].set(1.0)
  logp = np.asarray(jax.nn.log_softmax(forward(lm, tokens), -1))
  ref = np.zeros(3)
  for i in range(3):
    for t in range(1, tokens.shape[1]):  # position 0 is never a target
      if mask[i, t]:
        ref[i] += logp[i, t - 1, int(tokens[i, t])]
  rlp = nnx.jit(gm.response_logprobs, static_argnames="length_normalize")
  got = rlp(lm, tokens, mask)
  np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg="logits at t must score token t+1")
  count = np.asarray(mask[:, 1:].sum(-1))
  np.testing.assert_allclose(rlp(lm, tokens, mask, length_normalize=True), ref / count, rtol=1e-5)


def test_bfloat16_compute_is_close_to_float32():
  cfg16 = dataclasses.replace(CFG, dtype="bfloat16")
  m32, m16 = gm.Transformer(CFG, rngs=nnx.Rngs(0)), gm.Transformer(cfg16, rngs=nnx.Rngs(0))
  tokens = _tokens(4)
  out16 = forward(m16, tokens)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, forward(m32, tokens), atol=5e-2)


@pytest.fixture(scope="module")
def rm():
  return gm.RewardModel(CFG, rngs=nnx.Rngs(5))


def test_reward_model_reads_last_valid_token(rm):
  tokens = _tokens(6, n=8)
  lengths = jnp.array([8, 5, 3])
  mask = (jnp.arange(8)[None] < lengths[:, None]).astype(jnp.int32)
  tokens = jnp.where(mask == 1, tokens, 0)
  score = _jit_rm(rm, tokens, mask)
  assert score.shape == (3,) and score.dtype == jnp.float32
  # Arbitrary junk after the last valid token must not change the score (causal trunk).
  junk = jnp.where(mask == 1, tokens, _tokens(7, n=8))
  np.testing.assert_allclose(_jit_rm(rm, junk, mask), score, rtol=1e-6, atol=1e-6,
                             err_msg="score depends on tokens after the last valid position")
  # ... but the last valid token itself must matter.
  changed = tokens.at[jnp.arange(3), lengths - 1].set(tokens[jnp.arange(3), lengths - 1] % 7 + 4)
  assert np.all(np.abs(np.asarray(_jit_rm(rm, changed, mask) - score)) > 1e-6), (
      "score ignores the last valid token; it is read at the wrong position")
  # Scoring only the prefix gives the same number: the read position is the last valid one.
  np.testing.assert_allclose(_jit_rm(rm, tokens[1:2, :5], mask[1:2, :5]), score[1:2],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_jit_rm(rm, tokens, None), score, rtol=1e-6, err_msg="default mask must be tokens != PAD")


def test_reward_model_gradient_flows(rm):
  tokens = _tokens(8)
  graphdef, params, rest = nnx.split(rm, nnx.Param, ...)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(tokens))))(params)
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
  zero = [g.shape for g in leaves if not np.any(np.asarray(g))]
  assert zero == [], f"parameters with identically zero gradient: {zero}"


@pytest.mark.parametrize("n_layers", [1, 3])
def test_extend_at_a_read_position_equals_the_extension_there(n_layers):
  """``Decoder.extend_at`` (the last block's query, attention and MLP at one position per
  row) gives ``extend``'s states at those positions, and costs fewer FLOPs."""
  cfg = gm.TransformerConfig(vocab_size=16, d_model=32, n_layers=n_layers, n_heads=4,
                                    d_ff=64, max_len=24)
  rm = gm.RewardModel(cfg, rngs=nnx.Rngs(1))
  g, state = nnx.split(rm)
  state = jax.tree.map(lambda x: x * 10.0, state)     # far from uniform attention
  key_c, key_t = jax.random.split(jax.random.key(2))
  ctx = jax.random.randint(key_c, (6, 5), 1, 16)
  tokens = jax.random.randint(key_t, (6, 9), 1, 16)
  read = jnp.array([0, 8, 3, 4, 7, 1])

  def both(state):
    dec = nnx.merge(g, state).decoder
    prefix = dec(dec.embed(ctx))[1]
    return dec.extend(tokens, prefix)[jnp.arange(6), read], dec.extend_at(tokens, prefix, read)

  full, at = jax.jit(both)(state)
  assert float(jnp.std(full)) > 0.1
  np.testing.assert_allclose(at, full, rtol=1e-5, atol=1e-5)
  # one row's read moved: only that row changes
  other = read.at[2].set(6)
  dec = nnx.merge(g, state).decoder
  moved = dec.extend_at(tokens, dec(dec.embed(ctx))[1], other)
  np.testing.assert_allclose(np.delete(moved, 2, 0), np.delete(at, 2, 0), rtol=1e-4, atol=1e-4)
  assert float(jnp.max(jnp.abs(moved[2] - at[2]))) > 1e-3

  def flops(method):
    def f(state):
      dec = nnx.merge(g, state).decoder
      prefix = dec(dec.embed(ctx))[1]
      return (dec.extend(tokens, prefix)[:, 0] if method == "extend"
              else dec.extend_at(tokens, prefix, read))
    cost = jax.jit(f).lower(state).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  assert flops("extend_at") < flops("extend")


def _full_logps(model, prompt, resp, mask, length_normalize):
  tokens = jnp.concatenate([prompt, resp], axis=1)
  full_mask = jnp.concatenate([jnp.zeros(prompt.shape, mask.dtype), mask], axis=1)
  return gm.response_logprobs(model, tokens, full_mask, length_normalize=length_normalize)


@pytest.mark.parametrize("n_resp,t,length_normalize", [(1, 4, False), (2, 4, False),
                                                       (3, 3, True), (2, 1, False)])
def test_prompt_response_logprobs_equal_each_sequence_run_whole(lm, n_resp, t, length_normalize):
  """The shared-prompt path equals running ``prompt + response`` as one sequence per response
  (prompts with PAD inside, responses of varied masks, one-token responses), gradients too."""
  rng = np.random.default_rng(n_resp * 10 + t)
  b, p = 4, 4
  prompt = jnp.asarray(rng.integers(0, CFG.vocab_size, (b, p)), jnp.int32).at[0, 1:3].set(0)
  resps = [jnp.asarray(rng.integers(3, CFG.vocab_size, (b, t)), jnp.int32) for _ in range(n_resp)]
  masks = [jnp.asarray(np.arange(t)[None] < rng.integers(1, t + 1, (b, 1)), jnp.float32)
           for _ in range(n_resp)]
  gd, st = nnx.split(lm)

  def shared(s):
    return gm.prompt_response_logprobs(nnx.merge(gd, s), prompt, resps, masks, length_normalize)

  def whole(s):
    return tuple(_full_logps(nnx.merge(gd, s), prompt, r, m, length_normalize)
                 for r, m in zip(resps, masks))

  got, want = jax.jit(shared)(st), jax.jit(whole)(st)
  assert len(got) == n_resp and all(g.shape == (b,) for g in got)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
  # Gradients of a weighted sum (each response batch its own weight) agree leaf by leaf.
  weigh = lambda outs: sum((i + 1.0) * jnp.sum(o) for i, o in enumerate(outs))  # noqa: E731
  g_shared = jax.jit(jax.grad(lambda s: weigh(shared(s))))(st)
  g_whole = jax.jit(jax.grad(lambda s: weigh(whole(s))))(st)
  for a, w in zip(jax.tree.leaves(g_shared), jax.tree.leaves(g_whole)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_prompt_response_logprobs_run_the_prompt_once():
  """XLA's FLOP count: a chosen/rejected pair through the shared prompt costs what
  ``B·P + 2B·(T − 1)`` positions cost, not the ``2B·(P + T − 1)`` of two whole sequences."""
  cfg = gm.TransformerConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=32)
  model = gm.Transformer(cfg, rngs=nnx.Rngs(1))
  gd, st = nnx.split(model)
  b, p, t = 8, 12, 8
  prompt = jnp.ones((b, p), jnp.int32)
  resp, mask = jnp.full((b, t), 5, jnp.int32), jnp.ones((b, t), jnp.float32)

  def flops(fn):
    cost = jax.jit(fn).lower(st, prompt, resp, resp + 1, mask).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

  shared = flops(lambda s, pr, r1, r2, m: gm.prompt_response_logprobs(
      nnx.merge(gd, s), pr, (r1, r2), (m, m)))
  # The former path: chosen and rejected each run whole, in one batch.
  whole = flops(lambda s, pr, r1, r2, m: _full_logps(
      nnx.merge(gd, s), jnp.concatenate([pr, pr]), jnp.concatenate([r1, r2]),
      jnp.concatenate([m, m]), False))
  ratio = shared / whole
  want = (p + 2 * (t - 1)) / (2 * (p + t - 1))
  assert ratio < 0.85, (shared, whole)
  assert ratio == pytest.approx(want, rel=0.12), (ratio, want)


@pytest.mark.parametrize("n,t", [(1, 4), (4, 3), (3, 1)])
def test_grouped_token_logprobs_equal_each_repeated_sequence(lm, n, t):
  """``N`` responses per prompt as one ``[B, N, T]`` array: per-token log-probs equal the
  response part of running ``prompt + response`` whole with the prompt repeated (PAD inside
  a prompt too), and the grouped sums equal ``response_logprobs``."""
  rng = np.random.default_rng(7 * n + t)
  b, p = 3, 4
  prompt = jnp.asarray(rng.integers(0, CFG.vocab_size, (b, p)), jnp.int32).at[1, 1:3].set(0)
  resp = jnp.asarray(rng.integers(3, CFG.vocab_size, (b, n, t)), jnp.int32)
  mask = jnp.asarray(np.arange(t) < rng.integers(1, t + 1, (b, n, 1)), jnp.float32)
  got = gm.grouped_token_logprobs(lm, prompt, resp)
  assert got.shape == (b, n, t)
  tokens = jnp.concatenate([jnp.repeat(prompt, n, axis=0), resp.reshape(b * n, t)], axis=1)
  want = lp.token_logprobs(lm(tokens[:, :-1]), tokens[:, 1:])[:, p - 1:].reshape(b, n, t)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  sums = gm.grouped_response_logprobs(lm, prompt, resp, mask)
  whole = _full_logps(lm, jnp.repeat(prompt, n, axis=0), resp.reshape(b * n, t),
                      mask.reshape(b * n, t), False).reshape(b, n)
  np.testing.assert_allclose(np.asarray(sums), np.asarray(whole), rtol=1e-5, atol=1e-5)


def test_grouped_logprobs_name_bad_shapes(lm):
  prompt = _tokens(0, n=3)
  resp = jnp.ones((prompt.shape[0], 2, 4), jnp.int32)
  with pytest.raises(ValueError, match=r"must be \[B, P\] and \[B, N, T\]"):
    gm.grouped_token_logprobs(lm, prompt, resp[:, 0])
  with pytest.raises(ValueError, match=r"must be \[B, P\] and \[B, N, T\]"):
    gm.grouped_token_logprobs(lm, prompt[:1], resp)
  with pytest.raises(ValueError, match="one shape"):
    gm.grouped_response_logprobs(lm, prompt, resp, jnp.ones(resp.shape[:2]))


def test_prompt_response_logprobs_needs_a_mask_per_response(lm):
  prompt = _tokens(0, n=3)
  with pytest.raises(ValueError, match="as many masks as responses"):
    gm.prompt_response_logprobs(lm, prompt, (prompt, prompt), (jnp.ones(prompt.shape),))
