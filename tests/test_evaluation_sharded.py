"""Evaluator on 8 simulated devices (dp, fsdp, fsdp_tp meshes as main.py builds) equals one device."""

import numpy as np
import pytest

import lab_fixture
import multidevice

# Sampled tokens are identical on every mesh (checked once against the sampler directly: all
# 8 members x 32 samples x 12 tokens equal on the six meshes of the subprocess), and so are
# the metrics computed from counts (response_len, n_samples) and from hparams (beta_eff).
# The float metrics are not bitwise equal because sharding changes reduction order: fsdp
# splits the embed contraction over 'data' (partial dot products, then an all-reduce),
# fsdp_tp also splits the mlp contraction and the vocabulary (logsumexp) over 'model', and dp
# gives each device one member where the one-device program runs the member chunk as one
# vmapped batch, so the CPU matmul kernels block the sums differently. Measured: at most 1.1e-6 *
# max(1, |x|), about ten float32 ulps. A single flipped sampled token moves a member's mean
# over 32 samples by ~1e-3 or more, so 1e-5 leaves 10x headroom over rounding and still
# catches a changed sample, a member mix-up or a wrong reduction.
RTOL = ATOL = 1e-5
EXACT = ("n_samples", "response_len", "beta_eff")
# At a member equal to π_ref these are exactly 0: policy and reference go through one stacked
# forward, whatever the mesh. rewards/accuracies is the tie case (strict margin > 0).
ZERO_AT_REF = ("kl", "kl_k1", "kl_k3", "rewards/chosen", "rewards/rejected",
               "rewards/margins", "rewards/accuracies", "rho/mean", "offline_reg")


@pytest.fixture(scope="module")
def lab_root(tmp_path_factory):
  root = lab_fixture.shared_root(tmp_path_factory)
  lab_fixture.get_tiny_lab(root)
  return root


def _run_subprocess(lab_root, *flags):
  return multidevice.run_json("evaluation_subprocess.py", lab_root, *flags, timeout=1800)


def _check(result):
  assert result["devices"] == 8
  m = result["members"]
  for chunk, dense in result["dense"].items():
    kl = np.asarray(dense["metrics"]["kl"])
    # Member i is π_ref plus noise of scale 0.1 i: distinct members, or a mix-up goes unseen.
    assert len(set(kl.tolist())) == m and kl[1] > 0.05, (
        f"member_chunk={chunk}: one-device KLs {kl} do not tell the members apart; vacuous")

  for case in result["cases"]:
    label = f"{case['preset']} on {case['mesh']} (member_chunk={case['member_chunk']})"
    dense = result["dense"][str(case["member_chunk"])]
    assert case["placed_equal"], f"{label}: placing the parameters changed them"
    assert case["w_up_unique_shards"] > 1, f"{label}: w_up is not sharded; vacuous"
    got, want = case["metrics"], dense["metrics"]
    assert sorted(got) == sorted(want), (
        f"{label}: metric names differ from the one-device run: {sorted(set(got) ^ set(want))}")
    for name in sorted(want):
      g, w = np.asarray(got[name]), np.asarray(want[name])
      want_shape = w.shape if name.startswith(("prompt/", "sample/")) else (m,)  # [M, ...]
      assert g.shape == w.shape == want_shape and w.shape[0] == m, (
          f"{label}: {name} has shape {g.shape}, want {want_shape}")
      if name in EXACT:
        np.testing.assert_array_equal(g, w, err_msg=(
            f"{label}: {name} differs from the one-device run; sampled tokens or "
            "hyperparameters differ between meshes (keys or members mixed up)"))
      else:
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=(
            f"{label}: {name} differs from the one-device evaluation of the same parameters "
            "by more than float32 reordering allows: the result depends on the mesh "
            "(members mixed up, a flipped sample, or a wrong cross-device reduction)"))
    for name in ZERO_AT_REF:
      assert got[name][0] == 0.0, (
          f"{label}: {name}={got[name][0]} for member 0, which equals π_ref; it must be "
          "exactly 0 on any mesh (policy and reference must share one stacked forward)")
    bon, dense_bon = case["bon"], dense["bon"]
    close = ("gold", "gold_se", "kl", "ref_gold_mean", "ref_per_prompt")
    assert {k: v for k, v in bon.items() if k not in close} \
        == {k: v for k, v in dense_bon.items() if k not in close}, label
    for part in bon["ref_per_prompt"]:
      np.testing.assert_allclose(bon["ref_per_prompt"][part], dense_bon["ref_per_prompt"][part],
                                 rtol=RTOL, atol=ATOL, err_msg=f"{label}: ref_per_prompt {part}")
    for key in close[:-1]:
      np.testing.assert_allclose(bon[key], dense_bon[key], rtol=RTOL, atol=ATOL, err_msg=(
          f"{label}: bon.json {key} of the π_ref pool differs from the one-device pool"))
  return result


@pytest.mark.multidevice
def test_sharded_evaluation_equals_one_device_on_8_devices(lab_root):
  result = _check(_run_subprocess(lab_root))
  specs = {c["preset"]: c["w_up_spec"] for c in result["cases"]}
  assert specs == {"dp": ["sweep", None, None], "fsdp": ["sweep", "data", None],
                   "fsdp_tp": ["sweep", "data", "model"]}, specs
  # Per-device work (XLA's FLOPs of the compiled evaluation): each device evaluates its own
  # members (sweep) and its share of each member's rows (data). Before the rows were placed
  # on `data`, every data device of a member group repeated the member's whole evaluation
  # (sweep = 2, data = 4: 1/2 of the one-device FLOPs instead of ~1/8).
  dense = result["dense"]["8"]["flops"]
  by = {c["preset"]: c["flops"] / dense for c in result["cases"]}
  assert by["dp"] < 0.2, by                     # sweep = 8: ~1/8
  assert by["fsdp"] < 0.3, by                   # sweep 2 x data 4: ~1/8, was ~1/2
  assert by["fsdp_tp"] < 0.35, by               # sweep 2 x data 2 (x model 2): <= ~1/4


@pytest.mark.multidevice
@pytest.mark.slow
def test_sharded_evaluation_more_meshes_and_member_chunks(lab_root):
  result = _check(_run_subprocess(lab_root, "--slow"))
  assert len(result["cases"]) == 9
  # Chunking only groups members: one-device results agree across member_chunk (3 pads the
  # last chunk with π_ref copies, whose rows must be dropped, not mixed into members).
  dense = result["dense"]
  assert sorted(dense, key=int) == ["3", "4", "8"], sorted(dense)
  for chunk in ("3", "4"):
    for name, want in dense["8"]["metrics"].items():
      np.testing.assert_allclose(dense[chunk]["metrics"][name], want, rtol=RTOL, atol=ATOL,
                                 err_msg=f"{name} depends on member_chunk={chunk} on one device")
