"""Evaluation against training in the default sweep (``configs/cpu_sweep.py``), side by side in one process.

What it answers (issue 15): what share of the main job's train/eval loop is evaluation with
all 256 eval prompts, what the evaluation spends its FLOPs on, and what measuring while
sampling buys over the two-pass path it replaced (``Evaluator.two_pass``: sample, then run
π and π_ref again over the finished sequences, and the gold over whole sequences; now π_ref
decodes beside π inside the sampler and the gold runs over the response positions after the
eval contexts' cached states). The per-device member groups (``Evaluator._by_device``,
1.84× over one ``lax.map`` over the sweep-sharded member axis) were measured by this script's
previous version (git history of BENCH_EVAL.md).

It builds the run exactly as ``python -m gpo_jax.main --config configs/cpu_sweep.py`` does
(``gpo_jax.run.loop.setup``, the algorithm's evaluator, the same CPU devices and mesh) and,
after compiling each program once:

* times the train step (median of blocks of ``eval.every`` consecutive steps);
* times one evaluation of all members (median of ``--repeats``) with the current evaluator
  and with the two-pass path (the same evaluator class, ``two_pass=True``), interleaved
  round by round, and checks the two agree;
* times the evaluation and the train step under the other compiler options too (side by
  side, interleaved the same way): the evaluation compiled with JAX's default options (what
  the evaluator compiled before it took the platform's forward-program options) and with
  the train step's options, the train step with the forward programs' options
  (``gpo_jax.runtime.cpu.compiler_options``; ``--no-variants`` skips them);
* reads XLA's FLOP count of both programs (``cost_analysis``; loop bodies counted once, so
  the per-member evaluation FLOPs are also counted analytically, below);
* projects the loop's evaluation share for the config's schedule: ``E·t_eval /
  (E·t_eval + S·t_step)`` with ``E`` evaluations and ``S`` steps (the π_ref pool, once per
  run, and compilation are reported separately).

Analytic FLOPs of one evaluation, per member (``E`` prompts × ``n`` samples, contexts of
``C`` and responses of ``T`` tokens, ``L = C + T``, ``F(model)`` = forward FLOPs per token =
2 × matmul parameters + the attention terms): π and π_ref sampled side by side
``2·(E·C + E·n·T)·F(π)`` (each prompt prefilled once for its ``n`` samples); gold over the
responses ``E·n·G(gold)`` (``gold_response_flops``: the last block only at the read
position; the contexts' ``E·C·F(gold)`` once per run, not counted); offline diagnostics
``(1 + 1/chunk)·P·pair`` on ``P`` test pairs (each prompt once, both responses after it:
``model.prompt_response_logprobs``; ``pair`` below). The two-pass path: sampling ``E·n·L·F(π)``,
policy and π_ref forward ``2·E·n·L·F(π)``, gold ``E·n·L·F(gold)``, the same offline
diagnostics. The train step per member: ``3 · B · pair`` (forward and backward of ``B``
pairs, each prompt once; π_ref's log-probs are read from the data), with ``pair`` the
forward FLOPs of one pair as ``bench_sweep.step_analytic_flops`` counts them: ``C``
prompt positions attending ``C`` keys, then ``2·(T − 1)`` response positions attending
``C + T − 1``.

Run (the ``small`` lab is built on first use, ~2 min)::

  python experiments/bench_eval.py --lab-root /tmp/labs --write   # -> experiments/BENCH_EVAL.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from unittest import mock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
sys.path.insert(0, REPO)

import bench_sweep  # noqa: E402  (machine info, load average, XLA cost: one place)

OUT_MD = os.path.join(REPO, "experiments", "BENCH_EVAL.md")
OUT_JSON = os.path.join(REPO, "experiments", "bench_eval.json")


def forward_flops_per_token(cfg, context: int) -> float:
  """2 × matmul parameters + attention (QKᵀ and PV over ``context`` keys) per token."""
  d, f, l, v = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.vocab_size
  per_layer = 2 * (d * 3 * d + d * d + 2 * d * f) + 2 * 2 * context * d
  return float(l * per_layer + 2 * d * v)


def gold_flops_per_token(cfg, context: int) -> float:
  d, f, l = cfg.d_model, cfg.d_ff, cfg.n_layers
  return float(l * (2 * (4 * d * d + 2 * d * f) + 4 * context * d) + 2 * d)


def gold_response_flops(cfg, c: int, t: int) -> float:
  """Gold FLOPs of one response of ``t`` tokens after a cached context of ``c``
  (``RewardModel.score_after``): every block but the last over the ``t`` positions (keys
  ``c + t/2`` on average); the last block's keys and values over ``t``, its query,
  attention, output projection and MLP at the read position only; the scalar head."""
  d, f, l = cfg.d_model, cfg.d_ff, cfg.n_layers
  full = 2 * (4 * d * d + 2 * d * f) + 4 * (c + t // 2) * d
  last = t * 2 * (2 * d * d) + 2 * (2 * d * d + 2 * d * f) + 4 * (c + t) * d
  return float(t * (l - 1) * full + last + 2 * d)


def analytic(config, lab, m: int) -> dict:
  """Per-evaluation and per-step FLOPs of the config, by part (module docstring)."""
  from gpo_jax.lab.config import LabConfig
  lc = LabConfig.from_dict(config.lab)
  pc, gc = lc.policy_config, lc.gold_config
  c = int(lab.eval_prompts.shape[1])
  t = int(lc.corpus.response_len)
  length = c + t
  e = config.eval.n_prompts or len(lab.eval_prompts)
  n = config.eval.samples_per_prompt
  f_pi = forward_flops_per_token(pc, length // 2)
  f_gold = gold_flops_per_token(gc, length // 2)
  p = min(config.eval.n_test_pairs or 10**9, len(lab.pairs("test")["chosen"]))
  chunk = min(config.eval.member_chunk, m)
  # Each prompt once, both responses' T - 1 positions after it (bench_sweep's count, the
  # same as bench_accel's): a forward is a third of the train step's forward + backward.
  pair_fwd = bench_sweep.step_analytic_flops(pc, 1, c, t) / 3
  offline = (1 + 1 / chunk) * p * pair_fwd
  parts = {"π and π_ref sampled side by side": 2 * (e * c + e * n * t) * f_pi,
           "gold (response positions)": e * n * gold_response_flops(gc, c, t),
           "offline diagnostics": offline}
  two_pass = {"sampling": e * n * length * f_pi,
              "policy + π_ref forward": 2 * e * n * length * f_pi,
              "gold": e * n * length * f_gold, "offline diagnostics": offline}
  per_eval = {k: m * v for k, v in parts.items()}
  per_eval_two = {k: m * v for k, v in two_pass.items()}
  step = m * 3 * config.train.batch_size * pair_fwd
  return {"eval_parts": per_eval, "eval_total": sum(per_eval.values()), "step": step,
          "eval_parts_two_pass": per_eval_two,
          "eval_total_two_pass": sum(per_eval_two.values())}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--lab-root", default=os.path.join(REPO, "runs", "labs"))
  ap.add_argument("--variant", default="small", help="configs/cpu_sweep.py argument (lab)")
  ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; median counts")
  ap.add_argument("--step-blocks", type=int, default=3, help="blocks of eval.every steps")
  ap.add_argument("--no-variants", action="store_true",
                  help="skip the other compiler options' evaluations and train step")
  ap.add_argument("--write", action="store_true", help=f"write {OUT_MD} and {OUT_JSON}")
  ap.add_argument("--md", default=OUT_MD)
  ap.add_argument("--json", default=OUT_JSON)
  args = ap.parse_args(argv)

  config = bench_sweep.sweep_config(args.variant)
  from gpo_jax.run import config as config_lib
  from gpo_jax.runtime import cpu as cpu_lib
  cpu_lib.configure_devices(config.mesh.cpu_devices, config_lib.member_count(config))
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec
  from gpo_jax import lab as lab_lib
  from gpo_jax.engine import program
  from gpo_jax.run import loop
  from gpo_jax.core import sequences

  load0 = bench_sweep.load_avg()
  t0 = time.time()
  lab = lab_lib.build_or_load(lab_lib.LabConfig.from_dict(config.lab), args.lab_root,
                              log=print)
  s = loop.setup(config, lab, log=print)
  m = s.members.size
  an = analytic(config, lab, m)
  replicated = NamedSharding(s.mesh, PartitionSpec())
  state = jax.jit(s.init_fn, out_shardings=s.state_shardings)(s.params)
  ev = s.algorithm.evaluator(lab, s.graphdef, s.rest, s.members, config, replicated)
  t = time.perf_counter()
  ev.artifacts()
  t_ref = time.perf_counter() - t

  # The replaced path: the same evaluator class measuring in a second pass.
  old = s.algorithm.evaluator(lab, s.graphdef, s.rest, s.members, config, replicated)
  old.ref_gold_ExN, old.ref_gold_E, old.ref_gold_mean = ev.ref_gold_ExN, ev.ref_gold_E, ev.ref_gold_mean
  old.two_pass = True

  # The same evaluation and train step compiled with other options (module docstring).
  options = {"forward": ev.compiler_options,
             "train": cpu_lib.compiler_options(jax.default_backend(), "train")}
  evals = {"eval": ev, "eval_two_pass": old}
  steps = {"step": s.step_fn}
  if not args.no_variants:
    for name, opts in (("eval_jax_default", None), ("eval_train_options", options["train"])):
      e = s.algorithm.evaluator(lab, s.graphdef, s.rest, s.members, config, replicated)
      e.ref_gold_ExN, e.ref_gold_E, e.ref_gold_mean = ev.ref_gold_ExN, ev.ref_gold_E, ev.ref_gold_mean
      e.compiler_options = opts
      evals[name] = e
    steps["step_forward_options"] = program.jit_train_step(
        s.train_step, s.state_shardings, s.mesh, compiler_options=options["forward"])
    # The former train step: chosen and rejected each run whole (prompt included), traced
    # with that path swapped in (the jitted step keeps what it traced on its first call). A
    # function of its own: jit would otherwise reuse the step's trace of the same function.
    steps["step_whole_sequences"] = program.jit_train_step(
        lambda *a: s.train_step(*a), s.state_shardings, s.mesh,
        compiler_options=options["train"])
  states = {name: state if name == "step" else
            jax.jit(s.init_fn, out_shardings=s.state_shardings)(s.params) for name in steps}

  compile_s = {}

  def evaluate(e, step):
    return e(states["step"]["params"], s.hparams, step)

  for name, e in evals.items():
    t = time.perf_counter()
    evaluate(e, 0)
    compile_s[name] = time.perf_counter() - t
  for name, fn in steps.items():
    t = time.perf_counter()
    with (mock.patch.object(sequences, "chosen_rejected_logps", sequences.whole_sequence_logps)
          if name == "step_whole_sequences" else contextlib.nullcontext()):
      states[name], _ = fn(states[name], s.hparams, s.data)
    jax.block_until_ready(states[name])
    compile_s[name] = time.perf_counter() - t

  every = int(config.eval.every)
  steps_total = int(config.train.steps)
  n_evals = len([st for st in range(steps_total + 1) if st % every == 0 or st == steps_total])
  times = {name: [] for name in list(evals) + list(steps)}
  agree = {name: 0.0 for name in evals if name != "eval"}
  for r in range(args.repeats):
    results = {}
    for name, e in evals.items():
      t = time.perf_counter()
      results[name] = evaluate(e, r + 1)
      times[name].append(time.perf_counter() - t)
    for name in agree:
      for k in ("gold/reward", "kl", "entropy"):
        agree[name] = max(agree[name], float(np.max(np.abs(
            np.asarray(results["eval"][k]) - np.asarray(results[name][k])))))
    if r < args.step_blocks:
      for name, fn in steps.items():
        jax.block_until_ready(states[name])
        t = time.perf_counter()
        for _ in range(every):
          states[name], _ = fn(states[name], s.hparams, s.data)
        jax.block_until_ready(states[name])
        times[name].append((time.perf_counter() - t) / every)
  state = states["step"]
  t_eval, t_old, t_step = times["eval"], times["eval_two_pass"], times["step"]

  ce = float(bench_sweep.xla_cost(ev._run(state["params"], s.hparams, 0, lower=True)
                                  .compile())["flops"])
  cs = float(bench_sweep.xla_cost(
      s.step_fn.lower(state, s.hparams, s.data).compile())["flops"])
  cs_whole = None
  if "step_whole_sequences" in steps:
    with mock.patch.object(sequences, "chosen_rejected_logps", sequences.whole_sequence_logps):
      cs_whole = float(bench_sweep.xla_cost(steps["step_whole_sequences"].lower(
          state, s.hparams, s.data).compile())["flops"])
  te, to, ts = statistics.median(t_eval), statistics.median(t_old), statistics.median(t_step)
  share = lambda t_e: n_evals * t_e / (n_evals * t_e + steps_total * ts)  # noqa: E731
  res = {
      "config": f"configs/cpu_sweep.py:{args.variant}", "members": m,
      "mesh": {k: int(v) for k, v in s.mesh.shape.items()},
      "eval_prompts": int(config.eval.n_prompts or len(lab.eval_prompts)),
      "samples_per_prompt": int(config.eval.samples_per_prompt),
      "steps": steps_total, "every": every, "evaluations": n_evals,
      "t_step_s": ts, "t_eval_s": te, "t_eval_two_pass_s": to, "t_ref_pool_s": t_ref,
      "t_step_all": t_step, "t_eval_all": t_eval, "t_eval_two_pass_all": t_old,
      "compile_s": compile_s, "share": share(te), "share_two_pass": share(to),
      "speedup": to / te, "max_abs_diff": agree["eval_two_pass"],
      "options": options,
      "variants": {name: {"median_s": statistics.median(times[name]), "all": times[name],
                          "compile_s": compile_s[name],
                          "max_abs_diff": agree.get(name)}
                   for name in times if name not in ("eval", "eval_two_pass", "step")},
      "xla_flops_eval": ce, "xla_flops_step": cs, "xla_flops_step_whole": cs_whole,
      "analytic": an,
      "gflops_eval": an["eval_total"] / te / 1e9, "gflops_step": an["step"] / ts / 1e9,
      "machine": bench_sweep.machine_info(), "load_before": load0,
      "load_after": bench_sweep.load_avg(), "wall_s": time.time() - t0,
      "jax": jax.__version__,
      "command": "python experiments/bench_eval.py " + " ".join(argv if argv is not None
                                                                else sys.argv[1:]),
  }
  md = render(res)
  print(md)
  if args.write:
    with open(args.md, "w") as f:
      f.write(md)
    with open(args.json, "w") as f:
      json.dump(res, f, indent=1, sort_keys=True, default=float)
  return 0


def _g(x) -> str:
  return f"{x / 1e9:.1f}"


_VARIANTS = {
    "eval_jax_default": "one evaluation, JAX's default compiler options (the evaluator before)",
    "eval_train_options": "one evaluation, the train step's compiler options",
    "step_forward_options": "train step, the forward programs' compiler options",
    "step_whole_sequences": "train step, chosen and rejected each run whole (the former path)",
}


def render(r: dict) -> str:
  an = r["analytic"]
  lines = [
      "# Evaluation vs training in the default sweep", "",
      "Written by `experiments/bench_eval.py` (see its docstring for what is timed and counted):", "",
      "```bash", r.get("command", "python experiments/bench_eval.py --write"), "```", "",
      f"Machine: {r['machine']['cpu']}, {r['machine']['cores_usable']} usable cores, "
      f"{r['machine']['n_devices']} XLA:CPU devices, jax {r['jax']}; load average before "
      f"{r['load_before'][0]:.2f}, after {r['load_after'][0]:.2f}. Whole script "
      f"{r['wall_s']:.0f} s.", "",
      f"`{r['config']}`: {r['members']} members on mesh {r['mesh']}, {r['steps']} steps, an "
      f"evaluation every {r['every']} steps ({r['evaluations']} in all) of every member on "
      f"{r['eval_prompts']} prompts × {r['samples_per_prompt']} sample(s).", "",
      "| | seconds (median) | all rounds | compile s |", "|---|---:|---|---:|",
      f"| train step | {r['t_step_s']:.3f} | {', '.join(f'{x:.3f}' for x in r['t_step_all'])} | "
      f"{r['compile_s']['step']:.1f} |",
      f"| one evaluation (measured while sampling, the code) | {r['t_eval_s']:.2f} | "
      f"{', '.join(f'{x:.2f}' for x in r['t_eval_all'])} | {r['compile_s']['eval']:.1f} |",
      f"| one evaluation (two passes: the replaced path) | {r['t_eval_two_pass_s']:.2f} | "
      f"{', '.join(f'{x:.2f}' for x in r['t_eval_two_pass_all'])} | "
      f"{r['compile_s']['eval_two_pass']:.1f} |",
  ]
  variants = r.get("variants", {})
  for name, label in _VARIANTS.items():
    if name in variants:
      v = variants[name]
      digits = 3 if name.startswith("step") else 2
      lines.append(f"| {label} | {v['median_s']:.{digits}f} | "
                   f"{', '.join(f'{x:.{digits}f}' for x in v['all'])} | {v['compile_s']:.1f} |")
  lines += [
      f"| π_ref pool (once per run) | {r['t_ref_pool_s']:.1f} | | |", "",
      f"- **Evaluation share of the train/eval loop** (projected for the schedule, compile "
      f"excluded): **{100 * r['share']:.0f} %** ({100 * r['share_two_pass']:.0f} % with the "
      f"replaced path). Goal ≤ 20 %: **{'MET' if r['share'] <= 0.2 else 'MISSED'}**.",
      f"- Measured while sampling vs two passes, same run: **{r['speedup']:.2f}×** faster "
      f"evaluation; the two agree to {r['max_abs_diff']:.1e} (gold/reward, kl, entropy).",
  ]
  if variants:
    ev_default = variants.get("eval_jax_default", {}).get("median_s")
    ev_train = variants.get("eval_train_options", {}).get("median_s")
    step_fwd = variants.get("step_forward_options", {}).get("median_s")
    parts = []
    if ev_default:
      parts.append(f"the evaluation with the forward programs' options is **{ev_default / r['t_eval_s']:.2f}×** "
                   f"faster than with JAX's default options (the evaluator before; agree to "
                   f"{variants['eval_jax_default']['max_abs_diff']:.1e})")
    if ev_train:
      parts.append(f"{ev_train / r['t_eval_s']:.2f}× faster than with the train step's options")
    if step_fwd:
      parts.append(f"the train step with its own options is {step_fwd / r['t_step_s']:.2f}× "
                   f"faster than with the forward programs' options")
    lines.append(f"- Compiler options ({r.get('options')}), same run: " + "; ".join(parts) + ".")
    whole = variants.get("step_whole_sequences", {}).get("median_s")
    if whole:
      lines.append(
          f"- Each prompt run once per pair (`model.prompt_response_logprobs`), same run: the "
          f"train step is **{whole / r['t_step_s']:.2f}×** faster than with chosen and rejected "
          f"each run whole (XLA FLOPs {_g(r['xla_flops_step'])} G vs "
          f"{_g(r['xla_flops_step_whole'])} G per step).")
  lines += [
      f"- XLA FLOPs (loop bodies counted once): evaluation {_g(r['xla_flops_eval'])} G, "
      f"train step {_g(r['xla_flops_step'])} G.", "",
      "Analytic FLOPs (module docstring) — what one evaluation costs against one train step:", "",
      "| part | GFLOP per evaluation | share |", "|---|---:|---:|"]
  for k, v in an["eval_parts"].items():
    lines.append(f"| {k} | {_g(v)} | {100 * v / an['eval_total']:.0f} % |")
  lines += [f"| **evaluation** | **{_g(an['eval_total'])}** | |"]
  if "eval_total_two_pass" in an:
    lines.append("| (the two-pass path: " + ", ".join(
        f"{k} {_g(v)}" for k, v in an["eval_parts_two_pass"].items())
        + f"; in all **{_g(an['eval_total_two_pass'])}**) | | |")
  lines += [
            f"| train step (all members) | {_g(an['step'])} | |", "",
            f"Achieved: evaluation {r['gflops_eval']:.1f} GFLOP/s, train step "
            f"{r['gflops_step']:.1f} GFLOP/s (analytic FLOPs over measured time).", "",
            f"One evaluation costs as many FLOPs as {an['eval_total'] / an['step']:.1f} train "
            f"steps; with an evaluation every {r['every']} steps the FLOP share alone is "
            f"{100 * an['eval_total'] / (an['eval_total'] + r['every'] * an['step']):.0f} %.", "",
            f"At the measured times an evaluation share of 20 % needs an evaluation every "
            f"{math.ceil(4 * r['t_eval_s'] / r['t_step_s'])} steps or more (4 × t_eval / t_step), "
            f"or an evaluation {r['t_eval_s'] / (0.25 * r['every'] * r['t_step_s']):.1f}× cheaper "
            f"at every {r['every']} steps.", ""]
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
