"""The whole tiny sweep run as two real processes on localhost writes the same metrics as one process."""

import json
import os
import socket
import subprocess
import sys

import pytest

import lab_fixture
import multidevice

REPO = str(multidevice.REPO)
_RTOL = 1e-5


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cmd(workdir, lab_root, extra=()):
  return [sys.executable, "-m", "gpo_jax.main", "--config", "configs/tiny_sweep.py",
          f"--config.lab_root={lab_root}", "--config.mesh.sweep=2", "--workdir", str(workdir),
          *extra]


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _close(a, b):
  if isinstance(a, float) and isinstance(b, float):
    return a == b or abs(a - b) <= _RTOL * max(abs(a), abs(b)) + 1e-7
  return a == b


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_process_sweep_equals_one_process(tmp_path):
  # Built before any process starts, so the two processes never race to build it.
  lab_root = str(tmp_path / "labs")
  lab_fixture.get_tiny_lab(lab_root)
  single = tmp_path / "single"
  multi = tmp_path / "multi"
  port = _free_port()
  procs = [subprocess.Popen(_cmd(single, lab_root), cwd=REPO, env=multidevice.env(2),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
  procs += [subprocess.Popen(
      _cmd(multi, lab_root, ["--config.distributed.enabled=True",
                             f"--config.distributed.coordinator_address=localhost:{port}",
                             "--config.distributed.num_processes=2",
                             f"--config.distributed.process_id={i}"]),
      cwd=REPO, env=multidevice.env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=900)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()  # JAX traps SIGTERM in distributed runs; only SIGKILL ends a hung process
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]

  a, b = _rows(single), _rows(multi)
  assert len(a) == len(b) > 0, f"{len(a)} rows from one process, {len(b)} from two"
  for ra, rb in zip(a, b):
    assert ra.keys() == rb.keys()
    bad = {k: (ra[k], rb[k]) for k in ra if not _close(ra[k], rb[k])}
    assert not bad, f"step {ra['step']} member {ra['member']}: two processes differ: {bad}"
  manifest = json.load(open(multi / "manifest.json"))
  assert manifest["devices"]["processes"] == 2 and manifest["devices"]["count"] == 2
  assert json.load(open(single / "bon.json")) == json.load(open(multi / "bon.json"))
