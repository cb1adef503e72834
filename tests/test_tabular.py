"""Tests for the exact tabular lab: closed-form optima, fixed points, identities, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpo_jax.lab import tabular as tb

STEPS = 3000  # one static value, so runs of the same family share a compiled program


def _np_softmax(x):
  e = np.exp(x - np.max(x))
  return e / e.sum()


def _np_kl(p, q):
  return float(np.sum(p * (np.log(p) - np.log(q))))


def _logit(p):
  return np.log(p / (1.0 - p))


# ------------------------------------------------------------------------ exact values


def test_kl_matches_numpy_and_is_shift_invariant():
  rng = np.random.default_rng(0)
  for _ in range(3):
    theta, ref = rng.normal(size=5) * 2, rng.normal(size=5)
    want = _np_kl(_np_softmax(theta), _np_softmax(ref))
    got = float(tb.kl_divergence(jnp.asarray(theta), jnp.asarray(ref)))
    assert got == pytest.approx(want, rel=1e-5), "exact KL(pi||pi_ref) disagrees with NumPy"
    shifted = float(tb.kl_divergence(jnp.asarray(theta + 3.0), jnp.asarray(ref - 1.0)))
    assert shifted == pytest.approx(want, rel=1e-5), "KL must not depend on logit offsets"
  assert float(tb.kl_divergence(jnp.asarray(ref + 7.0), jnp.asarray(ref))) == pytest.approx(
      0.0, abs=1e-6), "KL(pi||pi) must be 0"


def test_optimal_value_is_the_maximum_of_the_objective():
  rng = np.random.default_rng(1)
  ref, r, beta = rng.normal(size=4), rng.normal(size=4), 0.7
  pi_star = _np_softmax(ref + r / beta)
  np.testing.assert_allclose(tb.optimal_policy(ref, r, beta), pi_star, rtol=1e-5)
  v_star = beta * np.log(np.sum(_np_softmax(ref) * np.exp(r / beta)))
  assert float(tb.optimal_value(ref, r, beta)) == pytest.approx(v_star, rel=1e-5)
  at_opt = float(tb.regularised_objective(jnp.log(pi_star), ref, r, beta))
  assert at_opt == pytest.approx(v_star, rel=1e-5), "objective at pi* must equal beta log Z"
  # Gibbs variational principle: no policy beats pi*.
  others = jax.vmap(tb.regularised_objective, (0, None, None, None))(
      rng.normal(size=(50, 4)) * 2, ref, r, beta)
  assert np.all(np.asarray(others) <= v_star + 1e-6), "a random policy beats the optimum"


def test_expected_loss_vmaps_over_beta_and_matches_numpy():
  rng = np.random.default_rng(2)
  theta, ref = rng.normal(size=3), rng.normal(size=3)
  mu = rng.random((3, 3))
  mu /= mu.sum()
  P = np.asarray(tb.bradley_terry(rng.normal(size=3)))
  betas = jnp.array([0.1, 0.5, 2.0])
  got = jax.jit(jax.vmap(lambda b: tb.expected_gpo_loss(theta, ref, mu, b, "logistic", P))
                )(betas)
  h = np.log(_np_softmax(theta)) - np.log(_np_softmax(ref))
  rho = h[:, None] - h[None, :]
  for b, g in zip(np.asarray(betas), np.asarray(got)):
    want = np.sum(mu * (P * np.logaddexp(0, -b * rho) + (1 - P) * np.logaddexp(0, b * rho)))
    assert g == pytest.approx(want, rel=1e-5), f"exact soft-label DPO loss wrong at beta={b}"
  # Hard labels (P=None: first action preferred) on pairs i < j equal soft labels P = 1 there.
  mu_up = np.triu(mu, 1) / np.triu(mu, 1).sum()
  p_hard = np.triu(np.ones((3, 3)), 1) + 0.5 * np.eye(3)
  for f in ("logistic", "exponential"):
    hard = float(tb.expected_gpo_loss(theta, ref, mu_up, 0.5, f))
    assert hard == pytest.approx(float(tb.expected_gpo_loss(theta, ref, mu_up, 0.5, f, p_hard)),
                                 rel=1e-6), f"{f}: P=None must mean hard labels"


# ---------------------------------------------------------------- training: fixed points


def test_regularised_training_reaches_exact_optimum():
  ref = jnp.log(jnp.array([0.5, 0.25, 0.15, 0.1]))  # non-uniform pi_ref
  r = jnp.array([0.2, 1.0, -0.5, 0.8])
  betas = jnp.array([0.3, 1.0, 3.0])
  # lr = 1/beta: the Hessian at the optimum is beta (diag pi - pi pi^T), so SGD contracts.
  run = jax.vmap(lambda b: tb.train_regularised(ref, r, b, steps=STEPS, learning_rate=1.0 / b)
                 )(betas)
  for m, b in enumerate(np.asarray(betas)):
    pi_star = _np_softmax(np.log([0.5, 0.25, 0.15, 0.1]) + np.asarray(r) / b)
    got = np.asarray(jax.nn.softmax(run.logits_K[m]))
    np.testing.assert_allclose(got, pi_star, atol=1e-5, err_msg=(
        f"gradient ascent on E r - beta KL did not reach pi_ref exp(r/beta)/Z at beta={b}"))
    obj = np.asarray(run.trajectory["objective"][m])
    assert np.all(np.diff(obj) > -1e-6), "SGD with lr=1/beta should not decrease the objective"
    assert obj[-1] == pytest.approx(float(tb.optimal_value(ref, r, b)), abs=1e-5)
  # Smaller beta buys more reward at more KL.
  kl_end = np.asarray(run.trajectory["kl"][:, -1])
  assert np.all(np.diff(kl_end) < 0), f"KL at the optimum must fall with beta, got {kl_end}"


Z_STAR = {  # population minimiser of p f(z) + (1-p) f(-z), from SPEC §1
    "logistic": _logit,
    "savage": _logit,
    "exponential": lambda p: 0.5 * _logit(p),
    "squared": lambda p: 2 * p - 1,
    "truncated_quadratic": lambda p: 2 * p - 1,
}
LR = {"logistic": 8.0, "savage": 8.0, "exponential": 1.0, "squared": 0.5,
      "truncated_quadratic": 0.5}
K2_REF = jnp.log(jnp.array([0.3, 0.7]))
K2_MU = jnp.array([[0.0, 1.0], [0.0, 0.0]])  # the single pair (0, 1)


def _k2_pref(p):
  return jnp.array([[0.5, p], [1.0 - p, 0.5]])


@pytest.mark.parametrize("f", sorted(Z_STAR))
def test_k2_soft_labels_reach_population_minimiser(f):
  ps, beta = np.array([0.6, 0.8, 0.95]), 0.5
  run = jax.vmap(lambda p: tb.train_offline(K2_REF, K2_MU, beta, f, P_KxK=_k2_pref(p),
                                            steps=STEPS, learning_rate=LR[f]))(jnp.asarray(ps))
  z = beta * np.asarray(jax.vmap(tb.margins, (0, None))(run.logits_K, K2_REF))[:, 0, 1]
  np.testing.assert_allclose(z, Z_STAR[f](ps), atol=2e-5, err_msg=(
      f"{f}: beta*rho did not converge to the soft-label minimiser z*(p) for p={ps}"))


def test_k2_hinge_soft_and_hard_labels():
  # What is true for the hinge: with a soft label p in (1/2, 1) the minimiser of
  # p max(0,1-z) + (1-p) max(0,1+z) is exactly z = 1 with loss 2(1-p) > 0; subgradient
  # descent with a constant step cannot settle on the kink and oscillates in a band of
  # width 2 lr beta^2 around it. With a hard label (p = 1) every z >= 1 has loss exactly 0,
  # the gradient vanishes there, and descent stops at the first iterate with z >= 1.
  ps, beta, lr = np.array([0.6, 0.8, 0.95, 1.0]), 0.5, 0.05
  band = 2 * lr * beta**2
  run = jax.vmap(lambda p: tb.train_offline(K2_REF, K2_MU, beta, "hinge", P_KxK=_k2_pref(p),
                                            steps=STEPS, learning_rate=lr))(jnp.asarray(ps))
  z = beta * np.asarray(jax.vmap(tb.margins, (0, None))(run.logits_K, K2_REF))[:, 0, 1]
  loss = np.asarray(run.trajectory["loss"][:, -1])
  soft = ps < 1
  assert np.all(np.abs(z[soft] - 1.0) <= band + 1e-5), f"soft hinge z={z[soft]} not near 1"
  assert np.all(loss[soft] >= 2 * (1 - ps[soft]) - 1e-6), "loss below the population minimum"
  np.testing.assert_allclose(loss[soft], 2 * (1 - ps[soft]), atol=band + 1e-5, err_msg=(
      "soft-label hinge loss must approach its minimum 2(1-p), not 0"))
  assert z[~soft][0] >= 1.0 - 1e-6 and z[~soft][0] <= 1.0 + band, f"hard hinge z={z[~soft]}"
  assert loss[~soft][0] == 0.0, f"hard-label hinge must reach loss exactly 0, got {loss[~soft]}"


@pytest.mark.parametrize("f,temp_factor", [("logistic", 1.0), ("exponential", 2.0)])
def test_bradley_terry_fixed_point_with_full_support(f, temp_factor):
  # Soft BT labels and mu on all pairs: every pair sits at its minimiser beta rho_ij =
  # z*(sigmoid(r_i - r_j)); logistic gives beta h = r + c, i.e. DPO's fixed point pi*,
  # exponential beta h = r/2 + c, i.e. pi_ref exp(r/(2 beta)).
  rng = np.random.default_rng(3)
  k = 4
  ref_np = np.log(rng.dirichlet(np.ones(k) * 2))
  r = rng.normal(size=k)
  mu = rng.random((k, k)) * (1 - np.eye(k))
  mu /= mu.sum()
  betas = jnp.array([0.5, 2.0])
  lr = {"logistic": 4.0, "exponential": 1.0}[f]  # stable SGD steps, scaled by 1/beta^2
  run = jax.vmap(lambda b: tb.train_offline(ref_np, mu, b, f, r_K=r, label_temp=1.0,
                                            steps=STEPS, learning_rate=lr / b**2))(betas)
  for m, b in enumerate(np.asarray(betas)):
    want = _np_softmax(ref_np + r / (temp_factor * b))
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(run.logits_K[m])), want, atol=1e-5,
                               err_msg=f"{f} offline fixed point wrong at beta={b}")


# --------------------------------------------------------- regulariser identities and theory


def test_onpolicy_squared_loss_gradient_is_twice_kl_gradient():
  rng = np.random.default_rng(4)
  with jax.enable_x64(True):
    theta_NxK = jnp.asarray(rng.normal(size=(3, 6)) * 1.5)
    ref_NxK = jnp.asarray(rng.normal(size=(3, 6)))

    def no_sg(t, ref):
      # Same expression with the sampling distribution differentiated too.
      h = tb.log_ratios(t, ref)
      p = jax.nn.softmax(t)
      return 0.5 * jnp.sum(p[:, None] * p[None, :] * (h[:, None] - h[None, :])**2)

    grads = jax.jit(jax.vmap(lambda t, ref: (jax.grad(tb.onpolicy_squared_loss)(t, ref),
                                             jax.grad(tb.kl_divergence)(t, ref),
                                             jax.grad(no_sg)(t, ref))))
    g_sq, g_kl, g_nosg = jax.tree.map(np.asarray, grads(theta_NxK, ref_NxK))
  assert g_sq.dtype == np.float64
  np.testing.assert_allclose(g_sq, 2 * g_kl, atol=1e-9, err_msg=(
      "grad 1/2 E_{sg(pi)}[(h-h')^2] must equal 2 grad KL"))
  # Independent closed form: grad_theta KL = pi * (h - E_pi h).
  pi = np.stack([_np_softmax(t) for t in np.asarray(theta_NxK)])
  h = np.log(pi) - np.log(np.stack([_np_softmax(r) for r in np.asarray(ref_NxK)]))
  np.testing.assert_allclose(g_sq, 2 * pi * (h - np.sum(pi * h, 1, keepdims=True)), atol=1e-9)
  # Without the stop-gradient on the sampling distribution the identity fails.
  assert np.all(np.max(np.abs(g_nosg - 2 * g_kl), axis=1) > 1e-3)


def test_offline_regulariser_does_not_control_kl_off_support():
  # SPEC §1: offline, mu != pi, so the regulariser only holds log-ratios on the data
  # support. mu puts all mass on the pair (0, 1); action 2 never appears. The loss
  # depends on the parameters only through rho_01, so its gradient moves them only along
  # d rho_01. IPO with soft label p = 3/4 pins beta rho_01 at 2p - 1 = 1/2.
  ref_np = np.log([0.45, 0.45, 0.10])
  mu = np.zeros((3, 3))
  mu[0, 1] = 1.0
  P = np.array([[0.5, 0.75, 0.5], [0.25, 0.5, 0.5], [0.5, 0.5, 0.5]])
  beta, rho_star, lam = 1.0, 0.5, 10.0

  # (a) Tabular logits: d rho_01 / d theta = e_0 - e_1, so theta_2 and theta_0 + theta_1
  # are conserved and KL is a function of rho_01 alone; here it stays below offline_reg.
  tab = tb.train_offline(ref_np, mu, beta, "squared", P_KxK=P, steps=STEPS,
                         learning_rate=0.2)
  th = np.asarray(tab.logits_K)
  assert th[2] == pytest.approx(ref_np[2], abs=1e-6), "off-support logit must not move"
  assert th[0] + th[1] == pytest.approx(ref_np[0] + ref_np[1], abs=1e-5)
  want_kl = _np_kl(_np_softmax(ref_np + [rho_star / 2, -rho_star / 2, 0]), np.exp(ref_np))
  assert float(tab.trajectory["kl"][-1]) == pytest.approx(want_kl, rel=1e-4)

  # (b) Shared parameters (log-linear policy, the function-approximation case): action 2's
  # feature is lam times action 0's, so w = rho_01 also raises action 2's logit by
  # lam * rho_01. The loss, and hence offline_reg = rho_01^2 / 2, is blind to lam; KL is not.
  feats = np.array([[1.0], [0.0], [lam]])
  run = tb.train_offline(ref_np, mu, beta, "squared", P_KxK=P, features_KxD=feats,
                         steps=STEPS, learning_rate=0.2)
  reg = np.asarray(run.trajectory["offline_reg"])
  kl = np.asarray(run.trajectory["kl"])
  assert float(run.params[0]) == pytest.approx(rho_star, abs=1e-5)
  assert np.all(reg <= 0.5 * rho_star**2 + 1e-6), "offline_reg must stay at most rho*^2/2"
  want_kl = _np_kl(_np_softmax(ref_np + [rho_star, 0.0, lam * rho_star]), np.exp(ref_np))
  assert kl[-1] == pytest.approx(want_kl, rel=1e-4)
  assert np.all(np.diff(kl) >= -1e-6) and kl[-1] > 10 * reg[-1], (
      f"KL should grow to >> offline_reg: KL={kl[-1]}, offline_reg={reg[-1]}")
  pi = np.asarray(jax.nn.softmax(run.logits_K))
  assert pi[2] > 0.9, f"mass should move to the unseen action, got pi={pi}"
  # The on-policy regulariser sees the drift that the offline one misses.
  assert float(tb.onpolicy_squared_loss(run.logits_K, ref_np)) > 10 * reg[-1]


TAYLOR_ORDER = {"exponential": 3, "savage": 3, "logistic": 4, "squared": None,
                "truncated_quadratic": None, "hinge": None}


@functools.partial(jax.jit, static_argnames="f")
def _taylor_error(theta_K, ref_K, u_K, mu_KxK, P_KxK, beta, *, f):
  # Taylor error relative to rho = 0, which cancels the float32 rounding of f(0) that
  # losses.derivatives_at_zero returns.
  def gap(th):
    return (tb.expected_gpo_loss(th, ref_K, mu_KxK, beta, f, P_KxK)
            - tb.taylor_loss(th, ref_K, mu_KxK, beta, f, P_KxK))
  return gap(theta_K) - gap(ref_K)


def test_taylor_view_error_order():
  # Margins scale with eps (logits = ref + eps u, u decreasing, mu on pairs i < j, so all
  # rho_ij > 0 and no cubic terms cancel), hence the Taylor error scales as eps^order:
  # halving eps divides it by 2^order. f'''(0) = 0 for logistic (order 4); the polynomial
  # and piecewise-linear families are exact for |beta rho| < 1. Soft labels come from
  # rewards ordered like u, so every (2P - 1) > 0; hard labels are P = 1 on pairs i < j
  # (the P=None path is checked against this in test_expected_loss_vmaps...).
  rng = np.random.default_rng(5)
  k, beta = 4, 0.8
  with jax.enable_x64(True):
    ref = jnp.asarray(rng.normal(size=k))
    u = jnp.asarray([3.0, 2.0, 1.0, 0.0])
    mu = np.triu(rng.random((k, k)), 1)
    mu = jnp.asarray(mu / mu.sum())
    labels = {"soft": tb.bradley_terry(2.0 * u),
              "hard": jnp.asarray(np.triu(np.ones((k, k)), 1) + 0.5 * np.eye(k))}
    errs = {(f, name): np.array([float(_taylor_error(ref + e * u, ref, u, mu, P, beta, f=f))
                                 for e in (0.05, 0.025, 0.0125)])
            for f in TAYLOR_ORDER for name, P in labels.items()}
  for (f, name), e in errs.items():
    order = TAYLOR_ORDER[f]
    if order is None:
      np.testing.assert_allclose(e, 0.0, atol=1e-12, err_msg=(
          f"{f} ({name} labels) is polynomial near 0: its Taylor form must be exact"))
    else:
      assert np.all(np.abs(e) > 1e-12), f"{f}: Taylor errors vanish, test would be vacuous"
      np.testing.assert_allclose(e[:-1] / e[1:], 2.0**order, rtol=0.1, err_msg=(
          f"{f} ({name} labels): Taylor error does not scale as rho^{order}; errors {e}"))


# --------------------------------------------------------------------------- bad input

GOOD_REF = np.zeros(3)
GOOD_MU = np.full((3, 3), 1 / 9)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mu_KxK=GOOD_MU * 0.9), r"sum to 1.*got sum 0\.(9|899)"),
    (dict(mu_KxK=np.array([[0.5, 0.6, 0], [0, 0, 0], [0, 0, -0.1]])), r">= 0.*-0\.1"),
    (dict(mu_KxK=np.full((4, 4), 1 / 16)), r"mu_KxK.*\(3, 3\).*\(4, 4\)"),
    (dict(P_KxK=np.full((3, 3), 0.7)), r"P \+ P\^T = 1.*0\.7"),
    (dict(P_KxK=np.array([[0.5, 1.2, 0.5], [-0.2, 0.5, 0.5], [0.5, 0.5, 0.5]])),
     r"\[0, 1\].*1\.2"),
    (dict(P_KxK=np.full((2, 2), 0.5)), r"P_KxK.*\(3, 3\).*\(2, 2\)"),
    (dict(r_K=np.zeros(4)), r"r_K.*\(3,\).*\(4,\)"),
])
def test_bad_inputs_raise_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    tb.validate(GOOD_REF, **kwargs)
  if "mu_KxK" in kwargs or "P_KxK" in kwargs:  # the public entry points check too
    with pytest.raises(ValueError, match=match):
      tb.expected_gpo_loss(GOOD_REF, GOOD_REF, kwargs.get("mu_KxK", GOOD_MU), 1.0,
                           "logistic", kwargs.get("P_KxK"))


def test_bad_training_arguments_raise():
  with pytest.raises(ValueError, match=r"beta.*-1"):
    tb.train_offline(GOOD_REF, GOOD_MU, -1.0)
  with pytest.raises(ValueError, match=r"optimizer 'rmsprop'.*adam.*sgd"):
    tb.train_offline(GOOD_REF, GOOD_MU, 1.0, optimizer="rmsprop")
  with pytest.raises(ValueError, match=r"Unknown GPO function 'dpo'"):
    tb.train_offline(GOOD_REF, GOOD_MU, 1.0, "dpo")
  with pytest.raises(ValueError, match=r"steps.*0"):
    tb.train_regularised(GOOD_REF, np.zeros(3), 1.0, steps=0)
  with pytest.raises(ValueError, match=r"ref_logits_K.*\[K\]"):
    tb.validate(np.zeros((3, 1)))
  with pytest.raises(ValueError, match=r"label_temp.*0"):
    tb.bradley_terry(np.zeros(3), 0.0)
