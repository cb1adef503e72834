"""The pod path on paper: ahead-of-time compilation of the real pod-sweep programs on simulated meshes.

For ``configs/pod_sweep.py`` (offline GPO on the ``large`` lab) this script compiles, with
``jax.jit(...).lower(...).compile()`` on abstract inputs (``jax.ShapeDtypeStruct`` carrying
the run's shardings, so nothing of pod size is ever allocated):

* the **train step** exactly as ``gpo_jax.run.loop.setup`` builds it: the algorithm's
  ``loss_fn`` wrapped by ``engine.program.place_on_data`` (each member's batch on the
  ``data`` axis; weights gathered over ``data`` at use under presets whose ``embed`` rule is
  ``data``), ``engine.program.make_train_step`` with the config's member layout,
  ``program.state_shardings`` and ``program.jit_train_step`` (with ``compiler_options=None``,
  what a TPU/GPU mesh gets: ``gpo_jax.runtime.cpu.compiler_options`` returns None off CPU);
* the **evaluation**: ``gpo_jax.evaluation.policy.Evaluator._eval_all`` (member sampling
  with the KV cache and π_ref beside it, gold scoring, the offline diagnostics on held-out
  pairs; members regrouped ``[sweep, M/sweep]`` by ``Evaluator._by_device`` so each device
  of the sweep axis evaluates its own, each member's rows on ``data``), jitted as the Evaluator jits it off CPU (no compiler options), on an
  Evaluator whose constants are abstract (built without a lab: its ``__init__`` places
  concrete arrays on devices) and whose sharding is the replicated one on the run's mesh;

``--baseline-old`` also compiles ``<preset>+old`` cases, the code before commit 0c997c6 (no
``place_on_data``; the evaluator forced to one member group, i.e. a ``lax.map`` over all
members on every device, with no rows on ``data`` and its two-pass measurement), at the
largest device and member count, for a before/after table;

for every sharding preset × simulated device count × member count, each device count in its
own subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set before JAX is
imported. Model and data shapes come from ``gpo_jax.lab.presets.lab_config("large")`` through
``LabConfig``; the model is built with ``nnx.eval_shape`` (no lab is built, nothing trains).

From each compiled program it reads ``memory_analysis()``, ``cost_analysis()`` and the
collectives of ``as_text()`` (the SPMD-partitioned per-device HLO), and turns them into a
roofline **estimate** for TPU v5e, TPU v5p, H100 and H200 from published peak numbers.
Everything here is XLA:CPU's view of the program: a proxy for what the TPU/GPU compilers
would do (they fuse, schedule and pick collective algorithms differently).

Run from the repository root::

  python experiments/pod_plan.py            # writes experiments/POD_PLAN.md and pod_plan.json
  python experiments/pod_plan.py --baseline-old   # + the pre-0c997c6 programs at 256 devices
  python experiments/pod_plan.py --quick    # 64 devices, 64 members only (the test uses it)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD_CONFIG = os.path.join(REPO, "configs", "pod_sweep.py")

# ----------------------------------------------------------------------------- hardware
#: Published per-chip peak numbers (dense, no sparsity). ``ici_GBps`` is the bidirectional
#: per-chip interconnect bandwidth; the estimate uses half of it per direction.
HARDWARE = {
    "TPU v5e": dict(
        peak_tflops=197.0, hbm_GBps=819.0, hbm_GB=16.0, ici_GBps=400.0, node=None, dcn_GBps=None,
        source="Google Cloud TPU docs, 'TPU v5e' (docs.cloud.google.com/tpu/docs/v5e): 197 "
               "TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, 400 GB/s bidirectional ICI per chip; "
               "256-chip pod, 2D torus"),
    "TPU v5p": dict(
        peak_tflops=459.0, hbm_GBps=2765.0, hbm_GB=95.0, ici_GBps=1200.0, node=None, dcn_GBps=None,
        source="Google Cloud TPU docs, 'TPU v5p' (docs.cloud.google.com/tpu/docs/v5p): 459 "
               "TFLOP/s bf16, 95 GB HBM2e at 2765 GB/s, 1200 GB/s bidirectional ICI per chip; "
               "3D torus"),
    "H100 SXM": dict(
        peak_tflops=989.0, hbm_GBps=3350.0, hbm_GB=80.0, ici_GBps=900.0, node=8, dcn_GBps=50.0,
        source="NVIDIA H100 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOP/s with "
               "sparsity = 989 dense, 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s "
               "(bidirectional) within an 8-GPU node; across nodes one 400 Gb/s NDR "
               "InfiniBand port per GPU (DGX H100) = 50 GB/s per direction"),
    "H200 SXM": dict(
        peak_tflops=989.0, hbm_GBps=4800.0, hbm_GB=141.0, ici_GBps=900.0, node=8, dcn_GBps=50.0,
        source="NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOP/s with "
               "sparsity = 989 dense, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s "
               "(bidirectional) within an 8-GPU node; across nodes 400 Gb/s InfiniBand "
               "per GPU assumed as for H100 = 50 GB/s per direction"),
}

# The meshes (sweep, data, model) compiled per device count: pod_sweep's default 32,8,1 at
# 256 devices and the same data/model split at 64; fsdp_tp takes 2 of the data axis for model.
MESHES = {
    256: {"dp": (32, 8, 1), "fsdp": (32, 8, 1), "fsdp_tp": (32, 4, 2)},
    64: {"dp": (8, 8, 1), "fsdp": (8, 8, 1), "fsdp_tp": (8, 4, 2)},
}
PRESETS = ("dp", "fsdp", "fsdp_tp")
#: ``<preset>+old``: the programs as they were before commit 0c997c6 (train step without
#: ``program.place_on_data``; evaluator with one member group); for comparison only
OLD = "old"
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
               "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "token": 0}

# ----------------------------------------------------------------------------- HLO parsing
_COMP_HEAD = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+(.*?)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


def _shape_bytes(type_str: str) -> int:
  """Bytes of an HLO result type (an array or a tuple of arrays)."""
  total = 0
  for dt, dims in _ARRAY.findall(type_str):
    if dt not in DTYPE_BYTES:
      continue
    n = 1
    for d in dims.split(","):
      if d:
        n *= int(d)
    total += n * DTYPE_BYTES[dt]
  return total


def _first_dims(type_str: str) -> list[int]:
  m = _ARRAY.search(type_str)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def _expand_groups(attr: str, n_devices: int):
  """Replica groups of a collective as a list of lists of partition ids (None if unknown)."""
  import numpy as np
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attr)
  if m:   # mesh['axis_0'=8,'axis_1'=8] {'axis_0'}: vary the listed axes, fix the others
    axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
    names = [a for a, _ in axes]
    sizes = [int(s) for _, s in axes]
    listed = re.findall(r"'(\w+)'", m.group(2))
    ids = np.arange(math.prod(sizes)).reshape(sizes)
    keep = [names.index(a) for a in listed]
    other = [i for i in range(len(names)) if i not in keep]
    grp = math.prod(sizes[i] for i in keep) if keep else 1
    return ids.transpose(other + keep).reshape(-1, grp).tolist()
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attr)
  if m:   # iota form [G,S]<=[dims]T(perm)
    g, s = int(m.group(1)), int(m.group(2))
    dims = [int(x) for x in m.group(3).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(4):
      ids = ids.transpose([int(x) for x in m.group(4).split(",")])
    return ids.reshape(g, s).tolist()
  m = re.search(r"replica_groups=\{(\{[\d,\s]*\}(?:,\s*\{[\d,\s]*\})*)?\}", attr)
  if m:
    if not m.group(1):
      return [list(range(n_devices))]
    return [[int(x) for x in grp.split(",") if x.strip()]
            for grp in re.findall(r"\{([\d,\s]*)\}", m.group(1))]
  m = re.search(r"source_target_pairs=\{(.*?)\}\}", attr)
  if m:
    return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)", m.group(0))]
  return None


def _wire_bytes(op: str, result_bytes: int, group: int) -> float:
  """Bytes one device sends for a collective under the ring algorithm (textbook model)."""
  if op == "collective-permute":
    return float(result_bytes)
  if group <= 1:
    return 0.0
  if op == "all-reduce":
    return 2.0 * (group - 1) / group * result_bytes
  if op == "reduce-scatter":
    return float(group - 1) * result_bytes          # result is the 1/group shard
  return (group - 1) / group * result_bytes          # all-gather, all-to-all: result is full


def analyse_hlo(text: str, n_devices: int, node_size: int = 8) -> dict:
  """Collectives and dot FLOPs of a compiled (SPMD-partitioned, per-device) HLO module.

  Static counts are per occurrence in the text. "Executed" counts multiply every
  instruction by how often its computation runs: a ``while`` body by the loop's
  ``known_trip_count`` (nested loops multiply), fusions and called computations by their
  caller's count. XLA's own ``cost_analysis`` counts every loop body once.
  """
  comps: dict[str, list] = {}
  entry = None
  cur = None
  shapes: dict[str, str] = {}
  for line in text.splitlines():
    h = _COMP_HEAD.match(line)
    if h:
      cur = h.group(2)
      comps[cur] = []
      if h.group(1):
        entry = cur
      continue
    if cur is None or line.strip() == "}":
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, type_str, op, rest = m.groups()
    shapes[name] = type_str
    comps[cur].append((name, type_str, op, rest))
  # call graph: computation -> [(callee, factor)]
  calls: dict[str, list] = defaultdict(list)
  unknown_loops = 0
  for comp, instrs in comps.items():
    for name, type_str, op, rest in instrs:
      if op == "while":
        body = re.search(r"body=%?([\w.\-]+)", rest)
        cond = re.search(r"condition=%?([\w.\-]+)", rest)
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
        n = int(trip.group(1)) if trip else 1
        unknown_loops += trip is None
        if body:
          calls[comp].append((body.group(1), n))
        if cond:
          calls[comp].append((cond.group(1), n + 1))
        continue
      for key in ("calls", "to_apply"):
        for callee in re.findall(key + r"=%?([\w.\-]+)", rest):
          if op in ("all-reduce", "reduce-scatter", "reduce", "reduce-window", "scatter",
                    "select-and-scatter", "sort", "map") and key == "to_apply":
            continue   # scalar reducers: not executed as a computation of their own size
          calls[comp].append((callee, 1))
      br = re.search(r"branch_computations=\{([^}]*)\}", rest)
      if br:
        for callee in re.findall(r"%?([\w.\-]+)", br.group(1)):
          calls[comp].append((callee, 1))
      for key in ("true_computation", "false_computation"):
        c = re.search(key + r"=%?([\w.\-]+)", rest)
        if c:
          calls[comp].append((c.group(1), 1))
  mult: dict[str, float] = defaultdict(float)
  order: list[str] = []
  seen: set[str] = set()

  def visit(c):   # topological order (callers before callees) by DFS post-order
    if c in seen or c not in comps:
      return
    seen.add(c)
    for callee, _ in calls.get(c, ()):
      visit(callee)
    order.append(c)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  visit(entry)
  mult[entry] = 1.0
  for c in reversed(order):
    for callee, f in calls.get(c, ()):
      mult[callee] += mult[c] * f

  coll = {op: {"count": 0, "count_executed": 0.0, "bytes": 0, "bytes_executed": 0.0,
               "wire_bytes_executed": 0.0, "wire_bytes_cross_node_executed": 0.0}
          for op in COLLECTIVES}
  dot_flops = dot_flops_static = 0.0
  for comp, instrs in comps.items():
    k = mult.get(comp, 0.0)
    for name, type_str, op, rest in instrs:
      if op == "dot":
        out = _first_dims(type_str)
        operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
        lhs = _first_dims(shapes.get(operands[0], "")) if operands else []
        cdims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        contract = 1
        if cdims and lhs:
          for d in cdims.group(1).split(","):
            if d:
              contract *= lhs[int(d)]
        f = 2.0 * math.prod(out) * contract
        dot_flops_static += f
        dot_flops += f * k
        continue
      base = op[:-6] if op.endswith("-start") else op
      if base not in coll or op.endswith("-done"):
        continue
      size = _shape_bytes(type_str)
      if op.endswith("-start") and type_str.startswith("("):
        size = _shape_bytes(type_str) // 2 if base != "collective-permute" else size // 2
      groups = _expand_groups(rest, n_devices)
      if base == "collective-permute":
        gsize = 2
        cross = bool(groups) and any(a // node_size != b // node_size for a, b in groups)
      else:
        gsize = len(groups[0]) if groups else n_devices
        cross = bool(groups) and any(len({d // node_size for d in g}) > 1 for g in groups)
      wire = _wire_bytes(base, size, gsize)
      r = coll[base]
      r["count"] += 1
      r["count_executed"] += k
      r["bytes"] += size
      r["bytes_executed"] += size * k
      r["wire_bytes_executed"] += wire * k
      if cross:
        r["wire_bytes_cross_node_executed"] += wire * k
      r.setdefault("group_sizes", set()).add(gsize)
  for r in coll.values():
    r["group_sizes"] = sorted(r.get("group_sizes", ()))
  return {"collectives": coll, "dot_flops_executed": dot_flops,
          "dot_flops_static": dot_flops_static, "loops_without_trip_count": unknown_loops,
          "while_loops": sum(1 for c in comps.values() for i in c if i[2] == "while")}


# ----------------------------------------------------------------------------- building

def _load_pod_config(mesh_shape):
  import importlib.util
  spec = importlib.util.spec_from_file_location("_pod_sweep_config", POD_CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(",".join(str(v) for v in mesh_shape))


def build_programs(config, preset: str, n_members: int, *, with_eval: bool = True,
                   mesh=None, old: bool = False,
                   platform_default_options: bool = False):
  """The run's jitted train step (and evaluator) with abstract, sharded arguments.

  Mirrors ``gpo_jax.run.loop.setup`` without a lab: the model comes from
  ``nnx.eval_shape`` of the lab config's policy shape, the training arrays and evaluator
  constants are ``ShapeDtypeStruct``s with the shapes a built lab has.

  The loss is wrapped by ``program.place_on_data`` exactly as ``loop.setup`` wraps it (the
  params' shardings passed when the preset's ``embed`` rule is ``data``), and the evaluator
  is an ``Evaluator`` whose sharding is replicated on ``mesh``, so ``_eval_all`` regroups the
  members over the sweep axis as in a run.

  ``old=True`` compiles the code before commit 0c997c6, for comparison only: the loss
  without ``place_on_data`` and the evaluator with ``_pool_groups`` forced to 1 (one member
  group: ``_eval_all`` and ``_offline_log_ratios`` become the single ``lax.map`` over all
  members they were), no member rows on ``data`` and the two-pass measurement
  (``Evaluator.two_pass``: sample, then π and π_ref over the samples, gold over whole
  sequences).

  ``platform_default_options=True`` jits the step with ``jit_train_step``'s default
  compiler options for the mesh's platform (on a CPU mesh: the XLA:CPU options), as the run
  loop does; the default passes None, what an accelerator mesh gets.

  Returns:
    ``{"train": (jitted, args), "eval": (jitted, args) | None, "meta": {...}}``.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec

  from gpo_jax.core import model as model_lib
  from gpo_jax.engine import program
  from gpo_jax.lab import corpus as corpus_lib
  from gpo_jax.lab import gold as gold_lib
  from gpo_jax.lab.config import LabConfig
  from gpo_jax.run import config as config_lib
  from gpo_jax.runtime import sharding

  lab = LabConfig.from_dict(config.lab)
  pcfg, gcfg = lab.policy_config, lab.gold_config
  algo = config_lib.algorithm(config)
  tcfg = config_lib.train_config(config)
  members = algo.members(config, lab.n_train_pairs)
  if n_members < members.size:
    members = members.select(np.arange(n_members))
  elif n_members > members.size:
    raise ValueError(f"{n_members} members asked, the config has {members.size}")
  if mesh is None:
    mesh = sharding.make_mesh(config_lib.mesh_dict(config), num_members=members.size,
                              batch_size=tcfg.batch_size)
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: model_lib.Transformer(pcfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  abstract = jax.eval_shape(lambda p: program.init_state(p, members, tcfg), params)
  state_sh = program.state_shardings(abstract, mesh, preset)
  report = sharding.check_replication(abstract, state_sh, mesh, preset)
  loss_fn = algo.loss_fn(graphdef, rest, members, config)
  gather = sharding.get_preset(preset).rules.get("embed") == sharding.DATA
  if not old:   # as gpo_jax.run.loop.setup does
    loss_fn = program.place_on_data(loss_fn, mesh, state_sh["params"] if gather else None)
  step = program.make_train_step(loss_fn, tcfg,
                                 member_groups=int(mesh.shape[sharding.SWEEP]),
                                 member_chunk=config_lib.member_chunk(config))
  # compiler_options=None: what jit_train_step gives a TPU/GPU mesh (cpu.compiler_options
  # returns None off CPU); the CPU-only YNNPACK option must not shape the pod program.
  jitted = (program.jit_train_step(step, state_sh, mesh) if platform_default_options
            else program.jit_train_step(step, state_sh, mesh, compiler_options=None))
  state_abs = sharding.shape_dtype_structs(program._strip(abstract), state_sh)
  member_sh = NamedSharding(mesh, PartitionSpec(sharding.SWEEP))
  repl = NamedSharding(mesh, PartitionSpec())
  hp = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=member_sh)
        for k, v in members.hparams().items()}
  c_len, t_len = lab.corpus.prompt_len + 2, lab.corpus.response_len

  def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=repl)

  def pairs(n):
    i32, f32 = jnp.int32, jnp.float32
    return {"prompt": sds((n, c_len), i32), "chosen": sds((n, t_len), i32),
            "rejected": sds((n, t_len), i32), "chosen_mask": sds((n, t_len), i32),
            "rejected_mask": sds((n, t_len), i32), "ref_chosen_logps": sds((n,), f32),
            "ref_rejected_logps": sds((n,), f32), "gold_chosen": sds((n,), f32),
            "gold_rejected": sds((n,), f32)}

  data = pairs(lab.n_train_pairs)
  state_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state_abs))
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  meta = {"members": int(members.size), "mesh": {k: int(v) for k, v in mesh.shape.items()},
          "devices": int(mesh.devices.size), "preset": preset,
          "replicated_fraction": float(report.fraction), "state_bytes_global": int(state_bytes),
          "policy_params": int(n_params), "batch_size": tcfg.batch_size,
          "seq_len_train": c_len + t_len - 1, "n_train": lab.n_train_pairs,
          "member_chunk": config_lib.member_chunk(config), "place_on_data": not old,
          "weights_gathered_at_use": bool(gather and not old
                                          and int(mesh.shape[sharding.DATA]) > 1)}
  out = {"train": (jitted, (state_abs, hp, data)), "eval": None, "meta": meta}
  if not with_eval:
    return out

  from gpo_jax.evaluation import policy
  with nnx.use_eager_sharding(False):
    gold_model = nnx.eval_shape(lambda: model_lib.RewardModel(gcfg, rngs=nnx.Rngs(0)))
  ggraph, gstate = nnx.split(gold_model)
  terms = gold_lib.GoldTerms(kind=lab.gold_kind, coherence_weight=lab.gold_coherence_weight,
                             cap_penalty=lab.gold_cap_penalty)
  # The normalisers are scalars baked into the function; their values do not change shapes.
  gold_fn = gold_lib.make_gold_fn(ggraph, 0.0, 1.0, terms)
  tables = gold_lib.tables(corpus_lib.Corpus(lab.corpus))
  ecfg = policy.EvalConfig.from_config(config.eval)
  ev = object.__new__(policy.Evaluator)   # __init__ would place concrete arrays on devices
  ev.ecfg, ev.graphdef, ev.rest, ev.gold_fn = ecfg, graphdef, rest, gold_fn
  ev.resp_len, ev.length_normalize = t_len, bool(config.train.length_normalize)
  ev.proxy, ev.sharding = None, repl   # loop.py passes the replicated sharding of the mesh
  ev._weights_at_use = None
  if old:
    ev._pool_groups = lambda e: 1   # before 0c997c6: one lax.map over all members
    ev._data_devices = lambda: 1    # ... with no member's rows on `data`
  elif int(mesh.shape[sharding.DATA]) > 1:   # as Evaluator.__call__ sets it from the params
    ev._weights_at_use = sharding.gathered_at_use(state_sh["params"], mesh)

  def abstract_rep(tree):
    return jax.tree.map(lambda x: sds(np.shape(x), x.dtype), tree)

  e = ecfg.n_prompts or lab.n_eval_prompts
  n_test = ecfg.n_test_pairs or lab.n_test_pairs
  aux = {"ref_params": abstract_rep(program._strip(params)),
         "gold_state": abstract_rep({"net": program._strip(gstate), "tables": tables}),
         "ref_gold": sds((e, ecfg.ref_samples_per_prompt), jnp.float32),
         "ref_gold_E": sds((e,), jnp.float32), "prompts": sds((e, c_len), jnp.int32),
         "test": pairs(min(n_test, lab.n_test_pairs))}
  aux["gold_prefix"] = None if old else jax.tree.map(
      lambda x: sds(x.shape, x.dtype),
      jax.eval_shape(gold_fn.prefix, aux["gold_state"], aux["prompts"]))
  step_arg = jax.ShapeDtypeStruct((), jnp.int32)
  # before 0c997c6 (old) the evaluator sampled, then ran π and π_ref over the samples again
  run = functools.partial(ev._eval_all, two_pass=True) if old else ev._eval_all
  out["eval"] = (jax.jit(run), (state_abs["params"], hp, step_arg, aux))
  meta.update(eval_prompts=e, samples_per_prompt=ecfg.samples_per_prompt,
              eval_test_pairs=min(n_test, lab.n_test_pairs), eval_member_chunk=ecfg.member_chunk,
              eval_member_groups=int(ev._pool_groups(int(members.size))),
              eval_every=int(config.eval.every), gold_params=int(sum(
                  math.prod(x.shape) for x in jax.tree.leaves(gstate))))
  return out


def analytic_flops(config, n_members: int) -> dict:
  """Matmul FLOPs of one train step and one evaluation, from ``model.flops_per_token``."""
  from gpo_jax.core import model as model_lib
  from gpo_jax.lab.config import LabConfig
  lab = LabConfig.from_dict(config.lab)
  pcfg, gcfg = lab.policy_config, lab.gold_config
  c_len, t_len = lab.corpus.prompt_len + 2, lab.corpus.response_len
  seq = c_len + t_len - 1
  b = config.train.batch_size
  # Each prompt runs once and both responses' T - 1 read positions after it
  # (model.prompt_response_logprobs), in the train step and the offline diagnostics alike.
  def pairs_fwd(n_pairs):
    return (model_lib.flops_per_token(pcfg, c_len) * c_len * n_pairs
            + model_lib.flops_per_token(pcfg, seq) * (t_len - 1) * 2 * n_pairs)
  train = 3 * pairs_fwd(b)
  e = config.eval.n_prompts or lab.n_eval_prompts
  n = e * config.eval.samples_per_prompt
  k = min(config.eval.n_test_pairs or lab.n_test_pairs, lab.n_test_pairs)
  chunk = config.eval.member_chunk
  # The evaluator's path (gpo_jax.evaluation.policy): π and π_ref decode side by side
  # (sampling.sample_measured), each prompt prefilled once for its samples, every decode step
  # attending over the sampler's C + T - 1 cache slots; the gold network over the response
  # positions after the eval contexts' cached states (computed once per run, not counted),
  # its last block's query, attention and MLP at the read position only (score_after).
  sample = 2 * (model_lib.flops_per_token(pcfg, c_len) * c_len * e
                + model_lib.flops_per_token(pcfg, c_len + t_len - 1) * (t_len - 1) * n)
  d, f = gcfg.d_model, gcfg.d_ff
  gold_layer = ((model_lib.flops_per_token(gcfg, c_len + t_len) - 2 * d * gcfg.vocab_size)
                / gcfg.n_layers)   # one block, one token (no unembedding: a scalar head)
  last_block = (t_len * 2 * (2 * d * d)                       # keys and values of T positions
                + 2 * (2 * d * d + 2 * d * f) + 2 * 2 * (c_len + t_len) * d)   # one query
  gold = (t_len * (gcfg.n_layers - 1) * gold_layer + last_block + 2 * d) * n
  offline = pairs_fwd(k) * (1 + 1 / chunk)
  per_member_eval = sample + gold + offline
  return {"train_per_member": float(train), "train_step": float(train * n_members),
          "eval_per_member": float(per_member_eval), "eval": float(per_member_eval * n_members),
          "eval_parts_per_member": {"π and π_ref sampled side by side": float(sample),
                                    "gold (responses)": float(gold),
                                    "offline pairs": float(offline)}}


def _xla_cost(compiled) -> dict:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return {"flops": float(ca.get("flops", 0.0)),
          "bytes_accessed": float(ca.get("bytes accessed", 0.0)),
          "transcendentals": float(ca.get("transcendentals", 0.0))}


def _memory(compiled) -> dict:
  ma = compiled.memory_analysis()
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
          "temp_size_in_bytes", "generated_code_size_in_bytes")
  out = {k.replace("_size_in_bytes", "_bytes"): int(getattr(ma, k, 0) or 0) for k in keys}
  out["peak_estimate_bytes"] = (out["argument_bytes"] + out["output_bytes"]
                                - out["alias_bytes"] + out["temp_bytes"])
  return out


def compile_case(name: str, mesh_shape, n_members: int, with_eval: bool) -> dict:
  """Compiles one case; ``name`` is a preset, or ``<preset>+old`` for the pre-0c997c6 code."""
  import jax
  preset, _, variant = name.partition("+")
  config = _load_pod_config(mesh_shape)
  with config.unlocked():
    config.mesh.preset = preset
  t0 = time.time()
  progs = build_programs(config, preset, n_members, with_eval=with_eval,
                         old=variant == OLD)
  res = {**progs["meta"], "preset": name, "variant": variant or None,
         "mesh_shape": list(mesh_shape),
         "analytic_flops": analytic_flops(config, n_members), "programs": {}}
  n_dev = jax.device_count()
  for kind in ("train", "eval"):
    if progs[kind] is None:
      continue
    fn, args = progs[kind]
    t1 = time.time()
    lowered = fn.lower(*args)
    t2 = time.time()
    compiled = lowered.compile()
    t3 = time.time()
    text = compiled.as_text()
    hlo = analyse_hlo(text, n_dev)
    res["programs"][kind] = {"lower_s": round(t2 - t1, 2), "compile_s": round(t3 - t2, 2),
                             "memory": _memory(compiled), "xla_cost": _xla_cost(compiled),
                             "hlo": hlo, "hlo_chars": len(text)}
    del compiled, lowered, text
  res["wall_s"] = round(time.time() - t0, 2)
  return res


def worker(args) -> None:
  """Runs in a subprocess whose XLA_FLAGS fixed the device count: one JSON line per case."""
  import jax
  n = jax.device_count()
  if n != args.worker:
    raise SystemExit(f"expected {args.worker} simulated devices, JAX has {n} (XLA_FLAGS?)")
  sizes = [int(v) for v in args.members.split(",")]
  for preset in args.presets.split(","):
    for m in sizes:
      if "+" in preset and m != max(sizes):
        continue   # the old code: largest member count only
      res = compile_case(preset, MESHES[n][preset.split("+")[0]], m,
                         with_eval=not args.no_eval)
      print("CASE " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- estimates

def roofline(prog: dict, hw: dict, model_flops: float, devices: int) -> dict:
  """One program's time on one chip type: max(compute, HBM, interconnect); an estimate.

  FLOPs: XLA's count plus the dot FLOPs of loop iterations XLA counts once (the HLO's
  known trip counts). Bytes: XLA's "bytes accessed" scaled by the same ratio (an
  approximation for loops). Collectives: ring-algorithm bytes each device sends, at half the
  bidirectional per-chip interconnect bandwidth; on GPUs collectives whose groups span
  8-GPU nodes go at the InfiniBand rate instead of NVLink.
  """
  xla = prog["xla_cost"]
  hlo = prog["hlo"]
  flops = xla["flops"] + max(0.0, hlo["dot_flops_executed"] - hlo["dot_flops_static"])
  scale = flops / xla["flops"] if xla["flops"] else 1.0
  bytes_acc = xla["bytes_accessed"] * scale
  t_compute = flops / (hw["peak_tflops"] * 1e12)
  t_hbm = bytes_acc / (hw["hbm_GBps"] * 1e9)
  t_comm = 0.0
  for c in hlo["collectives"].values():
    wire, cross = c["wire_bytes_executed"], c["wire_bytes_cross_node_executed"]
    if hw["node"] is None:
      t_comm += wire / (hw["ici_GBps"] / 2 * 1e9)
    else:
      t_comm += (wire - cross) / (hw["ici_GBps"] / 2 * 1e9) + cross / (hw["dcn_GBps"] * 1e9)
  times = {"compute": t_compute, "HBM": t_hbm, "collectives": t_comm}
  bottleneck = max(times, key=times.get)
  t = times[bottleneck]
  mfu = model_flops / (devices * hw["peak_tflops"] * 1e12 * t) if t > 0 else float("nan")
  mem = prog["memory"]["peak_estimate_bytes"]
  return {"time_s": t, "bottleneck": bottleneck, "t_compute_s": t_compute, "t_hbm_s": t_hbm,
          "t_collectives_s": t_comm, "mfu": mfu, "flops_per_device": flops,
          "bytes_per_device": bytes_acc, "fits_hbm": mem <= hw["hbm_GB"] * 1e9}


def add_estimates(cases: list[dict]) -> None:
  for c in cases:
    c["estimates"] = {}
    for name, hw in HARDWARE.items():
      est = {}
      tr = c["programs"].get("train")
      if tr:
        r = roofline(tr, hw, c["analytic_flops"]["train_step"], c["devices"])
        r["policy_updates_per_s"] = c["members"] / r["time_s"] if r["time_s"] else float("nan")
        est["train"] = r
      ev = c["programs"].get("eval")
      if ev:
        r = roofline(ev, hw, c["analytic_flops"]["eval"], c["devices"])
        est["eval"] = r
        if tr:
          every = c.get("eval_every", 250)
          per_step = est["train"]["time_s"] + r["time_s"] / every
          est["train_with_eval_updates_per_s"] = c["members"] / per_step
      c["estimates"][name] = est


# ----------------------------------------------------------------------------- report

def _gb(x):
  return f"{x / 1e9:.2f}"


def _fmt_t(s):
  if s >= 1:
    return f"{s:.2f} s"
  if s >= 1e-3:
    return f"{s * 1e3:.1f} ms"
  return f"{s * 1e6:.0f} µs"


def _num(x):
  if x >= 1e15:
    return f"{x / 1e15:.2f} P"
  if x >= 1e12:
    return f"{x / 1e12:.2f} T"
  if x >= 1e9:
    return f"{x / 1e9:.2f} G"
  if x >= 1e6:
    return f"{x / 1e6:.2f} M"
  return f"{x:.0f} "


def _coll_summary(hlo) -> str:
  parts = []
  for op in COLLECTIVES:
    c = hlo["collectives"][op]
    if c["count"]:
      parts.append(f"{op} {c['count']}× ({_num(c['bytes_executed'])}B exec., groups "
                   f"{'/'.join(str(g) for g in c['group_sizes'])})")
  return "; ".join(parts) or "none"


def write_report(result: dict, md_path: str) -> None:
  cases = result["cases"]
  L = []
  w = L.append
  w("# POD_PLAN — the pod sweep compiled on paper")
  w("")
  w(f"Written by `experiments/pod_plan.py` on {result['date']} "
    f"({'quick mode' if result['quick'] else 'full run'}); the raw numbers are in "
    "`pod_plan.json`. Issue 15, \"the pod path on paper\".")
  w("")
  w("```bash")
  w(result["command"])
  w("```")
  w("")
  m = result["machine"]
  w(f"Machine: {m['cpu']}, {m['cores']} cores (affinity), {m['platform']}; jax "
    f"{m['versions']['jax']}, jaxlib {m['versions']['jaxlib']}, flax {m['versions']['flax']}, "
    f"python {m['versions']['python']}. Code: commit {m.get('code', {}).get('commit', '?')}"
    + (f" with uncommitted changes to {', '.join(m['code']['modified_code_files'])} (in the "
       "working tree while it ran)" if m.get("code", {}).get("modified_code_files") else "")
    + f". Load average at start {m['load_start']}, at end "
    f"{m['load_end']}. Whole script: {result['wall_s']:.0f} s "
    f"({', '.join(f'{k} devices: {v:.0f} s' for k, v in result['worker_wall_s'].items())}).")
  w("")
  w("## What was compiled")
  w("")
  c0 = cases[0]
  from gpo_jax.lab.config import LabConfig
  config = _load_pod_config(MESHES[256]["fsdp"])
  lab = LabConfig.from_dict(config.lab)
  pc, gc, co = lab.policy, lab.gold, lab.corpus
  sw = config.sweep
  w(f"`configs/pod_sweep.py` (offline GPO, `{lab.name}` lab: policy d_model {pc.d_model}, "
    f"{pc.n_layers} layers, {pc.n_heads} heads, d_ff {pc.d_ff}, vocab {co.vocab_size}, "
    f"{c0['policy_params']:,} parameters; gold d_model {gc.d_model}, {gc.n_layers} layers, "
    f"d_ff {gc.d_ff}, {c0.get('gold_params', 0):,} parameters; prompt length {co.prompt_len} → "
    f"context {co.prompt_len + 2}, response {co.response_len}, "
    f"train sequences of {c0['seq_len_train']} positions; batch {c0['batch_size']} pairs per "
    f"member; {c0['n_train']:,} training pairs; `train.member_chunk={config.train.member_chunk}`"
    f"{': one vmap over each device' + chr(39) + 's members' if not config.train.member_chunk else ''}"
    "). Two programs per case, both jitted and compiled ahead of time on "
    "`jax.ShapeDtypeStruct` arguments that carry the run's shardings:")
  w("")
  w("- **train**: the step `gpo_jax.run.loop.setup` builds: the GPO `loss_fn` wrapped by "
    "`engine.program.place_on_data` (every per-member batch array constrained to "
    "`PartitionSpec('data')`; under `fsdp`/`fsdp_tp`, whose `embed` rule is `data`, each "
    "weight constrained to its stored sharding minus `data` at use, so it is all-gathered over "
    "`data` and keeps its `model` split), "
    "`engine.program.make_train_step`, `program.state_shardings` (+ `sharding.check_replication`), "
    "`program.jit_train_step(..., compiler_options=None)` — None is what a TPU/GPU mesh gets; "
    "the CPU-only YNNPACK option is left out. Arguments: the stacked state (params + Adam "
    "moments, donated), the `[M]` hyperparameters over `sweep`, the replicated training arrays.")
  if any("eval" in c["programs"] for c in cases):
    w(f"- **eval**: the whole `Evaluator._eval_all` of `gpo_jax/evaluation/policy.py`, jitted as "
      f"the Evaluator jits it on an accelerator (`jax.jit(self._eval_all)`: the forward "
      f"programs' compiler options are CPU-only; shardings from its arguments): "
      f"{c0.get('eval_prompts')} prompts × {c0.get('samples_per_prompt')} samples per member "
      "with the KV-cache sampler, π_ref decoded beside π (exact KL and log-probs along the "
      "samples; each prompt prefilled once), the gold network over the responses after the "
      f"contexts' cached states plus coherence tables, the offline diagnostics on "
      f"{c0.get('eval_test_pairs')} held-out pairs; "
      "members regrouped by `Evaluator._by_device` into `[sweep, M/sweep]` with the groups "
      "vmapped on the `sweep` axis, each group a `lax.map` over its members in chunks of "
      f"min({c0.get('eval_member_chunk')}, M/sweep) (so each device of the sweep axis evaluates "
      "only its own members; the offline log-ratios likewise), each member's sample rows and "
      "held-out pairs constrained to `data` (`Evaluator._on_data`). The Evaluator object "
      "is made without `__init__` (which would place concrete arrays on devices), given the "
      "replicated sharding of the run's mesh (what `loop.py` passes, and what `_by_device` reads "
      "the sweep axis from) and "
      "abstract constants with the lab's shapes; the gold normalisers are scalars fixed at 0/1 "
      "(values, not shapes). The π_ref pool (`Evaluator.reference`, once per run) is not compiled.")
  w("")
  w("Meshes `(sweep, data, model)`: "
    + "; ".join(f"{n} devices: " + ", ".join(f"{p} {tuple(s)}" for p, s in MESHES[n].items())
                for n in sorted({c['devices'] for c in cases}))
    + f". Member counts: {', '.join(str(v) for v in sorted({c['members'] for c in cases}))}; "
      f"pod_sweep's full grid is {len(sw.families) * len(sw.beta_effs) * len(sw.seeds) * len(sw.data_sizes) * len(sw.lrs) * len(sw.gammas)} "
      f"members ({len(sw.families)} families × {len(sw.beta_effs)} β × {len(sw.seeds)} seeds × "
      f"{len(sw.data_sizes)} data sizes), smaller counts are its first members."
    + (" Cases named `<preset>+old` are the repository's code **before commit 0c997c6**, "
       "compiled for comparison only (`--baseline-old`: the loss without `place_on_data`, the "
       "evaluator with one member group, i.e. a `lax.map` over all members on every device, "
       "no rows on `data`, and the two-pass measurement it had), "
       "at the largest device and member count." if any(c.get("variant") for c in cases)
       else ""))
  w("")
  w("**All numbers below are XLA:CPU's** (`--xla_force_host_platform_device_count`): the "
    "SPMD partitioning is the one any backend would start from, but memory, FLOP and byte "
    "counts are a proxy for what the TPU/GPU compilers would produce (other fusion, layouts, "
    "collective algorithms, bf16 where the accelerators' default matmul precision uses it). "
    "The model is float32 (`TransformerConfig.dtype` default).")
  w("")
  w("## Per-device memory, cost and collectives (CPU proxy)")
  w("")
  w("Memory from `compiled.memory_analysis()` (GB per device): arguments, outputs, alias "
    "(donated state reused for the output), temporaries, generated code; peak ≈ arg + out − "
    "alias + temp. FLOPs and bytes from `compiled.cost_analysis()` (per device; XLA counts "
    "a loop body once). \"dot FLOPs exec.\" re-counts the HLO's dots with the loops' known "
    "trip counts. Collectives: static count in the per-device HLO, bytes of their results "
    "summed over executions (loop trip counts applied), replica-group sizes.")
  w("")
  w("| devices | preset | mesh | M | program | compile s | arg GB | out GB | alias GB | temp GB "
    "| code GB | XLA FLOPs | dot FLOPs exec. | XLA bytes | collectives |")
  w("|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
  for c in cases:
    for kind, p in c["programs"].items():
      mem = p["memory"]
      w(f"| {c['devices']} | {c['preset']} | {tuple(c['mesh_shape'])} | {c['members']} | {kind} "
        f"| {p['compile_s']:.1f} | {_gb(mem['argument_bytes'])} | {_gb(mem['output_bytes'])} "
        f"| {_gb(mem['alias_bytes'])} | {_gb(mem['temp_bytes'])} "
        f"| {_gb(mem['generated_code_bytes'])} | {_num(p['xla_cost']['flops'])} "
        f"| {_num(p['hlo']['dot_flops_executed'])} | {_num(p['xla_cost']['bytes_accessed'])}B "
        f"| {_coll_summary(p['hlo'])} |")
  w("")
  w("Analytic matmul FLOPs (`gpo_jax.core.model.flops_per_token`, forward ×3 for a train "
    "step) against the compiled per-device FLOPs: *redundancy* = per-device dot FLOPs × devices "
    "/ analytic FLOPs of the whole sweep (1 = every device does only its share; the data and "
    "model axes can raise it when they replicate work).")
  w("")
  w("| devices | preset | M | program | analytic FLOPs (all members) | per device, ideal | per device, compiled (dot, exec.) | redundancy |")
  w("|---:|---|---:|---|---:|---:|---:|---:|")
  for c in cases:
    for kind, p in c["programs"].items():
      a = c["analytic_flops"]["train_step" if kind == "train" else "eval"]
      d = p["hlo"]["dot_flops_executed"]
      w(f"| {c['devices']} | {c['preset']} | {c['members']} | {kind} | {_num(a)} | "
        f"{_num(a / c['devices'])} | {_num(d)} | {d * c['devices'] / a:.2f} |")
  w("")
  w("## Hardware numbers used (published specs)")
  w("")
  w("| chip | peak bf16 TFLOP/s (dense) | HBM GB/s | HBM GB | interconnect GB/s (bidir., per chip) | source |")
  w("|---|---:|---:|---:|---:|---|")
  for name, hw in HARDWARE.items():
    ic = f"{hw['ici_GBps']:.0f}" + (f" NVLink in 8-GPU nodes; {hw['dcn_GBps']:.0f} per direction IB across"
                                     if hw["node"] else " ICI")
    w(f"| {name} | {hw['peak_tflops']:.0f} | {hw['hbm_GBps']:.0f} | {hw['hbm_GB']:.0f} | {ic} | "
      f"{hw['source']} |")
  w("")
  w("## Roofline estimates (estimate, not a measurement)")
  w("")
  w("Assumptions: step time = max(FLOPs / peak, bytes / HBM bandwidth, collective bytes / "
    "interconnect bandwidth) per device, with the CPU proxy's per-device FLOPs (XLA's count "
    "plus the dot FLOPs of loop iterations it skips), bytes accessed (scaled by the same "
    "ratio) and ring-algorithm collective bytes (all-reduce 2(n−1)/n·S, all-gather "
    "(n−1)/n·S, reduce-scatter (n−1)·S_shard) at half the bidirectional per-chip bandwidth; "
    "on GPUs a collective whose replica groups span 8-GPU nodes (partition ids grouped by "
    "id // 8) goes at 50 GB/s InfiniBand. No overlap of compute, memory and communication is "
    "assumed beyond taking the max; bf16 peak although the model is float32 (so compute "
    "times are optimistic). policy updates/s = members / step time. MFU = analytic model "
    "FLOPs / (devices × peak × step time). \"fits\" compares the CPU proxy's peak memory per "
    "device with the chip's HBM. XLA:CPU's \"bytes accessed\" sums every instruction's "
    "operands and results; the TPU/GPU compilers fuse more, so the HBM times (the bottleneck "
    "almost everywhere below) are pessimistic and the MFUs low bounds of what the programs "
    "allow; the compute column is the bound with perfect fusion.")
  w("")
  w("| devices | preset | M | chip | train step | bottleneck | compute / HBM / collectives | "
    "policy updates/s | MFU | fits HBM | eval | eval bottleneck | updates/s incl. eval every "
    f"{c0.get('eval_every', 250)} steps |")
  w("|---:|---|---:|---|---:|---|---|---:|---:|---|---:|---|---:|")
  for c in cases:
    for name, est in c["estimates"].items():
      tr = est.get("train")
      if not tr:
        continue
      ev = est.get("eval")
      w(f"| {c['devices']} | {c['preset']} | {c['members']} | {name} | {_fmt_t(tr['time_s'])} "
        f"| {tr['bottleneck']} | {_fmt_t(tr['t_compute_s'])} / {_fmt_t(tr['t_hbm_s'])} / "
        f"{_fmt_t(tr['t_collectives_s'])} | {tr['policy_updates_per_s']:,.0f} | "
        f"{100 * tr['mfu']:.1f} % | {'yes' if tr['fits_hbm'] else 'no'} | "
        + (f"{_fmt_t(ev['time_s'])}{'' if ev['fits_hbm'] else ' (exceeds HBM)'} | "
           f"{ev['bottleneck']} | "
           f"{est['train_with_eval_updates_per_s']:,.0f} |" if ev else "– | – | – |"))
  w("")
  for line in result.get("findings", []):
    w(line)
  with open(md_path, "w") as f:
    f.write("\n".join(L) + "\n")


def _find(cases, devices, preset, members):
  return next((c for c in cases if c["devices"] == devices and c["preset"] == preset
               and c["members"] == members), None)


def _coll_bytes(prog) -> float:
  return sum(v["bytes_executed"] for v in prog["hlo"]["collectives"].values())


def _redundancy(c, kind) -> float:
  a = c["analytic_flops"]["train_step" if kind == "train" else "eval"]
  return c["programs"][kind]["hlo"]["dot_flops_executed"] * c["devices"] / a


def _peak(c, kind) -> float:
  return c["programs"][kind]["memory"]["peak_estimate_bytes"]


def _best(cases, n, m, chip, pred):
  """(policy updates/s, case) of the fastest case that fits the chip's HBM, or None."""
  opts = [(c["estimates"][chip]["train"]["policy_updates_per_s"], c) for c in cases
          if c["devices"] == n and c["members"] == m and pred(c)
          and "train" in c["estimates"].get(chip, {})
          and c["estimates"][chip]["train"]["fits_hbm"]]
  return max(opts, key=lambda t: t[0]) if opts else None


def _best_line(hit, chip) -> str:
  if not hit:
    return "no preset's train step fits in HBM (CPU-proxy memory)"
  e = hit[1]["estimates"][chip]
  return (f"best preset `{hit[1]['preset']}` ≈ {hit[0]:,.0f} policy updates/s (train step "
          f"only; {e['train']['bottleneck']}-bound, MFU {100 * e['train']['mfu']:.1f} %"
          + (f"; {e['train_with_eval_updates_per_s']:,.0f}/s with its evaluation every "
             f"{hit[1].get('eval_every', 250)} steps"
             + ("" if e["eval"]["fits_hbm"] else ", but the evaluation exceeds HBM")
             if "train_with_eval_updates_per_s" in e else "") + ")")


def findings(result: dict) -> list[str]:
  """Statements computed from the cases (no hand-written numbers)."""
  out = ["## Headline (estimates)", ""]
  cases = result["cases"]
  has_old = any(c.get("variant") == OLD for c in cases)
  for n in sorted({c["devices"] for c in cases}):
    m = max(c["members"] for c in cases if c["devices"] == n)
    for chip in HARDWARE:
      line = (f"- {n} × {chip}, {m} members: "
              + _best_line(_best(cases, n, m, chip, lambda c: not c.get("variant")), chip))
      if has_old and any(c.get("variant") == OLD and c["devices"] == n for c in cases):
        old = _best(cases, n, m, chip, lambda c: c.get("variant") == OLD)
        line += ("; before 0c997c6: " + (f"`{old[1]['preset']}` ≈ {old[0]:,.0f}/s (MFU "
                 f"{100 * old[1]['estimates'][chip]['train']['mfu']:.1f} %)" if old
                 else "no preset fitted"))
      out.append(line + ".")
  config = _load_pod_config(MESHES[256]["fsdp"])
  steps, every = int(config.train.steps), int(config.eval.every)
  n_evals = steps // every + 1
  m256 = max((x["members"] for x in cases if x["devices"] == 256), default=None)
  pod = _find(cases, 256, config.mesh.preset, m256)
  if pod and "eval" in pod["programs"]:
    old = _find(cases, 256, f"{config.mesh.preset}+{OLD}", m256)
    out += ["", f"pod_sweep as configured ({pod['devices']} devices, `{pod['preset']}` "
            f"{tuple(pod['mesh_shape'])}, {pod['members']} members, {steps} steps, evaluation "
            f"every {every} steps and at the end): estimated wall time of training plus "
            "evaluations (no lab build, checkpoints or host work)"
            + (", and the same for the programs before 0c997c6" if old else "") + ":", ""]
    for chip, est in pod["estimates"].items():
      t = steps * est["train"]["time_s"] + n_evals * est["eval"]["time_s"]
      fits = est["train"]["fits_hbm"] and est["eval"]["fits_hbm"]
      line = (f"- {chip}: {t / 60:.0f} min ({steps} × {_fmt_t(est['train']['time_s'])} + "
              f"{n_evals} × {_fmt_t(est['eval']['time_s'])})"
              + ("" if fits else "; does not fit in HBM by the CPU proxy's memory"))
      if old and "eval" in old["programs"]:
        eo = old["estimates"][chip]
        to = steps * eo["train"]["time_s"] + n_evals * eo["eval"]["time_s"]
        line += (f"; before: {to / 60:.0f} min ({steps} × {_fmt_t(eo['train']['time_s'])} + "
                 f"{n_evals} × {_fmt_t(eo['eval']['time_s'])})"
                 + ("" if eo["train"]["fits_hbm"] and eo["eval"]["fits_hbm"]
                    else ", not fitting"))
      out.append(line + ".")
  olds = [c for c in cases if c.get("variant") == OLD]
  if olds:
    out += ["", "## Before and after commit 0c997c6", "",
            "The same preset, device count and member count compiled twice: `+old` is the code "
            "before 0c997c6 (no `place_on_data`; the evaluator as one `lax.map` over all members, "
            "measuring in a second pass), "
            "the plain name is the repository's code now. CPU-proxy numbers per device:", "",
            "| devices | M | preset | program | peak memory GB (old → now) | collective results "
            "per step (old → now) | compiled/ideal matmul FLOPs (old → now) | XLA bytes "
            "accessed (old → now) |",
            "|---:|---:|---|---|---|---|---|---|"]
    pairs = []
    for o in olds:
      now = _find(cases, o["devices"], o["preset"].split("+")[0], o["members"])
      if now:
        pairs.append((o, now))
    for o, now in pairs:
      for kind in ("train", "eval"):
        p, q = o["programs"].get(kind), now["programs"].get(kind)
        if not (p and q):
          continue
        out.append(f"| {o['devices']} | {o['members']} | {now['preset']} | {kind} | "
                   f"{_gb(_peak(o, kind))} → {_gb(_peak(now, kind))} | "
                   f"{_num(_coll_bytes(p))}B → {_num(_coll_bytes(q))}B | "
                   f"{_redundancy(o, kind):.2f} → {_redundancy(now, kind):.2f} | "
                   f"{_num(p['xla_cost']['bytes_accessed'])}B → "
                   f"{_num(q['xla_cost']['bytes_accessed'])}B |")
    out += ["", "Roofline estimates for the same pairs (same assumptions as above; \"no\" marks a "
            "program whose CPU-proxy peak memory exceeds the chip's HBM):", "",
            "| devices | M | preset | chip | train step (old → now) | bottleneck (old → now) | "
            "policy updates/s (old → now) | MFU (old → now) | evaluation (old → now) | "
            "updates/s incl. evaluation (old → now) | fits HBM train/eval (old → now) |",
            "|---:|---:|---|---|---|---|---|---|---|---|---|"]
    yn = lambda b: "yes" if b else "no"  # noqa: E731
    for o, now in pairs:
      for chip in HARDWARE:
        a, b = o["estimates"][chip], now["estimates"][chip]
        if "train" not in a or "train" not in b:
          continue
        ev = "eval" in a and "eval" in b
        out.append(
            f"| {o['devices']} | {o['members']} | {now['preset']} | {chip} | "
            f"{_fmt_t(a['train']['time_s'])} → {_fmt_t(b['train']['time_s'])} | "
            f"{a['train']['bottleneck']} → {b['train']['bottleneck']} | "
            f"{a['train']['policy_updates_per_s']:,.0f} → {b['train']['policy_updates_per_s']:,.0f}"
            f" | {100 * a['train']['mfu']:.1f} % → {100 * b['train']['mfu']:.1f} % | "
            + (f"{_fmt_t(a['eval']['time_s'])} → {_fmt_t(b['eval']['time_s'])} | "
               f"{a['train_with_eval_updates_per_s']:,.0f} → "
               f"{b['train_with_eval_updates_per_s']:,.0f} | " if ev else "– | – | ")
            + f"{yn(a['train']['fits_hbm'])}/{yn(a['eval']['fits_hbm']) if ev else '–'} → "
            f"{yn(b['train']['fits_hbm'])}/{yn(b['eval']['fits_hbm']) if ev else '–'} |")
  out += ["", "## What the compiled programs say", ""] + observations(cases) + [""]
  out += ["Per case:", ""]
  for c in cases:
    tr = c["programs"].get("train")
    if not tr:
      continue
    coll = tr["hlo"]["collectives"]
    state_dev = c["state_bytes_global"] / c["devices"]
    out.append(f"- train, {c['devices']} devices, {c['preset']}, M={c['members']}: "
               + ", ".join(f"{op} {_num(coll[op]['bytes_executed'])}B" for op in COLLECTIVES
                           if coll[op]["count"])
               + f" of results per device per step (state {_num(state_dev)}B per device if "
               f"spread evenly); compiled/ideal matmul FLOPs {_redundancy(c, 'train'):.2f}; "
               f"peak memory {_gb(_peak(c, 'train'))} GB per device (CPU proxy).")
  evs = [c for c in cases if "eval" in c["programs"]]
  if evs:
    out.append("")
    for c in evs:
      p = c["programs"]["eval"]
      out.append(f"- eval, {c['devices']} devices, {c['preset']}, M={c['members']}"
                 f" ({c.get('eval_member_groups', '?')} member groups): compiled/ideal matmul "
                 f"FLOPs {_redundancy(c, 'eval'):.1f} (per device "
                 f"{_num(p['hlo']['dot_flops_executed'])} vs "
                 f"{_num(c['analytic_flops']['eval'] / c['devices'])} for an even share); "
                 f"collective results {_num(_coll_bytes(p))}B; peak memory "
                 f"{_gb(_peak(c, 'eval'))} GB per device (CPU proxy).")
  return out


def observations(cases: list[dict]) -> list[str]:
  """The prose of "What the compiled programs say", its numbers read from the cases."""
  n = max(c["devices"] for c in cases)
  m = max(c["members"] for c in cases if c["devices"] == n)
  now = {p: _find(cases, n, p, m) for p in PRESETS}
  old = {p: _find(cases, n, f"{p}+{OLD}", m) for p in PRESETS}
  if not all(now.values()) or not all("eval" in c["programs"] for c in now.values()):
    return ["(the full run's cases are needed for this section)"]
  coll = lambda c, k, op: c["programs"][k]["hlo"]["collectives"][op]["bytes_executed"]  # noqa: E731
  red = {p: _redundancy(c, "train") for p, c in now.items()}
  mem = {p: _peak(c, "train") / 1e9 for p, c in now.items()}
  ered = [_redundancy(c, "eval") for c in now.values()]
  emem = [_peak(c, "eval") / 1e9 for c in now.values()]
  groups = now["fsdp"].get("eval_member_groups", 1)
  hbm = {k: v["hbm_GB"] for k, v in HARDWARE.items()}
  fits_train = [k for k in HARDWARE if all(x <= hbm[k] for x in mem.values())]
  fits_eval = [k for k in HARDWARE if max(emem) <= hbm[k]]
  chips = list(HARDWARE)
  tr_time = lambda c, k: c["estimates"][k]["train"]["time_s"]  # noqa: E731
  fsdp_best = all(tr_time(now["fsdp"], k) <= min(tr_time(c, k) for c in now.values())
                  for k in chips)
  by_chunk = defaultdict(list)
  for c in cases:
    if not c.get("variant") and "eval" in c["programs"]:
      k = min(c.get("eval_member_chunk", 16), c["members"] // max(c.get("eval_member_groups", 1), 1))
      by_chunk[k].append(_peak(c, "eval") / 1e9)
  rng = lambda xs, f: (f"{min(xs):{f}}" if f"{min(xs):{f}}" == f"{max(xs):{f}}"  # noqa: E731
                       else f"{min(xs):{f}}–{max(xs):{f}}")
  cfg_chunk = max((int(c.get("eval_member_chunk", 16)) for c in cases), default=16)
  bott = {(k, kind) for c in now.values() for k in chips
          for kind in ("train", "eval") if c["estimates"][k][kind]["bottleneck"] != "HBM"}
  comp_h200 = now["fsdp"]["estimates"]["H200 SXM"]["train"]
  old_txt = lambda f: (f" (before 0c997c6: {f()})" if all(old.values()) else "")  # noqa: E731
  out = [
      f"At {n} devices and {m} members unless stated; all CPU-proxy numbers; the per-case lines "
      "below give the rest.", "",
      f"- **The train step now splits each member's batch over `data`.** Compiled/ideal matmul "
      f"FLOPs are {red['dp']:.2f} (`dp`), {red['fsdp']:.2f} (`fsdp`), {red['fsdp_tp']:.2f} "
      "(`fsdp_tp`)"
      + old_txt(lambda: ", ".join(f"{_redundancy(old[p], 'train'):.2f}" for p in PRESETS))
      + f"; peak memory per device {mem['dp']:.1f} / {mem['fsdp']:.1f} / {mem['fsdp_tp']:.1f} GB"
      + old_txt(lambda: " / ".join(f"{_peak(old[p], 'train') / 1e9:.1f}" for p in PRESETS))
      + ", so the train step fits " + (", ".join(fits_train) or "no chip") + ". "
      f"`dp` all-reduces the gradients over the 8 `data` devices "
      f"({_num(coll(now['dp'], 'train', 'all-reduce'))}B of results per device per step); "
      f"`fsdp` all-gathers the weights at use ({_num(coll(now['fsdp'], 'train', 'all-gather'))}B) "
      f"and all-reduces the gradients ({_num(coll(now['fsdp'], 'train', 'all-reduce'))}B)"
      + old_txt(lambda: f"activation-sized all-reduces of "
                f"{_num(coll(old['fsdp'], 'train', 'all-reduce'))}B") + ". XLA:CPU writes "
      "the gradient reduction as an all-reduce (no reduce-scatter appears in the HLO), which "
      "sends about twice the bytes a reduce-scatter would; collectives are not the bottleneck "
      "of any train estimate, so this does not change the numbers above.",
      f"- **`fsdp_tp` costs more than it saves.** Its `model` axis of 2 adds tensor-parallel "
      f"all-reduces of activations: {_num(coll(now['fsdp_tp'], 'train', 'all-reduce'))}B of "
      f"all-reduce results per device per step against `fsdp`'s "
      f"{_num(coll(now['fsdp'], 'train', 'all-reduce'))}B, and more bytes accessed, for no "
      "memory gain (the train step already fits). "
      + ("`fsdp` (pod_sweep's preset) has the shortest estimated train step on every chip"
         if fsdp_best else "`fsdp` is not the fastest preset on every chip")
      + (", where before 0c997c6 `fsdp_tp` did." if all(old.values()) else "."),
      f"- **The evaluator splits its work over every mesh axis.** `_by_device` gives each of "
      f"the {groups} sweep devices its {m // max(groups, 1)} members, and each member's sample "
      "rows and held-out pairs are constrained to `data` (`Evaluator._on_data`, FSDP weights "
      "gathered at use as in the train step): compiled/ideal matmul FLOPs "
      f"{rng(ered, '.1f')}"
      + old_txt(lambda: ", ".join(f"{_redundancy(old[p], 'eval'):.0f}" for p in PRESETS))
      + " against the ideal of the evaluator's current path (π and π_ref decoded side by "
      "side, each prompt prefilled once, the gold over the response positions after cached "
      "context states; the old program's ratio is against the same ideal, so it includes the "
      "second pass it also ran); collective results per evaluation "
      + ", ".join(f"{_num(_coll_bytes(now[p]['programs']['eval']))}B (`{p}`)" for p in PRESETS)
      + old_txt(lambda: ", ".join(f"{_num(_coll_bytes(old[p]['programs']['eval']))}B" for p in PRESETS))
      + ". Under `fsdp_tp` the `model` axis adds activation all-reduces to the evaluation as "
      "it does to the train step.",
      f"- **The evaluator's memory.** Its peak per device is {rng(emem, '.0f')} GB (all "
      "presets), within the HBM of "
      + (", ".join(fits_eval) or "no chip")
      + old_txt(lambda: ", ".join(f"{_peak(old[p], 'eval') / 1e9:.0f}" for p in PRESETS) + " GB")
      + ". It follows the members one device evaluates at a time, min(`eval.member_chunk`, "
      "M/sweep), and shrinks with the `data` axis: " + "; ".join(
          f"{k} members → {rng(v, '.0f')} GB" for k, v in sorted(by_chunk.items()))
      + " across the compiled cases"
      + (". The old program also did "
         + rng([_redundancy(o, "eval") for o in old.values()], ".0f")
         + "× the ideal work." if all(old.values()) else "."),
      "- **Every estimate is HBM-bound** by XLA:CPU's bytes-accessed count"
      + (f" except {', '.join(f'{k} {kind}' for k, kind in sorted(bott))}" if bott else "")
      + f": e.g. `fsdp` on H200, compute {_fmt_t(comp_h200['t_compute_s'])}, HBM "
      f"{_fmt_t(comp_h200['t_hbm_s'])}, collectives {_fmt_t(comp_h200['t_collectives_s'])} per "
      "step. XLA:CPU fuses less than the TPU/GPU compilers, so the HBM times are pessimistic "
      "and the MFUs low bounds; with perfect fusion the train step would be compute-bound at "
      "the compute column's time.",
      "",
      "## Recommendations (from the estimates above; to be checked on an accelerator)",
      "",
      f"- Keep `fsdp` for pod_sweep: its train step is the cheapest by every estimate and "
      f"needs {mem['fsdp']:.1f} GB per device.",
      (f"- pod_sweep evaluates `eval.member_chunk` = {cfg_chunk} members at a time: the "
       f"evaluator's peak of {rng(emem, '.0f')} GB per device fits {', '.join(fits_eval)} "
       "(CPU proxy). A larger chunk means fewer, larger vmapped matmuls and more memory; "
       "its time was not estimated here."
       if fits_eval else
       f"- Lower pod_sweep's `eval.member_chunk` before a pod run: at {cfg_chunk} the evaluator "
       "does not fit any of the four chips by the CPU proxy."),
  ]
  return out


def _machine() -> dict:
  import importlib.metadata as md
  import bench_sweep   # (the CPU model: one place)
  cpu = bench_sweep.cpu_model(platform.processor() or platform.machine())
  vers = {}
  for pkg in ("jax", "jaxlib", "flax"):
    try:
      vers[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      vers[pkg] = "?"
  vers["python"] = platform.python_version()
  def git(*a):
    try:
      return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True,
                            timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return ""
  dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
           if line[3:].startswith(("gpo_jax/", "configs/"))]
  code = {"commit": git("rev-parse", "--short", "HEAD"), "modified_code_files": dirty}
  return {"cpu": cpu, "code": code, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
          else os.cpu_count(), "platform": platform.platform(), "versions": vers,
          "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def run_worker(devices: int, presets, members, no_eval: bool, timeout: int) -> tuple[list, float]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("JAX_NUM_CPU_DEVICES", None)
  env["PYTHONPATH"] = os.pathsep.join([REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(devices),
         "--presets", ",".join(presets), "--members", ",".join(map(str, members))]
  if no_eval:
    cmd.append("--no-eval")
  t0 = time.time()
  proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
  wall = time.time() - t0
  cases = [json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("CASE ")]
  if proc.returncode != 0:
    raise RuntimeError(f"worker for {devices} devices failed ({proc.returncode}):\n"
                       f"{proc.stderr[-4000:]}")
  return cases, wall


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true",
                  help="64 devices and 64 members only (all presets, train and eval)")
  ap.add_argument("--devices", default="64,256")
  ap.add_argument("--members", default="64,576")
  ap.add_argument("--presets", default=None,
                  help="comma-separated presets, <preset>+old for the pre-0c997c6 programs "
                       f"(default {','.join(PRESETS)})")
  ap.add_argument("--baseline-old", action="store_true",
                  help="also compile <preset>+old (the code before commit 0c997c6: no "
                       "place_on_data, one evaluator member group) for every preset at the "
                       "largest device and member count, for a before/after comparison")
  ap.add_argument("--no-eval", action="store_true", help="compile the train step only")
  ap.add_argument("--out", default=os.path.join(REPO, "experiments"),
                  help="directory for POD_PLAN.md and pod_plan.json")
  ap.add_argument("--timeout", type=int, default=1800, help="per worker, seconds")
  ap.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
  ap.add_argument("--from-json", default="",
                  help="rewrite POD_PLAN.md from an existing pod_plan.json (no compilation)")
  args = ap.parse_args(argv)
  if args.from_json:
    with open(args.from_json) as f:
      result = json.load(f)
    add_estimates(result["cases"])
    result["findings"] = findings(result)
    with open(args.from_json, "w") as f:
      json.dump(result, f, indent=1, default=str)
    write_report(result, os.path.join(os.path.dirname(os.path.abspath(args.from_json)),
                                      "POD_PLAN.md"))
    return result
  if args.worker:
    worker(args)
    return {}
  if args.quick:
    args.devices, args.members = "64", "64"
  devices = [int(v) for v in args.devices.split(",")]
  members = [int(v) for v in args.members.split(",")]
  presets = (args.presets or ",".join(PRESETS)).split(",")
  t0 = time.time()
  machine = _machine()
  cases, walls = [], {}
  for n in devices:   # one worker at a time: one heavy process on the machine
    todo = list(presets)
    if args.baseline_old and n == max(devices):
      todo += [f"{p}+{OLD}" for p in presets if "+" not in p and f"{p}+{OLD}" not in todo]
    got, wall = run_worker(n, todo, members, args.no_eval, args.timeout)
    cases += got
    walls[str(n)] = wall
    print(f"{n} devices: {len(got)} cases in {wall:.0f} s", flush=True)
  add_estimates(cases)
  machine["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
  argv_str = " ".join(["python experiments/pod_plan.py"] + (argv if argv is not None
                                                           else sys.argv[1:]))
  result = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "quick": bool(args.quick), "command": argv_str, "machine": machine,
            "hardware": HARDWARE, "meshes": {str(k): v for k, v in MESHES.items()},
            "cases": cases, "worker_wall_s": walls, "wall_s": time.time() - t0,
            "note": "XLA:CPU compilation of the pod programs on simulated devices: memory, "
                    "cost and collectives are a CPU proxy for the accelerators'; every "
                    "throughput/MFU number is a roofline estimate."}
  result["findings"] = findings(result)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "pod_plan.json"), "w") as f:
    json.dump(result, f, indent=1, default=str)
  write_report(result, os.path.join(args.out, "POD_PLAN.md"))
  print(f"wrote {args.out}/POD_PLAN.md and pod_plan.json in {result['wall_s']:.0f} s")
  return result


if __name__ == "__main__":
  main()
