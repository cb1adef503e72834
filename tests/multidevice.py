"""Launch test scripts in a fresh Python with N simulated CPU devices (the one XLA_FLAGS recipe)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
_TAIL = 4000


def env(devices=8, base=None):
  """os.environ (or `base`) with `devices` simulated CPU devices, the repo and tests/ importable."""
  out = dict(os.environ if base is None else base)
  # XLA:CPU aborts a collective whose simulated devices do not all arrive within 40 s; on a
  # heavily loaded 2-core machine (8 device threads) that happened to a healthy test (CI,
  # 2026-12-01), so the recipe allows 10 minutes (run_json's own timeout is 15).
  out["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=600")
  out["JAX_PLATFORMS"] = "cpu"
  out.pop("JAX_NUM_CPU_DEVICES", None)  # would fight XLA_FLAGS over the device count
  out["PYTHONPATH"] = os.pathsep.join(
      [str(REPO), str(TESTS)] + ([out["PYTHONPATH"]] if out.get("PYTHONPATH") else []))
  return out


_env = env  # run_json's `env` argument shadows the function


def _text(data):
  return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def run_json(script, *args, devices=8, timeout=900, env=None, cwd=None):
  """Runs tests/<script> (or an absolute path) with `devices` CPU devices; returns the JSON of
  its last non-empty stdout line, failing the test with the stderr tail if it fails or hangs.
  `env` is a base environment (default os.environ) that the device recipe is applied to."""
  cmd = [sys.executable, str(TESTS / script), *map(str, args)]  # an absolute script wins
  try:
    proc = subprocess.run(cmd, env=_env(devices, env), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
  except subprocess.TimeoutExpired as e:  # returncode None marks the timeout
    proc = subprocess.CompletedProcess(cmd, None, _text(e.stdout), _text(e.stderr))
  if proc.returncode != 0:
    why = (f"timed out after {timeout}s" if proc.returncode is None
           else f"exited with {proc.returncode}")
    pytest.fail(f"{' '.join(cmd)} {why}; stderr tail:\n{proc.stderr[-_TAIL:]}", pytrace=False)
  lines = [line for line in proc.stdout.splitlines() if line.strip()]
  try:
    return json.loads(lines[-1])
  except (IndexError, json.JSONDecodeError) as e:
    error = e
  pytest.fail(f"{' '.join(cmd)} did not end its stdout with a JSON line ({error}); stdout "
              f"tail:\n{proc.stdout[-_TAIL:]}\nstderr tail:\n{proc.stderr[-_TAIL:]}", pytrace=False)
