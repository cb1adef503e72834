"""Subprocess for tests/test_checkpoint.py: save on one 8-device mesh, restore onto another.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``; argv[1] is the checkpoint
directory. Prints a JSON object with equality results and the restored shardings.
"""

import json
import sys

import jax
import numpy as np
from flax import nnx

from gpo_jax.runtime import checkpoint, sharding as sh


def init(key):
  with nnx.use_eager_sharding(False):
    init_fn = nnx.initializers.normal(1.0)
    lin = nnx.Linear(8, 16, rngs=nnx.Rngs(key),
                     kernel_init=nnx.with_partitioning(init_fn, ("embed", "mlp")),
                     bias_init=nnx.with_partitioning(init_fn, ("mlp",)))
    return nnx.state(lin, nnx.Param)


def main(directory):
  keys = jax.random.split(jax.random.key(3), 4)
  abstract = jax.eval_shape(jax.vmap(init), keys)
  out = {}

  save_mesh = sh.make_mesh({"sweep": 2, "data": 2, "model": 2})
  save_shardings = sh.stacked_state_shardings(abstract, save_mesh, "fsdp_tp")
  state = jax.jit(jax.vmap(init), out_shardings=save_shardings)(keys)
  expected = [np.asarray(x) for x in jax.tree.leaves(state)]
  with checkpoint.Checkpointer(directory, keep=2) as ckpt:
    ckpt.save(7, state, rng=keys, metadata={"data_index": 123})

  load_mesh = sh.make_mesh({"sweep": 4, "data": 2, "model": 1})
  load_shardings = sh.stacked_state_shardings(abstract, load_mesh, "fsdp")
  target = sh.shape_dtype_structs(abstract, load_shardings)
  with checkpoint.Checkpointer(directory, keep=2) as ckpt:
    restored = ckpt.restore(target)
  leaves = jax.tree.leaves(restored.state)
  out["step"] = restored.step
  out["metadata"] = restored.metadata
  out["bitwise_equal"] = all(np.array_equal(a.view(np.uint32), np.asarray(b).view(np.uint32))
                             for a, b in zip(expected, leaves))
  out["kernel_spec_saved"] = [e for e in state["kernel"].get_value().sharding.spec]
  out["kernel_spec_restored"] = [e for e in restored.state["kernel"].get_value().sharding.spec]
  out["restored_mesh"] = dict(restored.state["kernel"].get_value().sharding.mesh.shape)
  out["rng_equal"] = bool(np.array_equal(jax.random.key_data(restored.rng),
                                         jax.random.key_data(keys)))
  json.dump(out, sys.stdout)


if __name__ == "__main__":
  main(sys.argv[1])
