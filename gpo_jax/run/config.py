"""Run configs: the one place a config is validated (errors name the bad value and the valid choices), locking, JSON export.

A run config (``configs/common.py`` builds the shared sections) holds ``algorithm`` (a key of
``gpo_jax.algorithms.REGISTRY``), ``lab``, ``sweep`` (the algorithm's axes), ``train``,
``eval``, ``mesh``, ``checkpoint``, ``distributed`` and ``analyze``. :func:`validate` checks
the sections every algorithm shares, then asks the algorithm to build its members (which
type-checks and range-checks every swept value), then checks the mesh against the devices.
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

from gpo_jax import algorithms
from gpo_jax.engine.members import Members
from gpo_jax.engine.program import TrainConfig
from gpo_jax.runtime import sharding
from gpo_jax.runtime import writers


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
    writers.save_text_atomic(path, to_json(config))
  return path


def _int(name: str, v: Any, minimum: int = 1) -> None:
  if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
    raise ValueError(f"{name}={v!r} must be an int >= {minimum}.")


def member_chunk(config) -> int | None:
  """``train.member_chunk``: 0 = vmap all members at once (None), else members per loop step."""
  chunk = config.train.member_chunk
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
    raise ValueError(f"train.member_chunk={chunk!r} must be 0 (vmap all members) or a "
                     "positive number of members per loop iteration.")
  return chunk or None


def mesh_dict(config) -> dict[str, int]:
  """The mesh axes of ``config.mesh`` as ints (``-1`` = the devices the others leave)."""
  return {k: int(config.mesh.get(k, 1)) for k in sharding.MESH_AXES}


def train_config(config) -> TrainConfig:
  """The engine's optimizer and batch settings from ``config.train``."""
  t = config.train
  return TrainConfig(batch_size=t.batch_size, b1=t.b1, b2=t.b2, eps=t.eps,
                     grad_clip=t.grad_clip, warmup_steps=t.warmup_steps,
                     weight_decay=t.weight_decay)


def algorithm(config) -> algorithms.Algorithm:
  """The algorithm ``config.algorithm`` names (default ``gpo`` for configs that predate the key)."""
  return algorithms.get(config.get("algorithm", "gpo"))


def member_count(config) -> int:
  """Number of sweep members, computed from the config alone (touches no JAX device)."""
  return algorithm(config).member_count(config)


def validate(config, num_devices: int | None = None, n_train: int | None = None) -> Members:
  """Checks a run config before anything expensive runs.

  Args:
    config: a run config.
    num_devices: devices the mesh must cover (default ``jax.device_count()``).
    n_train: training examples available (default the lab config's ``n_train_pairs``).

  Returns:
    The sweep members.

  Raises:
    ValueError: naming the bad value and the valid choices.
  """
  algo = algorithm(config)
  t = config.train
  _int("train.steps", t.steps, 0)
  _int("train.batch_size", t.batch_size)
  _int("train.log_every", t.log_every)
  _int("train.warmup_steps", t.warmup_steps, 0)
  for name in ("b1", "b2"):
    v = t[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
      raise ValueError(f"train.{name}={v!r} must be a number in [0, 1) (an Adam moment decay).")
  for name in ("eps", "grad_clip", "weight_decay"):
    v = t[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
      raise ValueError(f"train.{name}={v!r} must be a finite number >= 0.")
  _int("eval.every", config.eval.every)
  _int("checkpoint.every", config.checkpoint.every)
  _int("checkpoint.keep", config.checkpoint.keep)
  member_chunk(config)
  from gpo_jax.lab import LabConfig  # local: the lab's typed config checks itself
  LabConfig.from_dict(config.lab)
  members = algo.validate(config, config.lab.n_train_pairs if n_train is None else n_train)
  if members.size == 0:
    raise ValueError("the sweep has no members; every swept list needs at least one value.")
  preset = config.mesh.get("preset", "dp")
  sharding.get_preset(preset)
  if num_devices is None:
    import jax
    num_devices = jax.device_count()
  sharding.validate_mesh(mesh_dict(config), num_devices, num_members=members.size,
                         batch_size=t.batch_size)
  return members
