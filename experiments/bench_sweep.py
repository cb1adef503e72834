"""Benchmarks the GPO sweep step (two member layouts) against sequential runs and HF TRL, and writes a markdown table.

For each sweep size K it measures, in one run on one machine:

  (a) CPU layout: one compiled ``gpo_jax.engine.sweep`` step updating K members, the sweep axis
      over one XLA:CPU device per core and each device looping over its own members (what
      ``gpo_jax.main`` runs on a CPU);
  (a') one vmap: the same step as a single vmap over all K members on one device;
  (b) sequential: the same K member configs run one after another (one compiled K=1 step
      reused for every member, since hyperparameters are traced);
  (c) TRL: HF TRL's ``DPOTrainer`` on a GPT-2 config of the same shape and the same pairs
      (``bench_trl.py`` in its own PyTorch venv; skipped with a message if unavailable).

Throughput is policy updates per second (members x steps / s). Achieved FLOP/s is XLA's
cost analysis of the compiled step divided by the measured step time, shown next to the
analytic matmul count (3 x ``model.flops_per_token`` x the positions the step runs:
each prompt once, both responses after it) and as a fraction of the
machine's float32 matmul ceiling (best of 7 jitted ``jnp.dot`` of 2048^3). The workload is
the ``small`` lab's π_ref and train split with the sweep settings of ``configs/cpu_sweep.py``.

Run (a few minutes on 2 CPU cores, plus the lab build the first time)::

  python experiments/bench_sweep.py --trl-python /work/venv_trl/bin/python \
      --write experiments/BENCH_SWEEP.md
"""

import argparse
import collections
import glob
import gzip
import importlib.util
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax.sharding import NamedSharding, PartitionSpec

from gpo_jax.runtime import cpu as cpu_lib
from gpo_jax.run import config as config_lib
from gpo_jax.core import model as model_lib
from gpo_jax.runtime import sharding as sharding_lib
from gpo_jax.algorithms import gpo
from gpo_jax.core import sequences
from gpo_jax.engine import members as members_lib
from gpo_jax.engine import program

TRL_ENV = "GPO_BENCH_TRL_PYTHON"
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


# ----------------------------------------------------------------------------- machine


def contention_notes(shares, loads, share_tail: str = "rows with a high share understate "
                     "this machine.") -> list[str]:
  """Notes for a report when the machine was shared: other processes' CPU share (``shares``,
  fractions measured by :class:`OtherCpu`, None where not measured) above 10 %, or a 1-min
  load average (``loads``) above 1.25 × the cores."""
  out = []
  shares = [x for x in shares if x is not None]
  if shares and max(shares) > 0.1:
    out.append(f"Other processes took up to {100 * max(shares):.0f} % of the CPU during a "
               f"measurement: {share_tail}")
  cores = os.cpu_count() or 1
  if loads and max(loads) > 1.25 * cores:
    out.append(f"1-min load average reached {max(loads):.1f} on {cores} cores: other "
               "processes shared the CPU, so these numbers understate this machine.")
  return out


def write_outputs(md: str, res: dict, md_path: str | None, json_path: str | None) -> None:
  """Prints the report and writes it (``md_path``) and the raw results (``json_path``)."""
  print(md)
  if md_path:
    with open(md_path, "w") as f:
      f.write(md)
  if json_path:
    with open(json_path, "w") as f:
      json.dump(res, f, indent=1, default=str)


def load_avg() -> tuple[float, float, float]:
  return tuple(round(x, 2) for x in os.getloadavg())


class OtherCpu:
  """Context manager measuring the CPU share other processes took while it was open.

  Busy time of the whole machine (``/proc/stat``: user, nice, system, irq, softirq, steal)
  minus this process's and its waited-for children's CPU time, over wall time x cores.
  Unlike the load average it sees short bursts, so it says whether a number is clean.
  ``share`` is None where ``/proc/stat`` is unreadable.
  """

  @staticmethod
  def _busy_s():
    try:
      with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
      return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

  def __enter__(self):
    self._t, self._busy, self._own = time.perf_counter(), self._busy_s(), sum(os.times()[:4])
    return self

  def __exit__(self, *exc):
    busy = self._busy_s()
    wall = time.perf_counter() - self._t
    own = sum(os.times()[:4]) - self._own
    self.share = (None if busy is None or self._busy is None else
                  max(0.0, (busy - self._busy) - own) / (wall * (os.cpu_count() or 1)))
    return False


def cpu_model(default: str | None = None) -> str:
  """The CPU's model name (``/proc/cpuinfo``; else ``default`` or ``platform.processor()``)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return default or platform.processor() or "unknown"


def machine_info() -> dict:
  """CPU model, core counts and the JAX device kind."""
  model_name = cpu_model()
  dev = jax.devices()[0]
  return {
      "cpu": model_name,
      "cores": os.cpu_count(),
      "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "jax_device": f"{dev.platform}:{dev.device_kind}",
      "n_devices": jax.device_count(),
  }


def matmul_ceiling(n: int = 2048, repeats: int = 7) -> dict:
  """Best-of-``repeats`` float32 ``[n,n] @ [n,n]`` throughput of a jitted ``jnp.dot``.

  Best-of rather than median: the ceiling is what the machine can do, and on a shared
  machine other processes only ever slow a repeat down.
  """
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  flops = 2.0 * n**3
  return {"n": n, "gflops": flops / min(times) / 1e9,
          "gflops_median": flops / statistics.median(times) / 1e9}


def xla_cost(compiled) -> dict:
  """FLOPs and bytes accessed from a compiled executable's cost analysis.

  ``cost_analysis()`` returns a dict in recent JAX and a one-element list of dicts (one per
  program) in older versions; both are accepted.
  """
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  ca = ca or {}
  return {"flops": float(ca.get("flops", float("nan"))),
          "bytes": float(ca.get("bytes accessed", float("nan")))}


# ---------------------------------------------------------------------------- workload


def sweep_config(variant: str):
  """``configs/cpu_sweep.py:<variant>`` (loaded by path): the sweep the benchmark mirrors."""
  path = os.path.join(REPO, "configs", "cpu_sweep.py")
  spec = importlib.util.spec_from_file_location("gpo_cpu_sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


class Workload:
  """What the benchmark trains: π_ref's shape and parameters and the training pairs."""

  def __init__(self, cfg: model_lib.TransformerConfig, policy: model_lib.Transformer,
               pairs: dict, source: str):
    self.cfg = cfg
    self.graphdef, self.params, self.rest = nnx.split(policy, nnx.Param, ...)
    self.pairs = pairs
    self.source = source

  @property
  def n_train(self) -> int:
    return int(self.pairs["prompt"].shape[0])

  @property
  def seq_len(self) -> int:
    """Tokens per sequence, ``P + T``; the policy reads ``seq_len - 1`` of them."""
    return int(self.pairs["prompt"].shape[1] + self.pairs["chosen"].shape[1])


def lab_workload(lab_cfg, lab_dir: str) -> Workload:
  """The built (or now built) lab: π_ref and its train split."""
  from gpo_jax import lab as lab_lib

  lab = lab_lib.build_or_load(lab_lib.LabConfig.from_dict(lab_cfg), lab_dir)
  return Workload(lab.policy_cfg, lab.policy(), dict(lab.pairs("train")),
                  f"lab `{lab_cfg.name}` train split ({os.path.basename(lab.path)})")


def standin_workload(lab_cfg, seed: int = 0) -> Workload:
  """Random pairs and a random policy with the lab's shapes (same compute, no lab build)."""
  from gpo_jax import lab as lab_lib

  full = lab_lib.LabConfig.from_dict(lab_cfg)
  cfg = full.policy_config
  c = full.corpus
  n, p, t, vocab = full.n_train_pairs, c.prompt_len + 2, c.response_len, c.vocab_size
  rng = np.random.default_rng(seed)
  prompt = rng.integers(5, vocab, (n, p)).astype(np.int32)
  prompt[:, 0], prompt[:, -1] = 1, 2  # BOS ... SEP

  def responses():
    lengths = rng.integers(2, t + 1, n)[:, None]
    pos = np.arange(t)[None]
    r = rng.integers(5, vocab, (n, t))
    r = np.where(pos == lengths - 1, 3, np.where(pos < lengths, r, 0))  # ... EOS PAD
    return r.astype(np.int32), (pos < lengths).astype(np.int32)

  chosen, chosen_mask = responses()
  rejected, rejected_mask = responses()
  pairs = {"prompt": prompt, "chosen": chosen, "rejected": rejected,
           "chosen_mask": chosen_mask, "rejected_mask": rejected_mask}
  for k in ("ref_chosen_logps", "ref_rejected_logps"):
    pairs[k] = rng.normal(-30.0, 3.0, n).astype(np.float32)
  for k in ("gold_chosen", "gold_rejected"):
    pairs[k] = rng.normal(0.0, 1.0, n).astype(np.float32)
  policy = model_lib.Transformer(cfg, rngs=nnx.Rngs(seed))
  return Workload(cfg, policy, pairs,
                  f"stand-in with the `{lab_cfg.name}` lab's shapes: random tokens, random "
                  f"π_ref init, N={n}")


def select_members(all_members: members_lib.Members, k: int) -> members_lib.Members:
  """The first K configs of the sweep, taken round-robin over families so K=8 mixes them."""
  if k > all_members.size:
    raise SystemExit(f"K={k} exceeds the {all_members.size} members of the sweep config.")
  rank = np.zeros(all_members.size, int)
  for f in np.unique(all_members.family_idx):
    idx = np.flatnonzero(all_members.family_idx == f)
    rank[idx] = np.arange(idx.size)
  order = np.lexsort((all_members.family_idx, rank))
  return all_members.select(np.sort(order[:k]))


# ------------------------------------------------------------------------------ timing


class CompiledSteps:
  """The sweep step compiled once per member count K (the family table is fixed), in one layout.

  A layout is where and how the K members run: ``devices`` (the sweep mesh axis spans the
  largest count of them that divides K) and ``chunk`` (None: one vmap over each device's
  members; n: each device loops over its members n at a time, ``train.member_chunk``).
  Runs use the compiled executable itself, so the clock never includes a compile and the
  cost analysis describes exactly what ran.
  """

  def __init__(self, wl: Workload, families, tcfg: program.TrainConfig, data: dict, *,
               devices=None, chunk: int | None = None, options: dict | None = None):
    self.wl, self.tcfg, self.families = wl, tcfg, families
    self.host_data = data
    self.devices = list(devices or jax.devices()[:1])
    self.chunk, self.options = chunk, options
    self._cache = {}
    self._placed = {}

  def mesh(self, k: int):
    d = max(n for n in range(1, len(self.devices) + 1) if k % n == 0)
    return sharding_lib.make_mesh({"sweep": d}, devices=self.devices[:d], num_members=k)

  def _shardings(self, members: members_lib.Members):
    k = members.size
    if k not in self._placed:
      mesh = self.mesh(k)
      init = lambda p: program.init_state(p, members, self.tcfg)  # noqa: E731
      state_sh = program.state_shardings(jax.eval_shape(init, self.wl.params), mesh, "dp")
      member_sh = NamedSharding(mesh, PartitionSpec(sharding_lib.SWEEP))
      rep = NamedSharding(mesh, PartitionSpec())
      self._placed[k] = (mesh, state_sh, member_sh, rep, jax.device_put(self.host_data, rep))
    return self._placed[k]

  def init(self, members: members_lib.Members):
    _, state_sh, member_sh, _, _ = self._shardings(members)
    state = jax.device_put(program.init_state(self.wl.params, members, self.tcfg), state_sh)
    hp = jax.device_put(members.hparams(), member_sh)
    jax.block_until_ready((state, hp))
    return state, hp

  def data(self, members: members_lib.Members):
    return self._shardings(members)[4]

  def get(self, members: members_lib.Members):
    """``(compiled, cost, compile_s)`` for ``members.size`` members."""
    k = members.size
    if k not in self._cache:
      mesh, state_sh, member_sh, rep, data = self._shardings(members)
      fn = program.make_train_step(
          gpo.member_loss_fn(self.wl.graphdef, self.wl.rest, self.families, False), self.tcfg,
          member_groups=mesh.shape[sharding_lib.SWEEP], member_chunk=self.chunk)
      jitted = program.jit_train_step(fn, state_sh, mesh, compiler_options=self.options)
      state, hp = self.init(members)
      t0 = time.perf_counter()
      compiled = jitted.lower(state, hp, data).compile()
      self._cache[k] = (compiled, xla_cost(compiled), time.perf_counter() - t0)
    return self._cache[k]

  def run(self, members, state, hp, n: int):
    compiled = self.get(members)[0]
    data = self.data(members)
    for _ in range(n):
      state, metrics = compiled(state, hp, data)
    jax.block_until_ready((state, metrics))
    return state


def time_vectorised(steps: CompiledSteps, members: members_lib.Members, block_s: float,
                    repeats: int) -> dict:
  """Median over ``repeats`` blocks of the per-step time of the K-member step.

  A block is as many consecutive steps as fit in about ``block_s`` seconds (at least one),
  judged from a warm-up step, so small and large K get similar timing precision.
  """
  _, cost, compile_s = steps.get(members)
  state, hp = steps.init(members)
  state = steps.run(members, state, hp, 1)
  t0 = time.perf_counter()
  state = steps.run(members, state, hp, 1)
  n = max(1, int(block_s / (time.perf_counter() - t0)))
  per_step = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state = steps.run(members, state, hp, n)
    per_step.append((time.perf_counter() - t0) / n)
  sec = statistics.median(per_step)
  return {"s_per_step": sec, "updates_per_s": members.size / sec,
          "xla_flops": cost["flops"], "xla_bytes": cost["bytes"],
          "compile_s": compile_s, "block_steps": n,
          "spread": (min(per_step), max(per_step))}


def time_sequential(steps: CompiledSteps, members: members_lib.Members, n_steps: int) -> dict:
  """The K configs one after another, each a fresh K=1 run of ``n_steps`` steps from π_ref.

  One compiled K=1 step serves every member (hyperparameters are traced), so compilation
  and a warm-up happen once, before the clock starts, as they would in a long run.
  """
  first = members.select([0])
  _, cost, _ = steps.get(first)
  steps.run(first, *steps.init(first), 2)
  total = 0.0
  for m in range(members.size):
    one = members.select([m])
    state, hp = steps.init(one)
    t0 = time.perf_counter()
    steps.run(one, state, hp, n_steps)
    total += time.perf_counter() - t0
  sec = total / (members.size * n_steps)  # seconds per single-member update
  return {"s_per_step": sec * members.size, "updates_per_s": 1.0 / sec,
          "xla_flops": cost["flops"] * members.size, "xla_bytes": cost["bytes"] * members.size}


def step_matmul_shapes(cfg: model_lib.TransformerConfig, n_pairs: int, p: int, t: int) -> list:
  """Every matmul of one member's train step on ``n_pairs`` pairs as ``(count, batch, m, k, n)``.

  The step runs each ``p``-token prompt once and both responses' ``t − 1`` read positions
  after it (``model.prompt_response_logprobs``). Forward, per part (prompt, responses): QKV,
  attention scores and values, output projection, MLP up/down per layer; the unembedding at
  the prompt's last position and the response positions. Backward: for each forward
  ``X[m,k] @ W[k,n]`` the input gradient ``[m,n] @ [n,k]`` and the weight gradient
  ``[k,m] @ [m,n]`` (attention: both operand gradients, same shapes as the forward pair).
  """
  d, f, h, v = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.vocab_size
  hd, nl = cfg.head_dim, cfg.n_layers
  parts = [(n_pairs, p, p)]                                   # (rows, positions, keys)
  if t > 1:
    parts.append((2 * n_pairs, t - 1, p + t - 1))
  dense, att = [], []
  for rows, pos, keys in parts:
    tok = rows * pos
    dense += [(nl, tok, d, 3 * d), (nl, tok, d, d), (nl, tok, d, f), (nl, tok, f, d)]
    att += [(nl, rows * h, pos, hd, keys), (nl, rows * h, pos, keys, hd)]
  dense.append((1, n_pairs + 2 * n_pairs * (t - 1), d, v))
  shapes = []
  for c, m, k, n in dense:
    shapes += [(c, 1, m, k, n), (c, 1, m, n, k), (c, 1, k, m, n)]
  for c, b, m, k, n in att:
    shapes += [(3 * c, b, m, k, n)]
  return shapes


def step_analytic_flops(cfg: model_lib.TransformerConfig, n_pairs: int, p: int, t: int) -> int:
  """Analytic FLOPs of one member's train step (forward + backward = 3 forwards) on
  ``n_pairs`` pairs: the prompt's ``p`` positions once, both responses' ``t − 1`` after it
  (``experiments/bench_accel.py``'s ``step_flops``, the same count)."""
  return 3 * (model_lib.flops_per_token(cfg, p) * n_pairs * p
              + model_lib.flops_per_token(cfg, p + t - 1) * 2 * n_pairs * (t - 1))


def shape_matmul_rate(cfg, n_pairs: int, p: int, t: int, k_members: int,
                      repeats: int = 5) -> dict:
  """Throughput of the step's own matmul shapes (K-batched as under vmap), each timed alone.

  Answers "how fast could this step go if it were nothing but its matmuls": the summed
  FLOPs over the summed best-of-``repeats`` times of every matmul in
  :func:`step_matmul_shapes`.
  """
  total_flops = total_s = 0.0
  key = jax.random.key(1)
  for count, b, m, k, n in step_matmul_shapes(cfg, n_pairs, p, t):
    bb = b * k_members
    x = jax.random.normal(key, (bb, m, k), jnp.float32)
    w = jax.random.normal(key, (bb, k, n), jnp.float32)
    mm = jax.jit(lambda a, c: jnp.einsum("bmk,bkn->bmn", a, c))
    mm(x, w).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      mm(x, w).block_until_ready()
      best = min(best, time.perf_counter() - t0)
    total_flops += count * 2.0 * bb * m * k * n
    total_s += count * best
  return {"flops": total_flops, "s": total_s, "gflops": total_flops / total_s / 1e9}


def _hlo_kinds(hlo_text: str) -> dict[str, str]:
  """Maps every instruction name of an HLO module to a coarse kind of work.

  A fusion is a matmul if its fused computation contains a ``dot``/``convolution``, a
  layout copy if it contains a ``copy``/``transpose`` (XLA fuses the neighbouring
  elementwise work into it), and elementwise otherwise; ``sort``, ``scatter`` and
  ``gather`` keep their own kinds.
  """
  bodies, current = {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%(\S+) \(", line)
    if head:
      current = head.group(1)
      bodies[current] = []
    elif current is not None:
      bodies[current].append(line)
  kinds = {}
  for lines in bodies.values():
    for line in lines:
      m = re.match(r"\s*(?:ROOT )?%(\S+) = .*? ([a-z\-]+)\(", line)
      if not m:
        continue
      name, op = m.groups()
      called = re.search(r"calls=%([\w.\-]+)", line)
      body = "\n".join(bodies.get(called.group(1), [])) if called else line
      if re.search(r" (dot|convolution)\(", body) or op in ("dot", "convolution"):
        kinds[name] = "matmul"
      elif " sort(" in body or op == "sort":
        kinds[name] = "sort (batch sampling)"
      elif " scatter(" in body or op == "scatter":
        kinds[name] = "scatter"
      elif " gather(" in body or op == "gather":
        kinds[name] = "gather"
      elif re.search(r" (copy|transpose)\(", body) or op in ("copy", "transpose"):
        kinds[name] = "layout copy (+ fused elementwise)"
      else:
        kinds[name] = "elementwise / reduce"
  return kinds


def op_time_breakdown(steps: "CompiledSteps", members: members_lib.Members, n_steps: int = 3) -> dict:
  """Share of the step's summed op time by kind of work, from a ``jax.profiler`` trace.

  Durations of the executable's ops are summed over ``n_steps`` traced steps and grouped by
  :func:`_hlo_kinds`; ops run on several threads at once, so the shares, not the sums, are
  what compares with the step time.
  """
  compiled = steps.get(members)[0]
  kinds = _hlo_kinds(compiled.as_text())
  state, hp = steps.init(members)
  state = steps.run(members, state, hp, 1)
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      steps.run(members, state, hp, n_steps)
    files = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
    if not files:
      raise RuntimeError("the profiler wrote no perfetto trace")
    with gzip.open(files[0]) as f:
      events = json.load(f)["traceEvents"]
  by_kind = collections.Counter()
  for e in events:
    kind = kinds.get(str(e.get("name", "")).split(" ")[0])
    if e.get("ph") == "X" and kind:
      by_kind[kind] += float(e.get("dur", 0.0))
  total = sum(by_kind.values())
  if not total:
    raise RuntimeError("no op of the step appeared in the trace")
  return {k: v / total for k, v in by_kind.most_common()}


# --------------------------------------------------------------------------------- TRL


def make_trl_venv(path: str) -> str:
  """Creates ``path`` with the CPU PyTorch wheel first, then trl; returns its python."""
  py = os.path.join(path, "bin", "python")
  if not os.path.exists(py):
    subprocess.run(["python3.11", "-m", "venv", path], check=True)
  pip = [py, "-m", "pip", "install", "-q"]
  # torch first: with the CPU wheel already satisfying trl's requirement, pip pulls no CUDA.
  subprocess.run(pip + ["torch==2.13.0"], check=True)
  subprocess.run(pip + ["trl", "transformers", "datasets"], check=True)
  listing = subprocess.run([py, "-m", "pip", "list"], capture_output=True, text=True).stdout
  cuda = [line.split()[0] for line in listing.splitlines() if line.lower().startswith("nvidia-")]
  if cuda:
    print(f"warning: CUDA packages landed in {path}: {cuda}", file=sys.stderr)
  return py


def export_pairs(wl: Workload, n: int, tcfg: program.TrainConfig, beta: float, lr: float,
                 path: str) -> None:
  """Writes the first ``n`` training pairs and the policy shape for bench_trl.py."""
  c = wl.cfg
  meta = {"vocab_size": c.vocab_size, "d_model": c.d_model, "n_layers": c.n_layers,
          "n_heads": c.n_heads, "d_ff": c.d_ff, "max_len": c.max_len,
          "tie_embeddings": c.tie_embeddings, "batch_size": tcfg.batch_size, "beta": beta,
          "lr": lr, "grad_clip": tcfg.grad_clip}
  keys = ("prompt", "chosen", "rejected", "chosen_mask", "rejected_mask")
  np.savez(path, meta=json.dumps(meta), **{k: np.asarray(wl.pairs[k][:n]) for k in keys})


def run_trl(python: str | None, npz: str, warmup: int, steps: int, timeout: int) -> dict:
  """Runs bench_trl.py in the TRL venv; a dict with ``ok`` False and a reason if it cannot."""
  if not python:
    return {"ok": False, "reason": f"no TRL python (pass --trl-python, set ${TRL_ENV}, "
                                   f"or --make-trl-venv DIR)"}
  if not os.path.exists(python):
    return {"ok": False, "reason": f"TRL python {python} does not exist"}
  out = npz + ".json"
  cmd = [python, os.path.join(HERE, "bench_trl.py"), "--data", npz, "--out", out,
         "--warmup", str(warmup), "--steps", str(steps)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"ok": False, "reason": f"bench_trl.py exceeded {timeout} s"}
  if proc.returncode != 0 or not os.path.exists(out):
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"ok": False, "reason": f"bench_trl.py failed (rc={proc.returncode}): {' | '.join(tail)}"}
  with open(out) as f:
    return json.load(f)


# ------------------------------------------------------------------------------ report


def _pct(x) -> str:
  return "n/a" if x is None else f"{100 * x:.0f} %"


def render(res: dict) -> str:
  """The markdown report of one benchmark run."""
  m, ceil, trl, w = res["machine"], res["ceiling"], res["trl"], res["workload"]
  trl_ok = trl.get("ok", False)
  lines = [
      "# Sweep benchmark: the sweep step (two layouts) vs sequential runs vs HF TRL",
      "",
      f"Written by `experiments/bench_sweep.py` at {res['date']}; how to run it and what it "
      "measures: `experiments/README.md`.",
      "",
      f"- **Command:** `{res['command']}` (wall time {res['wall_s']:.0f} s)",
      f"- **Machine:** {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), JAX "
      f"device `{m['jax_device']}`. Float32 matmul ceiling **{ceil['gflops']:.1f} GFLOP/s** "
      f"(jitted `jnp.dot` {ceil['n']}³, best of 7; median {ceil['gflops_median']:.1f})"
      + (f"; PyTorch's {ceil['n']}³ matmul: {trl['torch_matmul_gflops']:.1f} GFLOP/s." if trl_ok else "."),
      f"- **Load average (1/5/15 min):** start {res['load_start']}, after each K "
      f"{[r['load'] for r in res['by_k'].values()]}, after TRL {res['load_trl']}.",
      f"- **Versions:** {res['versions']}.",
      f"- **Workload:** {w['source']}. Policy {w['cfg']} ({w['n_params']:,} params); "
      f"{w['batch_size']} pairs per member per step = {w['tokens_per_update']:,} tokens "
      f"(each {w['prompt_len']}-token prompt run once, both {w['seq_len'] - w['prompt_len']}-token "
      f"responses read after it: {w['prompt_len']} + 2 × {w['seq_len'] - w['prompt_len'] - 1} "
      f"positions per pair; TRL runs both {w['seq_len']}-token sequences whole); analytic "
      f"train FLOPs per member-update {w['analytic_flops_per_update'] / 1e9:.3f} G "
      f"(3 × `model.flops_per_token` × those positions). Members: the first K configs of "
      f"`configs/cpu_sweep.py` ({w['members_note']}).",
      f"- **Layouts:** (a) is what `python -m gpo_jax.main` runs on a CPU (`configs/cpu_sweep.py`: "
      f"`mesh.cpu_devices=-1` gives one XLA:CPU device per core, `mesh.sweep=-1` puts the "
      f"sweep axis over them, `train.member_chunk=1` makes each device loop over its own "
      f"members); (a′) is one vmap over all members on one device (the accelerator layout, "
      f"`member_chunk=0`). Both use `gpo_jax.runtime.cpu.compiler_options()`: {res['compiler_options']}. "
      f"XLA GFLOP/step is K × the cost analysis of the one-member step (XLA counts a loop "
      f"body once).",
      f"- **Timing:** (a), (a′) compile, 2 warm-up steps, then the median of {res['repeats']} blocks "
      f"of consecutive steps (~{res['block_s']} s each); (b) one shared compile + warm-up, then "
      f"each of the K configs run from π_ref for {res['seq_steps']} steps, one after another; "
      f"(c) median of {res['trl_steps']} DPOTrainer steps after {res['trl_warmup']} warm-up "
      f"steps, clocked between `on_step_end` callbacks (collation and optimizer included); "
      f"the fastest of {res['trl_repeats']} TRL runs counts"
      + (f" (medians {trl['all_ms_per_step']} ms)" if trl_ok else "") + ".",
      "- **other procs' CPU:** share of the 2 cores that other processes used while that row "
      "was measured (from `/proc/stat` minus this process and its children); near 0 % means "
      "a clean number.",
  ]
  if trl_ok:
    lines.append(
        f"- **TRL setup:** GPT-2 config of the same shape ({trl['n_params']:,} params; GPT-2 "
        f"adds biases and LayerNorm), the same token ids (first {res['trl_pairs']} train pairs), "
        f"batches padded to the same length (input {trl['batch_input_shape']}), float32, no "
        f"gradient checkpointing, `precompute_ref_log_probs=True` (our step reads the "
        f"reference log-probs from the dataset too), `loss_type=sigmoid`, β and lr of member 0, "
        f"`{trl['optim']}`, {trl['torch_threads']} torch threads.")
  else:
    lines.append(f"- **TRL skipped:** {trl.get('reason')}")
  trl_ups = trl["updates_per_s"] if trl_ok else None
  for k, row in res["by_k"].items():
    lines += ["", f"## K = {k}", "",
              "| run | policy updates/s | ms/step | XLA GFLOP/step | XLA GFLOP/s | % of ceiling "
              "| analytic GFLOP/s | speed-up vs TRL | other procs' CPU |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    looped_label = (f"(a) gpo_jax CPU layout: {row['looped']['devices']} device(s), each "
                    "looping over its members")
    for label, r in ((looped_label, row["looped"]),
                     ("(a′) one vmap over all K members, 1 device", row["vectorised"]),
                     ("(b) sequential, K runs one after another", row["sequential"])):
      sec = r["s_per_step"]
      xla_gf = r["xla_flops"] / sec / 1e9
      an_gf = int(k) * w["analytic_flops_per_update"] / sec / 1e9
      speed = f"{r['updates_per_s'] / trl_ups:.2f}×" if trl_ups else "n/a"
      lines.append(f"| {label} | {r['updates_per_s']:.1f} | {1e3 * sec:.1f} | "
                   f"{r['xla_flops'] / 1e9:.2f} | {xla_gf:.1f} | {100 * xla_gf / ceil['gflops']:.0f} % | "
                   f"{an_gf:.1f} | {speed} | {_pct(r.get('other_cpu'))} |")
    if trl_ups:
      an_gf = w["analytic_flops_per_update_trl"] * trl_ups / 1e9
      lines.append(f"| (c) TRL DPOTrainer, 1 policy | {trl_ups:.1f} | {trl['ms_per_step']:.1f} | "
                   f"n/a | n/a | {100 * an_gf / ceil['gflops']:.0f} % (analytic) | {an_gf:.1f} | 1.00× | "
                   f"{_pct(trl.get('other_cpu'))} |")
    else:
      lines.append("| (c) TRL DPOTrainer | skipped | | | | | | | |")
    d, v = row["diag"], row["vectorised"]
    lines += ["", f"Where the time goes (K={k}, (a′) one vmap): the step's own matmuls, K-batched "
              f"and timed one by one, run at {d['gflops']:.1f} GFLOP/s "
              f"({100 * d['gflops'] / ceil['gflops']:.0f} % of the {ceil['n']}³ ceiling) and "
              f"add up to {1e3 * d['s']:.1f} ms of the {1e3 * v['s_per_step']:.1f} ms step "
              f"({100 * d['s'] / v['s_per_step']:.0f} %)"
              + (". Profiled op time by kind: " + ", ".join(
                  f"{kind} {100 * share:.0f} %" for kind, share in d["op_share"].items()
                  if share >= 0.005) if d.get("op_share") else "")
              + f"; XLA counts "
              f"{v['xla_bytes'] / 1e6:.0f} MB accessed per step "
              f"({v['xla_flops'] / v['xla_bytes']:.1f} FLOP/byte). Compile {v['compile_s']:.1f} s; "
              f"per-step spread over blocks {1e3 * v['spread'][0]:.1f}–{1e3 * v['spread'][1]:.1f} ms "
              f"({v['block_steps']} steps per block)."]
  lines += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
  return "\n".join(lines) + "\n"


def target_notes(by_k: dict, trl: dict, ceiling: dict, layout: str = "looped") -> list[str]:
  """Lines saying whether the issue's targets were met (≥ 2× TRL, ≥ 60 % of the ceiling).

  Judged on ``layout`` (default: (a), what ``gpo_jax.main`` runs on a CPU).
  """
  notes = []
  name = {"looped": "(a) CPU layout", "vectorised": "(a′) one vmap"}[layout]
  pct = {k: 100 * r[layout]["xla_flops"] / r[layout]["s_per_step"] / 1e9
         / ceiling["gflops"] for k, r in by_k.items()}
  best_k = max(pct, key=pct.get)
  notes.append(f"Target ≥ 60 % of the matmul ceiling in the train step: best {pct[best_k]:.0f} % "
               f"({name}, K={best_k}) — {'met' if pct[best_k] >= 60 else 'missed'}.")
  if trl.get("ok"):
    speed = {k: r[layout]["updates_per_s"] / trl["updates_per_s"] for k, r in by_k.items()}
    parts = ", ".join(f"K={k}: {v:.1f}×" for k, v in speed.items())
    met = [k for k, v in speed.items() if v >= 2]
    verdict = ("met at every K" if len(met) == len(speed) else
               "missed at every K" if not met else f"met only at K={','.join(met)}")
    notes.append(f"Target ≥ 2× TRL's per-policy-update throughput ({name}): {parts} — "
                 f"{verdict}.")
  return notes


# -------------------------------------------------------------------------------- main


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--lab", default="small", help="lab variant of configs/lab.py (tiny|small|large)")
  ap.add_argument("--lab-dir", default=os.path.join(REPO, "runs", "labs"),
                  help="where labs are cached/built (main.py's default for runs/<name>)")
  ap.add_argument("--standin", action="store_true",
                  help="random tokens and a random policy with the lab's shapes (no lab build)")
  ap.add_argument("--ks", default="1,8,32", help="comma-separated sweep sizes K")
  ap.add_argument("--block-s", type=float, default=1.0, help="seconds per timed block in (a)")
  ap.add_argument("--repeats", type=int, default=5, help="timed blocks in (a); median reported")
  ap.add_argument("--seq-steps", type=int, default=10, help="steps per member in (b)")
  ap.add_argument("--trl-python", default=os.environ.get(TRL_ENV),
                  help=f"python of a venv with torch + trl (default: ${TRL_ENV})")
  ap.add_argument("--make-trl-venv", metavar="DIR", default=None,
                  help="first create the TRL venv at DIR (torch==2.13.0 CPU wheel, then trl)")
  ap.add_argument("--trl-warmup", type=int, default=3)
  ap.add_argument("--trl-steps", type=int, default=60)
  ap.add_argument("--trl-repeats", type=int, default=2, help="TRL runs; the fastest median counts")
  ap.add_argument("--no-trl", action="store_true", help="skip (c)")
  ap.add_argument("--devices", type=int, default=0,
                  help="XLA:CPU devices for layout (a) (default: one per available core)")
  ap.add_argument("--write", default=None, metavar="MD", help="write the markdown report here")
  ap.add_argument("--json", default=None, help="also dump the raw results as JSON")
  args = ap.parse_args(argv)
  try:
    ks = [int(k) for k in args.ks.split(",")]
  except ValueError:
    ks = [0]
  if any(k < 1 for k in ks):
    raise SystemExit(f"--ks must be comma-separated positive integers, got {args.ks!r}")

  # Before any JAX computation: the CPU device count is fixed when the backend starts.
  n_devices = args.devices or cpu_lib.available_cores()
  jax.config.update("jax_num_cpu_devices", n_devices)
  t_start = time.perf_counter()
  command = " ".join(shlex.quote(a) for a in ["python", os.path.relpath(__file__, REPO)]
                     + sys.argv[1:])
  load_start = load_avg()
  print(f"load average at start: {load_start}", flush=True)
  if args.make_trl_venv:
    args.trl_python = make_trl_venv(args.make_trl_venv)

  config = sweep_config(args.lab)
  wl = standin_workload(config.lab) if args.standin else lab_workload(config.lab, args.lab_dir)
  tcfg = config_lib.train_config(config)
  lr = float(config.sweep.lrs[0])
  all_members = config_lib.algorithm(config).members(config, n_train=wl.n_train)
  if len(set(all_members.lr)) != 1:
    raise SystemExit("the benchmark assumes one learning rate in the sweep config.")
  data = sequences.pair_arrays(wl.pairs)
  n_pairs, p_len = tcfg.batch_size, int(wl.pairs["prompt"].shape[1])
  t_len = wl.seq_len - p_len

  ceiling = matmul_ceiling()
  print(f"matmul ceiling: {ceiling['gflops']:.1f} GFLOP/s", flush=True)

  # Layouts share one family table (the whole sweep's), so only the member count changes
  # a compiled shape. XLA's cost analysis counts a loop body once, so every row's XLA
  # FLOPs are K x those of the one-member, one-device step.
  options = cpu_lib.compiler_options()
  looped = CompiledSteps(wl, all_members.families, tcfg, data, devices=jax.devices(),
                         chunk=1, options=options)
  vmapped = CompiledSteps(wl, all_members.families, tcfg, data, devices=jax.devices()[:1],
                          options=options)
  one = select_members(all_members, 1)
  per_member = vmapped.get(one)[1]
  by_k = {}
  for k in ks:
    members = select_members(all_members, k)
    row = {}
    for name, steps in (("looped", looped), ("vectorised", vmapped)):
      steps.get(members)  # compile outside the meters
      with OtherCpu() as meter:
        row[name] = time_vectorised(steps, members, args.block_s, args.repeats)
      row[name]["other_cpu"] = meter.share
      row[name]["devices"] = int(steps.mesh(k).shape[sharding_lib.SWEEP])
    with OtherCpu() as meter:
      row["sequential"] = time_sequential(vmapped, members, args.seq_steps)
    row["sequential"]["other_cpu"] = meter.share
    for r in row.values():
      r["xla_flops"], r["xla_bytes"] = k * per_member["flops"], k * per_member["bytes"]
    diag = shape_matmul_rate(wl.cfg, n_pairs, p_len, t_len, k)
    try:
      diag["op_share"] = op_time_breakdown(vmapped, members)
    except Exception as e:  # the profiler is a diagnostic; the benchmark stands without it
      diag["op_share"] = {}
      print(f"op-time breakdown unavailable: {e!r}", file=sys.stderr)
    row.update(diag=diag, load=load_avg())
    by_k[str(k)] = row
    print(f"K={k}: looped on {row['looped']['devices']} devices "
          f"{row['looped']['updates_per_s']:.1f} upd/s, vectorised "
          f"{row['vectorised']['updates_per_s']:.1f} upd/s, sequential "
          f"{row['sequential']['updates_per_s']:.1f} upd/s, load {row['load']}", flush=True)

  trl = {"ok": False, "reason": "--no-trl given"}
  n_trl = tcfg.batch_size * (args.trl_warmup + args.trl_steps)
  if not args.no_trl:
    if n_trl > wl.n_train:
      raise SystemExit(f"TRL needs {n_trl} pairs, the workload has {wl.n_train}; lower --trl-steps.")
    with tempfile.TemporaryDirectory() as tmp:
      npz = os.path.join(tmp, "pairs.npz")
      export_pairs(wl, n_trl, tcfg, float(select_members(all_members, 1).beta[0]), lr, npz)
      # TRL's eager 2-thread OpenMP steps are the most sensitive to other processes, so it
      # runs --trl-repeats times and the fastest median counts (all are recorded).
      runs = []
      for _ in range(args.trl_repeats):
        with OtherCpu() as meter:
          r = run_trl(args.trl_python, npz, args.trl_warmup, args.trl_steps, timeout=900)
        r["other_cpu"] = meter.share
        runs.append(r)
        if not r.get("ok"):
          break
      ok = [r for r in runs if r.get("ok")]
      trl = dict(min(ok, key=lambda r: r["ms_per_step"])) if ok else runs[-1]
      trl["all_ms_per_step"] = [round(r["ms_per_step"], 2) for r in ok]
      trl["all_other_cpu"] = [r["other_cpu"] for r in ok]
    print("TRL:", trl.get("updates_per_s", trl.get("reason")), flush=True)
  load_trl = load_avg()

  c = wl.cfg
  fam_names = [gpo.family_name(f) for f in all_members.families]
  res = {
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      "command": command,
      "machine": machine_info(),
      "compiler_options": options,
      "ceiling": ceiling,
      "load_start": load_start,
      "load_trl": load_trl,
      "versions": (f"python {platform.python_version()}, jax {jax.__version__}, "
                   f"flax {flax.__version__}, optax {optax.__version__}"
                   + (f"; TRL venv: torch {trl['versions']['torch']}, transformers "
                      f"{trl['versions']['transformers']}, trl {trl['versions']['trl']}"
                      if trl.get("ok") else "")),
      "workload": {
          "source": wl.source,
          "cfg": f"V={c.vocab_size} d={c.d_model} layers={c.n_layers} heads={c.n_heads} "
                 f"d_ff={c.d_ff}",
          "n_params": model_lib.param_count(wl.params),
          "batch_size": tcfg.batch_size,
          "seq_len": wl.seq_len,
          "prompt_len": p_len,
          "tokens_per_update": n_pairs * (p_len + 2 * (t_len - 1)),
          "analytic_flops_per_update": step_analytic_flops(wl.cfg, n_pairs, p_len, t_len),
          # TRL feeds all P+T tokens (and shifts the logits afterwards).
          "analytic_flops_per_update_trl": 3 * model_lib.flops_per_token(c, wl.seq_len)
                                           * 2 * n_pairs * wl.seq_len,
          "members_note": f"{all_members.size} members, families {fam_names} round-robin, "
                          f"lr {lr:g}, Adam b2 {tcfg.b2}, clip {tcfg.grad_clip}",
      },
      "repeats": args.repeats, "block_s": args.block_s, "seq_steps": args.seq_steps,
      "trl_steps": args.trl_steps, "trl_warmup": args.trl_warmup,
      "trl_repeats": args.trl_repeats, "trl_pairs": n_trl,
      "by_k": by_k, "trl": trl, "notes": [],
  }
  res["notes"] += target_notes(by_k, trl, ceiling)
  shares = [r[k].get("other_cpu") for r in by_k.values()
            for k in ("looped", "vectorised", "sequential")]
  res["notes"] += contention_notes(
      shares + [trl.get("other_cpu")],
      [load_start[0], load_trl[0]] + [r["load"][0] for r in by_k.values()])
  res["wall_s"] = time.perf_counter() - t_start
  write_outputs(render(res), res, args.write, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
