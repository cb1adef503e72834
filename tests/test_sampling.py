"""Tests for gpo_jax.core.sampling: KV-cache exactness, sampling distributions (chi-square), filters, vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from gpo_jax.core import model as gm
from gpo_jax.core import sampling as gs

# Same shapes as tests/test_model.py so compiled initialisers are reused within one session.
CFG = gm.TransformerConfig(vocab_size=8, d_model=8, n_layers=2, n_heads=2, d_ff=8, max_len=8)
CONTEXT = jnp.array([[1, 5, 2]], jnp.int32)  # BOS, content, SEP
N = 20_000
MIN_P = 1e-3  # a correct sampler fails a chi-square check with this probability

sample_jit = nnx.jit(gs.sample, static_argnames=("max_new_tokens", "top_k"))
forward = nnx.jit(lambda model, tokens: model(tokens))


def _peaked_model(seed: int) -> gm.Transformer:
  """A random model whose next-token distributions are far from uniform (so tests have power)."""
  model = gm.Transformer(CFG, rngs=nnx.Rngs(seed))
  # Larger weights than the default init: logits spread over a few nats, and attention mixes
  # enough that the next-token distribution depends on earlier tokens.
  model.unembed[...] = model.unembed[...] * 15.0
  model.decoder.tok_embed[...] = model.decoder.tok_embed[...] * 20.0
  for block in model.decoder.blocks:
    block.w_qkv[...] = block.w_qkv[...] * 20.0
    block.w_o[...] = block.w_o[...] * 20.0
  return model


@pytest.fixture(scope="module")
def model():
  m = _peaked_model(0)
  probs = np.asarray(jax.nn.softmax(forward(m, CONTEXT)[0, -1]))
  assert probs.max() > 3 * probs.min(), "test model is too close to uniform for the checks to bite"
  return m


def _next_probs(model, prefix_1xL, temperature=1.0):
  logits = np.asarray(forward(model, prefix_1xL)[0, -1], np.float64) / temperature
  p = np.exp(logits - logits.max())
  return p / p.sum()


def _chisquare_pvalue(samples, probs):
  """Chi-square goodness of fit, merging bins with expected count < 5 into one."""
  counts = np.bincount(np.asarray(samples), minlength=len(probs)).astype(float)
  impossible = probs == 0
  assert counts[impossible].sum() == 0, f"sampled tokens of probability 0: {np.flatnonzero(counts * impossible)}"
  counts, probs = counts[~impossible], probs[~impossible]
  expected = probs * counts.sum()
  small = expected < 5
  if small.any():
    counts = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
  return stats.chisquare(counts, expected).pvalue


def _draw(model, n, key, **kw):
  ctx = jnp.repeat(CONTEXT, n, axis=0)
  tokens, mask = sample_jit(model, ctx, jax.random.key(key), **kw)
  return np.asarray(tokens), np.asarray(mask)


def test_kv_cache_decoding_matches_full_forward(model):
  ctx = jnp.array([[1, 4, 6, 2], [1, 7, 7, 2]], jnp.int32)
  resp, mask = sample_jit(model, ctx, jax.random.key(0), max_new_tokens=4)

  @nnx.jit
  def cached_logits(m, ctx, resp):
    logits, cache = m.prefill(ctx)
    out = [logits]
    for t in range(resp.shape[1] - 1):
      logits, cache = m.decode_step(resp[:, t], ctx.shape[1] + t, cache)
      out.append(logits)
    return jnp.stack(out, axis=1)

  full_BxLxV = forward(model, jnp.concatenate([ctx, resp], 1))
  cached_BxTxV = cached_logits(model, ctx, resp)
  np.testing.assert_allclose(cached_BxTxV, full_BxLxV[:, 3:7], atol=1e-5, rtol=1e-5,
                             err_msg="KV-cache decoding disagrees with the full causal forward")
  tokens, seq_mask = gs.concat_response(ctx, resp, mask)
  logp_full = nnx.jit(gm.response_logprobs)(model, tokens, seq_mask)
  logp_tok = jnp.take_along_axis(jax.nn.log_softmax(cached_BxTxV), resp[..., None], -1)[..., 0]
  np.testing.assert_allclose(logp_full, jnp.sum(logp_tok * mask, -1), atol=1e-5, rtol=1e-5,
                             err_msg="response log-probs from the sampler's cache and the full pass differ")


def test_first_and_second_token_frequencies_match_model(model):
  tokens, _ = _draw(model, N, 1, max_new_tokens=2)
  p1 = _next_probs(model, CONTEXT)
  assert _chisquare_pvalue(tokens[:, 0], p1) > MIN_P, "first-token frequencies != softmax(logits)"
  # Power check: the same samples must clearly reject a slightly wrong distribution.
  assert _chisquare_pvalue(tokens[:, 0], _next_probs(model, CONTEXT, 1.3)) < 1e-6

  counts = np.bincount(tokens[:, 0], minlength=CFG.vocab_size)
  counts[gs.EOS] = 0  # after EOS the second token is PAD, not a model sample
  a = int(np.argmax(counts))
  rows = tokens[:, 0] == a
  p2 = _next_probs(model, jnp.concatenate([CONTEXT, jnp.array([[a]])], 1))
  assert _chisquare_pvalue(tokens[rows, 1], p2) > MIN_P, (
      f"second-token frequencies given first token {a} != the model's conditional")
  assert not np.allclose(p2, p1, atol=1e-2), "conditional equals marginal: test would not see context bugs"


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_samples_softmax_of_scaled_logits(model, temperature):
  tokens, _ = _draw(model, N, 2, max_new_tokens=1, temperature=jnp.float32(temperature))
  probs = _next_probs(model, CONTEXT, temperature)
  assert _chisquare_pvalue(tokens[:, 0], probs) > MIN_P, f"T={temperature}: not softmax(logits/T)"


def test_temperature_zero_is_greedy(model):
  tokens, _ = _draw(model, 2, 3, max_new_tokens=4, temperature=0.0)
  prefix = CONTEXT
  for t in range(4):
    want = int(np.argmax(_next_probs(model, prefix)))
    assert np.all(tokens[:, t] == want), f"greedy step {t} chose {tokens[:, t]}, argmax is {want}"
    if want == gs.EOS:
      break
    prefix = jnp.concatenate([prefix, jnp.array([[want]])], 1)


def test_top_k_stays_in_top_k_and_renormalises(model):
  k = 3
  tokens, _ = _draw(model, N, 4, max_new_tokens=1, top_k=k)
  probs = _next_probs(model, CONTEXT)
  top = np.argsort(probs)[::-1][:k]
  assert set(np.unique(tokens[:, 0])) <= set(top.tolist()), "top-k emitted a token outside the top k"
  renorm = np.zeros_like(probs)
  renorm[top] = probs[top] / probs[top].sum()
  assert _chisquare_pvalue(tokens[:, 0], renorm) > MIN_P, "top-k must renormalise the kept mass"


def _np_nucleus(logits, p):
  """Reference: the smallest set of most likely tokens with total probability >= p."""
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  order = np.argsort(-probs)
  size = int(np.searchsorted(np.cumsum(probs[order]), p - 1e-7) + 1)
  return set(order[:size].tolist()), probs


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.6, 0.9, 1.0])
def test_top_p_keeps_the_minimal_nucleus(top_p):
  logits = np.random.default_rng(5).normal(size=(6, 12)).astype(np.float32) * 2.0
  kept = np.isfinite(np.asarray(gs.filter_logits(jnp.asarray(logits), 1.0, None, top_p)))
  for row, keep in zip(logits, kept):
    want, probs = _np_nucleus(row.astype(np.float64), top_p)
    assert set(np.flatnonzero(keep).tolist()) == want, f"top_p={top_p}: nucleus is wrong"
    mass = probs[keep].sum()
    assert mass >= top_p - 1e-6 and mass - probs[keep].min() < top_p, "nucleus is not minimal"


def test_top_p_sampling_stays_in_nucleus(model):
  tokens, _ = _draw(model, 4000, 6, max_new_tokens=1, top_p=0.6)
  logits = np.asarray(forward(model, CONTEXT)[0, -1], np.float64)
  nucleus, probs = _np_nucleus(logits, 0.6)
  assert set(np.unique(tokens[:, 0]).tolist()) <= nucleus, "top-p emitted a token outside the nucleus"
  renorm = np.zeros_like(probs)
  idx = sorted(nucleus)
  renorm[idx] = probs[idx] / probs[idx].sum()
  assert _chisquare_pvalue(tokens[:, 0], renorm) > MIN_P


def test_eos_then_pad_and_mask_through_eos():
  model = _peaked_model(1)
  # Make EOS as likely as the most likely token so many rows stop early.
  top = int(np.argmax(_next_probs(model, CONTEXT)))
  model.unembed[...] = model.unembed[...].at[:, gs.EOS].set(model.unembed[...][:, top])
  tokens, mask = _draw(model, 500, 7, max_new_tokens=5)
  stopped = 0
  for row, m in zip(tokens, mask):
    eos = np.flatnonzero(row == gs.EOS)
    end = eos[0] + 1 if eos.size else len(row)
    stopped += bool(eos.size)
    assert np.all(row[end:] == gs.PAD), f"tokens after EOS must be PAD: {row}"
    np.testing.assert_array_equal(m, (np.arange(len(row)) < end).astype(np.float32),
                                  err_msg=f"mask must cover tokens up to and including EOS: {row}")
  assert 50 < stopped < 500, f"{stopped}/500 rows hit EOS: the check needs both kinds of rows"


def test_vmap_over_stacked_params_equals_separate_sampling():
  models = [_peaked_model(s) for s in (10, 11, 12)]
  graphdef = nnx.graphdef(models[0])
  states = [nnx.state(m) for m in models]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *states)
  keys = jax.random.split(jax.random.key(8), 3)
  ctx = jnp.repeat(CONTEXT, 16, axis=0)

  def one(state, key):
    return gs.sample(nnx.merge(graphdef, state), ctx, key, max_new_tokens=5, top_p=0.9)

  toks_M, masks_M = jax.jit(jax.vmap(one))(stacked, keys)
  for i, m in enumerate(models):
    toks, mask = sample_jit(m, ctx, keys[i], max_new_tokens=5, top_p=0.9)
    np.testing.assert_array_equal(toks_M[i], toks, err_msg=f"vmapped member {i} samples differ")
    np.testing.assert_array_equal(masks_M[i], mask)
  assert not np.array_equal(toks_M[0], toks_M[1]), "members look identical: params not stacked?"


def test_jit_equals_eager(model):
  ctx = jnp.repeat(CONTEXT, 4, axis=0)
  eager = gs.sample(model, ctx, jax.random.key(9), max_new_tokens=3, top_k=4)
  jitted = sample_jit(model, ctx, jax.random.key(9), max_new_tokens=3, top_k=4)
  for a, b in zip(eager, jitted):
    np.testing.assert_array_equal(a, b, err_msg="jitted sampler differs from eager")


def test_bad_arguments_raise(model):
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="max_len"):
    gs.sample(model, CONTEXT, key, max_new_tokens=6)
  with pytest.raises(ValueError, match="max_new_tokens"):
    gs.sample(model, CONTEXT, key, max_new_tokens=0)
  with pytest.raises(ValueError, match="top_k"):
    gs.sample(model, CONTEXT, key, max_new_tokens=1, top_k=CFG.vocab_size + 1)
  with pytest.raises(ValueError, match="top_p"):
    gs.sample(model, CONTEXT, key, max_new_tokens=1, top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    gs.sample(model, CONTEXT, key, max_new_tokens=1, temperature=-0.5)
  with pytest.raises(ValueError, match="shape mismatch"):
    gs.concat_response(CONTEXT, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3)))


def test_sample_measured_sums_equal_a_full_forward_over_its_samples(model):
  """The measures accumulated along the decode equal those of a second pass over the
  finished sequences (the evaluator's former path), and the tokens are ``sample``'s."""
  ref = _peaked_model(1)
  pair = jax.tree.map(lambda a, b: jnp.stack([a, b]), nnx.state(model), nnx.state(ref))
  graphdef = nnx.graphdef(model)
  ctx = jnp.repeat(CONTEXT, 64, axis=0)
  key = jax.random.key(5)
  run = jax.jit(lambda p, c, k: gs.sample_measured(lambda st: nnx.merge(graphdef, st), p, c, k,
                                                    max_new_tokens=5))
  tokens, mask, sums = run(pair, ctx, key)
  plain, plain_mask = sample_jit(model, ctx, key, max_new_tokens=5)
  np.testing.assert_array_equal(tokens, plain)
  np.testing.assert_array_equal(mask, plain_mask)
  assert float(jnp.min(jnp.sum(mask, -1))) < 5, "no row ended early: EOS handling untested"
  full = jnp.concatenate([ctx, tokens], axis=1)[:, :-1]
  c = ctx.shape[1]
  pol, rl = forward(model, full)[:, c - 1:], forward(ref, full)[:, c - 1:]
  from gpo_jax.core import logprobs
  want = {"kl": logprobs.token_kl(pol, rl), "logp": logprobs.token_logprobs(pol, tokens),
          "ref_logp": logprobs.token_logprobs(rl, tokens),
          "entropy": logprobs.token_entropy(pol)}
  for name, per_token in want.items():
    np.testing.assert_allclose(sums[name], jnp.sum(per_token * mask, -1), rtol=1e-5, atol=1e-5,
                               err_msg=name)
  assert float(jnp.mean(sums["kl"])) > 0.1        # the two models differ: the check bites
  # Equal parameters: every difference is exactly 0 (one batched program for both).
  same = jax.tree.map(lambda a: jnp.stack([a, a]), nnx.state(model))
  _, _, s0 = run(same, ctx, key)
  assert float(jnp.max(jnp.abs(s0["kl"]))) == 0.0
  np.testing.assert_array_equal(s0["logp"], s0["ref_logp"])


def test_repeats_prefill_each_context_once_and_give_the_repeated_rows():
  """``repeats=r`` on distinct contexts = the same contexts repeated r times (rows
  context-major), for ``sample`` and ``sample_measured``; the prefill runs on the distinct
  contexts only (its batch in the jaxpr); bad values are refused."""
  model, ref = _peaked_model(0), _peaked_model(2)
  ctx = jnp.array([[1, 5, 2], [1, 6, 2], [1, 4, 2]], jnp.int32)
  r, key = 5, jax.random.key(11)
  want, want_mask = sample_jit(model, jnp.repeat(ctx, r, axis=0), key, max_new_tokens=4)
  run = nnx.jit(gs.sample, static_argnames=("max_new_tokens", "repeats"))
  got, got_mask = run(model, ctx, key, max_new_tokens=4, repeats=r)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got_mask, want_mask)
  assert len({tuple(np.asarray(row)) for row in got}) > 3, "rows too alike for the check to bite"
  pair = jax.tree.map(lambda a, b: jnp.stack([a, b]), nnx.state(model), nnx.state(ref))
  graphdef = nnx.graphdef(model)
  measured = lambda c, rep: gs.sample_measured(  # noqa: E731
      lambda st: nnx.merge(graphdef, st), pair, c, key, max_new_tokens=4, repeats=rep)
  a = jax.jit(measured, static_argnums=1)(jnp.repeat(ctx, r, axis=0), 1)
  b = jax.jit(measured, static_argnums=1)(ctx, r)
  np.testing.assert_array_equal(a[0], b[0])
  for name in a[2]:
    np.testing.assert_allclose(a[2][name], b[2][name], rtol=1e-6, atol=1e-6, err_msg=name)
  # The prefill's batch is the distinct contexts: 3 rows, not 15.
  jaxpr = str(jax.make_jaxpr(lambda c: gs.sample(model, c, key, max_new_tokens=4, repeats=r))(ctx))
  assert "f32[3,3,8]" in jaxpr and "f32[15,3,8]" not in jaxpr
  for bad in (0, -1, 2.0, True):
    with pytest.raises(ValueError, match="repeats"):
      gs.sample(model, ctx, key, max_new_tokens=4, repeats=bad)
  # a NumPy integer (e.g. a config value) is a valid count
  assert gs.sample(model, ctx, key, max_new_tokens=4, repeats=np.int64(2))[0].shape == (6, 4)


def test_first_max_index_is_argmax_bit_for_bit():
  """Ties (first wins), -inf rows, NaN rows (first NaN), large and small vocabularies."""
  rng = np.random.default_rng(0)
  for v in (1, 2, 7, 32, 1000):
    x = rng.standard_normal((257, v)).astype(np.float32)
    x[:40] = np.round(x[:40])                      # many ties
    x[40] = -np.inf
    x[41, v // 2] = np.nan
    x[42, :] = np.nan
    x[43] = 5.0
    if v > 2:
      x[44, [1, v - 1]] = [np.nan, np.nan]
      x[45, [0, v - 1]] = [np.inf, np.inf]
    got = np.asarray(jax.jit(gs.first_max_index)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert got.dtype == np.int32


def test_gumbel_max_draws_what_jax_categorical_draws():
  """The sampler's draw equals ``jax.random.categorical`` token for token (same keys)."""
  logits = jnp.asarray(np.random.default_rng(1).standard_normal((512, 32)) * 3, jnp.float32)
  logits = logits.at[:8, :4].set(-jnp.inf)          # filtered tokens, as after top-k/top-p
  draw = jax.jit(gs.gumbel_max)
  ref = jax.jit(lambda k, x: jax.random.categorical(k, x, axis=-1))
  for seed in range(20):
    key = jax.random.key(seed)
    np.testing.assert_array_equal(np.asarray(draw(key, logits)), np.asarray(ref(key, logits)))
  assert not np.any(np.asarray(draw(jax.random.key(0), logits))[:8] < 4)
