"""The tabular game lab: online preference optimisation against a general preference matrix.

One prompt, ``K`` actions, a softmax policy ``pi = softmax(theta)``, a reference ``mu`` with
full support and a general (possibly intransitive) preference matrix ``P``. Everything is
an exact sum over actions or pairs, so the methods of SPEC §6 "Online preference
optimisation" can be checked against their fixed points, and their Monte Carlo estimators
against the exact expected gradients.

Objects (``K`` actions, shapes as suffixes):

* ``theta_K``: policy logits, ``pi = softmax(theta)``.
* ``log_mu_K``: log-probabilities of the reference ``mu = pi_ref`` (finite entries,
  ``sum exp = 1``); ``mu_K``: the same as probabilities (NumPy solvers).
* ``P_KxK``: ``P[i, j] = P(i > j)``, entries in ``[0, 1]``, ``P + P^T = 1`` (so the diagonal
  is 1/2). Write ``P = 1/2 + A`` with ``A`` antisymmetric; ``pi^T P pi = 1/2`` for every
  ``pi``. ``(P q)_i = P(i > q)`` is the probability that ``i`` beats a draw from ``q``.
* ``h_K = log pi - log mu`` and ``rho_KxK[i, j] = h_i - h_j``.
* ``beta_mix`` in ``[0, 1)``: weight on ``mu`` in the geometric mixture
  ``log pi_mix ∝ (1 - beta_mix) log pi + beta_mix log mu`` (:func:`geometric_mixture`;
  ``beta_mix = 0`` gives ``pi_mix = pi``).

The regularised game and its Nash. ``pi*_tau`` is the fixed point of
``pi ∝ mu exp(P pi / tau)`` (:func:`regularised_nash`): the unique symmetric Nash of the
game with payoff ``P(pi' > pi) - tau KL(pi' || mu) + tau KL(pi || mu)``. Its
:func:`exploitability` ``tau log sum_i mu_i exp((P pi)_i / tau) + tau KL(pi || mu) - 1/2``
(the best response's gain over the value 1/2, closed form by the Gibbs principle) is
``>= 0`` and zero exactly at ``pi*_tau``. Two actions with ``P[0, 1] = p``: ``(P pi)_0 -
(P pi)_1 = (p - 1/2)(pi_0 + pi_1) = p - 1/2`` for *every* ``pi``, so the fixed point is
explicit, ``pi*(0) = sigmoid(log(mu_0 / mu_1) + (p - 1/2) / tau)`` (SPEC §6).

The three methods (``q = sg(pi_mix)`` is the sampling distribution, stop-gradient):

* **Online GPO** (:func:`online_gpo_grad`; online IPO for ``f = squared``, online DPO for
  ``logistic``, online SLiC for ``hinge``; IPO-MD for ``squared`` with ``beta_mix > 0``):
  descend ``L(theta) = sum_ij q_i q_j [P_ij f(beta rho_ij) + (1 - P_ij) f(-beta rho_ij)]``.
* **Nash-MD-PG** (:func:`nash_md_grad`): ascend along
  ``G = sum_i pi_i grad log pi_i ((P q)_i - 1/2 - tau h_i)``, the policy gradient of
  ``P(pi > q) - tau KL(pi || mu)`` with the opponent ``q = sg(pi_mix)`` held fixed.
  **Sign convention**: every ``*_grad`` here is a *descent* gradient (of a loss), so
  :func:`nash_md_grad` returns ``-G``; optimisers apply all of them the same way.

Fixed points (derived here; the tests verify each). ``grad_theta h_k = e_k - pi``.

1. Online IPO (``f = squared``, ``beta_mix = 0``). ``p f(z) + (1 - p) f(-z) = z^2 - 2(2p - 1)z
   + 1``, so ``g_k = dL/dh_k = 4 beta q_k [beta (h_k - q.h) - 2 ((P q)_k - 1/2)]`` (using
   ``rho`` and ``2P - 1`` antisymmetric and ``sum q = 1``) and ``grad L = g - pi sum_k g_k``
   with ``sum_k g_k = -8 beta (q^T P q - 1/2) = 0``. Stationary iff, for every ``k``,
   ``h_k - E_q h = ((P q)_k - 1/2) / tau`` with ``tau = beta / 2``, i.e.
   ``pi ∝ mu exp(P q / tau)``. With ``q = pi``: online IPO's fixed point is
   ``pi*_{beta/2}``. More: at ``beta_mix = 0`` and ``tau = beta / 2``,
   ``online_gpo_grad = 8 beta nash_md_grad`` exactly, at every ``theta`` (they are
   ``-8 beta pi_k (a_k - pi.a)`` resp. ``-pi_k (a_k - pi.a)`` with ``a = P pi - 1/2 -
   tau h``): online IPO *is*
   Nash-MD-PG at ``beta_mix = 0`` with a rescaled step.
2. IPO-MD (``f = squared``, ``beta_mix > 0``). The same computation gives
   ``pi ∝ mu exp(P pi_mix / tau)`` with ``tau = beta / 2``. Then ``pi_mix ∝
   pi^{1 - beta_mix} mu^{beta_mix} ∝ mu exp(P pi_mix (1 - beta_mix) / tau)``: the mixture
   is ``pi*_{tau / (1 - beta_mix)}`` and ``pi = softmax(log mu + P pi*_{tau/(1-beta_mix)}
   / tau)`` (:func:`mixture_fixed_point`). The policy itself is *not* a Nash.
3. Nash-MD-PG. ``G_k = pi_k (a_k - pi.a)`` with ``a = P q - 1/2 - tau h``; zero iff ``a`` is
   constant, i.e. ``pi ∝ mu exp(P pi_mix / tau)``: the Nash ``pi*_tau`` at ``beta_mix = 0``
   and, at ``beta_mix > 0``, the same point as IPO-MD at the same ``tau``
   (:func:`mixture_fixed_point`). The dynamics differ (weights ``pi`` vs ``q``), the
   stationary sets do not.
4. Online DPO (``f = logistic``). ``d/dz [p f(z) + (1 - p) f(-z)] = sigmoid(z) - p`` gives
   ``dL/dh_k = 2 beta q_k sum_j q_j (sigmoid(beta rho_kj) - P_kj)``; stationary (at
   ``beta_mix = 0``) iff ``sum_j pi_j sigmoid(beta (h_k - h_j)) = (P pi)_k`` for all ``k``.
   Linearising ``sigmoid(z) ≈ 1/2 + z/4`` turns this into online IPO's condition at
   ``tau = beta / 4`` (the same ``beta_eff / 2`` as IPO's ``beta / 2``), so online DPO lands
   *near* ``pi*_{beta/4}``, but the curvature of ``sigmoid`` moves it off the Nash path:
   ``h`` is not an affine function of ``P pi`` (which every ``pi*_tau`` satisfies), so no
   ``tau`` makes it a regularised Nash. (SPEC game, ``beta = 0.4``: TV 0.0104 from
   ``pi*_0.1``; least-squares residual of ``h`` on ``[P pi, 1]`` 3e-3.)

All JAX functions accept traced ``beta``/``tau``/``beta_mix``/``learning_rate``, so sweeps are
``jax.vmap`` over them without recompiling. Public functions are jitted with ``f`` (and
sample counts) static. Value checks run only on concrete inputs (skipped under
``jit``/``vmap``/``grad``); shape checks always run. :func:`regularised_nash` and
:func:`mixture_fixed_point` are float64 NumPy.

References:
  Calandriello et al. 2024, "Human Alignment of Large Language Models through Online
  Preference Optimisation", arXiv 2403.08635 (online IPO, IPO-MD).
  Munos et al. 2023, "Nash Learning from Human Feedback", arXiv 2312.00886 (the
  regularised preference game, Nash-MD, Nash-MD-PG).
  Tang et al. 2024, arXiv 2402.05749 (the GPO losses, :mod:`gpo_jax.objectives.losses`).
"""

import functools
import inspect
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gpo_jax.core import compat
from gpo_jax.lab import tabular
from gpo_jax.objectives import losses

Array = jax.Array
LossFn = Callable[[Array], Array]

OPTIMIZERS = tabular.OPTIMIZERS

# Same float32-friendly tolerances as the tabular lab.
_SUM_ATOL = 1e-4
_SYM_ATOL = 1e-5


class GameRun(NamedTuple):
  """Result of a game-lab training run.

  Attributes:
    logits_K: final policy logits ``theta``.
    log_pi_mix_K: final ``log pi_mix`` (equals ``log pi`` when ``beta_mix = 0``).
    trajectory: dict of ``[steps, ...]`` arrays, entry ``t`` measured after update ``t + 1``.
  """
  logits_K: Array
  log_pi_mix_K: Array
  trajectory: dict[str, Array]


# ----------------------------------------------------------------------------- checks


def _concrete(x) -> np.ndarray | None:
  return None if x is None else compat.concrete_value(x)


def _check_P(P_KxK, k: int | None = None) -> int:
  shape = jnp.shape(P_KxK)
  if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 2:
    raise ValueError(f"P_KxK must have shape [K, K] with K >= 2, got shape {shape}.")
  if k is not None and shape[0] != k:
    raise ValueError(f"P_KxK must have shape {(k, k)} to match K={k} actions, got {shape}.")
  p = _concrete(P_KxK)
  if p is not None:
    ok = np.isfinite(p) & (p >= 0) & (p <= 1)
    if not np.all(ok):
      i, j = np.argwhere(~ok)[0]
      raise ValueError(
          f"P_KxK entries are probabilities P(i > j) in [0, 1]; P[{i}, {j}] = "
          f"{float(p[i, j])!r}.")
    err = np.abs(p + p.T - 1.0)
    if np.max(err) > _SYM_ATOL:
      i, j = np.unravel_index(np.argmax(err), err.shape)
      raise ValueError(
          f"P_KxK must satisfy P + P^T = 1 (P[i, j] = P(i > j), diagonal 1/2); got "
          f"P[{i}, {j}] + P[{j}, {i}] = {float(p[i, j])!r} + {float(p[j, i])!r} = "
          f"{float(p[i, j] + p[j, i])!r}.")
  return shape[0]


def _check_log_mu(log_mu_K, k: int | None = None) -> int:
  shape = jnp.shape(log_mu_K)
  if len(shape) != 1 or shape[0] < 2:
    raise ValueError(f"log_mu_K must have shape [K] with K >= 2, got shape {shape}.")
  if k is not None and shape[0] != k:
    raise ValueError(f"log_mu_K must have shape {(k,)} to match K={k} actions, got {shape}.")
  v = _concrete(log_mu_K)
  if v is not None:
    if not np.all(np.isfinite(v)):
      raise ValueError(
          f"log_mu_K must be finite log-probabilities (mu needs full support), got "
          f"{v.tolist()}.")
    total = float(np.exp(v.astype(np.float64)).sum())
    if abs(total - 1.0) > _SUM_ATOL:
      raise ValueError(
          f"log_mu_K must be log-probabilities of a distribution (sum exp = 1), got "
          f"sum exp(log_mu_K) = {total!r} for log_mu_K = {v.tolist()} (pass log(mu), not mu).")
  return shape[0]


def _check_mu(mu_K) -> np.ndarray:
  mu = np.asarray(mu_K, np.float64)
  if mu.ndim != 1 or mu.shape[0] < 2:
    raise ValueError(f"mu_K must have shape [K] with K >= 2, got shape {mu.shape}.")
  if not np.all(np.isfinite(mu) & (mu > 0)):
    raise ValueError(f"mu_K must be a distribution with every entry > 0, got {mu.tolist()}.")
  if abs(mu.sum() - 1.0) > _SUM_ATOL:
    raise ValueError(f"mu_K must sum to 1 (a distribution), got sum {float(mu.sum())!r} for "
                     f"{mu.tolist()}.")
  return mu / mu.sum()


def _check_theta(theta_K, k: int, name: str = "theta_K") -> None:
  if jnp.shape(theta_K) != (k,):
    raise ValueError(f"{name} must have shape {(k,)} to match K={k} actions, got shape "
                     f"{jnp.shape(theta_K)}.")


def _check_positive(x, name: str) -> None:
  v = _concrete(x)
  if v is not None and (v.dtype.kind not in "fiu" or not np.all(np.isfinite(v))
                        or not np.all(v > 0)):
    raise ValueError(f"{name} must be finite and > 0, got {x!r}.")


def _check_beta_mix(beta_mix) -> None:
  v = _concrete(beta_mix)
  if v is not None and (v.dtype.kind not in "fiu" or not np.all(np.isfinite(v))
                        or not np.all((v >= 0) & (v < 1))):
    raise ValueError(
        f"beta_mix (the weight on mu in the geometric mixture) must lie in [0, 1), got "
        f"{beta_mix!r}.")


def _check_count(n, name: str) -> None:
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
    raise ValueError(f"{name} must be a positive Python int, got {n!r}.")


def _check_optimizer(optimizer: str) -> None:
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {optimizer!r}; valid names: {sorted(OPTIMIZERS)}.")


def _validate(a: dict) -> None:
  """Checks the tabular arguments found (by name) in the bound-argument dict ``a``."""
  k = None
  if a.get("log_mu_K") is not None:
    k = _check_log_mu(a["log_mu_K"])
  if a.get("P_KxK") is not None:
    k = _check_P(a["P_KxK"], k)
  for name in ("theta_K", "logits_K", "theta0_K"):
    if a.get(name) is not None and k is not None:
      _check_theta(a[name], k, name)
  if "beta" in a:
    losses.check_beta(a["beta"])
  for name in ("tau", "learning_rate"):
    if name in a:
      _check_positive(a[name], name)
  if "beta_mix" in a:
    _check_beta_mix(a["beta_mix"])
  if "f" in a:
    losses.get_f(a["f"])
  for name in ("n", "n_pairs", "steps"):
    if name in a:
      _check_count(a[name], name)
  if "optimizer" in a:
    _check_optimizer(a["optimizer"])


def _checked(fn=None, *, static_argnames=()):
  """Jits ``fn`` and checks its arguments (found by name) before each call.

  The checks run outside ``jit``, where values are still concrete; under an enclosing
  ``jit``/``vmap`` they see tracers and only the shape checks apply.
  """
  if fn is None:
    return functools.partial(_checked, static_argnames=static_argnames)
  signature = inspect.signature(fn)
  jitted = jax.jit(fn, static_argnames=static_argnames)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    _validate(bound.arguments)
    return jitted(*args, **kwargs)

  wrapper.jitted = jitted
  return wrapper


# ------------------------------------------------------------- NumPy fixed points (float64)


def _np_softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - np.max(x))
  return e / e.sum()


def _check_tau_np(tau, name: str = "tau") -> float:
  try:
    t = float(np.asarray(tau))
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError) as e:
    raise ValueError(f"{name} must be a concrete finite scalar > 0, got {tau!r}.") from e
  if not (np.isfinite(t) and t > 0):
    raise ValueError(f"{name} must be finite and > 0, got {tau!r}.")
  return t


def regularised_nash(P_KxK, mu_K, tau, *, iters: int = 100, tol: float = 1e-12) -> np.ndarray:
  """The regularised Nash ``pi*_tau``: the fixed point of ``pi ∝ mu exp(P pi / tau)``.

  Solved in float64 NumPy by Newton's method on the centred log-space residual
  ``r(x) = x - log mu - P softmax(x) / tau`` (mod constants) with an Armijo backtracking
  line search on ``|r|``. The method converges from any start: the Jacobian ``I - A D /
  tau`` (``D = diag pi - pi pi^T``, ``A = P - 1/2`` antisymmetric) is non-singular modulo
  constants (``v^T D (I - A D/tau) v = v^T D v`` since ``D A D`` is antisymmetric) and the
  sub-level sets of ``|r|`` are bounded (``|x| <= |r| + |log mu| + 1/tau``). Plain damped
  iteration would need a step ``~ tau^2`` for small ``tau`` (the linearisation has
  eigenvalues ``±i omega / tau``).

  Args:
    P_KxK: preference matrix (``P + P^T = 1``).
    mu_K: reference probabilities, every entry ``> 0``, summing to 1.
    tau: regularisation temperature ``> 0`` (a concrete scalar).
    iters: maximum Newton iterations (typically < 15 are needed).
    tol: convergence threshold on ``max_k |r_k|`` in nats (the largest relative error of a
      probability), scaled by ``1 + 1/tau`` to allow round-off when ``tau`` is small.

  Returns:
    ``pi_K`` (float64 NumPy).

  Raises:
    ValueError: invalid ``P``, ``mu`` or ``tau`` (naming the value).
    RuntimeError: no convergence within ``iters`` (reports the residual reached).

  References:
    Munos et al. 2023, arXiv 2312.00886 (the regularised preference game).
  """
  mu = _check_mu(mu_K)
  k = mu.shape[0]
  _check_P(np.asarray(P_KxK), k)
  P = np.asarray(P_KxK, np.float64)
  t = _check_tau_np(tau)
  _check_count(iters, "iters")
  log_mu = np.log(mu)
  thresh = tol * (1.0 + 1.0 / t)

  def residual(x):
    pi = _np_softmax(x)
    r = x - log_mu - P @ pi / t
    return r - r.mean(), pi

  x = log_mu - log_mu.mean()
  r, pi = residual(x)
  norm = float(np.max(np.abs(r)))
  for _ in range(iters):
    if norm <= thresh:
      return pi
    D = np.diag(pi) - np.outer(pi, pi)
    J = np.eye(k) - P @ D / t
    J = J - J.mean(axis=0, keepdims=True)  # residual is centred
    # Gauge: the step has zero sum (x is defined up to a constant).
    d = np.linalg.lstsq(np.vstack([J, np.ones((1, k))]), np.concatenate([-r, [0.0]]),
                        rcond=None)[0]
    l2 = float(np.linalg.norm(r))
    step = 1.0
    while True:
      r_new, pi_new = residual(x + step * d)
      if np.linalg.norm(r_new) <= (1.0 - 1e-4 * step) * l2:
        break
      step *= 0.5
      if step < 1e-12:
        raise RuntimeError(
            f"regularised_nash: line search stalled at residual {norm:.3e} (threshold "
            f"{thresh:.3e}, tau={t!r}); round-off limits the accuracy, raise tol.")
    x, r, pi = x + step * d, r_new, pi_new
    norm = float(np.max(np.abs(r)))
  if norm <= thresh:
    return pi
  raise RuntimeError(
      f"regularised_nash did not converge in iters={iters} Newton steps: residual "
      f"{norm:.3e} > threshold {thresh:.3e} (tau={t!r}); raise iters or tol.")


def mixture_fixed_point(P_KxK, mu_K, tau, beta_mix) -> tuple[np.ndarray, np.ndarray]:
  """The common fixed point of IPO-MD (``beta = 2 tau``) and Nash-MD-PG at ``beta_mix``.

  Both are stationary where ``pi ∝ mu exp(P pi_mix / tau)``; then ``pi_mix =
  pi*_{tau/(1 - beta_mix)}`` (:func:`regularised_nash`) and ``pi = softmax(log mu + P pi_mix /
  tau)``. At ``beta_mix = 0`` both are ``pi*_tau``.

  Args:
    P_KxK: preference matrix.
    mu_K: reference probabilities.
    tau: temperature ``> 0``.
    beta_mix: mixture weight on ``mu`` in ``[0, 1)``.

  Returns:
    ``(pi_K, pi_mix_K)``, float64 NumPy.
  """
  t = _check_tau_np(tau)
  _check_beta_mix(beta_mix)
  b = float(beta_mix)
  pi_mix = regularised_nash(P_KxK, mu_K, t / (1.0 - b))
  mu = _check_mu(mu_K)
  pi = _np_softmax(np.log(mu) + np.asarray(P_KxK, np.float64) @ pi_mix / t)
  return pi, pi_mix


# ------------------------------------------------------------------------ exact (JAX)


def _mix(logp_K, log_mu_K, beta_mix):
  return jax.nn.log_softmax((1.0 - beta_mix) * logp_K + beta_mix * log_mu_K)


@_checked
def geometric_mixture(logits_K: Array, log_mu_K: Array, beta_mix) -> Array:
  """``log pi_mix`` with ``log pi_mix ∝ (1 - beta_mix) log pi + beta_mix log mu``.

  ``beta_mix`` is the weight on ``mu = pi_ref`` (Calandriello et al.'s 0.125 is their best
  IPO-MD setting; HF TRL's ``mixture_coef`` means the same). ``logits_K`` may be logits or
  ``log pi`` (normalised here either way).

  Returns:
    ``log_pi_mix_K`` (normalised).

  References:
    Calandriello et al. 2024, arXiv 2403.08635; Munos et al. 2023, arXiv 2312.00886.
  """
  return _mix(jax.nn.log_softmax(logits_K), jax.nn.log_softmax(log_mu_K), beta_mix)


def _exploitability(logits_K, log_mu_K, P_KxK, tau):
  logp = jax.nn.log_softmax(logits_K)
  log_mu = jax.nn.log_softmax(log_mu_K)
  pi = jnp.exp(logp)
  kl = jnp.sum(pi * (logp - log_mu))
  return tau * jax.nn.logsumexp(log_mu + P_KxK @ pi / tau) + tau * kl - 0.5


@_checked
def exploitability(logits_K: Array, log_mu_K: Array, P_KxK: Array, tau) -> Array:
  """Exploitability of ``pi`` in the ``tau``-regularised preference game.

  ``max_pi' [P(pi' > pi) - tau KL(pi' || mu)] + tau KL(pi || mu) - 1/2 =
  tau log sum_i mu_i exp((P pi)_i / tau) + tau KL(pi || mu) - 1/2`` (the maximiser is the
  Gibbs best response ``∝ mu exp(P pi / tau)``). Non-negative (in exact arithmetic; float32
  round-off is ~1e-7), zero exactly at :func:`regularised_nash`.

  Returns:
    Scalar.
  """
  return _exploitability(logits_K, log_mu_K, P_KxK, tau)


def _online_gpo_loss(theta_K, log_mu_K, P_KxK, beta, f, beta_mix):
  logp = jax.nn.log_softmax(theta_K)
  log_mu = jax.nn.log_softmax(log_mu_K)
  q = jax.lax.stop_gradient(jnp.exp(_mix(logp, log_mu, beta_mix)))
  h = logp - log_mu
  rho_KxK = h[:, None] - h[None, :]
  return jnp.sum(q[:, None] * q[None, :] * losses.gpo_loss(rho_KxK, beta, f, P_KxK))


@_checked(static_argnames="f")
def expected_online_gpo_loss(theta_K: Array, log_mu_K: Array, P_KxK: Array, beta,
                             f: str | LossFn = "squared", beta_mix=0.0) -> Array:
  """Exact expected online GPO loss with soft labels and sampling ``q = sg(pi_mix)``.

  ``sum_ij q_i q_j [P_ij f(beta rho_ij) + (1 - P_ij) f(-beta rho_ij)]``: pairs ``(y, y')``
  i.i.d. from ``q``, soft label ``P[y, y']``. ``f = squared`` is online IPO with ``tau =
  beta / 2`` (IPO-MD when ``beta_mix > 0``), ``logistic`` online DPO, ``hinge`` online SLiC.
  The value is that of the current step's objective (``q`` frozen); only its gradient
  (:func:`online_gpo_grad`) drives training.

  Args:
    theta_K: policy logits.
    log_mu_K: reference log-probabilities.
    P_KxK: preference matrix.
    beta: positive scalar (may be traced).
    f: GPO family name or callable (static).
    beta_mix: weight on ``mu`` in the sampling mixture, ``[0, 1)`` (may be traced).

  Returns:
    Scalar loss.

  References:
    Calandriello et al. 2024, arXiv 2403.08635.
  """
  return _online_gpo_loss(theta_K, log_mu_K, P_KxK, beta, f, beta_mix)


def _online_gpo_grad(theta_K, log_mu_K, P_KxK, beta, f, beta_mix):
  return jax.grad(_online_gpo_loss)(theta_K, log_mu_K, P_KxK, beta, f, beta_mix)


@_checked(static_argnames="f")
def online_gpo_grad(theta_K: Array, log_mu_K: Array, P_KxK: Array, beta,
                    f: str | LossFn = "squared", beta_mix=0.0) -> Array:
  """Exact expected online GPO gradient ``grad_theta`` of :func:`expected_online_gpo_loss`.

  A descent gradient. Equals the expectation of :func:`sampled_online_gpo_grad`.

  Returns:
    ``grad_K``.
  """
  return _online_gpo_grad(theta_K, log_mu_K, P_KxK, beta, f, beta_mix)


def _nash_md_surrogate(theta_K, log_mu_K, P_KxK, tau, beta_mix):
  logp = jax.nn.log_softmax(theta_K)
  log_mu = jax.nn.log_softmax(log_mu_K)
  pi = jnp.exp(logp)
  q = jax.lax.stop_gradient(jnp.exp(_mix(logp, log_mu, beta_mix)))
  kl = jnp.sum(pi * (logp - log_mu))
  return -(jnp.sum(pi * (P_KxK @ q - 0.5)) - tau * kl)


def _nash_md_grad(theta_K, log_mu_K, P_KxK, tau, beta_mix):
  return jax.grad(_nash_md_surrogate)(theta_K, log_mu_K, P_KxK, tau, beta_mix)


@_checked
def nash_md_grad(theta_K: Array, log_mu_K: Array, P_KxK: Array, tau, beta_mix=0.0) -> Array:
  """Exact expected Nash-MD-PG update, as a **descent** gradient (the negated ascent step).

  Returns ``-G`` with ``G = sum_i pi_i grad log pi_i ((P pi_mix)_i - 1/2 - tau h_i)``,
  ``pi_mix`` built from ``sg(pi)``. Computed as the gradient of the surrogate loss
  ``-[P(pi > sg pi_mix) - 1/2 - tau KL(pi || mu)]``: ``grad P(pi > q) = sum_i pi_i grad log
  pi_i (P q)_i`` and ``grad KL = sum_i pi_i h_i grad log pi_i``. The ``-1/2`` baseline does not
  change the expectation (``E_pi grad log pi = 0``). Equals the expectation of
  :func:`sampled_nash_md_grad`.

  Args:
    theta_K: policy logits.
    log_mu_K: reference log-probabilities.
    P_KxK: preference matrix.
    tau: positive temperature (may be traced).
    beta_mix: weight on ``mu`` in the opponent mixture, ``[0, 1)`` (may be traced).

  Returns:
    ``grad_K``.

  References:
    Munos et al. 2023, arXiv 2312.00886 (Nash-MD-PG).
  """
  return _nash_md_grad(theta_K, log_mu_K, P_KxK, tau, beta_mix)


# ------------------------------------------------------------------ sampled estimators


def _per_draw_online_gpo(theta_K, log_mu_K, P_KxK, beta, f, beta_mix, key, n_pairs):
  logp = jax.nn.log_softmax(theta_K)
  log_mu = jax.nn.log_softmax(log_mu_K)
  log_q = jax.lax.stop_gradient(_mix(logp, log_mu, beta_mix))
  k1, k2 = jax.random.split(key)
  y = jax.random.categorical(k1, log_q, shape=(n_pairs,))
  y2 = jax.random.categorical(k2, log_q, shape=(n_pairs,))
  p = P_KxK[y, y2]

  def pair_loss(theta, a, b, label):
    h = jax.nn.log_softmax(theta) - log_mu
    return losses.gpo_loss(h[a] - h[b], beta, f, label)

  return jax.vmap(jax.grad(pair_loss), in_axes=(None, 0, 0, 0))(theta_K, y, y2, p)


@_checked(static_argnames=("f", "n_pairs"))
def per_draw_online_gpo_grads(theta_K: Array, log_mu_K: Array, P_KxK: Array, beta,
                              f: str | LossFn, beta_mix, key: Array,
                              n_pairs: int) -> Array:
  """Per-pair online GPO gradients: ``y, y'`` i.i.d. from ``sg(pi_mix)``, label ``P[y, y']``.

  Row ``n`` is ``grad_theta [p f(beta rho) + (1 - p) f(-beta rho)]`` for the ``n``-th pair;
  rows are i.i.d. with mean :func:`online_gpo_grad`, so their standard deviation gives the
  standard error of :func:`sampled_online_gpo_grad`.

  Returns:
    ``grads_NxK`` with ``N = n_pairs`` (static).
  """
  return _per_draw_online_gpo(theta_K, log_mu_K, P_KxK, beta, f, beta_mix, key, n_pairs)


@_checked(static_argnames=("f", "n_pairs"))
def sampled_online_gpo_grad(theta_K: Array, log_mu_K: Array, P_KxK: Array, beta,
                            f: str | LossFn, beta_mix, key: Array, n_pairs: int) -> Array:
  """Monte Carlo online GPO gradient: the gradient of the mean loss over ``n_pairs`` pairs.

  Unbiased for :func:`online_gpo_grad` (the sampling distribution is stop-gradient).

  Returns:
    ``grad_K``.
  """
  return jnp.mean(
      _per_draw_online_gpo(theta_K, log_mu_K, P_KxK, beta, f, beta_mix, key, n_pairs), 0)


def _per_draw_nash_md(theta_K, log_mu_K, P_KxK, tau, beta_mix, key, n):
  logp = jax.nn.log_softmax(theta_K)
  log_mu = jax.nn.log_softmax(log_mu_K)
  k1, k2 = jax.random.split(key)
  y = jax.random.categorical(k1, jax.lax.stop_gradient(logp), shape=(n,))
  log_q = jax.lax.stop_gradient(_mix(logp, log_mu, beta_mix))
  y2 = jax.random.categorical(k2, log_q, shape=(n,))

  def surrogate(theta, a, b):
    lp = jax.nn.log_softmax(theta)
    score = jax.lax.stop_gradient(P_KxK[a, b] - 0.5 - tau * (lp[a] - log_mu[a]))
    return -score * lp[a]

  return jax.vmap(jax.grad(surrogate), in_axes=(None, 0, 0))(theta_K, y, y2)


@_checked(static_argnames="n")
def per_draw_nash_md_grads(theta_K: Array, log_mu_K: Array, P_KxK: Array, tau, beta_mix,
                           key: Array, n: int) -> Array:
  """Per-draw Nash-MD-PG descent gradients ``-grad log pi(y) (P[y, y'] - 1/2 - tau h_y)``.

  ``y ~ sg(pi)``, ``y' ~ sg(pi_mix)`` independently; ``h_y = log pi(y) - log mu(y)`` is the
  (sequence-level, here one-step) log-ratio, held fixed. Rows are i.i.d. with mean
  :func:`nash_md_grad`.

  Returns:
    ``grads_NxK`` (``N = n``, static).

  References:
    Munos et al. 2023, arXiv 2312.00886 (Nash-MD-PG).
  """
  return _per_draw_nash_md(theta_K, log_mu_K, P_KxK, tau, beta_mix, key, n)


@_checked(static_argnames="n")
def sampled_nash_md_grad(theta_K: Array, log_mu_K: Array, P_KxK: Array, tau, beta_mix,
                         key: Array, n: int) -> Array:
  """Monte Carlo Nash-MD-PG descent gradient: the mean of :func:`per_draw_nash_md_grads`."""
  return jnp.mean(_per_draw_nash_md(theta_K, log_mu_K, P_KxK, tau, beta_mix, key, n), 0)


# ------------------------------------------------------------------------------ training


def _tv(a_K, b_K):
  return 0.5 * jnp.sum(jnp.abs(a_K - b_K))


def _descend(grad_fn, metrics_fn, theta0_K, steps, learning_rate, optimizer):
  tx = OPTIMIZERS[optimizer](learning_rate)

  def step(carry, _):
    theta, opt_state = carry
    updates, opt_state = tx.update(grad_fn(theta), opt_state, theta)
    theta = optax.apply_updates(theta, updates)
    return (theta, opt_state), metrics_fn(theta)

  (theta, _), traj = jax.lax.scan(step, (theta0_K, tx.init(theta0_K)), length=steps)
  return theta, traj


def _metrics(grad_fn, log_mu, P_KxK, tau_mix, beta_mix, target_K):
  def metrics_fn(theta):
    logp = jax.nn.log_softmax(theta)
    log_mix = _mix(logp, log_mu, beta_mix)
    pi, pi_mix = jnp.exp(logp), jnp.exp(log_mix)
    out = {"pi": pi, "pi_mix": pi_mix,
           "kl": jnp.sum(pi * (logp - log_mu)),
           "grad_norm": jnp.linalg.norm(grad_fn(theta)),
           "exploitability": _exploitability(log_mix, log_mu, P_KxK, tau_mix)}
    if target_K is not None:
      out["tv"] = _tv(pi, target_K)
      out["tv_mix"] = _tv(pi_mix, target_K)
    return out
  return metrics_fn


@functools.partial(jax.jit, static_argnames=("f", "steps", "optimizer"))
def _train_online_gpo(theta0_K, log_mu_K, P_KxK, beta, beta_mix, learning_rate, target_K, *,
                      f, steps, optimizer):
  log_mu = jax.nn.log_softmax(log_mu_K)

  def grad_fn(theta):
    return _online_gpo_grad(theta, log_mu, P_KxK, beta, f, beta_mix)

  metrics_fn = _metrics(grad_fn, log_mu, P_KxK, 0.5 * beta / (1.0 - beta_mix), beta_mix,
                        target_K)
  theta, traj = _descend(grad_fn, metrics_fn, theta0_K, steps, learning_rate, optimizer)
  return GameRun(theta, _mix(jax.nn.log_softmax(theta), log_mu, beta_mix), traj)


@functools.partial(jax.jit, static_argnames=("steps", "optimizer"))
def _train_nash_md(theta0_K, log_mu_K, P_KxK, tau, beta_mix, learning_rate, target_K, *,
                   steps, optimizer):
  log_mu = jax.nn.log_softmax(log_mu_K)

  def grad_fn(theta):
    return _nash_md_grad(theta, log_mu, P_KxK, tau, beta_mix)

  metrics_fn = _metrics(grad_fn, log_mu, P_KxK, tau / (1.0 - beta_mix), beta_mix, target_K)
  theta, traj = _descend(grad_fn, metrics_fn, theta0_K, steps, learning_rate, optimizer)
  return GameRun(theta, _mix(jax.nn.log_softmax(theta), log_mu, beta_mix), traj)


def _start(log_mu_K, theta0_K, target_K):
  log_mu_K = jnp.asarray(log_mu_K)
  theta0_K = log_mu_K if theta0_K is None else jnp.asarray(theta0_K, log_mu_K.dtype)
  if target_K is not None:
    target_K = jnp.asarray(target_K, log_mu_K.dtype)
    _check_theta(target_K, log_mu_K.shape[0], "target_K")
  return theta0_K, target_K


def train_online_gpo(log_mu_K: Array, P_KxK: Array, beta, f: str | LossFn = "squared", *,
                     beta_mix=0.0, theta0_K: Array | None = None,
                     target_K: Array | None = None, steps: int = 2000,
                     learning_rate=5.0, optimizer: str = "sgd") -> GameRun:
  """Online GPO (IPO / DPO / SLiC / IPO-MD) on the exact expected gradient (``lax.scan``).

  Each step descends :func:`online_gpo_grad` with the sampling distribution ``sg(pi_mix)``
  of the current policy. ``beta``, ``beta_mix`` and ``learning_rate`` may be traced, so
  ``jax.vmap`` over them compiles one program.

  For ``f = squared`` the fixed point is :func:`mixture_fixed_point` at ``tau = beta / 2``
  (online IPO: ``pi*_{beta/2}``; IPO-MD: ``pi_mix = pi*_{beta / (2 (1 - beta_mix))}``). The
  online IPO gradient is exactly ``8 beta`` times Nash-MD-PG's at ``tau = beta / 2`` (module
  docstring), so its SGD step matches Nash-MD-PG's with ``learning_rate / (8 beta)``. On the
  SPEC 3-action game (``beta = 0.2``) SGD with learning rate 5-10 converges in a few
  hundred steps; 20 oscillates.

  Args:
    log_mu_K: reference log-probabilities.
    P_KxK: preference matrix.
    beta: positive scalar.
    f: GPO family (static).
    beta_mix: mixture weight on ``mu`` in ``[0, 1)``.
    theta0_K: initial logits (default ``log mu``: start at the reference).
    target_K: optional probabilities to measure ``tv``/``tv_mix`` against.
    steps: number of updates (static).
    learning_rate: step size.
    optimizer: a key of :data:`OPTIMIZERS`.

  Returns:
    :class:`GameRun`; trajectory keys ``pi``, ``pi_mix`` (``[steps, K]``), ``kl`` (``KL(pi ||
    mu)``), ``grad_norm`` (of the exact gradient), ``exploitability`` (of ``pi_mix`` in the
    game at ``tau = beta / (2 (1 - beta_mix))``: zero at the fixed point for ``f = squared``
    only), and with ``target_K`` also ``tv`` (``pi``) and ``tv_mix`` (``pi_mix``).
  """
  _validate({"log_mu_K": log_mu_K, "P_KxK": P_KxK, "theta0_K": theta0_K, "beta": beta,
             "f": f, "beta_mix": beta_mix, "learning_rate": learning_rate, "steps": steps,
             "optimizer": optimizer})
  theta0_K, target_K = _start(log_mu_K, theta0_K, target_K)
  return _train_online_gpo(theta0_K, log_mu_K, P_KxK, beta, beta_mix, learning_rate,
                           target_K, f=f, steps=int(steps), optimizer=optimizer)


def train_nash_md(log_mu_K: Array, P_KxK: Array, tau, *, beta_mix=0.0,
                  theta0_K: Array | None = None, target_K: Array | None = None,
                  steps: int = 2000, learning_rate=10.0,
                  optimizer: str = "sgd") -> GameRun:
  """Nash-MD-PG on the exact expected update (``lax.scan``).

  Each step descends :func:`nash_md_grad` (i.e. ascends the Nash-MD-PG direction) with the
  opponent ``sg(pi_mix)`` of the current policy. ``tau``, ``beta_mix`` and
  ``learning_rate`` may be traced. Fixed point: :func:`mixture_fixed_point` (``pi*_tau`` at
  ``beta_mix = 0``). On the SPEC 3-action game (``tau = 0.1``) SGD with learning rate 5-20
  converges in a few hundred steps; 40 oscillates.

  Args:
    log_mu_K: reference log-probabilities.
    P_KxK: preference matrix.
    tau: positive temperature.
    beta_mix: mixture weight on ``mu`` in ``[0, 1)``.
    theta0_K: initial logits (default ``log mu``).
    target_K: optional probabilities for ``tv``/``tv_mix``.
    steps: number of updates (static).
    learning_rate: step size.
    optimizer: a key of :data:`OPTIMIZERS`.

  Returns:
    :class:`GameRun` with the trajectory keys of :func:`train_online_gpo`;
    ``exploitability`` is that of ``pi_mix`` at ``tau / (1 - beta_mix)`` (zero at the fixed
    point for every ``beta_mix``).
  """
  _validate({"log_mu_K": log_mu_K, "P_KxK": P_KxK, "theta0_K": theta0_K, "tau": tau,
             "beta_mix": beta_mix, "learning_rate": learning_rate, "steps": steps,
             "optimizer": optimizer})
  theta0_K, target_K = _start(log_mu_K, theta0_K, target_K)
  return _train_nash_md(theta0_K, log_mu_K, P_KxK, tau, beta_mix, learning_rate, target_K,
                        steps=int(steps), optimizer=optimizer)
