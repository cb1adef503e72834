"""The algorithm seam: the ARCHITECTURE.md example (one module + one config) runs end to end through the engine."""

import json
import os
import re

import numpy as np
import pytest

import lab_fixture
from gpo_jax import algorithms
from gpo_jax.run import loop
from gpo_jax.run import presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_architecture_doc_shows_the_example_module_verbatim():
  doc = open(os.path.join(REPO, "ARCHITECTURE.md")).read()
  block = re.search(r"`gpo_jax/algorithms/length_gpo.py`:\n\n```python\n(.*?)```", doc, re.S)
  assert block, "ARCHITECTURE.md lost its worked example"
  code = open(os.path.join(REPO, "tests", "example_algorithm.py")).read()
  body = code.split('"""', 2)[2].strip()          # drop the module docstring
  doc_body = block.group(1).split('"""', 2)[2].strip()
  assert doc_body == body, "the worked example in ARCHITECTURE.md and tests/example_algorithm.py differ"


@pytest.fixture(scope="module")
def registered():
  algorithms.REGISTRY["length_gpo"] = "example_algorithm"
  yield
  del algorithms.REGISTRY["length_gpo"]


def _config(lab_root, penalty):
  c = presets.base("gpo", "tiny", presets.gpo_eval())
  c.algorithm = "length_gpo"
  import ml_collections
  c.sweep = ml_collections.ConfigDict(dict(
      families=("logistic",), betas=(0.1,), beta_effs=(), seeds=(0, 1), lrs=(1e-3,),
      gammas=(0.0,), data_sizes=(0,), penalty=penalty))
  c.train.update(dict(steps=2, batch_size=8, warmup_steps=0, log_every=1))
  c.eval.update(dict(every=2, n_prompts=4, samples_per_prompt=2, ref_samples_per_prompt=4,
                     n_test_pairs=16, member_chunk=2, bon_n=(1, 2, 4)))
  c.checkpoint.every = 2
  c.mesh.cpu_devices = 0
  c.analyze = False
  c.lab_root = lab_root
  c.lock()
  return c


def test_a_new_algorithm_runs_from_one_module_and_one_config(registered, tmp_path_factory):
  root = lab_fixture.shared_root(tmp_path_factory)
  runs = {}
  for penalty in (0.0, 0.25):
    workdir = tmp_path_factory.mktemp(f"seam{penalty}") / "run"
    loop.run(_config(root, penalty), str(workdir), log=lambda *_: None, progress=False)
    runs[penalty] = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  manifest = json.load(open(workdir / "manifest.json"))
  assert manifest["algorithm"] == "length_gpo"
  last = {p: [r for r in rows if r["step"] == 2] for p, rows in runs.items()}
  assert [r["penalty"] for r in last[0.25]] == [0.25, 0.25], "the new column reaches the rows"
  # The penalty adds 0.25 x (mean chosen length of the batch) to the logged loss; lengths are
  # 1..12 tokens, so the difference must lie in [0.25, 3].
  diff = np.asarray([a["loss"] for a in last[0.25]]) - np.asarray([a["loss"] for a in last[0.0]])
  assert np.all((diff > 0.2) & (diff < 3.1)), f"loss differences {diff}: the penalty did not act"
