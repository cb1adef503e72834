"""Entry point: ``python -m gpo_jax.main --config configs/x.py --workdir runs/x`` runs the config's algorithm sweep.

Rerunning the same command on an existing workdir resumes from the newest valid
checkpoint (see ``gpo_jax.run.loop``).
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from gpo_jax.run import loop

config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (resumed if it exists).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  loop.run(flags.FLAGS.config, flags.FLAGS.workdir, log=print)


if __name__ == "__main__":
  app.run(main)
