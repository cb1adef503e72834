"""The member program: a whole sweep as one compiled train step over a leading member axis.

An algorithm supplies a pure per-member loss ``loss_fn(params, batch, hp, key) -> (loss,
metrics)``; the engine supplies everything around it, the same for every algorithm:

* the data order (:func:`gpo_jax.engine.data.batch_indices`, keyed by the member's
  ``seed`` and ``data_size``) and a per-member, per-step PRNG key for algorithms that
  sample inside the step;
* Adam with global-norm clipping and linear warmup, the learning rate a traced
  per-member value (so ``lr`` is a sweep axis like any other);
* divergence isolation: a member whose loss, gradients or new parameters are non-finite
  is frozen where it stood (parameters and optimizer state) and flagged ``diverged`` for
  the rest of the run; the others are unaffected;
* the member layout (:func:`map_members`): one vmap over all members (accelerators) or a
  per-device loop over them (CPUs), and ``jax.jit`` with shardings over the mesh.

Per-member hyperparameters are traced ``[M]`` arrays, so a new β, learning rate or label
temperature never recompiles.
"""

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from gpo_jax.engine import data as data_lib
from gpo_jax.engine.members import Members
from gpo_jax.runtime import cpu as cpu_lib
from gpo_jax.runtime import sharding

Array = jax.Array
LossFn = Callable[[Any, Mapping[str, Array], Mapping[str, Array], Array],
                  tuple[Array, dict[str, Array]]]

# fold_in tag of the per-step key handed to an algorithm's loss (sampling inside the step).
_STEP_STREAM = 0x57E9
#: key of the train data whose value the loss receives whole as ``batch[SHARED]``
SHARED = "shared"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimizer and batching settings shared by every member.

  Attributes:
    batch_size: examples per member per step.
    b1, b2, eps: Adam moments.
    grad_clip: global-norm clip per member (0 disables).
    warmup_steps: linear learning-rate warmup (0 = constant).
    weight_decay: decoupled weight decay, scaled by the member's learning rate.
  """
  batch_size: int = 32
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float = 1.0
  warmup_steps: int = 0
  weight_decay: float = 0.0


def optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
  """Clip + Adam moments; the (traced, per-member) learning rate is applied by the step."""
  parts = []
  if tcfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(tcfg.grad_clip))
  parts.append(optax.scale_by_adam(b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps))
  return optax.chain(*parts)


def stack(tree, m: int):
  """Copies a pytree ``m`` times along a new leading member axis (real copies, never aliases)."""
  return jax.tree.map(lambda x: jnp.array(jnp.broadcast_to(x, (m,) + x.shape)), tree)


def init_state(params, members: Members, tcfg: TrainConfig,
               init_member: Callable[[Any, Mapping[str, Array]], Any] | None = None
               ) -> dict[str, Any]:
  """Sweep state: every member starts from ``params`` with fresh optimizer moments.

  Args:
    params: one member's initial parameters.
    members: the sweep.
    tcfg: optimizer settings.
    init_member: optional ``(params, hp) -> params`` applied per member (vmapped), for
      algorithms whose members differ at initialisation (e.g. a reward head seeded by the
      member's seed).

  Returns:
    ``{"params": [M, ...], "opt": [M, ...], "diverged": bool[M], "step": int32[]}``.
  """
  m = members.size
  params_m = stack(params, m)
  if init_member is not None:
    params_m = jax.vmap(init_member)(params_m, members.hparams())
  return {
      "params": params_m,
      "opt": jax.vmap(optimizer(tcfg).init)(params_m),
      "diverged": jnp.zeros((m,), bool),
      "step": jnp.zeros((), jnp.int32),
  }


def step_key(seed: Array, step: Array) -> Array:
  """The PRNG key of member ``seed`` at ``step`` for sampling inside the train step."""
  return jax.random.fold_in(
      jax.random.fold_in(jax.random.key(seed), _STEP_STREAM), step)


def place_on_data(loss_fn: LossFn, mesh, param_shardings=None) -> LossFn:
  """The per-member loss with its batch split over the mesh's ``data`` axis.

  Inside the member map nothing tells XLA where a member's gathered batch lives, so with
  ``data > 1`` the partitioner either repeats the whole batch on every ``data`` device
  (``dp``) or splits the matmuls' contractions and all-reduces activation-sized partial sums
  (``fsdp``): measured on paper in experiments/POD_PLAN.md. Here every batch array (not the
  :data:`SHARED` constants) is constrained to ``PartitionSpec("data")`` on its leading
  (example) axis, and, with ``param_shardings`` (the stacked params' shardings), each weight
  is gathered over ``data`` at use while keeping its ``model`` split (the FSDP pattern: the
  stored state stays sharded, the gradient is reduce-scattered back). A mesh without a
  ``data`` axis larger than 1 returns ``loss_fn`` unchanged.
  """
  if int(dict(mesh.shape).get(sharding.DATA, 1)) <= 1:
    return loss_fn
  on_data = NamedSharding(mesh, PartitionSpec(sharding.DATA))
  wsc = jax.lax.with_sharding_constraint
  inner = None if param_shardings is None else sharding.gathered_at_use(param_shardings, mesh)

  def loss(params, batch, hp, key):
    batch = {k: v if k == SHARED else jax.tree.map(
        lambda a: wsc(a, on_data) if getattr(a, "ndim", 0) >= 1 else a, v)
        for k, v in batch.items()}
    if inner is not None:
      params = jax.tree.map(wsc, params, inner)
    return loss_fn(params, batch, hp, key)
  return loss


def make_train_step(loss_fn: LossFn, tcfg: TrainConfig, *, member_groups: int = 1,
                    member_chunk: int | None = None,
                    on_trace: Callable[[], None] | None = None):
  """Builds the (unjitted) sweep train step around an algorithm's per-member loss.

  Args:
    loss_fn: ``loss_fn(params, batch, hp, key) -> (loss, metrics)`` for one member:
      ``batch`` is the member's batch of the data arrays, ``hp`` its traced
      hyperparameters (scalars), ``key`` its PRNG key for this step; ``metrics`` a dict of
      scalars logged per step.
    tcfg: optimizer and batch settings.
    member_groups, member_chunk: the member layout (:func:`map_members`).
    on_trace: called whenever the step is traced (tests count recompilations).

  Returns:
    ``step(state, hparams, data) -> (state, metrics)``; ``data`` holds ``[N, ...]`` arrays,
    ``metrics`` ``[M]`` arrays: ``loss``, ``grad_norm``, the algorithm's metrics and
    ``diverged``. Jit it with ``donate_argnums=0`` (:func:`jit_train_step`).
  """
  tx = optimizer(tcfg)
  bsz = tcfg.batch_size

  def member_step(params, opt, diverged, hp, data, step):
    idx = data_lib.batch_indices(hp["seed"], hp["data_size"], step, bsz)
    examples = {k: v for k, v in data.items() if k != SHARED}
    batch = jax.tree.map(lambda a: a[idx], examples)
    if SHARED in data:    # constants (frozen models, tables): read whole, never indexed
      batch[SHARED] = data[SHARED]
    key = step_key(hp["seed"], step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, hp, key)
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
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    metrics = {"loss": loss, "grad_norm": gnorm, **aux, "diverged": ~ok}
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


def _strip(tree):
  """Plain arrays / shardings (no nnx.Variable wrappers), for jit shardings and targets."""
  return jax.tree.map(lambda x: x, tree)


def state_shardings(abstract_state, mesh, preset) -> dict[str, Any]:
  """Shardings of the sweep state: members over ``sweep``, weights by the preset's rules."""
  member = NamedSharding(mesh, PartitionSpec(sharding.SWEEP))
  return _strip({
      "params": sharding.stacked_state_shardings(abstract_state["params"], mesh, preset),
      "opt": sharding.stacked_state_shardings(abstract_state["opt"], mesh, preset),
      "diverged": member,
      "step": NamedSharding(mesh, PartitionSpec()),
  })


_PLATFORM_DEFAULT = object()


def jit_train_step(step_fn, state_sh, mesh, compiler_options=_PLATFORM_DEFAULT):
  """``jax.jit`` of a sweep step: state donated, members over ``sweep``, data replicated.

  The one place the step is compiled, shared by the run loop and the benchmarks.
  ``compiler_options`` defaults to the platform's (:func:`gpo_jax.runtime.cpu.compiler_options`);
  benchmarks pass their own to compare.
  """
  if compiler_options is _PLATFORM_DEFAULT:
    compiler_options = cpu_lib.compiler_options(mesh.devices.flat[0].platform)
  member_sh = NamedSharding(mesh, PartitionSpec(sharding.SWEEP))
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step_fn, in_shardings=(state_sh, member_sh, replicated),
                 out_shardings=(state_sh, member_sh), donate_argnums=0,
                 compiler_options=compiler_options)
