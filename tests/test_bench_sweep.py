"""Checks of the sweep benchmark's bookkeeping: FLOP counts, cost-analysis parsing, member choice."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
import bench_sweep  # noqa: E402

from gpo_jax.algorithms import gpo  # noqa: E402

from gpo_jax.core import model as model_lib  # noqa: E402


@pytest.mark.parametrize("shape", [(48, 64, 3, 4, 256), (96, 128, 2, 8, 512), (11, 30, 1, 3, 7)])
@pytest.mark.parametrize("n_pairs,p,t", [(32, 8, 12), (2, 9, 25), (3, 4, 1)])
def test_matmul_shapes_add_up_to_three_forward_passes(shape, n_pairs, p, t):
  """The shapes timed in 'where the time goes' cover forward + backward of every matmul of
  the shared-prompt step: the analytic count, less the unembedding the step skips at the
  prompt's first ``p − 1`` positions; and the analytic count is bench_accel's."""
  vocab, d, layers, heads, d_ff = shape
  cfg = model_lib.TransformerConfig(vocab, d, layers, heads, d_ff, max_len=64)
  flops = sum(c * 2 * b * m * k * n for c, b, m, k, n in
              bench_sweep.step_matmul_shapes(cfg, n_pairs, p, t))
  analytic = bench_sweep.step_analytic_flops(cfg, n_pairs, p, t)
  expected = analytic - 3 * 2 * d * vocab * n_pairs * (p - 1)
  assert flops == expected, (
      "the per-matmul shapes timed in 'where the time goes' no longer cover forward + "
      f"backward of the model's matmuls: {flops} vs {expected}")
  import bench_accel
  assert analytic == bench_accel.step_flops(cfg, n_pairs, p, t)["total"]


def test_xla_cost_reads_dict_and_list_forms():
  f = jax.jit(lambda a, b: a @ b)
  x = jnp.ones((16, 32), jnp.float32)
  w = jnp.ones((32, 8), jnp.float32)
  compiled = f.lower(x, w).compile()
  cost = bench_sweep.xla_cost(compiled)
  assert cost["flops"] == pytest.approx(2 * 16 * 32 * 8, rel=0.05), (
      f"XLA's FLOP count of a 16x32x8 matmul read as {cost['flops']}: cost_analysis parsing broke")

  class ListForm:  # older JAX: one dict per program, in a list
    def cost_analysis(self):
      return [{"flops": 5.0, "bytes accessed": 7.0}]

  assert bench_sweep.xla_cost(ListForm()) == {"flops": 5.0, "bytes": 7.0}


def test_hlo_kinds_separates_matmul_sort_and_elementwise():
  def f(a, b, u):
    return jnp.tanh(a @ b), jnp.argsort(u)

  args = (jnp.ones((8, 8)), jnp.ones((8, 8)), jnp.arange(16.0)[::-1])
  kinds = set(bench_sweep._hlo_kinds(jax.jit(f).lower(*args).compile().as_text()).values())
  assert "matmul" in kinds and "sort (batch sampling)" in kinds, (
      f"a program with a dot and a sort was classified as {kinds}")


def test_select_members_round_robin_over_families():
  members = gpo.make_members(["logistic", "hinge", "squared"],
                               {"logistic": (0.1, 0.2), "hinge": (1.0, 2.0), "squared": (0.5, 1.5)},
                               n_train=64, batch_size=8)
  first4 = bench_sweep.select_members(members, 4)
  fams = sorted(first4.family_idx.tolist())
  assert fams == [0, 0, 1, 2], f"K=4 of 3 families should take every family once first; got {fams}"
  assert bench_sweep.select_members(members, 6).size == 6
  with pytest.raises(SystemExit, match="K=7"):
    bench_sweep.select_members(members, 7)
  betas = bench_sweep.select_members(members, 3).beta
  np.testing.assert_allclose(sorted(betas), [0.1, 0.5, 1.0])


def test_benchmark_runs_end_to_end_and_writes_its_table(tmp_path):
  # The real script in a fresh process (it sets the CPU device count before JAX starts), on
  # the tiny lab's shapes with random data: checks the plumbing, not the speed.
  import json
  import subprocess
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  md, js = tmp_path / "bench.md", tmp_path / "bench.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, os.path.join(repo, "experiments", "bench_sweep.py"), "--lab", "tiny",
       "--standin", "--ks", "2", "--no-trl", "--repeats", "1", "--block-s", "0.05",
       "--seq-steps", "1", "--devices", "2", "--write", str(md), "--json", str(js)],
      env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(js.read_text())
  row = res["by_k"]["2"]
  assert row["looped"]["devices"] == 2 and row["vectorised"]["devices"] == 1
  for name in ("looped", "vectorised", "sequential"):
    assert row[name]["updates_per_s"] > 0 and row[name]["xla_flops"] > 0, (name, row[name])
  # Every layout does the same work per member, so the FLOP columns agree.
  assert row["looped"]["xla_flops"] == row["vectorised"]["xla_flops"]
  text = md.read_text()
  assert "(a) gpo_jax CPU layout: 2 device(s)" in text and "## K = 2" in text
