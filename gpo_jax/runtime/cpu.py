"""CPU backend settings for sweeps: how many XLA:CPU devices to expose and which compiler options to use.

On a CPU the sweep is fastest as one XLA device per core with the sweep mesh axis over
them and every device looping over its own members (``train.member_chunk``): the ops of a
small transformer are too small to split well across cores, so two independent streams
beat one stream using both cores (experiments/BENCH_SWEEP.md has the numbers). The device
count must be fixed before JAX initialises its backends, so :func:`configure_devices` is the
first thing ``gpo_jax.run.loop.run`` does.

XLA:CPU (jaxlib 0.10) hands dots, elementwise ops and reductions to YNNPACK fusions; for
this model the elementwise and reduction fusions are slower than XLA's own loops, so
:func:`compiler_options` keeps YNNPACK for dots only. The option is probed once: a jaxlib
that does not know it gets no options rather than an error.
"""

from __future__ import annotations

import functools
import logging
import os
import re

import jax
import jax.numpy as jnp

# XLA:CPU debug option -> value; values of enum-typed options are their proto names.
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


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
def _accepted_options() -> tuple[tuple[str, str], ...]:
  accepted = []
  for name, value in _CPU_OPTIONS.items():
    try:
      jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(
          jnp.zeros((), jnp.float32)).compile()
      accepted.append((name, value))
    except Exception as e:  # noqa: BLE001 - an unknown option is not an error for us
      logging.info("XLA:CPU option %s=%s not accepted by this jaxlib (%s)", name, value,
                   re.sub(r"\s+", " ", str(e))[:200])
  return tuple(accepted)


def compiler_options(platform: str | None = None) -> dict[str, str] | None:
  """``compiler_options`` for ``jax.jit`` of the sweep step on ``platform`` (default: JAX's).

  Returns None off CPU, or when this jaxlib accepts none of the options.
  """
  platform = platform or jax.default_backend()
  if platform != "cpu":
    return None
  return dict(_accepted_options()) or None
