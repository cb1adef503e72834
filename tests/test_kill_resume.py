"""SIGKILL the real sweep CLI mid-save or between checkpoints, rerun it, compare to an uninterrupted run.

Kill points are chosen by file events, not by time. The poller freezes the run with
SIGSTOP as soon as the event shows up, checks the files again on the frozen process (it can
no longer move them, so what is seen is exactly the state that gets killed), then SIGKILLs
it; if the state has moved on in the microseconds between the two looks, the run is
resumed with SIGCONT and the next matching event is taken. A run that finishes before any
matching event fails the test with "kill point missed".

All CLI runs of this module share one persistent XLA compilation cache (the caller's
``JAX_COMPILATION_CACHE_DIR`` if set), so only the first one compiles (~15 s of CPU) and
later ones take ~6 s; the tiny lab comes from ``tests/lab_fixture.py`` and is not rebuilt.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import lab_fixture
from gpo_jax.run import loop
from gpo_jax.runtime import writers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/tiny_sweep.py"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax saves into "<step><suffix>", then renames it
POLL_S = 0.002
RUN_TIMEOUT_S = 600


def _tiny_config():
  return lab_fixture.load_config(os.path.basename(CONFIG))


TINY = _tiny_config()
# Freezing the run before the kill needs Linux's per-thread states in /proc.
pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"),
                                reason="needs /proc (Linux) to see a SIGSTOPped run freeze")
STEPS, SAVE_EVERY = TINY.train.steps, TINY.checkpoint.every


@dataclasses.dataclass(frozen=True)
class Cli:
  lab_root: str
  lab_path: str
  env: dict
  logs: str

  def command(self, workdir: str) -> list[str]:
    return [sys.executable, "-m", "gpo_jax.main", "--config", CONFIG,
            f"--config.lab_root={self.lab_root}", "--workdir", workdir]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
  root = lab_fixture.shared_root(tmp_path_factory)
  lab = lab_fixture.get_tiny_lab(root)
  # A cache the caller already set (e.g. one kept across sessions) also spares the first compile.
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(tmp_path_factory.mktemp("xla_cache"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return Cli(root, lab.path, env, str(tmp_path_factory.mktemp("logs")))


def _tail(path, n=3000) -> str:
  with open(path, errors="replace") as f:
    return f.read()[-n:]


def _run_to_completion(cli: Cli, workdir: str, name: str) -> None:
  log = os.path.join(cli.logs, name + ".log")
  with open(log, "wb") as out:
    proc = subprocess.run(cli.command(workdir), cwd=REPO, env=cli.env, stdout=out,
                          stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
  assert proc.returncode == 0, f"CLI run {name} failed (rc={proc.returncode}):\n{_tail(log)}"


@pytest.fixture(scope="module")
def reference(cli, tmp_path_factory):
  """An uninterrupted CLI run (it also fills the compilation cache for the others)."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
  _run_to_completion(cli, workdir, "uninterrupted")
  with open(os.path.join(workdir, "manifest.json")) as f:
    used = json.load(f)["lab"]["path"]
  assert os.path.samefile(used, cli.lab_path), (
      f"the CLI used lab {used}, not the fixture's {cli.lab_path}: configs/tiny_sweep.py and "
      "tests/lab_fixture.py no longer describe the same lab, so every run here rebuilds it")
  return workdir


# ----------------------------------------------------------------------------- files


def _checkpoint_entries(workdir: str) -> tuple[list[int], list[int]]:
  """(finalised steps, steps with a save in flight) in ``<workdir>/checkpoints``."""
  try:
    names = os.listdir(os.path.join(workdir, "checkpoints"))
  except FileNotFoundError:
    return [], []
  final = sorted(int(n) for n in names if n.isdigit())
  tmp = sorted(int(n[:-len(TMP_SUFFIX)]) for n in names
               if n.endswith(TMP_SUFFIX) and n[:-len(TMP_SUFFIX)].isdigit())
  return final, tmp


def _metric_steps(workdir: str) -> list[int]:
  """Steps of the complete rows of metrics.jsonl (a torn last line is ignored)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = f.readlines()
  except FileNotFoundError:
    return []
  steps = []
  for line in lines:
    if line.endswith("\n"):
      steps.append(json.loads(line)["step"])
  return steps


def _rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _final_state(workdir: str) -> list[np.ndarray]:
  path = os.path.join(os.path.abspath(workdir), "checkpoints", str(STEPS), "state")
  with ocp.StandardCheckpointer() as ck:
    return [np.asarray(x) for x in jax.tree.leaves(ck.restore(path))]


# ----------------------------------------------------------------------------- kill


def _wait_stopped(pid: int, timeout_s: float = 10.0) -> None:
  """Returns once every thread of ``pid`` is in the stopped state (SIGSTOP is asynchronous)."""
  deadline = time.monotonic() + timeout_s
  task_dir = f"/proc/{pid}/task"
  while time.monotonic() < deadline:
    states = []
    for tid in os.listdir(task_dir):
      try:
        with open(f"{task_dir}/{tid}/stat") as f:
          states.append(f.read().rsplit(")", 1)[1].split()[0])
      except FileNotFoundError:
        continue  # a thread that exited meanwhile
    if states and all(s in "tT" for s in states):
      return
    time.sleep(0.001)
  raise AssertionError(f"process {pid} did not stop within {timeout_s} s of SIGSTOP")


def _run_and_kill(cli: Cli, workdir: str, name: str, trigger, what: str):
  """Starts the CLI and SIGKILLs it at the first state where ``trigger(workdir)`` is truthy.

  Returns:
    The trigger's value on the frozen process, i.e. a description of the killed state.
  """
  log = os.path.join(cli.logs, name + ".log")
  with open(log, "wb") as out:
    proc = subprocess.Popen(cli.command(workdir), cwd=REPO, env=cli.env, stdout=out,
                            stderr=subprocess.STDOUT)
  deadline = time.monotonic() + RUN_TIMEOUT_S
  try:
    while time.monotonic() < deadline:
      if proc.poll() is not None:
        pytest.fail(f"kill point missed: run {name} exited (rc={proc.returncode}) before "
                    f"{what}; checkpoints (final, in flight) = {_checkpoint_entries(workdir)}, "
                    f"metric steps = {sorted(set(_metric_steps(workdir)))}\n{_tail(log)}")
      if trigger(workdir):
        os.kill(proc.pid, signal.SIGSTOP)
        _wait_stopped(proc.pid)
        seen = trigger(workdir)
        if seen:
          os.kill(proc.pid, signal.SIGKILL)
          proc.wait()
          assert proc.returncode == -signal.SIGKILL, proc.returncode
          print(f"{name}: killed with {seen}")
          return seen
        os.kill(proc.pid, signal.SIGCONT)  # the event passed before the stop landed
      time.sleep(POLL_S)
    pytest.fail(f"run {name} did not reach {what} within {RUN_TIMEOUT_S} s\n{_tail(log)}")
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _mid_save(min_step: int):
  """Trigger: an orbax save of a step >= ``min_step`` is in flight (its tmp dir exists)."""
  def trigger(workdir):
    final, tmp = _checkpoint_entries(workdir)
    tmp = [s for s in tmp if s >= min_step]
    return {"final": final, "in_flight": tmp} if tmp else None
  return trigger


def _past_checkpoint(workdir):
  """Trigger: metrics.jsonl holds a row for a step after the newest finalised checkpoint."""
  final, tmp = _checkpoint_entries(workdir)
  steps = _metric_steps(workdir)
  if final and steps and max(steps) > final[-1]:
    return {"final": final, "in_flight": tmp, "metric_steps": sorted(set(steps))}
  return None


def _resume_and_compare(cli, reference, workdir, name, resume_step):
  _run_to_completion(cli, workdir, name + "-resumed")
  with open(os.path.join(workdir, "manifest.json")) as f:
    segments = json.load(f)["segments"]
  # The killed run wrote no manifest, so its one segment is the resumed run's.
  assert [s["start_step"] for s in segments] == [resume_step], (
      f"the rerun started at {[s['start_step'] for s in segments]}, not at the newest "
      f"finalised checkpoint {resume_step}: it did not resume from where the kill left it")
  got, want = _rows(workdir), _rows(reference)
  assert [(r["step"], r["member"]) for r in got] == [(r["step"], r["member"]) for r in want], (
      "the resumed run's metrics.jsonl has different (step, member) rows than an "
      "uninterrupted run: rows were lost, duplicated or left over from the killed run")
  for a, b in zip(got, want):
    assert a == b, (f"metrics of step {a['step']} member {a['member']} differ after "
                    f"kill + resume: {[k for k in a if a[k] != b.get(k)]}")
  for i, (a, b) in enumerate(zip(_final_state(workdir), _final_state(reference))):
    np.testing.assert_array_equal(
        a, b, err_msg=f"final checkpointed state leaf {i} is not bitwise equal after resume")
  final, tmp = _checkpoint_entries(workdir)
  assert final[-1] == STEPS and not tmp, (
      f"checkpoints after the resumed run: final {final}, in flight {tmp}; expected the last "
      f"step {STEPS} and no half-written save left behind")


# ----------------------------------------------------------------------------- tests


def test_sigkill_during_async_save_then_rerun_matches_uninterrupted(cli, reference, tmp_path):
  """Killed while orbax writes the second checkpoint: the rerun resumes from the first."""
  workdir = str(tmp_path / "run")
  seen = _run_and_kill(cli, workdir, "mid-save", _mid_save(2 * SAVE_EVERY),
                       f"a save of step >= {2 * SAVE_EVERY} in flight")
  assert seen["final"], f"no finalised checkpoint before the killed save: {seen}"
  assert _metric_steps(workdir), "the killed run wrote no metrics; the kill came too early"
  _resume_and_compare(cli, reference, workdir, "mid-save", resume_step=seen["final"][-1])


@pytest.mark.slow
def test_sigkill_during_first_save_then_rerun_matches_uninterrupted(cli, reference, tmp_path):
  """Killed while the first checkpoint is written: nothing to resume, the rerun starts over."""
  workdir = str(tmp_path / "run")
  seen = _run_and_kill(cli, workdir, "first-save", _mid_save(SAVE_EVERY),
                       f"the save of step {SAVE_EVERY} in flight")
  assert seen["in_flight"] == [SAVE_EVERY] and not seen["final"], seen
  _resume_and_compare(cli, reference, workdir, "first-save", resume_step=0)


@pytest.mark.slow
def test_sigkill_past_a_checkpoint_then_rerun_matches_uninterrupted(cli, reference, tmp_path):
  """Killed after metrics past the newest checkpoint were written: the rerun drops them and
  recomputes them from that checkpoint."""
  workdir = str(tmp_path / "run")
  seen = _run_and_kill(cli, workdir, "past-checkpoint", _past_checkpoint,
                       "a metrics row past the newest finalised checkpoint")
  _resume_and_compare(cli, reference, workdir, "past-checkpoint", resume_step=seen["final"][-1])


def test_manifest_survives_a_kill_while_it_is_rewritten(tmp_path, monkeypatch):
  """A rerun rewrites manifest.json and later reruns parse it: a kill mid-write (simulated by
  a file write that dies halfway) must leave the previous manifest intact, not a torn one."""
  lab = types.SimpleNamespace(path=str(tmp_path / "lab"), cfg=types.SimpleNamespace(
      config_hash=lambda: "0123456789ab", name="tiny"))
  args = (lab, types.SimpleNamespace(shape={"sweep": 1}), types.SimpleNamespace(size=4))
  loop.write_manifest(str(tmp_path), *args, 0, STEPS, 1.0, "best")
  with open(tmp_path / "manifest.json") as f:
    before = f.read()
  real_open = open

  class DyingFile:
    """A file whose write stores half the text, then the process 'dies'."""
    def __init__(self, *a, **kw):
      self.f = real_open(*a, **kw)
    def __enter__(self):
      return self
    def __exit__(self, *exc):
      self.f.close()
    def write(self, text):
      self.f.write(text[:len(text) // 2])
      self.f.flush()
      raise KeyboardInterrupt("simulated SIGKILL in the middle of the manifest write")

  # Whatever writes the manifest (gpo_jax.runtime.writers.save_json_atomic), the file it
  # opens dies halfway through the write.
  monkeypatch.setattr(writers, "open", DyingFile, raising=False)
  with pytest.raises(KeyboardInterrupt):
    loop.write_manifest(str(tmp_path), *args, STEPS, STEPS, 2.0, "best")
  monkeypatch.undo()
  with open(tmp_path / "manifest.json") as f:
    after = f.read()
  assert after == before, ("a run killed while rewriting manifest.json left it torn; every "
                           "later rerun of this workdir fails to parse it")
  loop.write_manifest(str(tmp_path), *args, STEPS, STEPS, 2.0, "best")
  with open(tmp_path / "manifest.json") as f:
    segments = json.load(f)["segments"]
  assert [s["start_step"] for s in segments] == [0, STEPS], segments
