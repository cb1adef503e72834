"""experiments/bench_grouped.py on the tiny lab's shapes: the two variants agree, the whole-sequence
one costs more XLA FLOPs, and the report renders (no timing assertions)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))
import bench_grouped  # noqa: E402


def test_bench_grouped_variants_agree_and_the_report_renders():
  res = bench_grouped.run(m=2, batch=3, k=3, rounds=1, calls=1, lab="tiny")
  assert set(res["agree"]) == set(bench_grouped.NAMES)
  for name, a in res["agree"].items():
    assert a < 1e-4, (name, a)
  by = {(r["algorithm"], r["variant"]): r for r in res["rows"]}
  for name in bench_grouped.NAMES:
    once, whole = by[(name, "each prompt once")], by[(name, "whole sequences")]
    # k = 3 samples share each context: the whole-sequence variant runs it 3 times.
    assert whole["xla_gflop"] > 1.15 * once["xla_gflop"], (name, once, whole)
  assert res["shapes"]["C_g"] > res["shapes"]["C"]
  md = bench_grouped.render(res, "python experiments/bench_grouped.py --lab tiny", 1.0)
  assert "| RLOO | whole sequences |" in md and "| Inverse-Q* | each prompt once |" in md
  assert md.count("× FLOPs") == len(bench_grouped.NAMES) and "| ICDPO pool scoring | whole sequences |" in md


def test_bench_grouped_reference_is_the_whole_sequence_computation():
  """The benchmark's reference functions equal the library's grouped ones (so the side-by-side
  compares two ways of computing the same numbers)."""
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from gpo_jax.core import model as model_lib
  cfg = model_lib.TransformerConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, d_ff=16,
                                    max_len=12)
  model = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(0, 16, (2, 4)), jnp.int32)
  resp = jnp.asarray(rng.integers(0, 16, (2, 3, 5)), jnp.int32)
  mask = jnp.asarray(rng.integers(0, 2, (2, 3, 5)), jnp.float32)
  np.testing.assert_allclose(np.asarray(bench_grouped.whole_token_logprobs(model, prompt, resp)),
                             np.asarray(model_lib.grouped_token_logprobs(model, prompt, resp)),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      np.asarray(bench_grouped.whole_response_logprobs(model, prompt, resp, mask)),
      np.asarray(model_lib.grouped_response_logprobs(model, prompt, resp, mask)),
      rtol=1e-5, atol=1e-5)
  assert bench_grouped.whole_response_logprobs(model, prompt, resp, mask).shape == (2, 3)
