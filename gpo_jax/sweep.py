"""A whole hyperparameter sweep as one compiled GPO train step over a leading member axis.

Sweep members ``M`` are the product of the swept values (family x beta x seed x lr x
soft-label gamma x data size). Every per-member hyperparameter is a traced ``[M]`` array
(:meth:`Members.hparams`), so new values never recompile; the policy parameters and the
optimizer state carry a leading ``M`` axis and the step is ``jax.vmap``-ed over it. The
reference policy never enters the step: its log-probs are part of the lab's dataset.

Each member draws its batches from the first ``data_size`` training pairs in a per-epoch
random order that depends only on ``(seed, step)``, so the data position is the step and
a resumed run sees exactly the batches of an uninterrupted one. A member whose loss or
gradients become non-finite is frozen (its parameters and optimizer state stop changing)
and flagged ``diverged`` for the rest of the run; the others are unaffected.

References:
  Tang et al. 2024, "Generalized Preference Optimization", arXiv 2402.05749.
  Kim et al. 2024, "Margin Matching Preference Optimization", arXiv 2410.03145.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gpo_jax import losses
from gpo_jax import model as model_lib

Array = jax.Array
Family = str | Callable[[Array], Array]

# fold_in tag separating the data-order stream of a member seed from other streams.
_DATA_STREAM = 0x5EED


def family_name(f: Family) -> str:
  """A printable name for a family: the registry key or the callable's ``__name__``."""
  return f if isinstance(f, str) else getattr(f, "__name__", repr(f))


@dataclasses.dataclass(frozen=True)
class Members:
  """The sweep's members: one entry per member in every ``[M]`` array.

  Attributes:
    families: the distinct families (names or callables); ``family_idx`` indexes it.
    family_idx: ``[M]`` int32.
    beta: ``[M]`` inverse temperatures (> 0); float64 on the host, float32 in the step.
    lr: ``[M]`` peak learning rates (> 0).
    gamma: ``[M]`` soft-label temperatures; 0 means hard labels.
    data_size: ``[M]`` int32, number of leading training pairs the member trains on.
    seed: ``[M]`` int32 data-order seeds.
  """
  families: tuple[Family, ...]
  family_idx: np.ndarray
  beta: np.ndarray
  lr: np.ndarray
  gamma: np.ndarray
  data_size: np.ndarray
  seed: np.ndarray

  @property
  def size(self) -> int:
    return int(self.family_idx.shape[0])

  def hparams(self) -> dict[str, Array]:
    """The traced per-member hyperparameters passed to the train step."""
    return {
        "family_idx": jnp.asarray(self.family_idx, jnp.int32),
        "beta": jnp.asarray(self.beta, jnp.float32),
        "lr": jnp.asarray(self.lr, jnp.float32),
        "gamma": jnp.asarray(self.gamma, jnp.float32),
        "data_size": jnp.asarray(self.data_size, jnp.int32),
        "seed": jnp.asarray(self.seed, jnp.int32),
    }

  def beta_eff(self) -> np.ndarray:
    """``[M]`` ``beta f''(0)/|f'(0)|`` of every member (SPEC §1, our definition)."""
    return self.beta * losses.beta_eff_scales(self.families)[self.family_idx]

  def row(self, m: int) -> dict[str, Any]:
    """Member ``m``'s hyperparameters as a metrics row prefix (ARCHITECTURE.md names)."""
    return {
        "member": m,
        "family": family_name(self.families[int(self.family_idx[m])]),
        "beta": float(self.beta[m]),
        "beta_eff": float(self.beta_eff()[m]),
        "lr": float(self.lr[m]),
        "seed": int(self.seed[m]),
        "gamma": float(self.gamma[m]),
        "data_size": int(self.data_size[m]),
    }

  def select(self, idx: Sequence[int]) -> "Members":
    """The sub-sweep of the members ``idx`` (same family table)."""
    idx = np.asarray(idx)
    return dataclasses.replace(
        self, family_idx=self.family_idx[idx], beta=self.beta[idx], lr=self.lr[idx],
        gamma=self.gamma[idx], data_size=self.data_size[idx], seed=self.seed[idx])


def _positive(name: str, values: Sequence[float], allow_zero: bool = False) -> None:
  for v in values:
    ok = np.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
      bound = ">= 0" if allow_zero else "> 0"
      raise ValueError(f"sweep {name} must be finite and {bound}; got {name}={v!r} "
                       f"in {list(values)!r}.")


def make_members(families: Sequence[Family],
                 betas: Sequence[float] | Mapping[str, Sequence[float]],
                 seeds: Sequence[int] = (0,),
                 lrs: Sequence[float] = (1e-4,),
                 gammas: Sequence[float] = (0.0,),
                 data_sizes: Sequence[int | None] = (None,),
                 *, n_train: int, batch_size: int) -> Members:
  """Builds the product sweep family x beta x seed x lr x gamma x data_size.

  Args:
    families: registry names or callables ``z -> f(z)``.
    betas: one beta grid for all families, or a mapping family name -> grid (each
      family may need its own range, SPEC §1).
    seeds: data-order seeds.
    lrs: peak learning rates.
    gammas: soft-label temperatures (0 = hard labels from the dataset).
    data_sizes: leading-subset sizes of the training pairs; None = all ``n_train``.
    n_train: number of training pairs available.
    batch_size: per-member batch size (each data size must be at least this).

  Returns:
    The :class:`Members`, in row-major product order.

  Raises:
    ValueError: naming the bad value (unknown family, beta <= 0, lr <= 0, gamma < 0,
      data size out of ``[batch_size, n_train]``, missing beta grid).
  """
  if not families:
    raise ValueError("sweep needs at least one family, got an empty list.")
  fams = tuple(families)
  for f in fams:
    losses.get_f(f)
    losses.derivatives_at_zero(f)
  names = [family_name(f) for f in fams]
  if len(set(names)) != len(names):
    raise ValueError(f"sweep families must be distinct, got {names}.")
  if isinstance(betas, Mapping):
    unknown = sorted(set(betas) - set(names))
    if unknown:
      raise ValueError(f"beta grid given for families {unknown} not in the sweep {names}.")
    missing = [n for n in names if n not in betas]
    if missing:
      raise ValueError(f"no beta grid for families {missing}; grids given for {sorted(betas)}.")
    grids = [tuple(betas[n]) for n in names]
  else:
    grids = [tuple(betas)] * len(fams)
  for n, g in zip(names, grids):
    if not g:
      raise ValueError(f"empty beta grid for family {n!r}.")
    _positive(f"beta ({n})", g)
  _positive("lr", lrs)
  _positive("gamma", gammas, allow_zero=True)
  sizes = []
  for d in data_sizes:
    d = n_train if d is None else int(d)
    if not batch_size <= d <= n_train:
      raise ValueError(f"sweep data_size={d} must lie in [batch_size={batch_size}, "
                       f"n_train={n_train}].")
    sizes.append(d)
  if not seeds:
    raise ValueError("sweep needs at least one seed.")

  rows = []
  for i, grid in enumerate(grids):
    for b, s, lr, g, d in itertools.product(grid, seeds, lrs, gammas, sizes):
      rows.append((i, b, s, lr, g, d))
  cols = list(zip(*rows))
  return Members(
      families=fams,
      family_idx=np.asarray(cols[0], np.int32),
      beta=np.asarray(cols[1], np.float64),
      seed=np.asarray(cols[2], np.int32),
      lr=np.asarray(cols[3], np.float64),
      gamma=np.asarray(cols[4], np.float64),
      data_size=np.asarray(cols[5], np.int32))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimizer and batching settings shared by every member.

  Attributes:
    batch_size: preference pairs per member per step.
    b1, b2, eps: Adam moments.
    grad_clip: global-norm clip per member (0 disables).
    warmup_steps: linear learning-rate warmup (0 = constant).
    weight_decay: decoupled weight decay, scaled by the member's learning rate.
    length_normalize: average log-probs per token instead of summing (SPEC notation).
  """
  batch_size: int = 32
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float = 1.0
  warmup_steps: int = 0
  weight_decay: float = 0.0
  length_normalize: bool = False


def _optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
  # The learning rate is applied outside optax so it can be a traced per-member value.
  parts = []
  if tcfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(tcfg.grad_clip))
  parts.append(optax.scale_by_adam(b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps))
  return optax.chain(*parts)


def stack(tree, m: int):
  """Copies a pytree ``m`` times along a new leading member axis (real copies, never aliases)."""
  return jax.tree.map(lambda x: jnp.array(jnp.broadcast_to(x, (m,) + x.shape)), tree)


def init_state(params, members: Members, tcfg: TrainConfig) -> dict[str, Any]:
  """Sweep state: every member starts from ``params`` (π_ref) with fresh Adam moments.

  Returns:
    ``{"params": [M, ...], "opt": [M, ...], "diverged": bool[M], "step": int32[]}``.
  """
  m = members.size
  params_m = stack(params, m)
  return {
      "params": params_m,
      "opt": jax.vmap(_optimizer(tcfg).init)(params_m),
      "diverged": jnp.zeros((m,), bool),
      "step": jnp.zeros((), jnp.int32),
  }


def _mix(x: Array, mask: Array, p: Array) -> Array:
  """One pass of a keyed bijection of the integers ``[0, mask]`` (``mask = 2**b - 1``).

  Every operation is invertible on the low ``b`` bits: xor with a key, multiplication by
  an odd constant (the low bits of a product depend only on the low bits of its factors),
  and ``x ^= (x & mask) >> s``; so ``mix(x) & mask`` permutes ``[0, mask]``. The constants
  are from Kensler (2013).
  """
  u = lambda c: jnp.uint32(c)  # noqa: E731
  x = x ^ p
  x = x * u(0xE170893D)
  x = x ^ (p >> 16)
  x = x ^ ((x & mask) >> 4)
  x = x ^ (p >> 8)
  x = x * u(0x0929EB3F)
  x = x ^ (p >> 23)
  x = x ^ ((x & mask) >> 1)
  x = x * (u(1) | (p >> 27))
  x = x * u(0x6935FA69)
  x = x ^ ((x & mask) >> 11)
  x = x * u(0x74DCB303)
  x = x ^ ((x & mask) >> 2)
  x = x * u(0x9E501CC3)
  x = x ^ ((x & mask) >> 2)
  x = x * u(0xC860A3DF)
  x = x & mask
  return x ^ (x >> 5)


def permute_index(i: Array, n: Array, p: Array) -> Array:
  """Element ``i`` of a keyed pseudo-random permutation of ``range(n)``, without a sort.

  A keyed bijection of ``[0, 2**b)`` (``2**b`` the next power of two >= ``n``) is applied
  until the value falls below ``n`` ("cycle walking"), which restricts it to a bijection of
  ``[0, n)``; a keyed rotation follows. Fewer than two passes are needed on average
  because ``2**b < 2 n``. Costs O(len(i)) where a shuffle by ``argsort`` costs a sort of
  ``n`` keys; data loaders index-shuffle the same way (e.g. grain's Feistel shuffle).

  Args:
    i: uint32/int indices in ``[0, n)`` (any shape).
    n: permutation length >= 1 (may be traced).
    p: uint32 scalar key.

  Returns:
    int32 array like ``i``; ``i -> result`` is a bijection of ``range(n)`` for each key.

  References:
    Kensler, "Correlated Multi-Jittered Sampling", Pixar Technical Memo 13-01 (2013), §3.
  """
  n = jnp.asarray(n).astype(jnp.uint32)
  p = jnp.asarray(p).astype(jnp.uint32)
  mask = n - jnp.uint32(1)
  for s in (1, 2, 4, 8, 16):
    mask = mask | (mask >> s)
  x = jax.lax.while_loop(
      lambda x: jnp.any(x >= n),
      lambda x: jnp.where(x >= n, _mix(x, mask, p), x),
      _mix(jnp.asarray(i).astype(jnp.uint32), mask, p))
  return ((x + p % n) % n).astype(jnp.int32)


def batch_indices(seed: Array, data_size: Array, step: Array, batch_size: int) -> Array:
  """Indices of one member's batch: a per-epoch permutation of ``arange(data_size)``.

  Pair position ``k = step * batch_size + i`` is element ``k mod data_size`` of the
  permutation of epoch ``k // data_size``, keyed by ``fold_in(key(seed), epoch)``
  (:func:`permute_index`, no sort). A batch spans at most two epochs because
  ``batch_size <= data_size``.

  Args:
    seed: int scalar (may be traced).
    data_size: int scalar >= ``batch_size`` (may be traced).
    step: int scalar (may be traced).
    batch_size: static.

  Returns:
    ``idx_B`` int32 in ``[0, data_size)``.
  """
  key = jax.random.fold_in(jax.random.key(seed), _DATA_STREAM)
  pos = step * batch_size + jnp.arange(batch_size)
  epoch, within = pos // data_size, pos % data_size
  first = (step * batch_size) // data_size
  p_first, p_next = (jax.random.bits(jax.random.fold_in(key, e), (), jnp.uint32)
                     for e in (first, first + 1))
  return permute_index(within, data_size, jnp.where(epoch == first, p_first, p_next))


def pair_logps(model, prompt_BxP, resp_BxT, mask_BxT, length_normalize: bool) -> Array:
  """Policy sequence log-probs of responses given prompts (response tokens only)."""
  tokens = jnp.concatenate([prompt_BxP, resp_BxT], axis=1)
  mask = jnp.concatenate([jnp.zeros_like(prompt_BxP, dtype=mask_BxT.dtype), mask_BxT], axis=1)
  return model_lib.response_logprobs(model, tokens, mask, length_normalize=length_normalize)


def pair_terms(graphdef, params, rest, batch: Mapping[str, Array], beta: Array,
               length_normalize: bool) -> dict[str, Array]:
  """Policy log-probs of chosen and rejected in one forward, and the β-scaled log-ratios."""
  model = nnx.merge(graphdef, params, rest)
  b = batch["chosen"].shape[0]
  logp = pair_logps(
      model,
      jnp.concatenate([batch["prompt"], batch["prompt"]]),
      jnp.concatenate([batch["chosen"], batch["rejected"]]),
      jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]]),
      length_normalize)
  lr_w = logp[:b] - batch["ref_chosen_logps"]
  lr_l = logp[b:] - batch["ref_rejected_logps"]
  return {"rho": lr_w - lr_l, "chosen": beta * lr_w, "rejected": beta * lr_l}


def soft_targets(batch: Mapping[str, Array], gamma: Array) -> Array:
  """``p = σ(γ (g_w − g_l))`` from the stored gold scores when ``γ > 0``, else 1 (hard)."""
  p = losses.soft_label(batch["gold_chosen"], batch["gold_rejected"], gamma)
  return jnp.where(gamma > 0, p, 1.0)


def make_train_step(graphdef, rest, families: Sequence[Family], tcfg: TrainConfig,
                    *, member_groups: int = 1, member_chunk: int | None = None,
                    on_trace: Callable[[], None] | None = None):
  """Builds the (unjitted) sweep train step.

  Args:
    graphdef: the policy's static graph (from ``nnx.split(policy, nnx.Param, ...)``).
    rest: the policy's non-trainable state (usually empty), shared by all members.
    families: the family table that ``hparams["family_idx"]`` indexes.
    tcfg: optimizer and batch settings.
    member_groups, member_chunk: how members are laid out in the program
      (:func:`map_members`): ``member_chunk=None`` vmaps all members at once; otherwise
      the members form ``member_groups`` vmapped groups (one per shard of the sweep mesh
      axis) and each group runs its members ``member_chunk`` at a time in a loop.
    on_trace: called whenever the step is traced (tests count recompilations).

  Returns:
    ``step(state, hparams, data) -> (state, metrics)``; ``data`` holds the training pairs
    (``[N, ...]`` arrays from ``Lab.pairs("train")``), ``metrics`` ``[M]`` arrays:
    ``loss``, ``grad_norm``, ``rho/mean``, ``rewards/{chosen,rejected,margins,
    accuracies}``, ``diverged``. Jit it with ``donate_argnums=0``.
  """
  fswitch = losses.switched_f(families)
  tx = _optimizer(tcfg)
  bsz = tcfg.batch_size

  def member_loss(params, batch, fam, beta, gamma):
    t = pair_terms(graphdef, params, rest, batch, beta, tcfg.length_normalize)
    z = beta * t["rho"]
    p = soft_targets(batch, gamma)
    loss_B = p * fswitch(fam, z) + (1.0 - p) * fswitch(fam, -z)
    return jnp.mean(loss_B), t

  def member_step(params, opt, diverged, hp, data, step):
    idx = batch_indices(hp["seed"], hp["data_size"], step, bsz)
    batch = jax.tree.map(lambda a: a[idx], data)
    (loss, t), grads = jax.value_and_grad(member_loss, has_aux=True)(
        params, batch, hp["family_idx"], hp["beta"], hp["gamma"])
    gnorm = optax.tree.norm(grads)
    updates, new_opt = tx.update(grads, opt, params)
    warm = 1.0 if tcfg.warmup_steps <= 0 else jnp.minimum(
        1.0, (step + 1).astype(jnp.float32) / tcfg.warmup_steps)
    lr = hp["lr"] * warm
    new_params = jax.tree.map(
        lambda w, u: w - lr * (u + tcfg.weight_decay * w), params, updates)
    # A member is kept only if this step was finite end to end; otherwise it is frozen
    # where it stood (params and Adam moments) and stays flagged for the rest of the run.
    ok = (jnp.isfinite(loss) & jnp.isfinite(gnorm)
          & jnp.isfinite(optax.tree.norm(new_params)) & ~diverged)
    keep = lambda new, old: jnp.where(ok, new, old)
    metrics = {
        "loss": loss,
        "grad_norm": gnorm,
        "rho/mean": jnp.mean(t["rho"]),
        "rewards/chosen": jnp.mean(t["chosen"]),
        "rewards/rejected": jnp.mean(t["rejected"]),
        "rewards/margins": jnp.mean(t["chosen"] - t["rejected"]),
        "rewards/accuracies": jnp.mean((t["chosen"] > t["rejected"]).astype(jnp.float32)),
        "diverged": ~ok,
    }
    return (jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt, opt),
            ~ok, metrics)

  def step_fn(state, hparams, data):
    if on_trace is not None:
      on_trace()
    step = state["step"]
    params, opt, diverged, metrics = map_members(
        lambda p, o, d, h: member_step(p, o, d, h, data, step),
        (state["params"], state["opt"], state["diverged"], hparams),
        groups=member_groups, chunk=member_chunk)
    new_state = {"params": params, "opt": opt, "diverged": diverged, "step": step + 1}
    return new_state, metrics

  return step_fn


def map_members(fn: Callable[..., Any], args: tuple, *, groups: int = 1,
                chunk: int | None = None):
  """Applies ``fn`` to every member's slice of ``args`` (pytrees with a leading ``M`` axis).

  ``chunk=None`` is ``jax.vmap(fn)(*args)``: one batched program for all members, best
  where the hardware wants large batched matmuls (GPU/TPU). Otherwise the members are
  regrouped as ``[groups, M / groups]``: the groups are vmapped, and within a group
  ``jax.lax.map`` runs ``chunk`` members at a time. With ``groups`` equal to the sweep
  mesh axis size each device loops over its own members, which keeps every member's
  working set small; on CPUs that is faster than one wide vmap (experiments/BENCH_SWEEP.md).
  The results are the same per member up to float reassociation.

  Args:
    fn: ``fn(*member_args) -> pytree`` for one member.
    args: tuple of pytrees whose leaves all have leading size ``M``.
    groups: number of vmapped groups; must divide ``M``.
    chunk: members per loop iteration (vmapped within the iteration), or None.

  Returns:
    ``fn``'s outputs stacked along a leading ``M`` axis.
  """
  if chunk is None:
    return jax.vmap(fn)(*args)
  m = jax.tree.leaves(args)[0].shape[0]
  if groups < 1 or m % groups:
    raise ValueError(f"member_groups={groups} must be >= 1 and divide the {m} members.")
  if chunk < 1:
    raise ValueError(f"member_chunk={chunk} must be >= 1 (or None to vmap all members).")
  regroup = lambda x: x.reshape((groups, m // groups) + x.shape[1:])  # noqa: E731
  grouped = jax.tree.map(regroup, args)
  per_group = lambda a: jax.lax.map(lambda t: fn(*t), a,  # noqa: E731
                                    batch_size=None if chunk == 1 else chunk)
  out = jax.vmap(per_group)(grouped)
  return jax.tree.map(lambda x: x.reshape((m,) + x.shape[2:]), out)


def train_arrays(pairs: Mapping[str, np.ndarray]) -> dict[str, Array]:
  """The fields of ``Lab.pairs(split)`` the train step reads, as device arrays."""
  keys = ("prompt", "chosen", "rejected", "chosen_mask", "rejected_mask",
          "ref_chosen_logps", "ref_rejected_logps", "gold_chosen", "gold_rejected")
  missing = [k for k in keys if k not in pairs]
  if missing:
    raise ValueError(f"preference pairs lack fields {missing}; have {sorted(pairs)}.")
  return {k: jnp.asarray(pairs[k]) for k in keys}
