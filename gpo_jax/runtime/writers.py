"""Metrics on disk: a JSON-lines file (one row per member and eval step) plus TensorBoard events.

`MetricsWriter` appends rows to ``<workdir>/metrics.jsonl`` (flushed after every write, so a
crash loses nothing already written) and mirrors every numeric field to a tensorboardX event
file under ``<workdir>/tb/`` as tag ``member_003/gold/reward`` (one tag family per member);
:meth:`MetricsWriter.write_train` adds every train step's metrics to TensorBoard only, as
``member_003/train/loss``.
On resume from a checkpoint at step ``s`` it drops rows with ``step > s`` (they will be
recomputed) by atomically rewriting the file, and TensorBoard is told to purge events after
``s``. Before every write the writer checks that ``metrics.jsonl`` on disk is still the file it
holds open: if it was deleted or replaced mid-run, the rows written so far (still readable
through the open descriptor) are restored to the path, a replacing file is kept aside, and a
warning says so. Only process 0 writes. JSON follows Python's convention for non-finite floats
(``NaN``, ``Infinity``), which ``json.loads`` and ``pandas.read_json`` accept.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
PER_PROMPT_DIR = "per_prompt"
# Row fields that identify a row rather than measure something: not sent to TensorBoard.
ID_FIELDS = ("step", "member", "family", "seed")


def to_python(value: Any) -> Any:
  """Converts numpy / JAX scalars (and 0-d arrays) to Python scalars; other values unchanged."""
  if isinstance(value, (bool, int, float, str)) or value is None:
    return value
  if isinstance(value, np.generic):
    return value.item()
  if hasattr(value, "shape") and hasattr(value, "dtype"):
    arr = np.asarray(value)
    if arr.shape == ():
      return arr.item()
    return arr.tolist()
  if isinstance(value, Mapping):
    return {str(k): to_python(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_python(v) for v in value]
  return value


def _process_index() -> int:
  try:
    import jax  # local: analysis code may import this module without touching devices
    return jax.process_index()
  except Exception:  # noqa: BLE001 - no JAX backend means a single process
    return 0


def write_aside(path: str | os.PathLike, mode: str, write, **open_kwargs) -> str:
  """``write(f)`` into a temporary file beside ``path``, flushed to disk, then ``os.replace``
  onto ``path``: a crash (process or machine) leaves the old file or the new one, never a
  torn one. The temporary name is unique per call (``<path>.tmp-<pid>-<random>``), so two
  processes writing one path (a retrieval or π_ref pool cache shared by runs, every host of
  a multi-host run) each replace it whole. On an error the temporary file is removed and
  the error raised; a killed process leaves its ``.tmp-*`` behind, which nothing reads.
  Returns the path."""
  path = os.fspath(path)
  tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
  try:
    with open(tmp, mode, **open_kwargs) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  return path


def save_npz_atomic(path: str | os.PathLike, arrays: Mapping[str, Any]) -> str:
  """``np.savez`` of ``arrays`` to ``path`` through a temporary file and ``os.replace``, so a
  crash leaves the old file or the new one, never a torn one. Returns the path."""
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  return write_aside(os.fspath(path), "wb", lambda f: np.savez(f, **arrays))


def save_text_atomic(path: str | os.PathLike, text: str) -> str:
  """Writes ``text`` (UTF-8) to ``path`` through a temporary file and ``os.replace``: a crash
  leaves the old file or the new one, never a torn one (which a rerun would fail to parse).
  Returns the path."""
  return write_aside(os.fspath(path), "w", lambda f: f.write(text), encoding="utf-8")


def save_json_atomic(path: str | os.PathLike, obj: Any, **dump_kwargs) -> str:
  """``json.dump(obj, **dump_kwargs)`` to ``path`` as :func:`save_text_atomic` writes text."""
  return save_text_atomic(path, json.dumps(obj, **dump_kwargs))


def truncate_jsonl(path: str | os.PathLike, max_step: int, log=None) -> int:
  """Keeps rows with ``step <= max_step`` (and drops a torn last line); returns rows dropped.

  The file is rewritten through a temporary file and ``os.replace`` so a crash during the
  rewrite leaves either the old or the new file, never a mix. ``log`` (if given) is told
  what was dropped: rows past the resume step (recomputed next) and torn lines (a crash
  mid-write), each with its line number.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  torn: list[int] = []
  later = 0
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        dropped += 1  # a line torn by a crash mid-write
        torn.append(number)
        continue
      if isinstance(row, dict) and row.get("step") is not None and row["step"] > max_step:
        dropped += 1
        later += 1
        continue
      kept.append(line if line.endswith("\n") else line + "\n")
  if log is not None and dropped:
    log(f"{path}: dropped {later} rows after step {max_step} (the resumed run writes them "
        "again, identically)"
        + (f" and {len(torn)} torn lines (lines {torn[:10]}: a crash mid-write)" if torn else ""))
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(kept)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return dropped


class MetricsWriter:
  """Writes metric rows to ``metrics.jsonl`` and TensorBoard.

  Args:
    workdir: run directory (created if missing).
    resume_step: the checkpoint step a resumed run restarts from; rows with a larger step
      are dropped. None starts a fresh run: an existing non-empty ``metrics.jsonl`` is kept
      as ``metrics.jsonl.bak<N>`` rather than appended to or lost.
    tensorboard: also write TensorBoard events under ``<workdir>/tb``.
    is_writer: override the "process 0 writes" rule (default: ``jax.process_index() == 0``).
  """

  def __init__(self, workdir: str | os.PathLike, resume_step: int | None = None, *,
               tensorboard: bool = True, is_writer: bool | None = None, log=None):
    self.workdir = os.path.abspath(os.fspath(workdir))
    self.path = os.path.join(self.workdir, METRICS_FILE)
    self.active = (_process_index() == 0) if is_writer is None else is_writer
    self.log = log or print
    self._file = None
    self._tb = None
    if not self.active:
      return
    os.makedirs(self.workdir, exist_ok=True)
    if resume_step is None:
      if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
        n = 0
        while os.path.exists(f"{self.path}.bak{n}"):
          n += 1
        os.replace(self.path, f"{self.path}.bak{n}")
    else:
      truncate_jsonl(self.path, resume_step, log=self.log)
    self._file = open(self.path, "a+", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter
      # purge_step makes TensorBoard discard events at steps > resume_step from before the crash.
      purge = None if resume_step is None else resume_step + 1
      self._tb = SummaryWriter(os.path.join(self.workdir, TB_DIR), purge_step=purge)

  def write(self, rows: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
    """Appends one row (a dict with at least ``step``) or an iterable of rows.

    A row with a ``member`` field goes to TensorBoard as ``member_{member:03d}/{name}``;
    rows without one as ``{name}``. Non-numeric fields are kept in JSON only.
    """
    if isinstance(rows, Mapping):
      rows = [rows]
    rows = [{str(k): to_python(v) for k, v in row.items()} for row in rows]
    for row in rows:
      if "step" not in row or not isinstance(row["step"], numbers.Integral):
        raise ValueError(f"Every metrics row needs an integer 'step'; got {row.get('step')!r} "
                         f"in row with keys {sorted(row)}.")
    if not self.active:
      return
    self._check_path()
    for row in rows:
      self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is None:
      return
    for row in rows:
      prefix = f"member_{int(row['member']):03d}/" if row.get("member") is not None else ""
      for name, value in row.items():
        if name in ID_FIELDS or isinstance(value, str) or value is None:
          continue
        if isinstance(value, bool):
          value = float(value)
        if isinstance(value, numbers.Real) and not math.isnan(value):
          self._tb.add_scalar(prefix + name, float(value), global_step=row["step"])
    self._tb.flush()

  def _check_path(self) -> None:
    """Restores ``metrics.jsonl`` if it was deleted or replaced since it was opened."""
    held = os.fstat(self._file.fileno())
    try:
      now = os.stat(self.path)
      same = (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev)
    except FileNotFoundError:
      now, same = None, False
    if same:
      return
    what = "deleted"
    if now is not None:
      n = 0
      while os.path.exists(f"{self.path}.replaced{n}"):
        n += 1
      os.replace(self.path, f"{self.path}.replaced{n}")
      what = f"replaced by another file (kept as {self.path}.replaced{n})"
    self._file.flush()
    self._file.seek(0)
    content = self._file.read()
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(content)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)
    self._file.close()
    self._file = open(self.path, "a+", encoding="utf-8")
    self.log(f"WARNING: {self.path} was {what} while the run was writing it; its "
             f"{content.count(chr(10))} rows were restored from the open file and the run "
             "continues appending.")

  def write_per_prompt(self, step: int, arrays: Mapping[str, Any]) -> str | None:
    """Saves one eval step's ``[M, E]`` per-prompt arrays to ``per_prompt/<step>.npz``.

    Written to a temporary file and renamed, so a crash never leaves a torn file; a resumed
    run that re-evaluates a step rewrites it with the same values. Returns the path (None on
    processes that do not write).
    """
    if not isinstance(step, numbers.Integral):
      raise ValueError(f"write_per_prompt needs an integer step, got {step!r}.")
    if not self.active:
      return None
    d = os.path.join(self.workdir, PER_PROMPT_DIR)
    os.makedirs(d, exist_ok=True)
    return save_npz_atomic(os.path.join(d, f"{int(step):08d}.npz"),
                           {k.replace("/", "__"): v for k, v in arrays.items()})

  def steps_present(self, n_members: int) -> set[int]:
    """Steps that have a row for each of ``n_members`` members in ``metrics.jsonl``."""
    counts: dict[int, set] = {}
    if os.path.exists(self.path):
      for row in read_jsonl(self.path):
        if isinstance(row, dict) and isinstance(row.get("step"), int):
          counts.setdefault(row["step"], set()).add(row.get("member"))
    return {st for st, ms in counts.items() if len(ms) >= n_members}

  def missing_steps(self, steps: Iterable[int], n_members: int) -> list[int]:
    """Those of ``steps`` without a full set of member rows (resume completeness check)."""
    if not self.active:
      return []
    present = self.steps_present(n_members)
    return [st for st in steps if st not in present]

  def write_train(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Sends one train step's per-member metrics to TensorBoard only.

    Args:
      step: the step count after the update (the step the next evaluation would carry).
      metrics: name -> ``[M]`` array (one value per member); tags are
        ``member_{m:03d}/train/{name}``. Non-finite values are skipped (TensorBoard cannot
        plot them; the member's ``diverged`` flag says what happened).
    """
    if not isinstance(step, numbers.Integral):
      raise ValueError(f"write_train needs an integer step, got {step!r}.")
    if not self.active or self._tb is None:
      return
    for name, values in metrics.items():
      arr = np.asarray(values, dtype=np.float64).reshape(-1)
      for m, value in enumerate(arr):
        if math.isfinite(value):
          self._tb.add_scalar(f"member_{m:03d}/train/{name}", float(value), global_step=int(step))

  def close(self) -> None:
    """Flushes and closes both outputs (safe to call twice)."""
    if self._file is not None:
      self._file.flush()
      os.fsync(self._file.fileno())
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads all rows of a metrics file (skipping a torn last line)."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          continue
  return rows
