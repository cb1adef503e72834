"""Logical axis names, sharding presets, mesh construction and the replication check for sweeps.

Weights carry *logical* axis names (``vocab``, ``embed``, ``mlp``, ``heads``, ``kv``) through
``nnx.with_partitioning``; activations use ``batch`` and ``length``; ``sweep`` is the leading
axis of every stacked member state. A preset maps logical names to the mesh axes
``("sweep", "data", "model")``, so a user picks ``dp``, ``fsdp`` or ``fsdp_tp`` and never
writes per-tensor partition specs (the MaxText/Levanter idea, kept small):

* ``dp``: members over ``sweep``, batch over ``data``, weights replicated within a member.
* ``fsdp``: as ``dp``, and every weight's ``embed`` dimension sharded over ``data``.
* ``fsdp_tp``: as ``fsdp``, and ``mlp``/``heads``/``vocab`` sharded over ``model``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("sweep", "data", "model")
SWEEP = "sweep"
DATA = "data"
WEIGHT_AXES = ("vocab", "embed", "mlp", "heads", "kv")
ACTIVATION_AXES = ("batch", "length")
LOGICAL_AXES = (SWEEP,) + WEIGHT_AXES + ACTIVATION_AXES


@dataclasses.dataclass(frozen=True)
class Preset:
  """A named mapping from logical axis names to mesh axes.

  Attributes:
    name: preset name.
    rules: logical axis name -> mesh axis name, or None for replication.
    max_replicated_fraction: largest tolerated fraction of state bytes that are fully
      replicated across the non-sweep mesh axes (see `check_replication`).
  """

  name: str
  rules: Mapping[str, str | None]
  max_replicated_fraction: float


def _rules(**overrides: str | None) -> dict[str, str | None]:
  base: dict[str, str | None] = {name: None for name in LOGICAL_AXES}
  base.update(sweep="sweep", batch="data")
  base.update(overrides)
  return base


PRESETS: dict[str, Preset] = {
    # Weights are replicated within a member by design, so any fraction is acceptable.
    "dp": Preset("dp", _rules(), 1.0),
    "fsdp": Preset("fsdp", _rules(embed="data"), 0.1),
    "fsdp_tp": Preset("fsdp_tp", _rules(embed="data", mlp="model", heads="model",
                                        vocab="model"), 0.1),
}


def get_preset(preset: str | Preset) -> Preset:
  """Returns the `Preset` for a name (or the preset itself); unknown names raise ValueError."""
  if isinstance(preset, Preset):
    return preset
  if preset not in PRESETS:
    raise ValueError(f"Unknown sharding preset {preset!r}; valid presets: {sorted(PRESETS)}.")
  return PRESETS[preset]


# ----------------------------------------------------------------------------- meshes


def divisors(n: int) -> list[int]:
  """Positive divisors of ``n`` in increasing order."""
  return [d for d in range(1, n + 1) if n % d == 0]


def resolve_mesh(mesh_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Replaces one axis size ``-1`` by the devices the other axes leave (``num_devices`` /
  their product), e.g. ``{"sweep": -1}`` spans all devices; other sizes pass through.

  Raises:
    ValueError: for more than one ``-1``, or when the other axes do not divide the devices.
  """
  sizes = {name: mesh_cfg.get(name, 1) for name in MESH_AXES}
  sizes.update({k: v for k, v in mesh_cfg.items() if k not in sizes})
  fill = [k for k, v in sizes.items() if v == -1 and not isinstance(v, bool)]
  if not fill:
    return sizes
  if len(fill) > 1:
    raise ValueError(f"Mesh {dict(mesh_cfg)} has several axes of size -1 ({fill}); at most "
                     "one axis may fill the remaining devices.")
  rest = math.prod(int(v) for k, v in sizes.items() if k != fill[0] and k in MESH_AXES)
  if rest < 1 or num_devices % rest:
    raise ValueError(
        f"Mesh {dict(mesh_cfg)}: the fixed axes use {rest} devices, which does not divide the "
        f"{num_devices} available (divisors: {divisors(num_devices)}), so '{fill[0]}'=-1 "
        "cannot fill the rest.")
  sizes[fill[0]] = num_devices // rest
  return sizes


def mesh_shape(mesh_cfg: Mapping[str, int]) -> tuple[int, int, int]:
  """Returns the ``(sweep, data, model)`` sizes of a mesh config; missing axes default to 1."""
  unknown = sorted(set(mesh_cfg) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"Unknown mesh axes {unknown}; valid axes: {list(MESH_AXES)}.")
  shape = []
  for name in MESH_AXES:
    size = mesh_cfg.get(name, 1)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
      raise ValueError(f"Mesh axis {name!r} has size {size!r}; sizes must be positive ints.")
    shape.append(int(size))
  return tuple(shape)


def validate_mesh(mesh_cfg: Mapping[str, int], num_devices: int, *,
                  num_members: int | None = None, batch_size: int | None = None) -> None:
  """Checks that a mesh config fits the devices, the member count and the batch size.

  Args:
    mesh_cfg: e.g. ``{"sweep": 2, "data": 4, "model": 1}``.
    num_devices: number of devices the mesh must cover exactly.
    num_members: sweep members; must be divisible by the ``sweep`` axis.
    batch_size: global batch size per member; must be divisible by the ``data`` axis.

  Raises:
    ValueError: naming the bad value and the valid choices.
  """
  mesh_cfg = resolve_mesh(mesh_cfg, num_devices)
  sweep, data, model = shape = mesh_shape(mesh_cfg)
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"Mesh {dict(zip(MESH_AXES, shape))} has {math.prod(shape)} devices but "
        f"{num_devices} are available; axis sizes must multiply to {num_devices} "
        f"(each a divisor of {num_devices}: {divisors(num_devices)}).")
  if num_members is not None and num_members % sweep:
    raise ValueError(
        f"{num_members} sweep members are not divisible by mesh axis 'sweep'={sweep}; "
        f"valid 'sweep' sizes for {num_members} members: "
        f"{[d for d in divisors(num_members) if num_devices % d == 0]}.")
  if batch_size is not None and batch_size % data:
    raise ValueError(
        f"Batch size {batch_size} is not divisible by mesh axis 'data'={data}; "
        f"valid 'data' sizes for this batch: "
        f"{[d for d in divisors(batch_size) if num_devices % d == 0]}.")


def make_mesh(mesh_cfg: Mapping[str, int], *, devices: Sequence[jax.Device] | None = None,
              num_members: int | None = None, batch_size: int | None = None) -> jax.sharding.Mesh:
  """Builds a validated ``("sweep", "data", "model")`` mesh with Auto axis types.

  Auto axes (not jax 0.10's default Explicit ones) keep ``with_sharding_constraint`` and
  ``nnx.Embed`` lookups working inside jitted code.

  Args:
    mesh_cfg: axis sizes, e.g. ``{"sweep": 2, "data": 4, "model": 1}``; one axis may be
      ``-1`` to span the devices the others leave (:func:`resolve_mesh`).
    devices: devices to use (default: all of ``jax.devices()``).
    num_members: optional member count to validate against the ``sweep`` axis.
    batch_size: optional batch size to validate against the ``data`` axis.
  """
  devices = list(jax.devices() if devices is None else devices)
  validate_mesh(mesh_cfg, len(devices), num_members=num_members, batch_size=batch_size)
  shape = mesh_shape(resolve_mesh(mesh_cfg, len(devices)))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


# ----------------------------------------------------------------------------- specs


def logical_to_mesh_spec(logical_axes: Sequence[str | None],
                         rules: str | Preset | Mapping[str, str | None]) -> PartitionSpec:
  """Translates logical axis names into a `PartitionSpec` of mesh axes.

  A mesh axis may shard only one dimension of an array; a later dimension that maps to an
  axis already used is replicated instead (e.g. ``("embed", "embed")`` under ``fsdp``).

  Args:
    logical_axes: one logical name (or None) per array dimension.
    rules: a preset name, a `Preset`, or a logical -> mesh axis mapping.
  """
  mapping = get_preset(rules).rules if isinstance(rules, (str, Preset)) else rules
  used: set[str] = set()
  spec = []
  for name in logical_axes:
    if name is None:
      spec.append(None)
      continue
    if name not in mapping:
      raise ValueError(f"Unknown logical axis {name!r}; valid names: {sorted(mapping)}.")
    axis = mapping[name]
    if axis is not None and axis in used:
      axis = None
    if axis is not None:
      used.add(axis)
    spec.append(axis)
  return PartitionSpec(*spec)


def logical_sharding(mesh: jax.sharding.Mesh, logical_axes: Sequence[str | None],
                     preset: str | Preset = "dp") -> NamedSharding:
  """`NamedSharding` for an array whose dimensions carry ``logical_axes``."""
  return NamedSharding(mesh, logical_to_mesh_spec(logical_axes, preset))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, *, stacked: bool = False) -> NamedSharding:
  """Sharding of a data batch: ``[B, ...]`` over ``data``, or ``[M, B, ...]`` over ``(sweep, data)``.

  Args:
    mesh: the run's mesh.
    ndim: rank of the batch array (including the member axis when ``stacked``).
    stacked: whether the leading axis is the sweep-member axis.
  """
  lead = (SWEEP, "batch") if stacked else ("batch",)
  if ndim < len(lead):
    raise ValueError(f"A {'stacked ' if stacked else ''}batch needs ndim >= {len(lead)}, got {ndim}.")
  return logical_sharding(mesh, lead + (None,) * (ndim - len(lead)), "dp")


def variable_logical_axes(leaf: Any) -> tuple[str | None, ...] | None:
  """Logical axis names that ``nnx.with_partitioning`` stored on a Variable (None if absent).

  Flax 0.12 stores them as ``out_sharding`` metadata; older releases used ``sharding`` or
  ``sharding_names``, which are read as a fallback.
  """
  get_metadata = getattr(leaf, "get_metadata", None)
  if get_metadata is None:
    return None
  metadata = get_metadata()
  for key in ("out_sharding", "sharding_names", "sharding"):
    names = metadata.get(key)
    if names:
      return tuple(names)
  return None


def _is_variable(x: Any) -> bool:
  from flax import nnx  # local import keeps this module importable without flax initialised
  return isinstance(x, nnx.Variable)


def _shape_of(x: Any) -> tuple[int, ...]:
  return tuple(np.shape(x.get_value() if _is_variable(x) else x))


@dataclasses.dataclass(frozen=True)
class Fallback:
  """A dimension that was replicated because its size does not divide its mesh axis."""

  path: str
  dim: int
  size: int
  mesh_axis: str
  mesh_axis_size: int


def stacked_state_shardings(abstract_stacked_state: Any, mesh: jax.sharding.Mesh,
                            preset: str | Preset, *,
                            fallbacks: list[Fallback] | None = None) -> Any:
  """Shardings for a stacked (leading member axis) state, from its logical axis metadata.

  Each leaf's logical names come from its Variable metadata (``nnx.with_partitioning``);
  ``sweep`` is prepended for the member axis unless the names already start with it (as
  after ``nnx.vmap(..., transform_metadata={nnx.PARTITION_NAME: "sweep"})``). Leaves
  without names (plain arrays, optimizer counters) are sharded over ``sweep`` only.
  A weight dimension whose size is not divisible by its mesh axis is replicated and
  recorded (logged, and appended to ``fallbacks`` when given); an indivisible member axis
  raises, since that is a config error.

  Args:
    abstract_stacked_state: pytree (e.g. ``nnx.State``) of arrays or ShapeDtypeStructs,
      possibly wrapped in Variables, each with a leading member axis.
    mesh: the run's mesh (axes ``sweep``, ``data``, ``model``).
    preset: preset name or `Preset`.
    fallbacks: optional list collecting `Fallback` records.

  Returns:
    A pytree with the structure of ``abstract_stacked_state`` whose leaves are
    `NamedSharding` (inside Variables where the input had Variables), usable as
    ``jax.jit`` ``out_shardings`` or as ShapeDtypeStruct shardings.
  """
  preset = get_preset(preset)
  axis_sizes = dict(mesh.shape)
  records: list[Fallback] = []

  def leaf_sharding(path, leaf):
    shape = _shape_of(leaf)
    names = variable_logical_axes(leaf)
    pstr = jax.tree_util.keystr(path)
    if not shape:
      logical: tuple[str | None, ...] = ()
    elif names is None:
      logical = (SWEEP,) + (None,) * (len(shape) - 1)
    elif len(names) == len(shape) - 1:
      logical = (SWEEP,) + names
    elif len(names) == len(shape) and names[0] == SWEEP:
      logical = names
    else:
      raise ValueError(
          f"Leaf {pstr} of shape {shape} has logical axes {names}; a stacked state needs "
          f"{len(shape) - 1} names (plus the member axis) or names starting with {SWEEP!r}.")
    spec = list(logical_to_mesh_spec(logical, preset))
    spec += [None] * (len(shape) - len(spec))
    for dim, axis in enumerate(spec):
      if axis is None or shape[dim] % axis_sizes[axis] == 0:
        continue
      if dim == 0 and logical[0] == SWEEP:
        raise ValueError(
            f"{shape[0]} members (leaf {pstr}) are not divisible by mesh axis "
            f"'sweep'={axis_sizes[axis]}; valid 'sweep' sizes: {divisors(shape[0])}.")
      records.append(Fallback(pstr, dim, shape[dim], axis, axis_sizes[axis]))
      spec[dim] = None
    sharding = NamedSharding(mesh, PartitionSpec(*spec))
    return leaf.replace(sharding) if _is_variable(leaf) else sharding

  out = jax.tree_util.tree_map_with_path(leaf_sharding, abstract_stacked_state,
                                         is_leaf=_is_variable)
  for rec in records:
    logging.warning("sharding: %s dim %d (size %d) is not divisible by mesh axis %r=%d; "
                    "replicating that dimension.", rec.path, rec.dim, rec.size,
                    rec.mesh_axis, rec.mesh_axis_size)
  if fallbacks is not None:
    fallbacks.extend(records)
  return out


def shape_dtype_structs(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStruct targets (e.g. for a checkpoint restore) carrying the given shardings."""
  def target(x, s):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)
  return jax.tree.map(target, state, shardings)


# ----------------------------------------------------------------------------- replication


@dataclasses.dataclass(frozen=True)
class ReplicationReport:
  """Bytes of a state that are fully replicated across the non-sweep mesh axes."""

  replicated_bytes: int
  total_bytes: int
  replicated_leaves: tuple[str, ...]

  @property
  def fraction(self) -> float:
    return self.replicated_bytes / self.total_bytes if self.total_bytes else 0.0


class ReplicationError(ValueError):
  """Raised when too much of a state is replicated for the chosen preset."""


def replication_report(state: Any, shardings: Any, mesh: jax.sharding.Mesh) -> ReplicationReport:
  """Measures which leaves are fully replicated across the non-sweep axes of ``mesh``.

  A leaf counts as replicated when no dimension is sharded over a non-sweep mesh axis of
  size > 1, i.e. every device of a member group holds the whole member copy. When the
  non-sweep axes have a single device, nothing is replicated (fraction 0).
  """
  inner_devices = math.prod(size for name, size in mesh.shape.items() if name != SWEEP)
  state_leaves = jax.tree_util.tree_leaves_with_path(state)
  sharding_leaves = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
  if len(state_leaves) != len(sharding_leaves):
    raise ValueError(f"state has {len(state_leaves)} leaves but shardings has "
                     f"{len(sharding_leaves)}; pass shardings built for this state.")
  replicated, total, names = 0, 0, []
  for (path, leaf), sharding in zip(state_leaves, sharding_leaves):
    if not isinstance(sharding, NamedSharding):
      raise TypeError(f"Sharding of {jax.tree_util.keystr(path)} is {type(sharding).__name__}; "
                      "expected a NamedSharding.")
    nbytes = int(np.prod(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize
    total += nbytes
    used = set()
    for entry in sharding.spec:
      used.update(entry if isinstance(entry, tuple) else (entry,))
    inner_shards = math.prod(sharding.mesh.shape[a] for a in used if a not in (None, SWEEP))
    if inner_devices > 1 and inner_shards == 1:
      replicated += nbytes
      names.append(jax.tree_util.keystr(path))
  return ReplicationReport(replicated, total, tuple(names))


def check_replication(state: Any, shardings: Any, mesh: jax.sharding.Mesh,
                      max_replicated_fraction: float | str | Preset) -> ReplicationReport:
  """Raises `ReplicationError` when too many state bytes are fully replicated.

  Args:
    state: pytree of arrays / ShapeDtypeStructs (Variables allowed).
    shardings: matching pytree of `NamedSharding`.
    mesh: the run's mesh.
    max_replicated_fraction: a threshold in [0, 1], or a preset (name) whose threshold
      is used (``fsdp`` tolerates < 10 %).

  Returns:
    The `ReplicationReport` when the check passes.
  """
  if isinstance(max_replicated_fraction, (str, Preset)):
    max_replicated_fraction = get_preset(max_replicated_fraction).max_replicated_fraction
  report = replication_report(state, shardings, mesh)
  if report.fraction > max_replicated_fraction:
    largest = ", ".join(report.replicated_leaves[:8])
    raise ReplicationError(
        f"{report.fraction:.1%} of the state ({report.replicated_bytes} of "
        f"{report.total_bytes} bytes) is fully replicated across the non-sweep mesh axes "
        f"{ {k: v for k, v in mesh.shape.items() if k != SWEEP} }, above the allowed "
        f"{max_replicated_fraction:.1%}. Replicated leaves: {largest}. Annotate these "
        "weights with logical axes (nnx.with_partitioning) or pick another preset/mesh.")
  return report


def gathered_at_use(param_shardings, mesh):
  """One member's weight shardings for use inside the member map: the stacked params'
  ``param_shardings`` without their member axis and with ``data`` removed (the weight is
  gathered over ``data`` where it is used, its ``model`` split kept: the FSDP pattern)."""
  def gathered(sh):
    rest = tuple(sh.spec)[1:]     # drop the member (sweep) axis: the loss sees one member
    def strip(a):
      if isinstance(a, tuple):
        a = tuple(x for x in a if x != DATA)
        return a or None
      return None if a == DATA else a
    return NamedSharding(mesh, PartitionSpec(*(strip(a) for a in rest)))
  return jax.tree.map(gathered, param_shardings)
