"""Statistics with power (SPEC §4): clustered and paired SEs against a NumPy reference and by coverage, the held-out peak test's level and power, curve registration."""

import math

import numpy as np
import pytest

from gpo_jax.analysis import inference


def _sandwich_se(y, groups):
  """Cluster-robust SE of an intercept-only OLS, written as the matrix sandwich (CR1)."""
  x = np.ones((y.size, 1))
  bread = np.linalg.inv(x.T @ x)
  beta = bread @ x.T @ y
  u = y - x @ beta
  meat = np.zeros((1, 1))
  ids = np.unique(groups)
  for g in ids:
    s = x[groups == g].T @ u[groups == g]
    meat += np.outer(s, s)
  g = ids.size
  v = bread @ meat @ bread * g / (g - 1)
  return float(beta[0]), float(np.sqrt(v[0, 0]))


def test_cluster_se_matches_the_sandwich_reference_with_unequal_clusters():
  rng = np.random.default_rng(0)
  sizes = rng.integers(1, 9, 40)
  groups = np.repeat(np.arange(40), sizes)
  y = rng.normal(size=40)[groups] + rng.normal(size=groups.size)
  mean, se, g = inference.cluster_mean_se(y, groups)
  want_mean, want_se = _sandwich_se(y, groups)
  assert g == 40
  np.testing.assert_allclose([mean, se], [want_mean, want_se], rtol=1e-12)
  # Equal clusters: the SE of the cluster means.
  y2 = rng.normal(size=(30, 4)) + rng.normal(size=(30, 1))
  _, se2, _ = inference.cluster_mean_se(y2, np.repeat(np.arange(30), 4))
  np.testing.assert_allclose(se2, y2.mean(1).std(ddof=1) / np.sqrt(30), rtol=1e-12)


def test_clustered_interval_covers_at_95_percent_and_the_naive_one_does_not():
  """Per-prompt effects make samples of a prompt correlated; only the clustered SE covers."""
  rng = np.random.default_rng(1)
  reps, e, n = 3000, 64, 4
  groups = np.repeat(np.arange(e), n)
  hit_c = hit_n = 0
  for _ in range(reps):
    y = (rng.normal(size=e)[:, None] + rng.normal(size=(e, n))).ravel()
    mean, se, _ = inference.cluster_mean_se(y, groups)
    naive = y.std(ddof=1) / np.sqrt(y.size)
    hit_c += abs(mean) < 1.96 * se
    hit_n += abs(mean) < 1.96 * naive
  cov_c, cov_n = hit_c / reps, hit_n / reps
  assert 0.93 <= cov_c <= 0.965, f"clustered 95% interval covers {cov_c:.3f}"
  assert cov_n < 0.85, f"the iid interval should undercover here, covers {cov_n:.3f}"


def test_paired_difference_and_minimum_detectable_effect():
  rng = np.random.default_rng(2)
  base = rng.normal(size=200)
  a, b = base + 0.1 + 0.2 * rng.normal(size=200), base + 0.2 * rng.normal(size=200)
  t = inference.paired(a, b)
  d = a - b
  assert t.n == 200
  np.testing.assert_allclose([t.diff, t.se], [d.mean(), d.std(ddof=1) / np.sqrt(200)])
  np.testing.assert_allclose(t.mde, (1.6448536269514722 + 0.8416212335729143) * t.se)
  assert t.p == pytest.approx(0.5 * math.erfc(t.z / math.sqrt(2)))
  # Pairing removes the shared prompt effect: far smaller than the unpaired SE.
  unpaired = np.hypot(a.std(ddof=1), b.std(ddof=1)) / np.sqrt(200)
  assert t.se < unpaired / 3
  with pytest.raises(ValueError, match="differ in shape"):
    inference.paired(a, b[:10])


def _trajectories(rng, reps, means, e=256, noise=0.5):
  """[reps, S, E] per-prompt gold: a shared prompt effect plus independent step noise."""
  u = rng.normal(size=(reps, 1, e))
  return u + np.asarray(means)[None, :, None] + noise * rng.normal(size=(reps, len(means), e))


@pytest.mark.parametrize("means", [
    [0.0] * 7,                                          # flat
    [0.0, 0.1, 0.2, 0.3, 0.3, 0.3, 0.3],                # rises, then a plateau (no fall)
], ids=["flat", "plateau"])
def test_held_out_peak_test_false_positive_rate_is_at_most_alpha(means):
  rng = np.random.default_rng(3)
  g = _trajectories(rng, 2000, means)
  rate = np.mean([inference.held_out_peak_test(x).falls for x in g])
  # 2000 draws: the binomial sd at 5 % is 0.005.
  assert rate <= 0.05 + 0.015, f"false-positive rate {rate:.3f} on {means}"
  # The in-sample version (peak picked on the prompts it is measured on) is biased: it
  # rejects far more often on a flat trajectory, which is why the test splits prompts.
  if means[-1] == means[0]:
    naive = []
    for x in g[:1000]:
      peak = int(np.argmax(x[:-1].mean(1)))
      naive.append(inference.paired(x[peak], x[-1]).z >= 1.6448536269514722)
    assert np.mean(naive) > 0.1, np.mean(naive)


def test_held_out_peak_test_has_its_stated_power_at_the_minimum_detectable_drop():
  rng = np.random.default_rng(4)
  # The SE of a paired step difference on the 128 measuring prompts: sqrt(2) * 0.5 / sqrt(128).
  se = math.sqrt(2) * 0.5 / math.sqrt(128)
  mde = inference.min_detectable(se)
  g = _trajectories(rng, 1500, [0.0, 0.1, 0.2, 0.3, 0.3, 0.3, 0.3 - mde])
  tests = [inference.held_out_peak_test(x) for x in g]
  power = np.mean([t.falls for t in tests])
  assert 0.74 <= power <= 0.86, f"power {power:.3f} at the MDE {mde:.4f} (stated {inference.POWER})"
  np.testing.assert_allclose(np.median([t.mde for t in tests]), mde, rtol=0.05)
  # And a drop twice the MDE is found almost always.
  g2 = _trajectories(rng, 300, [0.0, 0.1, 0.2, 0.3, 0.3, 0.3, 0.3 - 2 * mde])
  assert np.mean([inference.held_out_peak_test(x).falls for x in g2]) > 0.98


def test_held_out_peak_test_reports_the_peak_it_chose_and_rejects_bad_shapes():
  g = np.zeros((5, 10))
  g[2] = 1.0
  t = inference.held_out_peak_test(g + 1e-3 * np.arange(10)[None] % 3)
  assert t.peak_index == 2 and t.end_index == 4 and t.drop == pytest.approx(1.0)
  with pytest.raises(ValueError, match="steps >= 2"):
    inference.held_out_peak_test(np.zeros((1, 10)))


def test_binomial_tail():
  assert inference.binomial_tail(0, 10, 0.05) == 1.0
  np.testing.assert_allclose(inference.binomial_tail(2, 10, 0.05),
                             1 - 0.95 ** 10 - 10 * 0.05 * 0.95 ** 9)


@pytest.mark.parametrize("shift", [-0.37, 0.0, 0.52])
def test_register_shift_recovers_a_planted_shift_finer_than_the_grid(shift):
  x = np.log(np.geomspace(0.003, 3.0, 13))          # spacing 0.58 in log units
  hump = lambda t: np.exp(-0.5 * ((t - np.log(0.1)) / 1.2) ** 2)  # noqa: E731
  y_ref = hump(x)
  y = 0.5 * hump(x - shift) + 0.3                    # shifted, scaled and offset
  est = inference.register_shift(x, y_ref, x, y)
  # Curves sampled on different grids register too.
  xs = x[::2] + 0.1
  assert abs(inference.register_shift(x, y_ref, xs, 2 * hump(xs - shift)) - shift) < 0.05
  assert abs(est - shift) < 0.05, (est, shift)


def test_bootstrap_interval_covers_a_mean():
  rng = np.random.default_rng(5)
  v = rng.normal(0.3, 1.0, 400)
  lo, hi, vals = inference.bootstrap_prompts(lambda idx: v[idx].mean(), v.size, reps=300)
  assert lo < v.mean() < hi and hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.25)
