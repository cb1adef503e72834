"""Subprocess for tests/test_distributed.py: a vmapped linear-model sweep with a checkpoint round trip.

``python distributed_subprocess.py single OUT_DIR`` runs on 4 local devices in one process;
``python distributed_subprocess.py multi OUT_DIR PORT PROCESS_ID`` is one of two processes
with 2 CPU devices each, joined through ``jax.distributed`` on localhost. Both train the same
members on the same global batches, save a checkpoint after 3 steps, restore it, train 2
more steps, and (process 0) write the final parameters to ``OUT_DIR/result_<mode>.npz``.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from gpo_jax.runtime import checkpoint, distributed, sharding as sh

MEMBERS, BATCH, DIM, STEPS_BEFORE, STEPS_AFTER = 2, 8, 4, 3, 2


def main():
  mode, out_dir = sys.argv[1], sys.argv[2]
  if mode == "multi":
    port, pid = sys.argv[3], int(sys.argv[4])
    assert distributed.maybe_initialize(f"localhost:{port}", 2, pid)
    assert jax.process_count() == 2 and jax.local_device_count() == 2
  else:
    assert not distributed.maybe_initialize(None, None, None)
  assert jax.device_count() == 4, jax.devices()

  # Interleave processes so the 'data' axis spans them: each process then loads half of
  # every global batch, which is what process_slice/global_array must get right.
  by_process = [[d for d in jax.devices() if d.process_index == p]
                for p in range(jax.process_count())]
  devices = [d for group in zip(*by_process) for d in group]
  mesh = sh.make_mesh({"sweep": 2, "data": 2, "model": 1}, devices=devices,
                      num_members=MEMBERS, batch_size=BATCH)
  w_sharding = sh.logical_sharding(mesh, ("sweep", None))
  lr_sharding = sh.logical_sharding(mesh, ("sweep",))
  x_sharding = sh.batch_sharding(mesh, 2)
  y_sharding = sh.batch_sharding(mesh, 1)

  rng = np.random.default_rng(0)
  xs = rng.normal(size=(STEPS_BEFORE + STEPS_AFTER, BATCH, DIM)).astype(np.float32)
  ys = rng.normal(size=(STEPS_BEFORE + STEPS_AFTER, BATCH)).astype(np.float32)
  rows = distributed.process_slice(BATCH, x_sharding, global_shape=(BATCH, DIM))

  def batch(t):
    x = distributed.global_array(xs[t][rows], x_sharding, (BATCH, DIM))
    y = distributed.global_array(ys[t][rows], y_sharding, (BATCH,))
    return x, y

  @jax.jit
  def step(w_MxD, lr_M, x_BxD, y_B):
    def member(w, lr):
      g = jax.grad(lambda w: jnp.mean((x_BxD @ w - y_B) ** 2))(w)
      return w - lr * g
    return jax.lax.with_sharding_constraint(jax.vmap(member)(w_MxD, lr_M), w_sharding)

  w = jax.make_array_from_callback((MEMBERS, DIM), w_sharding,
                                   lambda idx: np.ones((MEMBERS, DIM), np.float32)[idx])
  lr = jax.make_array_from_callback((MEMBERS,), lr_sharding,
                                    lambda idx: np.array([0.05, 0.2], np.float32)[idx])
  for t in range(STEPS_BEFORE):
    w = step(w, lr, *batch(t))

  ckpt_dir = os.path.join(out_dir, f"ckpt_{mode}")
  with checkpoint.Checkpointer(ckpt_dir, keep=2) as ckpt:
    ckpt.save(STEPS_BEFORE, {"w": w}, rng=jax.random.key(7), metadata={"data_index": 3})
  distributed.barrier("saved")
  target = {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=w_sharding)}
  with checkpoint.Checkpointer(ckpt_dir, keep=2) as ckpt:
    restored = ckpt.restore(target)
  w_restored = restored.state["w"]
  restored_equal = bool(np.array_equal(distributed.to_host(w_restored), distributed.to_host(w)))
  w = w_restored
  for t in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER):
    w = step(w, lr, *batch(t))

  final = distributed.to_host(w)
  if distributed.is_primary():
    np.savez(os.path.join(out_dir, f"result_{mode}.npz"), w=final)
    with open(os.path.join(out_dir, f"result_{mode}.json"), "w") as f:
      json.dump({"restored_step": restored.step, "restored_equal": restored_equal,
                 "metadata": restored.metadata, "rows": [rows.start, rows.stop],
                 "even_rows": [distributed.process_slice(BATCH).start,
                               distributed.process_slice(BATCH).stop],
                 "process_count": jax.process_count(),
                 "rng_equal": bool(np.array_equal(jax.random.key_data(restored.rng),
                                                  jax.random.key_data(jax.random.key(7))))}, f)
  distributed.barrier("done")


if __name__ == "__main__":
  main()
