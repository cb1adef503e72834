"""Nothing lost, nothing silently wrong: each test reproduces a fault that once lost data or misled (issue 10), then checks the fix."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import lab_fixture
from gpo_jax import lab as lab_lib
from gpo_jax.lab import store as lab_store
from gpo_jax.run import guard
from gpo_jax.run import loop
from gpo_jax.runtime import checkpoint as ckpt_lib
from gpo_jax.runtime import writers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(lab_root, **overrides):
  c = lab_fixture.load_config("tiny_sweep.py")
  c.unlock()
  c.lab_root = lab_root
  for path, value in overrides.items():
    node = c
    *parents, key = path.split(".")
    for p in parents:
      node = node[p]
    node[key] = value
  c.lock()
  return c


def _run(config, workdir, **kw):
  return loop.run(config, str(workdir), log=lambda *_: None, progress=False, **kw)


def _rows(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def lab_root(tmp_path_factory):
  root = lab_fixture.shared_root(tmp_path_factory)
  lab_fixture.get_tiny_lab(root)
  return root


@pytest.fixture(scope="module")
def reference_rows(lab_root, tmp_path_factory):
  """metrics.jsonl of an uninterrupted tiny sweep (the ground truth for resumes)."""
  workdir = tmp_path_factory.mktemp("ref") / "run"
  _run(_tiny(lab_root), workdir)
  return _rows(workdir)


# ------------------------------------------------------------------ 1. one run per workdir

def test_a_second_run_on_a_locked_workdir_fails_before_writing(lab_root, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  with guard.workdir_lock(str(workdir)):
    with pytest.raises(guard.WorkdirInUseError, match=r"in use by another run \(pid \d+"):
      _run(_tiny(lab_root), workdir)
  assert sorted(os.listdir(workdir)) == [guard.LOCK_FILE], (
      f"the refused run wrote {sorted(os.listdir(workdir))}")


# ------------------------------------------------------------------ 2 + 4. checkpoints

def _state(v):
  return {"w": jnp.full((4, 3), v, jnp.float32), "step": jnp.asarray(int(v), jnp.int32)}


def test_corrupt_step_is_quarantined_resaved_and_never_holds_a_keep_slot(tmp_path):
  d = tmp_path / "ck"
  ck = ckpt_lib.Checkpointer(d, keep=2, async_save=False)
  for s in (1, 2):
    ck.save(s, _state(s), metadata={"data_position": s})
  ck.close()
  state_dir = d / "2" / "state"
  victim = max((p for p in state_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  victim.write_bytes(b"\0" * victim.stat().st_size)            # damage step 2
  ck = ckpt_lib.Checkpointer(d, keep=2, async_save=False)
  restored = ck.restore(_state(0))
  assert restored.step == 1 and float(restored.state["w"][0, 0]) == 1.0
  assert ck.all_steps() == [1], "the damaged step must leave the checkpoint directory"
  kept = os.listdir(str(d) + ".corrupt")
  assert len(kept) == 1 and kept[0].startswith("2-"), kept
  assert ck.save(2, _state(2), metadata={"data_position": 2}), "step 2 must be saved afresh"
  ck.save(3, _state(3), metadata={"data_position": 3})
  ck.close()
  ck = ckpt_lib.Checkpointer(d, keep=2, async_save=False)
  assert ck.all_steps() == [2, 3]
  assert ck.restore(_state(0)).step == 3
  ck.close()


def test_changed_metadata_digit_is_a_corrupt_step(tmp_path):
  d = tmp_path / "ck"
  ck = ckpt_lib.Checkpointer(d, keep=3, async_save=False)
  for s in (1, 2):
    ck.save(s, _state(s), metadata={"data_position": s, "last_train": {"loss": [0.6931]}})
  ck.close()
  meta_files = [p for p in (d / "2" / "meta").rglob("*") if p.is_file()]
  assert meta_files, "no metadata file found to damage"
  for p in meta_files:
    text = p.read_text()
    if "0.6931" in text:
      p.write_text(text.replace("0.6931", "0.6932"))
      break
  else:
    pytest.fail(f"the stored loss is not in {meta_files}")
  ck = ckpt_lib.Checkpointer(d, keep=3, async_save=False)
  restored = ck.restore(_state(0))
  assert restored.step == 1, "a checkpoint whose metadata changed must not be restored"
  ck.close()


def test_data_position_mismatch_falls_back_instead_of_stopping(tmp_path):
  d = tmp_path / "ck"
  ck = ckpt_lib.Checkpointer(d, keep=3, async_save=False)
  ck.save(1, _state(1), metadata={"data_position": 1})
  ck.save(2, _state(2), metadata={"data_position": 7})       # inconsistent, digest intact
  ck.close()
  ck = ckpt_lib.Checkpointer(d, keep=3, async_save=False)
  restored = ck.restore(_state(0), validate=loop.check_data_position)
  assert restored.step == 1 and ck.all_steps() == [1]
  ck.close()


# ------------------------------------------------------------------ 3. metrics file

def test_deleted_or_replaced_metrics_file_is_restored_mid_run(tmp_path):
  logs = []
  w = writers.MetricsWriter(tmp_path, tensorboard=False, log=logs.append)
  w.write([{"step": 0, "member": 0, "x": 1.0}, {"step": 0, "member": 1, "x": 2.0}])
  os.remove(w.path)                                   # deleted while the run writes
  w.write({"step": 3, "member": 0, "x": 3.0})
  assert [r["step"] for r in writers.read_jsonl(w.path)] == [0, 0, 3]
  assert any("was deleted" in m for m in logs), logs
  with open(str(w.path) + ".other", "w") as f:
    f.write('{"step": 99}\n')
  os.replace(str(w.path) + ".other", w.path)           # replaced while the run writes
  w.write({"step": 6, "member": 0, "x": 4.0})
  w.close()
  assert [r["step"] for r in writers.read_jsonl(w.path)] == [0, 0, 3, 6]
  assert [r["step"] for r in writers.read_jsonl(str(w.path) + ".replaced0")] == [99]
  assert any("replaced by another file" in m for m in logs), logs


def test_resume_reports_eval_steps_missing_from_the_metrics_file(lab_root, tmp_path):
  workdir = tmp_path / "run"
  _run(_tiny(lab_root), workdir, stop_at=4)          # rows for steps 0 and 3, checkpoint at 4
  rows = [r for r in _rows(workdir) if r["step"] != 0]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  logs = []
  loop.run(_tiny(lab_root), str(workdir), log=logs.append, progress=False)
  assert any("lacks rows of eval steps [0]" in m for m in logs), logs
  manifest = json.load(open(workdir / "manifest.json"))
  assert manifest["segments"][-1]["missing_eval_steps"] == [0]


def test_torn_line_repair_says_what_it_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 0, "member": 0}\n{"step": 5, "member": 0}\n{"step": 6, "mem')
  logs = []
  assert writers.truncate_jsonl(path, 3, log=logs.append) == 2
  assert logs and "dropped 1 rows after step 3" in logs[0] and "1 torn lines (lines [3]" in logs[0]


# ------------------------------------------------------------------ 5. provenance

def test_lab_json_gold_constants_are_covered_by_its_checksum(lab_root, tmp_path):
  lab = lab_fixture.get_tiny_lab(lab_root)
  copy = tmp_path / os.path.basename(lab.path)
  shutil.copytree(lab.path, copy)
  meta = json.load(open(copy / "lab.json"))
  assert lab_store.META_DIGEST in meta
  meta["gold_std"] *= 2.0
  (copy / "lab.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
  with pytest.raises(lab_lib.LabCorruptError, match="does not match its own SHA-256"):
    lab_lib.load_lab(str(copy))


def test_checkpoint_remembers_its_config_when_config_json_is_gone(lab_root, tmp_path):
  workdir = tmp_path / "run"
  _run(_tiny(lab_root), workdir, stop_at=4)
  os.remove(workdir / "config.json")
  with pytest.raises(guard.ConfigMismatchError, match=r"checkpoint step 4 .*sweep\.lrs: "
                                                      r"\[0\.0003\] -> \[0\.001\]"):
    _run(_tiny(lab_root, **{"sweep.lrs": (1e-3,)}), workdir)


# ------------------------------------------------------------------ 7. damaged files

def test_damaged_config_json_names_the_file(lab_root, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text('{"sweep": ')
  with pytest.raises(guard.RunError, match=r"config.json is damaged .*new --workdir"):
    _run(_tiny(lab_root), workdir)


def test_damaged_manifest_is_kept_aside_not_fatal(lab_root, tmp_path, reference_rows):
  workdir = tmp_path / "run"
  _run(_tiny(lab_root), workdir, stop_at=4)
  (workdir / "manifest.json").write_text("{torn")
  _run(_tiny(lab_root), workdir)
  assert json.load(open(workdir / "manifest.json"))["steps"] == 6
  assert any(n.startswith("manifest.json.damaged-") for n in os.listdir(workdir))
  assert _rows(workdir) == reference_rows


# ------------------------------------------------------------------ 10. bad input

def test_empty_workdir_and_oversized_bon_n_and_ignored_config_arg_fail(lab_root, tmp_path):
  with pytest.raises(guard.RunError, match="--workdir is empty"):
    loop.run(_tiny(lab_root), "", log=lambda *_: None)
  with pytest.raises(ValueError, match=r"eval.bon_n has \[16\], larger than the π_ref pool"):
    _run(_tiny(lab_root, **{"eval.bon_n": (1, 16)}), tmp_path / "r2")
  with pytest.raises(ValueError, match="takes no argument, got 'small'"):
    lab_fixture.load_config("tiny_sweep.py", "small")


def test_cli_prints_one_line_for_an_expected_error(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "gpo_jax.main", "--config", "configs/tiny_sweep.py",
       "--config.sweep.families=('logistic', 'hingee')", f"--workdir={tmp_path / 'run'}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error: ValueError: Unknown GPO function 'hingee'" in proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


# ------------------------------------------------------------------ 11. SIGTERM

def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes_exactly(lab_root, tmp_path,
                                                                  reference_rows, monkeypatch):
  workdir = tmp_path / "run"
  real = loop.eval_rows

  def eval_then_signal(*args, **kwargs):
    rows = real(*args, **kwargs)
    if args[4] == 3:                       # the scheduler's SIGTERM arrives at step 3
      signal.raise_signal(signal.SIGTERM)
    return rows

  monkeypatch.setattr(loop, "eval_rows", eval_then_signal)
  with pytest.raises(guard.RunInterrupted, match=r"stopped by SIGTERM after step 4 of 6: "
                                                 r"checkpoint saved"):
    _run(_tiny(lab_root), workdir)
  monkeypatch.undo()
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "the handler must be restored"
  ck = ckpt_lib.Checkpointer(workdir / "checkpoints")
  assert ck.latest_step() == 4
  ck.close()
  _run(_tiny(lab_root), workdir)
  assert _rows(workdir) == reference_rows, "the resumed run differs from an uninterrupted one"


# ------------------------------------------------------------------ 12. layout changes

def test_resume_allows_layout_changes_and_names_result_changes(lab_root, tmp_path,
                                                              reference_rows):
  workdir = tmp_path / "run"
  _run(_tiny(lab_root), workdir, stop_at=4)
  with pytest.raises(guard.ConfigMismatchError, match=r"train\.warmup_steps: 0 -> 5"):
    _run(_tiny(lab_root, **{"train.warmup_steps": 5}), workdir)
  logs = []
  loop.run(_tiny(lab_root, **{"train.member_chunk": 0, "eval.member_chunk": 2}), str(workdir),
           log=logs.append, progress=False)
  assert any("changed layout keys ['eval.member_chunk', 'train.member_chunk']" in m
             for m in logs), logs
  got, want = _rows(workdir), reference_rows
  assert [(r["step"], r["member"]) for r in got] == [(r["step"], r["member"]) for r in want]
  for a, b in zip(got, want):   # another member layout: equal up to float reassociation
    np.testing.assert_allclose(a["kl"], b["kl"], rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------ 13. read-only labs

def test_complete_lab_is_loaded_without_taking_the_build_lock(lab_root, tmp_path):
  lab = lab_fixture.get_tiny_lab(lab_root)
  root = tmp_path / "labs"
  shutil.copytree(lab.path, root / os.path.basename(lab.path))
  got = lab_lib.build_or_load(lab_fixture.tiny_config(), str(root), log=lambda *_: None)
  assert got.path == str(root / os.path.basename(lab.path))
  assert not any(n.endswith(".lock") for n in os.listdir(root)), (
      "loading a complete lab must not write a lock file (read-only lab storage)")


# ------------------------------------------------------------------ 8. disk full

def test_disk_full_is_one_clear_error_before_orbax_writes(lab_root, tmp_path):
  """A checkpoint directory on a 700 KiB filesystem: the run stops with one message that
  says "disk full", names the directory and the resume step, instead of orbax's threads
  printing hundreds of event-loop errors (reproduced on a tmpfs of this size)."""
  mnt = tmp_path / "small"
  mnt.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mnt)],
                           capture_output=True).returncode == 0
  if not mounted:
    pytest.skip("needs permission to mount a small tmpfs")
  try:
    with pytest.raises(guard.DiskFullError, match=r"disk full: checkpoint step 2 needs about "
                                                  r"[\d.]+ MiB but .*small/run/checkpoints has "
                                                  r"[\d.]+ MiB free.*resumes exactly from step 0"):
      _run(_tiny(lab_root), mnt / "run")
  finally:
    subprocess.run(["umount", str(mnt)], capture_output=True)
  assert not os.path.ismount(mnt)


def test_cli_config_argument_and_literal_errors_are_one_line_too(tmp_path):
  for extra in (["--config", "configs/tiny_sweep.py:foo"],
                ["--config", "configs/tiny_sweep.py", "--config.sweep.betas=(nan, 1.0)"]):
    proc = subprocess.run([sys.executable, "-m", "gpo_jax.main", *extra,
                           f"--workdir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (extra, proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
