"""The exact tabular lab: one prompt, K actions, a softmax policy and exact expectations.

Everything is a closed-form sum over the ``K`` actions or the ``K x K`` pairs, so losses,
KL divergences and optima are exact (no sampling). Used to unit-test the GPO losses and
to inspect the offline-regulariser-vs-KL theory of SPEC §1 and §3.

Objects (``K`` actions, shapes as suffixes):

* ``logits_K``: policy logits ``theta``, ``pi = softmax(theta)``.
* ``ref_logits_K``: reference logits, ``pi_ref = softmax(ref_logits)`` (pass
  ``log(pi_ref)`` to use probabilities; entries must be finite).
* ``mu_KxK``: the offline pair distribution, ``mu[i, j]`` = probability that the pair
  ``(i, j)`` is drawn, ``i`` listed first. Entries are non-negative and sum to 1. Ordered
  (full matrix) and unordered (upper triangle) pair distributions are both fine: with soft
  labels the pair ``(i, j)`` with label ``P[i, j]`` has the same loss as ``(j, i)`` with
  ``P[j, i] = 1 - P[i, j]``. Diagonal mass contributes the constant ``f(0)``.
* ``P_KxK``: preferences, ``P[i, j] = P(i > j)`` with ``P + P^T = 1``; ``None`` means hard
  labels with the first action of every pair preferred.
* ``r_K``: rewards; :func:`bradley_terry` turns them into ``P = sigmoid((r_i - r_j)/t)``.
* ``h_K = log pi - log pi_ref`` (log-ratios) and ``rho_KxK[i, j] = h_i - h_j`` (margins).

Every function is pure and accepts traced ``beta``/``learning_rate``, so sweeps are
``jax.vmap`` over them. Public functions are jitted (eager JAX would compile every
primitive of these tiny programs separately); ``f`` is a static argument. Value checks on ``mu``/``P``/``beta`` run only on concrete inputs
(under ``jit``/``vmap``/``grad`` they are skipped); shape checks always run.

References:
  Tang et al. 2024, "Generalized Preference Optimization: A Unified Approach to Offline
  Alignment", arXiv 2402.05749 (GPO losses, the Taylor view, offline regularisation).
  Rafailov et al. 2023, "Direct Preference Optimization", arXiv 2305.18290 (the optimum
  ``pi* ∝ pi_ref exp(r/beta)`` and DPO's fixed point).
  Gao, Schulman, Hilton 2023, "Scaling Laws for Reward Model Overoptimization",
  arXiv 2210.10760 (the controlled-lab setting).
"""

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gpo_jax.core import compat
from gpo_jax.objectives import losses

Array = jax.Array
LossFn = Callable[[Array], Array]

# Optimisers whose only hyperparameter is the learning rate, so it can be traced (a sweep
# over learning rates under vmap does not recompile).
OPTIMIZERS: dict[str, Callable[[Any], optax.GradientTransformation]] = {
    "sgd": optax.sgd,
    "adam": optax.adam,
}

# Tolerances for "sums to 1" and "P + P^T = 1": loose enough for float32 inputs that were
# normalised in float32, tight enough to catch a wrong matrix.
_SUM_ATOL = 1e-4
_SYM_ATOL = 1e-5


class TabularRun(NamedTuple):
  """Result of a tabular training run.

  Attributes:
    logits_K: final policy logits.
    params: final trained parameters (``logits_K`` itself, or the feature weights ``w_D``
      when the run used a log-linear policy).
    trajectory: dict of ``[steps]`` arrays, entry ``t`` measured after update ``t + 1``.
  """
  logits_K: Array
  params: Array
  trajectory: dict[str, Array]


# ----------------------------------------------------------------------------- checks


def _concrete(x) -> np.ndarray | None:
  """``x`` as a NumPy array, or None when it is traced (value unknown)."""
  return None if x is None else compat.concrete_value(x)


def validate(ref_logits_K, mu_KxK=None, P_KxK=None, r_K=None, features_KxD=None) -> int:
  """Checks shapes (always) and values (when concrete) of tabular inputs.

  Args:
    ref_logits_K: ``[K]`` finite reference logits, ``K >= 2``.
    mu_KxK: optional ``[K, K]`` pair distribution: non-negative, sums to 1.
    P_KxK: optional ``[K, K]`` preference matrix: entries in ``[0, 1]``, ``P + P^T = 1``.
    r_K: optional ``[K]`` rewards.
    features_KxD: optional ``[K, D]`` features of a log-linear policy.

  Returns:
    ``K``.

  Raises:
    ValueError: naming the offending shape or value.
  """
  shape = jnp.shape(ref_logits_K)
  if len(shape) != 1 or shape[0] < 2:
    raise ValueError(f"ref_logits_K must have shape [K] with K >= 2, got shape {shape}.")
  k = shape[0]
  for name, x, want in (("mu_KxK", mu_KxK, (k, k)), ("P_KxK", P_KxK, (k, k)),
                        ("r_K", r_K, (k,))):
    if x is not None and jnp.shape(x) != want:
      raise ValueError(
          f"{name} must have shape {want} to match K={k} actions of ref_logits_K, "
          f"got shape {jnp.shape(x)}.")
  if features_KxD is not None and (jnp.ndim(features_KxD) != 2
                                   or jnp.shape(features_KxD)[0] != k):
    raise ValueError(
        f"features_KxD must have shape (K={k}, D), got shape {jnp.shape(features_KxD)}.")

  ref = _concrete(ref_logits_K)
  if ref is not None and not np.all(np.isfinite(ref)):
    raise ValueError(
        f"ref_logits_K must be finite (pi_ref needs full support for a finite KL), got "
        f"{ref.tolist()}.")
  mu = _concrete(mu_KxK)
  if mu is not None:
    ok = np.isfinite(mu) & (mu >= 0)
    if not np.all(ok):
      bad = np.argwhere(~ok)[0].tolist()
      raise ValueError(
          f"mu_KxK must be a distribution over pairs with finite entries >= 0; entry {bad} is "
          f"{mu[tuple(bad)]!r}.")
    total = float(mu.sum())
    if abs(total - 1.0) > _SUM_ATOL:
      raise ValueError(
          f"mu_KxK must sum to 1 (a distribution over pairs), got sum {total!r}.")
  p = _concrete(P_KxK)
  if p is not None:
    if not np.all((p >= 0) & (p <= 1)):
      bad = np.argwhere(~((p >= 0) & (p <= 1)))[0].tolist()
      raise ValueError(
          f"P_KxK entries are probabilities P(i > j) in [0, 1]; entry {bad} is "
          f"{p[tuple(bad)]!r}.")
    err = np.abs(p + p.T - 1.0)
    if np.max(err) > _SYM_ATOL:
      i, j = np.unravel_index(np.argmax(err), err.shape)
      raise ValueError(
          f"P_KxK must satisfy P + P^T = 1 (P[i, j] = P(i > j)); got P[{i}, {j}] + "
          f"P[{j}, {i}] = {p[i, j]!r} + {p[j, i]!r} = {p[i, j] + p[j, i]!r}.")
  return k


def _check_steps(steps) -> None:
  if not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"steps must be a positive Python int, got {steps!r}.")


def _check_optimizer(optimizer: str) -> None:
  if optimizer not in OPTIMIZERS:
    raise ValueError(
        f"Unknown optimizer {optimizer!r}; valid names: {sorted(OPTIMIZERS)}.")


def _check_positive(x, name: str) -> None:
  v = _concrete(x)
  if v is not None and (not np.all(np.isfinite(v)) or not np.all(v > 0)):
    raise ValueError(f"{name} must be finite and > 0, got {x!r}.")


def _exact(fn=None, *, static_argnames=()):
  """Jits ``fn`` and checks its tabular arguments (found by name) before each call.

  Eager JAX compiles every primitive separately, which dominates the cost of these tiny
  programs; one compiled program per function (and per static ``f``) is much cheaper. The
  checks run here, outside ``jit``, where the values are still concrete.
  """
  if fn is None:
    return functools.partial(_exact, static_argnames=static_argnames)
  signature = inspect.signature(fn)
  jitted = jax.jit(fn, static_argnames=static_argnames)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    a = signature.bind(*args, **kwargs).arguments
    if "ref_logits_K" in a:
      validate(a["ref_logits_K"], a.get("mu_KxK"), a.get("P_KxK"), a.get("r_K"))
    if "beta" in a:
      losses.check_beta(a["beta"])
    if "label_temp" in a:
      _check_positive(a["label_temp"], "label_temp")
    if "f" in a:
      losses.get_f(a["f"])
    return jitted(*args, **kwargs)

  return wrapper


# ----------------------------------------------------------------------- exact quantities


@_exact
def bradley_terry(r_K: Array, label_temp=1.0) -> Array:
  """Bradley–Terry preference matrix ``P[i, j] = sigmoid((r_i - r_j) / label_temp)``.

  Args:
    r_K: ``[K]`` rewards.
    label_temp: positive label temperature (may be traced).

  Returns:
    ``P_KxK`` with ``P + P^T = 1``.
  """
  return jax.nn.sigmoid((r_K[:, None] - r_K[None, :]) / label_temp)


@_exact
def log_ratios(logits_K: Array, ref_logits_K: Array) -> Array:
  """``h_K = log pi - log pi_ref`` for the softmax policy and reference."""
  return jax.nn.log_softmax(logits_K) - jax.nn.log_softmax(ref_logits_K)


@_exact
def margins(logits_K: Array, ref_logits_K: Array) -> Array:
  """All pairwise log-ratio margins ``rho_KxK[i, j] = h_i - h_j`` (``i`` chosen)."""
  logp_K = jax.nn.log_softmax(logits_K)
  ref_logp_K = jax.nn.log_softmax(ref_logits_K)
  return losses.log_ratio_margin(logp_K[:, None], logp_K[None, :],
                                 ref_logp_K[:, None], ref_logp_K[None, :])


@_exact
def kl_divergence(logits_K: Array, ref_logits_K: Array) -> Array:
  """Exact ``KL(pi || pi_ref) = sum_y pi(y) [log pi(y) - log pi_ref(y)]`` in nats."""
  logp_K = jax.nn.log_softmax(logits_K)
  return jnp.sum(jnp.exp(logp_K) * (logp_K - jax.nn.log_softmax(ref_logits_K)))


@_exact
def expected_reward(logits_K: Array, r_K: Array) -> Array:
  """Exact ``E_{y ~ pi} r(y)``."""
  return jnp.sum(jax.nn.softmax(logits_K) * r_K)


@_exact
def regularised_objective(logits_K: Array, ref_logits_K: Array, r_K: Array, beta) -> Array:
  """Exact KL-regularised objective ``E_pi r - beta KL(pi || pi_ref)``.

  References:
    Rafailov et al. 2023, arXiv 2305.18290, eq. (3).
  """
  return expected_reward(logits_K, r_K) - beta * kl_divergence(logits_K, ref_logits_K)


@_exact
def optimal_logits(ref_logits_K: Array, r_K: Array, beta) -> Array:
  """Logits of ``pi* ∝ pi_ref exp(r / beta)``, the maximiser of :func:`regularised_objective`."""
  return jax.nn.log_softmax(ref_logits_K) + r_K / beta


@_exact
def optimal_policy(ref_logits_K: Array, r_K: Array, beta) -> Array:
  """The exact KL-regularised optimum ``pi* = pi_ref exp(r / beta) / Z`` (probabilities).

  References:
    Rafailov et al. 2023, arXiv 2305.18290, eq. (4).
  """
  return jax.nn.softmax(optimal_logits(ref_logits_K, r_K, beta))


@_exact
def optimal_value(ref_logits_K: Array, r_K: Array, beta) -> Array:
  """``max_pi E_pi r - beta KL(pi || pi_ref) = beta log sum_y pi_ref(y) exp(r(y)/beta)``.

  The Gibbs variational principle: the maximum is attained at :func:`optimal_policy`.
  """
  return beta * jax.nn.logsumexp(optimal_logits(ref_logits_K, r_K, beta))


@_exact(static_argnames="f")
def expected_gpo_loss(logits_K: Array, ref_logits_K: Array, mu_KxK: Array, beta,
                      f: str | LossFn = "logistic", P_KxK: Array | None = None) -> Array:
  """Exact expected offline GPO loss under the pair distribution ``mu``.

  With soft labels (``P`` given) this is the expectation over pairs *and* labels,
  ``sum_ij mu_ij [P_ij f(beta rho_ij) + (1 - P_ij) f(-beta rho_ij)]``; with ``P=None``
  every pair is hard-labelled with its first action preferred, ``sum_ij mu_ij
  f(beta rho_ij)``.

  Args:
    logits_K: policy logits.
    ref_logits_K: reference logits.
    mu_KxK: pair distribution.
    beta: positive scalar (may be traced).
    f: GPO family name or any callable (:func:`gpo_jax.objectives.losses.get_f`).
    P_KxK: optional preference matrix (soft labels).

  Returns:
    Scalar loss.

  References:
    Tang et al. 2024, arXiv 2402.05749 (GPO); Kim et al. 2024, arXiv 2410.03145 (soft
    labels).
  """
  rho_KxK = margins(logits_K, ref_logits_K)
  return jnp.sum(mu_KxK * losses.gpo_loss(rho_KxK, beta, f, P_KxK))


@_exact
def offline_regulariser(logits_K: Array, ref_logits_K: Array, mu_KxK: Array) -> Array:
  """The mu-weighted squared loss ``1/2 sum_ij mu_ij rho_ij^2`` (SPEC §1 ``offline_reg``).

  It is the quadratic term of the Taylor view (:func:`taylor_loss`) up to the factor
  ``f''(0) beta^2``. It only constrains margins between actions that appear together in
  a pair of ``mu``'s support.
  """
  return 0.5 * jnp.sum(mu_KxK * jnp.square(margins(logits_K, ref_logits_K)))


@_exact
def onpolicy_squared_loss(logits_K: Array, ref_logits_K: Array) -> Array:
  """On-policy regulariser ``1/2 E_{y, y' ~ sg(pi)} (h(y) - h(y'))^2`` with ``h = log pi/pi_ref``.

  The sampling distribution is held fixed (stop-gradient), so the gradient flows only
  through ``h``, and since ``grad h(y) = grad log pi(y)``::

      grad = E_{y,y'}[(h(y) - h(y')) (grad log pi(y) - grad log pi(y'))]
           = 2 E_pi[h grad log pi] - 2 E_pi[h] E_pi[grad log pi]
           = 2 E_pi[h grad log pi]                      (E_pi grad log pi = 0)
           = 2 grad KL(pi || pi_ref),

  the last step because ``grad KL = sum_y grad pi(y) h(y) + E_pi[grad h] =
  E_pi[h grad log pi] + 0``. Its *value* is ``Var_pi(h)``, not ``2 KL``; only the
  gradients agree. Without the stop-gradient the identity fails.

  References:
    Tang et al. 2024, arXiv 2402.05749 (offline vs on-policy regularisation).
  """
  h_K = log_ratios(logits_K, ref_logits_K)
  pi_K = jax.lax.stop_gradient(jax.nn.softmax(logits_K))
  diff_KxK = h_K[:, None] - h_K[None, :]
  return 0.5 * jnp.sum(pi_K[:, None] * pi_K[None, :] * jnp.square(diff_KxK))


@_exact(static_argnames="f")
def taylor_loss(logits_K: Array, ref_logits_K: Array, mu_KxK: Array, beta,
                f: str | LossFn = "logistic", P_KxK: Array | None = None) -> Array:
  """Second-order Taylor view of :func:`expected_gpo_loss` around ``rho = 0``.

  Hard labels: ``f(0) + f'(0) beta E_mu[rho] + 1/2 f''(0) beta^2 E_mu[rho^2]``. With soft
  labels the ``f'`` term picks up the label: ``p f(z) + (1-p) f(-z) = f(0) + (2p - 1)
  f'(0) z + 1/2 f''(0) z^2 + O(z^3)``, so ``E_mu[rho]`` becomes ``E_mu[(2P - 1) rho]``.
  The error is ``O(rho^3)`` (``O(rho^4)`` when ``f'''(0) = 0``, e.g. logistic).
  Derivatives at 0 come from :func:`gpo_jax.objectives.losses.derivatives_at_zero` (autodiff).

  References:
    Tang et al. 2024, arXiv 2402.05749 (the Taylor view of offline regularisation).
  """
  f0, f1, f2 = losses.derivatives_at_zero(f)
  rho_KxK = margins(logits_K, ref_logits_K)
  sign_KxK = 1.0 if P_KxK is None else 2.0 * P_KxK - 1.0
  linear = jnp.sum(mu_KxK * sign_KxK * rho_KxK)
  quadratic = jnp.sum(mu_KxK * jnp.square(rho_KxK))
  return f0 * jnp.sum(mu_KxK) + f1 * beta * linear + 0.5 * f2 * beta**2 * quadratic


# ------------------------------------------------------------------------------ training


def _policy_logits(params, theta0_K, features_KxD):
  # Tabular: the parameters are the logits. Log-linear: logits = theta0 + Phi w, so
  # actions sharing features move together (the function-approximation case).
  if features_KxD is None:
    return params
  return theta0_K + features_KxD @ params


def _descend(loss_fn, metrics_fn, params0, steps, learning_rate, optimizer):
  """``steps`` optimiser updates of ``loss_fn`` in a ``lax.scan``; metrics after each."""
  tx = OPTIMIZERS[optimizer](learning_rate)

  def step(carry, _):
    params, opt_state = carry
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state), metrics_fn(params)

  (params, _), traj = jax.lax.scan(step, (params0, tx.init(params0)), length=steps)
  return params, traj


@functools.partial(jax.jit, static_argnames=("f", "steps", "optimizer"))
def _train_offline(params0, theta0_K, features_KxD, ref_logits_K, mu_KxK, P_KxK, r_K, beta,
                   learning_rate, *, f, steps, optimizer):
  logits = functools.partial(_policy_logits, theta0_K=theta0_K, features_KxD=features_KxD)

  def loss_fn(params):
    return expected_gpo_loss(logits(params), ref_logits_K, mu_KxK, beta, f, P_KxK)

  def metrics_fn(params):
    lg = logits(params)
    out = {"loss": loss_fn(params),
           "kl": kl_divergence(lg, ref_logits_K),
           "offline_reg": offline_regulariser(lg, ref_logits_K, mu_KxK)}
    if r_K is not None:
      out["reward"] = expected_reward(lg, r_K)
    return out

  params, traj = _descend(loss_fn, metrics_fn, params0, steps, learning_rate, optimizer)
  return TabularRun(logits(params), params, traj)


def _initial(ref_logits_K, theta0_K, features_KxD):
  """Initial (theta0, params0): the policy starts at theta0 (default: pi = pi_ref)."""
  ref_logits_K = jnp.asarray(ref_logits_K)
  theta0_K = ref_logits_K if theta0_K is None else jnp.asarray(theta0_K, ref_logits_K.dtype)
  if theta0_K.shape != ref_logits_K.shape:
    raise ValueError(
        f"theta0_K must have shape {ref_logits_K.shape} like ref_logits_K, got "
        f"{theta0_K.shape}.")
  if features_KxD is None:
    return theta0_K, theta0_K
  features_KxD = jnp.asarray(features_KxD, ref_logits_K.dtype)
  return theta0_K, jnp.zeros(features_KxD.shape[1], ref_logits_K.dtype)


def train_offline(ref_logits_K: Array, mu_KxK: Array, beta, f: str | LossFn = "logistic",
                  *, P_KxK: Array | None = None, r_K: Array | None = None,
                  label_temp=None, theta0_K: Array | None = None,
                  features_KxD: Array | None = None, steps: int = 1000,
                  learning_rate=0.1, optimizer: str = "sgd") -> TabularRun:
  """Gradient descent on the exact expected offline GPO loss (jitted ``lax.scan``).

  Labels: ``P_KxK`` if given; else, with ``label_temp`` and ``r_K``, Bradley–Terry soft
  labels ``sigmoid((r_i - r_j)/label_temp)``; else hard labels (first action of each
  pair preferred). ``r_K`` (if given) is also used to log the exact expected reward.

  Policy: tabular logits starting at ``theta0_K`` (default ``ref_logits_K``), or, with
  ``features_KxD``, the log-linear policy ``logits = theta0_K + features_KxD @ w`` trained
  in ``w_D`` from ``w = 0`` (actions then share parameters, which lets off-support log-
  ratios move; see SPEC §1).

  ``beta`` and ``learning_rate`` may be traced: ``jax.vmap`` over them (or over ``P_KxK``,
  ``mu_KxK``) runs a sweep without recompiling.

  Args:
    ref_logits_K: reference logits.
    mu_KxK: pair distribution.
    beta: positive inverse temperature.
    f: GPO family name or callable (static: a new callable compiles a new program).
    P_KxK: optional preference matrix.
    r_K: optional rewards (labels via ``label_temp``, and the ``reward`` trajectory).
    label_temp: Bradley–Terry label temperature; used only when ``P_KxK`` is None.
    theta0_K: optional initial logits.
    features_KxD: optional features of a log-linear policy.
    steps: number of updates (static).
    learning_rate: step size (may be traced).
    optimizer: a key of :data:`OPTIMIZERS`.

  Returns:
    :class:`TabularRun` with trajectory keys ``loss``, ``kl``, ``offline_reg`` (and
    ``reward`` when ``r_K`` is given).
  """
  validate(ref_logits_K, mu_KxK, P_KxK, r_K, features_KxD)
  losses.get_f(f)
  losses.check_beta(beta)
  _check_positive(learning_rate, "learning_rate")
  _check_steps(steps)
  _check_optimizer(optimizer)
  if P_KxK is None and label_temp is not None:
    if r_K is None:
      raise ValueError("label_temp needs r_K (Bradley–Terry labels from rewards).")
    P_KxK = bradley_terry(r_K, label_temp)
  theta0_K, params0 = _initial(ref_logits_K, theta0_K, features_KxD)
  return _train_offline(params0, theta0_K, features_KxD, ref_logits_K, mu_KxK, P_KxK, r_K,
                        beta, learning_rate, f=f, steps=int(steps), optimizer=optimizer)


@functools.partial(jax.jit, static_argnames=("steps", "optimizer"))
def _train_regularised(theta0_K, ref_logits_K, r_K, beta, learning_rate, *, steps,
                       optimizer):
  def loss_fn(logits_K):
    return -regularised_objective(logits_K, ref_logits_K, r_K, beta)

  def metrics_fn(logits_K):
    return {"objective": -loss_fn(logits_K),
            "kl": kl_divergence(logits_K, ref_logits_K),
            "reward": expected_reward(logits_K, r_K)}

  logits_K, traj = _descend(loss_fn, metrics_fn, theta0_K, steps, learning_rate, optimizer)
  return TabularRun(logits_K, logits_K, traj)


def train_regularised(ref_logits_K: Array, r_K: Array, beta, *,
                      theta0_K: Array | None = None, steps: int = 1000,
                      learning_rate=0.1, optimizer: str = "sgd") -> TabularRun:
  """Gradient ascent on the exact ``E_pi r - beta KL(pi || pi_ref)`` (jitted ``lax.scan``).

  Converges to :func:`optimal_policy`; plain SGD with ``learning_rate ~ 1/beta`` is a safe
  choice (the Hessian at the optimum is ``beta (diag pi - pi pi^T)``).

  Returns:
    :class:`TabularRun` with trajectory keys ``objective``, ``kl``, ``reward``.
  """
  validate(ref_logits_K, r_K=r_K)
  losses.check_beta(beta)
  _check_positive(learning_rate, "learning_rate")
  _check_steps(steps)
  _check_optimizer(optimizer)
  theta0_K, _ = _initial(ref_logits_K, theta0_K, None)
  return _train_regularised(theta0_K, ref_logits_K, r_K, beta, learning_rate,
                            steps=int(steps), optimizer=optimizer)
