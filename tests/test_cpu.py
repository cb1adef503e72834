"""Tests of the CPU backend settings: device count per core and the XLA:CPU compiler options."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpo_jax.runtime import cpu


@pytest.mark.parametrize("requested, members, cores, want", [
    (0, 36, 2, 0),      # JAX's default
    (3, 36, 2, 3),      # explicit counts are taken as given
    (-1, 36, 2, 2),     # one per core
    (-1, 36, 16, 12),   # 16 does not divide 36: the largest divisor below 16
    (-1, 7, 4, 1),      # a prime member count cannot be split
    (-1, 1, 8, 1),
])
def test_device_count_for_one_per_core_divides_the_members(requested, members, cores, want):
  got = cpu.device_count_for(requested, members, cores=cores)
  assert got == want
  if requested == -1:
    assert members % got == 0 and got <= cores


@pytest.mark.parametrize("bad", [-2, 1.5, True])
def test_device_count_for_names_bad_settings(bad):
  with pytest.raises(ValueError, match="mesh.cpu_devices"):
    cpu.device_count_for(bad, 4)


def test_configure_devices_in_a_fresh_process_sets_the_count():
  # JAX fixes its device count when the backend starts, so this needs its own process.
  code = ("from gpo_jax.runtime import cpu; import jax; n = cpu.configure_devices(3, 6); "
          "print(n, len(jax.devices()))")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["3", "3"], out.stdout


def test_configure_devices_after_backend_start_keeps_devices_and_warns():
  jax.devices()  # the backend is up
  logged = []
  have = len(jax.devices("cpu"))
  assert cpu.configure_devices(have + 1, have + 1, log=logged.append) == 0
  assert len(jax.devices("cpu")) == have
  assert logged and f"keeping {have}" in logged[0]


def _ynn_bodies(hlo: str) -> list[set[str]]:
  """The HLO opcodes inside each fused computation that a YNNPACK fusion calls."""
  called = set(re.findall(r"ynn_fusion[.\d]* = .*?calls=%([\w.\-]+)", hlo))
  ops, current = {c: set() for c in called}, None
  for line in hlo.splitlines():
    head = re.match(r"^%(\S+) ", line)
    if head or line.startswith(("ENTRY", "}")):
      current = head.group(1) if head else None
    elif current in called:
      m = re.match(r"\s*(?:ROOT )?%\S+ = \S+ ([a-z\-]+)\(", line)
      if m and m.group(1) not in ("parameter", "bitcast", "constant", "broadcast"):
        ops[current].add(m.group(1))
  return list(ops.values())


def test_compiler_options_keep_ynnpack_for_dots_only():
  opts = cpu.compiler_options("cpu")
  assert opts == cpu.compiler_options("cpu", "train")
  for program in cpu.PROGRAMS:
    assert cpu.compiler_options("gpu", program) is None
    assert cpu.compiler_options("tpu", program) is None
  if opts is None:
    pytest.skip("this jaxlib accepts none of the XLA:CPU options (nothing to check)")

  def norm_then_dot(x, w):
    # An RMS-norm-like reduction and elementwise work that no dot consumes, then a dot.
    r = jnp.mean(jnp.square(jnp.tanh(x)), axis=-1)
    return r, (x * 2.0) @ w

  args = (jnp.ones((512, 64)), jnp.ones((64, 256)))
  default = _ynn_bodies(jax.jit(norm_then_dot).lower(*args).compile().as_text())
  tuned = _ynn_bodies(jax.jit(norm_then_dot, compiler_options=opts).lower(*args)
                      .compile().as_text())
  assert any("dot" in ops for ops in default), f"expected a YNNPACK dot by default: {default}"
  if all("dot" in ops for ops in default):
    pytest.skip("this jaxlib already keeps elementwise work out of YNNPACK by default")
  assert tuned and all("dot" in ops for ops in tuned), (
      f"with the options every YNNPACK fusion should be a dot fusion, got {tuned}")
  got = jax.jit(norm_then_dot, compiler_options=opts)(*args)
  want = jax.jit(norm_then_dot)(*args)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_forward_programs_keep_each_dot_alone():
  """The forward programs' options: every YNNPACK call is one dot, nothing fused with it
  (the train options fuse the GELU between the two dots of an MLP into a dot fusion)."""
  opts = cpu.compiler_options("cpu", "forward")
  if opts is None:
    pytest.skip("this jaxlib accepts none of the XLA:CPU options (nothing to check)")

  def mlp(x, w_up, w_down):
    return jax.nn.gelu((x * 2.0) @ w_up) @ w_down

  key = jax.random.key(0)
  args = (jax.random.normal(key, (512, 64)), jnp.full((64, 256), 0.01),
          jnp.full((256, 64), 0.02))
  bodies = _ynn_bodies(jax.jit(mlp, compiler_options=opts).lower(*args).compile().as_text())
  assert len(bodies) == 2 and all(ops == {"dot"} for ops in bodies), bodies
  train = _ynn_bodies(jax.jit(mlp, compiler_options=cpu.compiler_options("cpu", "train"))
                      .lower(*args).compile().as_text())
  assert any(ops - {"dot"} for ops in train), (
      f"expected the train options to fuse elementwise work with a dot here: {train}")
  np.testing.assert_allclose(jax.jit(mlp, compiler_options=opts)(*args),
                             jax.jit(mlp)(*args), rtol=1e-5, atol=1e-6)


def test_compiler_options_name_the_programs_on_a_bad_one():
  with pytest.raises(ValueError, match=r"program='eval'.*'train', 'forward'"):
    cpu.compiler_options("cpu", "eval")
