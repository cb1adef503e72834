"""What keeps a run directory honest: an exclusive lock, config provenance with layout-only changes allowed, and clean stops on SIGTERM/SIGINT.

* :func:`workdir_lock` — one run per workdir: a second run started on the same directory
  fails at once with :class:`WorkdirInUseError` naming the holder, instead of interleaving
  metrics rows and checkpoints with the first.
* :func:`compare_configs` — a resumed run must have been made by the same config up to the
  *layout* keys (:data:`LAYOUT_KEYS`: how members are placed on devices and whether a report
  is written), which cannot change a result because checkpoints restore onto any mesh. The
  refusal names every dotted key that differs.
* :class:`StopSignals` — SIGTERM (what schedulers send before preemption) and SIGINT set a
  flag; the loop finishes the step in flight, writes a checkpoint and the metrics, and raises
  :class:`RunInterrupted`, so a rerun resumes exactly.
"""

import contextlib
import fcntl
import json
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

LOCK_FILE = ".run.lock"
# Dotted config keys that may change between restarts: device layout and reporting only.
LAYOUT_KEYS = ("mesh.preset", "mesh.sweep", "mesh.data", "mesh.model", "mesh.cpu_devices",
               "train.member_chunk", "train.log_every", "eval.member_chunk", "analyze",
               "distributed.enabled", "distributed.coordinator_address",
               "distributed.num_processes", "distributed.process_id", "lab_root")


class RunError(RuntimeError):
  """An expected failure of a run a user can act on (the CLI prints it without a traceback)."""


class WorkdirInUseError(RunError):
  """Another run holds the workdir's lock."""


class ConfigMismatchError(RunError, ValueError):
  """The workdir (or a checkpoint in it) was made by a config that gives other results."""


class DiskFullError(RunError):
  """Not enough free space to write a checkpoint (checked before orbax starts writing)."""


def check_free_space(directory: str, need_bytes: int, what: str, resume_hint: str) -> None:
  """Raises :class:`DiskFullError` when ``directory``'s filesystem has less than ``need_bytes``.

  Checked before an asynchronous checkpoint starts: a disk that fills in the middle of an
  orbax save surfaces as hundreds of lines of event-loop errors from its threads.
  """
  import shutil
  os.makedirs(directory, exist_ok=True)
  free = shutil.disk_usage(directory).free
  if free < need_bytes:
    raise DiskFullError(
        f"disk full: {what} needs about {need_bytes / 2**20:.1f} MiB but {directory} has "
        f"{free / 2**20:.1f} MiB free. Free space (or point --workdir elsewhere) and rerun "
        f"the same command: {resume_hint}")


def is_disk_full(e: BaseException) -> bool:
  """Whether an exception (from orbax/tensorstore or the OS) means the disk is full."""
  import errno
  return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or any(
      s in str(e) for s in ("RESOURCE_EXHAUSTED", "No space left on device"))


class RunInterrupted(RunError):
  """The run stopped on a signal after saving a checkpoint; rerun the command to resume."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


@contextlib.contextmanager
def workdir_lock(workdir: str, enabled: bool = True) -> Iterator[None]:
  """Holds an exclusive ``fcntl`` lock on ``<workdir>/.run.lock`` (non-blocking).

  Raises:
    WorkdirInUseError: another process holds it; the message names its pid and start time.
  """
  if not enabled:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  f = open(path, "a+")
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "an unknown process"
      raise WorkdirInUseError(
          f"{workdir} is in use by another run ({holder}). Wait for it to finish, stop it, "
          "or pass another --workdir.") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    f.flush()
    yield
  finally:
    f.close()   # closing the descriptor releases the lock


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, Mapping):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def result_keys(config_json: Mapping[str, Any]) -> dict[str, Any]:
  """The flattened config without the layout keys: what must match to resume."""
  return {k: v for k, v in _flatten(config_json).items()
          if not any(k == lk or k.startswith(lk + ".") for lk in LAYOUT_KEYS)}


def compare_configs(old: Mapping[str, Any], new: Mapping[str, Any], where: str) -> list[str]:
  """Returns the layout keys that changed; raises if any other key differs.

  Raises:
    ConfigMismatchError: naming every differing key with its old and new value.
  """
  a, b = _flatten(old), _flatten(new)
  changed = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
  ra, rb = result_keys(old), result_keys(new)
  bad = [k for k in changed if k in ra or k in rb]
  if bad:
    detail = "; ".join(f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
                       for k in bad[:8])
    more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
    raise ConfigMismatchError(
        f"{where} was made by a config that differs in keys that change results: {detail}"
        f"{more}. Use a new --workdir, or the same values to resume (only "
        f"{', '.join(LAYOUT_KEYS)} may change between restarts).")
  return changed


def read_json(path: str, what: str, hint: str) -> Any:
  """``json.load`` of ``path`` with an error that names the file and what to do."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RunError(f"{what} {path} is damaged ({type(e).__name__}: {e}). {hint}") from None


class StopSignals:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps (main thread only)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._old: dict[int, Any] = {}

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt   # a second Ctrl-C stops at once
    self.signum = signum

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def __exit__(self, *exc) -> None:
    for s, h in self._old.items():
      signal.signal(s, h)
