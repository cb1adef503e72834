"""Sort-free data order: each member's batches are a per-epoch keyed permutation of its first ``data_size`` pairs.

The data position of a member is its step: pair ``k = step * batch_size + i`` is element
``k mod data_size`` of the permutation of epoch ``k // data_size``, keyed by the member's
seed. Nothing is stored, so a resumed run sees exactly the batches of an uninterrupted one,
on any mesh, for any algorithm that trains on indexed examples.
"""

import jax
import jax.numpy as jnp

Array = jax.Array

# fold_in tag separating the data-order stream of a member seed from other streams.
_DATA_STREAM = 0x5EED


def _mix(x: Array, mask: Array, p: Array) -> Array:
  """One pass of a keyed bijection of the integers ``[0, mask]`` (``mask = 2**b - 1``).

  Every operation is invertible on the low ``b`` bits: xor with a key, multiplication by
  an odd constant (the low bits of a product depend only on the low bits of its factors),
  and ``x ^= (x & mask) >> s``; so ``mix(x) & mask`` permutes ``[0, mask]``. The constants
  are from Kensler (2013).
  """
  u = lambda c: jnp.uint32(c)  # noqa: E731
  x = x ^ p
  x = x * u(0xE170893D)
  x = x ^ (p >> 16)
  x = x ^ ((x & mask) >> 4)
  x = x ^ (p >> 8)
  x = x * u(0x0929EB3F)
  x = x ^ (p >> 23)
  x = x ^ ((x & mask) >> 1)
  x = x * (u(1) | (p >> 27))
  x = x * u(0x6935FA69)
  x = x ^ ((x & mask) >> 11)
  x = x * u(0x74DCB303)
  x = x ^ ((x & mask) >> 2)
  x = x * u(0x9E501CC3)
  x = x ^ ((x & mask) >> 2)
  x = x * u(0xC860A3DF)
  x = x & mask
  return x ^ (x >> 5)


def permute_index(i: Array, n: Array, p: Array) -> Array:
  """Element ``i`` of a keyed pseudo-random permutation of ``range(n)``, without a sort.

  A keyed bijection of ``[0, 2**b)`` (``2**b`` the next power of two >= ``n``) is applied
  until the value falls below ``n`` ("cycle walking"), which restricts it to a bijection of
  ``[0, n)``; a keyed rotation follows. Fewer than two passes are needed on average
  because ``2**b < 2 n``. Costs O(len(i)) where a shuffle by ``argsort`` costs a sort of
  ``n`` keys; data loaders index-shuffle the same way (e.g. grain's Feistel shuffle).

  Args:
    i: uint32/int indices in ``[0, n)`` (any shape).
    n: permutation length >= 1 (may be traced).
    p: uint32 scalar key.

  Returns:
    int32 array like ``i``; ``i -> result`` is a bijection of ``range(n)`` for each key.

  References:
    Kensler, "Correlated Multi-Jittered Sampling", Pixar Technical Memo 13-01 (2013), §3.
  """
  n = jnp.asarray(n).astype(jnp.uint32)
  p = jnp.asarray(p).astype(jnp.uint32)
  mask = n - jnp.uint32(1)
  for s in (1, 2, 4, 8, 16):
    mask = mask | (mask >> s)
  x = jax.lax.while_loop(
      lambda x: jnp.any(x >= n),
      lambda x: jnp.where(x >= n, _mix(x, mask, p), x),
      _mix(jnp.asarray(i).astype(jnp.uint32), mask, p))
  return ((x + p % n) % n).astype(jnp.int32)


def batch_indices(seed: Array, data_size: Array, step: Array, batch_size: int) -> Array:
  """Indices of one member's batch: a per-epoch permutation of ``arange(data_size)``.

  Pair position ``k = step * batch_size + i`` is element ``k mod data_size`` of the
  permutation of epoch ``k // data_size``, keyed by ``fold_in(key(seed), epoch)``
  (:func:`permute_index`, no sort). A batch spans at most two epochs because
  ``batch_size <= data_size``.

  Args:
    seed: int scalar (may be traced).
    data_size: int scalar >= ``batch_size`` (may be traced).
    step: int scalar (may be traced).
    batch_size: static.

  Returns:
    ``idx_B`` int32 in ``[0, data_size)``.
  """
  key = jax.random.fold_in(jax.random.key(seed), _DATA_STREAM)
  pos = step * batch_size + jnp.arange(batch_size)
  epoch, within = pos // data_size, pos % data_size
  first = (step * batch_size) // data_size
  p_first, p_next = (jax.random.bits(jax.random.fold_in(key, e), (), jnp.uint32)
                     for e in (first, first + 1))
  return permute_index(within, data_size, jnp.where(epoch == first, p_first, p_next))
