"""Subprocess for tests/test_proxies.py: the proxy-scored π_ref pool split over 2 devices equals one device.

Run with 2 simulated CPU devices as ``python proxy_pool_subprocess.py LAB_ROOT``; the tiny lab
must already be built under ``LAB_ROOT``. Prints one JSON object (last line).
"""

import json
import sys

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import lab_fixture
from gpo_jax.algorithms import reward_model as rm_lib
from gpo_jax.engine import program
from gpo_jax.engine.members import Members
from gpo_jax.evaluation import policy
from gpo_jax.proxies import bank as bank_lib
from gpo_jax.proxies import selectors as selectors_lib
from gpo_jax.proxies import store
from gpo_jax.runtime import sharding


def main(lab_root):
  lab = lab_fixture.get_tiny_lab(lab_root)
  # Two untrained proxies (heads drawn from seeds 0 and 1) as a proxy set.
  rm = rm_lib.init_reward_model(lab)
  graphdef, params, rest = nnx.split(rm, nnx.Param, ...)
  members = Members({"seed": np.asarray([0, 1], np.int32),
                     "data_size": np.asarray([64, 64], np.int32)}, traced=("seed", "data_size"))
  stacked = program.init_state(params, members, program.TrainConfig(), rm_lib.init_head)["params"]
  ps = store.ProxySet(path="", cfg=rm.cfg, graphdef=graphdef, rest=rest, params=stacked,
                      names=("a", "b"), rows=({}, {}), mean=np.zeros(2), std=np.ones(2))
  bank = bank_lib.ProxyBank((ps,))
  sel = selectors_lib.build(bank.names, ensembles_spec={"e": ("*",)})
  proxy = policy.ProxyEval(score_fn=bank.score_fn(), params=bank.params(),
                           proxy_names=bank.names, selectors=sel)
  ecfg = policy.EvalConfig(n_prompts=8, samples_per_prompt=2, ref_samples_per_prompt=32,
                           n_test_pairs=16, bon_n=(1, 4, 32))
  pgraph, _, prest = nnx.split(lab.policy(), nnx.Param, ...)
  out = {"devices": jax.device_count()}
  for name, sh in (("one", None), ("split", NamedSharding(
      sharding.make_mesh({"sweep": 2, "data": 1, "model": 1}), PartitionSpec()))):
    ev = policy.Evaluator.from_lab(lab, pgraph, prest, ecfg, sharding=sh, proxy=proxy)
    out[name + "_groups"] = ev._pool_groups(8)
    ev.reference()
    out[name] = {k: np.asarray(v).tolist() for k, v in ev.pool_arrays.items()
                 if k in ("gold", "proxies", "response_len")}
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1])
