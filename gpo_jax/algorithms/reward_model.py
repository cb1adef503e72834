"""Bradley–Terry reward-model training (the proxy of Gao's setting, SPEC §3/§5): members are seed × data size × label kind × lr.

Each member is a :class:`~gpo_jax.core.model.RewardModel` whose trunk starts from π_ref's
(as proxies in Gao et al. start from the SFT model) and whose scalar head is initialised
from the member's seed, so seeds differ in initialisation as well as in data order. The
loss is the Bradley–Terry cross-entropy on the lab's pairs with

* hard labels (``gamma = 0``): the dataset's sampled label (``chosen`` preferred), which
  carries the lab's label noise;
* MMPO soft labels (``gamma > 0``): ``p = σ(γ (g_w − g_l))`` from the stored gold scores.

Evaluation (``gpo_jax.evaluation.reward``) measures each member on held-out pairs against
gold: accuracy on the gold ordering, correlation with gold, calibration (ECE).

References:
  Gao, Schulman, Hilton 2023, arXiv 2210.10760 (proxy reward models).
  Kim et al. 2024, arXiv 2410.03145 (MMPO soft labels for reward models).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpo_jax.algorithms.base import Algorithm
from gpo_jax.core import model as model_lib
from gpo_jax.core import sequences
from gpo_jax.engine import members as members_lib
from gpo_jax.engine.members import Members
from gpo_jax.objectives import losses

TRAIN_METRICS = ("rm/accuracy", "rm/margin")
# Head initialisation scale (the transformer's own init std).
_HEAD_STD = 0.02
_HEAD_STREAM = 0x4EAD


def make_members(seeds=(0,), lrs=(1e-4,), gammas=(0.0,), data_sizes=(None,), *,
                 n_train: int, batch_size: int) -> Members:
  """The product seed × lr × γ × data size (row-major, data size fastest)."""
  members_lib.check_numbers("seeds", seeds, integer=True, inclusive=True)
  members_lib.check_numbers("lrs", lrs)
  members_lib.check_numbers("gammas", gammas, inclusive=True)
  sizes = members_lib.data_sizes(data_sizes, n_train=n_train, batch_size=batch_size)
  cols = members_lib.product([("seed", tuple(seeds)), ("lr", tuple(lrs)),
                              ("gamma", tuple(gammas)), ("data_size", sizes)])
  gamma = np.asarray(cols["gamma"], np.float64)
  columns = {
      "labels": np.asarray(["soft" if g > 0 else "hard" for g in gamma], dtype=object),
      "seed": np.asarray(cols["seed"], np.int32),
      "lr": np.asarray(cols["lr"], np.float64),
      "gamma": gamma,
      "data_size": np.asarray(cols["data_size"], np.int32),
  }
  return Members(columns=columns, traced=("seed", "lr", "gamma", "data_size"))


def init_reward_model(lab, seed: int = 0) -> model_lib.RewardModel:
  """A reward model of π_ref's shape whose trunk is a copy of π_ref's."""
  rm = model_lib.RewardModel(lab.policy_cfg, rngs=nnx.Rngs(seed))
  nnx.update(rm.decoder, nnx.state(lab.policy().decoder, nnx.Param))
  return rm


def init_head(params, hp):
  """Re-draws the scalar head from the member's seed (the trunk stays π_ref's)."""
  key = jax.random.fold_in(jax.random.key(hp["seed"]), _HEAD_STREAM)
  w = params["w_head"]
  params["w_head"] = w.replace(_HEAD_STD * jax.random.normal(key, w.shape, w.dtype))
  return params


def member_loss_fn(graphdef, rest):
  """The per-member BT loss ``(params, batch, hp, key) -> (loss, metrics)``."""

  def loss_fn(params, batch, hp, key):
    del key
    rm = nnx.merge(graphdef, params, rest)
    r_w, r_l = sequences.pair_scores(rm, batch)
    soft = losses.soft_label(batch["gold_chosen"], batch["gold_rejected"], hp["gamma"])
    p = jnp.where(hp["gamma"] > 0, soft, 1.0)
    loss = jnp.mean(losses.bt_loss(r_w, r_l, p))
    return loss, {"rm/accuracy": jnp.mean((r_w > r_l).astype(jnp.float32)),
                  "rm/margin": jnp.mean(r_w - r_l)}

  return loss_fn


class RewardModelTrainer(Algorithm):
  """Bradley–Terry reward models on the lab's pairs (hard or MMPO soft labels)."""

  name = "reward_model"
  headline_metric = "rm/gold_accuracy"
  train_metrics = TRAIN_METRICS

  def members(self, config, n_train: int) -> Members:
    s = config.sweep
    return make_members(tuple(s.seeds), tuple(s.lrs), tuple(s.gammas), tuple(s.data_sizes),
                        n_train=n_train, batch_size=config.train.batch_size)

  def member_count(self, config) -> int:
    s = config.sweep
    return len(s.seeds) * len(s.lrs) * len(s.gammas) * len(s.data_sizes)

  def model(self, lab, config):
    return init_reward_model(lab)

  def init_member(self, config):
    return init_head

  def train_data(self, lab, config):
    return sequences.pair_arrays(lab.pairs("train"), sequences.RM_PAIR_FIELDS)

  def loss_fn(self, graphdef, rest, members, config):
    return member_loss_fn(graphdef, rest)

  def evaluator(self, lab, graphdef, rest, members, config, sharding):
    from gpo_jax.evaluation import reward
    return reward.RewardEvaluator.from_lab(
        lab, graphdef, rest, n_test_pairs=config.eval.n_test_pairs,
        member_chunk=config.eval.member_chunk, ece_bins=config.eval.ece_bins,
        sharding=sharding)

  def describe(self, row) -> str:
    a = row.get("rm/gold_accuracy")
    acc = f"{a:.3f}" if a is not None and math.isfinite(a) else "nan"
    return f"seed={row['seed']} n={row['data_size']} {row['labels']} acc={acc}"


ALGORITHM = RewardModelTrainer()
