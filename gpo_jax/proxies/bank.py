"""Several proxy sets (e.g. two proxy sizes) loaded together and scored as one ``[P, B]`` array of normalised rewards."""

from collections.abc import Sequence
import dataclasses
from typing import Any


import jax
import jax.numpy as jnp
import numpy as np

from gpo_jax.proxies import store


@dataclasses.dataclass(frozen=True)
class ProxyBank:
  """The loaded proxy sets, in order; proxies are numbered across sets."""
  sets: tuple[store.ProxySet, ...]

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(n for s in self.sets for n in s.names)

  @property
  def rows(self) -> tuple[dict, ...]:
    return tuple(r for s in self.sets for r in s.rows)

  @property
  def size(self) -> int:
    return len(self.names)

  def subset(self, indices) -> "ProxyBank":
    """The bank of the proxies at ``indices`` (numbered across sets), in that order per set.

    RL scores only what its members' selectors read: a proxy outside every member's
    selector costs a forward per sample and changes no reward.
    """
    keep = sorted({int(i) for i in indices})
    if not keep or keep[0] < 0 or keep[-1] >= self.size:
      raise ValueError(f"proxy indices {list(indices)} must be non-empty and in [0, {self.size}).")
    sets, start = [], 0
    for st in self.sets:
      local = [i - start for i in keep if start <= i < start + st.size]
      start += st.size
      if not local:
        continue
      idx = np.asarray(local)
      sets.append(dataclasses.replace(
          st, params=jax.tree.map(lambda x: x[idx], st.params),
          names=tuple(st.names[i] for i in local), rows=tuple(st.rows[i] for i in local),
          mean=st.mean[idx], std=st.std[idx]))
    return ProxyBank(tuple(sets))

  def params(self) -> tuple[Any, ...]:
    """The jit-able part: per set ``(params [P_s, ...], mean [P_s], std [P_s], ref)``
    (``ref``: π_ref's parameters for an implicit-reward set, else None)."""
    return tuple((s.params, jnp.asarray(s.mean, jnp.float32),
                  jnp.asarray(np.maximum(s.std, 1e-6), jnp.float32), s.ref)
                 for s in self.sets)

  def score_fn(self):
    """``fn(params, ctx, resp, mask) -> [P, B]`` normalised scores of every proxy."""
    defs = [(s.graphdef, s.rest, s.kind) for s in self.sets]

    def fn(params, ctx_BxC, resp_BxT, mask_BxT):
      out = []
      for (graphdef, rest, kind), (p, mean, std, ref) in zip(defs, params):
        raw = store.score_stack(graphdef, rest, p, ctx_BxC, resp_BxT, mask_BxT, kind=kind,
                                ref=ref)
        out.append((raw - mean[:, None]) / std[:, None])
      return jnp.concatenate(out, axis=0)

    return fn


def load(paths: Sequence[str], lab=None) -> ProxyBank:
  """Loads every proxy set in ``paths``; proxy names must be unique across them."""
  if not paths:
    raise ValueError("proxies.paths is empty: name at least one reward-model run whose "
                     "proxy set to load.")
  sets = tuple(store.load(p, lab) for p in paths)
  bank = ProxyBank(sets)
  if len(set(bank.names)) != bank.size:
    raise ValueError(f"proxy names repeat across proxy sets {list(paths)}: {bank.names}; "
                     "give sets of different sizes or seeds.")
  return bank


