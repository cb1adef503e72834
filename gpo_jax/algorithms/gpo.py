"""Offline GPO (SPEC §1–§2): every member minimises ``E f(β ρ)`` on the lab's fixed pairs, with hard or MMPO soft labels.

Members are family × β × seed × lr × γ × data size. ``family_idx``, ``beta``, ``lr``,
``gamma``, ``data_size``, ``seed`` and ``beta_eff_scale`` (``f''(0)/|f'(0)|`` of the
member's family) are traced, so one compiled step serves the whole sweep. β grids may be
given per family or directly in ``beta_eff`` units (``sweep.beta_effs``), converted per
family by :func:`gpo_jax.objectives.losses.beta_from_beta_eff` (autodiff; hinge, with
``f''(0) = 0``, by its target margin). The reference policy never enters the step: its
log-probs are part of the lab's dataset.

References:
  Tang et al. 2024, "Generalized Preference Optimization", arXiv 2402.05749.
  Kim et al. 2024, "Margin Matching Preference Optimization", arXiv 2410.03145.
"""

from collections.abc import Callable, Mapping, Sequence
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpo_jax.algorithms.base import Algorithm
from gpo_jax.core import sequences
from gpo_jax.engine import members as members_lib
from gpo_jax.engine.members import Members
from gpo_jax.objectives import diagnostics
from gpo_jax.objectives import losses

Array = jax.Array
Family = str | Callable[[Array], Array]

TRAIN_METRICS = diagnostics.NAMES


def family_name(f: Family) -> str:
  """A printable name for a family: the registry key or the callable's ``__name__``."""
  return f if isinstance(f, str) else getattr(f, "__name__", repr(f))


def _grids(names: list[str], values: Any, what: str) -> list[tuple]:
  """One grid per family from a shared tuple or a ``{family: tuple}`` mapping."""
  if isinstance(values, Mapping) or hasattr(values, "to_dict"):
    values = dict(values)
    unknown = sorted(set(values) - set(names))
    if unknown:
      raise ValueError(f"sweep.{what} has grids for {unknown}, families not in "
                       f"sweep.families {names}.")
    missing = [n for n in names if n not in values]
    if missing:
      raise ValueError(f"sweep.{what} has no grid for families {missing}; give one tuple "
                       "per family or one shared tuple.")
    return [_as_tuple(values[n]) for n in names]
  return [_as_tuple(values)] * len(names)


def _as_tuple(v: Any) -> tuple:
  return tuple(v) if isinstance(v, (list, tuple)) else (v,)


def make_members(families: Sequence[Family],
                 betas: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
                 seeds: Sequence[int] = (0,),
                 lrs: Sequence[float] = (1e-4,),
                 gammas: Sequence[float] = (0.0,),
                 data_sizes: Sequence[int | None] = (None,),
                 *, n_train: int, batch_size: int,
                 beta_effs: Sequence[float] | Mapping[str, Sequence[float]] | None = None
                 ) -> Members:
  """Builds the product sweep family × β × seed × lr × γ × data size.

  Args:
    families: registry names or callables ``z -> f(z)``.
    betas: one β grid for all families, or a mapping family name -> grid.
    seeds: data-order seeds.
    lrs: peak learning rates.
    gammas: soft-label temperatures (0 = hard labels from the dataset).
    data_sizes: leading-subset sizes of the training pairs; None or 0 = all ``n_train``.
    n_train: number of training pairs available.
    batch_size: per-member batch size (each data size must be at least this).
    beta_effs: instead of ``betas``, grids in ``beta_eff`` units, converted per family.

  Returns:
    The :class:`Members`, in row-major product order (family slowest, data size fastest).

  Raises:
    ValueError: naming the bad value and the valid choices (unknown family, β <= 0, a
      non-number in a swept list, an empty list, lr <= 0, γ < 0, data size out of range,
      both or neither of ``betas`` / ``beta_effs``).
  """
  fams = tuple(families)
  if not fams:
    raise ValueError("sweep.families is empty; give at least one of "
                     f"{sorted(losses.GPO_FUNCTIONS)} (or a callable).")
  for f in fams:
    losses.get_f(f)
    losses.derivatives_at_zero(f)
  names = [family_name(f) for f in fams]
  if len(set(names)) != len(names):
    raise ValueError(f"sweep.families must be distinct, got {names}.")
  if (betas is None) == (beta_effs is None):
    raise ValueError("give exactly one of sweep.betas and sweep.beta_effs (got "
                     f"betas={betas!r}, beta_effs={beta_effs!r}).")
  if betas is not None:
    grids = _grids(names, betas, "betas")
    for n, g in zip(names, grids):
      members_lib.check_numbers(f"betas ({n})", g)
  else:
    eff = _grids(names, beta_effs, "beta_effs")
    for n, g in zip(names, eff):
      members_lib.check_numbers(f"beta_effs ({n})", g)
    grids = [tuple(losses.beta_from_beta_eff(f, b) for b in g) for f, g in zip(fams, eff)]
  members_lib.check_numbers("lrs", lrs)
  members_lib.check_numbers("gammas", gammas, inclusive=True)
  members_lib.check_numbers("seeds", seeds, integer=True, inclusive=True)
  sizes = members_lib.data_sizes(data_sizes, n_train=n_train, batch_size=batch_size)
  rows = []
  for f, grid in zip(fams, grids):
    block = members_lib.product([("beta", grid), ("seed", seeds), ("lr", lrs),
                                 ("gamma", gammas), ("data_size", sizes)])
    rows += [(f,) + r for r in zip(block["beta"], block["seed"], block["lr"], block["gamma"],
                                   block["data_size"])]
  return from_rows(fams, rows)


def from_rows(families: Sequence[Family], rows: Sequence[tuple]) -> Members:
  """Members from explicit ``(family, beta, seed, lr, gamma, data_size)`` rows over ``families``.

  For hand-built sweeps (tests, benchmarks); no product is taken and rows may repeat.
  """
  fams = tuple(families)
  names = [family_name(f) for f in fams]
  cols = list(zip(*rows))
  idx = np.asarray([names.index(family_name(f)) for f in cols[0]], np.int32)
  columns = {
      "family": np.asarray([names[i] for i in idx], dtype=object),
      "family_idx": idx,
      "beta": np.asarray(cols[1], np.float64),
      "lr": np.asarray(cols[3], np.float64),
      "seed": np.asarray(cols[2], np.int32),
      "gamma": np.asarray(cols[4], np.float64),
      "data_size": np.asarray(cols[5], np.int32),
      "beta_eff_scale": losses.beta_eff_scales(fams)[idx],
  }
  return Members(columns=columns,
                 traced=("family_idx", "beta", "lr", "gamma", "data_size", "seed",
                         "beta_eff_scale"),
                 hidden=("family_idx", "beta_eff_scale"),
                 tables={"families": fams})


def member_loss_fn(graphdef, rest, families: Sequence[Family], length_normalize: bool):
  """The per-member offline GPO loss ``(params, batch, hp, key) -> (loss, diagnostics)``.

  ``hp``: ``family_idx``, ``beta``, ``gamma`` (0 = the dataset's hard label, else
  ``p = σ(γ (g_w − g_l))`` from the stored gold scores), ``beta_eff_scale``.
  """
  fswitch = losses.switched_f(families)

  def loss_fn(params, batch, hp, key):
    del key  # offline: nothing is sampled
    model = nnx.merge(graphdef, params, rest)
    lr_w, lr_l = sequences.pair_logratios(model, batch, length_normalize)
    hard = hp["gamma"] <= 0
    p = losses.soft_label(batch["gold_chosen"], batch["gold_rejected"], hp["gamma"])
    loss_B = losses.gpo_loss(lr_w - lr_l, hp["beta"], functools.partial(fswitch, hp["family_idx"]),
                             p=jnp.where(hard, 1.0, p), hard=hard)
    return jnp.mean(loss_B), diagnostics.preference_diagnostics(
        lr_w, lr_l, hp["beta"], hp["beta_eff_scale"])

  return loss_fn


def _sweep_grids(config) -> dict[str, Any]:
  s = config.sweep
  def grid(v):
    if v is None:
      return None
    if isinstance(v, Mapping) or hasattr(v, "to_dict"):
      return {k: tuple(x) for k, x in dict(v).items()} or None
    return tuple(v) if isinstance(v, (list, tuple)) else v
  betas, beta_effs = grid(s.get("betas")), grid(s.get("beta_effs"))
  # An empty tuple is "not given", so a config can switch units with one override.
  return {"betas": betas if betas not in ((), None) else None,
          "beta_effs": beta_effs if beta_effs not in ((), None) else None}


class OfflineGPO(Algorithm):
  """Offline GPO over the lab's gold-labelled pairs."""

  name = "gpo"
  headline_metric = "gold/reward"
  train_metrics = TRAIN_METRICS

  def members(self, config, n_train: int) -> Members:
    s = config.sweep
    return make_members(list(s.families), seeds=tuple(s.seeds), lrs=tuple(s.lrs),
                        gammas=tuple(s.gammas), data_sizes=tuple(s.data_sizes),
                        n_train=n_train, batch_size=config.train.batch_size,
                        **_sweep_grids(config))

  def member_count(self, config) -> int:
    s = config.sweep
    g = _sweep_grids(config)
    grid = g["betas"] if g["betas"] is not None else g["beta_effs"]
    if grid is None:
      return 0
    n_beta = (sum(len(v) for v in grid.values()) if isinstance(grid, dict)
              else len(grid) * len(s.families))
    return n_beta * len(s.seeds) * len(s.lrs) * len(s.gammas) * len(s.data_sizes)

  def model(self, lab, config):
    return lab.policy()

  def train_data(self, lab, config):
    return sequences.pair_arrays(lab.pairs("train"))

  def loss_fn(self, graphdef, rest, members, config):
    return member_loss_fn(graphdef, rest, members.families, config.train.length_normalize)

  def evaluator(self, lab, graphdef, rest, members, config, sharding):
    from gpo_jax.evaluation import policy
    ecfg = policy.EvalConfig.from_config(config.eval)
    return policy.Evaluator.from_lab(lab, graphdef, rest, ecfg,
                                     config.train.length_normalize, sharding=sharding)

  def validate(self, config, n_train: int) -> Members:
    e = config.eval
    if e.n_prompts > config.lab.n_eval_prompts or e.n_prompts < 0:
      raise ValueError(f"eval.n_prompts={e.n_prompts} exceeds the lab's "
                       f"n_eval_prompts={config.lab.n_eval_prompts} (valid: 0 = all of "
                       f"them, or 2..{config.lab.n_eval_prompts}).")
    too_big = [n for n in e.bon_n if n > e.ref_samples_per_prompt]
    if too_big:
      raise ValueError(f"eval.bon_n has {too_big}, larger than the π_ref pool "
                       f"eval.ref_samples_per_prompt={e.ref_samples_per_prompt}; best-of-n "
                       "needs n <= the pool (raise the pool or drop those n).")
    return self.members(config, n_train)

  def report(self, workdir: str, log) -> None:
    from gpo_jax import analysis
    analysis.analyze(workdir)

  def export(self, workdir, lab, config, graphdef, params_M, members) -> None:
    """With ``export_implicit = True``: the final policies' implicit rewards as a proxy set
    (``<workdir>/proxies``), the like-for-like best-of-n selector of SPEC §5."""
    if not config.get("export_implicit", False):
      return
    from gpo_jax.proxies import store
    del graphdef
    store.export(workdir, lab, lab.policy_cfg, params_M, members, kind="implicit")

  def describe(self, row) -> str:
    g = row.get("gold/reward")
    gold = f"{g:+.3f}" if g is not None and math.isfinite(g) else "nan"
    return f"{row['family']} β={row['beta']:g} gold={gold}"


ALGORITHM = OfflineGPO()
