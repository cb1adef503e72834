"""Tests for the best-of-n KL formula and the unbiased best-of-n estimator."""

import itertools
import math

import numpy as np
import pytest

from gpo_jax.evaluation import bon


@pytest.mark.parametrize("n,expected", [(1, 0.0), (2, 0.1931), (4, 0.6363), (16, 1.8351), (64, 3.1745)])
def test_kl_bon_spec_values(n, expected):
  # SPEC §5 values are KL_bon(n) = log n - (n-1)/n.
  got = float(bon.kl_bon(n))
  assert got == pytest.approx(expected, abs=5e-5), f"KL_bon({n}) = {got}, SPEC says {expected}"
  assert got == pytest.approx(math.log(n) - (n - 1) / n, rel=1e-12)


@pytest.mark.parametrize("bad", [0, -3, 2.5, float("nan")])
def test_kl_bon_rejects_bad_n(bad):
  with pytest.raises(ValueError, match="n >= 1"):
    bon.kl_bon(bad)


def test_weights_are_probabilities_and_match_exact_binomials():
  N = 9
  w = bon.bon_weights(N)
  np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12, err_msg="each n-row must be a distribution over ranks")
  for n in range(1, N + 1):
    for i in range(1, N + 1):
      exact = math.comb(i - 1, n - 1) / math.comb(N, n) if i >= n else 0.0
      assert w[n - 1, i - 1] == pytest.approx(exact, rel=1e-10, abs=1e-15)


def test_weights_stable_for_large_pool():
  w = bon.bon_weights(4000, [1, 2, 500, 4000])
  assert np.all(np.isfinite(w)), "log-space weights must not overflow for N=4000"
  np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-9)


def test_n1_is_pool_mean_and_nN_is_max():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(7, 12))
  g = s + rng.normal(size=s.shape)
  curve = bon.best_of_n(s, g, selector="proxy")
  assert curve.gold[0] == pytest.approx(g.mean(), rel=1e-12), "n=1 must be the pool mean of gold"
  argmax_gold = g[np.arange(7), np.argmax(s, axis=1)]
  assert curve.gold[-1] == pytest.approx(argmax_gold.mean(), rel=1e-12), "n=N must be gold of the top-scoring sample"
  assert curve.gold_se[-1] == pytest.approx(argmax_gold.std(ddof=1) / np.sqrt(7), rel=1e-10)
  np.testing.assert_allclose(curve.kl, bon.kl_bon(np.arange(1, 13)))


def test_matches_brute_force_over_all_subsets():
  rng = np.random.default_rng(1)
  N = 8
  s = rng.normal(size=(3, N))
  g = rng.normal(size=(3, N))
  curve = bon.best_of_n(s, g)
  for n in range(1, N + 1):
    per_prompt = []
    for p in range(3):
      vals = [g[p, list(sub)[int(np.argmax(s[p, list(sub)]))]] for sub in itertools.combinations(range(N), n)]
      per_prompt.append(np.mean(vals))
    assert curve.gold[n - 1] == pytest.approx(np.mean(per_prompt), rel=1e-10), f"n={n} differs from brute force"


def test_ties_equal_expectation_over_random_tie_breaks():
  # Selecting scores with ties: the estimator must equal the brute force averaged over all tie orders.
  s = np.array([[0.0, 1.0, 1.0, 2.0, 2.0, 2.0]])
  g = np.array([[5.0, 1.0, 3.0, -1.0, 4.0, 0.5]])
  curve = bon.best_of_n(s, g)
  N = s.shape[1]
  for n in range(1, N + 1):
    vals = []
    for sub in itertools.combinations(range(N), n):
      sub = list(sub)
      top = s[0, sub].max()
      vals.append(np.mean([g[0, j] for j in sub if s[0, j] == top]))
    assert curve.gold[n - 1] == pytest.approx(np.mean(vals), rel=1e-12), f"tie handling wrong at n={n}"


def test_expected_max_of_standard_normals():
  # E[max of n N(0,1)]: n=2 -> 1/sqrt(pi); n=4 -> 1.029375; n=16 -> 1.765991.
  rng = np.random.default_rng(2)
  pool = rng.normal(size=(400, 256))
  curve = bon.best_of_n(pool, ns=[1, 2, 4, 16])
  expected = [0.0, 1 / math.sqrt(math.pi), 1.029375, 1.765991]
  for n, got, se, exp in zip(curve.n, curve.gold, curve.gold_se, expected):
    assert abs(got - exp) < 4 * se + 1e-3, f"E[max of {n} normals] estimate {got:.4f} ± {se:.4f}, expected {exp:.4f}"


def test_json_layout_and_errors():
  curve = bon.best_of_n(np.arange(12.0).reshape(3, 4))
  d = curve.to_json_dict()
  assert set(d) == {"selector", "N", "n", "kl", "gold", "gold_se"}, "bon.json keys are fixed by ARCHITECTURE.md"
  assert d["N"] == 4 and d["n"] == [1, 2, 3, 4]
  with pytest.raises(ValueError, match=r"\[1, N=4\]"):
    bon.best_of_n(np.zeros((2, 4)), ns=[5])
  with pytest.raises(ValueError, match="shape|\\[P, N\\]"):
    bon.best_of_n(np.zeros((2, 4)), np.zeros((2, 3)))
