"""Benchmarks online policy updates per second (sampling included) against HF TRL's OnlineDPOTrainer.

One online update of one member, as ``gpo_jax.algorithms.online`` runs it inside the compiled
sweep step: sample two responses to each of ``B`` prompts (``2B`` sequences of the lab's
``response_len``; online-DPO members use π's plain KV-cache sampler, IPO-MD / Nash-MD
members the mixture sampler that also decodes π_ref), score
both with the lab's gold Bradley–Terry preference (``online.gold_preference``: the gold
network forward on ``2B`` sequences), run π_ref and π forward on the sampled sequences, and
take the online-DPO (logistic) gradient step with clipping and Adam.

For each member count K it measures, in one run on one machine:

  (a) gpo_jax: the engine's step (``program.make_train_step`` + ``jit_train_step``) over K
      online-DPO members in the CPU layout of ``gpo_jax.main`` (one XLA:CPU device per
      core, the member axis over the devices, each device looping over its members,
      ``train.member_chunk=1``); every member samples its own responses;
  (b) TRL: HF TRL's ``OnlineDPOTrainer`` (``bench_trl_online.py`` in its own PyTorch venv)
      on a GPT-2 policy of the same shape, the same prompts as word strings that the
      word-level tokenizer maps to the same token ids, ``max_new_tokens`` = the response
      length, temperature 1, 2 completions per prompt, the same batch size and learning
      rate, float32, CPU, no vLLM, and a GPT-2 sequence-classification reward model of the
      gold network's shape as the preference. TRL trains one policy per process, so its
      member-updates/s is its updates/s whatever K.

Throughput is member-updates per second (K / step time) and sampled responses per second
(2B x K / step time). FLOPs are analytic (``model.flops_per_token``; XLA's cost analysis
counts the decode loop's body once, so it undercounts a sampling step). A component
breakdown (sampler, gold, forward/backward) of the K=1 step says where the time goes.
Timing runs in interleaved rounds (every gpo_jax row once, then TRL once per torch thread
setting) and each row reports its fastest round, so a shared machine's slow spells hit
both sides alike.

Run (about 3 minutes on 2 idle CPU cores with the ``small`` lab prebuilt)::

  python experiments/bench_online.py --lab-dir /tmp/lh/labs --vmap \
      --trl-python /work/venv_trl/bin/python \
      --write experiments/BENCH_ONLINE.md --json experiments/bench_online.json
"""

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import bench_sweep  # noqa: E402  (machine info, load, CPU meter, matmul ceiling, TRL venv)

from gpo_jax.algorithms import online  # noqa: E402
from gpo_jax.core import logprobs  # noqa: E402
from gpo_jax.core import model as model_lib  # noqa: E402
from gpo_jax.core import sampling  # noqa: E402
from gpo_jax.engine import members as members_lib  # noqa: E402
from gpo_jax.engine import program  # noqa: E402
from gpo_jax.runtime import cpu as cpu_lib  # noqa: E402
from gpo_jax.runtime import sharding as sharding_lib  # noqa: E402

TRL_ENV = bench_sweep.TRL_ENV
#: TRL's online-DPO β default; every member and TRL use it (β does not change the cost)
BETA = 0.1
#: configs/online.py's learning rate
LR = 3e-4


# ---------------------------------------------------------------------------- workload


@dataclasses.dataclass
class OnlineWorkload:
  """What the online step trains and scores: π_ref, the gold preference and the prompts."""

  cfg: model_lib.TransformerConfig           # policy / π_ref shape
  gold_cfg: model_lib.TransformerConfig      # gold network shape
  graphdef: Any
  params: Any                                # π_ref's parameters (every member starts here)
  rest: Any
  gold_fn: Callable                          # lab.gold_fn()[0]
  gold_params: Any                           # lab.gold_fn()[1]
  label_temp: float
  prompts: np.ndarray                        # [N, C] int32 contexts [BOS] prompt [SEP]
  response_len: int
  gold_kind: str
  source: str

  @property
  def n_prompts(self) -> int:
    return int(self.prompts.shape[0])

  @property
  def context_len(self) -> int:
    return int(self.prompts.shape[1])


def lab_config(variant: str):
  """The ``variant`` lab of ``gpo_jax.lab.presets`` with the coherent gold (configs/online.py's)."""
  from gpo_jax import lab as lab_lib
  from gpo_jax.lab import presets

  d = presets.lab_config(variant).to_dict()
  d["gold_kind"] = "coherent"
  return lab_lib.LabConfig.from_dict(d)


def lab_workload(cfg, lab_dir: str) -> OnlineWorkload:
  """The built lab: π_ref, its gold and its train prompts."""
  from gpo_jax import lab as lab_lib

  lab = lab_lib.build_or_load(cfg, lab_dir)
  graphdef, params, rest = nnx.split(lab.policy(), nnx.Param, ...)
  gold_fn, gold_params = lab.gold_fn()
  return OnlineWorkload(
      cfg=lab.policy_cfg, gold_cfg=lab.gold_cfg, graphdef=graphdef, params=params, rest=rest,
      gold_fn=gold_fn, gold_params=gold_params, label_temp=float(lab.cfg.label_temp),
      prompts=np.asarray(lab.pairs("train")["prompt"], np.int32),
      response_len=int(lab.cfg.corpus.response_len), gold_kind=lab.gold_terms.kind,
      source=f"lab `{cfg.name}` (π_ref, {lab.gold_terms.kind} gold, train prompts; "
             f"{os.path.basename(lab.path)})")


def standin_workload(cfg, seed: int = 0) -> OnlineWorkload:
  """Random π_ref, gold network and prompts with the lab's shapes (same compute, no lab build).

  The gold is built by ``gold.make_gold_fn`` with the corpus's likelihood tables and the
  lab's gold kind, so the coherence terms cost what they cost in a built lab; only the
  normalisation constants are placeholders.
  """
  from gpo_jax.lab import corpus as corpus_lib
  from gpo_jax.lab import gold as gold_lib

  rngs = nnx.Rngs(seed)
  policy = model_lib.Transformer(cfg.policy_config, rngs=rngs)
  gold = model_lib.RewardModel(cfg.gold_config, rngs=rngs)
  graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
  gold_graphdef, gold_state = nnx.split(gold)
  terms = gold_lib.GoldTerms(kind=cfg.gold_kind, coherence_weight=cfg.gold_coherence_weight,
                             cap_penalty=cfg.gold_cap_penalty)
  gold_fn = gold_lib.make_gold_fn(gold_graphdef, 0.0, 1.0, terms)
  c = cfg.corpus
  rng = np.random.default_rng(seed)
  prompts = rng.integers(5, c.vocab_size, (cfg.n_train_pairs, c.prompt_len + 2)).astype(np.int32)
  prompts[:, 0], prompts[:, -1] = 1, 2  # BOS ... SEP
  return OnlineWorkload(
      cfg=cfg.policy_config, gold_cfg=cfg.gold_config, graphdef=graphdef, params=params,
      rest=rest, gold_fn=gold_fn,
      gold_params={"net": gold_state, "tables": gold_lib.tables(corpus_lib.Corpus(c))},
      label_temp=float(cfg.label_temp), prompts=prompts, response_len=int(c.response_len),
      gold_kind=cfg.gold_kind,
      source=f"stand-in with the `{cfg.name}` lab's shapes: random π_ref, random "
             f"{cfg.gold_kind} gold network, random prompts (N={cfg.n_train_pairs})")


def make_members(k: int, n_prompts: int, batch_size: int, lr: float = LR,
                 beta: float = BETA) -> members_lib.Members:
  """K online-DPO members (logistic f, β = ``beta``), seeds 0..K-1: K independent runs."""
  return online.make_members({"online": ("logistic",)}, (beta,), seeds=tuple(range(k)),
                             lrs=(lr,), n_train=n_prompts, batch_size=batch_size)


def train_data(wl: OnlineWorkload) -> dict:
  """What ``OnlinePO.train_data`` hands the step: prompts + the shared π_ref and gold."""
  return {"prompt": jnp.asarray(wl.prompts),
          program.SHARED: {"ref": jax.tree.map(jnp.array, wl.params), "gold": wl.gold_params}}


def loss_fn(wl: OnlineWorkload, members):
  """The members' online loss, with the sampler ``OnlinePO`` picks for them (the plain one
  when no member mixes, as for the online-DPO members benchmarked here)."""
  return online.member_loss_fn(wl.graphdef, wl.rest, members.families,
                               online.gold_preference(wl.gold_fn, wl.label_temp),
                               response_len=wl.response_len,
                               mixture=online.needs_mixture(members))


# ------------------------------------------------------------------------------- FLOPs


def _trunk(cfg, seq_len: int) -> int:
  """Forward matmul FLOPs per token without the unembedding (``flops_per_token − 2·d·V``)."""
  return model_lib.flops_per_token(cfg, seq_len) - 2 * cfg.d_model * cfg.vocab_size


def analytic_flops(cfg, gold_cfg, batch_size: int, context_len: int, response_len: int) -> dict:
  """Matmul FLOPs of one member's online update in gpo_jax, by part (``model.flops_per_token``).

  ``n = 2B`` sequences of ``C`` context and ``T`` response tokens:

  * sampling (π alone: online-DPO members use the plain sampler): prefill of ``C`` tokens
    (logits at the last position only), then ``T − 1`` decode steps, each attending over
    the ``C + T − 1`` positions of the KV cache (the implementation masks, it does not
    truncate);
  * π forward + backward (3×) and π_ref forward on the ``C + T − 1`` tokens the step feeds;
  * the gold network forward on ``C + T`` tokens (a scalar head, no unembedding).
  """
  n, c, t = 2 * batch_size, context_len, response_len
  unemb = 2 * cfg.d_model * cfg.vocab_size
  prefill = n * (c * _trunk(cfg, c) + unemb)
  decode = n * (t - 1) * model_lib.flops_per_token(cfg, c + t - 1)
  seq = c + t - 1
  fwd = n * seq * model_lib.flops_per_token(cfg, seq)
  parts = {
      "sampling": prefill + decode,
      "policy_fwd_bwd": 3 * fwd,
      "ref_fwd": fwd,
      "gold_fwd": n * (c + t) * _trunk(gold_cfg, c + t),
  }
  parts["total"] = sum(parts.values())
  return parts


def analytic_flops_trl(cfg, gold_cfg, batch_size: int, context_len: int, response_len: int) -> dict:
  """The same count for TRL's OnlineDPOTrainer (HF ``generate`` and full-sequence forwards).

  Generation runs the policy only (no reference in the sampler), the prefill computing
  logits at the last position and each decode step attending over the tokens so far; the
  policy, reference and reward model read all ``C + T`` tokens (TRL feeds prompt and
  completion, then shifts). Assumes every completion runs to ``T`` tokens (a random-init
  policy rarely emits EOS early, and ``generate`` pads to the longest).
  """
  n, c, t = 2 * batch_size, context_len, response_len
  unemb = 2 * cfg.d_model * cfg.vocab_size
  gen = n * (c * _trunk(cfg, c) + unemb)
  gen += sum(n * model_lib.flops_per_token(cfg, c + i + 1) for i in range(t - 1))
  seq = c + t
  fwd = n * seq * model_lib.flops_per_token(cfg, seq)
  parts = {"sampling": gen, "policy_fwd_bwd": 3 * fwd, "ref_fwd": fwd,
           "gold_fwd": n * seq * _trunk(gold_cfg, seq)}
  parts["total"] = sum(parts.values())
  return parts


# ------------------------------------------------------------------------------ timing


class OnlineSteps:
  """The online step compiled once per member count K, in the CPU layout of ``gpo_jax.main``.

  The member axis spans the largest count of ``devices`` that divides K and each device
  loops over its members ``chunk`` at a time (None: one vmap). The compiled executable is
  called directly, so the clock never includes a compile.
  """

  def __init__(self, wl: OnlineWorkload, tcfg: program.TrainConfig, *, devices=None,
               chunk: int | None = 1, options=None):
    self.wl, self.tcfg, self.chunk, self.options = wl, tcfg, chunk, options
    self.devices = list(devices or jax.devices()[:1])
    self.host_data = train_data(wl)
    self._cache, self._placed = {}, {}

  def mesh(self, k: int):
    d = max(n for n in range(1, len(self.devices) + 1) if k % n == 0)
    return sharding_lib.make_mesh({"sweep": d}, devices=self.devices[:d], num_members=k)

  def _layout(self, members):
    k = members.size
    if k not in self._placed:
      mesh = self.mesh(k)
      init = lambda p: program.init_state(p, members, self.tcfg)  # noqa: E731
      state_sh = program.state_shardings(jax.eval_shape(init, self.wl.params), mesh, "dp")
      member_sh = NamedSharding(mesh, PartitionSpec(sharding_lib.SWEEP))
      rep = NamedSharding(mesh, PartitionSpec())
      self._placed[k] = (mesh, state_sh, member_sh, jax.device_put(self.host_data, rep))
    return self._placed[k]

  def init(self, members):
    _, state_sh, member_sh, _ = self._layout(members)
    state = jax.device_put(program.init_state(self.wl.params, members, self.tcfg), state_sh)
    hp = jax.device_put(members.hparams(), member_sh)
    jax.block_until_ready((state, hp))
    return state, hp

  def get(self, members):
    """``(compiled, xla_cost, compile_s)`` for ``members.size`` members."""
    k = members.size
    if k not in self._cache:
      mesh, state_sh, _, data = self._layout(members)
      fn = program.make_train_step(loss_fn(self.wl, members), self.tcfg,
                                   member_groups=mesh.shape[sharding_lib.SWEEP],
                                   member_chunk=self.chunk)
      jitted = program.jit_train_step(fn, state_sh, mesh, compiler_options=self.options)
      state, hp = self.init(members)
      t0 = time.perf_counter()
      compiled = jitted.lower(state, hp, data).compile()
      self._cache[k] = (compiled, bench_sweep.xla_cost(compiled), time.perf_counter() - t0)
    return self._cache[k]

  def time(self, members, warmup: int, steps: int) -> dict:
    """Median (and spread) of per-step wall times after ``warmup`` untimed steps."""
    compiled, cost, compile_s = self.get(members)
    data = self._layout(members)[3]
    state, hp = self.init(members)
    for _ in range(warmup):
      state, metrics = compiled(state, hp, data)
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, hp, data)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    m = jax.device_get(metrics)
    return {"s_per_step": sec, "member_updates_per_s": members.size / sec,
            "spread_ms": [1e3 * min(times), 1e3 * max(times)], "steps_timed": steps,
            "compile_s": compile_s, "xla_flops_reported": cost["flops"],
            "devices": int(self.mesh(members.size).shape[sharding_lib.SWEEP]),
            "finite": bool(np.all(np.isfinite(m["loss"]))),
            "diverged": int(np.sum(m["diverged"])),
            "mean_response_len": float(np.mean(m["response_len"]))}


def _median_time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def component_times(wl: OnlineWorkload, batch_size: int, repeats: int = 10) -> dict:
  """Seconds of the K=1 step's parts, each jitted and timed alone on one device (median).

  ``sampling``: π's plain sampler on ``2B`` contexts (what online-DPO members run; the
  mixture sampler of IPO-MD / Nash-MD also decodes π_ref); ``gold``: the gold
  preference of the ``B`` response pairs; ``fwd_bwd``: π's forward + backward and π_ref's
  forward on the sampled sequences (the loss's log-ratio sum). The rest of the step
  (loss, KL metrics, clipping, Adam, divergence checks, dispatch) is the step minus these.
  """
  b, t = batch_size, wl.response_len
  ctx = jnp.asarray(wl.prompts[:b])
  ctx2 = jnp.concatenate([ctx, ctx])
  params = wl.params
  ref = jax.tree.map(jnp.array, wl.params)
  key = jax.random.key(0)

  @jax.jit
  def sample(params, ref, key):
    pol = nnx.merge(wl.graphdef, params, wl.rest)
    refm = nnx.merge(wl.graphdef, ref, wl.rest)
    del refm
    return sampling.sample(pol, ctx2, key, max_new_tokens=t)

  resp, mask = sample(params, ref, key)
  pref = online.gold_preference(wl.gold_fn, wl.label_temp)
  gold = jax.jit(lambda g, r, m: pref({"gold": g}, ctx, r[:b], m[:b], r[b:], m[b:])[0])
  tokens = jnp.concatenate([ctx2, resp], axis=1)
  c = ctx.shape[1]

  def logratio(params, ref, tokens, resp, mask):
    lp = logprobs.token_logprobs(
        nnx.merge(wl.graphdef, params, wl.rest)(tokens[:, :-1])[:, c - 1:], resp)
    lr = logprobs.token_logprobs(
        jax.lax.stop_gradient(nnx.merge(wl.graphdef, ref, wl.rest)(tokens[:, :-1])[:, c - 1:]),
        resp)
    return jnp.sum((lp - lr) * mask)

  fwd_bwd = jax.jit(jax.grad(logratio))
  return {"sampling": _median_time(sample, (params, ref, key), repeats),
          "gold": _median_time(gold, (wl.gold_params, resp, mask), repeats),
          "fwd_bwd": _median_time(fwd_bwd, (params, ref, tokens, resp, mask), repeats)}


# --------------------------------------------------------------------------------- TRL


def export_prompts(wl: OnlineWorkload, n: int, tcfg: program.TrainConfig, lr: float,
                   path: str) -> None:
  """Writes the first ``n`` prompts and both model shapes for bench_trl_online.py."""
  c, g = wl.cfg, wl.gold_cfg
  meta = {"vocab_size": c.vocab_size, "d_model": c.d_model, "n_layers": c.n_layers,
          "n_heads": c.n_heads, "d_ff": c.d_ff, "max_len": c.max_len,
          "tie_embeddings": c.tie_embeddings,
          "gold": {"d_model": g.d_model, "n_layers": g.n_layers, "n_heads": g.n_heads,
                   "d_ff": g.d_ff, "max_len": g.max_len},
          "batch_size": tcfg.batch_size, "beta": BETA, "lr": lr, "grad_clip": tcfg.grad_clip,
          "response_len": wl.response_len}
  np.savez(path, meta=json.dumps(meta), prompt=np.asarray(wl.prompts[:n]))


def run_trl(python: str | None, npz: str, warmup: int, steps: int, timeout: int,
            threads: int = 0) -> dict:
  """Runs bench_trl_online.py in the TRL venv; ``ok`` False and a reason if it cannot."""
  if not python:
    return {"ok": False, "reason": f"no TRL python (pass --trl-python, set ${TRL_ENV}, or "
                                   "--make-trl-venv DIR)"}
  if not os.path.exists(python):
    return {"ok": False, "reason": f"TRL python {python} does not exist"}
  out = npz + f".{threads}.json"
  cmd = [python, os.path.join(HERE, "bench_trl_online.py"), "--data", npz, "--out", out,
         "--warmup", str(warmup), "--steps", str(steps), "--threads", str(threads)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"ok": False, "reason": f"bench_trl_online.py exceeded {timeout} s"}
  if proc.returncode != 0 or not os.path.exists(out):
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"ok": False,
            "reason": f"bench_trl_online.py failed (rc={proc.returncode}): {' | '.join(tail)}"}
  with open(out) as f:
    return json.load(f)


def summarise_trl(runs_by_threads: dict) -> dict:
  """The fastest TRL run (the baseline) with ``by_threads``: per torch thread setting, the
  fastest run's median, every run's median and other-process CPU share.

  ``runs_by_threads`` maps a ``--threads`` value to the result dicts of its runs; a failed
  run's dict (``ok`` False) is returned when no run succeeded.
  """
  by_threads, best, last = {}, None, None
  for runs in runs_by_threads.values():
    if runs:
      last = runs[-1]
    ok = [r for r in runs if r.get("ok")]
    if not ok:
      continue
    fastest = min(ok, key=lambda r: r["ms_per_step"])
    by_threads[str(fastest["torch_threads"])] = {
        "ms_per_step": fastest["ms_per_step"], "updates_per_s": fastest["updates_per_s"],
        "all_ms_per_step": [round(r["ms_per_step"], 1) for r in ok],
        "all_other_cpu": [r.get("other_cpu") for r in ok],
        "other_cpu": fastest.get("other_cpu"),
        "mean_completion_len": fastest.get("mean_completion_len")}
    if best is None or fastest["ms_per_step"] < best["ms_per_step"]:
      best = fastest
  if best is None:
    return dict(last or {"ok": False, "reason": "no TRL run"})
  out = dict(best)
  out["by_threads"] = by_threads
  out["all_ms_per_step"] = [m for v in by_threads.values() for m in v["all_ms_per_step"]]
  return out


# ------------------------------------------------------------------------------ report


def _pct(x) -> str:
  return bench_sweep._pct(x)


def _rounds(r: dict) -> str:
  return ", ".join(f"{x:.0f}" for x in r.get("all_ms_per_step", []))


def verdict(res: dict, target: float = 3.0) -> str:
  """One line on the ≥ 3× TRL per-policy-update target, with the measured ratios."""
  trl = res["trl"]
  if not trl.get("ok"):
    return f"Target ≥ {target:g}× TRL per policy update: not judged (TRL skipped: {trl.get('reason')})."
  ratios = {k: r["member_updates_per_s"] / trl["updates_per_s"] for k, r in res["by_k"].items()}
  parts = ", ".join(f"K={k}: {v:.1f}×" for k, v in ratios.items())
  one = ratios.get("1")
  met = [k for k, v in ratios.items() if v >= target]
  state = ("met at every K" if len(met) == len(ratios) else
           "missed at every K" if not met else f"met at K={','.join(met)} only")
  head = f"one policy (K=1) {one:.1f}× TRL; " if one is not None else ""
  line = (f"Target ≥ {target:g}× TRL's policy updates per second: {head}member-updates/s "
          f"in the CPU layout {parts} — {state}.")
  vm = {k: r["member_updates_per_s"] / trl["updates_per_s"]
        for k, r in res.get("by_k_vmap", {}).items()}
  if vm:
    line += " One vmap: " + ", ".join(f"K={k}: {v:.1f}×" for k, v in vm.items()) + "."
  return line


def render(res: dict) -> str:
  """The markdown report of one benchmark run."""
  m, ceil, trl, w = res["machine"], res["ceiling"], res["trl"], res["workload"]
  trl_ok = trl.get("ok", False)
  fl, fl_trl = w["flops"], w["flops_trl"]
  lines = [
      "# Online benchmark: policy updates per second, sampling included, vs HF TRL's OnlineDPOTrainer",
      "",
      f"Written by `experiments/bench_online.py` at {res['date']}.",
      "",
      f"- **Command:** `{res['command']}` (wall time {res['wall_s']:.0f} s)",
      f"- **Machine:** {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), JAX device "
      f"`{m['jax_device']}` × {m['n_devices']}. Float32 matmul ceiling "
      f"**{ceil['gflops']:.1f} GFLOP/s** (jitted `jnp.dot` {ceil['n']}³, best of 7)"
      + (f"; PyTorch's: {trl['torch_matmul_gflops']:.1f} GFLOP/s." if trl_ok else "."),
      f"- **Load average (1/5/15 min):** start {res['load_start']}, after each K "
      f"{[r['load'] for r in res['by_k'].values()]}, after TRL {res['load_trl']}.",
      f"- **Versions:** {res['versions']}.",
      f"- **Workload:** {w['source']}. Policy {w['cfg']} ({w['n_params']:,} params, KV cache "
      f"of max_len {w['max_len']}); gold network {w['gold_cfg']}. Per member-update: "
      f"{w['batch_size']} prompts of {w['context_len']} tokens → {2 * w['batch_size']} sampled "
      f"responses of {w['response_len']} tokens (temperature 1), gold Bradley–Terry soft "
      f"labels (label_temp {w['label_temp']:g}), online DPO (logistic f, β {w['beta']:g}), "
      f"Adam lr {w['lr']:g}, clip {w['grad_clip']:g}. Members: K seeds of that config "
      "(K independent runs in one step).",
      "- **Layout:** the CPU layout of `python -m gpo_jax.main` (one XLA:CPU device per core, "
      "the member axis over the devices, each looping over its members, `member_chunk=1`; "
      "K=1 runs on one device)"
      + ("; the one-vmap rows put all K members in one vmap on one device (`member_chunk=0`, "
         "the accelerator layout)" if res.get("by_k_vmap") else "")
      + f". Compiler options: {res['compiler_options']}.",
      f"- **Timing:** everything compiles first; then {res['repeats']} rounds, each timing "
      f"every gpo_jax row once ({res['warmup']} warm-up steps from π_ref, then {res['steps']} "
      "steps, each ended by `jax.block_until_ready`; the block's median counts) and running "
      f"TRL once per torch thread setting ({res['trl_warmup']} warm-up then {res['trl_steps']} "
      "optimizer steps clocked between `on_step_end` callbacks: generation, reward scoring, "
      "reference forward, backward and optimizer all inside; the run's median counts). "
      "Interleaving puts slow and fast spells of the machine on both sides alike; every row "
      "reports its fastest round, TRL's baseline is its fastest run. All rounds' medians are "
      "in the JSON"
      + (" (TRL, ms by threads: " + "; ".join(
          f"{n}: {v['all_ms_per_step']}" for n, v in trl["by_threads"].items()) + ")"
         if trl_ok else "") + ".",
      "",
      "| implementation | members per step | ms per step | member-updates/s | samples/s "
      "| analytic GFLOP/s | % of ceiling | speed-up vs TRL | other procs' CPU | ms, every round |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
  ]
  trl_ups = trl["updates_per_s"] if trl_ok else None
  rows = [(f"gpo_jax, CPU layout ({r['devices']} device(s), looping)", k, r)
          for k, r in res["by_k"].items()]
  rows += [("gpo_jax, one vmap over the members (1 device)", k, r)
           for k, r in res.get("by_k_vmap", {}).items()]
  for label, k, r in rows:
    sec = r["s_per_step"]
    gf = int(k) * fl["total"] / sec / 1e9
    speed = f"**{r['member_updates_per_s'] / trl_ups:.2f}×**" if trl_ups else "n/a"
    lines.append(
        f"| {label} | {k} | {1e3 * sec:.1f} "
        f"| {r['member_updates_per_s']:.1f} | {2 * w['batch_size'] * int(k) / sec:.0f} "
        f"| {gf:.1f} | {100 * gf / ceil['gflops']:.0f} % | {speed} | {_pct(r.get('other_cpu'))} "
        f"| {_rounds(r)} |")
  if trl_ok:
    for n, v in trl["by_threads"].items():
      ups = v["updates_per_s"]
      gf = fl_trl["total"] * ups / 1e9
      base = " (baseline)" if ups == trl_ups else ""
      lines.append(
          f"| TRL `OnlineDPOTrainer`, {n} torch thread(s){base} | 1 | {v['ms_per_step']:.1f} "
          f"| {ups:.1f} | {2 * w['batch_size'] * ups:.0f} | {gf:.1f} "
          f"| {100 * gf / ceil['gflops']:.0f} % | {ups / trl_ups:.2f}× | {_pct(v.get('other_cpu'))} "
          f"| {_rounds(v)} |")
  else:
    lines.append(f"| TRL OnlineDPOTrainer | 1 | skipped: {trl.get('reason')} | | | | | | | |")
  lines += ["", f"**Verdict:** {res['verdict']}", "", "## FLOPs per member-update (analytic)", "",
            "| part | gpo_jax GFLOP | TRL GFLOP |", "|---|---:|---:|"]
  names = {"sampling": "sampling (prefill + decode)", "policy_fwd_bwd": "π forward + backward",
           "ref_fwd": "π_ref forward", "gold_fwd": "gold / reward-model forward",
           "total": "**total**"}
  for part, label in names.items():
    lines.append(f"| {label} | {fl[part] / 1e9:.3f} | {fl_trl[part] / 1e9:.3f} |")
  comp, k1 = res.get("components"), res["by_k"].get("1")
  lines += [
      "",
      "Counted with `model.flops_per_token` (2 FLOPs per multiply-add of every matmul). "
      "gpo_jax samples online-DPO members with π alone (the mixture sampler, which also "
      "decodes π_ref, only when a member mixes) and its decode steps attend over the "
      f"C + T − 1 positions of its KV cache (max_len = {w['max_len']}); TRL's `generate` runs "
      "the policy alone over the "
      "tokens so far, and its forwards read all C + T tokens. XLA's cost analysis of the "
      f"K=1 step reports {res['by_k'].get('1', {}).get('xla_flops_reported', float('nan')) / 1e9:.3f} "
      "GFLOP, not used here: it counts a loop body (the decode scan) once and counts "
      "elementwise work the matmul count leaves out. GFLOP/s columns are the analytic "
      "count of each implementation over its measured step time. Mean response length "
      f"sampled: gpo_jax {res['by_k'][next(iter(res['by_k']))]['mean_response_len']:.1f} "
      f"tokens (its sampler always runs all {w['response_len']} decode positions), TRL "
      + (f"{trl.get('mean_completion_len')}" if trl_ok else "n/a") + " tokens.",
  ]
  if comp and k1:
    s = k1["s_per_step"]
    total = comp["sampling"] + comp["gold"] + comp["fwd_bwd"]
    lines += ["", "## Where the time goes (K=1, parts jitted and timed alone)", "",
              "| part | ms alone | share of the parts | analytic GFLOP/s |", "|---|---:|---:|---:|"]
    for part, label, f in (("sampling", "sampling: π prefill and decode scan",
                            fl["sampling"]),
                           ("gold", "gold preference (network + coherence terms)", fl["gold_fwd"]),
                           ("fwd_bwd", "π forward + backward, π_ref forward",
                            fl["policy_fwd_bwd"] + fl["ref_fwd"])):
      lines.append(f"| {label} | {1e3 * comp[part]:.1f} | {100 * comp[part] / total:.0f} % "
                   f"| {f / comp[part] / 1e9:.1f} |")
    lines.append(f"| sum of the parts | {1e3 * total:.1f} | 100 % | |")
    lines.append(f"| whole step (loss, metrics, clip + Adam included) | {1e3 * s:.1f} | "
                 f"{100 * s / total:.0f} % | {fl['total'] / s / 1e9:.1f} |")
    lines += ["", "Parts are separate programs here; inside the step XLA:CPU runs independent "
              "ops (e.g. the gold network and π_ref's forward) concurrently on the cores, so "
              "the step can take less than the parts' sum."]
  if trl_ok:
    lines += ["", "## TRL setup", "",
              f"- `{trl['trainer']}` from trl {trl['versions']['trl']}; GPT-2 policy of the same "
              f"shape ({trl['n_params']:,} params; GPT-2 adds biases and LayerNorm), random "
              f"init; reference = a frozen copy (TRL's default); reward model "
              f"`GPT2ForSequenceClassification` of the gold network's shape "
              f"({trl['n_params_reward']:,} params), random init, passed as "
              f"`{trl['reward_arg']}`.",
              f"- The same prompts as word strings (`<id>` words of a word-level tokenizer that "
              f"maps them back to the same token ids), {trl['settings']}.",
              f"- Baseline run: {trl['torch_threads']} torch thread(s); optimizer "
              f"`{trl['optim']}`; mean completion length {trl.get('mean_completion_len', 'n/a')} "
              f"tokens (EOS ends a completion early; `generate` stops when all rows have).",
              ]
  lines += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
  return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------- main


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--lab", default="small", help="lab variant of gpo_jax.lab.presets")
  ap.add_argument("--lab-dir", default=os.path.join(REPO, "runs", "labs"),
                  help="where the built lab is cached")
  ap.add_argument("--build-lab", action="store_true",
                  help="build the lab if it is not in --lab-dir (default: use a stand-in)")
  ap.add_argument("--standin", action="store_true",
                  help="random policy, gold and prompts with the lab's shapes (no lab)")
  ap.add_argument("--ks", default="1,4,8", help="comma-separated member counts K")
  ap.add_argument("--batch-size", type=int, default=16, help="prompts per member per step")
  ap.add_argument("--lr", type=float, default=LR)
  ap.add_argument("--warmup", type=int, default=3, help="untimed steps before the clock")
  ap.add_argument("--steps", type=int, default=20, help="timed steps per round; their median counts")
  ap.add_argument("--repeats", type=int, default=3,
                  help="rounds; each times every configuration once and runs TRL once per "
                       "thread setting; the fastest round of each configuration counts")
  ap.add_argument("--vmap", action="store_true",
                  help="also time K > 1 as one vmap over the members on one device "
                       "(member_chunk=0, the accelerator layout)")
  ap.add_argument("--no-components", action="store_true", help="skip the K=1 time breakdown")
  ap.add_argument("--trl-python", default=os.environ.get(TRL_ENV),
                  help=f"python of a venv with torch + trl (default: ${TRL_ENV})")
  ap.add_argument("--make-trl-venv", metavar="DIR", default=None,
                  help="first create the TRL venv at DIR (bench_sweep.make_trl_venv)")
  ap.add_argument("--trl-warmup", type=int, default=3)
  ap.add_argument("--trl-steps", type=int, default=30)
  ap.add_argument("--trl-threads", default="0,1",
                  help="torch thread settings to run TRL under (0: torch's default); the "
                       "fastest counts")
  ap.add_argument("--no-trl", action="store_true")
  ap.add_argument("--devices", type=int, default=0,
                  help="XLA:CPU devices (default: one per available core)")
  ap.add_argument("--write", default=None, metavar="MD", help="write the markdown report here")
  ap.add_argument("--json", default=None, help="also dump the raw results as JSON")
  args = ap.parse_args(argv)
  try:
    ks = [int(k) for k in args.ks.split(",")]
  except ValueError:
    ks = [0]
  try:
    trl_threads = [int(n) for n in args.trl_threads.split(",")]
  except ValueError:
    trl_threads = [-1]
  if any(n < 0 for n in trl_threads):
    raise SystemExit(f"--trl-threads must be comma-separated integers >= 0, got {args.trl_threads!r}")
  if (any(k < 1 for k in ks) or args.steps < 1 or args.warmup < 1 or args.batch_size < 1
      or args.repeats < 1):
    raise SystemExit("--ks must be positive integers and --steps, --warmup, --batch-size, "
                     "--repeats >= 1")

  # Before any JAX computation: the CPU device count is fixed when the backend starts.
  jax.config.update("jax_num_cpu_devices", args.devices or cpu_lib.available_cores())
  t_start = time.perf_counter()
  command = " ".join(shlex.quote(a) for a in ["python", os.path.relpath(__file__, REPO)]
                     + list(sys.argv[1:] if argv is None else argv))
  load_start = bench_sweep.load_avg()
  print(f"load average at start: {load_start}", flush=True)
  if args.make_trl_venv:
    args.trl_python = bench_sweep.make_trl_venv(args.make_trl_venv)

  notes = []
  cfg = lab_config(args.lab)
  lab_path = os.path.join(args.lab_dir, cfg.dirname)
  if args.standin:
    wl = standin_workload(cfg)
  elif args.build_lab or os.path.exists(os.path.join(lab_path, "lab.json")):
    wl = lab_workload(cfg, args.lab_dir)
  else:
    wl = standin_workload(cfg)
    notes.append(f"No built lab at {lab_path} (pass --build-lab to build it): a stand-in of "
                 "the same shapes was timed; the cost per step is the same.")
  if args.batch_size > wl.n_prompts:
    raise SystemExit(f"--batch-size {args.batch_size} exceeds the {wl.n_prompts} prompts")
  tcfg = program.TrainConfig(batch_size=args.batch_size, grad_clip=1.0, warmup_steps=0)
  options = cpu_lib.compiler_options()

  ceiling = bench_sweep.matmul_ceiling()
  print(f"matmul ceiling: {ceiling['gflops']:.1f} GFLOP/s", flush=True)
  # Everything compiles first; then each round times every gpo_jax configuration once (a
  # block of --steps steps from π_ref) and runs TRL once per thread setting, so slow and
  # fast spells of a shared machine fall on both sides alike. Each configuration's
  # fastest round counts, for gpo_jax as for TRL.
  looped = OnlineSteps(wl, tcfg, devices=jax.devices(), chunk=1, options=options)
  vmapped = OnlineSteps(wl, tcfg, devices=jax.devices()[:1], chunk=None, options=options)
  configs = [("by_k", k, looped) for k in ks]
  if args.vmap:
    configs += [("by_k_vmap", k, vmapped) for k in ks if k > 1]
  for table, k, steps in configs:
    compile_s = steps.get(make_members(k, wl.n_prompts, args.batch_size, args.lr))[2]
    print(f"K={k} ({table}): compiled in {compile_s:.1f} s", flush=True)

  trl = {"ok": False, "reason": "--no-trl given"}
  n_trl = args.batch_size * (args.trl_warmup + args.trl_steps)
  if not args.no_trl and n_trl > wl.n_prompts:
    raise SystemExit(f"TRL needs {n_trl} prompts, the workload has {wl.n_prompts}.")
  blocks = {(table, k): [] for table, k, _ in configs}
  trl_runs = {n: [] for n in trl_threads}
  with tempfile.TemporaryDirectory() as tmp:
    npz = os.path.join(tmp, "prompts.npz")
    if not args.no_trl:
      export_prompts(wl, n_trl, tcfg, args.lr, npz)
    for rnd in range(args.repeats):
      for table, k, steps in configs:
        members = make_members(k, wl.n_prompts, args.batch_size, args.lr)
        with bench_sweep.OtherCpu() as meter:
          row = steps.time(members, args.warmup, args.steps)
        row["other_cpu"], row["load"] = meter.share, bench_sweep.load_avg()
        blocks[(table, k)].append(row)
        print(f"round {rnd}: K={k} ({table}) {1e3 * row['s_per_step']:.1f} ms/step, "
              f"{row['member_updates_per_s']:.1f} member-updates/s on {row['devices']} "
              f"device(s), load {row['load']}", flush=True)
      if args.no_trl or (rnd and not any(r.get("ok") for v in trl_runs.values() for r in v)):
        continue
      for n in trl_threads:
        with bench_sweep.OtherCpu() as meter:
          r = run_trl(args.trl_python, npz, args.trl_warmup, args.trl_steps, timeout=600,
                      threads=n)
        r["other_cpu"] = meter.share
        trl_runs[n].append(r)
        print(f"round {rnd}: TRL {n or 'default'} thread(s): "
              f"{r.get('ms_per_step', r.get('reason'))}", flush=True)
  by_k, by_k_vmap = {}, {}
  for (table, k), rows in blocks.items():
    row = dict(min(rows, key=lambda r: r["s_per_step"]))
    row["all_ms_per_step"] = [round(1e3 * r["s_per_step"], 1) for r in rows]
    row["all_other_cpu"] = [r["other_cpu"] for r in rows]
    if not all(r["finite"] and not r["diverged"] for r in rows):
      notes.append(f"K={k} ({table}): a timed step gave a non-finite loss or diverged members.")
    (by_k if table == "by_k" else by_k_vmap)[str(k)] = row
  if not args.no_trl:
    trl = summarise_trl(trl_runs)
  components = None
  if not args.no_components:
    components = component_times(wl, args.batch_size)
    print("K=1 parts (ms):", {k: round(1e3 * v, 2) for k, v in components.items()}, flush=True)
  load_trl = bench_sweep.load_avg()

  c, g = wl.cfg, wl.gold_cfg
  shape = lambda m: (f"V={m.vocab_size} d={m.d_model} layers={m.n_layers} "  # noqa: E731
                     f"heads={m.n_heads} d_ff={m.d_ff}")
  res = {
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      "command": command,
      "machine": bench_sweep.machine_info(),
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
          "source": wl.source, "cfg": shape(c), "gold_cfg": shape(g), "max_len": c.max_len,
          "n_params": model_lib.param_count(wl.params), "batch_size": args.batch_size,
          "context_len": wl.context_len, "response_len": wl.response_len,
          "label_temp": wl.label_temp, "gold_kind": wl.gold_kind, "beta": BETA, "lr": args.lr,
          "grad_clip": tcfg.grad_clip,
          "flops": analytic_flops(c, g, args.batch_size, wl.context_len, wl.response_len),
          "flops_trl": analytic_flops_trl(c, g, args.batch_size, wl.context_len,
                                          wl.response_len),
      },
      "warmup": args.warmup, "steps": args.steps, "trl_warmup": args.trl_warmup,
      "trl_steps": args.trl_steps, "repeats": args.repeats,
      "by_k": by_k, "by_k_vmap": by_k_vmap, "components": components, "trl": trl, "notes": notes,
  }
  res["verdict"] = verdict(res)
  if components:
    total = sum(components.values())
    part = max(components, key=components.get)
    fl = res["workload"]["flops"]
    notes.append(
        f"Largest part of the K=1 step: {part} ({100 * components[part] / total:.0f} % of the "
        f"parts' time). Sampling runs at {fl['sampling'] / components['sampling'] / 1e9:.1f} "
        f"GFLOP/s: {wl.response_len - 1} sequential decode steps of {2 * args.batch_size}-row "
        "matmuls (π alone for online-DPO members), latency- not FLOP-bound.")
  shares = [r.get("other_cpu") for r in by_k.values()] + [trl.get("other_cpu")]
  notes += bench_sweep.contention_notes(
      shares, [load_start[0], load_trl[0]] + [r["load"][0] for r in by_k.values()])
  res["wall_s"] = time.perf_counter() - t_start
  bench_sweep.write_outputs(render(res), res, args.write, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
