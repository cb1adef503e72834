"""Tests for gpo_jax.runtime.distributed: two real processes on localhost equal one process with 4 devices."""

import json
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from gpo_jax.runtime import distributed

import multidevice

SCRIPT = multidevice.TESTS / "distributed_subprocess.py"


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _numpy_reference():
  """Same SGD in float64 NumPy: members w (init ones) with lr 0.05 and 0.2, 5 steps."""
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(5, 8, 4)).astype(np.float32).astype(np.float64)
  ys = rng.normal(size=(5, 8)).astype(np.float32).astype(np.float64)
  w = np.ones((2, 4))
  for x, y in zip(xs, ys):
    for m, lr in enumerate((0.05, 0.2)):
      w[m] = w[m] - lr * 2 * x.T @ (x @ w[m] - y) / len(y)
  return w


def test_single_process_helpers_are_no_ops():
  assert distributed.maybe_initialize(None, None, None) is False
  assert distributed.maybe_initialize("localhost:1234", 1, 0) is False
  # A config section (as in configs/cpu_sweep.py) is accepted; enabled=False is a no-op.
  section = ml_collections.ConfigDict(dict(enabled=False, coordinator_address="localhost:1",
                                           num_processes=2, process_id=0))
  assert distributed.maybe_initialize(section) is False
  assert distributed.maybe_initialize({"coordinator_address": "", "num_processes": 1,
                                       "process_id": 0}) is False
  assert distributed.process_slice(8) == slice(0, 8)
  assert distributed.is_primary()
  distributed.barrier("nothing-to-wait-for")
  with pytest.raises(ValueError, match=r"process_id=2.*\[0, 2\)"):
    distributed.maybe_initialize("localhost:1234", 2, 2)


def test_process_slice_follows_the_sharding():
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  assert distributed.process_slice(6, sharding) == slice(0, 6)
  x = distributed.global_array(np.arange(6.0), sharding, (6,))
  np.testing.assert_array_equal(distributed.to_host(x), np.arange(6.0))


@pytest.mark.multidevice
def test_two_processes_equal_one_process(tmp_path):
  port = _free_port()
  single = subprocess.Popen([sys.executable, str(SCRIPT), "single", str(tmp_path)],
                            env=multidevice.env(4), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  multi = [subprocess.Popen([sys.executable, str(SCRIPT), "multi", str(tmp_path), str(port),
                             str(i)], env=multidevice.env(2), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  try:
    for p in [single, *multi]:
      out, _ = p.communicate(timeout=600)
      logs.append(out)
  finally:
    for p in [single, *multi]:
      if p.poll() is None:
        p.kill()
  for p, log in zip([single, *multi], logs):
    assert p.returncode == 0, log[-4000:]

  info = {m: json.loads((tmp_path / f"result_{m}.json").read_text()) for m in ("single", "multi")}
  assert info["multi"]["process_count"] == 2 and info["single"]["process_count"] == 1
  assert info["multi"]["even_rows"] == [0, 4], "process 0 must own the first half when split evenly"
  assert info["multi"]["rows"] == [0, 4], (
      "with 'data' spanning the processes, process 0 must load only the first half of a batch")
  assert info["single"]["rows"] == [0, 8]
  for m in ("single", "multi"):
    assert info[m]["restored_step"] == 3 and info[m]["restored_equal"], (
        f"{m}: checkpoint round trip through checkpoint.py changed the state")
    assert info[m]["metadata"] == {"data_index": 3} and info[m]["rng_equal"]

  w_single = np.load(tmp_path / "result_single.npz")["w"]
  w_multi = np.load(tmp_path / "result_multi.npz")["w"]
  reference = _numpy_reference()
  np.testing.assert_allclose(w_single, reference, rtol=1e-5, atol=1e-6,
                             err_msg="one-process sharded SGD disagrees with the NumPy reference")
  np.testing.assert_allclose(w_multi, w_single, rtol=1e-6, atol=1e-7,
                             err_msg="two-process run differs from the one-process run")
