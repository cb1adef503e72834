"""Accelerator benchmark of the offline-GPO sweep step: one vmap over K members vs sequential runs, MFU, evaluation share.

Runs unchanged on whatever backend JAX finds (GPU, TPU, or CPU for a smoke run) on ONE
device, for the model shape of a lab preset (``gpo_jax.lab.presets.lab_config``). No lab is
built and nothing is learned: π_ref-shaped parameters are initialised randomly and the
preference pairs are random tokens of the lab's shapes (``bench_sweep.standin_workload``).
The train and eval settings (batch size, optimizer, eval sizes and cadence) are those of the
lab's default run config: ``configs/pod_sweep.py`` for ``large``, ``configs/cpu_sweep.py``
for ``small``/``tiny``. Per compute dtype (``TransformerConfig.dtype``: bfloat16 and
float32; parameters, norms, softmaxes and logits stay float32 either way) it measures:

  (a) vmapped: ``gpo_jax.engine.program.make_train_step`` with the offline-GPO loss as ONE
      vmap over K members (``member_chunk=0``, K = 64 by default) on one device; policy
      updates/s = K x steps/s. Median over blocks of consecutive steps after compile and a
      warm-up step (``bench_sweep.time_vectorised``).
  (b) sequential: the same K configs one after another, each a fresh K=1 run from π_ref of
      ``--seq-steps`` steps, all K of them timed (nothing extrapolated), with one compiled
      K=1 step (hyperparameters are traced, so nothing recompiles; compiled and warmed up
      before the clock starts; ``bench_sweep.time_sequential``).
  (c) MFU: analytic model FLOPs of a step over the step time over the device's peak.
  (d) evaluation share: the real ``gpo_jax.evaluation.policy.Evaluator`` (constructed
      directly, with the random policy as π_ref and a randomly initialised gold
      ``RewardModel`` of the lab's gold shape and gold kind, corpus likelihood tables
      included) evaluating the K members -- member sampling (``gpo_jax.core.sampling.sample``,
      K x n_prompts x samples_per_prompt), policy and π_ref log-probs/KL, gold scoring and the
      offline diagnostics on the held-out pairs -- against the ``eval.every`` train steps
      between two evaluations: share = t_eval / (t_eval + every x t_step). The one-time
      π_ref pool (``Evaluator.reference``, best-of-n baseline) is timed separately.

Memory: K members' activations are held at once. If the compiled K-member step needs more
than 95 % of the device's memory (``compiled.memory_analysis()`` against the allocator's
``bytes_limit``) or fails with RESOURCE_EXHAUSTED, the per-member batch is halved until it
fits and the table says so; (b) then uses the same batch, so the comparison stays fair. (On
XLA:CPU the ``large`` step at K = 64 and the pod config's batch 256 needs ~165 GiB of
temporaries; an H200 has ~141 GB.)

Analytic FLOPs (what is counted). Per member and step the policy runs each of the
``batch_size`` prompts (``P`` tokens) once and both responses (chosen and rejected) after it
(``gpo_jax.core.model.prompt_response_logprobs``): the response positions the policy reads
are ``T - 1`` each, so the step runs ``tokens = batch_size x (P + 2 (T - 1))`` positions
(two whole sequences per pair would be ``2 (P + T - 1)``). With ``N`` the matmul weights of
the policy, ``N = n_layers (3 d^2 + d^2 + 2 d d_ff) + d V`` (fused QKV, attention output,
MLP up and down, unembedding; the embedding tables are gathered, not multiplied, and norm
scales are elementwise, so neither is in ``N``), and ``S`` the keys a position attends over
(``P`` for a prompt position, ``P + T - 1`` for a response position: the full masked score
matrix, not skipped)::

    forward  = 2 N tokens + n_layers * 4 d * sum over positions of S
    step     = 3 x forward      (backward = 2 x forward: input and weight gradients of every
               matmul, the first layer's input gradient included since the embeddings are
               trained)
    + reference forward:  NOT executed and NOT counted -- the offline-GPO step reads π_ref's
      log-probs from the dataset (gpo_jax/algorithms/gpo.py), so the frozen reference never
      runs in the train step (``ref_fwd = 0`` in the JSON).

The unembedding is counted at every position (the step computes it at the prompt's last
one only; ``P - 1`` positions of ``2 d V`` FLOPs each per pair, under 1 % here).
Softmax, GELU, norms, the loss and Adam are not matmuls and are not counted (XLA's count
includes them, so ``xla / analytic`` is slightly above 1). The analytic count equals
``3 x gpo_jax.core.model.flops_per_token`` summed over the positions (checked at run time). It is
cross-checked against ``jax.jit(step).lower(...).compile().cost_analysis()['flops']`` of the
very executable that is timed; MFU = K x analytic / t_step / peak.

Peak FLOP/s (dense, no sparsity; one device) by ``jax.devices()[0].device_kind`` in
:data:`PEAKS` with the published source of each. The peak of a row is that of the dtype its
matmuls actually run in: bf16 rows the BF16 peak; float32 rows under JAX's default matmul
precision run on TF32 tensor cores on Ampere/Hopper GPUs and as one bfloat16 pass on TPUs
(https://docs.jax.dev/en/latest/201/precision.html), so their peak is TF32 (GPU) or BF16
(TPU), or FP32 if ``jax_default_matmul_precision`` is ``highest``/``float32``. An unknown
device (including any CPU) gets MFU n/a and the achieved FLOP/s only.

Run on an accelerator (one command; writes experiments/BENCH_ACCEL.md and .json)::

  python experiments/bench_accel.py --lab large --write

CPU smoke run (seconds; the report says it is not the accelerator result)::

  python experiments/bench_accel.py --lab tiny --quick --write /tmp/bench_accel.md
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time

# Before JAX starts: let the benchmark use most of an accelerator's memory (JAX's GPU
# default preallocates 75 %); a caller's own setting wins.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import flax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
  sys.path.insert(0, HERE)

import bench_sweep as bs  # noqa: E402  (the sweep benchmark's workload and timing pieces)

from gpo_jax.algorithms import gpo  # noqa: E402
from gpo_jax.core import model as model_lib  # noqa: E402
from gpo_jax.core import sequences  # noqa: E402
from gpo_jax.evaluation import policy as policy_eval  # noqa: E402
from gpo_jax.lab import config as lab_config_lib  # noqa: E402
from gpo_jax.lab import corpus as corpus_lib  # noqa: E402
from gpo_jax.lab import gold as gold_lib  # noqa: E402
from gpo_jax.run import config as config_lib  # noqa: E402
from gpo_jax.runtime import cpu as cpu_lib  # noqa: E402

DEFAULT_MD = os.path.join(HERE, "BENCH_ACCEL.md")
GOAL_SPEEDUP, GOAL_SPEEDUP_K, GOAL_MFU = 20.0, 64, 0.40
CPU_LABEL = "CPU smoke run, not the accelerator result"

# lab variant -> (config file, its get_config arg): the lab's default run config.
RUN_CONFIGS = {"tiny": ("cpu_sweep.py", "tiny"), "small": ("cpu_sweep.py", "small"),
               "large": ("pod_sweep.py", "1,1,1")}

# --------------------------------------------------------------------------- peaks

_H100 = "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
_H200 = "https://www.nvidia.com/en-us/data-center/h200/"
_A100 = ("https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
         "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf")
#: dense peak TFLOP/s per device by matmul input type. NVIDIA's tables print BF16/TF32 "with
#: sparsity" (footnote); the dense figures here are half of those. TPUs: Google's per-chip
#: BF16 figures (the chip is one JAX device on v4/v5p/v5e).
PEAKS = {
    "H200 SXM": {"bf16": 989.5, "tf32": 494.5, "fp32": 67.0, "source": _H200},
    "H200 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0, "source": _H200},
    "H100 SXM": {"bf16": 989.5, "tf32": 494.5, "fp32": 67.0, "source": _H100},
    "H100 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0, "source": _H100},
    "H100 PCIe": {"bf16": 756.5, "tf32": 378.0, "fp32": 51.0, "source": _H100},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5, "source": _A100},
    "TPU v5e": {"bf16": 197.0, "source": "https://cloud.google.com/tpu/docs/v5e"},
    "TPU v5p": {"bf16": 459.0, "source": "https://cloud.google.com/tpu/docs/v5p"},
    "TPU v4": {"bf16": 275.0, "source": "https://cloud.google.com/tpu/docs/v4"},
}


def device_peak_name(device_kind: str) -> str | None:
  """The :data:`PEAKS` entry of a ``device_kind`` (``"NVIDIA H200"``, ``"TPU v5 lite"``...)."""
  k = device_kind.lower()
  if "h200" in k:
    return "H200 NVL" if "nvl" in k else "H200 SXM"
  if "h100" in k:
    return "H100 PCIe" if "pcie" in k else "H100 NVL" if "nvl" in k else "H100 SXM"
  if "a100" in k:
    return "A100"
  if "tpu" in k:
    if "v5 lite" in k or "v5e" in k or "v5lite" in k:
      return "TPU v5e"
    if "v5p" in k or k.strip() == "tpu v5":
      return "TPU v5p"
    if "v4" in k and "lite" not in k:
      return "TPU v4"
  return None


def matmul_input_type(dtype: str, platform_name: str, precision) -> str | None:
  """Which peak a row's matmuls can reach: ``bf16``, ``tf32``, ``fp32`` (None: unknown)."""
  if dtype == "bfloat16":
    return "bf16"
  p = str(precision).lower() if precision is not None else "default"
  if platform_name == "gpu":
    if p in ("highest", "float32", "f32_f32_f32"):
      return "fp32"
    if p in ("bfloat16", "bf16_bf16_f32"):
      return "bf16"
    return "tf32"   # JAX's default for float32 dots on Ampere/Hopper
  if platform_name == "tpu":
    return "bf16" if p in ("default", "bfloat16", "fastest") else None
  return None


def row_peak(device_kind: str, dtype: str, platform_name: str, precision) -> dict:
  name = device_peak_name(device_kind)
  kind = matmul_input_type(dtype, platform_name, precision)
  if name is None or kind is None or kind not in PEAKS[name]:
    return {"device": name, "input_type": kind, "tflops": None, "source": None}
  return {"device": name, "input_type": kind, "tflops": PEAKS[name][kind],
          "source": PEAKS[name]["source"]}


# --------------------------------------------------------------------------- FLOPs


def step_flops(cfg: model_lib.TransformerConfig, n_pairs: int, prompt_len: int,
               response_len: int) -> dict:
  """Analytic FLOPs of one member's offline-GPO train step on ``n_pairs`` pairs (module
  docstring): the prompt once, both responses after it."""
  d, f, v, nl = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers
  n_matmul = nl * (3 * d * d + d * d + 2 * d * f) + d * v
  prompt_tokens = n_pairs * prompt_len
  response_tokens = 2 * n_pairs * (response_len - 1)
  tokens = prompt_tokens + response_tokens
  dense_fwd = 2 * n_matmul * tokens
  attn_fwd = nl * 4 * d * (prompt_tokens * prompt_len
                           + response_tokens * (prompt_len + response_len - 1))
  fwd = dense_fwd + attn_fwd
  return {"n_matmul_params": n_matmul, "tokens": tokens, "prompt_tokens": prompt_tokens,
          "response_tokens": response_tokens, "dense_fwd": dense_fwd,
          "attention_fwd": attn_fwd, "policy_fwd": fwd, "policy_bwd": 2 * fwd,
          "ref_fwd": 0, "total": 3 * fwd}


# --------------------------------------------------------------------------- setup


def run_config(lab: str):
  """The lab's default run config (``RUN_CONFIGS``), loaded by path."""
  fname, arg = RUN_CONFIGS[lab]
  spec = importlib.util.spec_from_file_location(f"gpo_bench_accel_{lab}",
                                                os.path.join(REPO, "configs", fname))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg), f"configs/{fname}:{arg}"


def members_for(all_members, k: int):
  """K members: the config's first K round-robin over families; beyond its size the configs
  repeat with new data-order seeds (so K = 64 works for a 36-member sweep)."""
  if k <= all_members.size:
    return bs.select_members(all_members, k)
  order = bs.select_members(all_members, all_members.size)
  rows = []
  for i in range(k):
    r = order.row(i % order.size)
    rows.append((r["family"], r["beta"], r["seed"] + 1000 * (i // order.size), r["lr"],
                 r["gamma"], r["data_size"]))
  return gpo.from_rows(all_members.families, rows)


def with_dtype(wl: "bs.Workload", dtype: str) -> "bs.Workload":
  """The same parameters with the model's compute dtype set to ``dtype``."""
  cfg = dataclasses.replace(wl.cfg, dtype=dtype)
  abstract = nnx.eval_shape(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
  policy = nnx.merge(graphdef, wl.params, wl.rest)
  return bs.Workload(cfg, policy, wl.pairs, wl.source)


def build_evaluator(wl: "bs.Workload", lab_cfg, ecfg, length_normalize: bool):
  """The real Evaluator without a built lab: random π_ref (the workload's policy) and a
  randomly initialised gold network of the lab's gold shape and kind."""
  full = lab_config_lib.LabConfig.from_dict(lab_cfg)
  gold_model = model_lib.RewardModel(full.gold_config, rngs=nnx.Rngs(1))
  gdef, gstate = nnx.split(gold_model)
  terms = gold_lib.GoldTerms(kind=full.gold_kind, coherence_weight=full.gold_coherence_weight,
                             cap_penalty=full.gold_cap_penalty)
  gold_fn = gold_lib.make_gold_fn(gdef, 0.0, 1.0, terms)
  gold_params = {"net": gstate, "tables": gold_lib.tables(corpus_lib.Corpus(full.corpus))}
  n_eval = ecfg.n_prompts or full.n_eval_prompts
  n_test = ecfg.n_test_pairs or full.n_test_pairs
  prompts = np.asarray(wl.pairs["prompt"][-n_eval:])
  test = {k: np.asarray(v[:n_test]) for k, v in wl.pairs.items()}
  ev = policy_eval.Evaluator(graphdef=wl.graphdef, rest=wl.rest, ref_params=wl.params,
                             gold_fn=gold_fn, gold_params=gold_params, eval_prompts=prompts,
                             test_pairs=test, ecfg=ecfg, length_normalize=length_normalize)
  return ev, {"gold_cfg": _cfg_str(full.gold_config), "gold_kind": full.gold_kind,
              "n_prompts": int(prompts.shape[0]), "n_test_pairs": int(min(n_test, len(test["chosen"])))}


def _cfg_str(c) -> str:
  return f"V={c.vocab_size} d={c.d_model} layers={c.n_layers} heads={c.n_heads} d_ff={c.d_ff}"


def _is_oom(e: Exception) -> bool:
  s = str(e).lower()
  return "resource_exhausted" in s or "out of memory" in s or "oom" in s.split()


def memory_need(compiled) -> float | None:
  try:
    m = compiled.memory_analysis()
    return float(m.argument_size_in_bytes + m.output_size_in_bytes
                 - m.alias_size_in_bytes + m.temp_size_in_bytes)
  except Exception:  # not every backend/jaxlib reports it
    return None


def device_memory_limit() -> float | None:
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:
    return None
  return float(stats["bytes_limit"]) if "bytes_limit" in stats else None


# --------------------------------------------------------------------------- measure


def measure_dtype(dtype, base_wl, all_members, k, tcfg, args, options, mem_limit, log) -> dict:
  """Rows (a) and (b) for one compute dtype; halves the per-member batch until K fits."""
  wl = with_dtype(base_wl, dtype)
  data = sequences.pair_arrays(wl.pairs)
  members = members_for(all_members, k)
  bsz = tcfg.batch_size
  notes = []
  while True:
    t = dataclasses.replace(tcfg, batch_size=bsz)
    steps = bs.CompiledSteps(wl, all_members.families, t, data, devices=jax.devices()[:1],
                             chunk=None, options=options)
    try:
      compiled, cost, compile_s = steps.get(members)
      need = memory_need(compiled)
      if mem_limit and need and need > 0.95 * mem_limit:
        raise MemoryError(f"needs {need / 2**30:.1f} GiB of {mem_limit / 2**30:.1f} GiB")
      vec = bs.time_vectorised(steps, members, args.block_s, args.repeats)
      break
    except Exception as e:  # noqa: BLE001 -- only out-of-memory is handled
      if not (isinstance(e, MemoryError) or _is_oom(e)) or bsz <= 1:
        raise
      msg = (f"{dtype}: K={k} at batch {bsz} does not fit on one device "
             f"({str(e).splitlines()[0][:160]}); halving the per-member batch")
      log(msg)
      notes.append(msg)
      bsz //= 2
  vec["memory_need_bytes"] = need
  log(f"{dtype}: (a) vmapped K={k}: {vec['updates_per_s']:.1f} updates/s "
      f"({1e3 * vec['s_per_step']:.2f} ms/step, compile {compile_s:.1f} s)")
  seq = bs.time_sequential(steps, members, args.seq_steps)
  seq["compile_s"] = steps.get(members.select([0]))[2]
  seq["xla_flops_one"] = steps.get(members.select([0]))[1]["flops"]
  log(f"{dtype}: (b) sequential: {seq['updates_per_s']:.1f} updates/s "
      f"({1e3 * seq['s_per_step'] / k:.2f} ms per single-member step)")
  p_len = int(wl.pairs["prompt"].shape[1])
  t_len = wl.seq_len - p_len
  fl = step_flops(wl.cfg, bsz, p_len, t_len)
  check = 3 * (model_lib.flops_per_token(wl.cfg, p_len) * fl["prompt_tokens"]
               + model_lib.flops_per_token(wl.cfg, p_len + t_len - 1) * fl["response_tokens"])
  if fl["total"] != check:
    raise AssertionError(f"analytic FLOPs {fl['total']} != 3 x model.flops_per_token over "
                         f"the positions = {check}")
  return {"dtype": dtype, "k": k, "batch_size": bsz, "notes": notes, "flops": fl,
          "vmapped": vec, "sequential": seq, "steps": steps, "members": members, "wl": wl}


def measure_eval(row, config, args, log) -> dict:
  """One evaluation of the K members by the real Evaluator (median of ``eval_repeats``)."""
  wl, members, steps = row["wl"], row["members"], row["steps"]
  overrides = {}
  if args.quick:
    overrides = dict(n_prompts=4, samples_per_prompt=2, ref_samples_per_prompt=4,
                     n_test_pairs=16, member_chunk=2, bon_n=(1, 2, 4))
  ecfg = policy_eval.EvalConfig.from_config(config.eval, **overrides)
  ev, info = build_evaluator(wl, config.lab, ecfg, bool(config.train.length_normalize))
  t0 = time.perf_counter()
  ev.reference()
  ref_s = time.perf_counter() - t0
  state, hp = steps.init(members)
  params = state["params"]
  t0 = time.perf_counter()
  out = ev(params, hp, 0)
  first_s = time.perf_counter() - t0
  times = []
  for i in range(args.eval_repeats):
    t0 = time.perf_counter()
    out = ev(params, hp, i + 1)
    times.append(time.perf_counter() - t0)
  eval_s = statistics.median(times)
  finite = all(np.all(np.isfinite(np.asarray(out[k], np.float64)))
               for k in ("kl", "gold/reward", "rewards/margins"))
  every = int(config.eval.every)
  train_s = every * row["vmapped"]["s_per_step"]
  res = {"eval_s": eval_s, "eval_times": times, "first_call_s": first_s,
         "compile_s_est": max(0.0, first_s - eval_s), "reference_s_incl_compile": ref_s,
         "every": every, "train_s_between": train_s, "share": eval_s / (eval_s + train_s),
         "ecfg": dataclasses.asdict(ecfg), "finite_metrics": bool(finite), **info}
  log(f"{row['dtype']}: (d) one evaluation {eval_s:.3f} s vs {every} steps {train_s:.3f} s: "
      f"share {100 * res['share']:.1f} %")
  return res


# --------------------------------------------------------------------------- report


def summarise(row: dict, machine: dict, precision) -> dict:
  """The numbers of one dtype's table rows (JSON-able)."""
  k, vec, seq, fl = row["k"], row["vmapped"], row["sequential"], row["flops"]
  peak = row_peak(machine["device_kind"], row["dtype"], machine["backend"], precision)
  out = {"dtype": row["dtype"], "k": k, "batch_size": row["batch_size"], "notes": row["notes"],
         "flops_per_member_step": fl, "peak": peak}
  for name, r in (("vmapped", vec), ("sequential", seq)):
    sec = r["s_per_step"]                       # wall time of one step of all K members
    analytic = k * fl["total"]
    rate = analytic / sec
    out[name] = {
        "updates_per_s": r["updates_per_s"], "ms_per_k_member_step": 1e3 * sec,
        "analytic_tflops_per_s": rate / 1e12,
        "xla_tflops_per_s": r["xla_flops"] / sec / 1e12 if name == "vmapped" else
                            k * seq["xla_flops_one"] / sec / 1e12,
        "mfu": rate / (peak["tflops"] * 1e12) if peak["tflops"] else None,
        "compile_s": r.get("compile_s"),
    }
  out["vmapped"].update(block_steps=vec["block_steps"],
                        spread_ms=[1e3 * s for s in vec["spread"]],
                        memory_need_gib=(vec["memory_need_bytes"] / 2**30
                                         if vec.get("memory_need_bytes") else None))
  out["xla_flops_k_step"] = vec["xla_flops"]
  out["xla_flops_one_step"] = seq["xla_flops_one"]
  out["xla_over_analytic"] = vec["xla_flops"] / (k * fl["total"])
  out["xla_one_over_analytic"] = seq["xla_flops_one"] / fl["total"]
  out["speedup"] = vec["updates_per_s"] / seq["updates_per_s"]
  if "eval" in row:
    out["eval"] = row["eval"]
  return out


def _f(x, fmt="{:.1f}", none="n/a") -> str:
  return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def goal_lines(rows: list[dict], cpu: bool) -> list[str]:
  lines = []
  for r in rows:
    k = r["k"]
    at = "" if k == GOAL_SPEEDUP_K else f" (measured at K={k}; the goal is stated at K={GOAL_SPEEDUP_K})"
    verdict = "PASS" if r["speedup"] >= GOAL_SPEEDUP else "MISS"
    lines.append(f"- **vmapped vs sequential ≥ {GOAL_SPEEDUP:.0f}× at K={GOAL_SPEEDUP_K}**, "
                 f"{r['dtype']}: {r['speedup']:.1f}× — {verdict}{at}")
  for r in rows:
    mfu = r["vmapped"]["mfu"]
    if mfu is None:
      verdict = (f"n/a (no peak for this device/dtype; achieved "
                 f"{r['vmapped']['analytic_tflops_per_s'] * 1e3:.1f} GFLOP/s)")
    else:
      verdict = f"{100 * mfu:.1f} % — {'PASS' if mfu >= GOAL_MFU else 'MISS'}"
    lines.append(f"- **MFU ≥ {100 * GOAL_MFU:.0f} %** (vmapped), {r['dtype']}: {verdict}")
  if cpu:
    lines.append(f"- All of the above: {CPU_LABEL}.")
  return lines


def render(res: dict) -> str:
  m, rows = res["machine"], res["rows"]
  cpu = m["backend"] == "cpu"
  title = "# Accelerator benchmark: vmapped GPO sweep vs sequential, MFU, evaluation share"
  lines = [title + (f" — {CPU_LABEL.upper()}" if cpu else ""), ""]
  if cpu:
    lines += [f"> **{CPU_LABEL}.** This table checks the plumbing on a CPU; the accelerator "
              "table is produced by `python experiments/bench_accel.py --lab large --write` "
              "on a GPU/TPU.", ""]
  w = res["workload"]
  lines += [
      f"Written by `experiments/bench_accel.py` at {res['date']} (what it measures and the "
      "FLOP formula: the script's docstring and `experiments/README.md`).",
      "",
      f"- **Command:** `{res['command']}` (wall time {res['wall_s']:.0f} s)",
      f"- **Machine:** backend `{m['backend']}`, {m['device_count']} device(s) of kind "
      f"`{m['device_kind']}` (one used), platform `{m['platform_version']}`, device memory "
      f"{_f(m['memory_limit_gib'], '{:.1f} GiB')}; host {m['cpu']} ({m['cores']} cores), load "
      f"average at start {res['load_start']}, at end {res['load_end']}.",
      f"- **Versions:** {res['versions']}; `jax_default_matmul_precision` = "
      f"`{res['matmul_precision']}`.",
      f"- **Workload:** {w['source']}. Policy {w['cfg']} ({w['n_params']:,} params, "
      f"{w['n_matmul_params']:,} in matmuls); pairs of a {w['prompt_len']}-token prompt and "
      f"two {w['seq_len'] - w['prompt_len']}-token responses (the prompt run once, each "
      f"response read after it); settings of `{w['run_config']}`: {w['train_note']}. "
      f"Members: K={w['k']} configs of that sweep ({w['members_note']}).",
      f"- **Timing:** (a) compile, 2 warm-up steps, median of {res['repeats']} blocks of "
      f"consecutive steps (~{res['block_s']} s each); (b) all K configs run one after another, "
      f"each from π_ref for {res['seq_steps']} steps, with one compiled and warmed-up K=1 step; "
      f"(d) the real `Evaluator` on the K members, median of {res['eval_repeats']} calls after "
      "a first (compiling) call. Compile times are separate columns.",
      "- **FLOPs:** analytic per member-step = 3 × (2·N·tokens + 4·n_layers·d·Σ keys attended) "
      "over the B·(P + 2(T − 1)) positions the step runs (no "
      "reference forward: the offline step reads π_ref's log-probs from the data); MFU = "
      "K × analytic / step time / peak. XLA's `cost_analysis()['flops']` of the timed "
      "executable is shown as a cross-check (it also counts elementwise work).",
      "",
      "| dtype | run | K | batch/member | policy updates/s | ms per K-member step | "
      "compile s | analytic TFLOP/s | XLA TFLOP/s | peak TFLOP/s | MFU |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    pk = r["peak"]
    peak = (f"{pk['tflops']:g} ({pk['device']}, {pk['input_type']})" if pk["tflops"]
            else "n/a")
    for name, label in (("vmapped", "(a) one vmap over K members"),
                        ("sequential", "(b) sequential, K runs one after another")):
      x = r[name]
      lines.append(
          f"| {r['dtype']} | {label} | {r['k']} | {r['batch_size']} | {x['updates_per_s']:.1f} | "
          f"{x['ms_per_k_member_step']:.2f} | {_f(x['compile_s'])} | "
          f"{x['analytic_tflops_per_s']:.4g} | {_f(x['xla_tflops_per_s'], '{:.4g}')} | {peak} | "
          f"{_f(x['mfu'], '{:.1%}') if x['mfu'] is not None else 'n/a'} |")
  lines += ["", "| dtype | speed-up (a)/(b) | XLA/analytic FLOPs (K step, 1-member step) | "
            "memory of the K step | per-step spread (a) |",
            "|---|---:|---:|---:|---:|"]
  for r in rows:
    v = r["vmapped"]
    lines.append(f"| {r['dtype']} | {r['speedup']:.1f}× | {r['xla_over_analytic']:.3f}, "
                 f"{r['xla_one_over_analytic']:.3f} | {_f(v['memory_need_gib'], '{:.2f} GiB')} | "
                 f"{v['spread_ms'][0]:.2f}–{v['spread_ms'][1]:.2f} ms ({v['block_steps']} "
                 f"steps/block) |")
  ev_rows = [r for r in rows if "eval" in r]
  if ev_rows:
    e0 = ev_rows[0]["eval"]
    ec = e0["ecfg"]
    lines += ["", "## Evaluation share", "",
              f"The real `gpo_jax.evaluation.policy.Evaluator`, built without a lab (random π_ref "
              f"= the policy's init, random gold `RewardModel` {e0['gold_cfg']}, gold kind "
              f"`{e0['gold_kind']}` with the corpus tables), on the K members: "
              f"{e0['n_prompts']} prompts × {ec['samples_per_prompt']} samples per member, "
              f"{e0['n_test_pairs']} held-out pairs, `member_chunk` {ec['member_chunk']}; "
              f"the run evaluates every {e0['every']} steps.", "",
              "| dtype | one evaluation s | eval compile s (est.) | train s between evals | "
              "eval share of wall time | π_ref pool (once, incl. compile) s |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in ev_rows:
      e = r["eval"]
      lines.append(f"| {r['dtype']} | {e['eval_s']:.3f} | {e['compile_s_est']:.1f} | "
                   f"{e['train_s_between']:.3f} ({e['every']} × {r['vmapped']['ms_per_k_member_step']:.2f} ms) | "
                   f"{100 * e['share']:.1f} % | {e['reference_s_incl_compile']:.1f} |")
  lines += ["", "## Goals", ""] + goal_lines(rows, cpu)
  notes = [n for r in rows for n in r["notes"]] + res["notes"]
  if notes:
    lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
  pk_sources = sorted({(r["peak"]["device"], r["peak"]["source"]) for r in rows
                       if r["peak"]["source"]})
  if pk_sources:
    lines += ["", "Peak sources: " + "; ".join(f"{d}: {s}" for d, s in pk_sources)
              + " (dense = half of NVIDIA's 'with sparsity' BF16/TF32 figures)."]
  return "\n".join(lines) + "\n"


def machine_info() -> dict:
  dev = jax.devices()[0]
  info = bs.machine_info()
  limit = device_memory_limit()
  return {"backend": jax.default_backend(), "device_kind": dev.device_kind,
          "device_count": jax.device_count(),
          "platform_version": getattr(dev.client, "platform_version", "?").strip(),
          "memory_limit_gib": limit / 2**30 if limit else None,
          "cpu": info["cpu"], "cores": info["cores"]}


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--lab", default="large", choices=sorted(RUN_CONFIGS),
                  help="lab preset whose shapes and default run config are benchmarked")
  ap.add_argument("--k", type=int, default=None, help="members K (default 64; --quick: 4)")
  ap.add_argument("--dtypes", default="bfloat16,float32",
                  help="comma-separated compute dtypes (TransformerConfig.dtype)")
  ap.add_argument("--batch-size", type=int, default=0,
                  help="per-member pairs per step (default: the run config's; --quick: 8)")
  ap.add_argument("--block-s", type=float, default=None, help="seconds per timed block in (a)")
  ap.add_argument("--repeats", type=int, default=None, help="timed blocks in (a)")
  ap.add_argument("--seq-steps", type=int, default=None, help="steps per member in (b)")
  ap.add_argument("--eval-repeats", type=int, default=None, help="timed evaluations in (d)")
  ap.add_argument("--no-eval", action="store_true", help="skip (d)")
  ap.add_argument("--quick", action="store_true",
                  help="tiny sizes for a CPU smoke run (K=4, batch 8, short timing, small eval)")
  ap.add_argument("--write", nargs="?", const=DEFAULT_MD, default=None, metavar="MD",
                  help=f"write the markdown table (default {os.path.relpath(DEFAULT_MD, REPO)}) "
                       "and the JSON beside it (same name, .json)")
  args = ap.parse_args(argv)
  q = args.quick
  args.k = args.k or (4 if q else 64)
  args.block_s = args.block_s if args.block_s is not None else (0.05 if q else 1.0)
  args.repeats = args.repeats or (3 if q else 5)
  args.seq_steps = args.seq_steps or (2 if q else 5)
  args.eval_repeats = args.eval_repeats or (1 if q else 3)
  dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
  if args.k < 1 or not dtypes:
    raise SystemExit("--k must be >= 1 and --dtypes non-empty")
  cpu = jax.default_backend() == "cpu"
  if args.write and cpu and os.path.abspath(args.write) == DEFAULT_MD:
    raise SystemExit(f"This is a CPU run: {os.path.relpath(DEFAULT_MD, REPO)} is reserved for "
                     "the accelerator result. Pass an explicit path (--write /tmp/x.md).")

  def log(msg):
    print(msg, flush=True)

  t_start = time.perf_counter()
  command = " ".join(shlex.quote(a) for a in ["python", os.path.relpath(__file__, REPO)]
                     + (sys.argv[1:] if argv is None else list(argv)))
  load_start = bs.load_avg()
  machine = machine_info()
  log(f"backend {machine['backend']}, {machine['device_count']} x {machine['device_kind']}"
      + (f" — {CPU_LABEL}" if cpu else ""))

  config, config_name = run_config(args.lab)
  tcfg = config_lib.train_config(config)
  if args.batch_size or q:
    tcfg = dataclasses.replace(tcfg, batch_size=args.batch_size or 8)
  wl = bs.standin_workload(config.lab)
  all_members = config_lib.algorithm(config).members(config, n_train=wl.n_train)
  options = cpu_lib.compiler_options(jax.default_backend())
  mem_limit = device_memory_limit()
  precision = jax.config.jax_default_matmul_precision

  rows = []
  for dtype in dtypes:
    row = measure_dtype(dtype, wl, all_members, args.k, tcfg, args, options, mem_limit, log)
    if not args.no_eval:
      row["eval"] = measure_eval(row, config, args, log)
    rows.append(summarise(row, machine, precision))
    del row

  members = members_for(all_members, args.k)
  fams = sorted(set(members.family))
  c = wl.cfg
  res = {
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      "command": command,
      "cpu_smoke_run": cpu,
      "label": CPU_LABEL if cpu else "accelerator result",
      "machine": machine,
      "versions": (f"python {platform.python_version()}, jax {jax.__version__}, jaxlib "
                   f"{_jaxlib_version()}, "
                   f"flax {flax.__version__}, optax {optax.__version__}"),
      "matmul_precision": precision,
      "compiler_options": options,
      "load_start": load_start,
      "workload": {
          "source": wl.source, "run_config": config_name, "cfg": _cfg_str(c),
          "n_params": model_lib.param_count(wl.params),
          "n_matmul_params": step_flops(c, 1, 1, 1)["n_matmul_params"],
          "seq_len": wl.seq_len, "prompt_len": int(wl.pairs["prompt"].shape[1]), "k": args.k,
          "train_note": (f"Adam b1 {tcfg.b1} b2 {tcfg.b2}, clip {tcfg.grad_clip}, warmup "
                         f"{tcfg.warmup_steps}, config batch {config.train.batch_size}"
                         + (f" (overridden to {tcfg.batch_size})"
                            if tcfg.batch_size != config.train.batch_size else "")),
          "members_note": f"families {fams}, β from the config's grid, lr "
                          f"{sorted(set(float(x) for x in members.lr))}",
      },
      "repeats": args.repeats, "block_s": args.block_s, "seq_steps": args.seq_steps,
      "eval_repeats": args.eval_repeats,
      "rows": rows,
      "notes": [],
  }
  if args.k > all_members.size:
    res["notes"].append(f"The run config has {all_members.size} members; K={args.k} repeats "
                        "its configs with new data-order seeds.")
  res["load_end"] = bs.load_avg()
  res["wall_s"] = time.perf_counter() - t_start
  md = render(res)
  print(md)
  if args.write:
    os.makedirs(os.path.dirname(os.path.abspath(args.write)), exist_ok=True)
    with open(args.write, "w") as f:
      f.write(md)
    with open(os.path.splitext(args.write)[0] + ".json", "w") as f:
      json.dump(res, f, indent=1, default=str)
  return 0


def _jaxlib_version() -> str:
  try:
    import jaxlib
    return jaxlib.__version__
  except Exception:  # noqa: BLE001
    return "?"


if __name__ == "__main__":
  sys.exit(main())
