"""Subprocess for tests/test_evaluation_sharded.py: the Evaluator on sharded meshes vs one device.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set by the caller before JAX
starts) as ``python evaluation_subprocess.py LAB_ROOT [--slow]``; the tiny lab must already be
built under ``LAB_ROOT`` (the parent test builds it). Prints one JSON object (last line).

The same stacked member parameters (π_ref perturbed by a different amount per member, held
on the host) are evaluated once with every array on one device and no shardings, and once per
mesh the way ``gpo_jax.run.loop.run`` does it: member parameters placed with the state shardings
of the preset, hyperparameters over ``sweep``, evaluator constants replicated.
"""

import json
import sys

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import lab_fixture
from gpo_jax.evaluation import policy as evaluation
from gpo_jax import lab as lab_lib
from gpo_jax.runtime import distributed
from gpo_jax.runtime import sharding
from gpo_jax.algorithms import gpo
from gpo_jax.engine.members import Members
from gpo_jax.engine import program

STEP = 7
# (mesh, preset, member_chunk) as the run loop would get them from a config.
CASES = (({"sweep": 8}, "dp", 8), ({"sweep": 2, "data": 4}, "fsdp", 8),
         ({"sweep": 2, "data": 2, "model": 2}, "fsdp_tp", 8))
# member_chunk < members makes lax.map loop over chunks of the sweep-sharded member axis (3
# leaves a partial last chunk); model=4 does not divide the 2 heads, so those weight
# dimensions fall back to replication.
SLOW_CASES = (({"sweep": 8}, "dp", 4), ({"sweep": 2, "data": 4}, "fsdp", 3),
              ({"sweep": 2, "data": 2, "model": 2}, "fsdp_tp", 4),
              ({"sweep": 4, "data": 2}, "dp", 8), ({"data": 8}, "fsdp", 8),
              ({"sweep": 1, "data": 2, "model": 4}, "fsdp_tp", 8))


def _ecfg(member_chunk: int) -> evaluation.EvalConfig:
  return evaluation.EvalConfig(n_prompts=8, samples_per_prompt=4, ref_samples_per_prompt=8,
                               n_test_pairs=32, member_chunk=member_chunk, bon_n=(1, 2, 4, 8),
                               seed=3)


def _members(n_train: int) -> Members:
  # Two seeds: members 2k and 2k+1 differ in seed, so sampling keys differ across members too.
  return gpo.make_members(["logistic", "squared"], [0.1, 0.5], seeds=(0, 1),
                            n_train=n_train, batch_size=8)


def _perturbed(params, m: int) -> list[np.ndarray]:
  """Host copies of ``m`` stacked members: member i is π_ref plus noise of scale 0.1 * i."""
  rng = np.random.default_rng(0)
  scale = 0.1 * np.arange(m, dtype=np.float32)
  out = []
  for x in jax.tree.leaves(params):
    x = np.asarray(x)
    noise = rng.standard_normal((m,) + x.shape).astype(np.float32)
    out.append(x[None] + scale.reshape((-1,) + (1,) * x.ndim) * noise * np.float32(x.std() + 1e-3))
  return out


def _place(leaves, treedef, shardings):
  """Host leaves onto ``shardings`` (a pytree of NamedSharding, or one for every leaf)."""
  sh_leaves = (jax.tree.leaves(shardings) if not isinstance(shardings, jax.sharding.Sharding)
               else [shardings] * len(leaves))
  assert len(sh_leaves) == len(leaves), (len(sh_leaves), len(leaves))
  return jax.tree.unflatten(treedef, [
      jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx])
      for x, s in zip(leaves, sh_leaves)])


def _evaluate(lab, graphdef, rest, members, params_M, hp, sharding_, member_chunk):
  ev = evaluation.Evaluator.from_lab(lab, graphdef, rest,
                                     _ecfg(member_chunk), sharding=sharding_)
  bon = ev.reference()
  res = ev(params_M, hp, STEP)
  cost = ev._run(params_M, hp, STEP, lower=True).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  res = {k: np.asarray(v, np.float64).tolist() for k, v in res.items()}
  return bon, res, float(cost.get("flops", float("nan")))


def main_():
  assert jax.device_count() == 8, jax.devices()
  slow = "--slow" in sys.argv[2:]
  lab = lab_lib.build_or_load(lab_fixture.tiny_config(), sys.argv[1], log=lambda msg: None)
  n_train = int(lab.pairs("train")["chosen"].shape[0])
  members = _members(n_train)
  m = members.size
  graphdef, params, rest = nnx.split(lab.policy(), nnx.Param, ...)
  treedef = jax.tree.structure(program.stack(params, m))
  host = _perturbed(params, m)
  hp_host = {k: np.asarray(v) for k, v in members.hparams().items()}

  dev0 = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  cases = CASES + (SLOW_CASES if slow else ())
  # One-device reference per member_chunk: every array committed to device 0, no shardings.
  dense = {}
  for chunk in sorted({c[2] for c in cases}):
    bon, res, flops = _evaluate(lab, graphdef, rest, members, _place(host, treedef, dev0),
                                jax.tree.map(lambda x: jax.device_put(x, dev0), hp_host), None,
                                chunk)
    dense[chunk] = {"bon": bon, "metrics": res, "flops": flops}

  result = {"devices": jax.device_count(), "members": m, "dense": dense, "cases": []}
  tcfg = program.TrainConfig(batch_size=8)
  for mesh_cfg, preset, chunk in cases:
    mesh = sharding.make_mesh(mesh_cfg, num_members=m, batch_size=tcfg.batch_size)
    replicated = NamedSharding(mesh, PartitionSpec())
    member_sh = NamedSharding(mesh, PartitionSpec(sharding.SWEEP))
    # The shardings the run loop gives the stacked parameters (from the sweep state's abstract).
    init_fn = lambda p: program.init_state(p, members, tcfg)  # noqa: E731
    abstract = jax.eval_shape(init_fn, distributed.put(params, replicated))
    params_sh = program.state_shardings(abstract, mesh, preset)["params"]
    params_M = _place(host, treedef, params_sh)
    placed_equal = all(np.array_equal(np.asarray(a), b)
                       for a, b in zip(jax.tree.leaves(params_M), host))
    bon, res, flops = _evaluate(lab, graphdef, rest, members, params_M,
                                distributed.put(hp_host, member_sh), replicated, chunk)
    w_up = params_M["decoder"]["blocks"][0]["w_up"][...]
    result["cases"].append({
        "mesh": dict(mesh.shape), "preset": preset, "member_chunk": chunk,
        "placed_equal": placed_equal,
        "w_up_spec": [None if a is None else str(a) for a in w_up.sharding.spec],
        "w_up_unique_shards": len({str(s.index) for s in w_up.addressable_shards}),
        "bon": bon, "metrics": res, "flops": flops,
    })
  print(json.dumps(result))


if __name__ == "__main__":
  main_()
