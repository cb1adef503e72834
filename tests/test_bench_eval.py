"""experiments/bench_eval.py: its FLOP formulas against XLA's count, and its report (no timing assertions)."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from gpo_jax.core import model as model_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))
import bench_eval  # noqa: E402

CFG = model_lib.TransformerConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, d_ff=128,
                                  max_len=24)


@pytest.mark.parametrize("length", [8, 20])
def test_forward_flops_match_xla(length):
  """Per-token forward FLOPs of the policy formula (2 × matmul params + attention over
  ``length/2`` keys on average + logits) against XLA's count of a full forward."""
  m = model_lib.Transformer(CFG, rngs=nnx.Rngs(0))
  g, p, r = nnx.split(m, nnx.Param, ...)
  b = 16
  x = jnp.ones((b, length), jnp.int32)
  compiled = jax.jit(lambda p, x: nnx.merge(g, p, r)(x)).lower(p, x).compile()
  xla = bench_eval.bench_sweep.xla_cost(compiled)["flops"]
  # the model computes logits at every position; causal attention is computed over all keys
  want = b * length * (bench_eval.forward_flops_per_token(CFG, length)
                       - 2 * 2 * (length // 2) * CFG.d_model * CFG.n_layers
                       + 2 * 2 * length * CFG.d_model * CFG.n_layers)
  assert 0.95 <= xla / want <= 1.25, (xla, want)


def _result(share):
  return {
      "machine": {"cpu": "test cpu", "cores_usable": 2, "n_devices": 2}, "jax": jax.__version__,
      "load_before": (0.1, 0.1, 0.1), "load_after": (0.2, 0.1, 0.1), "wall_s": 10.0,
      "config": "configs/cpu_sweep.py:small", "members": 36, "mesh": {"sweep": 2},
      "steps": 150, "every": 25, "evaluations": 7, "eval_prompts": 256, "samples_per_prompt": 1,
      "t_step_s": 1.0, "t_step_all": [1.0], "t_eval_s": 2.0, "t_eval_all": [2.0],
      "t_eval_two_pass_s": 4.0, "t_eval_two_pass_all": [4.0], "t_ref_pool_s": 3.0,
      "compile_s": {"step": 1.0, "eval": 2.0, "eval_two_pass": 2.0}, "share": share,
      "share_two_pass": 0.5, "speedup": 2.0, "max_abs_diff": 1e-7,
      "xla_flops_eval": 1e10, "xla_flops_step": 1e9,
      "analytic": {"eval_parts": {"gold": 3e10, "sampling": 1e10}, "eval_total": 4e10,
                   "step": 2e9},
      "gflops_eval": 20.0, "gflops_step": 2.0}


def test_report_states_the_goal_and_the_flop_share():
  md = bench_eval.render(_result(0.35))
  assert "MISSED" in md and "35 %" in md and "2.00×" in md
  assert "| gold | 30.0 | 75 % |" in md
  # one evaluation = 20 steps of FLOPs; every 25 steps -> 40e9 / (40e9 + 25 * 2e9) = 44 %
  assert "20.0 train steps" in md and "FLOP share alone is 44 %" in md
  assert "MET" in bench_eval.render(_result(0.15))


def test_report_gives_the_compiler_option_variants_side_by_side():
  r = _result(0.3)
  r["options"] = {"forward": {"x": "INDIVIDUAL"}, "train": {"x": "DOT"}}
  r["variants"] = {
      "eval_jax_default": {"median_s": 3.0, "all": [3.0, 3.1], "compile_s": 2.0,
                           "max_abs_diff": 2e-7},
      "eval_train_options": {"median_s": 2.5, "all": [2.5], "compile_s": 2.0,
                             "max_abs_diff": 1e-7},
      "step_forward_options": {"median_s": 1.25, "all": [1.25], "compile_s": 1.0,
                               "max_abs_diff": None}}
  md = bench_eval.render(r)
  assert "| one evaluation, JAX's default compiler options (the evaluator before) | 3.00 | 3.00, 3.10 | 2.0 |" in md
  assert "| train step, the forward programs' compiler options | 1.250 | 1.250 | 1.0 |" in md
  # t_eval 2.0 s, t_step 1.0 s: 1.50× vs JAX's default, 1.25× vs the train options; the
  # train step with its own options 1.25× faster than with the forward ones
  assert "**1.50×** faster than with JAX's default options" in md and "agree to 2.0e-07" in md
  assert "1.25× faster than with the train step's options" in md
  assert "train step with its own options is 1.25× faster" in md
  assert "Compiler options" not in bench_eval.render(_result(0.3))


def test_gold_response_flops_match_xla():
  """The formula for a response scored after a cached context (``score_after``: the last
  block at the read position only) against XLA's count of that program."""
  rm = model_lib.RewardModel(CFG, rngs=nnx.Rngs(0))
  g, state = nnx.split(rm)
  b, c, t = 16, 6, 10
  ctx = jnp.ones((b, c), jnp.int32)
  prefix = rm.prefix(ctx)
  tokens, valid = jnp.ones((b, t), jnp.int32), jnp.ones((b, t), bool)
  compiled = jax.jit(lambda s, p, x, v: nnx.merge(g, s).score_after(p, x, v)).lower(
      state, prefix, tokens, valid).compile()
  xla = bench_eval.bench_sweep.xla_cost(compiled)["flops"]
  want = b * bench_eval.gold_response_flops(CFG, c, t)
  # XLA counts the full causal score matrix of the first blocks (no causal halving)
  assert 0.95 <= xla / want <= 1.25, (xla, want)


def test_report_gives_the_shared_prompt_step_against_whole_sequences():
  r = _result(0.3)
  r["options"] = {}
  r["xla_flops_step_whole"] = 1.3e9
  r["variants"] = {"step_whole_sequences": {"median_s": 1.2, "all": [1.2, 1.3], "compile_s": 1.0,
                                            "max_abs_diff": None}}
  md = bench_eval.render(r)
  assert ("| train step, chosen and rejected each run whole (the former path) | 1.200 | "
          "1.200, 1.300 | 1.0 |") in md
  assert "train step is **1.20×** faster" in md and "1.0 G vs 1.3 G per step" in md


def test_analytic_step_and_offline_count_the_program_that_runs():
  """The train step and the offline diagnostics are counted as the shared-prompt program
  runs them (``C`` prompt positions, ``2·(T − 1)`` response positions): the same count as
  ``bench_accel.step_flops``, which tests/test_bench_accel.py ties to XLA's."""
  import importlib.util
  import types

  import numpy as np

  import bench_accel
  from gpo_jax.lab.config import LabConfig
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("cfg_cpu_sweep",
                                                os.path.join(repo, "configs", "cpu_sweep.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config("small")
  lc = LabConfig.from_dict(config.lab)
  c, t, p = 8, int(lc.corpus.response_len), 40
  lab = types.SimpleNamespace(eval_prompts=np.zeros((64, c), np.int32),
                              pairs=lambda split: {"chosen": np.zeros((p, t), np.int32)})
  m = 6
  an = bench_eval.analytic(config, lab, m)
  b = config.train.batch_size
  want_step = bench_accel.step_flops(lc.policy_config, b, c, t)["total"]
  assert an["step"] == pytest.approx(m * want_step, rel=1e-9)
  chunk = min(config.eval.member_chunk, m)
  want_offline = (1 + 1 / chunk) * bench_accel.step_flops(lc.policy_config, p, c, t)["policy_fwd"]
  assert an["eval_parts"]["offline diagnostics"] == pytest.approx(m * want_offline, rel=1e-9)
