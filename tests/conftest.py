"""Shared pytest setup: float32 CPU JAX, quiet logs, one persistent XLA compilation cache per test run."""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_CREATED_CACHE = None


def pytest_configure(config):
  """Points every JAX process of the run (xdist workers and the CLI subprocesses tests start
  inherit the environment) at one compilation cache, so the many identical tiny programs
  compile once. Set before any test module imports JAX; a caller's own
  ``JAX_COMPILATION_CACHE_DIR`` is respected. Cached executables are XLA's own output, so
  results are bit-identical to compiling afresh."""
  global _CREATED_CACHE
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CREATED_CACHE = tempfile.mkdtemp(prefix="gpo_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CREATED_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
  if _CREATED_CACHE is not None and not hasattr(config, "workerinput"):
    shutil.rmtree(_CREATED_CACHE, ignore_errors=True)
