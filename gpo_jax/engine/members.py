"""Sweep members as a table: named ``[M]`` columns, the traced subset the step receives, and the metrics-row prefix.

An algorithm decides its axes (offline GPO: family × β × seed × lr × γ × data size; the
reward-model trainer: seed × data size × label kind × lr) and builds a :class:`Members`;
the engine only needs ``seed`` and ``data_size`` (the data order) among the traced columns.
Traced columns become ``[M]`` device arrays, so new values never recompile.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

REQUIRED = ("seed", "data_size")


@dataclasses.dataclass(frozen=True)
class Members:
  """The members of a sweep, one entry per member in every column.

  Attributes:
    columns: ordered ``name -> [M]`` host arrays (numbers or strings).
    traced: names of the columns passed to the step as ``[M]`` arrays (floats as float32,
      integers as int32); must include :data:`REQUIRED`.
    hidden: columns left out of metrics rows (e.g. an index whose name column is shown).
    tables: static lookup tables the algorithm indexes with traced columns (e.g. the
      family callables that ``family_idx`` selects).
  """
  columns: Mapping[str, np.ndarray]
  traced: tuple[str, ...]
  hidden: tuple[str, ...] = ()
  tables: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    sizes = {k: len(v) for k, v in self.columns.items()}
    if len(set(sizes.values())) > 1:
      raise ValueError(f"member columns differ in length: {sizes}.")
    missing = [k for k in tuple(self.traced) + REQUIRED if k not in self.columns]
    if missing:
      raise ValueError(f"members lack columns {missing}; have {list(self.columns)}.")

  @property
  def size(self) -> int:
    return len(next(iter(self.columns.values())))

  def __getattr__(self, name: str):
    # Columns and tables read as attributes: members.beta, members.families.
    if name.startswith("__"):
      raise AttributeError(name)
    for source in ("columns", "tables"):
      d = object.__getattribute__(self, source)
      if name in d:
        return d[name]
    raise AttributeError(f"members have no column or table {name!r}; columns "
                         f"{list(self.columns)}, tables {list(self.tables)}.")

  def hparams(self) -> dict[str, Array]:
    """The traced per-member hyperparameters: ``{name: [M]}`` float32 / int32 arrays."""
    out = {}
    for k in self.traced:
      v = np.asarray(self.columns[k])
      out[k] = jnp.asarray(v, jnp.int32 if v.dtype.kind in "iub" else jnp.float32)
    return out

  def row(self, m: int) -> dict[str, Any]:
    """Member ``m``'s columns as a metrics-row prefix (``member`` first)."""
    row: dict[str, Any] = {"member": m}
    for k, v in self.columns.items():
      if k not in self.hidden:
        x = v[m]
        row[k] = x.item() if isinstance(x, np.generic) else x
    return row

  def select(self, idx: Sequence[int]) -> "Members":
    """The sub-sweep of the members ``idx`` (same tables)."""
    idx = np.asarray(idx)
    return dataclasses.replace(self, columns={k: v[idx] for k, v in self.columns.items()})


def product(axes: Sequence[tuple[str, Sequence[Any]]]) -> dict[str, list]:
  """Row-major product of named axes: ``{name: [values of each row]}`` (last axis fastest)."""
  names = [n for n, _ in axes]
  for n, vals in axes:
    if len(vals) == 0:
      raise ValueError(f"sweep axis {n!r} is empty; give at least one value.")
  rows = list(itertools.product(*(vals for _, vals in axes)))
  return {n: [r[i] for r in rows] for i, n in enumerate(names)}


def check_numbers(name: str, values: Sequence[Any], *, minimum: float = 0.0,
                  inclusive: bool = False, integer: bool = False) -> None:
  """Type-checks swept values first, then their range; the error names the list.

  Raises:
    ValueError: an empty list, a non-number (a string, a bool, None, a nested tuple), a
      non-finite value, or a value outside ``> minimum`` (``>= minimum`` if inclusive).
  """
  values = list(values)
  if not values:
    raise ValueError(f"sweep {name} is empty; give at least one value.")
  bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
  kind = "integers" if integer else "numbers"
  for v in values:
    ok_type = (isinstance(v, (int, np.integer)) if integer else
               isinstance(v, (int, float, np.integer, np.floating)))
    if isinstance(v, (bool, np.bool_)) or not ok_type:
      raise ValueError(f"sweep {name} must be {kind}; got {v!r} ({type(v).__name__}) in "
                       f"{values!r}.")
    if not np.isfinite(v) or not (v >= minimum if inclusive else v > minimum):
      raise ValueError(f"sweep {name} values must be finite and {bound}; got {v!r} in "
                       f"{values!r}.")


def data_sizes(values: Sequence[Any], *, n_train: int, batch_size: int) -> list[int]:
  """Resolves ``sweep.data_sizes`` (0 or None = all ``n_train``); each must lie in ``[batch_size, n_train]``."""
  values = list(values)
  if not values:
    raise ValueError("sweep data_sizes is empty; give at least one size (0 = all pairs).")
  out = []
  for d in values:
    if d is not None and (isinstance(d, bool) or not isinstance(d, (int, np.integer))):
      raise ValueError(f"sweep data_sizes must be integers (0 = all pairs); got {d!r} in "
                       f"{values!r}.")
    d = n_train if not d else int(d)
    if not batch_size <= d <= n_train:
      raise ValueError(f"sweep data_size={d} must lie in [batch_size={batch_size}, "
                       f"n_train={n_train}].")
    out.append(d)
  return out
