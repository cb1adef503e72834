"""Builds (or reuses) a lab: ``python -m gpo_jax.lab --config configs/lab.py:small --workdir labs/``."""

import time

from gpo_jax.lab import config as lab_config
from gpo_jax.lab import store


def main(argv):
  del argv
  from absl import flags
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every read and write at INFO
  cfg = lab_config.LabConfig.from_dict(flags.FLAGS.config)
  t = time.time()
  lab = store.build_or_load(cfg, flags.FLAGS.workdir)
  print(store.summary(lab))
  print(f"done in {time.time() - t:.1f}s")


if __name__ == "__main__":
  from absl import app
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Lab config file, e.g. configs/lab.py:small.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", "labs", "Directory holding lab directories.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
