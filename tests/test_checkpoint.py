"""Tests for gpo_jax.runtime.checkpoint: bit-exact round trips, keep-last-k, corrupt fallback, mesh change."""

import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpo_jax.runtime import checkpoint

import multidevice


def _state(seed):
  """A stacked params + Adam state, with values that are not round numbers."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {"w": jax.random.normal(k1, (3, 4, 5)), "b": jax.random.normal(k2, (3, 5))}
  opt_state = jax.vmap(optax.adam(1e-3).init)(params)
  return {"params": params, "opt": opt_state}


def _target(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _bits(tree):
  return [np.asarray(x).view(np.uint8) for x in jax.tree.leaves(tree)]


def test_round_trip_is_bitwise_with_typed_keys_and_metadata(tmp_path):
  state, rng = _state(0), jax.random.split(jax.random.key(42), 3)
  with checkpoint.Checkpointer(tmp_path / "ck", keep=2) as ckpt:
    assert ckpt.save(5, state, rng=rng, metadata={"data_index": 17, "epoch": 1})
  with checkpoint.Checkpointer(tmp_path / "ck") as ckpt:
    assert ckpt.latest_step() == 5
    out = ckpt.restore(_target(state))
  assert out.step == 5 and out.metadata == {"data_index": 17, "epoch": 1}
  assert all(np.array_equal(a, b) for a, b in zip(_bits(state), _bits(out.state))), (
      "restored state is not bit-identical to the saved one")
  assert jax.tree.structure(out.state) == jax.tree.structure(state)
  assert jnp.issubdtype(out.rng.dtype, jax.dtypes.prng_key), "typed key came back untyped"
  np.testing.assert_array_equal(jax.random.key_data(out.rng), jax.random.key_data(rng))
  # The restored key must drive the same random stream as the original one.
  np.testing.assert_array_equal(jax.random.uniform(out.rng[1], (4,)),
                                jax.random.uniform(rng[1], (4,)))


def test_save_every_and_keep_last_k(tmp_path):
  state = _state(1)
  with checkpoint.Checkpointer(tmp_path, save_every=3, keep=2) as ckpt:
    saved = [s for s in range(1, 11) if ckpt.save(s, state)]
    assert saved == [3, 6, 9], "save_every=3 must write only multiples of 3"
    assert ckpt.save(10, state, force=True), "a forced final save must write"
    assert not ckpt.save(10, state, force=True), "re-saving an existing step must be a no-op"
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [9, 10], "keep=2 must keep exactly the two newest steps"
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["10", "9"]


def _damage(step_dir: pathlib.Path, how: str):
  files = [p for p in step_dir.rglob("*") if p.is_file()]
  if how == "truncate":
    for p in files:
      data = p.read_bytes()
      p.write_bytes(data[: len(data) // 3])
  elif how == "flip_array_bytes":
    # Same sizes, different payload: only the data chunks, so orbax itself may not notice.
    chunks = [p for p in files if p.parent.name == "d"]
    assert chunks, f"no data chunks found under {step_dir}"
    for p in chunks:
      data = bytearray(p.read_bytes())
      for i in range(len(data) // 2, len(data) - 4):
        data[i] ^= 0x5A
      p.write_bytes(bytes(data))
  elif how == "wrong_fingerprint":
    # Arrays readable but not what was saved: only the integrity fingerprint can tell.
    meta_file = step_dir / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    leaf = sorted(meta["fingerprints"])[0]
    meta["fingerprints"][leaf] = (meta["fingerprints"][leaf] + 1) % 2**32
    meta_file.write_text(json.dumps(meta))
  else:
    raise ValueError(how)


# A failed orbax read can leave an asyncio callback behind; it is harmless here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["truncate", "flip_array_bytes", "wrong_fingerprint"])
def test_corrupt_latest_falls_back_to_previous_with_warning(tmp_path, caplog, how):
  states = {1: _state(1), 2: _state(2)}
  with checkpoint.Checkpointer(tmp_path, keep=3) as ckpt:
    for s, st in states.items():
      ckpt.save(s, st, metadata={"data_index": s})
  _damage(tmp_path / "2", how)
  with caplog.at_level(logging.WARNING):
    with checkpoint.Checkpointer(tmp_path, keep=3) as ckpt:
      out = ckpt.restore(_target(states[1]))
  assert out.step == 1, f"damaged step 2 ({how}) was not rejected"
  assert out.metadata == {"data_index": 1}
  assert all(np.array_equal(a, b) for a, b in zip(_bits(states[1]), _bits(out.state)))
  warnings = [r.getMessage() for r in caplog.records if "step 2" in r.getMessage()]
  assert warnings, "the fallback must log a warning naming the bad step"
  if how == "wrong_fingerprint":
    assert "fingerprints differ" in warnings[0], warnings[0]


def test_all_corrupt_or_missing_raises_clear_error(tmp_path):
  state = _state(0)
  with checkpoint.Checkpointer(tmp_path / "empty") as ckpt:
    with pytest.raises(checkpoint.CheckpointError, match="No checkpoints"):
      ckpt.restore(_target(state))
  with checkpoint.Checkpointer(tmp_path / "ck", keep=3) as ckpt:
    for s in (1, 2):
      ckpt.save(s, state)
  for s in (1, 2):
    _damage(tmp_path / "ck" / str(s), "truncate")
  with checkpoint.Checkpointer(tmp_path / "ck") as ckpt:
    with pytest.raises(checkpoint.CheckpointError, match=r"(?s)All checkpoints.*step 2.*step 1"):
      ckpt.restore(_target(state))
    # Both damaged steps were moved to ck.corrupt/ on the way (kept, not deleted).
    with pytest.raises(checkpoint.CheckpointError, match="No checkpoints in"):
      ckpt.restore(_target(state), step=7)
  assert sorted(p.name.split("-")[0] for p in (tmp_path / "ck.corrupt").iterdir()) == ["1", "2"]
  with checkpoint.Checkpointer(tmp_path / "ck2", keep=3) as ckpt:
    for s in (1, 2):
      ckpt.save(s, state)
  with checkpoint.Checkpointer(tmp_path / "ck2") as ckpt:
    with pytest.raises(checkpoint.CheckpointError, match="step 7.*saved steps: \\[1, 2\\]"):
      ckpt.restore(_target(state), step=7)


def test_fingerprint_detects_swapped_elements():
  x = jnp.arange(6.0)
  swapped = x.at[jnp.array([0, 1])].set(jnp.array([1.0, 0.0]))
  assert checkpoint.state_fingerprints({"x": x}) != checkpoint.state_fingerprints({"x": swapped})
  assert checkpoint.state_fingerprints({"x": x}) == checkpoint.state_fingerprints({"x": x + 0})


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="save_every=0"):
    checkpoint.Checkpointer("/tmp/unused_gpo_ck", save_every=0)
  with pytest.raises(TypeError, match="typed PRNG key"):
    checkpoint.state_fingerprints({"k": jax.random.key(0)})


@pytest.mark.multidevice
def test_restore_onto_a_different_mesh(tmp_path):
  out = multidevice.run_json("checkpoint_subprocess.py", tmp_path / "ck", timeout=900)
  assert out["step"] == 7 and out["metadata"] == {"data_index": 123}
  assert out["bitwise_equal"], "state restored on a 4x2x1 mesh differs from the 2x2x2 original"
  assert out["rng_equal"]
  assert out["kernel_spec_saved"] == ["sweep", "data", "model"]
  assert out["kernel_spec_restored"] == ["sweep", "data", None], (
      "restore ignored the target shardings")
  assert out["restored_mesh"] == {"sweep": 4, "data": 2, "model": 1}
