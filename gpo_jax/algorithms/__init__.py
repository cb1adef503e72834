"""Algorithms the engine runs, one module per method family; ``config.algorithm`` picks one from :data:`REGISTRY`.

The registry is the only place a string selects an algorithm. Modules are imported on
first use, so registering a method costs nothing until a config asks for it.
"""

import importlib

from gpo_jax.algorithms.base import Algorithm

# config.algorithm -> module defining ALGORITHM (an Algorithm instance)
REGISTRY: dict[str, str] = {
    "gpo": "gpo_jax.algorithms.gpo",                    # offline GPO (DPO, IPO, SLiC, ... any f)
    "reward_model": "gpo_jax.algorithms.reward_model",  # Bradley–Terry RM (hard or MMPO labels)
    "rloo": "gpo_jax.algorithms.rloo",                  # RL against a proxy (RLOO, KL-regularised)
    "online": "gpo_jax.algorithms.online",              # online IPO/DPO/SLiC, IPO-MD, Nash-MD
    "inverse_q": "gpo_jax.algorithms.inverse_q",        # Inverse-Q*-style token RL (a reconstruction)
}


def get(name: str) -> Algorithm:
  """The algorithm registered as ``name``; an unknown name lists the valid ones."""
  if not isinstance(name, str) or name not in REGISTRY:
    raise ValueError(f"unknown algorithm {name!r}; valid choices: {sorted(REGISTRY)}.")
  return importlib.import_module(REGISTRY[name]).ALGORITHM
