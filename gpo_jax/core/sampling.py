"""Jittable KV-cache autoregressive sampling (temperature, top-k, top-p) as a pure function of the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gpo_jax.core import compat
from gpo_jax.core.model import Transformer

Array = jax.Array

# Token ids shared with gpo_jax.lab.corpus (ARCHITECTURE.md conventions).
PAD = 0
EOS = 3

_NEG_INF = -jnp.inf


def _is_concrete(x) -> bool:
  return x is None or compat.concrete_value(x) is not None


def _validate(max_new_tokens, temperature, top_k, top_p, vocab_size):
  if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int (static), got {max_new_tokens!r}.")
  if top_k is not None and (
      not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= vocab_size
  ):
    raise ValueError(
        f"top_k must be None or a static int in [1, vocab_size={vocab_size}], got {top_k!r}."
    )
  if _is_concrete(temperature) and not float(np.min(np.asarray(temperature))) >= 0.0:
    raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}.")
  if top_p is not None and _is_concrete(top_p):
    value = np.asarray(top_p)
    if not np.all((value > 0.0) & (value <= 1.0)):
      raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}.")


def filter_logits(
    logits_BxV: Array, temperature: Array | float = 1.0, top_k: int | None = None,
    top_p: Array | float | None = None,
) -> Array:
  """Logits of the sampling distribution: divide by temperature, then top-k, then top-p.

  Removed tokens get ``-inf``. Top-p keeps the smallest set of most likely tokens whose
  probability (under the temperature-scaled, top-k-restricted distribution) reaches
  ``top_p``: sort descending and keep a token while the mass strictly before it is below
  ``top_p``. Tokens tied with the last kept logit (for top-k or top-p) are kept as well.
  ``temperature`` must be > 0 here (``sample`` handles 0 as greedy).

  References:
    Holtzman et al., "The Curious Case of Neural Text Degeneration" (nucleus sampling),
    arXiv 1904.09751; Fan et al., "Hierarchical Neural Story Generation" (top-k),
    arXiv 1805.04833.
  """
  logits_BxV = logits_BxV.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
  if top_k is not None:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV >= kth_Bx1, logits_BxV, _NEG_INF)
  if top_p is not None:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV = mass_before_BxV < jnp.asarray(top_p, jnp.float32)
    # Sorted descending, so the threshold is the smallest kept logit; the first token is
    # always kept (its mass-before is 0).
    threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV >= threshold_Bx1, logits_BxV, _NEG_INF)
  return logits_BxV


def first_max_index(x_BxV: Array) -> Array:
  """``jnp.argmax(x, axis=-1)`` (the first maximum; the first NaN if a row has one), int32.

  Two plain reductions (max, then the smallest index attaining it) instead of argmax's
  reduction over (value, index) pairs: XLA:CPU ran that pair reduction, with the Gumbel
  transform fused into it, at ~0.5 ms per decode step of 1024 rows × 32 tokens, about 4 %
  of a sampler call. Same result bit for bit (tests/test_sampling.py).
  """
  v = x_BxV.shape[-1]
  max_Bx1 = jnp.max(x_BxV, axis=-1, keepdims=True)
  nan_BxV = jnp.isnan(x_BxV)   # (XLA:CPU's max may skip a NaN; argmax returns the first one)
  hit_BxV = jnp.where(jnp.any(nan_BxV, axis=-1, keepdims=True), nan_BxV, x_BxV == max_Bx1)
  return jnp.min(jnp.where(hit_BxV, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def gumbel_max(key: Array, logits_BxV: Array) -> Array:
  """One draw per row from ``softmax(logits)``: ``jax.random.categorical(key, logits)``'s
  Gumbel-max draw (the same Gumbel noise and sum) with :func:`first_max_index` for the
  argmax, so the same tokens bit for bit."""
  noise_BxV = jax.random.gumbel(key, logits_BxV.shape, logits_BxV.dtype)
  return first_max_index(noise_BxV + logits_BxV)


def _choose(logits_BxV, key, done_B, temperature, top_k, top_p, eos_id, pad_id):
  """One sampling step: returns (token_B, in_response_B, done_B after this token)."""
  temperature = jnp.asarray(temperature, jnp.float32)
  safe_t = jnp.where(temperature > 0, temperature, 1.0)
  sampled_B = gumbel_max(key, filter_logits(logits_BxV, safe_t, top_k, top_p))
  greedy_B = first_max_index(logits_BxV)
  token_B = jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)
  token_B = jnp.where(done_B, pad_id, token_B)
  in_response_B = ~done_B
  return token_B, in_response_B, done_B | (token_B == eos_id)


def sample(
    model: Transformer,
    context_BxC: Array,
    key: Array,
    *,
    max_new_tokens: int,
    temperature: Array | float = 1.0,
    top_k: int | None = None,
    top_p: Array | float | None = None,
    eos_id: int = EOS,
    pad_id: int = PAD,
    repeats: int = 1,
) -> tuple[Array, Array]:
  """Samples responses to fixed-length contexts with a KV cache.

  The context is prefilled once, then a ``jax.lax.scan`` runs the decode steps. After a row
  emits ``eos_id`` it emits ``pad_id``. Pure in the model's parameters, so it can be
  jitted (``max_new_tokens`` and ``top_k`` static; ``temperature`` and ``top_p`` may be
  traced) and vmapped over stacked parameters::

    jax.vmap(lambda st, k: sample(nnx.merge(graphdef, st), ctx, k, max_new_tokens=T))(
        stacked_state, keys)

  Args:
    model: a ``gpo_jax.core.model.Transformer``.
    context_BxC: ``[BOS] + ... + [SEP]`` token ids; all rows have the same length ``C``.
    key: a ``jax.random.key``; step ``t`` uses the ``t``-th of ``split(key, T)``.
    max_new_tokens: response length ``T``; needs ``C + T <= max_len``.
    temperature: softmax temperature; 0 means greedy (argmax).
    top_k: keep only the ``top_k`` most likely tokens.
    top_p: nucleus sampling mass in (0, 1].
    eos_id: end-of-sequence id. pad_id: padding id.
    repeats: responses per context (static): rows ``[B * repeats]``, context-major (row
      ``i * repeats + j`` is the ``j``-th response to context ``i``) — the result of
      ``sample(model, jnp.repeat(context_BxC, repeats, axis=0), key)`` with each context
      prefilled once instead of ``repeats`` times (:func:`_prefill`).

  Returns:
    ``(tokens_BxT, mask_BxT)``: int32 tokens, and a float32 mask that is 1 on response
    tokens up to and including the first EOS.
  """
  cfg = model.cfg
  _validate(max_new_tokens, temperature, top_k, top_p, cfg.vocab_size)
  repeats = _check_repeats(repeats)
  b, c = context_BxC.shape[0] * repeats, context_BxC.shape[1]
  if c + max_new_tokens > cfg.max_len:
    raise ValueError(
        f"context length {c} + max_new_tokens {max_new_tokens} exceeds max_len={cfg.max_len}."
    )
  keys = jax.random.split(key, max_new_tokens)
  choose = lambda logits, k, done: _choose(  # noqa: E731
      logits, k, done, temperature, top_k, top_p, eos_id, pad_id)

  logits_BxV, cache = _prefill(model.prefill, context_BxC, _cache_len(c, max_new_tokens),
                               repeats)
  first = choose(logits_BxV, keys[0], jnp.zeros((b,), bool))

  def step(carry, xs):
    cache, token_B, done_B = carry
    pos, k = xs
    logits_BxV, cache = model.decode_step(token_B, pos, cache)
    token_B, in_response_B, done_B = choose(logits_BxV, k, done_B)
    return (cache, token_B, done_B), (token_B, in_response_B)

  _, tokens_BxT, mask_BxT = _decode(step, (cache, first[0], first[2]), first[0], first[1],
                                    c, keys)
  return tokens_BxT, mask_BxT


def _cache_len(c: int, t: int) -> int:
  """KV-cache slots of a sampler: exactly the ``C + T − 1`` positions ever fed (the last
  sampled token is never fed back), so decode steps attend over those, not ``max_len``."""
  return c + t - 1 if t > 1 else c


def _decode(step, carry, token0_B, in0_B, c: int, keys):
  """The decode scan of a sampler: ``step(carry, (pos, key)) -> (carry, (token_B,
  in_response_B))`` at positions ``C .. C+T−2`` with ``keys[1:]`` (the first token came from
  the prefill with ``keys[0]``; the last is never fed back, so ``T − 1`` steps suffice).
  Returns the final carry, tokens ``[B, T]`` (int32) and the response mask ``[B, T]``
  (float32)."""
  positions = c + jnp.arange(keys.shape[0] - 1, dtype=jnp.int32)
  carry, (tokens_TxB, in_resp_TxB) = jax.lax.scan(step, carry, (positions, keys[1:]))
  tokens_BxT = jnp.concatenate([token0_B[:, None], tokens_TxB.T], axis=1)
  mask_BxT = jnp.concatenate([in0_B[:, None], in_resp_TxB.T], axis=1).astype(jnp.float32)
  return carry, tokens_BxT, mask_BxT


def _check_repeats(repeats) -> int:
  if not isinstance(repeats, (int, np.integer)) or isinstance(repeats, bool) or repeats < 1:
    raise ValueError(f"repeats must be a positive int (static), got {repeats!r}.")
  return int(repeats)


def _prefill(prefill_fn, context_BxC, cache_len, repeats: int, axis: int = 0):
  """``prefill_fn(context, cache_len)`` with each row's logits and cache repeated
  ``repeats`` times along the batch axis (``axis``; 1 for a vmapped pair). Every response to
  one context starts from the same prefill: running it once per context saves
  ``(repeats − 1) / repeats`` of the prefill (C/(C+T) of the sampler's FLOPs at large
  ``repeats``, e.g. a best-of-n pool)."""
  logits, cache = prefill_fn(context_BxC, cache_len)
  if repeats == 1:
    return logits, cache
  rep = lambda x: jnp.repeat(x, repeats, axis=axis)  # noqa: E731
  return rep(logits), jax.tree.map(rep, cache)


def sample_measured(
    model_fn,
    pair_state,
    context_BxC: Array,
    key: Array,
    *,
    max_new_tokens: int,
    eos_id: int = EOS,
    pad_id: int = PAD,
    repeats: int = 1,
) -> tuple[Array, Array, dict[str, Array]]:
  """Samples from a policy (temperature 1) and measures it against a reference on the way.

  ``pair_state`` stacks two parameter states on a leading axis of 2, the policy's then the
  reference's (``jax.tree.map(lambda a, b: jnp.stack([a, b]), policy, ref)``), and
  ``model_fn(state)`` builds a :class:`Transformer` from one. Both run in one vmapped
  prefill and decode scan (two KV caches, each fed the policy's tokens), so the reference's
  next-token distribution along the policy's own samples comes with the sampling instead of
  a second pass over the finished sequences; and because the two share one program, equal
  parameters give bitwise-equal logits (every measured difference is exactly 0 at
  ``π = π_ref``). Tokens are drawn from the policy's logits exactly as :func:`sample` draws
  them (same keys; same tokens up to the rounding of the batched program).

  ``repeats`` responses per context as in :func:`sample`.

  Returns:
    ``(tokens_BxT, mask_BxT, sums)``: as :func:`sample`, and per-row sums over the response
    tokens (``mask``) of ``kl`` (exact per-token ``KL(π‖π_ref)`` over the vocabulary),
    ``logp`` and ``ref_logp`` (the sampled tokens' log-probabilities) and ``entropy`` (the
    policy's per-token entropy), all float32 ``[B]``.
  """
  from gpo_jax.core import logprobs   # (no cycle: logprobs imports nothing of ours)

  cfg = model_fn(jax.tree.map(lambda x: x[0], pair_state)).cfg
  repeats = _check_repeats(repeats)
  b, c = context_BxC.shape[0] * repeats, context_BxC.shape[1]
  _validate(max_new_tokens, 1.0, None, None, cfg.vocab_size)
  if c + max_new_tokens > cfg.max_len:
    raise ValueError(
        f"context length {c} + max_new_tokens {max_new_tokens} exceeds max_len={cfg.max_len}."
    )
  keys = jax.random.split(key, max_new_tokens)
  pair_prefill = lambda ctx, n: jax.vmap(lambda st: model_fn(st).prefill(ctx, n))(pair_state)  # noqa: E731
  decode = jax.vmap(lambda st, tok, pos, cache: model_fn(st).decode_step(tok, pos, cache),
                    in_axes=(0, None, None, 0))

  def choose(logits_2xBxV, k, done_B):
    token_B, in_resp_B, done_B = _choose(logits_2xBxV[0], k, done_B, 1.0, None, None,
                                         eos_id, pad_id)
    pol, ref = logits_2xBxV[0][:, None], logits_2xBxV[1][:, None]
    m = in_resp_B.astype(jnp.float32)
    stats = {"kl": logprobs.token_kl(pol, ref)[:, 0] * m,
             "logp": jnp.where(in_resp_B, logprobs.token_logprobs(pol, token_B[:, None])[:, 0], 0.0),
             "ref_logp": jnp.where(in_resp_B,
                                   logprobs.token_logprobs(ref, token_B[:, None])[:, 0], 0.0),
             "entropy": logprobs.token_entropy(pol)[:, 0] * m}
    return token_B, in_resp_B, done_B, stats

  logits_2xBxV, cache = _prefill(pair_prefill, context_BxC, _cache_len(c, max_new_tokens),
                                 repeats, axis=1)
  tok0, in0, done0, sums = choose(logits_2xBxV, keys[0], jnp.zeros((b,), bool))

  def step(carry, xs):
    cache, token_B, done_B, sums = carry
    pos, k = xs
    logits_2xBxV, cache = decode(pair_state, token_B, pos, cache)
    token_B, in_resp_B, done_B, stats = choose(logits_2xBxV, k, done_B)
    sums = jax.tree.map(jnp.add, sums, stats)
    return (cache, token_B, done_B, sums), (token_B, in_resp_B)

  (_, _, _, sums), tokens_BxT, mask_BxT = _decode(step, (cache, tok0, done0, sums), tok0, in0,
                                                  c, keys)
  return tokens_BxT, mask_BxT, sums


def concat_response(
    context_BxC: Array, response_BxT: Array, response_mask_BxT: Array
) -> tuple[Array, Array]:
  """Full sequences ``context + response`` and the response mask indexed like them.

  The returned mask is what ``gpo_jax.core.model.response_logprobs`` expects: 0 over the
  context, ``response_mask_BxT`` over the response positions.
  """
  if context_BxC.shape[0] != response_BxT.shape[0] or response_BxT.shape != response_mask_BxT.shape:
    raise ValueError(
        f"shape mismatch: context {context_BxC.shape}, response {response_BxT.shape}, "
        f"mask {response_mask_BxT.shape}; need context [B, C], response and mask [B, T]."
    )
  tokens_BxL = jnp.concatenate([context_BxC, response_BxT.astype(context_BxC.dtype)], axis=1)
  mask_BxL = jnp.concatenate(
      [jnp.zeros(context_BxC.shape, jnp.float32), response_mask_BxT.astype(jnp.float32)], axis=1)
  return tokens_BxL, mask_BxL


def mixture_logits(policy_logits_BxV: Array, ref_logits_BxV: Array, beta_mix) -> Array:
  """Log-probabilities of the token-level geometric mixture of a policy and a reference.

  ``log π_mix(·|s) = (1 − β_mix)·log π(·|s) + β_mix·log π_ref(·|s) − log Z(s)``,
  renormalised per token; ``β_mix`` (the weight on π_ref, scalar or ``[B]``, may be traced)
  is HF TRL's ``mixture_coef``. ``β_mix = 0`` is π, ``β_mix = 1`` is π_ref.

  References:
    Munos et al. 2023, "Nash Learning from Human Feedback", arXiv 2312.00886 (the
    geometric mixture of Nash-MD); Calandriello et al. 2024, arXiv 2403.08635 (IPO-MD).
  """
  beta_B1 = jnp.reshape(jnp.asarray(beta_mix, jnp.float32), (-1, 1))
  mixed = ((1.0 - beta_B1) * jax.nn.log_softmax(policy_logits_BxV.astype(jnp.float32), -1)
           + beta_B1 * jax.nn.log_softmax(ref_logits_BxV.astype(jnp.float32), -1))
  return jax.nn.log_softmax(mixed, axis=-1)


def sample_mixture(
    model: Transformer,
    ref_model: Transformer,
    context_BxC: Array,
    key: Array,
    beta_mix: Array | float,
    *,
    max_new_tokens: int,
    eos_id: int = EOS,
    pad_id: int = PAD,
) -> tuple[Array, Array]:
  """Samples from the token-level geometric mixture of ``model`` and ``ref_model`` (temperature 1).

  Each token is drawn from :func:`mixture_logits` of the two models' next-token
  distributions given the *same* prefix, so the mixture is a policy in its own right
  (IPO-MD, Nash-MD), not a coin flip between a policy sample and a reference sample. The
  two models' KV caches run side by side in one ``lax.scan``: each decode step feeds the
  new token to both, so no prefix is ever recomputed. ``beta_mix`` may be a scalar or one
  value per row ``[B]`` (e.g. ``y`` from π and ``y′`` from π_mix in one call), and traced.
  Same conventions and return values as :func:`sample`; with ``beta_mix = 0`` the draws
  follow π exactly (the reference's forward is still run).
  """
  cfg = model.cfg
  b, c = context_BxC.shape
  _validate(max_new_tokens, 1.0, None, None, cfg.vocab_size)
  if ref_model.cfg.vocab_size != cfg.vocab_size:
    raise ValueError(f"policy vocab_size={cfg.vocab_size} differs from the reference's "
                     f"{ref_model.cfg.vocab_size}; a token-level mixture needs one vocabulary.")
  if c + max_new_tokens > min(cfg.max_len, ref_model.cfg.max_len):
    raise ValueError(f"context length {c} + max_new_tokens {max_new_tokens} exceeds max_len="
                     f"{min(cfg.max_len, ref_model.cfg.max_len)}.")
  if _is_concrete(beta_mix):
    v = np.asarray(beta_mix)
    if not np.all((v >= 0.0) & (v <= 1.0)):
      raise ValueError(f"beta_mix must be in [0, 1] (the weight on the reference), got {beta_mix!r}.")
  beta_B = jnp.broadcast_to(jnp.asarray(beta_mix, jnp.float32), (b,))
  keys = jax.random.split(key, max_new_tokens)

  def choose(logits, ref_logits, k, done):
    return _choose(mixture_logits(logits, ref_logits, beta_B), k, done, 1.0, None, None,
                   eos_id, pad_id)

  cache_len = _cache_len(c, max_new_tokens)
  logits_BxV, cache = model.prefill(context_BxC, cache_len)
  ref_logits_BxV, ref_cache = ref_model.prefill(context_BxC, cache_len)
  first = choose(logits_BxV, ref_logits_BxV, keys[0], jnp.zeros((b,), bool))

  def step(carry, xs):
    cache, ref_cache, token_B, done_B = carry
    pos, k = xs
    logits_BxV, cache = model.decode_step(token_B, pos, cache)
    ref_logits_BxV, ref_cache = ref_model.decode_step(token_B, pos, ref_cache)
    token_B, in_response_B, done_B = choose(logits_BxV, ref_logits_BxV, k, done_B)
    return (cache, ref_cache, token_B, done_B), (token_B, in_response_B)

  _, tokens_BxT, mask_BxT = _decode(step, (cache, ref_cache, first[0], first[2]), first[0],
                                    first[1], c, keys)
  return tokens_BxT, mask_BxT
