"""Multi-process helpers: optional `jax.distributed` start-up, per-process data slices, global arrays.

In a multi-process run every process executes the same program on its own devices; each
loads only the rows of a global batch that its devices hold (`process_slice`) and
`global_array` stitches those process-local rows into one global `jax.Array`. A run with one
process (the default) uses the same code paths.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def maybe_initialize(coordinator_address: str | Mapping[str, Any] | None = None,
                     num_processes: int | None = None, process_id: int | None = None, *,
                     cpu_collectives: str | None = "gloo", local_device_ids: Any = None) -> bool:
  """Calls `jax.distributed.initialize` when a multi-process run is configured.

  Must run before any JAX computation. With ``coordinator_address`` unset (or one process)
  this is a no-op, so single-machine code can call it unconditionally.

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator service, or a config
      section (mapping / ConfigDict) with keys ``coordinator_address``, ``num_processes``,
      ``process_id`` and optionally ``enabled`` (False makes the call a no-op).
    num_processes: total number of processes.
    process_id: this process's index in ``[0, num_processes)``.
    cpu_collectives: cross-process collectives for CPU devices (``"gloo"``; JAX's CPU
      backend has none by default). None leaves the setting alone.
    local_device_ids: optional subset of local devices this process uses.

  Returns:
    Whether JAX was initialised for several processes.
  """
  if isinstance(coordinator_address, Mapping) or hasattr(coordinator_address, "to_dict"):
    section = dict(coordinator_address)
    if not section.get("enabled", True):
      return False
    coordinator_address = section.get("coordinator_address")
    num_processes = section.get("num_processes", num_processes)
    process_id = section.get("process_id", process_id)
  if not coordinator_address or num_processes in (None, 1):
    return False
  if process_id is None or not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id!r}; it must be in [0, {num_processes}) "
                     f"for num_processes={num_processes}.")
  if cpu_collectives is not None:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)
  logging.info("distributed: process %d of %d, %d local / %d global devices", process_id,
               num_processes, jax.local_device_count(), jax.device_count())
  return True


def process_slice(n: int, sharding: jax.sharding.Sharding | None = None, *,
                  dim: int = 0, global_shape: tuple[int, ...] | None = None) -> slice:
  """The rows ``[start, stop)`` of a length-``n`` global dimension that this process loads.

  Without ``sharding``, ``n`` is split evenly over processes in process order. With a
  sharding, the slice covers exactly what this process's devices hold along ``dim`` (which
  may be the whole dimension, e.g. when the dimension is split only within a process).

  Args:
    n: global size of the dimension (e.g. the global batch size).
    sharding: the sharding the global array will have.
    dim: the dimension being split.
    global_shape: the global array shape (default ``(n,)`` padded with ones to ``dim + 1``).

  Raises:
    ValueError: ``n`` does not divide evenly, or this process's rows are not contiguous.
  """
  if sharding is None:
    count, index = jax.process_count(), jax.process_index()
    if n % count:
      raise ValueError(f"Global size {n} is not divisible by the {count} processes; "
                       f"use a multiple of {count}.")
    per = n // count
    return slice(index * per, (index + 1) * per)
  shape = global_shape if global_shape is not None else (1,) * dim + (n,)
  if shape[dim] != n:
    raise ValueError(f"global_shape[{dim}]={shape[dim]} but n={n}.")
  rows = set()
  for index in sharding.addressable_devices_indices_map(shape).values():
    start, stop, _ = index[dim].indices(n)
    rows.update(range(start, stop))
  lo, hi = min(rows), max(rows) + 1
  if len(rows) != hi - lo:
    raise ValueError(f"This process's rows along dim {dim} are not contiguous under {sharding}; "
                     "reorder the mesh so each process holds one block.")
  return slice(lo, hi)


def global_array(local_data: Any, sharding: jax.sharding.Sharding,
                 global_shape: tuple[int, ...]) -> jax.Array:
  """Builds a global array from this process's rows (see `process_slice`).

  Args:
    local_data: host array of this process's rows (``global_data[process_slice(...)]``).
    sharding: target sharding of the global array.
    global_shape: shape of the global array.
  """
  return jax.make_array_from_process_local_data(sharding, np.asarray(local_data), global_shape)


def put(tree: Any, sharding: jax.sharding.Sharding | None) -> Any:
  """Places host arrays that every process holds identically onto a (multi-process) sharding.

  Each process materialises only the shards its own devices hold; ``sharding=None`` returns
  ``tree`` unchanged. Under a mesh spanning several devices or processes, jit rejects
  arguments committed to a single device, so constants go through here.
  """
  if sharding is None:
    return tree
  def one(x):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
  return jax.tree.map(one, tree)


def to_host(x: jax.Array) -> np.ndarray:
  """Full host copy of a (possibly multi-process sharded) global array, on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def barrier(name: str) -> None:
  """Blocks until every process reaches the barrier called ``name`` (no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def is_primary() -> bool:
  """Whether this is process 0 (the one that writes metrics and manifests)."""
  return jax.process_index() == 0
