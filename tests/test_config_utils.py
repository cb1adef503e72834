"""Tests for gpo_jax.run.config: the one validation place (errors name the bad value and the choices), locking, JSON export."""

import json

import ml_collections
import numpy as np
import pytest

from gpo_jax.run import config as config_lib
from gpo_jax.run import presets


def _config(**overrides):
  """The tiny GPO config (2 families x 2 betas = 4 members) on a 2 x 2 mesh, with overrides."""
  c = presets.base("gpo", "tiny", presets.gpo_eval())
  c.sweep = ml_collections.ConfigDict(dict(
      families=("logistic", "squared"), betas=(0.1, 1.0), beta_effs=(), seeds=(0,),
      lrs=(1e-3,), gammas=(0.0,), data_sizes=(0,)))
  c.train.batch_size = 8
  c.mesh.update(dict(sweep=2, data=2, model=1))
  for path, value in overrides.items():
    section, key = path.split("__")
    if isinstance(value, dict):   # a per-family mapping replaces a tuple: a new field type
      del c[section][key]
    c[section][key] = value
  return config_lib.lock(c)


def test_valid_config_passes():
  assert config_lib.validate(_config(), num_devices=4).size == 4
  per_family = {"logistic": (0.1,), "squared": (0.5, 2.0, 3.0)}
  assert config_lib.validate(_config(sweep__betas=per_family), num_devices=4).size == 4


def test_locked_config_rejects_typos():
  c = _config()
  with pytest.raises(AttributeError):
    c.train.batchsize = 4  # typo must fail loudly, not add a field


@pytest.mark.parametrize("overrides,devices,pattern", [
    ({"sweep__families": ("logistic", "dpo")}, 4, r"'dpo'.*valid names.*logistic"),
    ({"sweep__betas": (0.1, 0.0)}, 4, r"betas \(logistic\).*> 0; got 0\.0"),
    ({"sweep__betas": (-1.0, 1.0)}, 4, r"got -1\.0"),
    ({"sweep__betas": (float("nan"), 1.0)}, 4, r"got nan in \[nan, 1\.0\]"),
    ({"sweep__betas": ("0.1", 1.0)}, 4, r"must be numbers; got '0\.1' \(str\)"),
    ({"sweep__betas": ()}, 4, r"exactly one of sweep.betas and sweep.beta_effs"),
    ({"sweep__beta_effs": (0.1, 1.0)}, 4, r"exactly one of sweep.betas and sweep.beta_effs"),
    ({"sweep__lrs": ()}, 4, r"sweep lrs is empty"),
    ({"sweep__seeds": ()}, 4, r"sweep seeds is empty"),
    ({"sweep__seeds": (0.5,)}, 4, r"seeds must be integers; got 0\.5"),
    ({"sweep__gammas": (-1.0,)}, 4, r"gammas values must be finite and >= 0"),
    ({"sweep__families": ()}, 4, r"sweep.families is empty"),
    ({"sweep__data_sizes": (4,)}, 4, r"data_size=4 must lie in \[batch_size=8"),
    ({"train__batch_size": 7}, 4, r"Batch size 7.*'data'=2"),
    ({"train__b2": 1.5}, 4, r"train.b2=1.5 must be a number in \[0, 1\)"),
    ({"train__grad_clip": -1.0}, 4, r"train.grad_clip=-1.0"),
    ({}, 8, r"4 devices but 8"),
    ({"mesh__preset": "zero"}, 4, r"'zero'.*fsdp"),
    ({"eval__n_prompts": 10_000}, 4, r"eval.n_prompts=10000 exceeds"),
])
def test_bad_values_are_named(overrides, devices, pattern):
  with pytest.raises(ValueError, match=pattern):
    config_lib.validate(_config(**overrides), num_devices=devices)


def test_member_count_not_divisible_by_sweep_axis_names_the_choices():
  c = _config(sweep__betas={"logistic": (0.1,), "squared": (0.5, 2.0)})   # 3 members
  with pytest.raises(ValueError, match=r"3 sweep members.*'sweep'=2"):
    config_lib.validate(c, num_devices=4)


def test_betas_mapping_must_match_families():
  betas = {"logistic": (0.1,), "hinge": (0.1,)}
  with pytest.raises(ValueError, match=r"\['hinge'\].*not in sweep.families"):
    config_lib.validate(_config(sweep__betas=betas), num_devices=4)


def test_unknown_algorithm_lists_the_registry():
  c = _config()
  c.unlock()
  c.algorithm = "ppo"
  with pytest.raises(ValueError, match=r"unknown algorithm 'ppo'; valid choices: \['gpo', "
                                       r"'inverse_q', 'online', 'reward_model', 'rloo'\]"):
    config_lib.validate(c, num_devices=4)


def test_json_export_is_deterministic_and_plain(tmp_path):
  c = _config()
  c.unlock()
  c.extra = ml_collections.ConfigDict(dict(arr=np.arange(3), f=np.float32(0.5), fn=np.sum))
  text = config_lib.to_json(c)
  back = json.loads(text)
  assert back["sweep"]["families"] == ["logistic", "squared"]
  assert back["extra"] == {"arr": [0, 1, 2], "f": 0.5, "fn": "numpy.sum"}
  assert list(back) == sorted(back), "keys must be sorted so config.json diffs are stable"
  path = config_lib.write_config_json(c, tmp_path)
  assert json.loads(open(path).read()) == back


def test_long_horizon_config_sizes_steps_by_epochs_and_names_bad_arguments():
  import lab_fixture
  c = lab_fixture.load_config("long_horizon.py", "cpu,512,1")
  assert c.lab.seed == 1 and c.lab.gold_kind == "coherent" and c.sweep.data_sizes == (512,)
  assert c.train.steps == 23 * 512 // c.train.batch_size          # 23 epochs
  assert config_lib.member_count(c) == 3 * 6 * 3
  full = lab_fixture.load_config("long_horizon.py", "full,65536")
  assert full.lab.name == "large" and full.sweep.lrs == (1e-4, 3e-4, 1e-3)
  for arg, pattern in [("gpu,512", r"scale in \['cpu', 'full'\]"), ("cpu,x", "must be integers"),
                       ("cpu,500", "multiple of the batch size 32"),
                       ("cpu,8192", "exceeds the cpu lab's 4096 pairs")]:
    with pytest.raises(ValueError, match=pattern):
      lab_fixture.load_config("long_horizon.py", arg)
