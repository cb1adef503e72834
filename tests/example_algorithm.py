"""The worked example of ARCHITECTURE.md "Adding an algorithm": offline GPO plus a traced per-member length penalty."""

import jax.numpy as jnp
import numpy as np

from gpo_jax.algorithms import gpo
from gpo_jax.engine.members import Members


class LengthGPO(gpo.OfflineGPO):
  name = "length_gpo"

  def members(self, config, n_train) -> Members:
    m = super().members(config, n_train)               # family x beta x seed x lr x ...
    cols = dict(m.columns, penalty=np.full(m.size, config.sweep.penalty))
    return Members(cols, m.traced + ("penalty",), m.hidden, m.tables)

  def loss_fn(self, graphdef, rest, members, config):
    base = super().loss_fn(graphdef, rest, members, config)
    def loss(params, batch, hp, key):
      value, metrics = base(params, batch, hp, key)
      length = jnp.mean(jnp.sum(batch["chosen_mask"], -1))
      return value + hp["penalty"] * length, metrics   # hp["penalty"] is traced: no recompiles
    return loss


ALGORITHM = LengthGPO()
