"""Tests for gpo_jax.config_utils: locking, validation errors that name the bad value, JSON export."""

import json

import ml_collections
import numpy as np
import pytest

from gpo_jax import config_utils


def _config(**overrides):
  raw = {"sweep": dict(families=("logistic", "squared"), betas=(0.1, 1.0), seeds=(0,)),
         "train": dict(batch_size=8, steps=10),
         "mesh": dict(preset="dp", sweep=2, data=2, model=1)}
  for path, value in overrides.items():
    section, key = path.split("__")
    raw[section][key] = value
  return config_utils.lock(ml_collections.ConfigDict(raw))


def test_valid_config_passes():
  config_utils.validate_sweep_config(_config(), num_devices=4, num_members=4)
  per_family = {"logistic": (0.1,), "squared": (0.5, 2.0)}
  config_utils.validate_sweep_config(_config(sweep__betas=per_family), num_devices=4)


def test_locked_config_rejects_typos():
  c = _config()
  with pytest.raises(AttributeError):
    c.train.batchsize = 4  # typo must fail loudly, not add a field


@pytest.mark.parametrize("overrides,devices,members,pattern", [
    ({"sweep__families": ("logistic", "dpo")}, 4, None, r"'dpo'.*valid names.*logistic"),
    ({"sweep__betas": (0.1, 0.0)}, 4, None, r"β=0\.0.*'logistic'"),
    ({"sweep__betas": (-1.0,)}, 4, None, r"β=-1\.0"),
    ({"sweep__betas": (float("nan"),)}, 4, None, r"β=nan"),
    ({"train__batch_size": 7}, 4, None, r"Batch size 7.*'data'=2"),
    ({}, 8, None, r"4 devices but 8"),
    ({}, 4, 3, r"3 sweep members.*'sweep'=2"),
    ({"mesh__preset": "zero"}, 4, None, r"'zero'.*fsdp"),
])
def test_bad_values_are_named(overrides, devices, members, pattern):
  with pytest.raises(ValueError, match=pattern):
    config_utils.validate_sweep_config(_config(**overrides), num_devices=devices,
                                       num_members=members)


def test_betas_mapping_must_match_families():
  betas = {"logistic": (0.1,), "hinge": (0.1,)}
  with pytest.raises(ValueError, match=r"\['hinge'\].*not in sweep.families"):
    config_utils.validate_sweep_config(_config(sweep__betas=betas), num_devices=4)


def test_json_export_is_deterministic_and_plain(tmp_path):
  c = _config()
  c.unlock()
  c.extra = ml_collections.ConfigDict(dict(arr=np.arange(3), f=np.float32(0.5), fn=np.sum))
  text = config_utils.to_json(c)
  back = json.loads(text)
  assert back["sweep"]["families"] == ["logistic", "squared"]
  assert back["extra"] == {"arr": [0, 1, 2], "f": 0.5, "fn": "numpy.sum"}
  assert list(back) == sorted(back), "keys must be sorted so config.json diffs are stable"
  path = config_utils.write_config_json(c, tmp_path)
  assert json.loads(open(path).read()) == back
