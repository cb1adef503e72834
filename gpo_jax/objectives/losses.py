"""Generalised preference optimisation (GPO) losses: convex functions of the log-ratio margin.

Every function here is pure math on per-sequence log-probabilities and scalars. Nothing
here sees a model, tokenizer or config; losses are returned per example and the caller
reduces them. Shape suffixes: ``B`` batch, ``F`` number of families in a switch.

The GPO family (Tang et al. 2024) scores a preference pair by ``f(beta * rho)`` where
``rho`` is the log-ratio margin (:func:`log_ratio_margin`) and ``f`` is any scalar
function with ``f'(0) < 0``. :data:`GPO_FUNCTIONS` holds the named members; any user
callable is accepted wherever a family is expected.

References:
  Tang et al. 2024, "Generalized Preference Optimization: A Unified Approach to Offline
  Alignment", arXiv 2402.05749.
  Rafailov et al. 2023, "Direct Preference Optimization", arXiv 2305.18290.
  Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences" (IPO), arXiv 2310.12036.
  Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
  arXiv 2305.10425.
  Kim et al. 2024, "Margin Matching Preference Optimization" (MMPO), arXiv 2410.03145.
"""

from collections.abc import Callable, Sequence
import functools

import jax
import jax.numpy as jnp
import numpy as np

from gpo_jax.core import compat

Array = jax.Array
LossFn = Callable[[Array], Array]

# Below z = -EXP_GUARD the exponential loss switches from e^{-z} to its second-order
# Taylor continuation, so value and gradient stay finite in float32 for |z| up to ~1e12.
EXP_GUARD = 30.0


def logistic(z: Array) -> Array:
  """Logistic loss ``log(1 + e^{-z})``, i.e. DPO when ``z = beta * rho``.

  Computed as ``softplus(-z)`` so neither tail overflows.

  References:
    Rafailov et al. 2023, arXiv 2305.18290 (DPO).
  """
  return jax.nn.softplus(-z)


def hinge(z: Array) -> Array:
  """Hinge loss ``max(0, 1 - z)``: the reference-normalised SLiC loss.

  SLiC-HF's original calibration loss is a hinge on raw sequence log-likelihoods of the
  policy, without ``pi_ref``; the GPO hinge acts on the reference-normalised margin
  ``rho``, so the two coincide only when ``pi_ref`` is uniform over the pair. The kink at
  ``z = 1`` makes ``f''`` zero almost everywhere (no Taylor regulariser at 0).

  References:
    Zhao et al. 2023, arXiv 2305.10425 (SLiC-HF); Tang et al. 2024, arXiv 2402.05749.
  """
  return jax.nn.relu(1.0 - z)


def squared(z: Array) -> Array:
  """Squared loss ``(z - 1)^2``: IPO with ``beta = 2 tau``.

  IPO minimises ``(rho - 1/(2 tau))^2``. Since ``(beta rho - 1)^2 = beta^2 (rho - 1/beta)^2``,
  this loss with ``beta = 2 tau`` has the same minimiser ``rho* = 1/(2 tau)`` and equals
  IPO's loss up to the constant factor ``beta^2``.

  References:
    Azar et al. 2023, arXiv 2310.12036 (IPO).
  """
  return jnp.square(z - 1.0)


def exponential(z: Array) -> Array:
  """Exponential loss ``e^{-z}`` (new in GPO), guarded against overflow.

  ``e^{-z}`` overflows float32 for ``z < -88.7``. For ``z < -EXP_GUARD`` (``EXP_GUARD =
  30``) the loss continues as its second-order Taylor expansion about ``-EXP_GUARD``:
  ``e^{G} (1 + d + d^2/2)`` with ``d = -G - z``. The guarded loss is C^2, convex and
  monotone, and matches ``e^{-z}`` exactly for ``z >= -EXP_GUARD``; value and gradient
  stay finite in float32 for ``|z|`` up to about 1e12.

  References:
    Tang et al. 2024, arXiv 2402.05749.
  """
  z_c = jnp.maximum(z, -EXP_GUARD)
  # Clamping first keeps exp() from producing inf in the unused branch, whose
  # gradient would otherwise turn into 0 * inf = nan.
  d = z_c - z
  return jnp.exp(-z_c) * (1.0 + d + 0.5 * jnp.square(d))


def truncated_quadratic(z: Array) -> Array:
  """Truncated quadratic loss ``max(0, 1 - z)^2`` (new in GPO).

  References:
    Tang et al. 2024, arXiv 2402.05749.
  """
  return jnp.square(jax.nn.relu(1.0 - z))


def savage(z: Array) -> Array:
  """Savage loss ``sigmoid(-z)^2 = 1/(1 + e^z)^2`` (new in GPO).

  Not convex: ``f''(z) < 0`` for ``z < -ln 2``. Computed as ``exp(2 log_sigmoid(-z))``
  so neither tail overflows.

  References:
    Tang et al. 2024, arXiv 2402.05749.
  """
  return jnp.exp(2.0 * jax.nn.log_sigmoid(-z))


GPO_FUNCTIONS: dict[str, LossFn] = {
    "logistic": logistic,
    "hinge": hinge,
    "squared": squared,
    "exponential": exponential,
    "truncated_quadratic": truncated_quadratic,
    "savage": savage,
}


def get_f(f: str | LossFn) -> LossFn:
  """Resolves a GPO family: a registry name or any callable ``z -> f(z)``.

  Args:
    f: a key of :data:`GPO_FUNCTIONS` or a callable acting elementwise on arrays.

  Returns:
    The callable.

  Raises:
    ValueError: ``f`` is a string that is not a registered name.
    TypeError: ``f`` is neither a string nor callable.
  """
  if isinstance(f, str):
    if f not in GPO_FUNCTIONS:
      raise ValueError(
          f"Unknown GPO function {f!r}; valid names: {sorted(GPO_FUNCTIONS)} "
          "(or pass any callable z -> f(z)).")
    return GPO_FUNCTIONS[f]
  if callable(f):
    return f
  raise TypeError(
      f"GPO function must be a name in {sorted(GPO_FUNCTIONS)} or a callable, "
      f"got {f!r} of type {type(f).__name__}.")


def _concrete(x) -> np.ndarray | None:
  """Returns ``x`` as a NumPy array, or None when it is traced (value unknown)."""
  return compat.concrete_value(x)


def check_beta(beta) -> None:
  """Raises ValueError unless every entry of ``beta`` is finite and positive.

  Traced values (inside ``jit``/``vmap``/``grad``) cannot be inspected and pass silently,
  so the check is safe to call inside compiled code; validate swept betas before jit.

  Args:
    beta: scalar or array of inverse temperatures.
  """
  b = _concrete(beta)
  if b is None:
    return
  if b.dtype.kind not in "fiu" or not np.all(np.isfinite(b)) or not np.all(b > 0):
    raise ValueError(f"beta must be finite and > 0, got {beta!r}.")


def _check_prob(p, name: str) -> None:
  q = _concrete(p)
  if q is None:
    return
  if not np.all((q >= 0) & (q <= 1)):  # also rejects nan
    raise ValueError(f"{name} must lie in [0, 1], got {p!r}.")


def log_ratio_margin(policy_chosen_logps: Array, policy_rejected_logps: Array,
                     ref_chosen_logps: Array, ref_rejected_logps: Array) -> Array:
  """Log-ratio margin ``rho = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]``.

  Args:
    policy_chosen_logps: ``[B]`` sequence log-probs of chosen responses under the policy.
    policy_rejected_logps: ``[B]`` the same for rejected responses.
    ref_chosen_logps: ``[B]`` chosen log-probs under the reference policy.
    ref_rejected_logps: ``[B]`` rejected log-probs under the reference policy.

  Returns:
    ``rho_B``.

  References:
    Tang et al. 2024, arXiv 2402.05749.
  """
  # Differencing within each model first cancels any prompt-level offset shared by the
  # two responses before the (larger) policy-vs-reference gap enters.
  return ((policy_chosen_logps - policy_rejected_logps)
          - (ref_chosen_logps - ref_rejected_logps))


def gpo_loss(rho: Array, beta, f: str | LossFn = "logistic", p: Array | None = None,
             hard: Array | None = None) -> Array:
  """Per-example GPO loss ``f(beta rho)``, or its soft-label form.

  With a soft label ``p = P(y_w > y_l)`` the loss is ``p f(beta rho) + (1 - p) f(-beta rho)``:
  MMPO's cross-entropy for ``f = logistic``, generalised to every ``f``. ``p = 1``
  recovers the hard-label loss. Population minimisers of the soft form (in ``z = beta
  rho``): logistic and savage ``logit p``, exponential ``logit(p)/2``, squared and
  truncated quadratic ``2p - 1``, hinge ``1`` for ``p > 1/2``.

  Named families: ``logistic`` is DPO; ``squared`` is IPO with ``beta = 2 tau``;
  ``hinge`` is SLiC normalised by ``pi_ref`` (SLiC-HF itself uses raw log-likelihoods).

  Args:
    rho: ``[B]`` log-ratio margins from :func:`log_ratio_margin`.
    beta: positive scalar (or array broadcastable to ``rho``); may be traced.
    f: registry name or callable.
    p: optional ``[B]`` soft labels in ``[0, 1]``; ``None`` means hard labels.
    hard: optional boolean (scalar or broadcastable to ``rho``, may be traced) marking
      examples whose label is hard although ``p`` is given, as in a sweep where some
      members use soft labels and others do not. There the loss is exactly ``f(z)`` and
      ``f`` is never evaluated at ``-z`` (its argument is replaced by 0 before the call),
      so a user ``f`` that overflows at ``-z`` cannot turn a hard-label value or gradient
      into NaN.

  Returns:
    ``loss_B``; the caller reduces.

  References:
    Tang et al. 2024, arXiv 2402.05749; Kim et al. 2024, arXiv 2410.03145 (MMPO).
  """
  fn = get_f(f)
  check_beta(beta)
  z = beta * rho
  if p is None:
    return fn(z)
  _check_prob(p, "soft label p")
  if hard is None:
    return p * fn(z) + (1.0 - p) * fn(-z)
  # Both branches of a where are differentiated; the inner where keeps the unused one finite.
  f_neg = fn(jnp.where(hard, jnp.zeros_like(z), -z))
  return jnp.where(hard, fn(z), p * fn(z) + (1.0 - p) * f_neg)


def soft_label(score_w: Array, score_l: Array, gamma) -> Array:
  """MMPO soft label ``p = sigmoid(gamma (s_w - s_l))`` from quality scores.

  With ``p`` from this function the logistic soft-label loss is stationary at
  ``beta rho* = gamma (s_w - s_l)``.

  Args:
    score_w: ``[B]`` scores of chosen responses (gold or proxy).
    score_l: ``[B]`` scores of rejected responses.
    gamma: finite, non-negative label temperature (0 gives ``p = 1/2``); may be traced.

  Returns:
    ``p_B`` in ``(0, 1)``.

  References:
    Kim et al. 2024, arXiv 2410.03145 (MMPO).
  """
  g = _concrete(gamma)
  if g is not None and (not np.all(np.isfinite(g)) or not np.all(g >= 0)):
    raise ValueError(
        f"gamma must be finite and >= 0, got {gamma!r} (use p=None for hard labels).")
  return jax.nn.sigmoid(gamma * (score_w - score_l))


def bt_loss(r_w: Array, r_l: Array, p: Array | None = None) -> Array:
  """Bradley–Terry reward-model cross-entropy with hard or soft labels.

  ``-p log sigmoid(r_w - r_l) - (1 - p) log sigmoid(r_l - r_w)``; ``p = None`` means
  ``p = 1`` (the standard pairwise reward-model loss).

  Args:
    r_w: ``[B]`` rewards of chosen responses.
    r_l: ``[B]`` rewards of rejected responses.
    p: optional ``[B]`` soft labels.

  Returns:
    ``loss_B``.

  References:
    Kim et al. 2024, arXiv 2410.03145 (MMPO reward-model loss).
  """
  margin = r_w - r_l
  if p is None:
    return jax.nn.softplus(-margin)
  _check_prob(p, "soft label p")
  return p * jax.nn.softplus(-margin) + (1.0 - p) * jax.nn.softplus(margin)


@functools.lru_cache(maxsize=256)
def _cached_derivatives(fn: LossFn) -> tuple[float, float, float]:
  # Cached because beta_eff is logged every evaluation and eager grad-of-grad is slow.
  with jax.ensure_compile_time_eval():
    z0 = jnp.zeros((), jnp.float32)
    d1 = jax.grad(fn)
    # A jitted evaluation keeps custom-JVP functions (relu in hinge) from leaking an
    # enclosing vmap's tracer into the result.
    vals = jax.jit(lambda z: (fn(z), d1(z), jax.grad(d1)(z)))(z0)
  if any(_concrete(v) is None for v in vals):
    raise ValueError(
        f"derivatives at 0 of {fn!r} depend on traced values; pass a function that "
        "closes over constants only.")
  return tuple(float(v) for v in vals)


def derivatives_at_zero(f: str | LossFn) -> tuple[float, float, float]:
  """``(f(0), f'(0), f''(0))`` by automatic differentiation, for any family.

  Evaluated eagerly even when called under ``jit`` (the values depend only on ``f``), so
  they come back as Python floats.

  Args:
    f: registry name or callable.

  Returns:
    ``(f0, f1, f2)``.

  Raises:
    ValueError: ``f'(0) >= 0`` or any value is non-finite (GPO needs ``f'(0) < 0``).
  """
  fn = get_f(f)
  try:
    f0, f1, f2 = _cached_derivatives(fn)
  except TypeError as e:  # unhashable callable: skip the cache
    if "unhashable" not in str(e):
      raise
    f0, f1, f2 = _cached_derivatives.__wrapped__(fn)
  if not all(np.isfinite((f0, f1, f2))):
    raise ValueError(f"f={f!r} has non-finite value or derivatives at 0: {(f0, f1, f2)}.")
  if f1 >= 0:
    raise ValueError(f"GPO requires f'(0) < 0, but f={f!r} has f'(0) = {f1}.")
  return f0, f1, f2


def beta_eff(f: str | LossFn, beta):
  """Normalised regularisation strength ``beta f''(0) / |f'(0)|`` (our definition).

  From the Taylor view of GPO, ``E f(beta rho) ~ f(0) + f'(0) beta E[rho]
  + f''(0) beta^2 E[rho^2] / 2``; dividing by ``beta |f'(0)|`` leaves ``beta f''(0)/|f'(0)|``
  as the weight of the mu-weighted squared regulariser. This normalisation is our
  definition (SPEC §1); it is the quantity logged as ``beta_eff``.

  Args:
    f: registry name or callable.
    beta: scalar or array (may be traced).

  Returns:
    ``beta_eff`` with the shape of ``beta``.

  References:
    Tang et al. 2024, arXiv 2402.05749.
  """
  _, f1, f2 = derivatives_at_zero(f)
  return beta * (f2 / abs(f1))


def beta_from_beta_eff(f: str | LossFn, beta_eff: float) -> float:
  """The β that gives family ``f`` the regularisation strength ``beta_eff`` (inverse of :func:`beta_eff`).

  ``β = beta_eff · |f'(0)| / f''(0)``, with the derivatives by autodiff. A family with
  ``f''(0) = 0`` (hinge) has no quadratic term to match, so it is placed by its *target
  margin* instead: hinge's loss is zero once ``β ρ >= 1``, i.e. at the margin ``1/β``;
  squared (IPO), whose ``f''(0)/|f'(0)| = 1``, has its minimum at the same margin
  ``1/β = 1/beta_eff``. The rule for ``f''(0) = 0`` is therefore ``β = beta_eff``: the
  hinge member aims at the margin IPO aims at with that ``beta_eff``.

  Args:
    f: registry name or callable.
    beta_eff: positive, finite.

  Returns:
    β as a Python float (float64 arithmetic; the scales of the named families are exact
    binary fractions, so e.g. logistic's β is exactly ``2 beta_eff``).

  Raises:
    ValueError: ``beta_eff`` not finite and > 0, ``f''(0) < 0`` (not convex at 0), or ``f``
      invalid (see :func:`derivatives_at_zero`).
  """
  b = float(beta_eff)
  if not (np.isfinite(b) and b > 0):
    raise ValueError(f"beta_eff must be finite and > 0, got {beta_eff!r}.")
  _, f1, f2 = derivatives_at_zero(f)
  if f2 < 0:
    raise ValueError(f"f={f!r} has f''(0) = {f2} < 0: no beta gives beta_eff = {b}.")
  return b if f2 == 0 else b * abs(f1) / f2


def beta_eff_scales(fs: Sequence[str | LossFn]) -> np.ndarray:
  """``f''(0)/|f'(0)|`` for each family in ``fs``, as a float32 ``[F]`` vector.

  ``beta_eff`` of a sweep member with family index ``idx`` and ``beta`` is
  ``beta * beta_eff_scales(fs)[idx]`` (see :func:`switched_beta_eff`).
  """
  scales = []
  for f in fs:
    _, f1, f2 = derivatives_at_zero(f)
    scales.append(f2 / abs(f1))
  return np.asarray(scales, np.float32)


def switched_beta_eff(fs: Sequence[str | LossFn], idx: Array, beta) -> Array:
  """Per-member ``beta_eff = beta * f''(0)/|f'(0)|`` where member ``m`` uses ``fs[idx[m]]``."""
  return beta * jnp.asarray(beta_eff_scales(fs))[idx]


def switched_f(fs: Sequence[str | LossFn]) -> Callable[[Array, Array], Array]:
  """Family switch: ``g(idx, z) = fs[idx](z)`` with ``idx`` a (traced) integer scalar.

  Lets a sweep vmapped over members give each member its own family without recompiling:
  ``jax.vmap(g)(idx_M, z_MxB)``. Without vmap ``lax.switch`` runs one branch; under vmap
  every branch is evaluated on every member's ``z`` and the member's own is selected. A
  family that is inf/NaN on another member's ``z`` does not leak into that member's value
  or gradient on the JAX versions tested (0.10 here; the test
  ``test_switched_f_unselected_overflow_does_not_poison_other_members`` checks it on the
  installed JAX), so a user ``f`` that overflows somewhere cannot freeze other members.

  Args:
    fs: non-empty sequence of registry names or callables.

  Returns:
    ``g(idx, z)``. A concrete out-of-range ``idx`` raises ValueError; a traced one is
    clamped by ``lax.switch``.
  """
  fns = [get_f(f) for f in fs]
  if not fns:
    raise ValueError("switched_f needs at least one GPO function, got an empty sequence.")
  names = [f if isinstance(f, str) else getattr(f, "__name__", repr(f)) for f in fs]

  def g(idx: Array, z: Array) -> Array:
    i = _concrete(idx)
    if i is not None and (i.ndim != 0 or not 0 <= int(i) < len(fns)):
      raise ValueError(
          f"family index must be a scalar in [0, {len(fns)}), got {idx!r}; families: {names}.")
    return jax.lax.switch(idx, fns, z)

  return g
