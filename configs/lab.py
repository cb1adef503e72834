"""Lab configs: the synthetic world, π_ref's SFT, the gold reward model and the preference data.

Build a lab (reused when it already exists; the directory name hashes the config)::

  python -m gpo_jax.lab --config configs/lab.py:tiny  --workdir labs/   # ~25 s on 2 CPU cores
  python -m gpo_jax.lab --config configs/lab.py:small --workdir labs/   # ~3.5 min on 2 CPU cores
  python -m gpo_jax.lab --config configs/lab.py:large --workdir labs/   # GPU/TPU-sized

Override any field from the command line (the config is locked, so typos fail), e.g.
``--config.n_train_pairs=8192 --config.label_temp=0.5``. ``tiny`` is what the tests build;
``small`` is the CPU lab the experiments use; ``large`` scales every part up.
"""

import ml_collections

from gpo_jax.lab import presets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked lab config for variant ``arg`` in {tiny, small, large} (default small)."""
  return presets.lab_config(arg)
