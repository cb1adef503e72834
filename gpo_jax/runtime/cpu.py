"""CPU backend settings for sweeps: how many XLA:CPU devices to expose and which compiler options to use.

On a CPU the sweep is fastest as one XLA device per core with the sweep mesh axis over
them and every device looping over its own members (``train.member_chunk``): the ops of a
small transformer are too small to split well across cores, so two independent streams
beat one stream using both cores (experiments/BENCH_SWEEP.md has the numbers). The device
count must be fixed before JAX initialises its backends, so :func:`configure_devices` is the
first thing ``gpo_jax.run.loop.run`` does.

XLA:CPU (jaxlib 0.10) hands dots, elementwise ops and reductions to YNNPACK fusions by
default; for this model's small matrices that is not the fastest choice, and the best one
depends on the program (:func:`compiler_options`, ``program=``):

- ``"train"`` (a train step: forward, backward, optimizer): YNNPACK for dot fusions only
  (``LIBRARY_FUSION_TYPE_DOT``), the elementwise and reduction work in XLA's own loops.
- ``"forward"`` (forward passes and KV-cache decode steps of a few thousand rows outside a
  train step; used by the policy and reward-model evaluators — the proxy scorer, ICDPO and
  the lab builders still jit with JAX's defaults): each dot its own YNNPACK call
  (``LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``); fusing the dots with their neighbours made the
  prefill and the decode steps ~1.5-2× slower, a train step with individual dots ~1.2×
  slower. ``experiments/bench_eval.py`` times the evaluation and the train step under each
  program's options side by side (experiments/BENCH_EVAL.md).

The options are probed once per program: a jaxlib that does not know one gets no options
rather than an error. They change speed, and float rounding in the last bits, never the
computation.
"""

from __future__ import annotations

import functools
import logging
import os
import re

import jax
import jax.numpy as jnp

# Per kind of program: XLA:CPU debug option -> value (enum values by their proto names).
_CPU_OPTIONS = {
    "train": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "forward": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}
PROGRAMS = tuple(_CPU_OPTIONS)


def available_cores() -> int:
  """Cores this process may run on (its CPU affinity, not the machine's total)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS has no sched_getaffinity
    return os.cpu_count() or 1


def device_count_for(requested: int, num_members: int, cores: int | None = None) -> int:
  """Resolves a ``mesh.cpu_devices`` setting to a device count.

  Args:
    requested: ``0`` leaves JAX's default (returns 0); ``-1`` asks for one device per
      available core, lowered to the largest count that divides ``num_members`` (so the
      ``sweep`` mesh axis can span all of them); ``n > 0`` is taken as is.
    num_members: sweep members.
    cores: cores to plan for (default :func:`available_cores`).

  Raises:
    ValueError: for ``requested < -1`` or ``num_members < 1``.
  """
  if isinstance(requested, bool) or not isinstance(requested, int) or requested < -1:
    raise ValueError(f"mesh.cpu_devices={requested!r} must be -1 (one per core), 0 (JAX's "
                     "default) or a positive device count.")
  if num_members < 1:
    raise ValueError(f"num_members={num_members} must be >= 1.")
  if requested >= 0:
    return requested
  cores = available_cores() if cores is None else cores
  return max(d for d in range(1, max(1, cores) + 1) if num_members % d == 0)


def configure_devices(requested: int, num_members: int,
                      log=logging.info) -> int:
  """Sets ``jax_num_cpu_devices`` from a ``mesh.cpu_devices`` setting; returns the count set.

  Must run before JAX initialises a backend. If that already happened (e.g. a notebook or
  test that used JAX first) the current devices are kept and a warning logged: the device
  count changes speed only, never results. ``XLA_FLAGS=--xla_force_host_platform_device_count``
  set by the user wins over ``-1`` (it is left alone). Returns 0 when nothing was set.
  """
  n = device_count_for(requested, num_members)
  if n == 0:
    return 0
  if requested == -1 and "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return 0
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:
    have = len(jax.devices("cpu"))
    if have != n:
      log(f"warning: mesh.cpu_devices asks for {n} CPU devices but JAX's backend is already "
          f"initialised with {have}; keeping {have} (speed only, results are unaffected).")
    return 0
  return n


@functools.cache
def _accepted_options(program: str) -> tuple[tuple[str, str], ...]:
  accepted = []
  for name, value in _CPU_OPTIONS[program].items():
    try:
      jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(
          jnp.zeros((), jnp.float32)).compile()
      accepted.append((name, value))
    except Exception as e:  # noqa: BLE001 - an unknown option is not an error for us
      logging.info("XLA:CPU option %s=%s not accepted by this jaxlib (%s)", name, value,
                   re.sub(r"\s+", " ", str(e))[:200])
  return tuple(accepted)


def compiler_options(platform: str | None = None,
                     program: str = "train") -> dict[str, str] | None:
  """``compiler_options`` for ``jax.jit`` of a ``program`` on ``platform`` (default: JAX's).

  Args:
    platform: ``"cpu"``, ``"gpu"``, ``"tpu"``...; None: ``jax.default_backend()``.
    program: ``"train"`` (a train step) or ``"forward"`` (evaluation, scoring, sampling);
      see the module docstring.

  Returns None off CPU, or when this jaxlib accepts none of the program's options.

  Raises:
    ValueError: for an unknown ``program``.
  """
  if program not in _CPU_OPTIONS:
    raise ValueError(f"program={program!r} is not one of {list(PROGRAMS)}.")
  platform = platform or jax.default_backend()
  if platform != "cpu":
    return None
  return dict(_accepted_options(program)) or None
