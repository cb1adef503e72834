"""``jax.export`` of the sweep's programs for TPU and CUDA: nothing CPU-only may reach the accelerator path.

The run compiles where it runs; on a CPU ``engine.program.jit_train_step`` passes XLA:CPU
compiler options (``gpo_jax.runtime.cpu``) and XLA:CPU lowers some ops to library custom calls
(LAPACK, host callbacks). Exporting the real train step (jitted by ``jit_train_step`` on a CPU
mesh, CPU options included), the evaluator and the KV-cache sampler for ``("tpu",)`` and
``("cuda",)`` checks that the programs lower for the accelerators and that their StableHLO
names no custom-call target outside the partitioner's markers and no CPU option. The
programs come from ``experiments/pod_plan.py``'s ``build_programs`` on the tiny sweep's
shapes, the same builder the pod plan compiles at pod scale.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax import export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import pod_plan  # noqa: E402

from gpo_jax.core import model as model_lib  # noqa: E402
from gpo_jax.core import sampling  # noqa: E402
from gpo_jax.lab.config import LabConfig  # noqa: E402
from gpo_jax.runtime import cpu as cpu_lib  # noqa: E402
from gpo_jax.runtime import sharding  # noqa: E402

PLATFORMS = ("tpu", "cuda")
#: custom calls an accelerator program of ours may hold: the SPMD partitioner's markers
ALLOWED_TARGETS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape",
                   "annotate_device_placement", "shape_assertion"}
#: strings that only a CPU program (or CPU compiler options) would put into the module
CPU_MARKERS = ("xla_cpu", "ynn", "lapack", "cpu_callback", "ducc")


def custom_call_targets(exported) -> set[str]:
  """Custom-call targets named in an exported module's StableHLO (pretty and generic forms)."""
  text = exported.mlir_module()
  return (set(re.findall(r"custom_call\s*@([\w.$\-]+)", text))
          | set(re.findall(r'call_target_name\s*=\s*"([^"]+)"', text)))


def check_accelerator_module(exported, platform: str) -> None:
  assert exported.platforms == (platform,), (
      f"exported for {platform} but the module says {exported.platforms}")
  extra = custom_call_targets(exported) - ALLOWED_TARGETS
  assert not extra, (f"the {platform} program calls custom targets {sorted(extra)} outside "
                     f"{sorted(ALLOWED_TARGETS)}: a backend-specific kernel crept in")
  text = exported.mlir_module().lower()
  found = [m for m in CPU_MARKERS if m in text]
  assert not found, f"the {platform} program mentions CPU-only {found}"
  # The portable StableHLO bytecode is what a TPU/GPU host would compile (Exported.serialize
  # would also need the optional flatbuffers package).
  assert len(exported.mlir_module_serialized) > 0


def _tiny_config():
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "_tiny_sweep_for_export", os.path.join(REPO, "configs", "tiny_sweep.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.fixture(scope="module")
def tiny_programs():
  """The tiny sweep's train step (jitted as the run loop jits it, CPU options included) and
  evaluator on a one-device CPU mesh, with abstract arguments."""
  config = _tiny_config()
  mesh = sharding.make_mesh({"sweep": 1, "data": 1, "model": 1}, devices=jax.devices()[:1])
  progs = pod_plan.build_programs(config, "dp", 4, with_eval=True, mesh=mesh,
                                  platform_default_options=True)
  return config, progs


@pytest.mark.parametrize("platform", PLATFORMS)
def test_train_step_exports_for_accelerators_without_cpu_pieces(tiny_programs, platform):
  _, progs = tiny_programs
  fn, args = progs["train"]
  exported = export.export(fn, platforms=(platform,))(*args)
  check_accelerator_module(exported, platform)
  # state, hyperparameters, data in; state and [M] metrics out
  assert len(exported.out_avals) == len(jax.tree.leaves(args[0])) + len(
      jax.eval_shape(fn, *args)[1])


@pytest.mark.parametrize("platform", PLATFORMS)
def test_evaluator_exports_for_accelerators_without_cpu_pieces(tiny_programs, platform):
  _, progs = tiny_programs
  fn, args = progs["eval"]
  check_accelerator_module(export.export(fn, platforms=(platform,))(*args), platform)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_sampler_exports_for_accelerators_without_cpu_pieces(platform):
  lab = LabConfig.from_dict(_tiny_config().lab)
  cfg = lab.policy_config
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  t_len = lab.corpus.response_len

  @jax.jit
  def sample(p, ctx, key):
    return sampling.sample(nnx.merge(graphdef, p, rest), ctx, key, max_new_tokens=t_len)

  ctx = jax.ShapeDtypeStruct((8, lab.corpus.prompt_len + 2), jnp.int32)
  key = jax.eval_shape(lambda: jax.random.key(0))
  exported = export.export(sample, platforms=(platform,))(params, ctx, key)
  check_accelerator_module(exported, platform)
  tokens, mask = exported.out_avals
  assert tokens.shape == mask.shape == (8, t_len)


def test_accelerators_get_no_cpu_compiler_options():
  # jit_train_step asks runtime.cpu for the mesh platform's options: CPU ones only on CPU.
  for platform in ("tpu", "gpu", "cuda", "rocm"):
    assert cpu_lib.compiler_options(platform) is None, platform


def test_the_check_catches_cpu_only_programs():
  """The checks above can fail: a CPU LAPACK kernel is flagged, and a host callback does
  not export for TPU."""
  eigh = export.export(jax.jit(lambda x: jnp.linalg.eigh(x)[0]), platforms=("cpu",))(
      jax.ShapeDtypeStruct((4, 4), jnp.float32))
  assert custom_call_targets(eigh) - ALLOWED_TARGETS, (
      "eigh on CPU lowers to a LAPACK custom call; the target scan no longer sees custom calls")
  with pytest.raises(AssertionError):
    check_accelerator_module(eigh, "cpu")
  with pytest.raises(Exception):
    export.export(jax.jit(lambda x: jax.pure_callback(lambda a: a, x, x)),
                  platforms=("tpu",))(jax.ShapeDtypeStruct((3,), jnp.float32))


_HLO_PROBE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    import pod_plan
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    sh = NamedSharding(mesh, P("d"))
    def f(x):   # 5 loop iterations, each summing a [64, 32] array sharded over 8 devices
      def body(i, c):
        return c + jnp.sum(x * (i + 1.0), axis=0)
      return jax.lax.fori_loop(0, 5, body, jnp.zeros((32,), x.dtype))
    c = jax.jit(f, in_shardings=sh, out_shardings=NamedSharding(mesh, P())).lower(
        jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=sh)).compile()
    print(json.dumps(pod_plan.analyse_hlo(c.as_text(), 8)["collectives"]["all-reduce"]))
""")


def test_hlo_analysis_counts_collectives_per_loop_iteration():
  """pod_plan's HLO reader: an all-reduce inside a 5-trip loop counts 5 times, with the
  bytes of its result and its replica-group size (8 simulated devices)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("JAX_NUM_CPU_DEVICES", None)
  proc = subprocess.run([sys.executable, "-c", _HLO_PROBE, os.path.join(REPO, "experiments")],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ar = json.loads(proc.stdout.strip().splitlines()[-1])
  assert ar["count"] >= 1 and ar["group_sizes"] == [8], ar
  assert ar["count_executed"] == pytest.approx(5 * ar["count"]), ar
  assert ar["bytes_executed"] == pytest.approx(5 * 32 * 4 * ar["count"]), ar
  assert ar["wire_bytes_executed"] == pytest.approx(2 * 7 / 8 * ar["bytes_executed"]), ar


@pytest.mark.slow
def test_pod_plan_quick_mode(tmp_path):
  """``experiments/pod_plan.py --quick`` (64 simulated devices, 64 members; 86 s on a
  2-core machine at load ~4, 162 s at load ~8: over the default suite's budget) writes a report and JSON with memory, cost, collectives and estimates per preset."""
  proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "pod_plan.py"),
                         "--quick", "--presets", "dp,fsdp,fsdp_tp", "--out", str(tmp_path)],
                        cwd=REPO, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "pod_plan.json").read_text())
  assert {c["preset"] for c in result["cases"]} == {"dp", "fsdp", "fsdp_tp"}
  for c in result["cases"]:
    assert c["devices"] == 64 and c["members"] == 64
    for kind in ("train", "eval"):
      p = c["programs"][kind]
      assert p["memory"]["argument_bytes"] > 0 and p["xla_cost"]["flops"] > 0
      assert p["hlo"]["dot_flops_executed"] > 0
    for chip in pod_plan.HARDWARE:
      assert c["estimates"][chip]["train"]["policy_updates_per_s"] > 0
  assert "estimate" in (tmp_path / "POD_PLAN.md").read_text()


def test_pod_plan_counts_the_gold_as_the_evaluator_runs_it():
  """The roofline's ideal gold FLOPs per response (last block at the read position only)
  agree with bench_eval's formula, which tests/test_bench_eval.py checks against XLA."""
  import bench_eval
  config = _tiny_config()
  lab = LabConfig.from_dict(config.lab)
  c, t = lab.corpus.prompt_len + 2, lab.corpus.response_len
  n = (config.eval.n_prompts or lab.n_eval_prompts) * config.eval.samples_per_prompt
  got = pod_plan.analytic_flops(config, 1)["eval_parts_per_member"]["gold (responses)"] / n
  want = bench_eval.gold_response_flops(lab.gold_config, c, t)
  full = t * bench_eval.gold_flops_per_token(lab.gold_config, c + t // 2)
  assert got == pytest.approx(want, rel=0.05), (got, want)
  assert got < 0.95 * full
