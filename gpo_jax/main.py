"""Entry point: ``python -m gpo_jax.main --config configs/x.py --workdir runs/x`` runs the config's algorithm sweep (or, for a pipeline config, its stages).

Rerunning the same command on an existing workdir resumes from the newest valid
checkpoint (see ``gpo_jax.run.loop``). Expected failures (a bad config value, a workdir in
use or made by another config, a corrupt artifact, a stop on SIGTERM) print one message and
exit with status 2 (143/130 after SIGTERM/SIGINT); ``--traceback`` shows the full trace.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from gpo_jax.run import loop

config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (resumed if it exists).")
flags.DEFINE_bool("traceback", False, "Show the full traceback of expected errors too.")
flags.mark_flags_as_required(["config", "workdir"])


def _parse_flags(argv):
  """absl's flag parsing with a config that fails to load (or an override that is not a
  literal) reported like every other expected error: one line, exit status 2."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:   # noqa: BLE001 - everything raised while parsing is the user's input
    lines = [ln.strip("'\" ") for ln in str(e).replace("\\n", "\n").splitlines() if ln.strip()]
    # ml_collections embeds the config file's traceback; its last line is the message.
    msg = lines[-1] if any("Traceback" in ln for ln in lines) else " ".join(lines)
    msg = msg.replace("\\", "")
    if not isinstance(e, flags.Error):   # e.g. a misspelt key of the locked config
      msg = f"unknown config key {msg}"
    print(f"error: {msg}", file=sys.stderr)
    print("(while parsing the command line: --config FILE[:ARG] and --config.<key>=<Python "
          "literal>)", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    config = flags.FLAGS.config
    if "pipeline" in config:      # multi-stage (configs/proxy_setting.py)
      from gpo_jax import pipeline
      pipeline.run(config, flags.FLAGS.workdir, log=print)
    else:
      loop.run(config, flags.FLAGS.workdir, log=print)
  except loop.EXPECTED_ERRORS as e:
    if flags.FLAGS.traceback:
      raise
    if isinstance(e, loop.guard.RunInterrupted):
      print(str(e), file=sys.stderr)
      sys.exit(128 + e.signum)
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    print("(an expected error; --traceback shows where it came from)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
