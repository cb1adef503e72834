"""Subprocess for tests/test_sharding.py: sharded vmapped-MLP training vs a dense one-device run.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set by the caller before
JAX starts); prints one JSON object with the measured differences and shardings.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpo_jax.runtime import sharding as sh


class MLP(nnx.Module):
  """Two-layer member network with logical axis names on its weights."""

  def __init__(self, d_in: int, d_hidden: int, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.5)
    self.l1 = nnx.Linear(d_in, d_hidden, rngs=rngs,
                         kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                         bias_init=nnx.with_partitioning(init, ("mlp",)))
    self.l2 = nnx.Linear(d_hidden, d_in, rngs=rngs,
                         kernel_init=nnx.with_partitioning(init, ("mlp", "embed")),
                         bias_init=nnx.with_partitioning(init, ("embed",)))

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


_DENSE = {}


def run_case(mesh_cfg, preset, d_in, d_hidden, members=8, batch=16, steps=3):
  def init(key):
    with nnx.use_eager_sharding(False):
      return nnx.state(MLP(d_in, d_hidden, nnx.Rngs(key)), nnx.Param)

  with nnx.use_eager_sharding(False):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: MLP(d_in, d_hidden, nnx.Rngs(0))))

  def step(params, x_BxD, y_BxD, lr_M):
    def member(p, lr):
      def loss(p):
        return jnp.mean((nnx.merge(graphdef, p)(x_BxD) - y_BxD) ** 2)
      g = jax.grad(loss)(p)
      return jax.tree.map(lambda a, b: a - lr * b, p, g)
    return jax.vmap(member)(params, lr_M)

  keys = jax.random.split(jax.random.key(0), members)
  rng = np.random.default_rng(1)
  xs = rng.normal(size=(steps, batch, d_in)).astype(np.float32)
  ys = rng.normal(size=(steps, batch, d_in)).astype(np.float32)
  lr_M = np.linspace(0.05, 0.4, members).astype(np.float32)

  # Dense reference: everything on one device, no shardings (cached per model shape).
  # Initial values come from NumPy: compiling the vmapped flax init costs seconds per shape.
  abstract = jax.eval_shape(jax.vmap(init), keys)
  cache_key = (d_in, d_hidden, members, batch, steps)
  if cache_key not in _DENSE:
    init_np = [(0.5 * rng.normal(size=x.shape)).astype(x.dtype)
               for x in jax.tree.leaves(abstract)]
    dense = jax.tree.unflatten(jax.tree.structure(abstract), [jnp.asarray(x) for x in init_np])
    dense_step = jax.jit(step)
    for t in range(steps):
      dense = dense_step(dense, xs[t], ys[t], lr_M)
    _DENSE[cache_key] = (init_np, [np.asarray(x) for x in jax.tree.leaves(dense)])
  init_np, dense_np = _DENSE[cache_key]

  mesh = sh.make_mesh(mesh_cfg, num_members=members, batch_size=batch)
  fallbacks = []
  shardings = sh.stacked_state_shardings(abstract, mesh, preset, fallbacks=fallbacks)
  x_sharding = sh.batch_sharding(mesh, 2)
  lr_sharding = sh.logical_sharding(mesh, ("sweep",))
  # Placing the host copy (not re-running init) saves a compile per mesh.
  params = jax.tree.unflatten(jax.tree.structure(abstract), [
      jax.device_put(x, s) for x, s in zip(init_np, jax.tree.leaves(shardings))])
  sharded_step = jax.jit(step, in_shardings=(shardings, x_sharding, x_sharding, lr_sharding),
                         out_shardings=shardings, donate_argnums=0)
  for t in range(steps):
    params = sharded_step(params, jax.device_put(xs[t], x_sharding),
                          jax.device_put(ys[t], x_sharding), jax.device_put(lr_M, lr_sharding))
  leaves = jax.tree.leaves(params)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  max_abs_diff = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(leaves, dense_np))
  # Training must have moved the weights, or equality with the dense run proves nothing.
  train_delta = max(float(np.max(np.abs(a - b))) for a, b in zip(init_np, dense_np))
  report = sh.replication_report(params, shardings, mesh)
  return {
      "mesh": mesh_cfg, "preset": preset, "d_in": d_in,
      "max_abs_diff": max_abs_diff, "train_delta": train_delta,
      "specs": {p: [list(e) if isinstance(e, tuple) else e for e in x.sharding.spec]
                for p, x in zip(paths, leaves)},
      "num_shards": {p: len({str(s.index) for s in x.addressable_shards})
                     for p, x in zip(paths, leaves)},
      "fallbacks": [[f.path, f.dim, f.mesh_axis] for f in fallbacks],
      "replicated_fraction": report.fraction,
  }


def replication_checks():
  """The fsdp threshold rejects an all-replicated state and accepts a sharded one."""
  members, d_in, d_hidden = 2, 64, 64
  mesh = sh.make_mesh({"sweep": 2, "data": 4, "model": 1})
  def init(key):
    with nnx.use_eager_sharding(False):
      return nnx.state(MLP(d_in, d_hidden, nnx.Rngs(key)), nnx.Param)
  abstract = jax.eval_shape(jax.vmap(init), jax.random.split(jax.random.key(0), members))
  sharded = sh.stacked_state_shardings(abstract, mesh, "fsdp")
  replicated = sh.stacked_state_shardings(abstract, mesh, "dp")
  out = {}
  for name, shardings in (("sharded", sharded), ("replicated", replicated)):
    try:
      rep = sh.check_replication(abstract, shardings, mesh, "fsdp")
      out[name] = {"raised": False, "fraction": rep.fraction}
    except sh.ReplicationError as e:
      out[name] = {"raised": True, "message": str(e)}
  return out


def main():
  assert jax.device_count() == 8, jax.devices()
  cases = [
      ({"sweep": 8, "data": 1, "model": 1}, "dp", 8, 16),
      ({"sweep": 2, "data": 4, "model": 1}, "fsdp", 8, 16),
      ({"sweep": 2, "data": 2, "model": 2}, "fsdp_tp", 8, 16),
      # embed=6 does not divide data=4: those dims must fall back to replication.
      ({"sweep": 2, "data": 4, "model": 1}, "fsdp", 6, 16),
  ]
  result = {"replication": replication_checks(), "cases": [run_case(*c) for c in cases]}
  json.dump(result, sys.stdout)


if __name__ == "__main__":
  main()
