"""Model-side log-probability math: token log-probs, masked sequence sums, entropy and exact per-token KL."""

import jax
import jax.numpy as jnp

Array = jax.Array


def token_logprobs(logits_BxTxV: Array, targets_BxT: Array) -> Array:
  """Log-probability of each target token under the categorical given by the logits.

  Args:
    logits_BxTxV: unnormalised logits; position ``t`` scores ``targets_BxT[:, t]``.
    targets_BxT: integer token ids in ``[0, V)``.

  Returns:
    ``logp_BxT`` in float32.
  """
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  idx_BxTx1 = targets_BxT[..., None].astype(jnp.int32)
  return jnp.take_along_axis(logp_BxTxV, idx_BxTx1, axis=-1)[..., 0]


def sequence_logprobs(logp_BxT: Array, mask_BxT: Array, length_normalize: bool = False) -> Array:
  """Masked per-sequence log-probability: a sum by default, a per-token mean on request.

  Masked-out positions are selected away (not multiplied by zero), so ``-inf`` log-probs
  there cannot turn into NaN. A row with an empty mask gives exactly 0, with a zero
  gradient, in both modes.

  Args:
    logp_BxT: per-token log-probs.
    mask_BxT: 1/True where a token belongs to the sequence being scored.
    length_normalize: if True, divide by the number of unmasked tokens.

  Returns:
    ``logp_B``.
  """
  keep_BxT = mask_BxT.astype(bool)
  total_B = jnp.sum(jnp.where(keep_BxT, logp_BxT, 0.0), axis=-1)
  if length_normalize:
    # Clamp the count so empty rows divide 0 by 1 instead of 0 by 0.
    count_B = jnp.maximum(jnp.sum(keep_BxT, axis=-1), 1).astype(total_B.dtype)
    return total_B / count_B
  return total_B


def _plogp_terms(logits_BxTxV: Array) -> tuple[Array, Array, Array]:
  """Returns (p, log p with zeros where p == 0, support mask) in float32."""
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  p = jnp.exp(logp)
  support = p > 0
  # Zero log p outside the support so 0 * log 0 = 0 in the value and in the gradient.
  return p, jnp.where(support, logp, 0.0), support


def token_entropy(logits_BxTxV: Array) -> Array:
  """Entropy in nats of the categorical at every position, ``-Σ_v p_v log p_v``.

  ``-inf`` logits (e.g. from top-k filtering) are allowed and contribute 0.
  """
  p, logp, _ = _plogp_terms(logits_BxTxV)
  return -jnp.sum(p * logp, axis=-1)


def token_kl(logits_p_BxTxV: Array, logits_q_BxTxV: Array) -> Array:
  """Exact ``KL(p || q) = Σ_v p_v (log p_v - log q_v)`` per position, in nats.

  Computed from log-softmax of both logit tensors (no sampling). Tokens outside the
  support of ``p`` contribute 0; a token in the support of ``p`` with ``q_v = 0`` gives
  ``+inf``, which is the correct value.

  References:
    Schulman, "Approximating KL divergence" (2020), for the sample estimators k1/k3 that
    this exact quantity is compared against.
  """
  p, logp, support = _plogp_terms(logits_p_BxTxV)
  logq = jax.nn.log_softmax(logits_q_BxTxV.astype(jnp.float32), axis=-1)
  logq = jnp.where(support, logq, 0.0)
  return jnp.sum(p * (logp - logq), axis=-1)
