"""Tests for gpo_jax.objectives.losses and gpo_jax.objectives.calibration against closed forms and NumPy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy import optimize, special

from gpo_jax.objectives import calibration
from gpo_jax.objectives import losses as L

NAMES = sorted(L.GPO_FUNCTIONS)

# SPEC §1 table: (f(0), f'(0), f''(0)); beta_eff / beta = f''(0)/|f'(0)|.
SPEC_TABLE = {
    "logistic": (math.log(2.0), -0.5, 0.25),
    "hinge": (1.0, -1.0, 0.0),
    "squared": (1.0, -2.0, 2.0),
    "exponential": (1.0, -1.0, 1.0),
    "truncated_quadratic": (1.0, -2.0, 2.0),
    "savage": (0.25, -0.25, 0.125),
}
SPEC_RATIO = {"logistic": 0.5, "hinge": 0.0, "squared": 1.0, "exponential": 1.0,
              "truncated_quadratic": 1.0, "savage": 0.5}


def np_f(name, z):
  """Independent float64 NumPy forms of the named families (exponential unguarded)."""
  z = np.asarray(z, np.float64)
  return {
      "logistic": lambda: np.logaddexp(0.0, -z),
      "hinge": lambda: np.maximum(0.0, 1.0 - z),
      "squared": lambda: (z - 1.0) ** 2,
      "exponential": lambda: np.exp(-z),
      "truncated_quadratic": lambda: np.maximum(0.0, 1.0 - z) ** 2,
      "savage": lambda: special.expit(-z) ** 2,
  }[name]()


def soft_population_minimiser(name):
  """Closed-form argmin_z of p f(z) + (1-p) f(-z) from SPEC §1."""
  return {
      "logistic": lambda p: special.logit(p),
      "savage": lambda p: special.logit(p),
      "exponential": lambda p: 0.5 * special.logit(p),
      "squared": lambda p: 2 * p - 1,
      "truncated_quadratic": lambda p: 2 * p - 1,
      "hinge": lambda p: 1.0,
  }[name]


def test_registry_is_exactly_the_six_spec_families():
  assert set(L.GPO_FUNCTIONS) == set(SPEC_TABLE), "registry drifted from SPEC §1"


@pytest.mark.parametrize("name", NAMES)
def test_named_function_values_match_numpy(name):
  z = np.linspace(-20.0, 20.0, 801)
  got = np.asarray(L.get_f(name)(jnp.asarray(z, jnp.float32)), np.float64)
  want = np_f(name, z)
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6,
                             err_msg=f"{name}: wrong formula (or guard active inside [-20, 20])")


@pytest.mark.parametrize("name", NAMES)
def test_derivatives_at_zero_and_beta_eff_match_spec_table(name):
  f0, f1, f2 = L.derivatives_at_zero(name)
  np.testing.assert_allclose((f0, f1, f2), SPEC_TABLE[name], rtol=1e-6, atol=1e-7,
                             err_msg=f"{name}: (f(0), f'(0), f''(0)) differ from SPEC §1")
  assert L.beta_eff(name, 0.3) == pytest.approx(0.3 * SPEC_RATIO[name], abs=1e-7)
  # Traced beta (a swept hyperparameter) must work and give the same number.
  traced = jax.jit(lambda b: L.beta_eff(name, b))(jnp.float32(0.3))
  assert float(traced) == pytest.approx(0.3 * SPEC_RATIO[name], abs=1e-7)


def test_user_callable_gets_autodiff_derived_quantities():
  user_f = lambda z: jnp.log1p(jnp.exp(-2.0 * z))  # noqa: E731
  f0, f1, f2 = L.derivatives_at_zero(user_f)
  np.testing.assert_allclose((f0, f1, f2), (math.log(2.0), -1.0, 1.0), rtol=1e-6,
                             err_msg="derivatives of a user f are not from autodiff")
  assert L.beta_eff(user_f, 0.2) == pytest.approx(0.2, rel=1e-6)
  assert L.get_f(user_f) is user_f
  rho = jnp.array([-0.4, 0.1, 0.9])
  np.testing.assert_allclose(L.gpo_loss(rho, 0.5, user_f), np.log1p(np.exp(-rho)), rtol=1e-6)
  np.testing.assert_allclose(L.beta_eff_scales(["logistic", user_f, "hinge"]), [0.5, 1.0, 0.0],
                             atol=1e-7)


@pytest.mark.parametrize("bad_f", [lambda z: z ** 2, jnp.exp, lambda z: jnp.cos(z)])
def test_derivatives_reject_nonnegative_slope_at_zero(bad_f):
  with pytest.raises(ValueError, match="f'\\(0\\) < 0"):
    L.derivatives_at_zero(bad_f)
  with pytest.raises(ValueError):
    L.beta_eff(bad_f, 0.1)


def test_derivatives_at_zero_inside_jit_are_concrete():
  out = jax.jit(lambda x: x * L.derivatives_at_zero("squared")[2])(jnp.float32(3.0))
  assert float(out) == pytest.approx(6.0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("p", [0.6, 0.8, 0.95])
def test_soft_label_population_minimiser(name, p):
  fn = jax.jit(lambda z: L.gpo_loss(z, 1.0, name, p=jnp.float32(p)))
  res = optimize.minimize_scalar(lambda z: float(fn(np.float32(z))), bounds=(-6.0, 6.0),
                                 method="bounded", options={"xatol": 1e-7})
  want = soft_population_minimiser(name)(p)
  # Float32 loss values limit argmin precision to ~sqrt(eps) * curvature scale.
  assert res.x == pytest.approx(want, abs=3e-3), (
      f"{name}, p={p}: soft-label minimiser {res.x:.5f} != SPEC value {want:.5f}")
  # Independent check with the float64 NumPy forms.
  res64 = optimize.minimize_scalar(lambda z: p * np_f(name, z) + (1 - p) * np_f(name, -z),
                                   bounds=(-6.0, 6.0), method="bounded",
                                   options={"xatol": 1e-10})
  assert res64.x == pytest.approx(want, abs=1e-5), "SPEC minimiser table itself is off"


def _second_differences(name, z):
  f = np.asarray(L.get_f(name)(jnp.asarray(z, jnp.float32)), np.float64)
  d2 = f[2:] - 2 * f[1:-1] + f[:-2]
  # Tolerance: float32 rounding of three values of size |f|.
  tol = 8 * np.finfo(np.float32).eps * (np.abs(f[2:]) + np.abs(f[1:-1]) + np.abs(f[:-2]))
  return d2, tol


@pytest.mark.parametrize("name", [n for n in NAMES if n != "savage"])
def test_convex_on_grid(name):
  lo = -45.0 if name == "exponential" else -10.0  # covers the exponential guard at -30
  z = np.linspace(lo, 10.0, 2001)
  d2, tol = _second_differences(name, z)
  assert np.all(d2 >= -tol), (
      f"{name} is not convex near z={z[1:-1][np.argmin(d2 + tol)]:.3f}")


def test_savage_nonconvex_below_minus_ln2_convex_above():
  z = np.linspace(-6.0, 6.0, 1201)
  d2, tol = _second_differences("savage", z)
  zc = z[1:-1]
  below = zc < -math.log(2.0) - 0.05
  above = zc > -math.log(2.0) + 0.05
  assert np.all(d2[below] < 0), "savage should be strictly concave for z < -ln 2"
  assert np.all(d2[above] >= -tol[above]), "savage should be convex for z > -ln 2"


# Points where beta*rho = 1.3*rho avoids the hinge/truncated-quadratic kink at z = 1.
RHO_SMOOTH = jnp.array([-0.7, -0.2, 0.3, 0.55], jnp.float32)
P_SOFT = jnp.array([0.9, 0.6, 0.75, 0.99], jnp.float32)


@pytest.mark.parametrize("name", NAMES)
def test_check_grads_every_loss(name):
  # Soft labels evaluate f at -z too, so keep |z| != 1 on both sides.
  # Eager on purpose: per-primitive compiles are shared across families (same shapes),
  # which is cheaper here than one jit compile per transform.
  check_grads(lambda r: L.gpo_loss(r, 1.3, name), (RHO_SMOOTH,), order=2,
              modes=("fwd", "rev"), eps=1e-2, rtol=2e-2)
  check_grads(lambda r, p: L.gpo_loss(r, 1.3, name, p=p), (RHO_SMOOTH, P_SOFT), order=2,
              modes=("fwd", "rev"), eps=1e-2, rtol=2e-2)


def test_check_grads_exponential_guard_region():
  # The Taylor continuation below z = -EXP_GUARD must be C^2 so curvature is usable.
  rho = jnp.array([-35.0, -31.0, -29.0], jnp.float32)
  check_grads(jax.jit(lambda r: L.gpo_loss(r, 1.0, "exponential") * math.exp(-L.EXP_GUARD)),
              (rho,), order=2, modes=("fwd", "rev"), eps=1e-2, rtol=2e-2)
  g = jax.grad(L.exponential)
  h = jax.grad(g)
  zg = -L.EXP_GUARD
  scale = math.exp(L.EXP_GUARD)
  vals = jax.jit(jax.vmap(lambda z: jnp.stack([L.exponential(z), g(z), h(z)])))(
      jnp.array([zg - 1e-3, zg + 1e-3], jnp.float32))
  np.testing.assert_allclose(vals[0], vals[1], rtol=5e-3,
                             err_msg="guard is not C^2 at -EXP_GUARD (value, f', f'')")
  assert float(L.exponential(jnp.float32(zg))) == pytest.approx(scale, rel=1e-6)


def test_check_grads_bt_loss_and_margin():
  rw = jnp.array([0.3, -1.2, 2.0, 0.0]); rl = jnp.array([0.1, 0.5, -1.0, 0.4])
  p = jnp.array([0.7, 0.2, 1.0, 0.5])
  check_grads(lambda a, b: L.bt_loss(a, b, p), (rw, rl), order=2, modes=("fwd", "rev"),
              eps=1e-2, rtol=2e-2)
  check_grads(L.log_ratio_margin, (rw, rl, -rw, rl * 2), order=2, modes=("fwd", "rev"),
              eps=1e-2, rtol=2e-2)
  check_grads(lambda a, b: L.soft_label(a, b, 1.7), (rw, rl), order=2,
              modes=("fwd", "rev"), eps=1e-2, rtol=2e-2)


@pytest.mark.parametrize("name", NAMES)
def test_jit_equals_eager(name):
  rho = jnp.linspace(-3.0, 3.0, 17)
  p = jnp.linspace(0.0, 1.0, 17)
  for pp in (None, p):
    eager = L.gpo_loss(rho, 0.7, name, p=pp)
    jitted = jax.jit(lambda r, b, q: L.gpo_loss(r, b, name, p=q))(rho, 0.7, pp)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-7,
                               err_msg=f"{name}: jit and eager disagree")


def test_margin_invariances_and_antisymmetry():
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (jnp.asarray(rng.normal(-40.0, 5.0, 64), jnp.float32) for _ in range(4))
  rho = L.log_ratio_margin(pc, pr, rc, rr)
  want = (np.float64(pc) - np.float64(rc)) - (np.float64(pr) - np.float64(rr))
  np.testing.assert_allclose(rho, want, atol=1e-4)
  c = jnp.asarray(rng.normal(0.0, 30.0, 64), jnp.float32)  # per-prompt offset
  np.testing.assert_allclose(L.log_ratio_margin(pc + c, pr + c, rc, rr), rho, atol=1e-4,
                             err_msg="rho changed when the policy's pair shared an offset")
  np.testing.assert_allclose(L.log_ratio_margin(pc, pr, rc + c, rr + c), rho, atol=1e-4,
                             err_msg="rho changed when the reference's pair shared an offset")
  np.testing.assert_array_equal(L.log_ratio_margin(pr, pc, rr, rc), -rho,
                                err_msg="swapping chosen/rejected must flip rho")


def test_logistic_is_dpo_and_hinge_is_relu():
  rho = np.linspace(-5.0, 5.0, 41)
  beta = 0.4
  z = beta * rho
  dpo = -np.log(special.expit(z))
  np.testing.assert_allclose(L.gpo_loss(jnp.asarray(rho), beta, "logistic"), dpo, rtol=1e-5)
  np.testing.assert_allclose(L.gpo_loss(jnp.asarray(rho), beta, "hinge"),
                             np.maximum(0.0, 1.0 - z), atol=1e-6)


@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_squared_with_beta_2tau_is_ipo(tau):
  beta = 2.0 * tau
  loss = jax.jit(lambda r: L.gpo_loss(r, beta, "squared"))
  res = optimize.minimize_scalar(lambda r: float(loss(np.float32(r))),
                                 bounds=(-20.0, 20.0), method="bounded",
                                 options={"xatol": 1e-8})
  assert res.x == pytest.approx(1.0 / (2.0 * tau), rel=2e-3), "IPO minimiser rho* = 1/(2 tau)"
  rho = np.linspace(-3.0, 3.0, 13)
  ipo = (rho - 1.0 / (2.0 * tau)) ** 2
  np.testing.assert_allclose(L.gpo_loss(jnp.asarray(rho), beta, "squared"), beta ** 2 * ipo,
                             rtol=1e-5, atol=1e-6, err_msg="squared != beta^2 * IPO loss")


def test_mmpo_soft_labels():
  rng = np.random.default_rng(1)
  rho = jnp.asarray(rng.normal(0.0, 3.0, 32), jnp.float32)
  beta = 0.25
  # p = 1 recovers DPO.
  np.testing.assert_allclose(L.gpo_loss(rho, beta, "logistic", p=jnp.ones(32)),
                             L.gpo_loss(rho, beta, "logistic"), rtol=1e-6)
  # Soft cross-entropy against NumPy.
  s_w = rng.normal(0.0, 1.0, 32); s_l = rng.normal(0.0, 1.0, 32)
  gamma = 1.5
  p = L.soft_label(jnp.asarray(s_w), jnp.asarray(s_l), gamma)
  np.testing.assert_allclose(p, special.expit(gamma * (s_w - s_l)), rtol=1e-6)
  z = beta * np.asarray(rho, np.float64); pn = np.asarray(p, np.float64)
  ce = -pn * np.log(special.expit(z)) - (1 - pn) * np.log(special.expit(-z))
  np.testing.assert_allclose(L.gpo_loss(rho, beta, "logistic", p=p), ce, rtol=1e-5)
  # Stationary point beta rho* = gamma (s_w - s_l), found by minimising each example.
  loss = jax.jit(lambda r, q: L.gpo_loss(r, beta, "logistic", p=q))
  p_np = np.asarray(p)
  for i in range(4):
    res = optimize.minimize_scalar(lambda r: float(loss(np.float32(r), p_np[i])),
                                   bounds=(-60.0, 60.0), method="bounded",
                                   options={"xatol": 1e-8})
    assert beta * res.x == pytest.approx(gamma * (s_w[i] - s_l[i]), abs=5e-3), (
        "MMPO stationary point should satisfy beta rho* = gamma (s_w - s_l)")
  grad_at_star = jax.jit(jax.grad(lambda r: L.gpo_loss(r, beta, "logistic", p=p).sum()))(
      jnp.asarray(gamma * (s_w - s_l) / beta, jnp.float32))
  np.testing.assert_allclose(grad_at_star, 0.0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("p", [None, 0.7])
def test_extreme_margins_finite_values_and_grads(name, p):
  mags = np.array([1e2, 1e3, 1e4], np.float32)
  z = np.concatenate([mags, -mags])
  beta = 0.1
  rho = jnp.asarray(z / beta, jnp.float32)
  pp = None if p is None else jnp.full(rho.shape, p, jnp.float32)
  val = L.gpo_loss(rho, beta, name, p=pp)
  grad = jax.jit(jax.grad(lambda r: L.gpo_loss(r, beta, name, p=pp).sum()))(rho)
  assert np.all(np.isfinite(val)), f"{name}: non-finite loss at |beta rho| up to 1e4: {val}"
  assert np.all(np.isfinite(grad)), f"{name}: non-finite gradient at |beta rho| up to 1e4"
  if p is None and name != "squared":  # the other named f are non-increasing
    assert np.all(np.asarray(grad) <= 0), f"{name}: loss increases with the margin somewhere"


def test_bt_loss_matches_numpy_cross_entropy():
  rng = np.random.default_rng(2)
  rw = rng.normal(0.0, 2.0, 50); rl = rng.normal(0.0, 2.0, 50); p = rng.uniform(0, 1, 50)
  m = rw - rl
  want = -p * np.log(special.expit(m)) - (1 - p) * np.log(special.expit(-m))
  got = L.bt_loss(jnp.asarray(rw, jnp.float32), jnp.asarray(rl, jnp.float32),
                  jnp.asarray(p, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(L.bt_loss(jnp.asarray(rw), jnp.asarray(rl)),
                             -np.log(special.expit(m)), rtol=1e-5, atol=1e-6)


def test_unknown_family_message_lists_names():
  with pytest.raises(ValueError) as e:
    L.get_f("dpo_typo")
  msg = str(e.value)
  assert "dpo_typo" in msg and all(n in msg for n in NAMES), msg
  with pytest.raises(ValueError, match="dpo_typo"):
    L.gpo_loss(jnp.zeros(3), 0.1, "dpo_typo")
  with pytest.raises(TypeError, match="42"):
    L.get_f(42)


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf"), -np.inf])
def test_bad_beta_raises_naming_value(beta):
  with pytest.raises(ValueError, match=f"got {beta!r}"):
    L.check_beta(beta)
  with pytest.raises(ValueError):
    L.gpo_loss(jnp.zeros(3), beta)
  with pytest.raises(ValueError):
    L.check_beta(jnp.array([0.1, beta]))


def test_check_beta_silent_under_jit_and_accepts_arrays():
  L.check_beta(0.1)
  L.check_beta(jnp.array([0.01, 1.0]))
  out = jax.jit(lambda b: L.gpo_loss(jnp.zeros(2), b).sum())(jnp.float32(0.5))
  assert float(out) == pytest.approx(2 * math.log(2.0), rel=1e-6)


def test_bad_soft_labels_and_gamma_raise():
  with pytest.raises(ValueError, match="soft label"):
    L.gpo_loss(jnp.zeros(2), 0.1, p=jnp.array([0.5, 1.2]))
  with pytest.raises(ValueError, match="soft label"):
    L.bt_loss(jnp.zeros(2), jnp.zeros(2), p=jnp.array([jnp.nan, 0.5]))
  with pytest.raises(ValueError, match="gamma"):
    L.soft_label(jnp.zeros(2), jnp.zeros(2), -1.0)


def test_switched_f_under_vmap_equals_per_member():
  fs = NAMES + ["squared", lambda z: jnp.log1p(jnp.exp(-2.0 * z))]
  g = L.switched_f(fs)
  idx = jnp.array([0, 1, 2, 3, 4, 5, 6, 5, 7, 1], jnp.int32)
  rng = np.random.default_rng(3)
  z = jnp.asarray(rng.normal(0.0, 2.0, (10, 16)), jnp.float32)
  per_family = [np.asarray(L.get_f(f)(z)) for f in fs]
  want = np.stack([per_family[int(i)][m] for m, i in enumerate(idx)])
  got = jax.jit(jax.vmap(g))(idx, z)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7,
                             err_msg="member m must be evaluated with family fs[idx[m]]")
  grad = jax.jit(jax.vmap(jax.grad(lambda i, zz: g(i, zz).sum(), argnums=1)))(idx, z)
  # Reference: each family's gradient on the whole batch (one compile each), then row m
  # from family idx[m].
  per_family = [jax.jit(jax.grad(lambda zz, f=f: L.get_f(f)(zz).sum()))(z) for f in fs]
  want_grad = jnp.stack([per_family[int(i)][m] for m, i in enumerate(idx)])
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
  # Named families are evaluated for every member under vmap, so their guards must keep
  # every member's gradient finite at extreme margins.
  g_named = L.switched_f(NAMES)
  z_ext = jnp.asarray([[-1e4, -1e3, 1e4]] * len(NAMES), jnp.float32)
  grad_ext = jax.jit(jax.vmap(jax.grad(lambda i, zz: g_named(i, zz).sum(), argnums=1)))(
      jnp.arange(len(NAMES)), z_ext)
  assert np.all(np.isfinite(grad_ext)), f"a family's guard leaks non-finite grads: {grad_ext}"
  beta = jnp.linspace(0.1, 1.0, 10)
  np.testing.assert_allclose(
      L.switched_beta_eff(fs, idx, beta),
      [float(b) * (SPEC_RATIO[fs[int(i)]] if isinstance(fs[int(i)], str) else 1.0)
       for b, i in zip(beta, idx)], rtol=1e-6)
  with pytest.raises(ValueError, match="family index"):
    g(jnp.int32(len(fs)), z[0])
  with pytest.raises(ValueError, match="bogus"):
    L.switched_f(["logistic", "bogus"])


# ----------------------------------------------------------------------------- calibration


def test_ece_perfectly_calibrated_is_zero():
  rng = np.random.default_rng(4)
  p = rng.uniform(0.0, 1.0, 10_000)
  assert calibration.expected_calibration_error(p, p) == pytest.approx(0.0, abs=1e-12)
  # Sampled outcomes from a calibrated predictor: only sampling noise remains.
  y = rng.uniform(0.0, 1.0, p.shape) < p
  assert calibration.expected_calibration_error_hard(p, y) < 0.02


def test_ece_known_miscalibration():
  pred = [0.05, 0.15, 0.15, 0.95]
  true = [0.25, 0.05, 0.15, 0.65]
  # bins: 0 -> |.05-.25| w 1/4; 1 -> |.15-.10| w 2/4; 9 -> |.95-.65| w 1/4.
  want = 0.25 * 0.20 + 0.5 * 0.05 + 0.25 * 0.30
  assert calibration.expected_calibration_error(pred, true) == pytest.approx(want, abs=1e-12)
  # Constant over-confidence: every prediction 0.9, truth 0.6.
  assert calibration.expected_calibration_error(np.full(7, 0.9), np.full(7, 0.6)) == (
      pytest.approx(0.3))
  # One bin pools everything: |mean pred - mean true|.
  assert calibration.expected_calibration_error(pred, true, n_bins=1) == pytest.approx(
      abs(np.mean(pred) - np.mean(true)))
  # p = 1.0 lands in the last bin, not past it.
  t = calibration.reliability_table([1.0, 0.0], [1.0, 0.0], n_bins=4)
  np.testing.assert_array_equal(t["count"], [1, 0, 0, 1])


def test_ece_bad_input_raises():
  with pytest.raises(ValueError, match="same number"):
    calibration.expected_calibration_error([0.5, 0.5], [0.5])
  with pytest.raises(ValueError, match="pred_p"):
    calibration.expected_calibration_error([1.5], [0.5])
  with pytest.raises(ValueError, match="n_bins"):
    calibration.expected_calibration_error([0.5], [0.5], n_bins=0)
  with pytest.raises(ValueError, match="0/1"):
    calibration.expected_calibration_error_hard([0.5], [0.5])


@pytest.mark.parametrize("name", sorted(L.GPO_FUNCTIONS))
def test_derivatives_at_zero_under_vmap_and_jit(name):
  """beta_eff must be usable inside vmapped/jitted sweep code for every family.

  A failure here means a family's derivatives leak a tracer (custom-JVP functions such
  as relu did), so sweeps over beta could not log beta_eff for that family.
  """
  expect = L.derivatives_at_zero(name)
  got = jax.jit(jax.vmap(lambda b: b * jnp.asarray(L.derivatives_at_zero(name))))(
      jnp.ones(3))
  np.testing.assert_allclose(np.asarray(got), np.tile(expect, (3, 1)), rtol=1e-6)


def test_switched_f_unselected_overflow_does_not_poison_other_members():
  """Under vmap every family is evaluated on every member's z; a user f that overflows on
  another member's z must not reach that member's value or gradient (issue: stale docs
  claimed it would)."""
  steep = lambda z: jnp.exp(-10.0 * z) / 10.0   # noqa: E731  inf for z < -8.9
  g = L.switched_f(["logistic", steep])
  idx = jnp.array([0, 1])
  z = jnp.array([[-50.0, 1.0], [1.0, 2.0]])      # member 0's z makes steep overflow
  val = jax.vmap(g)(idx, z)
  grad = jax.grad(lambda z: jax.vmap(g)(idx, z).sum())(z)
  assert np.isinf(float(steep(jnp.float32(-50.0))))
  np.testing.assert_allclose(val[0], np.log1p(np.exp(-np.array([-50.0, 1.0]))), rtol=1e-6)
  np.testing.assert_allclose(grad[0], -1 / (1 + np.exp(np.array([-50.0, 1.0]))), rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(grad))), grad
