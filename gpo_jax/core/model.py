"""Flax NNX decoder-only transformer LM and scalar-head reward model, with a pure KV-cache decode API.

Architecture: learned token + absolute position embeddings, ``n_layers`` pre-norm (RMSNorm)
blocks of causal multi-head attention with a fused QKV projection and a GELU MLP, a final
RMSNorm, then an unembedding (LM) or a scalar head (reward model). No biases in the matmuls,
so nearly all compute is in a handful of large einsums.

Weights carry logical axis names (``vocab``, ``embed``, ``mlp``, ``heads``, ``kv``) through
``nnx.with_partitioning``; ``gpo_jax.runtime.sharding`` maps them to mesh axes. Flax 0.12 shards
annotated variables when they are created, which needs a mesh, so the modules shard eagerly
only when a mesh is set (``jax.set_mesh``) and build as plain arrays otherwise.

The decode API (``prefill`` / ``decode_step``) threads the KV cache as an explicit pytree
of arrays instead of NNX mutable state, so sampling is a pure function of the parameters and
works under ``jax.vmap`` over stacked parameter states.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gpo_jax.core import logprobs as lp

Array = jax.Array
Cache = tuple[dict[str, Array], ...]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Shape of a decoder-only transformer.

  Attributes:
    vocab_size: number of token ids (``PAD=0, BOS=1, SEP=2, EOS=3`` included).
    d_model: residual stream width.
    n_layers: number of transformer blocks.
    n_heads: attention heads; must divide ``d_model``.
    d_ff: hidden width of the MLP.
    max_len: longest sequence (context + response) the position table covers.
    dtype: compute dtype of activations, ``"float32"`` or ``"bfloat16"``; parameters,
      norms, softmaxes and logits stay float32.
    tie_embeddings: reuse the token embedding as the unembedding matrix.
  """

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int
  max_len: int
  dtype: str = "float32"
  tie_embeddings: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}.")
    if self.d_model % self.n_heads:
      raise ValueError(
          f"TransformerConfig.n_heads={self.n_heads} must divide d_model={self.d_model}."
      )
    if self.dtype not in _DTYPES:
      raise ValueError(
          f"TransformerConfig.dtype={self.dtype!r} is not supported; choose one of {sorted(_DTYPES)}."
      )

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]


def _param(rngs: nnx.Rngs, shape, names, std: float | None = _INIT_STD, value=None) -> nnx.Param:
  """A float32 ``nnx.Param`` annotated with logical axis ``names``.

  Eager sharding is switched on only when a mesh is set, so single-device code needs no
  mesh and no ``nnx.use_eager_sharding`` context.
  """
  if value is None:
    init = nnx.initializers.normal(std)
  else:
    init = lambda key, shape, dtype: jnp.full(shape, value, dtype)  # noqa: E731
  meta = nnx.with_partitioning(init, names)(rngs.params(), shape, jnp.float32)
  mesh_is_set = not jax.sharding.get_abstract_mesh().empty
  return nnx.Param(meta, eager_sharding=mesh_is_set)


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm with a learned scale, computed in float32.

  References:
    Zhang & Sennrich, "Root Mean Square Layer Normalization", arXiv 1910.07467.
  """

  def __init__(self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6):
    self.scale = _param(rngs, (dim,), ("embed",), value=1.0)
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * inv_rms * self.scale[...]).astype(x.dtype)


def _attend(q_BxQxHxK: Array, k_BxSxHxK: Array, v_BxSxHxK: Array, allowed_QxS: Array) -> Array:
  """Scaled dot-product attention; ``allowed_QxS`` says which keys each query may see."""
  scale = 1.0 / math.sqrt(q_BxQxHxK.shape[-1])
  s_BxHxQxS = jnp.einsum("bqhk,bshk->bhqs", q_BxQxHxK, k_BxSxHxK).astype(jnp.float32) * scale
  # A finite floor (not -inf) keeps the softmax and its gradient NaN-free.
  s_BxHxQxS = jnp.where(allowed_QxS, s_BxHxQxS, jnp.finfo(jnp.float32).min)
  p_BxHxQxS = jax.nn.softmax(s_BxHxQxS, axis=-1).astype(v_BxSxHxK.dtype)
  return jnp.einsum("bhqs,bshk->bqhk", p_BxHxQxS, v_BxSxHxK)


class Block(nnx.Module):
  """Pre-norm transformer block: causal self-attention (fused QKV) then a GELU MLP.

  References:
    Vaswani et al., "Attention Is All You Need", arXiv 1706.03762; pre-norm placement as in
    Radford et al., GPT-2 (2019).
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    d, h, k, f = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
    # GPT-2 style: shrink the residual-branch outputs with depth to keep the stream's scale.
    out_std = _INIT_STD / math.sqrt(2 * cfg.n_layers)
    self.dtype = cfg.compute_dtype
    self.attn_norm = RMSNorm(d, rngs=rngs)
    self.w_qkv = _param(rngs, (d, 3, h, k), ("embed", None, "heads", "kv"))
    self.w_o = _param(rngs, (h, k, d), ("heads", "kv", "embed"), std=out_std)
    self.mlp_norm = RMSNorm(d, rngs=rngs)
    self.w_up = _param(rngs, (d, f), ("embed", "mlp"))
    self.w_down = _param(rngs, (f, d), ("mlp", "embed"), std=out_std)

  def qkv(self, h_BxLxD: Array) -> tuple[Array, Array, Array]:
    x = self.attn_norm(h_BxLxD)
    qkv_BxLx3xHxK = jnp.einsum("bld,dchk->blchk", x, self.w_qkv[...].astype(self.dtype))
    return qkv_BxLx3xHxK[:, :, 0], qkv_BxLx3xHxK[:, :, 1], qkv_BxLx3xHxK[:, :, 2]

  def finish(self, h_BxLxD: Array, attn_BxLxHxK: Array) -> Array:
    """Residual add of the attention output, then the MLP branch."""
    h = h_BxLxD + jnp.einsum("blhk,hkd->bld", attn_BxLxHxK, self.w_o[...].astype(self.dtype))
    x = self.mlp_norm(h)
    u = jax.nn.gelu(x @ self.w_up[...].astype(self.dtype))
    return h + u @ self.w_down[...].astype(self.dtype)

  def __call__(self, h_BxLxD: Array) -> tuple[Array, Array, Array]:
    """Full causal pass; also returns this layer's keys and values for a cache."""
    q, k, v = self.qkv(h_BxLxD)
    n = h_BxLxD.shape[1]
    causal_LxL = jnp.tril(jnp.ones((n, n), dtype=bool))
    return self.finish(h_BxLxD, _attend(q, k, v, causal_LxL)), k, v

  def extend(self, h_BxTxD: Array, k_BxCxHxK: Array, v_BxCxHxK: Array) -> Array:
    """``T`` new positions after a cached prefix of ``C``: each attends to the whole prefix
    and causally to the new positions (the full pass's result for those positions)."""
    q, k, v = self.qkv(h_BxTxD)
    c, t = k_BxCxHxK.shape[1], h_BxTxD.shape[1]
    keys = jnp.concatenate([k_BxCxHxK.astype(k.dtype), k], axis=1)
    values = jnp.concatenate([v_BxCxHxK.astype(v.dtype), v], axis=1)
    s_S = jnp.arange(c + t)
    allowed_TxS = s_S[None, :] <= (c + jnp.arange(t))[:, None]
    return self.finish(h_BxTxD, _attend(q, keys, values, allowed_TxS))

  def extend_at(self, h_BxTxD: Array, read_B: Array, k_BxCxHxK: Array,
                v_BxCxHxK: Array) -> Array:
    """:meth:`extend`'s output at one position per row, ``read_B`` (in ``[0, T)``),
    ``[B, D]``: the keys and values of all ``T`` new positions, but the query, attention
    and MLP of that position only — all a head read there needs of the last block."""
    x_BxTxD = self.attn_norm(h_BxTxD)
    w_Dx3xHxK = self.w_qkv[...].astype(self.dtype)
    kv_BxTx2xHxK = jnp.einsum("bld,dchk->blchk", x_BxTxD, w_Dx3xHxK[:, 1:])
    at = lambda a: jnp.take_along_axis(a, read_B[:, None, None], axis=1)  # noqa: E731
    q_Bx1xHxK = jnp.einsum("bld,dhk->blhk", at(x_BxTxD), w_Dx3xHxK[:, 0])
    c, t = k_BxCxHxK.shape[1], h_BxTxD.shape[1]
    keys = jnp.concatenate([k_BxCxHxK.astype(self.dtype), kv_BxTx2xHxK[:, :, 0]], axis=1)
    values = jnp.concatenate([v_BxCxHxK.astype(self.dtype), kv_BxTx2xHxK[:, :, 1]], axis=1)
    allowed_Bx1x1xS = (jnp.arange(c + t)[None, :] <= (c + read_B)[:, None])[:, None, None]
    return self.finish(at(h_BxTxD), _attend(q_Bx1xHxK, keys, values, allowed_Bx1x1xS))[:, 0]

  def decode(self, h_Bx1xD: Array, pos: Array, k_BxHxSxK: Array, v_BxHxSxK: Array):
    """One new position ``pos``: write its key/value into the cache and attend to ``<= pos``.

    The cache is laid out ``[B, heads, S, head_dim]``: the two attention contractions then
    batch over (B, heads) with the cache in place. (With ``[B, S, heads, head_dim]`` XLA:CPU
    transposed the whole cache twice per step, ~1.7x slower at B >= 256 for the same result.)
    """
    q, k, v = self.qkv(h_Bx1xD)
    start = (jnp.int32(0), jnp.int32(0), pos, jnp.int32(0))
    k_BxHxSxK = jax.lax.dynamic_update_slice(
        k_BxHxSxK, jnp.swapaxes(k, 1, 2).astype(k_BxHxSxK.dtype), start)
    v_BxHxSxK = jax.lax.dynamic_update_slice(
        v_BxHxSxK, jnp.swapaxes(v, 1, 2).astype(v_BxHxSxK.dtype), start)
    scale = 1.0 / math.sqrt(q.shape[-1])
    s_BxHx1xS = jnp.einsum("bqhk,bhsk->bhqs", q, k_BxHxSxK).astype(jnp.float32) * scale
    visible_1xS = (jnp.arange(k_BxHxSxK.shape[2]) <= pos)[None, :]
    s_BxHx1xS = jnp.where(visible_1xS, s_BxHx1xS, jnp.finfo(jnp.float32).min)
    p_BxHx1xS = jax.nn.softmax(s_BxHx1xS, axis=-1).astype(v_BxHxSxK.dtype)
    attn = jnp.einsum("bhqs,bhsk->bqhk", p_BxHx1xS, v_BxHxSxK)
    return self.finish(h_Bx1xD, attn), k_BxHxSxK, v_BxHxSxK


class Decoder(nnx.Module):
  """The shared trunk: embeddings, blocks and final norm (no output head)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.tok_embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
    self.pos_embed = _param(rngs, (cfg.max_len, cfg.d_model), (None, "embed"))
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, rngs=rngs)

  def _check_length(self, length: int):
    if length > self.cfg.max_len:
      raise ValueError(
          f"sequence length {length} exceeds TransformerConfig.max_len={self.cfg.max_len}."
      )

  def embed(self, tokens_BxL: Array, start: Array | int = 0) -> Array:
    """Token plus position embeddings for positions ``start .. start+L-1``."""
    positions_L = start + jnp.arange(tokens_BxL.shape[1])
    h = self.tok_embed[...][tokens_BxL] + self.pos_embed[...][positions_L][None]
    return h.astype(self.cfg.compute_dtype)

  def __call__(self, h_BxLxD: Array) -> tuple[Array, Cache]:
    """Causal trunk on embedded inputs; returns final normed hidden states and per-layer k/v."""
    self._check_length(h_BxLxD.shape[1])
    kv = []
    for block in self.blocks:
      h_BxLxD, k, v = block(h_BxLxD)
      kv.append({"k": k, "v": v})
    return self.final_norm(h_BxLxD), tuple(kv)

  def extend(self, tokens_BxT: Array, prefix: Cache) -> Array:
    """Final normed hidden states ``[B, T, D]`` of ``T`` tokens that follow a prefix whose
    per-layer keys and values (``[B, C, heads, head_dim]``, as :meth:`__call__` returns
    them) are given: equal to the full pass over ``prefix + tokens`` at those positions."""
    c = prefix[0]["k"].shape[1]
    self._check_length(c + tokens_BxT.shape[1])
    h = self.embed(tokens_BxT, c)
    for block, layer in zip(self.blocks, prefix):
      h = block.extend(h, layer["k"], layer["v"])
    return self.final_norm(h)

  def extend_at(self, tokens_BxT: Array, prefix: Cache, read_B: Array) -> Array:
    """:meth:`extend`'s final normed hidden state at position ``read_B`` of each row,
    ``[B, D]``; the last block runs its query, attention and MLP at that position only."""
    c = prefix[0]["k"].shape[1]
    self._check_length(c + tokens_BxT.shape[1])
    h = self.embed(tokens_BxT, c)
    blocks = list(self.blocks)
    for block, layer in zip(blocks[:-1], prefix[:-1]):
      h = block.extend(h, layer["k"], layer["v"])
    h_BxD = blocks[-1].extend_at(h, read_B, prefix[-1]["k"], prefix[-1]["v"])
    return self.final_norm(h_BxD)

  def decode(self, token_B: Array, pos: Array, cache: Cache) -> tuple[Array, Cache]:
    pos = jnp.asarray(pos, jnp.int32)
    h = self.embed(token_B[:, None], pos)
    new_cache = []
    for block, layer in zip(self.blocks, cache):
      h, k, v = block.decode(h, pos, layer["k"], layer["v"])
      new_cache.append({"k": k, "v": v})
    return self.final_norm(h)[:, 0], tuple(new_cache)


class Transformer(nnx.Module):
  """Causal pre-norm decoder-only language model.

  Example::

    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits_BxLxV = model(tokens_BxL)           # logits at t predict token t+1
    logits_BxV, cache = model.prefill(context_BxC)
    logits_BxV, cache = model.decode_step(next_B, pos=C, cache=cache)
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.decoder = Decoder(cfg, rngs=rngs)
    if cfg.tie_embeddings:
      self.unembed = None
    else:
      self.unembed = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

  def _logits(self, h_BxLxD: Array) -> Array:
    if self.unembed is None:
      w_DxV = self.decoder.tok_embed[...].T
    else:
      w_DxV = self.unembed[...]
    return (h_BxLxD @ w_DxV.astype(h_BxLxD.dtype)).astype(jnp.float32)

  def __call__(self, tokens_BxL: Array) -> Array:
    """Next-token logits ``[B, L, V]`` (float32) for every position."""
    return self.forward_embedded(self.decoder.embed(tokens_BxL))

  def forward_embedded(self, h_BxLxD: Array) -> Array:
    """Logits from already-embedded inputs (token + position); exposed for gradient tests."""
    h_BxLxD, _ = self.decoder(h_BxLxD)
    return self._logits(h_BxLxD)

  def init_cache(self, batch_size: int, length: int | None = None) -> Cache:
    """An all-zero KV cache: per layer ``{"k", "v"}`` of shape ``[B, heads, length, head_dim]``.

    ``length`` (default ``max_len``) bounds the positions the cache can hold; a sampler that
    knows its context and response lengths allocates exactly ``C + T`` slots, so every
    decode step attends over (and moves) only those instead of ``max_len``.
    """
    c = self.cfg
    length = c.max_len if length is None else int(length)
    if not 1 <= length <= c.max_len:
      raise ValueError(f"cache length {length} must be in [1, max_len={c.max_len}]")
    shape = (batch_size, c.n_heads, length, c.head_dim)
    return tuple(
        {"k": jnp.zeros(shape, c.compute_dtype), "v": jnp.zeros(shape, c.compute_dtype)}
        for _ in range(c.n_layers)
    )

  def prefill(self, tokens_BxC: Array, cache_len: int | None = None) -> tuple[Array, Cache]:
    """Runs the context; returns the logits at its last position ``[B, V]`` and the cache.

    ``cache_len`` (static; default ``max_len``, at least ``C``) is the number of cache slots:
    positions ``>= cache_len`` cannot be decoded afterwards.
    """
    b, c = tokens_BxC.shape
    self.decoder._check_length(c)
    if cache_len is not None and int(cache_len) < c:
      raise ValueError(f"cache_len={cache_len} is shorter than the context length {c}")
    h_BxCxD, kv = self.decoder(self.decoder.embed(tokens_BxC))
    cache = tuple(
        {name: jax.lax.dynamic_update_slice(empty[name], jnp.swapaxes(layer[name], 1, 2),
                                            (0, 0, 0, 0))
         for name in ("k", "v")}
        for empty, layer in zip(self.init_cache(b, cache_len), kv)
    )
    return self._logits(h_BxCxD[:, -1]), cache

  def decode_step(self, token_B: Array, pos: Array | int, cache: Cache) -> tuple[Array, Cache]:
    """Feeds ``token_B`` at position ``pos`` (scalar, may be traced); returns logits ``[B, V]``.

    ``pos`` must be below ``max_len``; a traced ``pos`` cannot be checked here (the caller,
    e.g. ``gpo_jax.core.sampling.sample``, checks its static bounds).
    """
    if isinstance(pos, int):
      self.decoder._check_length(pos + 1)
    h_BxD, cache = self.decoder.decode(token_B, pos, cache)
    return self._logits(h_BxD), cache


def _last_valid(valid_BxL: Array) -> Array:
  """Each row's last valid position (0 for a row with none), ``[B]``."""
  idx_L = jnp.arange(valid_BxL.shape[1])
  return jnp.max(jnp.where(valid_BxL.astype(bool), idx_L, 0), axis=-1)


def _at_last_valid(h_BxLxD: Array, valid_BxL: Array) -> Array:
  """``h`` at each row's last valid position (position 0 for a row with none), ``[B, D]``."""
  return jnp.take_along_axis(h_BxLxD, _last_valid(valid_BxL)[:, None, None], axis=1)[:, 0]


class RewardModel(nnx.Module):
  """The same causal trunk with a scalar head read at the last non-pad token.

  Because attention is causal, tokens after the read position (padding) cannot change the
  score. The trunk lives under ``decoder`` like the LM's, so a reward model can be
  initialised from a language model's ``decoder`` state.
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.decoder = Decoder(cfg, rngs=rngs)
    self.w_head = _param(rngs, (cfg.d_model,), ("embed",))
    self.b_head = _param(rngs, (), (), value=0.0)

  def __call__(self, tokens_BxL: Array, mask_BxL: Array | None = None) -> Array:
    """Scalar score per row, ``[B]`` float32.

    Args:
      tokens_BxL: token ids.
      mask_BxL: 1 on valid (non-pad) tokens; the score is read at the last valid index
        (index 0 for an all-zero row). Defaults to ``tokens_BxL != 0`` (PAD = 0).
    """
    if mask_BxL is None:
      mask_BxL = tokens_BxL != 0
    h_BxLxD, _ = self.decoder(self.decoder.embed(tokens_BxL))
    return self._head(_at_last_valid(h_BxLxD, mask_BxL))

  def _head(self, h_BxD: Array) -> Array:
    return h_BxD.astype(jnp.float32) @ self.w_head[...] + self.b_head[...]

  def prefix(self, context_BxC: Array, valid_BxC: Array | None = None) -> dict[str, Any]:
    """What :meth:`score_after` needs of a context scored with many continuations.

    Returns ``{"kv": per-layer keys/values [B, C, heads, head_dim], "h_last": [B, D]}``
    (``h_last``: the final hidden state at the context's last valid token, read when a
    continuation has no valid token). Attention is causal, so the context's states do not
    depend on what follows: compute them once per context instead of once per response.
    """
    if valid_BxC is None:
      valid_BxC = context_BxC != 0
    h_BxCxD, kv = self.decoder(self.decoder.embed(context_BxC))
    return {"kv": kv, "h_last": _at_last_valid(h_BxCxD, valid_BxC)}

  def score_after(self, prefix: dict[str, Any], tokens_BxT: Array, valid_BxT: Array) -> Array:
    """``self(concat(context, tokens), concat(valid_ctx, valid_BxT))`` from the context's
    :meth:`prefix` (rows aligned with ``tokens_BxT``): only the ``T`` new positions run,
    and of the last block only what the read position needs (:meth:`Decoder.extend_at`)."""
    h_BxD = self.decoder.extend_at(tokens_BxT, prefix["kv"], _last_valid(valid_BxT))
    h_BxD = jnp.where(jnp.any(valid_BxT.astype(bool), axis=-1)[:, None], h_BxD,
                      prefix["h_last"])
    return self._head(h_BxD)


def response_logprobs(
    model: Transformer, tokens_BxL: Array, response_mask_BxL: Array, length_normalize: bool = False
) -> Array:
  """Log-prob of the masked (response) tokens of full sequences, summed per row by default.

  Args:
    model: a ``Transformer``.
    tokens_BxL: full sequences ``[BOS] + context + [SEP] + response``.
    response_mask_BxL: 1 at the positions of the tokens being scored (response tokens up to
      and including EOS), indexed like ``tokens_BxL``. Logits at ``t`` predict token
      ``t+1``, so position 0 can never be scored and its mask value is ignored.
    length_normalize: per-token mean instead of the sum (see ``logprobs.sequence_logprobs``).

  Returns:
    ``logp_B`` float32.
  """
  logits_BxLxV = model(tokens_BxL[:, :-1])
  logp_BxT = lp.token_logprobs(logits_BxLxV, tokens_BxL[:, 1:])
  return lp.sequence_logprobs(logp_BxT, response_mask_BxL[:, 1:], length_normalize)


def prompt_response_logprobs(
    model: Transformer, prompt_BxP: Array, responses: Sequence[Array], masks: Sequence[Array],
    length_normalize: bool = False,
) -> tuple[Array, ...]:
  """:func:`response_logprobs` of ``prompt + r`` for each response batch ``r`` in
  ``responses`` (``[B, T]`` each, one ``T``), with the prompt run once for all of them.

  The prompt's keys and values are computed once and every response attends to them
  (:meth:`Decoder.extend`); the logits at the prompt's last position predict each
  response's first token. Equal to ``response_logprobs(model, concat([prompt, r]),
  concat([0, mask]))`` up to float rounding, and differentiable like it (the prompt's
  gradient collects every response's). For a chosen/rejected pair this skips ``P / (P + T)``
  of the second forward: at the ``small`` lab's ``P = 8, T = 12``, ~22 % of a train step's
  FLOPs (tests/test_model.py checks the equality and XLA's count).

  Args:
    model: a ``Transformer``.
    prompt_BxP: ``[BOS] + context + [SEP]`` (the same prompt for every response batch).
    responses: ``N`` token arrays ``[B, T]``.
    masks: their response masks ``[B, T]`` (1 up to and including EOS).
    length_normalize: per-token mean instead of the sum.

  Returns:
    ``N`` float32 arrays ``[B]``, in the order of ``responses``.
  """
  n = len(responses)
  if n < 1 or len(masks) != n:
    raise ValueError(f"need as many masks as responses (at least one), got {n} responses "
                     f"and {len(masks)} masks.")
  logp_BxN = grouped_response_logprobs(model, prompt_BxP, jnp.stack(responses, axis=1),
                                       jnp.stack(masks, axis=1), length_normalize)
  return tuple(logp_BxN[:, i] for i in range(n))


def grouped_response_logprobs(
    model: Transformer, prompt_BxP: Array, resp_BxNxT: Array, mask_BxNxT: Array,
    length_normalize: bool = False,
) -> Array:
  """:func:`prompt_response_logprobs` for ``N`` responses per prompt given as one array:
  ``[B, N]`` log-probs of ``resp_BxNxT[b, i]`` after ``prompt_BxP[b]``, the prompt run once.

  The form for many samples of one prompt (RLOO's ``k``, best-of-n candidates): a
  context-major ``[B·N, T]`` batch, as ``sampling.sample(..., repeats=N)`` returns it, is
  ``resp.reshape(B, N, T)``.
  """
  if mask_BxNxT.shape != resp_BxNxT.shape:
    raise ValueError(f"responses {tuple(resp_BxNxT.shape)} and masks "
                     f"{tuple(mask_BxNxT.shape)} must have one shape [B, N, T].")
  b, n, t = resp_BxNxT.shape
  logp_BNxT = grouped_token_logprobs(model, prompt_BxP, resp_BxNxT).reshape(b * n, t)
  return lp.sequence_logprobs(logp_BNxT, mask_BxNxT.reshape(b * n, t),
                              length_normalize).reshape(b, n)


def grouped_token_logprobs(model: Transformer, prompt_BxP: Array, resp_BxNxT: Array) -> Array:
  """Per-token ``log π(y_t | prompt, y_<t)`` of ``N`` responses per prompt, ``[B, N, T]``
  (every position, masked or not), each prompt run once for its ``N`` responses.

  Equal to the response part of ``token_logprobs(model(concat([prompt, y])[:, :-1]), ...)``
  with the prompt repeated ``N`` times, up to float rounding (tests/test_model.py).
  """
  b, n, t = _check_grouped(prompt_BxP, resp_BxNxT)
  logits_BxNxTxV = grouped_response_logits(model, prompt_BxP, resp_BxNxT)
  resp = resp_BxNxT.astype(prompt_BxP.dtype)
  return lp.token_logprobs(logits_BxNxTxV.reshape(b * n, t, -1),
                           resp.reshape(b * n, t)).reshape(b, n, t)


def grouped_response_logits(model: Transformer, prompt_BxP: Array, resp_BxNxT: Array) -> Array:
  """Logits predicting each response token, ``[B, N, T, V]``: position ``t`` is the
  distribution of ``y_t`` given ``prompt`` and ``y_<t``, each prompt run once for its ``N``
  responses (what a token-level KL between two contexts needs)."""
  b, n, t = _check_grouped(prompt_BxP, resp_BxNxT)
  dec = model.decoder
  h_BxPxD, prefix = dec(dec.embed(prompt_BxP))
  # Rows are prompt-major (row b·N + i: response i to prompt b), so a batch sharded over
  # devices stays where it is: repeating the prompt's states and merging [B, N] -> [B·N]
  # move nothing between devices (concatenating the N batches would, as XLA found on a
  # data-sharded mesh: experiments/POD_PLAN.md).
  rep = lambda x: jnp.repeat(x, n, axis=0) if n > 1 else x  # noqa: E731
  first_BNx1xV = rep(model._logits(h_BxPxD[:, -1:]))
  resp_BNxT = resp_BxNxT.reshape(b * n, t).astype(prompt_BxP.dtype)
  if t > 1:
    rest_BNxTm1xV = model._logits(dec.extend(resp_BNxT[:, :-1], jax.tree.map(rep, prefix)))
    logits_BNxTxV = jnp.concatenate([first_BNx1xV, rest_BNxTm1xV], axis=1)
  else:
    logits_BNxTxV = first_BNx1xV
  return logits_BNxTxV.reshape(b, n, t, -1)


def _check_grouped(prompt_BxP: Array, resp_BxNxT: Array) -> tuple[int, int, int]:
  if resp_BxNxT.ndim != 3 or prompt_BxP.ndim != 2 or prompt_BxP.shape[0] != resp_BxNxT.shape[0]:
    raise ValueError(f"prompts {tuple(prompt_BxP.shape)} and responses "
                     f"{tuple(resp_BxNxT.shape)} must be [B, P] and [B, N, T].")
  return resp_BxNxT.shape


def param_count(model_or_state: Any) -> int:
  """Number of scalar parameters (``nnx.Param`` leaves) in a module or an ``nnx.State``.

  For a stacked (sweep) state this counts every member.
  """
  if isinstance(model_or_state, nnx.Module):
    model_or_state = nnx.state(model_or_state, nnx.Param)
  return int(sum(x.size for x in jax.tree.leaves(model_or_state)))


def flops_per_token(cfg: TransformerConfig, seq_len: int) -> int:
  """Forward-pass matmul FLOPs per token of ``Transformer`` on length-``seq_len`` sequences.

  Counts 2 FLOPs per multiply-add of every matmul the implementation executes:

    per layer:  2·(3·d·d)   fused QKV
              + 2·(d·d)     attention output
              + 2·(2·d·d_ff) MLP up and down
              + 2·2·L·d     scores QKᵀ and the weighted sum of values over all L keys
    once:       2·d·V       unembedding

  so ``n_layers·(8·d² + 4·d·d_ff + 4·L·d) + 2·d·V``. The attention term uses the full
  ``L×L`` score matrix because the implementation computes it and masks it (no causal
  halving). Embedding lookups, norms, softmax and GELU are not matmuls and are not counted.
  A training step (forward + backward) is about 3× this.

  References:
    Kaplan et al., "Scaling Laws for Neural Language Models", arXiv 2001.08361, Table 1;
    Hoffmann et al., arXiv 2203.15556, Appendix F.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
  d, f, n = cfg.d_model, cfg.d_ff, seq_len
  per_layer = 2 * 3 * d * d + 2 * d * d + 2 * 2 * d * f + 2 * 2 * n * d
  return cfg.n_layers * per_layer + 2 * d * cfg.vocab_size
