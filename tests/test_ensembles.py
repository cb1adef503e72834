"""Tests for gpo_jax.objectives.ensembles against per-column loops from the definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpo_jax.objectives import ensembles as E

K, B = 5, 7
LAM = 0.7


def loop_reference(scores, objective, lam, mask):
  """Per-sample float64 Python loops straight from the definitions (Coste et al. 2023)."""
  scores = np.asarray(scores, np.float64)
  members = [k for k in range(scores.shape[0]) if mask is None or mask[k]]
  out = np.empty(scores.shape[1])
  for b in range(scores.shape[1]):
    vals = [float(scores[k, b]) for k in members]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / len(vals)
    out[b] = {"mean": mean, "wco": min(vals), "uwo": mean - lam * var}[objective]
  return out


MASKS = {
    "none": None,
    "partial": np.array([1.0, 0.0, 1.0, 1.0, 0.0]),
    "bool": np.array([True, True, False, True, True]),
    "single": np.array([0.0, 0.0, 1.0, 0.0, 0.0]),
}


@pytest.fixture(scope="module")
def scores():
  return np.random.default_rng(0).normal(size=(K, B)) * 2.0


@pytest.mark.parametrize("mask_name", sorted(MASKS))
@pytest.mark.parametrize("objective", E.OBJECTIVES)
def test_combine_matches_loops_numpy_and_jax(scores, objective, mask_name):
  mask = MASKS[mask_name]
  want = loop_reference(scores, objective, LAM, mask)
  got_np = E.combine(scores, objective, lam=LAM, mask_K=mask)
  assert isinstance(got_np, np.ndarray) and got_np.shape == (B,)
  np.testing.assert_allclose(got_np, want, rtol=1e-12, atol=1e-12)
  jmask = None if mask is None else jnp.asarray(mask)
  got_jax = E.combine(jnp.asarray(scores, jnp.float32), objective, lam=LAM, mask_K=jmask)
  assert isinstance(got_jax, jax.Array) and got_jax.shape == (B,)
  np.testing.assert_allclose(np.asarray(got_jax), want, rtol=1e-5, atol=1e-5)


def test_single_member_mask_makes_all_objectives_that_member(scores):
  mask = MASKS["single"]
  for objective in E.OBJECTIVES:
    np.testing.assert_allclose(E.combine(scores, objective, lam=3.0, mask_K=mask), scores[2],
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("mask_name", sorted(MASKS))
def test_uwo_with_zero_lam_is_mean_and_wco_is_below_mean(scores, mask_name):
  mask = MASKS[mask_name]
  mean = E.combine(scores, "mean", mask_K=mask)
  np.testing.assert_allclose(E.combine(scores, "uwo", lam=0.0, mask_K=mask), mean, atol=1e-12)
  assert np.all(E.combine(scores, "wco", mask_K=mask) <= mean + 1e-12)
  assert np.all(E.combine(scores, "uwo", lam=LAM, mask_K=mask) <= mean + 1e-12)


def test_trailing_shape_is_kept():
  x = np.random.default_rng(1).normal(size=(3, 2, 4))
  for objective in E.OBJECTIVES:
    got = E.combine(x, objective, lam=0.5)
    assert got.shape == (2, 4)
    flat = loop_reference(x.reshape(3, -1), objective, 0.5, None).reshape(2, 4)
    np.testing.assert_allclose(got, flat, atol=1e-12)


def test_uwo_penalises_disagreement():
  # Both samples have mean 1; members disagree on the first ([0, 2]) and agree on the second.
  scores = np.array([[0.0, 1.0], [2.0, 1.0]])
  np.testing.assert_allclose(E.combine(scores, "mean"), [1.0, 1.0])
  uwo = E.combine(scores, "uwo", lam=0.5)
  np.testing.assert_allclose(uwo, [1.0 - 0.5 * 1.0, 1.0])  # population variance of [0, 2] is 1
  assert uwo[0] < uwo[1]
  np.testing.assert_allclose(E.combine(scores, "wco"), [0.0, 1.0])


def test_masked_out_members_may_be_non_finite():
  x = np.array([[1.0, 2.0], [np.inf, np.nan], [3.0, 0.0]])
  mask = np.array([1, 0, 1])
  for objective in E.OBJECTIVES:
    want = loop_reference(x[[0, 2]], objective, LAM, None)
    np.testing.assert_allclose(E.combine(x, objective, lam=LAM, mask_K=mask), want)
  # Gradients through a masked jax combination ignore the bad member too.
  g = jax.grad(lambda s: E.combine_switched(s, 2, LAM, jnp.asarray(mask)).sum())(jnp.asarray(x))
  assert np.all(np.isfinite(np.asarray(g)))
  np.testing.assert_array_equal(np.asarray(g)[1], 0.0)


@pytest.mark.parametrize("mask_name", ["none", "partial", "single"])
def test_jit_combine_switched_with_traced_idx_matches_combine(scores, mask_name):
  mask = MASKS[mask_name]
  xs = jnp.asarray(scores, jnp.float32)
  jmask = None if mask is None else jnp.asarray(mask)
  fn = jax.jit(E.combine_switched)
  for idx, objective in enumerate(E.OBJECTIVES):
    got = fn(xs, jnp.int32(idx), jnp.float32(LAM), jmask)
    want = E.combine(xs, objective, lam=LAM, mask_K=jmask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    # NumPy scores and mask closed over by a jit with a traced index select the same way.
    got_closed = jax.jit(lambda i: E.combine_switched(scores, i, LAM, mask))(jnp.int32(idx))
    np.testing.assert_allclose(np.asarray(got_closed), np.asarray(want), rtol=1e-6, atol=1e-6)
    # The NumPy path selects the same way.
    np.testing.assert_allclose(E.combine_switched(scores, idx, LAM, mask),
                               E.combine(scores, objective, lam=LAM, mask_K=mask), atol=1e-12)


def test_vmap_over_objective_lam_and_mask(scores):
  xs = jnp.asarray(scores, jnp.float32)
  idx = jnp.array([0, 1, 2, 2], jnp.int32)
  lam = jnp.array([0.0, 0.0, 0.3, 2.0], jnp.float32)
  masks = jnp.asarray(np.stack([MASKS[m].astype(np.float32)
                                for m in ["partial", "bool", "partial", "single"]]))
  got = jax.jit(jax.vmap(E.combine_switched, in_axes=(None, 0, 0, 0)))(xs, idx, lam, masks)
  for m in range(4):
    want = loop_reference(scores, E.OBJECTIVES[int(idx[m])], float(lam[m]), np.asarray(masks[m]))
    np.testing.assert_allclose(np.asarray(got[m]), want, rtol=1e-5, atol=1e-5)


def test_traced_out_of_range_idx_gives_nan(scores):
  got = jax.jit(E.combine_switched)(jnp.asarray(scores), jnp.int32(3), 0.1, None)
  assert np.all(np.isnan(np.asarray(got)))


def test_bad_objective_raises_with_name(scores):
  with pytest.raises(ValueError, match="'median'") as info:
    E.combine(scores, "median")
  for name in E.OBJECTIVES:
    assert name in str(info.value)


@pytest.mark.parametrize("lam", [-0.1, np.float32(-1.0), float("nan")])
def test_negative_lam_raises(scores, lam):
  with pytest.raises(ValueError, match="lam"):
    E.combine(scores, "uwo", lam=lam)
  with pytest.raises(ValueError, match="lam"):
    E.combine_switched(scores, 2, lam, None)


def test_traced_lam_is_not_checked(scores):
  # A traced lam cannot be inspected, so even a negative one passes silently.
  got = jax.jit(lambda lam: E.combine(jnp.asarray(scores), "uwo", lam=lam))(-1.0)
  assert np.all(np.asarray(got) >= np.asarray(E.combine(scores, "mean")) - 1e-5)


@pytest.mark.parametrize("idx", [3, -1, 1.0, np.array([0, 1])])
def test_bad_concrete_idx_raises(scores, idx):
  with pytest.raises(ValueError, match="objective_idx"):
    E.combine_switched(scores, idx, 0.0, None)


@pytest.mark.parametrize("mask,match", [
    (np.array([1.0, 0.0, 1.0]), "shape"),
    (np.array([1.0, 0.5, 1.0, 1.0, 1.0]), "0/1"),
    (np.zeros(5), "no ensemble member"),
])
def test_bad_mask_raises(scores, mask, match):
  with pytest.raises(ValueError, match=match):
    E.combine(scores, "mean", mask_K=mask)


def test_empty_ensemble_raises():
  with pytest.raises(ValueError, match="at least one member"):
    E.combine(np.zeros((0, 3)), "mean")
