"""The reward-model algorithm: metrics against NumPy definitions, per-member heads, and a CLI-config sweep that learns gold."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import lab_fixture
from gpo_jax.algorithms import reward_model as rm_lib
from gpo_jax.core import sequences
from gpo_jax.engine import program
from gpo_jax.evaluation import reward
from gpo_jax.objectives import calibration
from gpo_jax.run import loop



def test_rm_metrics_match_their_definitions():
  rng = np.random.default_rng(0)
  n = 400
  g_w, g_l = rng.normal(size=n), rng.normal(size=n)
  g_l[:7] = g_w[:7]                                  # gold ties are left out of accuracy
  r_w, r_l = g_w + rng.normal(0, 1.0, n), g_l + rng.normal(0, 1.0, n)
  r_l[10:13] = r_w[10:13]                            # score ties count one half
  label_p = 1 / (1 + np.exp(-(g_w - g_l)))
  got = reward.rm_metrics(r_w, r_l, g_w, g_l, label_p, ece_bins=10)
  untied = g_w != g_l
  dr, dg = (r_w - r_l)[untied], (g_w - g_l)[untied]
  want = np.mean(np.where(dr == 0, 0.5, np.sign(dr) == np.sign(dg)))
  assert got["rm/gold_accuracy"] == pytest.approx(want)
  assert got["rm/n_pairs"] == n - 7
  assert got["rm/gold_accuracy_se"] == pytest.approx(np.sqrt(want * (1 - want) / (n - 7)))
  assert got["rm/gold_corr"] == pytest.approx(
      np.corrcoef(np.r_[r_w, r_l], np.r_[g_w, g_l])[0, 1], rel=1e-9)
  assert got["rm/margin_corr"] == pytest.approx(np.corrcoef(r_w - r_l, g_w - g_l)[0, 1])
  assert got["rm/loss"] == pytest.approx(np.mean(np.log1p(np.exp(-(r_w - r_l)))))
  pred = 1 / (1 + np.exp(-(r_w - r_l)))
  assert got["rm/ece"] == pytest.approx(calibration.expected_calibration_error(pred, label_p))
  # A proxy equal to gold: accuracy 1, correlation 1, and calibrated against label_p.
  exact = reward.rm_metrics(g_w, g_l, g_w, g_l, label_p)
  assert exact["rm/gold_accuracy"] == 1.0 and exact["rm/gold_corr"] == pytest.approx(1.0)
  assert exact["rm/ece"] < 1e-12
  flipped = reward.rm_metrics(g_l, g_w, g_w, g_l, label_p)
  assert flipped["rm/gold_accuracy"] == 0.0


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory):
  return lab_fixture.get_tiny_lab(lab_fixture.shared_root(tmp_path_factory))


def test_members_share_pi_ref_trunk_and_draw_heads_from_their_seed(tiny_lab):
  members = rm_lib.make_members(seeds=(0, 1, 0), gammas=(0.0,), n_train=512, batch_size=8)
  rm = rm_lib.init_reward_model(tiny_lab)
  _, params, _ = nnx.split(rm, nnx.Param, ...)
  state = program.init_state(params, members, program.TrainConfig(), rm_lib.init_head)
  heads = np.asarray(state["params"]["w_head"][...])
  assert not np.allclose(heads[0], heads[1]), "different seeds must draw different heads"
  np.testing.assert_array_equal(heads[0], heads[2], err_msg="the head must depend on the seed only")
  ref_trunk = nnx.state(tiny_lab.policy().decoder, nnx.Param)
  for a, b in zip(jax.tree.leaves(ref_trunk), jax.tree.leaves(state["params"]["decoder"])):
    np.testing.assert_array_equal(np.asarray(b)[1], np.asarray(a),
                                  err_msg="a reward model's trunk must start as π_ref's")


def test_bt_step_loss_matches_numpy_on_the_first_batch(tiny_lab):
  members = rm_lib.make_members(seeds=(3,), gammas=(0.0, 2.0), n_train=512, batch_size=16)
  rm = rm_lib.init_reward_model(tiny_lab)
  graphdef, params, rest = nnx.split(rm, nnx.Param, ...)
  tcfg = program.TrainConfig(batch_size=16)
  state = program.init_state(params, members, tcfg, rm_lib.init_head)
  data = rm_lib.ALGORITHM.train_data(tiny_lab, None)
  step = jax.jit(program.make_train_step(rm_lib.member_loss_fn(graphdef, rest), tcfg))
  _, metrics = step(state, members.hparams(), data)
  from gpo_jax.engine import data as data_lib
  for m in range(members.size):
    params_m = jax.tree.map(lambda x: x[m], state["params"])
    idx = np.asarray(data_lib.batch_indices(3, 512, 0, 16))
    batch = {k: v[idx] for k, v in data.items()}
    r_w, r_l = (np.asarray(x, np.float64) for x in
                sequences.pair_scores(nnx.merge(graphdef, params_m, rest), batch))
    gamma = float(members.gamma[m])
    dg = np.asarray(batch["gold_chosen"], np.float64) - np.asarray(batch["gold_rejected"])
    p = 1 / (1 + np.exp(-gamma * dg)) if gamma > 0 else np.ones_like(dg)
    want = np.mean(p * np.log1p(np.exp(-(r_w - r_l))) + (1 - p) * np.log1p(np.exp(r_w - r_l)))
    np.testing.assert_allclose(np.asarray(metrics["loss"])[m], want, rtol=1e-5, err_msg=(
        f"BT loss of the {members.row(m)['labels']}-label member differs from NumPy"))


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
  config = lab_fixture.load_config("tiny_rm.py")
  config.unlock()
  config.lab_root = lab_fixture.shared_root(tmp_path_factory)
  config.lock()
  workdir = tmp_path_factory.mktemp("rm") / "run"
  loop.run(config, str(workdir), log=lambda *_: None, progress=False)
  return config, str(workdir)


def test_tiny_rm_sweep_learns_the_gold_ordering_beyond_the_label_noise_margin(rm_run):
  config, workdir = rm_run
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  ref = json.load(open(os.path.join(workdir, reward.REFERENCE_FILE)))
  final = [r for r in rows if r["step"] == config.train.steps]
  assert len(final) == 4 and {r["labels"] for r in final} == {"hard", "soft"}
  # The labels agree with gold on a fraction `a` of the held-out pairs (a = 0.708 on the
  # tiny lab): their edge over chance is a - 1/2. A reward model trained on them must
  # recover at least half that edge, and be 3 standard errors above chance.
  a = ref["label_gold_agreement"]
  assert 0.6 < a < 0.8, f"the tiny lab's label noise changed: agreement {a}"
  for r in final:
    need = max(0.5 + (a - 0.5) / 2, 0.5 + 3 * r["rm/gold_accuracy_se"])
    assert r["rm/gold_accuracy"] > need, (
        f"member {r['member']} ({r['labels']} labels, seed {r['seed']}) reaches gold accuracy "
        f"{r['rm/gold_accuracy']:.3f} <= {need:.3f}: the reward model did not learn gold")
    assert r["rm/gold_corr"] > 0.1 and not r["diverged"]
  start = [r for r in rows if r["step"] == 0]
  assert np.mean([r["rm/gold_accuracy"] for r in final]) > np.mean(
      [r["rm/gold_accuracy"] for r in start]) + 0.05, "training did not improve the proxies"
  manifest = json.load(open(os.path.join(workdir, "manifest.json")))
  assert manifest["algorithm"] == "reward_model" and manifest["members"] == 4
