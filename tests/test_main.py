"""Tests of the sweep entry point: config validation, end-to-end outputs on the tiny lab, bitwise kill-and-resume."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import lab_fixture
from gpo_jax.runtime import checkpoint as ckpt_lib
from gpo_jax.run import config as config_lib
from gpo_jax.run import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = (
    "step member family beta beta_eff lr seed gamma label_temp data_size kl kl_se kl_k1 "
    "kl_k1_se kl_k3 kl_k3_se sqrt_kl n_samples gold/reward gold/reward_se gold/win_rate "
    "gold/win_rate_se entropy rewards/chosen rewards/rejected rewards/margins "
    "rewards/accuracies rho/mean offline_reg loss grad_norm diverged").split()


def _config(name="tiny_sweep.py", arg=None):
  return lab_fixture.load_config(name, arg)


def _run(config, workdir, **kw):
  return loop.run(config, str(workdir), log=lambda *_: None, progress=False, **kw)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize("field, value, pattern", [
    ("sweep.families", ("logistic", "hingee"), "hingee"),
    ("sweep.betas.squared", (0.1, -2.0), "-2.0"),
    ("mesh.data", 3, "use 3 devices, which does not divide the 1 available"),
    ("mesh.sweep", 3, "has 3 devices"),
    ("train.member_chunk", -1, "train.member_chunk=-1"),
    ("mesh.cpu_devices", -2, "mesh.cpu_devices=-2"),
    ("train.steps", -1, "train.steps=-1"),
    ("eval.n_prompts", 10_000, "10000"),
    ("mesh.preset", "fsdpp", "fsdpp"),
])
def test_bad_configs_fail_before_training_naming_the_value(tmp_path, field, value, pattern):
  config = _config()
  config.unlock()
  *parents, key = field.split(".")
  node = config
  for name in parents:
    node = node[name]
  node[key] = value
  config.lab_root = str(tmp_path / "labs")
  with pytest.raises(ValueError, match=pattern):
    _run(config, tmp_path / "run")
  assert not os.path.exists(tmp_path / "labs"), "validation must fail before the lab is built"
  assert not os.path.exists(tmp_path / "run" / "checkpoints"), "no training may start"


def test_batch_not_divisible_by_data_axis_is_rejected():
  config = _config()
  config.unlock()
  config.mesh.data = 2
  config.train.batch_size = 7
  with pytest.raises(ValueError, match="Batch size 7"):
    config_lib.validate(config, num_devices=2)


def test_cli_rejects_misspelt_override(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "gpo_jax.main", "--config", "configs/tiny_sweep.py",
       "--config.train.stpes=3", "--workdir", str(tmp_path / "run")],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "stpes" in proc.stderr, (
      "a misspelt override of the locked config must fail, naming the key:\n" + proc.stderr[-2000:])


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
  config = _config()
  config.unlock()
  config.lab_root = lab_fixture.shared_root(tmp_path_factory)
  config.lock()
  return config


@pytest.fixture(scope="module")
def full_run(tiny_config, tmp_path_factory):
  return _run(tiny_config, tmp_path_factory.mktemp("full") / "run")


def test_end_to_end_tiny_sweep_writes_all_outputs(full_run, tiny_config):
  for name in ("config.json", "metrics.jsonl", "manifest.json", "bon.json"):
    assert os.path.isfile(os.path.join(full_run, name)), f"{name} missing from the run dir"
  assert any(f.startswith("events") for f in os.listdir(os.path.join(full_run, "tb")))
  from test_writers import _scalars, read_events
  scalars = _scalars(read_events(pathlib.Path(full_run) / "tb"))
  for m in range(4):
    assert [s for s, _ in scalars[f"member_{m:03d}/train/loss"]] == list(
        range(1, tiny_config.train.steps + 1)), "every train step's loss must reach TensorBoard"
  steps, every = tiny_config.train.steps, tiny_config.eval.every
  assert ckpt_lib.Checkpointer(os.path.join(full_run, "checkpoints")).latest_step() == steps
  rows = _rows(full_run)
  n_members = 4
  eval_steps = sorted({r["step"] for r in rows})
  assert eval_steps == list(range(0, steps + 1, every)), eval_steps
  assert len(rows) == n_members * len(eval_steps)
  for r in rows:
    missing = [k for k in ROW_KEYS if k not in r]
    assert not missing, f"metrics row lacks {missing}"
  first = [r for r in rows if r["step"] == 0]
  assert all(r["kl"] == 0.0 and r["kl_k1"] == 0.0 for r in first), "KL must be 0 at step 0"
  assert all(abs(r["gold/reward"]) < 4 * r["gold/reward_se"] for r in first)
  last = [r for r in rows if r["step"] == steps]
  for r in last:
    assert r["kl"] > 0 and not r["diverged"] and np.isfinite(r["loss"])
    for est in ("kl_k1", "kl_k3"):
      z = (r[est] - r["kl"]) / np.hypot(r[est + "_se"], r["kl_se"])
      assert abs(z) < 4, f"{est}={r[est]} vs exact kl={r['kl']} (z={z:.1f}) in {r}"
  manifest = json.load(open(os.path.join(full_run, "manifest.json")))
  assert manifest["members"] == n_members and manifest["devices"]["count"] == jax.device_count()
  assert manifest["lab"]["hash"] in manifest["lab"]["path"]
  bon = json.load(open(os.path.join(full_run, "bon.json")))
  assert bon["selector"] == "gold" and len(bon["n"]) == len(bon["gold"]) == len(bon["kl"])
  config_back = json.load(open(os.path.join(full_run, "config.json")))
  assert config_back["train"]["steps"] == steps


def test_killed_and_resumed_run_is_bitwise_identical(full_run, tiny_config, tmp_path):
  workdir = tmp_path / "resumed"
  # Stops after step 3: the newest checkpoint is step 2, so the resume redoes step 2 -> 3
  # and the step-3 evaluation that the killed run had already written.
  _run(tiny_config, workdir, stop_at=3)
  assert {r["step"] for r in _rows(workdir)} == {0, 3}
  _run(tiny_config, workdir)
  a, b = _rows(full_run), _rows(workdir)
  assert a == b, "metrics.jsonl of a killed+resumed run differs from an uninterrupted run"
  steps = tiny_config.train.steps

  def final_params(d):
    path = os.path.join(d, "checkpoints", str(steps), "state")
    with ocp.StandardCheckpointer() as ck:
      return ck.restore(os.path.abspath(path))

  for x, y in zip(jax.tree.leaves(final_params(full_run)),
                  jax.tree.leaves(final_params(str(workdir)))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg="final state after resume is not bitwise equal")


@pytest.mark.parametrize("overrides", [
    {},
    {"sweep.seeds": (0, 1, 2), "sweep.lrs": (1e-4, 3e-4)},
    {"sweep.gammas": (0.0, 1.0), "sweep.data_sizes": (64, 0)},
])
def test_member_count_from_config_equals_the_members_built(overrides):
  # main.member_count sizes the CPU device count before JAX starts, so it cannot build
  # the members; it must still count exactly what make_members builds.
  for config in (_config(), _config("cpu_sweep.py")):
    config.unlock()
    for field, value in overrides.items():
      section, key = field.split(".")
      config[section][key] = value
    members = config_lib.algorithm(config).members(config, n_train=config.lab.n_train_pairs)
    assert config_lib.member_count(config) == members.size, (
        f"member_count={config_lib.member_count(config)} but make_members built {members.size} "
        f"members for {overrides}")
