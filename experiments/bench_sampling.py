"""Benchmarks the KV-cache sampler (``gpo_jax.core.sampling.sample``) against HF ``generate`` on the same model shape.

What it measures, on a π_ref-shaped policy of the ``small`` lab (vocab 32, d_model 64, 3
layers, 4 heads, d_ff 256, KV cache of the length the sampler carries),
contexts ``[BOS] prompt [SEP]`` of the lab (``C`` = prompt_len + 2 = 8 tokens, no
demonstrations: what the evaluator and the online step sample from) and ``T`` =
response_len = 12 new tokens:

* **JAX:** ``sampling.sample(model, ctx, key, max_new_tokens=T)`` jitted, for ``B`` rows per
  member and ``K`` members (K > 1: vmapped over stacked parameters and keys, as the
  evaluator and the sweep step run it; K = 1: no vmap). Generated tokens per second count
  all ``K·B·T`` new-token slots (the sampler always runs all ``T`` positions) and,
  separately, only the tokens up to and including EOS (the response mask).
* **The split:** ``model.prefill`` alone and one ``model.decode_step`` alone (jitted, the
  cache donated and fed back, as inside the sampler's ``lax.scan``), both vmapped like the
  sampler; and the decode time per step the whole call implies, ``(sample − prefill)/(T − 1)``.
* **The decode step's bytes and FLOPs** (per member, ``S`` = the cache positions it
  attends over, ``B`` rows, 4-byte floats)::

    FLOPs = B · [n_layers · (8·d² + 4·d·d_ff + 4·S·d) + 2·d·V]            (= B · model.flops_per_token(cfg, S))
    bytes = 4 · ( n_layers · (4·d² + 2·d·d_ff + 2·d) + 2·d + d·V + min(B, V)·d   parameters read
                + n_layers · 2·B·S·d                                             K and V cache read
                + n_layers · 2·B·d                                               new K, V row written
                + B·V )                                                          logits written

  i.e. the least a decode step must move (activations, which stay in cache, left out),
  checked against ``compiled.cost_analysis()['bytes accessed']`` (XLA's count of every
  op's operands and outputs: what the compiled step moves, layout copies included). Achieved
  GB/s is that over the measured step time, against this machine's memory bandwidth
  (best of 5 timed copies / reductions of 256 MB arrays, numpy and JAX); achieved GFLOP/s
  against the float32 matmul ceiling (``bench_sweep.matmul_ceiling``).
* **HF:** ``bench_hf_generate.py`` in the PyTorch venv (the one bench_sweep.py runs TRL
  in): a ``transformers`` GPT2LMHeadModel of the same vocabulary, width, depth, heads, MLP
  width and ``n_positions``, ``generate(do_sample=True, max_new_tokens=T, top_k=0,
  temperature=1, use_cache=True, eos_token_id=None)`` under ``torch.inference_mode()`` on
  the same context token ids, once with 2 torch threads and once with 1 (torch's threads
  collapse under load). HF has no member axis: K members are K ``generate`` calls, so the
  HF tokens/s at batch ``B`` is the baseline for every K.

Timing interleaves rounds (every JAX configuration once, then HF once per thread setting)
and each row keeps its fastest round, so slow spells of a shared machine fall on both sides.

Run (about 3 minutes on 2 idle cores)::

  python experiments/bench_sampling.py --hf-python /work/venv_trl/bin/python \
      --label baseline --write

``--write`` writes ``experiments/BENCH_SAMPLING.md`` and ``experiments/bench_sampling.json``;
``--compare OLD.json`` adds a before/after table against an earlier run (its ``--label``).
"""

import argparse
import dataclasses
import inspect
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import bench_sweep  # noqa: E402  (machine info, load average, CPU meter, matmul ceiling, xla_cost)

from gpo_jax.core import model as model_lib  # noqa: E402
from gpo_jax.core import sampling  # noqa: E402
from gpo_jax.runtime import cpu as cpu_lib  # noqa: E402

HF_ENV = bench_sweep.TRL_ENV
DEFAULT_LAB = "/tmp/lh/labs/small-0988f6db897d"
DEFAULT_MD = os.path.join(HERE, "BENCH_SAMPLING.md")
DEFAULT_JSON = os.path.join(HERE, "bench_sampling.json")
TARGET = 3.0
FLOAT_BYTES = 4


# ---------------------------------------------------------------------------- workload


@dataclasses.dataclass
class Workload:
  cfg: model_lib.TransformerConfig
  graphdef: Any
  params: Any
  rest: Any
  prompts: np.ndarray      # [N, C] int32 contexts [BOS] prompt [SEP]
  response_len: int
  source: str

  @property
  def context_len(self) -> int:
    return int(self.prompts.shape[1])

  def contexts(self, n: int) -> np.ndarray:
    """The first ``n`` contexts, the prompts tiled when ``n`` exceeds them."""
    reps = -(-n // self.prompts.shape[0])
    return np.ascontiguousarray(np.tile(self.prompts, (reps, 1))[:n]).astype(np.int32)


def lab_workload(path: str) -> Workload:
  """The built lab's π_ref and its held-out eval prompts (``lab.eval_prompts``)."""
  from gpo_jax import lab as lab_lib

  lab = lab_lib.load_lab(path, verify=False)
  g, p, r = nnx.split(lab.policy(), nnx.Param, ...)
  return Workload(lab.policy_cfg, g, p, r, np.asarray(lab.eval_prompts, np.int32),
                  int(lab.cfg.corpus.response_len),
                  f"the built `{lab.cfg.name}` lab's π_ref and its {lab.eval_prompts.shape[0]} "
                  f"eval prompts, tiled to B rows ({os.path.basename(path)})")


def standin_workload(variant: str = "small", seed: int = 0) -> Workload:
  """A randomly initialised policy of the lab's shape and random contexts (same cost)."""
  from gpo_jax import lab as lab_lib
  from gpo_jax.lab import presets

  cfg = lab_lib.LabConfig.from_dict(presets.lab_config(variant).to_dict())
  c = cfg.corpus
  rng = np.random.default_rng(seed)
  prompts = rng.integers(5, c.vocab_size, (256, c.prompt_len + 2)).astype(np.int32)
  prompts[:, 0], prompts[:, -1] = 1, 2  # BOS ... SEP
  g, p, r = nnx.split(model_lib.Transformer(cfg.policy_config, rngs=nnx.Rngs(seed)),
                      nnx.Param, ...)
  return Workload(cfg.policy_config, g, p, r, prompts, int(c.response_len),
                  f"stand-in with the `{variant}` lab's shapes: random π_ref init, random "
                  "contexts (responses rarely end early, the cost is the same)")


# ------------------------------------------------------------------------------ analytic


def decode_cost(cfg: model_lib.TransformerConfig, b: int, s: int) -> dict:
  """FLOPs and minimum bytes of one decode step of one member (module docstring formulas).

  ``s``: cache positions the step attends over (the implementation's cache length if it
  masks, the positions so far if it truncates).
  """
  d, f, v, n = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers
  act = jnp.dtype(cfg.compute_dtype).itemsize
  params = n * (4 * d * d + 2 * d * f + 2 * d) + 2 * d + d * v + min(b, v) * d
  parts = {
      "params": FLOAT_BYTES * params,
      "kv_read": act * n * 2 * b * s * d,
      "kv_write": act * n * 2 * b * d,
      "logits": FLOAT_BYTES * b * v,
  }
  return {"flops": b * model_lib.flops_per_token(cfg, s), "bytes": sum(parts.values()),
          "bytes_parts": parts, "s": s, "b": b}


def prefill_flops(cfg: model_lib.TransformerConfig, b: int, c: int) -> int:
  """Matmul FLOPs of the prefill of ``b`` contexts of ``c`` tokens (logits at the last only)."""
  unemb = 2 * cfg.d_model * cfg.vocab_size
  return b * (c * (model_lib.flops_per_token(cfg, c) - unemb) + unemb)


def _prefill_cache_len(wl: Workload, b: int, length: int | None = None) -> int:
  ctx = jax.ShapeDtypeStruct((b, wl.context_len), jnp.int32)
  _, cache = jax.eval_shape(lambda p, c: prefill(nnx.merge(wl.graphdef, p, wl.rest), c, length),
                            wl.params, ctx)
  return int(cache[0]["k"].shape[2])   # [B, heads, S, head_dim]


def prefill(model, ctx, length: int | None = None):
  """``model.prefill(ctx)``, with ``cache_len=length`` where the model takes one."""
  if length is None or "cache_len" not in inspect.signature(model.prefill).parameters:
    return model.prefill(ctx)
  return model.prefill(ctx, cache_len=length)


def cache_len(wl: Workload, b: int) -> int:
  """Positions of the KV cache the sampler's decode scan carries (read off its jaxpr).

  The scan's carry holds per layer ``[B, heads, S, head_dim]`` arrays; ``S`` is what every
  decode step attends over. Falls back to ``model.prefill``'s default cache length.
  """
  cfg = wl.cfg
  ctx = jnp.zeros((b, wl.context_len), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda p, k: sampling.sample(
      nnx.merge(wl.graphdef, p, wl.rest), ctx, k, max_new_tokens=wl.response_len))(
          wl.params, jax.random.key(0))
  for eqn in jaxpr.jaxpr.eqns:
    if eqn.primitive.name == "scan":
      for v in eqn.invars:
        shape = getattr(v.aval, "shape", ())
        if len(shape) == 4 and shape[0] == b and shape[1] == cfg.n_heads and shape[3] == cfg.head_dim:
          return int(shape[2])
  return _prefill_cache_len(wl, b)


# ------------------------------------------------------------------------------ timing


class Programs:
  """The sampler, prefill and one decode step for K members of B rows, compiled once."""

  def __init__(self, wl: Workload, k: int, b: int, options=None, per_context: int = 1):
    self.wl, self.k, self.b, self.per_context = wl, k, b, per_context
    if b % per_context:
      raise SystemExit(f"--per-context {per_context} must divide every batch (B={b})")
    t = wl.response_len
    g, r = wl.graphdef, wl.rest
    # B rows = B / per_context distinct contexts, each sampled per_context times
    # (sampling.sample(..., repeats=per_context): one prefill per context)
    self.ctx = jnp.asarray(wl.contexts(b // per_context))
    ctx = self.ctx
    c = wl.context_len
    # the decode step alone runs on a cache of the length the sampler's scan carries
    self.cache_len = cache_len(wl, b)
    pre_len = None if _prefill_cache_len(wl, b) == self.cache_len else self.cache_len

    def one_sample(p, key):
      if per_context == 1:
        return sampling.sample(nnx.merge(g, p, r), ctx, key, max_new_tokens=t)
      return sampling.sample(nnx.merge(g, p, r), ctx, key, max_new_tokens=t,
                             repeats=per_context)

    def one_prefill(p):
      return prefill(nnx.merge(g, p, r), ctx, pre_len)

    def one_decode(p, token, cache):
      return nnx.merge(g, p, r).decode_step(token, jnp.int32(c), cache)

    if k == 1:
      self.params = wl.params
      self.keys = jax.random.key(0)
      fs, fp, fd = one_sample, one_prefill, one_decode
    else:
      self.params = jax.tree.map(lambda x: jnp.stack([x] * k), wl.params)
      self.keys = jax.random.split(jax.random.key(0), k)
      fs, fp, fd = jax.vmap(one_sample), jax.vmap(one_prefill), jax.vmap(one_decode)
    kw = {"compiler_options": options} if options else {}
    t0 = time.perf_counter()
    self.sample = jax.jit(fs, **kw).lower(self.params, self.keys).compile()
    self.compile_s = time.perf_counter() - t0
    self.prefill = jax.jit(fp, **kw).lower(self.params).compile()
    cache = self.expand(self.prefill(self.params)[1])
    self.token = jnp.full((k, b) if k > 1 else (b,), 5, jnp.int32)
    self.decode = jax.jit(fd, donate_argnums=2, **kw).lower(
        self.params, self.token, cache).compile()
    self.cost = {"sample": bench_sweep.xla_cost(self.sample),
                 "prefill": bench_sweep.xla_cost(self.prefill),
                 "decode": bench_sweep.xla_cost(self.decode)}

  def expand(self, cache):
    """The prefill's cache of the distinct contexts, repeated to the B rows a decode step
    runs on (``[..., B, heads, S, head_dim]``)."""
    if self.per_context == 1:
      return cache
    return jax.tree.map(lambda x: jnp.repeat(x, self.per_context, axis=-4), cache)

  def _block(self, fn, block_s: float, min_calls: int = 3) -> dict:
    fn()
    t0 = time.perf_counter()
    fn()
    n = max(min_calls, int(block_s / max(time.perf_counter() - t0, 1e-6)))
    times = []
    for _ in range(n):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    return {"s": statistics.median(times), "calls": n}

  def time(self, block_s: float) -> dict:
    """One round: the whole sampler, prefill alone and one decode step alone (medians)."""
    out = {}

    def run_sample():
      out["result"] = jax.block_until_ready(self.sample(self.params, self.keys))

    full = self._block(run_sample, block_s)
    pre = self._block(lambda: jax.block_until_ready(self.prefill(self.params)), block_s / 2)
    state = {"cache": self.expand(self.prefill(self.params)[1])}

    def run_decode():
      logits, state["cache"] = self.decode(self.params, self.token, state["cache"])
      jax.block_until_ready(logits)

    dec = self._block(run_decode, block_s / 2)
    tokens, mask = jax.device_get(out["result"])
    t = self.wl.response_len
    slots = self.k * self.b * t
    return {"s_per_call": full["s"], "calls": full["calls"],
            "tokens_per_s": slots / full["s"],
            "eos_tokens_per_s": float(np.sum(mask)) / full["s"],
            "mean_response_len": float(np.mean(np.sum(mask, axis=-1))),
            "prefill_s": pre["s"], "decode_step_s": dec["s"],
            "decode_step_implied_s": max(full["s"] - pre["s"], 0.0) / max(t - 1, 1)}


def op_breakdown(prog: "Programs", calls: int = 2) -> dict:
  """Share of the sampler's op time by kind of work (``jax.profiler`` trace of ``calls``
  calls, ops grouped by ``bench_sweep._hlo_kinds`` of the compiled sampler; loop and call
  wrappers are skipped, their bodies' ops are counted). A diagnostic, not in the tests."""
  import collections
  import glob
  import gzip

  kinds = bench_sweep._hlo_kinds(prog.sample.as_text())
  jax.block_until_ready(prog.sample(prog.params, prog.keys))
  by_kind, by_op = collections.Counter(), collections.Counter()
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(prog.sample(prog.params, prog.keys))
    files = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(files[0]) as f:
      events = json.load(f)["traceEvents"]
  for e in events:
    name = str(e.get("name", "")).split(" ")[0]
    kind = kinds.get(name)
    # a while/call wraps the ops of its body, which appear in the trace themselves
    if name.startswith(("while", "call", "conditional")):
      continue
    if e.get("ph") == "X" and kind:
      by_kind[kind] += float(e.get("dur", 0.0))
      by_op[name] += float(e.get("dur", 0.0))
  total = sum(by_kind.values()) or 1.0
  return {"by_kind": {k: v / total for k, v in by_kind.most_common()},
          "top_ops": {k: v / total for k, v in by_op.most_common(8)},
          "op_ms_per_call": total / 1e3 / calls}


def memory_bandwidth(mbytes: int = 256, repeats: int = 5) -> dict:
  """GB/s of large array traffic on this machine: best of ``repeats`` of each kernel.

  numpy copy (read + write), JAX jitted ``x + 1`` (read + write) and JAX ``sum`` (read).
  """
  n = mbytes * 2**20 // 4
  src = np.random.default_rng(0).random(n, dtype=np.float32)
  dst = np.empty_like(src)
  x = jnp.asarray(src)
  add = jax.jit(lambda a: a + 1.0)
  red = jax.jit(jnp.sum)
  kernels = {"numpy copy": (lambda: np.copyto(dst, src), 2),
             "jax x+1": (lambda: add(x).block_until_ready(), 2),
             "jax sum": (lambda: red(x).block_until_ready(), 1)}
  out = {}
  for name, (fn, passes) in kernels.items():
    fn()
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      best = min(best, time.perf_counter() - t0)
    out[name] = passes * src.nbytes / best / 1e9
  return {"mbytes": mbytes, "by_kernel": out, "gbps": max(out.values())}


# ---------------------------------------------------------------------------------- HF


def export_contexts(wl: Workload, n: int, path: str) -> None:
  c = wl.cfg
  meta = {"vocab_size": c.vocab_size, "d_model": c.d_model, "n_layers": c.n_layers,
          "n_heads": c.n_heads, "d_ff": c.d_ff, "max_len": c.max_len,
          "tie_embeddings": c.tie_embeddings, "response_len": wl.response_len}
  np.savez(path, meta=json.dumps(meta), context=wl.contexts(n))


def run_hf(python: str | None, npz: str, batches: list[int], threads: int, block_s: float,
           timeout: int = 600) -> dict:
  """Runs bench_hf_generate.py in the PyTorch venv; ``ok`` False and a reason if it cannot."""
  if not python:
    return {"ok": False, "reason": f"no HF python (pass --hf-python or set ${HF_ENV})"}
  if not os.path.exists(python):
    return {"ok": False, "reason": f"HF python {python} does not exist"}
  out = f"{npz}.{threads}.json"
  cmd = [python, os.path.join(HERE, "bench_hf_generate.py"), "--data", npz, "--out", out,
         "--batches", ",".join(map(str, batches)), "--threads", str(threads),
         "--block-s", str(block_s)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"ok": False, "reason": f"bench_hf_generate.py exceeded {timeout} s"}
  if proc.returncode != 0 or not os.path.exists(out):
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"ok": False, "reason": f"bench_hf_generate.py failed (rc={proc.returncode}): "
                                   f"{' | '.join(tail)}"}
  with open(out) as f:
    return json.load(f)


def summarise_hf(runs: dict) -> dict:
  """Per thread setting and batch size, the fastest round; the baseline per batch is the
  fastest thread setting. ``runs`` maps a ``--threads`` value to its rounds' result dicts."""
  by_threads, last = {}, None
  for n, rs in runs.items():
    ok = [r for r in rs if r.get("ok")]
    last = rs[-1] if rs else last
    if not ok:
      continue
    rows = {}
    for b in ok[0]["by_batch"]:
      rounds = [r["by_batch"][b] for r in ok]
      best = dict(min(rounds, key=lambda x: x["s_per_call"]))
      best["all_ms"] = [round(1e3 * x["s_per_call"], 2) for x in rounds]
      best["all_other_cpu"] = [r.get("other_cpu") for r in ok]
      rows[b] = best
    by_threads[str(ok[0]["torch_threads"])] = rows
    info = ok[0]
  if not by_threads:
    return dict(last or {"ok": False, "reason": "no HF run"})
  best = {}
  for rows in by_threads.values():
    for b, r in rows.items():
      if b not in best or r["tokens_per_s"] > best[b]["tokens_per_s"]:
        best[b] = r
  return {"ok": True, "by_threads": by_threads, "best": best,
          **{k: info[k] for k in ("n_params", "settings", "versions")}}


# ------------------------------------------------------------------------------ report


def ratio_cell(jax_tps: float, hf_tps: float | None, target: float = TARGET) -> str:
  """``'3.52× MET'`` / ``'1.20× MISSED'`` against the ≥ target× goal; ``'n/a'`` without HF."""
  if not hf_tps:
    return "n/a"
  r = jax_tps / hf_tps
  return f"{r:.2f}× {'MET' if r >= target else 'MISSED'}"


def _hf_best(res: dict, b: str):
  hf = res.get("hf", {})
  return hf["best"].get(b) if hf.get("ok") else None


def table_rows(res: dict) -> list[str]:
  """The main table: one row per (K, B)."""
  lines = ["| K members | B rows per member | JAX tokens/s (all K·B·T slots) | JAX tokens/s per "
           "member | JAX tokens/s up to EOS | HF `generate` tokens/s (1 model, batch B) "
           "| HF threads | JAX / HF | ms per JAX call |",
           "|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
  for key, r in res["rows"].items():
    k, b = key.split("x")
    hf = _hf_best(res, b)
    hf_tps = hf["tokens_per_s"] if hf else None
    lines.append(
        f"| {k} | {b} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / int(k):,.0f} "
        f"| {r['eos_tokens_per_s']:,.0f} | "
        + (f"{hf_tps:,.0f} | {hf['threads']} | " if hf else "skipped | | ")
        + f"{ratio_cell(r['tokens_per_s'], hf_tps)} | {1e3 * r['s_per_call']:.2f} |")
  return lines


def verdict(res: dict, target: float = TARGET) -> str:
  if not res.get("hf", {}).get("ok"):
    return f"Goal ≥ {target:g}× HF `generate` tokens/s: not judged (HF skipped: " \
           f"{res.get('hf', {}).get('reason')})."
  parts, met = [], []
  for key, r in res["rows"].items():
    hf = _hf_best(res, key.split("x")[1])
    ratio = r["tokens_per_s"] / hf["tokens_per_s"]
    parts.append(f"K={key.split('x')[0]} B={key.split('x')[1]}: {ratio:.1f}×")
    met.append(ratio >= target)
  state = ("MET at every row" if all(met) else "MISSED at every row" if not any(met)
           else f"MET at {sum(met)} of {len(met)} rows")
  return f"Goal ≥ {target:g}× HF `generate` tokens/s on the same CPU: {', '.join(parts)} — {state}."


def render(res: dict) -> str:
  m, w = res["machine"], res["workload"]
  hf = res.get("hf", {})
  t, c = w["response_len"], w["context_len"]
  lines = [
      "# Sampling benchmark: the KV-cache sampler vs HF `generate`",
      "",
      f"Written by `experiments/bench_sampling.py` at {res['date']}, label **{res['label']}**; "
      "what it measures: the script's docstring and `experiments/README.md`.",
      "",
      f"- **Command:** `{res['command']}` (wall time {res['wall_s']:.0f} s)",
      f"- **Machine:** {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), JAX device "
      f"`{m['jax_device']}` × {m['n_devices']}. Memory bandwidth **{res['bandwidth']['gbps']:.1f} "
      f"GB/s** (best of 5 over {res['bandwidth']['mbytes']} MB arrays: "
      + ", ".join(f"{k} {v:.1f}" for k, v in res["bandwidth"]["by_kernel"].items())
      + f"); float32 matmul ceiling {res['ceiling']['gflops']:.1f} GFLOP/s "
      f"(`jnp.dot` {res['ceiling']['n']}³).",
      f"- **Load average (1/5/15 min):** start {res['load_start']}, after each round "
      f"{res['load_rounds']}, end {res['load_end']}.",
      f"- **Versions:** {res['versions']}.",
      f"- **Workload:** {w['source']}. Policy {w['cfg']} ({w['n_params']:,} params), KV "
      f"cache of {w['cache_len']} positions (what the sampler's decode scan carries, read off its "
      f"jaxpr; `max_len` = {w['max_len']}); "
      f"contexts of C = {c} tokens (`[BOS] prompt [SEP]`), T = {t} new tokens, temperature 1, "
      f"no top-k/top-p. K > 1: `jax.vmap` over K stacked copies of the parameters and K keys "
      f"(one device); K = 1: no vmap. Compiler options ({res.get('program', 'train')} programs): {res['compiler_options']}."
      + (f" **Rows per context: {w['per_context']}** — B rows are B/{w['per_context']} "
         f"contexts each sampled {w['per_context']} times (a best-of-n pool's shape), by "
         f"`sample(..., repeats={w['per_context']})`, which prefills each context once; its "
         "prefill row below is that prefill of B/R contexts. HF `generate` runs its B rows as "
         "always (`num_return_sequences` would repeat the rows before the prefill the same "
         "way; with EOS disabled its cost does not depend on which contexts)."
         if w.get("per_context", 1) > 1 else ""),
      f"- **Timing:** everything compiles first; then {res['repeats']} rounds, each timing every "
      f"JAX configuration once (a block of ≥ 3 calls of ~{res['block_s']} s, median; each call "
      "ended by `jax.block_until_ready`) and then HF `generate` once per torch thread setting "
      f"({', '.join(res['hf_threads'])}); each row keeps its fastest round.",
  ]
  if hf.get("ok"):
    lines.append(f"- **HF:** {hf['settings']}; GPT-2 of the same shape ({hf['n_params']:,} "
                 "params; adds biases and LayerNorm), random init, the same context token ids. "
                 "HF has no member axis, so K members cost K calls: its tokens/s at batch B is "
                 "the baseline for every K.")
  else:
    lines.append(f"- **HF skipped:** {hf.get('reason')}")
  lines += ["", "## Tokens per second", ""] + table_rows(res)
  lines += ["", f"**Verdict:** {res['verdict']}", ""]
  if hf.get("ok"):
    lines += ["HF `generate` by torch threads (fastest round; every round's ms per call):", "",
              "| B | " + " | ".join(f"{n} thread(s) tokens/s" for n in hf["by_threads"])
              + " | ms per call, every round |",
              "|---:|" + "---:|" * len(hf["by_threads"]) + "---|"]
    for b in hf["best"]:
      lines.append(f"| {b} | " + " | ".join(
          f"{rows[b]['tokens_per_s']:,.0f}" for rows in hf["by_threads"].values())
          + " | " + "; ".join(f"{n}: {rows[b]['all_ms']}" for n, rows in hf["by_threads"].items())
          + " |")
    lines.append("")

  lines += [
      "## Prefill vs decode",
      "",
      "Prefill and one decode step each jitted and timed alone (vmapped like the sampler, on a "
      "cache of the sampler's length; the decode step at position C with the cache donated and fed back, as in the sampler's "
      "scan). *Implied decode/step* = (whole call − prefill) / (T − 1): everything after the "
      "prefill, per step, sampling ops and scan overhead included. The step alone pays one "
      "dispatch per call (~0.1–0.3 ms here) that the scan does not, so at small B the rest "
      "can be negative. HF's prefill is "
      "`generate(max_new_tokens=1)` and its decode/step (`generate(T)` − that) / (T − 1).",
      "",
      "| K | B | JAX whole call ms | JAX prefill ms | JAX decode step alone ms | (T−1) × step "
      "| JAX implied decode/step ms | rest = call − prefill − (T−1) × step | HF prefill ms | HF decode/step ms |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for key, r in res["rows"].items():
    k, b = key.split("x")
    s = r["s_per_call"]
    dec_total = (t - 1) * r["decode_step_s"]
    rest = s - r["prefill_s"] - dec_total
    h = _hf_best(res, b)
    lines.append(
        f"| {k} | {b} | {1e3 * s:.2f} | {1e3 * r['prefill_s']:.2f} ({100 * r['prefill_s'] / s:.0f} %) "
        f"| {1e3 * r['decode_step_s']:.3f} | {1e3 * dec_total:.2f} ({100 * dec_total / s:.0f} %) "
        f"| {1e3 * r['decode_step_implied_s']:.3f} | {1e3 * rest:.2f} ({100 * rest / s:.0f} %) | "
        + (f"{1e3 * h['prefill_s']:.2f} | {1e3 * h['decode_step_s']:.3f} |" if h else "n/a | n/a |"))

  lines += [
      "",
      "## The decode step: bytes, FLOPs, bandwidth",
      "",
      "Per member, with S the cache positions a step attends over and B rows (the formulas of "
      "the script's docstring, `decode_cost`):",
      "",
      "```",
      "FLOPs = B · [n_layers · (8·d² + 4·d·d_ff + 4·S·d) + 2·d·V]",
      "bytes = 4 · [n_layers · (4·d² + 2·d·d_ff + 2·d) + 2·d + d·V + min(B,V)·d]   (parameters)",
      "      + 4 · n_layers · 2·B·S·d                                          (K, V cache read)",
      "      + 4 · n_layers · 2·B·d + 4·B·V                                    (new K, V row; logits)",
      "```",
      "",
      f"Here d = {w['d_model']}, d_ff = {w['d_ff']}, n_layers = {w['n_layers']}, V = "
      f"{w['vocab_size']}, S = {w['cache_len']} (the cache the sampler carries; the step masks "
      f"it, it does not truncate). A step that read only the positions so far would attend over S = C + "
      f"T/2 = {c + t / 2:g} on average (last column). XLA bytes/FLOPs: `cost_analysis()` of "
      "the compiled decode step alone (donated cache); *in the scan* = cost of the whole "
      "sampler minus the prefill's (XLA counts a loop body once, so that difference is one "
      "step of the scan as compiled there, plus the sampling ops).",
      "",
      "| K | B | analytic MB/step | XLA MB/step (alone) | XLA MB/step (in the scan) | XLA / analytic "
      "| analytic GB/s (alone) | XLA GB/s (alone) | % of bandwidth (XLA) | analytic GFLOP/step "
      "| XLA GFLOP/step | GFLOP/s (alone) | % of matmul ceiling | analytic MB/step at S = C + T/2 |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  bw, ceil = res["bandwidth"]["gbps"], res["ceiling"]["gflops"]
  for key, r in res["rows"].items():
    k, b = key.split("x")
    k = int(k)
    a = r["analytic"]
    sec = r["decode_step_s"]
    xla_b, xla_f = r["xla"]["decode"]["bytes"], r["xla"]["decode"]["flops"]
    scan_b = r["xla"]["sample"]["bytes"] - r["xla"]["prefill"]["bytes"]
    an_b, an_f = k * a["bytes"], k * a["flops"]
    lines.append(
        f"| {k} | {b} | {an_b / 1e6:.2f} | {xla_b / 1e6:.2f} | {scan_b / 1e6:.2f} "
        f"| {xla_b / an_b:.1f}× | {an_b / sec / 1e9:.1f} | {xla_b / sec / 1e9:.1f} "
        f"| {100 * xla_b / sec / 1e9 / bw:.0f} % | {an_f / 1e9:.3f} | {xla_f / 1e9:.3f} "
        f"| {an_f / sec / 1e9:.1f} | {100 * an_f / sec / 1e9 / ceil:.0f} % "
        f"| {k * r['analytic_causal']['bytes'] / 1e6:.2f} |")
  a0 = next(iter(res["rows"].values()))["analytic"]
  lines += ["", "Analytic bytes by part for the first row (per member): " + ", ".join(
      f"{p} {v / 1e6:.3f} MB" for p, v in a0["bytes_parts"].items()) + "."]
  if res.get("profile"):
    pr = res["profile"]
    lines += ["", f"Profile of the sampler, K×B = {pr['row']} (`--profile`; {pr['op_ms_per_call']:.1f} "
              "ms of op time per call, summed over threads): by kind "
              + ", ".join(f"{k} {100 * v:.0f} %" for k, v in pr["by_kind"].items() if v >= 0.005)
              + "; largest ops " + ", ".join(f"`{k}` {100 * v:.0f} %" for k, v in pr["top_ops"].items())
              + "."]
  if res.get("compare"):
    old = res["compare"]
    lines += ["", f"## Before/after: `{old['label']}` ({old['date']}) → `{res['label']}`", "",
              f"| K | B | {old['label']} tokens/s | {res['label']} tokens/s | speed-up "
              f"| {old['label']} decode step ms | {res['label']} decode step ms |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in res["rows"].items():
      o = old["rows"].get(key)
      if not o:
        continue
      k, b = key.split("x")
      lines.append(f"| {k} | {b} | {o['tokens_per_s']:,.0f} | {r['tokens_per_s']:,.0f} "
                   f"| {r['tokens_per_s'] / o['tokens_per_s']:.2f}× "
                   f"| {1e3 * o['decode_step_s']:.3f} | {1e3 * r['decode_step_s']:.3f} |")
  lines += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
  return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------- main


def time_notes(res: dict) -> list[str]:
  """Where the sampler's time goes, one line per row, from the measured split and bytes."""
  out, t, bw = [], res["workload"]["response_len"], res["bandwidth"]["gbps"]
  for key, r in res["rows"].items():
    k, b = (int(x) for x in key.split("x"))
    s, a = r["s_per_call"], r["analytic"]
    dec = (t - 1) * r["decode_step_implied_s"]
    xla_b = r["xla"]["decode"]["bytes"]
    out.append(
        f"K={k} B={b}: prefill {100 * r['prefill_s'] / s:.0f} % of the call, the {t - 1} decode "
        f"steps {100 * dec / s:.0f} % ({1e3 * r['decode_step_implied_s']:.3f} ms each in the scan, "
        f"{1e3 * r['decode_step_s']:.3f} ms alone); a step moves {xla_b / 1e6:.1f} MB by XLA's "
        f"count ({xla_b / (k * a['bytes']):.1f}× the analytic {k * a['bytes'] / 1e6:.1f} MB, of "
        f"which the K/V cache read is {100 * a['bytes_parts']['kv_read'] / a['bytes']:.0f} %) at "
        f"{xla_b / r['decode_step_s'] / 1e9:.1f} GB/s ({100 * xla_b / r['decode_step_s'] / 1e9 / bw:.0f} % "
        f"of the measured bandwidth); attending over C + T/2 positions instead of "
        f"S = {a['s']} would cut the analytic bytes to "
        f"{100 * r['analytic_causal']['bytes'] / a['bytes']:.0f} %.")
  return out


def _ints(s: str, name: str) -> list[int]:
  try:
    out = [int(x) for x in s.split(",")]
  except ValueError:
    out = [0]
  if any(x < 1 for x in out):
    raise SystemExit(f"{name} must be comma-separated positive integers, got {s!r}")
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--lab-path", default=DEFAULT_LAB,
                  help="a built lab directory (its π_ref and eval prompts); if absent, a stand-in")
  ap.add_argument("--standin", action="store_true",
                  help="random π_ref and contexts with the lab's shapes (no lab)")
  ap.add_argument("--lab", default="small", help="lab variant for --standin")
  ap.add_argument("--batches", default="32,256,1024", help="rows per member B")
  ap.add_argument("--ks", default="1,8", help="members K")
  ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; fastest counts")
  ap.add_argument("--block-s", type=float, default=1.0, help="seconds per timed block")
  ap.add_argument("--hf-python", default=os.environ.get(HF_ENV),
                  help=f"python of the PyTorch venv (default: ${HF_ENV})")
  ap.add_argument("--hf-threads", default="2,1", help="torch thread settings for HF")
  ap.add_argument("--no-hf", action="store_true")
  ap.add_argument("--program", default="forward", choices=["forward", "train", "none"],
                  help="jit with gpo_jax.runtime.cpu.compiler_options(program=...) (forward: what "
                       "the evaluator uses; train: the train step's; none: JAX's defaults)")
  ap.add_argument("--quick", action="store_true",
                  help="smoke run: B=8, K=1,2, 1 round, short blocks, small ceiling/bandwidth arrays")
  ap.add_argument("--profile", default=None, metavar="KxB",
                  help="also profile the sampler of one row (e.g. 1x1024): op time by kind")
  ap.add_argument("--label", default="unlabelled", help="name of this run (stored in the JSON)")
  ap.add_argument("--per-context", type=int, default=1, metavar="R",
                  help="B rows = B/R contexts sampled R times each (sample(..., repeats=R): "
                       "one prefill per context), e.g. a best-of-n pool; HF still runs B rows")
  ap.add_argument("--compare", default=None, metavar="OLD.json",
                  help="add a before/after table against an earlier run's JSON")
  ap.add_argument("--write", action="store_true",
                  help=f"write {os.path.relpath(DEFAULT_MD, REPO)} and "
                       f"{os.path.relpath(DEFAULT_JSON, REPO)} (or --md / --json)")
  ap.add_argument("--md", default=None, help="markdown path (implies writing it)")
  ap.add_argument("--json", default=None, help="JSON path (implies writing it)")
  args = ap.parse_args(argv)
  if args.quick:
    args.batches, args.ks, args.repeats, args.block_s = "8", "1,2", 1, 0.1
  batches, ks = _ints(args.batches, "--batches"), _ints(args.ks, "--ks")
  hf_threads = _ints(args.hf_threads, "--hf-threads")
  if args.repeats < 1:
    raise SystemExit("--repeats must be >= 1")
  compare = None
  if args.compare:
    with open(args.compare) as f:
      compare = json.load(f)

  t_start = time.perf_counter()
  command = " ".join(shlex.quote(a) for a in ["python", os.path.relpath(__file__, REPO)]
                     + list(sys.argv[1:] if argv is None else argv))
  load_start = bench_sweep.load_avg()
  print(f"load average at start: {load_start}", flush=True)
  notes = []
  if args.standin:
    wl = standin_workload(args.lab)
  elif os.path.exists(os.path.join(args.lab_path, "lab.json")):
    wl = lab_workload(args.lab_path)
  else:
    wl = standin_workload(args.lab)
    notes.append(f"No built lab at {args.lab_path}: a random stand-in of the same shapes was "
                 "timed (same cost per call; tokens up to EOS differ).")
  options = (None if args.program == "none"
             else cpu_lib.compiler_options(None, args.program))
  t = wl.response_len

  ceiling = bench_sweep.matmul_ceiling(n=256 if args.quick else 2048)
  bandwidth = memory_bandwidth(16 if args.quick else 256)
  print(f"matmul ceiling {ceiling['gflops']:.1f} GFLOP/s, bandwidth {bandwidth}", flush=True)

  progs = {}
  for k in ks:
    for b in batches:
      p = progs[f"{k}x{b}"] = Programs(wl, k, b, options, args.per_context)
      print(f"K={k} B={b}: sampler compiled in {p.compile_s:.1f} s", flush=True)

  rounds = {key: [] for key in progs}
  hf_runs = {n: [] for n in hf_threads}
  load_rounds = []
  with tempfile.TemporaryDirectory() as tmp:
    npz = os.path.join(tmp, "contexts.npz")
    if not args.no_hf:
      export_contexts(wl, max(batches), npz)
    for rnd in range(args.repeats):
      for key, p in progs.items():
        with bench_sweep.OtherCpu() as meter:
          r = p.time(args.block_s)
        r["other_cpu"] = meter.share
        rounds[key].append(r)
        print(f"round {rnd} K={p.k} B={p.b}: {1e3 * r['s_per_call']:.2f} ms/call, "
              f"{r['tokens_per_s']:,.0f} tokens/s, prefill {1e3 * r['prefill_s']:.2f} ms, "
              f"decode step {1e3 * r['decode_step_s']:.3f} ms", flush=True)
      if not args.no_hf and not (rnd and not any(x.get("ok") for v in hf_runs.values() for x in v)):
        for n in hf_threads:
          with bench_sweep.OtherCpu() as meter:
            h = run_hf(args.hf_python, npz, batches, n, args.block_s)
          h["other_cpu"] = meter.share
          hf_runs[n].append(h)
          print(f"round {rnd} HF {n} thread(s): " + (
              ", ".join(f"B={b} {v['tokens_per_s']:,.0f} tokens/s"
                        for b, v in h["by_batch"].items()) if h.get("ok") else h["reason"]),
              flush=True)
      load_rounds.append(bench_sweep.load_avg())

  rows = {}
  for key, rs in rounds.items():
    p = progs[key]
    row = dict(min(rs, key=lambda r: r["s_per_call"]))
    row["all_ms"] = [round(1e3 * r["s_per_call"], 2) for r in rs]
    row["all_other_cpu"] = [r["other_cpu"] for r in rs]
    s = p.cache_len
    row["cache_len"] = s
    row["analytic"] = decode_cost(wl.cfg, p.b, s)
    row["analytic_causal"] = decode_cost(wl.cfg, p.b, wl.context_len + t // 2)
    row["analytic_prefill_flops"] = prefill_flops(wl.cfg, p.b // p.per_context, wl.context_len)
    row["xla"] = p.cost
    row["compile_s"] = p.compile_s
    rows[key] = row
  profile = None
  if args.profile:
    if args.profile not in progs:
      raise SystemExit(f"--profile {args.profile}: not one of {sorted(progs)}")
    profile = {"row": args.profile, **op_breakdown(progs[args.profile])}
    print("profile:", profile, flush=True)
  hf = {"ok": False, "reason": "--no-hf given"}
  if not args.no_hf:
    hf = summarise_hf(hf_runs)
    if hf.get("ok"):
      for n, rws in hf["by_threads"].items():
        for r in rws.values():
          r["threads"] = n
  load_end = bench_sweep.load_avg()

  c = wl.cfg
  res = {
      "label": args.label,
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      "command": command,
      "machine": bench_sweep.machine_info(),
      "compiler_options": options, "program": args.program,
      "ceiling": ceiling, "bandwidth": bandwidth,
      "load_start": load_start, "load_rounds": load_rounds, "load_end": load_end,
      "versions": (f"python {platform.python_version()}, jax {jax.__version__}, "
                   f"flax {flax.__version__}"
                   + (f"; PyTorch venv: torch {hf['versions']['torch']}, transformers "
                      f"{hf['versions']['transformers']}" if hf.get("ok") else "")),
      "workload": {"source": wl.source,
                   "cfg": f"V={c.vocab_size} d={c.d_model} layers={c.n_layers} "
                          f"heads={c.n_heads} d_ff={c.d_ff}",
                   "vocab_size": c.vocab_size, "d_model": c.d_model, "n_layers": c.n_layers,
                   "n_heads": c.n_heads, "d_ff": c.d_ff, "max_len": c.max_len,
                   "cache_len": cache_len(wl, batches[0]),
                   "n_params": model_lib.param_count(wl.params),
                   "context_len": wl.context_len, "response_len": t,
                   "per_context": args.per_context},
      "repeats": args.repeats, "block_s": args.block_s,
      "hf_threads": [str(n) for n in hf_threads],
      "rows": rows, "hf": hf, "notes": notes, "profile": profile,
  }
  res["verdict"] = verdict(res)
  if compare:
    res["compare"] = {"label": compare.get("label"), "date": compare.get("date"),
                      "rows": {k: {f: v[f] for f in ("tokens_per_s", "decode_step_s")}
                               for k, v in compare.get("rows", {}).items()}}
  notes += time_notes(res)
  notes += bench_sweep.contention_notes(
      [x for r in rows.values() for x in r["all_other_cpu"]],
      [load_start[0], load_end[0]] + [x[0] for x in load_rounds],
      share_tail="each row keeps its fastest round.")
  res["wall_s"] = time.perf_counter() - t_start
  bench_sweep.write_outputs(render(res), res, args.md or (DEFAULT_MD if args.write else None),
                            args.json or (DEFAULT_JSON if args.write else None))
  return 0


if __name__ == "__main__":
  sys.exit(main())
