"""Checks of the online benchmark's plumbing: the JAX side on tiny stand-in shapes, FLOP counts, the report.

No timing assertions (speed belongs in the benchmark) and no TRL (it runs in its own venv).
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import bench_online  # noqa: E402

from gpo_jax.core import model as model_lib  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  # The real script in a fresh process (it sets the CPU device count before JAX starts),
  # on the tiny lab's shapes with a random stand-in, K=2 over 2 devices, 2 timed steps.
  tmp = tmp_path_factory.mktemp("bench_online")
  md, js = tmp / "bench.md", tmp / "bench.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "bench_online.py"), "--lab", "tiny",
       "--standin", "--ks", "2", "--warmup", "1", "--steps", "2", "--repeats", "1", "--no-trl",
       "--no-components", "--devices", "2", "--write", str(md), "--json", str(js)],
      env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(js.read_text()), md.read_text()


def test_jax_side_runs_and_writes_its_table(tiny_run):
  res, text = tiny_run
  row = res["by_k"]["2"]
  assert row["devices"] == 2, "K=2 on 2 CPU devices should split the members over both"
  assert row["finite"] and row["diverged"] == 0, row
  assert row["member_updates_per_s"] > 0 and row["steps_timed"] == 2
  assert 0 < row["mean_response_len"] <= res["workload"]["response_len"]
  w = res["workload"]
  assert (w["batch_size"], w["context_len"], w["response_len"]) == (16, 8, 12)
  assert res["trl"] == {"ok": False, "reason": "--no-trl given"}
  assert "| gpo_jax, CPU layout (2 device(s), looping) | 2 |" in text
  assert "TRL OnlineDPOTrainer | 1 | skipped: --no-trl given" in text
  assert len(row["all_ms_per_step"]) == 1
  assert "not judged (TRL skipped" in text and "## FLOPs per member-update" in text


def test_report_with_trl_components_and_vmap_rows(tiny_run):
  # The same results with a (made-up) TRL baseline, a breakdown and a vmap row rendered.
  res = json.loads(json.dumps(tiny_run[0]))
  sec = res["by_k"]["2"]["s_per_step"]
  res["by_k"] = {"1": dict(res["by_k"]["2"], s_per_step=sec / 4,
                          member_updates_per_s=4 / sec, devices=1), "2": res["by_k"]["2"]}
  res["by_k_vmap"] = {"2": dict(res["by_k"]["2"])}
  res["components"] = {"sampling": sec / 8, "gold": sec / 8, "fwd_bwd": sec / 8}
  trl_ups = 1 / (2 * sec)   # K=1 is then 8x TRL, K=2 4x
  res["trl"] = {"ok": True, "trainer": "trl.experimental.online_dpo.OnlineDPOTrainer",
                "updates_per_s": trl_ups, "ms_per_step": 1e3 / trl_ups, "torch_threads": 1,
                "by_threads": {"2": {"ms_per_step": 2e3 / trl_ups, "updates_per_s": trl_ups / 2,
                                     "all_ms_per_step": [1.0], "other_cpu": 0.0},
                               "1": {"ms_per_step": 1e3 / trl_ups, "updates_per_s": trl_ups,
                                     "all_ms_per_step": [1.0], "other_cpu": 0.0}},
                "torch_matmul_gflops": 1.0, "n_params": 1, "n_params_reward": 1,
                "reward_arg": "reward_funcs=...", "settings": "s", "optim": "adamw",
                "mean_completion_len": 11.0,
                "versions": {"trl": "x", "torch": "y", "transformers": "z"}}
  res["verdict"] = bench_online.verdict(res)
  assert "one policy (K=1) 8.0× TRL" in res["verdict"] and "met at every K" in res["verdict"]
  assert "One vmap: K=2: 4.0×" in res["verdict"]
  text = bench_online.render(res)
  assert "1 torch thread(s) (baseline) | 1 |" in text and "| 0.50× |" in text
  assert "**4.00×**" in text and "**8.00×**" in text
  assert "one vmap over the members (1 device) | 2 |" in text
  assert "## Where the time goes" in text and "| 33 % |" in text and "sum of the parts" in text


def test_verdict_says_missed_below_target(tiny_run):
  res = json.loads(json.dumps(tiny_run[0]))
  ups = res["by_k"]["2"]["member_updates_per_s"]
  res["trl"] = {"ok": True, "updates_per_s": ups / 2}
  assert "K=2: 2.0× — missed at every K" in bench_online.verdict(res)


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_analytic_flops_parts(variant):
  cfg = bench_online.lab_config(variant)
  p, g = cfg.policy_config, cfg.gold_config
  c, t, b = cfg.corpus.prompt_len + 2, cfg.corpus.response_len, 16
  ours = bench_online.analytic_flops(p, g, b, c, t)
  trl = bench_online.analytic_flops_trl(p, g, b, c, t)
  for parts in (ours, trl):
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
  # π's train pass: 3 forwards over the C + T - 1 tokens the step feeds, 2B sequences.
  n, seq = 2 * b, c + t - 1
  assert ours["policy_fwd_bwd"] == 3 * n * seq * model_lib.flops_per_token(p, seq)
  assert ours["ref_fwd"] * 3 == ours["policy_fwd_bwd"]
  # Both sample with the policy alone; ours attends over the C + T - 1 cache positions at
  # every decode step, TRL's generate over the prefix so far: a little more, never twice.
  assert trl["sampling"] <= ours["sampling"] < 1.5 * trl["sampling"]
  unemb = 2 * p.d_model * p.vocab_size
  want = n * (c * bench_online._trunk(p, c) + unemb) + n * (t - 1) * model_lib.flops_per_token(
      p, c + t - 1)
  assert ours["sampling"] == want
  assert ours["gold_fwd"] == trl["gold_fwd"] or c + t != g.max_len
