"""Subprocess for tests/test_sweep.py: the real sweep train step sharded on 8 devices vs one device.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set by the caller before JAX
starts); prints one JSON object with the measured differences and the shardings used.
"""

import json

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import test_sweep as ts
from gpo_jax.runtime import sharding
from gpo_jax.algorithms import gpo
from gpo_jax.core import sequences
from gpo_jax.engine import program

STEPS = 3
CASES = (({"sweep": 8}, "dp"), ({"sweep": 2, "data": 4}, "fsdp"),
         ({"sweep": 2, "data": 2, "model": 2}, "fsdp_tp"), ({"sweep": 2, "data": 4}, "dp"))


def train(members, params, step_fn, state):
  data = sequences.pair_arrays(ts.SETUP[3])
  hp = members.hparams()
  losses = []
  for _ in range(STEPS):
    state, m = step_fn(state, hp, data)
    losses.append(np.asarray(m["loss"]))
  return state, np.stack(losses)


def main_():
  graphdef, params, rest, _, _ = ts.SETUP
  rows = [(f, b, s, 1e-2, g, 48) for f, b, s, g in (
      ("logistic", 0.1, 0, 0.0), ("squared", 1.0, 1, 0.0), ("savage", 0.5, 2, 1.0),
      ("exponential", 0.3, 3, 0.0), ("hinge", 2.0, 4, 0.0), ("logistic", 1.0, 5, 2.0),
      ("squared", 0.1, 6, 0.0), ("savage", 3.0, 7, 0.0))]
  members = ts._members(*rows)
  fn = program.make_train_step(gpo.member_loss_fn(graphdef, rest, ts.TABLE, False), ts.TCFG)
  dense, dense_loss = train(members, params, jax.jit(fn),
                            program.init_state(params, members, ts.TCFG))
  dense_leaves = [np.asarray(x) for x in jax.tree.leaves(dense["params"])]
  moved = max(float(np.max(np.abs(a - np.asarray(b)))) for a, b in
              zip(dense_leaves, jax.tree.leaves(program.stack(params, members.size))))
  out = {"devices": jax.device_count(), "train_delta": moved, "cases": []}
  for mesh_cfg, preset in CASES:
    mesh = sharding.make_mesh(mesh_cfg, num_members=members.size, batch_size=ts.BATCH)
    init = lambda p: program.init_state(p, members, ts.TCFG)  # noqa: E731
    sh = program.state_shardings(jax.eval_shape(init, params), mesh, preset)
    member_sh = NamedSharding(mesh, PartitionSpec(sharding.SWEEP))
    rep = NamedSharding(mesh, PartitionSpec())
    step_fn = jax.jit(fn, in_shardings=(sh, member_sh, rep), out_shardings=(sh, member_sh),
                      donate_argnums=0)
    state, loss = train(members, params, step_fn, jax.jit(init, out_shardings=sh)(params))
    leaves = jax.tree.leaves(state["params"])
    diff = max(float(np.max(np.abs(a - np.asarray(b)))) for a, b in zip(dense_leaves, leaves))
    # The CPU layout: each shard of the sweep axis loops over its own members.
    looped_fn = program.make_train_step(gpo.member_loss_fn(graphdef, rest, ts.TABLE, False), ts.TCFG,
                                      member_groups=mesh.shape[sharding.SWEEP], member_chunk=1)
    looped_jit = jax.jit(looped_fn, in_shardings=(sh, member_sh, rep),
                         out_shardings=(sh, member_sh), donate_argnums=0)
    init_state = jax.jit(init, out_shardings=sh)(params)
    hlo = looped_jit.lower(init_state, members.hparams(),
                           sequences.pair_arrays(ts.SETUP[3])).compile().as_text()
    lstate, lloss = train(members, params, looped_jit, init_state)
    ldiff = max(float(np.max(np.abs(a - np.asarray(b))))
                for a, b in zip(dense_leaves, jax.tree.leaves(lstate["params"])))
    # The run loop's placement (program.place_on_data): each member's batch over `data`,
    # weights gathered at use under the presets that shard them over `data`.
    gather = sharding.get_preset(preset).rules.get("embed") == sharding.DATA
    placed = program.make_train_step(
        program.place_on_data(gpo.member_loss_fn(graphdef, rest, ts.TABLE, False), mesh,
                              sh["params"] if gather else None),
        ts.TCFG, member_groups=mesh.shape[sharding.SWEEP], member_chunk=1)
    placed_jit = jax.jit(placed, in_shardings=(sh, member_sh, rep), out_shardings=(sh, member_sh),
                         donate_argnums=0)
    init_state = jax.jit(init, out_shardings=sh)(params)
    flops = lambda j: float(j.lower(init_state, members.hparams(), sequences.pair_arrays(  # noqa: E731
        ts.SETUP[3])).compile().cost_analysis().get("flops", float("nan")))
    f_looped, f_placed = flops(looped_jit), flops(placed_jit)
    pstate, ploss = train(members, params, placed_jit, init_state)
    pdiff = max(float(np.max(np.abs(a - np.asarray(b))))
                for a, b in zip(dense_leaves, jax.tree.leaves(pstate["params"])))
    kernel = state["params"]["decoder"]["blocks"][0]["w_up"][...]
    out["cases"].append({
        "placed_max_abs_diff": pdiff, "placed_loss_diff": float(np.max(np.abs(ploss - dense_loss))),
        "looped_flops": f_looped, "placed_flops": f_placed,
        "mesh": mesh_cfg, "preset": preset, "max_abs_diff": diff,
        "loss_diff": float(np.max(np.abs(loss - dense_loss))),
        "looped_max_abs_diff": ldiff,
        "looped_loss_diff": float(np.max(np.abs(lloss - dense_loss))),
        "looped_collectives": sorted({op for op in ("all-gather", "all-to-all",
                                                    "collective-permute") if op in hlo}),
        "w_up_spec": [None if a is None else str(a) for a in kernel.sharding.spec],
        "w_up_shards": len({d.id for d in kernel.sharding.device_set}),
        "unique_w_up_shards": len({str(s.index) for s in kernel.addressable_shards}),
    })
  print(json.dumps(out))


if __name__ == "__main__":
  main_()
