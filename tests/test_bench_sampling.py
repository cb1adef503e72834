"""Checks of the sampling benchmark's plumbing: the analytic decode-step cost vs XLA, the quick run, the report.

No timing assertions (speed belongs in the benchmark) and no HF (it runs in its own venv).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import bench_sampling  # noqa: E402

from gpo_jax.core import model as model_lib  # noqa: E402

TINY = model_lib.TransformerConfig(vocab_size=8, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                                   max_len=16)


def test_decode_cost_formula_by_hand():
  b, s = 4, 16
  c = bench_sampling.decode_cost(TINY, b, s)
  d, f, v, n = 16, 32, 8, 2
  params = n * (4 * d * d + 2 * d * f + 2 * d) + 2 * d + d * v + min(b, v) * d
  assert c["bytes"] == 4 * (params + n * 2 * b * s * d + n * 2 * b * d + b * v)
  assert c["flops"] == b * (n * (8 * d * d + 4 * d * f + 4 * s * d) + 2 * d * v)
  # bytes grow with the cache length by exactly the K/V read
  assert bench_sampling.decode_cost(TINY, b, s + 1)["bytes"] - c["bytes"] == 4 * n * 2 * b * d


def test_decode_cost_vs_xla_cost_analysis():
  # XLA counts the matmuls plus the elementwise work (softmax, GELU, norms): its FLOPs lie
  # within [1, 1.3] x the analytic matmul count on this shape. Its bytes count every op's
  # operands and outputs (activations, layout copies), so they lie between the analytic
  # minimum and 8x it (measured 2.5-5.6x on the benchmark's shapes).
  b = 4
  m = model_lib.Transformer(TINY, rngs=nnx.Rngs(0))
  g, p, r = nnx.split(m, nnx.Param, ...)
  ctx = jnp.ones((b, 4), jnp.int32)
  _, cache = jax.jit(lambda p, c: nnx.merge(g, p, r).prefill(c))(p, ctx)
  compiled = jax.jit(lambda p, t, c: nnx.merge(g, p, r).decode_step(t, jnp.int32(4), c),
                     donate_argnums=2).lower(p, jnp.ones((b,), jnp.int32), cache).compile()
  xla = bench_sampling.bench_sweep.xla_cost(compiled)
  a = bench_sampling.decode_cost(TINY, b, int(cache[0]["k"].shape[2]))
  assert 1.0 <= xla["flops"] / a["flops"] <= 1.3, (xla, a)
  assert 1.0 <= xla["bytes"] / a["bytes"] <= 8.0, (xla, a)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("bench_sampling")
  md, js = tmp / "s.md", tmp / "s.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "bench_sampling.py"), "--quick",
       "--standin", "--no-hf", "--label", "test", "--md", str(md), "--json", str(js)],
      env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(js.read_text()), md.read_text()


def test_quick_run_table(quick_run):
  res, text = quick_run
  assert res["label"] == "test" and set(res["rows"]) == {"1x8", "2x8"}
  header = ("| K members | B rows per member | JAX tokens/s (all K·B·T slots) | JAX tokens/s per "
            "member | JAX tokens/s up to EOS | HF `generate` tokens/s (1 model, batch B) "
            "| HF threads | JAX / HF | ms per JAX call |")
  assert header in text
  assert "| 1 | 8 |" in text and "| 2 | 8 |" in text
  for row in res["rows"].values():
    assert row["tokens_per_s"] > 0 and 0 < row["eos_tokens_per_s"] <= row["tokens_per_s"]
    assert 0 < row["mean_response_len"] <= 12
    assert row["analytic"]["s"] >= res["workload"]["context_len"]
  assert "not judged (HF skipped: --no-hf given)" in text
  assert "## Prefill vs decode" in text and "## The decode step: bytes, FLOPs, bandwidth" in text


def test_ratio_rows_and_verdict(quick_run):
  res = json.loads(json.dumps(quick_run[0]))
  tps = {k: r["tokens_per_s"] for k, r in res["rows"].items()}
  # HF makes K=1 exactly 3.5x (met) and K=2 2.0x of it (missed)
  hf_row = {"tokens_per_s": tps["1x8"] / 3.5, "prefill_s": 1e-3, "decode_step_s": 1e-3,
            "threads": "2", "all_ms": [1.0]}
  res["rows"]["2x8"]["tokens_per_s"] = 2.0 * hf_row["tokens_per_s"]
  res["hf"] = {"ok": True, "best": {"8": hf_row}, "by_threads": {"2": {"8": hf_row}},
               "n_params": 1, "settings": "s", "versions": {}}
  res["verdict"] = bench_sampling.verdict(res)
  text = bench_sampling.render(res)
  assert "| 3.50× MET |" in text and "| 2.00× MISSED |" in text
  assert "K=1 B=8: 3.5×, K=2 B=8: 2.0× — MET at 1 of 2 rows" in res["verdict"]
  assert bench_sampling.ratio_cell(2.99, 1.0) == "2.99× MISSED"
  assert bench_sampling.ratio_cell(3.0, 1.0) == "3.00× MET"
  assert bench_sampling.ratio_cell(3.0, None) == "n/a"


def test_compare_table(quick_run):
  res = json.loads(json.dumps(quick_run[0]))
  res["compare"] = {"label": "old", "date": "d", "rows": {
      k: {"tokens_per_s": r["tokens_per_s"] / 2, "decode_step_s": r["decode_step_s"]}
      for k, r in res["rows"].items()}}
  assert "## Before/after: `old` (d) → `test`" in bench_sampling.render(res)
  assert "| 2.00× |" in bench_sampling.render(res)


def test_per_context_programs_prefill_each_context_once_and_sample_the_repeated_rows():
  """``--per-context R``: the B rows are B/R contexts sampled R times (``repeats=R``); the
  timed prefill is the B/R contexts' and the decode step runs on the cache expanded to B rows."""
  wl = bench_sampling.standin_workload("tiny")
  p = bench_sampling.Programs(wl, 1, 8, None, per_context=4)
  assert p.ctx.shape[0] == 2
  tokens, mask = p.sample(p.params, p.keys)
  assert tokens.shape == (8, wl.response_len)
  from gpo_jax.core import sampling
  want, _ = sampling.sample(nnx.merge(wl.graphdef, wl.params, wl.rest),
                            jnp.repeat(p.ctx, 4, axis=0), p.keys, max_new_tokens=wl.response_len)
  assert (tokens == want).all()
  cache = p.expand(p.prefill(p.params)[1])
  assert cache[0]["k"].shape[0] == 8
  logits, _ = p.decode(p.params, p.token, cache)
  assert logits.shape == (8, wl.cfg.vocab_size)
  with pytest.raises(SystemExit, match="per-context"):
    bench_sampling.Programs(wl, 1, 6, None, per_context=4)
