"""Helpers for locked ml_collections sweep configs: locking, validation with clear errors, JSON export.

The config layout is the one of ``configs/cpu_sweep.py``: ``sweep.families``, ``sweep.betas``
(a tuple shared by all families or a per-family mapping), ``train.batch_size``, and ``mesh``
(``preset``, ``sweep``, ``data``, ``model``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from gpo_jax import sharding


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks ``config`` (recursively) so that a misspelt override raises; returns it."""
  config.lock()
  return config


def _plain(value: Any) -> Any:
  """Recursively converts config values to JSON-ready Python objects."""
  if isinstance(value, ml_collections.FieldReference):
    value = value.get()
  if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, set, frozenset)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, enum.Enum):
    return value.name
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return _plain(dataclasses.asdict(value))
  if callable(value):
    return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
  if isinstance(value, (str, int, float, bool)) or value is None:
    return value
  return repr(value)


def to_json(config: Any) -> str:
  """Deterministic JSON text of a config (sorted keys; tuples as lists; callables by name)."""
  return json.dumps(_plain(config), sort_keys=True, indent=1)


def write_config_json(config: Any, workdir: str | os.PathLike, name: str = "config.json") -> str:
  """Writes ``to_json(config)`` atomically to ``<workdir>/<name>`` on process 0; returns the path."""
  path = os.path.join(os.path.abspath(os.fspath(workdir)), name)
  import jax  # local: only the writer needs to know its process index
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(to_json(config))
    os.replace(tmp, path)
  return path


def _betas_by_family(betas: Any, families: list[str]) -> dict[str, list[Any]]:
  if isinstance(betas, Mapping) or hasattr(betas, "to_dict"):
    betas = dict(betas)
    extra = sorted(set(betas) - set(families))
    if extra:
      raise ValueError(f"sweep.betas has entries {extra} for families not in sweep.families "
                       f"{families}.")
    missing = sorted(set(families) - set(betas))
    if missing:
      raise ValueError(f"sweep.betas has no betas for families {missing}; give a tuple per "
                       "family or one shared tuple.")
    return {f: list(np.atleast_1d(betas[f]).tolist()) for f in families}
  shared = list(np.atleast_1d(betas).tolist())
  return {f: shared for f in families}


def validate_sweep_config(config: Any, *, num_devices: int | None = None,
                          num_members: int | None = None) -> None:
  """Checks the parts of a sweep config that fail late or silently; errors name the value.

  Checks: every family is a registered GPO function (``gpo_jax.losses.GPO_FUNCTIONS``);
  every β is finite and > 0; the mesh preset exists; the mesh axes multiply to the device
  count; ``train.batch_size`` is divisible by ``mesh.data``; ``num_members`` (if given) by
  ``mesh.sweep``.

  Args:
    config: ConfigDict (or nested mapping) in the layout of ``configs/cpu_sweep.py``.
    num_devices: devices the mesh must cover (default ``jax.device_count()``).
    num_members: number of sweep members, when the caller has computed it.

  Raises:
    ValueError: naming the bad value and the valid choices.
  """
  from gpo_jax import losses  # lazy: losses is optional for code that only shards or writes

  families = list(np.atleast_1d(config["sweep"]["families"]).tolist())
  valid = sorted(losses.GPO_FUNCTIONS)
  for family in families:
    if family not in losses.GPO_FUNCTIONS:
      raise ValueError(f"Unknown GPO family {family!r} in sweep.families; valid names: {valid}.")
  for family, betas in _betas_by_family(config["sweep"]["betas"], families).items():
    if not betas:
      raise ValueError(f"sweep.betas for {family!r} is empty; give at least one β > 0.")
    for beta in betas:
      if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (
          math.isfinite(beta) and beta > 0):
        raise ValueError(f"β={beta!r} for family {family!r} is invalid; β must be finite "
                         "and > 0.")
  mesh_cfg = config["mesh"]
  preset = mesh_cfg.get("preset", "dp")
  sharding.get_preset(preset)
  if num_devices is None:
    import jax
    num_devices = jax.device_count()
  sharding.validate_mesh({k: mesh_cfg.get(k, 1) for k in sharding.MESH_AXES}, num_devices,
                         num_members=num_members, batch_size=config["train"]["batch_size"])
