"""Bradley–Terry reward-model training (the proxy of Gao's setting, SPEC §3/§6): members are seed × lr × label kind × label noise × data size.

Each member is a :class:`~gpo_jax.core.model.RewardModel` whose trunk starts from π_ref's
(as proxies in Gao et al. start from the SFT model) and whose scalar head is initialised
from the member's seed, so seeds differ in initialisation as well as in data order. The
proxy *size* is ``model.trunk_layers``: the reward model keeps π_ref's embeddings, final
norm and its first ``trunk_layers`` blocks (0 = all of them); one size per run, as a
different shape is a different program. The loss is the Bradley–Terry cross-entropy on the
lab's pairs with

* hard labels (``gamma = 0``): the dataset's sampled label (``chosen`` preferred), which
  carries the lab's label noise;
* MMPO soft labels (``gamma > 0``): ``p = σ(γ (g_w − g_l))`` from the stored gold scores;
* extra label noise (``label_noise = q``, traced): each training pair's label is flipped
  (``p → 1 − p``) with probability ``q``, decided once per (member seed, pair), so a pair
  keeps its flip across epochs, as a mislabelled example in a fixed dataset would.

After training, :meth:`RewardModelTrainer.export` writes the members as a proxy set
(``proxies/``, :mod:`gpo_jax.proxies.store`) for best-of-n and RL against them.

Evaluation (``gpo_jax.evaluation.reward``) measures each member on held-out pairs against
gold: accuracy on the gold ordering, correlation with gold, calibration (ECE).

References:
  Gao, Schulman, Hilton 2023, arXiv 2210.10760 (proxy reward models).
  Kim et al. 2024, arXiv 2410.03145 (MMPO soft labels for reward models).
"""

import dataclasses
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
_NOISE_STREAM = 0x401CE


def make_members(seeds=(0,), lrs=(1e-4,), gammas=(0.0,), data_sizes=(None,), *,
                 n_train: int, batch_size: int, label_noises=(0.0,)) -> Members:
  """The product seed × lr × γ × label noise × data size (row-major, data size fastest)."""
  members_lib.check_numbers("seeds", seeds, integer=True, inclusive=True)
  members_lib.check_numbers("lrs", lrs)
  members_lib.check_numbers("gammas", gammas, inclusive=True)
  members_lib.check_numbers("label_noises", label_noises, inclusive=True)
  bad = [q for q in label_noises if q >= 0.5]
  if bad:
    raise ValueError(f"sweep.label_noises has {bad}; a flip probability must lie in "
                     "[0, 0.5) (0.5 erases the labels, more inverts them).")
  sizes = members_lib.data_sizes(data_sizes, n_train=n_train, batch_size=batch_size)
  cols = members_lib.product([("seed", tuple(seeds)), ("lr", tuple(lrs)),
                              ("gamma", tuple(gammas)), ("label_noise", tuple(label_noises)),
                              ("data_size", sizes)])
  gamma = np.asarray(cols["gamma"], np.float64)
  columns = {
      "labels": np.asarray(["soft" if g > 0 else "hard" for g in gamma], dtype=object),
      "seed": np.asarray(cols["seed"], np.int32),
      "lr": np.asarray(cols["lr"], np.float64),
      "gamma": gamma,
      "label_noise": np.asarray(cols["label_noise"], np.float64),
      "data_size": np.asarray(cols["data_size"], np.int32),
  }
  return Members(columns=columns,
                 traced=("seed", "lr", "gamma", "label_noise", "data_size"))


def proxy_config(lab, trunk_layers: int = 0) -> model_lib.TransformerConfig:
  """π_ref's shape with its first ``trunk_layers`` blocks (0 = all); names a bad value."""
  n = lab.policy_cfg.n_layers
  if not isinstance(trunk_layers, int) or not 0 <= trunk_layers <= n:
    raise ValueError(f"model.trunk_layers={trunk_layers!r} must be an integer in [0, {n}] "
                     f"(π_ref has {n} blocks; 0 = all of them).")
  return dataclasses.replace(lab.policy_cfg, n_layers=trunk_layers or n)


def init_reward_model(lab, seed: int = 0, trunk_layers: int = 0) -> model_lib.RewardModel:
  """A reward model whose trunk is a copy of π_ref's (its first ``trunk_layers`` blocks)."""
  cfg = proxy_config(lab, trunk_layers)
  rm = model_lib.RewardModel(cfg, rngs=nnx.Rngs(seed))
  src = lab.policy().decoder
  dst = rm.decoder
  for name in ("tok_embed", "pos_embed"):
    getattr(dst, name)[...] = getattr(src, name)[...]
  nnx.update(dst.final_norm, nnx.state(src.final_norm, nnx.Param))
  for i in range(cfg.n_layers):
    nnx.update(dst.blocks[i], nnx.state(src.blocks[i], nnx.Param))
  return rm


def label_flips(seed, index_B, noise) -> jax.Array:
  """Whether each pair's label is flipped for a member: fixed per (seed, pair index)."""
  base = jax.random.fold_in(jax.random.key(seed), _NOISE_STREAM)
  u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(base, i)))(index_B)
  return u < noise


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
    p = jnp.where(label_flips(hp["seed"], batch["index"], hp["label_noise"]), 1.0 - p, p)
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
                        n_train=n_train, batch_size=config.train.batch_size,
                        label_noises=tuple(s.get("label_noises", (0.0,))))

  def member_count(self, config) -> int:
    s = config.sweep
    return (len(s.seeds) * len(s.lrs) * len(s.gammas) * len(s.data_sizes)
            * len(s.get("label_noises", (0.0,))))

  def model(self, lab, config):
    return init_reward_model(lab, trunk_layers=_trunk_layers(config))

  def init_member(self, config):
    return init_head

  def train_data(self, lab, config):
    data = sequences.pair_arrays(lab.pairs("train"), sequences.RM_PAIR_FIELDS)
    data["index"] = jnp.arange(data["chosen"].shape[0], dtype=jnp.int32)
    return data

  def export(self, workdir, lab, config, graphdef, params_M, members) -> None:
    """Writes the trained members as a proxy set under ``<workdir>/proxies``."""
    from gpo_jax.proxies import store
    del graphdef
    store.export(workdir, lab, proxy_config(lab, _trunk_layers(config)), params_M, members,
                 trunk_layers=_trunk_layers(config))

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


def _trunk_layers(config) -> int:
  model = config.get("model")
  return int(model.get("trunk_layers", 0)) if model is not None else 0


ALGORITHM = RewardModelTrainer()
