"""Orbax checkpointing of a sweep's train state with async saves, keep-last-k and corrupt-latest fallback.

A checkpoint bundles a pytree state (stacked params + optimizer state), the step, an RNG key
(stored as ``jax.random.key_data`` so typed keys round-trip bit for bit) and a small JSON
blob of user metadata (e.g. the data iterator position). Every save also records an integrity
fingerprint per state leaf (a position-weighted wrap-around sum of the raw bits, computed on
device); a restore recomputes it, so a checkpoint whose files were silently damaged is
rejected like one orbax cannot read, and `Checkpointer.restore` falls back to the previous step.
The user metadata is covered too (a SHA-256 of its canonical JSON), so one changed digit in it
is a corrupt step, and a caller's own check (``validate``) can reject a step the same way.
A step found corrupt during a fallback is moved out of the checkpoint directory into
``<directory>.corrupt/`` (kept for inspection, never deleted): it no longer holds a keep-last-k
slot, so orbax never garbage-collects a valid older step in its favour, and the same step is
saved afresh when training reaches it again.
Orbax writes array shards from every process and the JSON item from the primary process only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

_STATE = "state"
_META = "meta"
_FORMAT = 2  # 2: the user metadata carries a SHA-256


class CheckpointError(RuntimeError):
  """Raised when no checkpoint in a directory can be restored."""


@dataclasses.dataclass
class Restored:
  """What `Checkpointer.restore` returns."""

  step: int
  state: Any
  rng: jax.Array | None
  metadata: dict[str, Any]


def _fingerprint(x: jax.Array) -> jax.Array:
  """Order-independent reduction of the raw bits of ``x``, weighted by flat position.

  Summation modulo 2**32 is associative and commutative, so the value is the same for any
  sharding or mesh; the odd positional weights make swapped elements change the value.
  """
  dtype = np.dtype(x.dtype)
  if dtype == np.bool_:
    u = x.astype(jnp.uint32)
  elif dtype.itemsize in (1, 2, 4, 8) and dtype.kind in "fiu":
    u = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32,
                                         8: jnp.uint32}[dtype.itemsize]).astype(jnp.uint32)
  else:
    raise TypeError(f"Cannot fingerprint dtype {dtype}; checkpoint states hold numeric arrays.")
  u = u.ravel()
  weights = jnp.arange(u.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
  return jnp.sum(u * weights, dtype=jnp.uint32)


_fingerprints = jax.jit(lambda leaves: [_fingerprint(x) for x in leaves])


def _host(x: Any) -> np.ndarray:
  """Host copy of an array that may be a replicated global array in a multi-process run."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.is_fully_replicated:
      raise ValueError("Expected a replicated array (RNG keys and fingerprints are replicated).")
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def state_fingerprints(state: Any) -> dict[str, int]:
  """Integrity fingerprint (uint32) of every array leaf of ``state``, keyed by tree path."""
  flat = jax.tree_util.tree_leaves_with_path(state)
  for path, leaf in flat:
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      raise TypeError(f"State leaf {jax.tree_util.keystr(path)} is a typed PRNG key; pass keys "
                      "as `rng` (saved as key_data) or store jax.random.key_data in the state.")
  values = _fingerprints([leaf for _, leaf in flat])
  return {jax.tree_util.keystr(p): int(_host(v)) for (p, _), v in zip(flat, values)}


def metadata_digest(metadata: Mapping[str, Any]) -> str:
  """SHA-256 of the canonical JSON of a checkpoint's user metadata."""
  text = json.dumps(metadata, sort_keys=True, separators=(",", ":"), allow_nan=True)
  return hashlib.sha256(text.encode()).hexdigest()


def _as_target(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for sweep runs.

  Example::

    ckpt = Checkpointer(workdir / "checkpoints", save_every=500, keep=3)
    for step in range(start, num_steps + 1):
      ...
      ckpt.save(step, state, rng=key, metadata={"data_index": i},
                force=step == num_steps)
    ckpt.close()   # waits for the async save

  Args:
    directory: checkpoint directory (made absolute; orbax's async thread needs that).
    save_every: `save` writes only when ``step % save_every == 0`` unless forced.
    keep: number of most recent checkpoints kept on disk (None keeps all).
    async_save: save in a background thread (each call still blocks briefly).
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int = 1,
               keep: int | None = 3, async_save: bool = True):
    if save_every < 1:
      raise ValueError(f"save_every={save_every!r}; it must be a positive int.")
    if keep is not None and keep < 1:
      raise ValueError(f"keep={keep!r}; it must be a positive int or None (keep all).")
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(
        # The save cadence is decided here: orbax would also save the first step it sees.
        max_to_keep=keep, save_interval_steps=1, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(_STATE, _META))

  # -- saving

  def should_save(self, step: int) -> bool:
    """Whether `save` at ``step`` (unforced) would write."""
    return step % self.save_every == 0 and step not in self._manager.all_steps()

  def save(self, step: int, state: Any, *, rng: jax.Array | None = None,
           metadata: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Starts an (async) save of ``state`` at ``step`` if due; returns whether it saved.

    Args:
      step: training step.
      state: pytree of jax arrays (e.g. ``nnx.State`` of stacked params + optimizer state).
      rng: optional typed (or raw uint32) PRNG key array, stored as key data.
      metadata: small JSON-serialisable dict (data iterator position, ...).
      force: save even if ``step`` is not a multiple of ``save_every`` (end of training).
    """
    if step in self._manager.all_steps() or not (force or step % self.save_every == 0):
      return False
    user = json.loads(json.dumps(dict(metadata or {})))   # what JsonSave will store
    meta = {"format": _FORMAT, "user": user, "user_sha256": metadata_digest(user),
            "fingerprints": state_fingerprints(state), "rng": None}
    if rng is not None:
      typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
      data = _host(jax.random.key_data(rng) if typed else rng)
      meta["rng"] = {"impl": str(jax.random.key_impl(rng)) if typed else None,
                     "shape": list(data.shape), "dtype": str(data.dtype),
                     "data": data.ravel().tolist()}
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                 _META: ocp.args.JsonSave(meta)})
    return bool(self._manager.save(step, args=args, force=True))

  def wait_until_finished(self) -> None:
    """Blocks until the pending async save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- restoring

  def all_steps(self) -> list[int]:
    """Saved steps (finalised ones), oldest first."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Newest saved step, or None; it may still prove corrupt at restore time."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def _restore_step(self, step: int, target: Any, validate=None) -> Restored:
    abstract = jax.tree.map(_as_target, target)
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract),
                                 _META: ocp.args.JsonRestore()})
    out = self._manager.restore(step, args=args)
    state, meta = out[_STATE], out[_META]
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
      raise CheckpointError(f"step {step}: metadata item is missing or has an unknown format "
                            f"(want format {_FORMAT})")
    if metadata_digest(meta.get("user", {})) != meta.get("user_sha256"):
      raise CheckpointError(f"step {step}: the metadata's SHA-256 does not match its contents")
    saved, now = meta["fingerprints"], state_fingerprints(state)
    if saved != now:
      bad = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
      raise CheckpointError(f"step {step}: integrity fingerprints differ for {bad[:5]}")
    rng = None
    if meta["rng"] is not None:
      r = meta["rng"]
      data = np.asarray(r["data"], dtype=r["dtype"]).reshape(r["shape"])
      rng = jax.random.wrap_key_data(data, impl=r["impl"]) if r["impl"] else jnp.asarray(data)
    restored = Restored(step=step, state=state, rng=rng, metadata=meta["user"])
    if validate is not None:
      validate(restored)
    return restored

  def _quarantine(self, step: int) -> str | None:
    """Moves a corrupt step out of the manager's directory; returns where (primary process)."""
    src = os.path.join(self.directory, str(step))
    dst_dir = self.directory + ".corrupt"
    dst = os.path.join(dst_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    moved = None
    if jax.process_index() == 0 and os.path.isdir(src):
      os.makedirs(dst_dir, exist_ok=True)
      os.rename(src, dst)
      moved = dst
    if jax.process_count() > 1:
      from gpo_jax.runtime import distributed
      distributed.barrier(f"checkpoint-quarantine-{step}")
    self._manager.reload()
    return moved

  def restore(self, target: Any, step: int | None = None, *, validate=None) -> Restored:
    """Restores onto ``target``'s shapes, dtypes and shardings.

    With ``step=None`` the newest checkpoint is tried first; one that fails to load, whose
    fingerprints or metadata digest do not match, or that ``validate`` rejects, is moved to
    ``<directory>.corrupt/`` with a warning naming the step, and the next older one is
    tried. An explicit ``step`` is restored or raises (and is never moved).

    Args:
      target: pytree like the saved state whose leaves are ``jax.ShapeDtypeStruct`` (with
        the shardings wanted now, e.g. on a different mesh) or arrays (their shardings used).
      step: a specific step, or None for the newest valid one.
      validate: optional ``validate(restored)`` raising :class:`CheckpointError` when a
        step that loaded is nevertheless unusable (e.g. its data position disagrees).

    Raises:
      CheckpointError: no checkpoint exists, or none (or not ``step``) can be restored.
    """
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"No checkpoints in {self.directory}.")
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"No checkpoint for step {step} in {self.directory}; "
                              f"saved steps: {steps}.")
      try:
        return self._restore_step(step, target, validate)
      except Exception as e:  # noqa: BLE001 - re-raised with context
        raise CheckpointError(f"Checkpoint step {step} in {self.directory} is unreadable: "
                              f"{type(e).__name__}: {e}") from e
    errors = []
    for s in reversed(steps):
      try:
        restored = self._restore_step(s, target, validate)
      except Exception as e:  # noqa: BLE001 - any failure means "try an older step"
        moved = self._quarantine(s)
        logging.warning("checkpoint: step %d in %s is corrupt or unreadable (%s: %s); moved "
                        "to %s; falling back to the previous checkpoint.", s, self.directory,
                        type(e).__name__, str(e)[:300], moved)
        errors.append(f"step {s}: {type(e).__name__}: {str(e)[:200]} (moved to {moved})")
        continue
      return restored
    raise CheckpointError(f"All checkpoints in {self.directory} are corrupt or unreadable:\n"
                          + "\n".join(errors))
