"""Tests for gpo_jax.runtime.writers: JSONL rows, resume truncation, and TensorBoard event files read without TF."""

import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from gpo_jax.runtime import writers


def _crc32c(data: bytes) -> int:
  """Bitwise CRC-32C (Castagnoli), independent of tensorboardX's table implementation."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(tb_dir):
  """Parses TFRecord-framed Event protos from every event file, checking both CRCs."""
  events = []
  files = sorted(tb_dir.rglob("events.out.tfevents.*"))
  assert files, f"no event files under {tb_dir}"
  for path in files:
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (length,) = struct.unpack("<Q", header)
      (len_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
      assert len_crc == _masked(_crc32c(header)), f"bad length CRC in {path}"
      payload = data[pos + 12:pos + 12 + length]
      (data_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
      assert data_crc == _masked(_crc32c(payload)), f"bad data CRC in {path}"
      event = event_pb2.Event()
      event.ParseFromString(payload)
      events.append(event)
      pos += 16 + length
  return events


def _scalars(events):
  out = {}
  for e in events:
    for v in e.summary.value:
      out.setdefault(v.tag, []).append((e.step, v.simple_value))
  return out


def _rows(steps, members=2):
  return [{"step": s, "member": m, "family": "logistic", "beta": np.float32(0.1),
           "gold/reward": jnp.asarray(0.5 * s + m), "kl": np.float64(s / 10), "diverged": False}
          for s in steps for m in range(members)]


def test_rows_are_plain_json_and_flushed_immediately(tmp_path):
  with writers.MetricsWriter(tmp_path, tensorboard=False) as w:
    w.write(_rows([0]))
    # Readable before close: a crash right now must not lose the row.
    rows = writers.read_jsonl(tmp_path / "metrics.jsonl")
    assert len(rows) == 2
    assert rows[1] == {"step": 0, "member": 1, "family": "logistic",
                       "beta": pytest.approx(0.1, rel=1e-6), "gold/reward": 1.0, "kl": 0.0,
                       "diverged": False}
    assert type(rows[1]["gold/reward"]) is float and type(rows[1]["diverged"]) is bool


def test_resume_drops_later_rows_without_duplicates(tmp_path):
  with writers.MetricsWriter(tmp_path, tensorboard=False) as w:
    w.write(_rows(range(6)))
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "member": 0, "kl": 0.')  # torn by a crash mid-write
  with writers.MetricsWriter(tmp_path, resume_step=3, tensorboard=False) as w:
    kept = writers.read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["member"]) for r in kept] == [(s, m) for s in range(4) for m in range(2)]
    w.write(_rows(range(4, 8)))
  rows = writers.read_jsonl(tmp_path / "metrics.jsonl")
  keys = [(r["step"], r["member"]) for r in rows]
  assert len(keys) == len(set(keys)), "resume produced duplicate (step, member) rows"
  assert sorted(keys) == [(s, m) for s in range(8) for m in range(2)], "rows were lost"
  assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_fresh_run_keeps_old_rows_in_a_backup(tmp_path):
  with writers.MetricsWriter(tmp_path, tensorboard=False) as w:
    w.write(_rows([0, 1]))
  with writers.MetricsWriter(tmp_path, tensorboard=False) as w:
    w.write(_rows([0]))
  assert len(writers.read_jsonl(tmp_path / "metrics.jsonl")) == 2
  assert len(writers.read_jsonl(tmp_path / "metrics.jsonl.bak0")) == 4


def test_tensorboard_events_readable_with_one_tag_per_member(tmp_path):
  with writers.MetricsWriter(tmp_path) as w:
    w.write(_rows(range(3), members=4))
  scalars = _scalars(read_events(tmp_path / "tb"))
  assert "member_003/gold/reward" in scalars and "member_000/kl" in scalars
  assert scalars["member_003/gold/reward"] == [(s, pytest.approx(0.5 * s + 3)) for s in range(3)]
  assert scalars["member_001/diverged"] == [(s, 0.0) for s in range(3)]
  assert not any(t.endswith(("/family", "/step", "/member")) for t in scalars), (
      "identifier fields must not become TensorBoard scalars")


def test_resume_tells_tensorboard_to_purge_later_steps(tmp_path):
  with writers.MetricsWriter(tmp_path) as w:
    w.write(_rows(range(5), members=1))
  with writers.MetricsWriter(tmp_path, resume_step=2) as w:
    w.write(_rows([3], members=1))
  events = read_events(tmp_path / "tb")
  # TensorBoard drops earlier events with step >= a SessionLog.START's step.
  starts = [e.step for e in events if e.HasField("session_log")
            and e.session_log.status == event_pb2.SessionLog.START]
  assert starts == [3]


def test_non_writer_process_writes_nothing(tmp_path):
  w = writers.MetricsWriter(tmp_path / "run", is_writer=False)
  w.write(_rows([0]))
  w.close()
  assert not (tmp_path / "run").exists()


def test_row_without_integer_step_raises(tmp_path):
  with writers.MetricsWriter(tmp_path, tensorboard=False) as w:
    with pytest.raises(ValueError, match="integer 'step'"):
      w.write({"member": 0, "kl": 1.0})
    with pytest.raises(ValueError, match="integer 'step'"):
      w.write({"step": 1.5})


def test_non_finite_values_round_trip():
  row = {"step": 1, "kl": float("nan"), "loss": float("inf")}
  back = json.loads(json.dumps({k: writers.to_python(v) for k, v in row.items()}))
  assert np.isnan(back["kl"]) and back["loss"] == float("inf")


def test_train_metrics_go_to_tensorboard_per_member_and_step(tmp_path):
  with writers.MetricsWriter(tmp_path) as w:
    for step in (1, 2, 3):
      w.write_train(step, {"loss": np.array([0.5 * step, np.nan, 2.0 + step]),
                           "diverged": np.array([False, True, False])})
  scalars = _scalars(read_events(tmp_path / "tb"))
  assert scalars["member_000/train/loss"] == [(s, pytest.approx(0.5 * s)) for s in (1, 2, 3)]
  assert scalars["member_002/train/loss"] == [(s, pytest.approx(2.0 + s)) for s in (1, 2, 3)]
  assert "member_001/train/loss" not in scalars, "non-finite values must be skipped"
  assert scalars["member_001/train/diverged"] == [(s, 1.0) for s in (1, 2, 3)]
  assert writers.read_jsonl(tmp_path / "metrics.jsonl") == [], "train metrics are TB-only"
  with writers.MetricsWriter(tmp_path / "b") as bad, pytest.raises(ValueError, match="integer step"):
    bad.write_train(1.5, {"loss": np.zeros(2)})


def test_save_json_atomic_replaces_whole_files_and_keeps_the_old_one_on_failure(tmp_path):
  path = tmp_path / "manifest.json"
  assert writers.save_json_atomic(path, {"b": 1, "a": [1.5]}, indent=1, sort_keys=True) == str(path)
  assert path.read_text() == json.dumps({"a": [1.5], "b": 1}, indent=1, sort_keys=True)
  writers.save_text_atomic(path, "{\"a\": 2}")
  assert json.loads(path.read_text()) == {"a": 2}
  with pytest.raises(TypeError):
    writers.save_json_atomic(path, {"a": object()})   # not serialisable: nothing is written
  assert json.loads(path.read_text()) == {"a": 2}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_atomic_writes_leave_no_temporary_file_when_they_fail(tmp_path, monkeypatch):
  """A write that fails mid-way (the disk, a rename onto a directory) raises, keeps the old
  file, and removes its temporary file; two writers of one path each use their own."""
  path = tmp_path / "per_prompt.npz"
  writers.save_npz_atomic(path, {"x": np.arange(3)})
  real_savez = np.savez

  def dies(f, **arrays):
    real_savez(f, **arrays)
    raise OSError("disk full")

  monkeypatch.setattr(writers.np, "savez", dies)
  with pytest.raises(OSError, match="disk full"):
    writers.save_npz_atomic(path, {"x": np.arange(5)})
  monkeypatch.undo()
  np.testing.assert_array_equal(np.load(path)["x"], np.arange(3))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["per_prompt.npz"]
  (tmp_path / "dir.json").mkdir()
  with pytest.raises(OSError):
    writers.save_json_atomic(tmp_path / "dir.json", {"a": 1})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.json", "per_prompt.npz"]
  # Another process mid-write of the same path: its temporary file is not touched.
  names = []
  real_replace = writers.os.replace

  def spy(src, dst):
    names.append(os.path.basename(src))
    return real_replace(src, dst)

  monkeypatch.setattr(writers.os, "replace", spy)
  for _ in range(2):
    writers.save_json_atomic(tmp_path / "m.json", {"a": 1})
  monkeypatch.undo()
  assert len(set(names)) == 2 and all(n.startswith("m.json.tmp-") for n in names), names
  assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.json", "m.json", "per_prompt.npz"]
