"""Tests for the tabular game lab: regularised Nash, online IPO/DPO, IPO-MD, Nash-MD-PG.

Reference values are float64 NumPy (:func:`games.regularised_nash`); training runs in float32
(the repo default) on exact expected gradients, where the fixed points are reached to
~1e-7 in total variation (TV), so the TV tolerance 1e-4 used below leaves a wide margin
while any wrong fixed point (the alternatives differ by > 5e-3) fails.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from gpo_jax.lab import games
from gpo_jax.lab import tabular as tb
from gpo_jax.objectives import losses

STEPS = 800  # one static value, so runs of one method share a compiled program
TV_TOL = 1e-4

# SPEC §6 tabular check.
P3 = np.array([[.5, .9, .2], [.1, .5, .7], [.8, .3, .5]])
MU3 = np.array([.6, .3, .1])
TAU = 0.1
NASH3_SPEC = np.array([0.4535, 0.1488, 0.3977])
CYCLIC = np.array([[.5, .9, .1], [.1, .5, .9], [.9, .1, .5]])  # rock-paper-scissors


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _tv(a, b):
  return 0.5 * float(np.sum(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _np_softmax(x):
  e = np.exp(x - np.max(x))
  return e / e.sum()


def _random_game(rng, k):
  upper = np.triu(rng.uniform(size=(k, k)), 1)
  P = upper + np.tril(1.0 - upper.T, -1)
  np.fill_diagonal(P, 0.5)
  return P, rng.dirichlet(np.ones(k))


# -------------------------------------------------------------------- regularised Nash


def test_regularised_nash_reproduces_spec_three_actions():
  pi = games.regularised_nash(P3, MU3, TAU)
  np.testing.assert_allclose(pi, NASH3_SPEC, atol=5e-5, err_msg="SPEC 3-action Nash (4 dp)")
  fixed = _np_softmax(np.log(MU3) + P3 @ pi / TAU)
  np.testing.assert_allclose(pi, fixed, atol=1e-12, err_msg="not a fixed point")


def test_regularised_nash_two_actions_closed_form():
  p, mu, tau = 0.8, np.array([0.7, 0.3]), 0.25
  pi = games.regularised_nash(np.array([[.5, p], [1 - p, .5]]), mu, tau)
  closed = 1.0 / (1.0 + np.exp(-(np.log(mu[0] / mu[1]) + (p - 0.5) / tau)))
  assert closed == pytest.approx(0.885674, abs=1e-6), "SPEC value of the closed form"
  assert pi[0] == pytest.approx(closed, abs=1e-6), "2-action Nash vs sigmoid closed form"


@pytest.mark.parametrize("tau", [1e-3, 0.05, 1.0, 30.0])
def test_regularised_nash_cyclic_uniform_and_random_games(tau):
  # Cyclic preferences with uniform mu: uniform for every tau (to 1e-12).
  np.testing.assert_allclose(games.regularised_nash(CYCLIC, np.ones(3) / 3, tau),
                             np.ones(3) / 3, atol=1e-12, err_msg=f"cyclic, tau={tau}")
  # A random 6-action game: the returned point is the fixed point (relative 1e-9 in
  # log space) and has zero exploitability (float64, 1e-12).
  P, mu = _random_game(np.random.default_rng(3), 6)
  pi = games.regularised_nash(P, mu, tau)
  logits = np.log(mu) + P @ pi / tau
  fixed = _np_softmax(logits)
  assert np.max(np.abs(pi - fixed)) < 1e-9, f"fixed-point residual at tau={tau}"
  with jax.enable_x64(True):
    expl = float(games.exploitability(jnp.log(jnp.asarray(pi)), jnp.log(jnp.asarray(mu)),
                                      jnp.asarray(P), tau))
  assert abs(expl) < 1e-10, f"exploitability of the Nash at tau={tau} is {expl}"


def test_regularised_nash_reports_non_convergence():
  with pytest.raises(RuntimeError, match="did not converge"):
    games.regularised_nash(P3, MU3, 0.01, iters=1)


def test_exploitability_positive_off_the_nash():
  nash = games.regularised_nash(P3, MU3, TAU)
  at_nash = float(games.exploitability(_f32(np.log(nash)), _f32(np.log(MU3)), _f32(P3), TAU))
  off = float(games.exploitability(_f32(np.log(MU3)), _f32(np.log(MU3)), _f32(P3), TAU))
  assert abs(at_nash) < 1e-6, "zero at the Nash (float32 round-off 1e-6)"
  assert off > 1e-2, f"the reference mu is exploitable, got {off}"


def test_geometric_mixture_matches_numpy():
  logits = np.array([1.0, -0.5, 2.0])
  for b in (0.0, 0.125, 0.7):
    want = (1 - b) * np.log(_np_softmax(logits)) + b * np.log(MU3)
    want = want - np.log(np.sum(np.exp(want)))
    got = games.geometric_mixture(_f32(logits), _f32(np.log(MU3)), b)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, err_msg=f"beta_mix={b}")


def test_mixture_fixed_point_is_consistent():
  for b in (0.125, 0.5):
    pi, pi_mix = games.mixture_fixed_point(P3, MU3, TAU, b)
    mix = _np_softmax((1 - b) * np.log(pi) + b * np.log(MU3))
    np.testing.assert_allclose(mix, pi_mix, atol=1e-10, err_msg="pi_mix = mixture(pi)")
    np.testing.assert_allclose(pi, _np_softmax(np.log(MU3) + P3 @ pi_mix / TAU), atol=1e-12)


# --------------------------------------------------------------- exact gradient identity


def test_online_ipo_grad_is_8_beta_times_nash_md_grad():
  # Derived in the module docstring: at beta_mix = 0 and tau = beta/2 the two exact
  # gradients agree up to the factor 8 beta at every theta (float32, atol 1e-6).
  rng = np.random.default_rng(0)
  beta = 0.3
  for _ in range(3):
    theta = _f32(rng.normal(size=3) * 1.5)
    ipo = games.online_gpo_grad(theta, _f32(np.log(MU3)), _f32(P3), beta, "squared")
    nmd = games.nash_md_grad(theta, _f32(np.log(MU3)), _f32(P3), beta / 2)
    np.testing.assert_allclose(np.asarray(ipo), 8 * beta * np.asarray(nmd), atol=1e-6)
  # ... and not at beta_mix > 0 (different weights q vs pi).
  ipo = games.online_gpo_grad(theta, _f32(np.log(MU3)), _f32(P3), beta, "squared", 0.5)
  nmd = games.nash_md_grad(theta, _f32(np.log(MU3)), _f32(P3), beta / 2, 0.5)
  assert np.max(np.abs(np.asarray(ipo) - 8 * beta * np.asarray(nmd))) > 1e-3


# ------------------------------------------------------------------------- training


def _log_mu():
  return _f32(np.log(MU3))


def test_online_ipo_converges_to_the_nash():
  nash = games.regularised_nash(P3, MU3, TAU)
  run = games.train_online_gpo(_log_mu(), _f32(P3), 2 * TAU, "squared", target_K=nash,
                               steps=STEPS, learning_rate=5.0)
  assert float(run.trajectory["tv"][-1]) < TV_TOL, "online IPO (beta = 2 tau) -> pi*_tau"
  assert float(run.trajectory["tv"][0]) > 0.1, "started away from the Nash"
  assert float(run.trajectory["exploitability"][-1]) < 1e-5


@pytest.mark.parametrize("beta_mix", [0.0, 0.125, 0.5])
def test_nash_md_converges_to_the_derived_fixed_point(beta_mix):
  pi, pi_mix = games.mixture_fixed_point(P3, MU3, TAU, beta_mix)
  run = games.train_nash_md(_log_mu(), _f32(P3), TAU, beta_mix=beta_mix, target_K=pi,
                            steps=STEPS, learning_rate=10.0)
  assert float(run.trajectory["tv"][-1]) < TV_TOL, f"Nash-MD pi, beta_mix={beta_mix}"
  assert _tv(np.exp(run.log_pi_mix_K), pi_mix) < TV_TOL, "Nash-MD pi_mix"
  if beta_mix == 0.0:
    assert _tv(pi, NASH3_SPEC) < 1e-4, "beta_mix = 0: the SPEC Nash"
  else:
    # At beta_mix > 0 the policy is not the Nash at tau (so the check above has power).
    assert _tv(pi, games.regularised_nash(P3, MU3, TAU)) > 5e-3


@pytest.mark.parametrize("beta_mix", [0.125, 0.5])
def test_ipo_md_mixture_is_the_nash_at_tau_over_one_minus_beta_mix(beta_mix):
  target = games.regularised_nash(P3, MU3, TAU / (1 - beta_mix))
  run = games.train_online_gpo(_log_mu(), _f32(P3), 2 * TAU, "squared", beta_mix=beta_mix,
                               target_K=target, steps=STEPS, learning_rate=5.0)
  assert float(run.trajectory["tv_mix"][-1]) < TV_TOL, "IPO-MD: pi_mix = pi*_{tau/(1-b)}"
  assert _tv(target, games.regularised_nash(P3, MU3, TAU)) > 5e-3, "identity has power"
  # The policy itself sits where Nash-MD-PG does at the same tau.
  pi, _ = games.mixture_fixed_point(P3, MU3, TAU, beta_mix)
  assert _tv(run.trajectory["pi"][-1], pi) < TV_TOL, "IPO-MD pi = Nash-MD-PG pi"


def test_online_dpo_is_stationary_but_not_the_nash():
  # Logistic with beta = 0.4 has the Taylor strength beta_eff = 0.2 of online IPO with
  # beta = 0.2 (tau = 0.1), yet converges elsewhere: its own stationarity condition
  # sum_j pi_j sigmoid(beta (h_k - h_j)) = (P pi)_k holds (1e-5), the Nash's does not.
  beta = losses.beta_from_beta_eff("logistic", 2 * TAU)
  assert beta == pytest.approx(0.4)
  nash = games.regularised_nash(P3, MU3, TAU)
  run = games.train_online_gpo(_log_mu(), _f32(P3), beta, "logistic", target_K=nash,
                               steps=STEPS, learning_rate=10.0)
  pi = np.asarray(run.trajectory["pi"][-1], np.float64)
  grad = games.online_gpo_grad(run.logits_K, _log_mu(), _f32(P3), beta, "logistic")
  assert float(jnp.max(jnp.abs(grad))) < 1e-6, "exact DPO gradient vanishes at the end"

  def dpo_residual(p):
    h = np.log(p) - np.log(MU3)
    sig = 1.0 / (1.0 + np.exp(-beta * (h[:, None] - h[None, :])))
    return np.max(np.abs(sig @ p - P3 @ p))

  assert dpo_residual(pi) < 1e-5, "online DPO stationarity condition"
  assert dpo_residual(nash) > 1e-3, "the Nash is not DPO-stationary"
  assert float(run.trajectory["tv"][-1]) > 5e-3, "online DPO does not reach pi*_tau"

  # Every regularised Nash has h = (P pi)/tau + c: h is affine in P pi. Online IPO's
  # float32 limit fits to ~1e-7; online DPO's misses by ~3e-3, so it is no pi*_tau for
  # any tau (the best fit is tau ~ beta/4, the linearised-sigmoid prediction).
  def affine_residual(p):
    h = np.log(p) - np.log(MU3)
    x = np.stack([P3 @ p, np.ones(3)], 1)
    coef = np.linalg.lstsq(x, h, rcond=None)[0]
    return np.linalg.norm(x @ coef - h), 1.0 / coef[0]

  ipo = games.train_online_gpo(_log_mu(), _f32(P3), 2 * TAU, "squared", steps=STEPS,
                               learning_rate=5.0)
  assert affine_residual(np.asarray(ipo.trajectory["pi"][-1], np.float64))[0] < 1e-5
  resid, tau_fit = affine_residual(pi)
  assert resid > 1e-3, f"online DPO's limit is (nearly) a regularised Nash: {resid}"
  assert tau_fit == pytest.approx(beta / 4, rel=0.1)


def test_online_ipo_with_bradley_terry_differs_from_rlhf_optimum():
  # BT preferences P = sigmoid(r_i - r_j): online IPO finds the regularised Nash, whose
  # scores (P pi)_i are squashed win rates, not the RLHF optimum mu exp(r / tau) / Z.
  r = np.array([1.0, 0.0, -1.0, 0.5])
  mu = np.array([.4, .3, .2, .1])
  P = np.asarray(tb.bradley_terry(jnp.asarray(r)), np.float64)
  P = 0.5 * (P + 1.0 - P.T)  # exact antisymmetry in float64
  nash = games.regularised_nash(P, mu, TAU)
  rlhf = np.asarray(tb.optimal_policy(_f32(np.log(mu)), _f32(r), TAU), np.float64)
  assert _tv(nash, rlhf) > 0.1, "Nash of the BT game vs RLHF optimum (TV 0.135)"
  run = games.train_online_gpo(_f32(np.log(mu)), _f32(P), 2 * TAU, "squared", target_K=nash,
                               steps=STEPS, learning_rate=10.0)
  assert float(run.trajectory["tv"][-1]) < TV_TOL, "online IPO -> Nash of the BT game"
  assert _tv(run.trajectory["pi"][-1], rlhf) > 0.1


def test_traced_beta_mix_vmaps_with_one_compile(monkeypatch):
  steps = 357  # unique to this test: a fresh program whose compilations we count
  traces = []
  descend = games._descend

  def counting_descend(*args, **kwargs):
    traces.append(1)  # runs once per trace of a trainer body
    return descend(*args, **kwargs)

  monkeypatch.setattr(games, "_descend", counting_descend)
  jitted = games._train_online_gpo
  before = jitted._cache_size()
  bms = np.array([0.0, 0.125, 0.25, 0.5], np.float32)
  alone = [games.train_online_gpo(_log_mu(), _f32(P3), 0.2, beta_mix=jnp.float32(b),
                                  steps=steps, learning_rate=5.0).log_pi_mix_K for b in bms]
  assert jitted._cache_size() - before == 1, "beta_mix must be traced (no recompiles)"
  assert len(traces) == 1, f"4 beta_mix values traced {len(traces)} times"

  @jax.jit
  def sweep(bm_M):
    return jax.vmap(lambda b: games.train_online_gpo(
        _log_mu(), _f32(P3), 0.2, beta_mix=b, steps=steps, learning_rate=5.0).log_pi_mix_K)(
            bm_M)

  swept = sweep(jnp.asarray(bms))
  assert len(traces) <= 2, "the vmapped sweep traces the trainer body at most once"
  n_traces = len(traces)
  swept2 = sweep(jnp.asarray(bms[::-1].copy()))  # new values, same program
  assert sweep._cache_size() == 1 and len(traces) == n_traces, "sweep recompiled"
  np.testing.assert_allclose(np.asarray(swept), np.stack(alone), atol=1e-6)
  np.testing.assert_allclose(np.asarray(swept2), np.stack(alone[::-1]), atol=1e-6)
  for b, lp in zip(bms, np.asarray(swept)):
    target = games.regularised_nash(P3, MU3, TAU / (1 - b))
    assert _tv(np.exp(lp), target) < TV_TOL, f"swept member beta_mix={b}"


# ----------------------------------------------------------------- sampled estimators

N_CHUNK, N_CHUNKS = 5000, 4  # 20000 draws in all
Z_MAX = 4.5


def _z_scores(per_draw_fn, exact):
  """Per-coordinate |mean - exact| / standard error over N_CHUNKS * N_CHUNK draws."""
  key = jax.random.PRNGKey(11)
  draws = np.concatenate([np.asarray(per_draw_fn(jax.random.fold_in(key, c)), np.float64)
                          for c in range(N_CHUNKS)])
  assert draws.shape == (N_CHUNK * N_CHUNKS, 3)
  se = draws.std(axis=0, ddof=1) / np.sqrt(draws.shape[0])
  assert np.all(se > 0)
  return np.abs(draws.mean(axis=0) - np.asarray(exact, np.float64)) / se


THETA = np.log(MU3) + np.array([0.9, -1.1, 0.4])  # non-stationary for every method here


@pytest.mark.parametrize("beta_mix", [0.0, 0.125, 0.5])
def test_sampled_online_gpo_is_unbiased(beta_mix):
  args = (_f32(THETA), _log_mu(), _f32(P3), 0.2, "squared", beta_mix)
  exact = games.online_gpo_grad(*args)
  assert float(jnp.max(jnp.abs(exact))) > 1e-2, "theta is not stationary"
  z = _z_scores(lambda k: games.per_draw_online_gpo_grads(*args, k, N_CHUNK), exact)
  assert np.all(z < Z_MAX), f"online GPO estimator biased? z = {z}"
  mean = games.sampled_online_gpo_grad(*args, jax.random.PRNGKey(0), N_CHUNK)
  per = games.per_draw_online_gpo_grads(*args, jax.random.PRNGKey(0), N_CHUNK)
  np.testing.assert_allclose(np.asarray(mean), np.asarray(per).mean(0), atol=1e-6)


@pytest.mark.parametrize("beta_mix", [0.0, 0.5])
def test_sampled_nash_md_is_unbiased(beta_mix):
  args = (_f32(THETA), _log_mu(), _f32(P3), TAU, beta_mix)
  exact = games.nash_md_grad(*args)
  assert float(jnp.max(jnp.abs(exact))) > 1e-2, "theta is not stationary"
  z = _z_scores(lambda k: games.per_draw_nash_md_grads(*args, k, N_CHUNK), exact)
  assert np.all(z < Z_MAX), f"Nash-MD-PG estimator biased? z = {z}"
  mean = games.sampled_nash_md_grad(*args, jax.random.PRNGKey(0), N_CHUNK)
  per = games.per_draw_nash_md_grads(*args, jax.random.PRNGKey(0), N_CHUNK)
  np.testing.assert_allclose(np.asarray(mean), np.asarray(per).mean(0), atol=1e-6)


def test_unbiasedness_check_rejects_a_wrong_estimator():
  # Negative control: drawing y' from pi instead of pi_mix (the beta_mix = 0 estimator)
  # while comparing with the exact beta_mix = 0.5 gradient must fail the same z-test.
  args = (_f32(THETA), _log_mu(), _f32(P3), TAU)
  exact = games.nash_md_grad(*args, 0.5)
  z = _z_scores(lambda k: games.per_draw_nash_md_grads(*args, 0.0, k, N_CHUNK), exact)
  assert np.max(z) > 2 * Z_MAX, f"the z-test has no power: z = {z}"


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_value_error_naming_the_value():
  lm, P = _log_mu(), _f32(P3)
  bad_P = P3.copy()
  bad_P[0, 1] = 0.7  # P[0, 1] + P[1, 0] = 0.8
  with pytest.raises(ValueError, match=r"P \+ P\^T = 1.*= 0\.(8|7999)"):
    games.regularised_nash(bad_P, MU3, TAU)
  with pytest.raises(ValueError, match=r"P \+ P\^T = 1"):
    games.online_gpo_grad(lm, lm, _f32(bad_P), 0.2)
  with pytest.raises(ValueError, match=r"\[0, 1\].*1\.5"):
    games.train_nash_md(lm, _f32(np.full((3, 3), 1.5)), TAU)
  with pytest.raises(ValueError, match=r"mu_K must sum to 1.*0\.9"):
    games.regularised_nash(P3, [.5, .3, .1], TAU)
  with pytest.raises(ValueError, match=r"mu_K.*> 0"):
    games.regularised_nash(P3, [.7, .3, 0.0], TAU)
  with pytest.raises(ValueError, match=r"log_mu_K.*sum exp"):
    games.train_online_gpo(_f32(MU3), P, 0.2)  # mu passed instead of log mu
  with pytest.raises(ValueError, match=r"log_mu_K must be finite"):
    games.nash_md_grad(lm, _f32([0.0, -np.inf, -1.0]), P, TAU)
  for tau in (0.0, -0.1):
    with pytest.raises(ValueError, match=rf"tau must be finite and > 0, got {tau}"):
      games.regularised_nash(P3, MU3, tau)
    with pytest.raises(ValueError, match=rf"tau must be finite and > 0.*{tau}"):
      games.nash_md_grad(lm, lm, P, tau)
  with pytest.raises(ValueError, match=r"beta must be finite and > 0"):
    games.online_gpo_grad(lm, lm, P, 0.0)
  for bm in (1.0, -0.1, 1.5):
    with pytest.raises(ValueError, match=rf"beta_mix.*\[0, 1\).*{bm}"):
      games.train_online_gpo(lm, P, 0.2, beta_mix=bm)
    with pytest.raises(ValueError, match=rf"beta_mix.*{bm}"):
      games.geometric_mixture(lm, lm, bm)
    with pytest.raises(ValueError, match=rf"beta_mix.*{bm}"):
      games.mixture_fixed_point(P3, MU3, TAU, bm)
  with pytest.raises(ValueError, match=r"theta_K must have shape \(3,\)"):
    games.nash_md_grad(_f32([0.0, 1.0]), lm, P, TAU)
  with pytest.raises(ValueError, match=r"Unknown optimizer 'rmsprop'.*valid names"):
    games.train_nash_md(lm, P, TAU, optimizer="rmsprop")
  with pytest.raises(ValueError, match=r"Unknown GPO function 'ipo'"):
    games.online_gpo_grad(lm, lm, P, 0.2, "ipo")
  with pytest.raises(ValueError, match=r"n_pairs must be a positive Python int, got 0"):
    games.sampled_online_gpo_grad(lm, lm, P, 0.2, "squared", 0.0, jax.random.PRNGKey(0), 0)
