"""Tests for gpo_jax.runtime.sharding: presets, mesh validation, and sharded-equals-dense training."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gpo_jax.runtime import sharding as sh

import multidevice


def test_presets_map_logical_axes_as_documented():
  assert sh.logical_to_mesh_spec(("sweep", "embed", "mlp"), "dp") == P("sweep", None, None)
  assert sh.logical_to_mesh_spec(("sweep", "embed", "mlp"), "fsdp") == P("sweep", "data", None)
  assert sh.logical_to_mesh_spec(("sweep", "embed", "mlp"), "fsdp_tp") == P("sweep", "data", "model")
  assert sh.logical_to_mesh_spec(("vocab", "embed"), "fsdp_tp") == P("model", "data")
  assert sh.logical_to_mesh_spec(("heads", "kv"), "fsdp_tp") == P("model", None)
  assert sh.logical_to_mesh_spec(("batch", "length"), "fsdp") == P("data", None)
  assert sh.logical_to_mesh_spec((None, "embed"), {"embed": "model"}) == P(None, "model")


def test_a_mesh_axis_shards_at_most_one_dimension():
  # ("embed", "embed") would put 'data' twice in one spec, which JAX rejects.
  assert sh.logical_to_mesh_spec(("embed", "embed"), "fsdp") == P("data", None)
  assert sh.logical_to_mesh_spec(("batch", "embed"), "fsdp") == P("data", None)


def test_unknown_names_raise_with_valid_choices():
  with pytest.raises(ValueError, match=r"'emb'.*valid names.*embed"):
    sh.logical_to_mesh_spec(("emb",), "dp")
  with pytest.raises(ValueError, match=r"'zero3'.*\['dp', 'fsdp', 'fsdp_tp'\]"):
    sh.get_preset("zero3")
  with pytest.raises(ValueError, match=r"'tensor'.*valid axes"):
    sh.validate_mesh({"tensor": 2}, 2)


@pytest.mark.parametrize("mesh_cfg,kwargs,pattern", [
    ({"sweep": 2, "data": 2}, {}, r"4 devices but 8.*\[1, 2, 4, 8\]"),
    ({"sweep": 4, "data": 2}, {"num_members": 6}, r"6 sweep members.*'sweep'=4.*\[1, 2\]"),
    ({"sweep": 2, "data": 4}, {"batch_size": 10}, r"Batch size 10.*'data'=4.*\[1, 2\]"),
    ({"sweep": 0, "data": 8}, {}, r"'sweep' has size 0"),
])
def test_mesh_validation_names_the_bad_value(mesh_cfg, kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    sh.validate_mesh(mesh_cfg, 8, **kwargs)


def test_mesh_validation_accepts_good_configs():
  sh.validate_mesh({"sweep": 2, "data": 4}, 8, num_members=6, batch_size=12)
  sh.validate_mesh({"sweep": 2, "data": 2, "model": 2}, 8, num_members=2, batch_size=2)


def test_make_mesh_on_available_devices():
  n = jax.device_count()
  mesh = sh.make_mesh({"data": n})
  assert mesh.axis_names == sh.MESH_AXES
  assert dict(mesh.shape) == {"sweep": 1, "data": n, "model": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match="devices but"):
    sh.make_mesh({"sweep": 2 * n})


class _Tiny(nnx.Module):

  def __init__(self, rngs):
    init = nnx.initializers.normal(1.0)
    self.w = nnx.Linear(4, 8, rngs=rngs, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")))


def _stacked_abstract(members=2):
  def init(key):
    with nnx.use_eager_sharding(False):
      return nnx.state(_Tiny(nnx.Rngs(key)), nnx.Param)
  return jax.eval_shape(jax.vmap(init), jax.random.split(jax.random.key(0), members))


def test_stacked_shardings_read_flax_metadata_and_prepend_sweep():
  mesh = sh.make_mesh({"data": jax.device_count()})
  shardings = sh.stacked_state_shardings(_stacked_abstract(), mesh, "fsdp_tp")
  assert shardings["w"]["kernel"].get_value().spec == P("sweep", "data", "model"), (
      "the kernel's ('embed', 'mlp') metadata was not read or 'sweep' was not prepended")
  # The bias has no annotation: only its member axis is sharded.
  assert shardings["w"]["bias"].get_value().spec == P("sweep", None)


def test_stacked_shardings_accept_names_that_already_include_sweep():
  mesh = sh.make_mesh({"data": jax.device_count()})
  leaf = nnx.Param(jax.ShapeDtypeStruct((2, 4), jnp.float32), out_sharding=("sweep", "embed"),
                   eager_sharding=False)
  assert sh.stacked_state_shardings({"x": leaf}, mesh, "fsdp")["x"].get_value().spec == P(
      "sweep", "data")
  bad = nnx.Param(jax.ShapeDtypeStruct((2, 4), jnp.float32), out_sharding=("embed", "mlp"),
                  eager_sharding=False)
  with pytest.raises(ValueError, match="logical axes"):
    sh.stacked_state_shardings({"x": bad}, mesh, "fsdp")


def test_replication_is_zero_without_inner_devices():
  mesh = sh.make_mesh({"sweep": jax.device_count()})
  abstract = _stacked_abstract(members=jax.device_count())
  shardings = sh.stacked_state_shardings(abstract, mesh, "dp")
  assert sh.check_replication(abstract, shardings, mesh, "fsdp").fraction == 0.0


@pytest.mark.multidevice
def test_sharded_training_equals_dense_on_8_devices():
  result = multidevice.run_json("sharding_subprocess.py", timeout=900)

  for case in result["cases"]:
    label = f"{case['preset']} on {case['mesh']}"
    assert case["train_delta"] > 1e-2, f"{label}: training did not move the weights; vacuous"
    assert case["max_abs_diff"] < 1e-5, (
        f"{label}: sharded training differs from the dense one-device run by "
        f"{case['max_abs_diff']} (members mixed up or a wrong reduction)")

  dp, fsdp, fsdp_tp, fallback = result["cases"]
  kernel1, kernel2 = "['l1']['kernel'].value", "['l2']['kernel'].value"
  assert dp["specs"][kernel1] == ["sweep", None, None]
  assert dp["num_shards"][kernel1] == 8, "dp over sweep=8 must give each member its own device"
  assert fsdp["specs"][kernel1] == ["sweep", "data", None]
  assert fsdp["specs"][kernel2] == ["sweep", None, "data"]
  assert fsdp["num_shards"][kernel1] == 8 and fsdp["replicated_fraction"] < 0.1
  assert fsdp_tp["specs"][kernel1] == ["sweep", "data", "model"]
  assert fsdp_tp["specs"][kernel2] == ["sweep", "model", "data"]
  # embed=6 does not divide data=4: every embed dim falls back to replication, and is recorded.
  assert fallback["specs"][kernel1] == ["sweep", None, None]
  assert sorted(f[0] for f in fallback["fallbacks"]) == [
      "['l1']['kernel']", "['l2']['bias']", "['l2']['kernel']"]
  assert fallback["replicated_fraction"] == 1.0

  rep = result["replication"]
  assert not rep["sharded"]["raised"] and rep["sharded"]["fraction"] < 0.1
  assert rep["replicated"]["raised"], "a fully replicated state must fail the fsdp check"
  assert "100.0%" in rep["replicated"]["message"]


@pytest.mark.parametrize("cfg, n, want", [
    ({"sweep": -1}, 8, {"sweep": 8, "data": 1, "model": 1}),
    ({"sweep": -1, "data": 2}, 8, {"sweep": 4, "data": 2, "model": 1}),
    ({"sweep": 2, "data": -1, "model": 2}, 8, {"sweep": 2, "data": 2, "model": 2}),
    ({"sweep": 2, "data": 4}, 8, {"sweep": 2, "data": 4, "model": 1}),
])
def test_resolve_mesh_fills_one_axis_with_the_remaining_devices(cfg, n, want):
  assert sh.resolve_mesh(cfg, n) == want


@pytest.mark.parametrize("cfg, n, pattern", [
    ({"sweep": -1, "data": -1}, 8, "several axes of size -1"),
    ({"sweep": -1, "data": 3}, 8, "use 3 devices, which does not divide the 8"),
])
def test_resolve_mesh_names_impossible_fills(cfg, n, pattern):
  with pytest.raises(ValueError, match=pattern):
    sh.resolve_mesh(cfg, n)


def test_make_mesh_with_a_fill_axis_spans_all_devices():
  mesh = sh.make_mesh({"sweep": -1}, num_members=jax.device_count())
  assert dict(mesh.shape) == {"sweep": jax.device_count(), "data": 1, "model": 1}
