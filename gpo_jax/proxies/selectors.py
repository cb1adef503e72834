"""What optimisation is pointed at: single proxies and ensembles of them (mean / WCO / UWO), as one traced table.

A *selector* turns the normalised scores of all loaded proxies ``[P, B]`` into one reward
``[B]``: a single proxy is an ensemble of one with the mean objective; an ensemble is a
mask over the proxies plus an objective of :data:`gpo_jax.objectives.ensembles.OBJECTIVES`
(``mean``, ``wco`` = min, ``uwo`` = mean − λ·Var; Coste et al. 2023, arXiv 2310.02743).
The table is arrays (``mask [S, P]``, ``objective [S]``, ``lam [S]``), so the selector of an
RL member is a traced index and one compiled step serves every proxy choice; best-of-n
applies the same table in NumPy.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import fnmatch

import jax
import numpy as np

from gpo_jax.objectives import ensembles


@dataclasses.dataclass(frozen=True)
class Selectors:
  """``S`` selectors over ``P`` proxies."""
  names: tuple[str, ...]
  mask: np.ndarray        # [S, P] float32, 1 = the proxy takes part
  objective: np.ndarray   # [S] int32, index into ensembles.OBJECTIVES
  lam: np.ndarray         # [S] float32 (UWO's λ; 0 otherwise)
  kind: tuple[str, ...]   # "single" | "ensemble"

  @property
  def size(self) -> int:
    return len(self.names)

  def index(self, name: str) -> int:
    if name not in self.names:
      raise ValueError(f"unknown proxy selector {name!r}; valid choices: {list(self.names)}.")
    return self.names.index(name)

  def members(self, s: int, proxy_names: Sequence[str]) -> list[str]:
    return [p for p, m in zip(proxy_names, self.mask[s]) if m > 0]

  def apply_np(self, scores_PxN: np.ndarray, s: int) -> np.ndarray:
    """Selector ``s`` of NumPy scores ``[P, ...]``."""
    name = ensembles.OBJECTIVES[int(self.objective[s])]
    return ensembles.combine(np.asarray(scores_PxN, np.float64), name, float(self.lam[s]),
                             self.mask[s])

  def used(self, selected) -> np.ndarray:
    """Indices of the proxies that any of the ``selected`` selectors reads."""
    return np.flatnonzero(self.mask[np.asarray(selected, np.int64)].any(axis=0))

  def restrict(self, proxies, selected) -> "Selectors":
    """The selectors over the proxy subset ``proxies``, for use with the ``selected``
    selector indices only (the rows stay numbered as before; a selector outside
    ``selected`` may lose proxies and must not be applied).

    Raises:
      ValueError: a ``selected`` selector reads a proxy outside ``proxies``.
    """
    idx = np.asarray(proxies, np.int64)
    chosen = np.asarray(selected, np.int64)
    lost = np.delete(self.mask, idx, axis=1)[chosen].any(axis=1)
    if lost.any():
      raise ValueError("restrict() would drop proxies of selectors "
                       f"{[self.names[i] for i in chosen[lost]]}.")
    return dataclasses.replace(self, mask=self.mask[:, idx])

  def table(self) -> dict[str, np.ndarray]:
    """The arrays a jitted function indexes with a traced selector index."""
    return {"mask": self.mask.astype(np.float32), "objective": self.objective.astype(np.int32),
            "lam": self.lam.astype(np.float32)}


def apply(table: Mapping[str, jax.Array], scores_PxB: jax.Array, idx) -> jax.Array:
  """Selector ``idx`` (may be traced) of the scores ``[P, B]`` → ``[B]``."""
  return ensembles.combine_switched(scores_PxB, table["objective"][idx], table["lam"][idx],
                                    table["mask"][idx])


def _match(patterns: Sequence[str], proxy_names: Sequence[str], where: str) -> list[int]:
  hits: list[int] = []
  for pat in patterns:
    found = [i for i, n in enumerate(proxy_names) if fnmatch.fnmatchcase(n, pat)]
    if not found:
      raise ValueError(f"{where}: pattern {pat!r} matches no proxy; the proxies are "
                       f"{list(proxy_names)}.")
    hits += [i for i in found if i not in hits]
  return hits


def build(proxy_names: Sequence[str], singles: Sequence[str] = ("*",),
          ensembles_spec: Mapping[str, Sequence[str]] | None = None,
          objectives: Sequence[str] = ("mean", "wco", "uwo"), uwo_lambda: float = 1.0
          ) -> Selectors:
  """Selectors: one per proxy matching ``singles`` (fnmatch patterns over proxy names),
  and for every ensemble ``{name: member patterns}`` one selector per objective, named
  ``<name>/<objective>``.

  Raises:
    ValueError: a pattern that matches nothing, an ensemble of fewer than 2 proxies, an
      unknown objective, λ < 0, duplicate names.
  """
  names = list(proxy_names)
  p = len(names)
  rows, obj, lam, sel_names, kind = [], [], [], [], []
  for i in _match(list(singles), names, "proxy_selectors.singles") if singles else []:
    m = np.zeros(p, np.float32)
    m[i] = 1
    rows.append(m); obj.append(0); lam.append(0.0); sel_names.append(names[i])
    kind.append("single")
  for ens, pats in dict(ensembles_spec or {}).items():
    idx = _match(list(pats), names, f"proxy_selectors.ensembles[{ens!r}]")
    if len(idx) < 2:
      raise ValueError(f"ensemble {ens!r} has {len(idx)} member(s); an ensemble needs >= 2.")
    for o in objectives:
      if o not in ensembles.OBJECTIVES:
        raise ValueError(f"unknown ensemble objective {o!r}; valid choices: "
                         f"{list(ensembles.OBJECTIVES)}.")
      m = np.zeros(p, np.float32)
      m[idx] = 1
      rows.append(m); obj.append(ensembles.OBJECTIVES.index(o))
      lam.append(float(uwo_lambda) if o == "uwo" else 0.0)
      sel_names.append(f"{ens}/{o}"); kind.append("ensemble")
  if uwo_lambda < 0:
    raise ValueError(f"uwo_lambda={uwo_lambda} must be >= 0 (the variance penalty).")
  if not sel_names:
    raise ValueError("no proxy selectors: give singles patterns or ensembles.")
  if len(set(sel_names)) != len(sel_names):
    raise ValueError(f"selector names are not unique: {sel_names}")
  return Selectors(names=tuple(sel_names), mask=np.stack(rows),
                   objective=np.asarray(obj, np.int32), lam=np.asarray(lam, np.float32),
                   kind=tuple(kind))
