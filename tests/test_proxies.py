"""Proxy reward models as artifacts (label noise, proxy size, export/load, selectors) and the proxy-setting pipeline on the tiny lab."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpo_jax import pipeline
from gpo_jax.algorithms import reward_model as rm_lib
from gpo_jax.algorithms import rloo
from gpo_jax.core import sequences
from gpo_jax.engine import program
from gpo_jax.evaluation import reward
from gpo_jax.proxies import bank as bank_lib
from gpo_jax.proxies import selectors as selectors_lib
from gpo_jax.proxies import store
from gpo_jax.run import loop
import lab_fixture


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory):
  return lab_fixture.get_tiny_lab(lab_fixture.shared_root(tmp_path_factory))


def test_label_flips_are_fixed_per_seed_and_pair_at_the_asked_rate():
  idx = jnp.arange(20000, dtype=jnp.int32)
  f0 = np.asarray(rm_lib.label_flips(0, idx, 0.2))
  assert abs(f0.mean() - 0.2) < 4 * np.sqrt(0.2 * 0.8 / idx.size), f0.mean()
  np.testing.assert_array_equal(f0, np.asarray(rm_lib.label_flips(0, idx, 0.2)))
  f1 = np.asarray(rm_lib.label_flips(1, idx, 0.2))
  assert 0.2 < np.mean(f0 != f1), "different seeds must flip different pairs"
  assert not np.asarray(rm_lib.label_flips(0, idx, 0.0)).any()
  with pytest.raises(ValueError, match="label_noises"):
    rm_lib.make_members(label_noises=(0.6,), n_train=64, batch_size=8)


def test_flipped_labels_enter_the_bt_loss(tiny_lab):
  """With label noise q, the loss of a batch equals NumPy's with exactly the flipped labels."""
  members = rm_lib.make_members(seeds=(5,), label_noises=(0.0, 0.3), n_train=512,
                                batch_size=64)
  rm = rm_lib.init_reward_model(tiny_lab)
  graphdef, params, rest = nnx.split(rm, nnx.Param, ...)
  tcfg = program.TrainConfig(batch_size=64)
  state = program.init_state(params, members, tcfg, rm_lib.init_head)
  data = rm_lib.ALGORITHM.train_data(tiny_lab, None)
  step = jax.jit(program.make_train_step(rm_lib.member_loss_fn(graphdef, rest), tcfg))
  _, metrics = step(state, members.hparams(), data)
  from gpo_jax.engine import data as data_lib
  idx = np.asarray(data_lib.batch_indices(5, 512, 0, 64))
  batch = {k: v[idx] for k, v in data.items()}
  params_m = jax.tree.map(lambda x: x[1], state["params"])
  r_w, r_l = (np.asarray(x, np.float64) for x in
              sequences.pair_scores(nnx.merge(graphdef, params_m, rest), batch))
  flip = np.asarray(rm_lib.label_flips(5, jnp.asarray(idx), 0.3))
  assert 0 < flip.sum() < len(flip)
  p = np.where(flip, 0.0, 1.0)
  want = np.mean(p * np.log1p(np.exp(-(r_w - r_l))) + (1 - p) * np.log1p(np.exp(r_w - r_l)))
  np.testing.assert_allclose(np.asarray(metrics["loss"])[1], want, rtol=1e-5)
  assert not np.isclose(np.asarray(metrics["loss"])[0], want, rtol=1e-3), (
      "the noiseless member must not see the flips")


def test_smaller_proxy_keeps_pi_ref_first_blocks(tiny_lab):
  rm = rm_lib.init_reward_model(tiny_lab, trunk_layers=1)
  assert rm.cfg.n_layers == 1
  ref = tiny_lab.policy().decoder
  np.testing.assert_array_equal(np.asarray(rm.decoder.tok_embed[...]), np.asarray(ref.tok_embed[...]))
  for a, b in zip(jax.tree.leaves(nnx.state(ref.blocks[0], nnx.Param)),
                  jax.tree.leaves(nnx.state(rm.decoder.blocks[0], nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="trunk_layers=5"):
    rm_lib.proxy_config(tiny_lab, 5)


def test_selectors_build_and_name_errors():
  names = ("L1_n64_hard_s0", "L1_n64_hard_s1", "L1_n64_hard_s2", "L2_n64_hard_s0")
  sel = selectors_lib.build(names, singles=("L2_*",), ensembles_spec={"e": ("L1_*",)},
                            objectives=("mean", "wco", "uwo"), uwo_lambda=0.5)
  assert sel.names == ("L2_n64_hard_s0", "e/mean", "e/wco", "e/uwo")
  s = np.random.default_rng(0).normal(size=(4, 7))
  np.testing.assert_allclose(sel.apply_np(s, 0), s[3])
  np.testing.assert_allclose(sel.apply_np(s, 2), s[:3].min(axis=0))
  np.testing.assert_allclose(sel.apply_np(s, 3), s[:3].mean(0) - 0.5 * s[:3].var(0))
  t = {k: jnp.asarray(v) for k, v in sel.table().items()}
  for i in range(sel.size):
    np.testing.assert_allclose(np.asarray(selectors_lib.apply(t, jnp.asarray(s, jnp.float32), i)),
                               sel.apply_np(s, i), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="matches no proxy"):
    selectors_lib.build(names, singles=("L9_*",))
  with pytest.raises(ValueError, match="needs >= 2"):
    selectors_lib.build(names, singles=(), ensembles_spec={"e": ("L2_*",)})
  with pytest.raises(ValueError, match="unknown proxy selector"):
    sel.index("nope")


# ----------------------------------------------------------------------- tiny pipeline
@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
  config = lab_fixture.load_config("proxy_setting.py", "tiny")
  config.unlock()
  config.lab_root = lab_fixture.shared_root(tmp_path_factory)
  config.analyze = False
  config.lock()
  workdir = str(tmp_path_factory.mktemp("proxy") / "pipe")
  rl_dir = pipeline.run(config, workdir, log=lambda *_: None, progress=False)
  return config, workdir, rl_dir


@pytest.fixture(scope="module")
def pipe_lab(pipe):
  from gpo_jax import lab as lab_lib
  config = pipe[0]
  return lab_lib.build_or_load(lab_lib.LabConfig.from_dict(config.lab), config.lab_root,
                               log=lambda *_: None)


def _rows(path):
  return [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]


def test_proxies_beat_chance_by_a_margin_set_by_the_label_noise(pipe):
  """Proxy accuracy against gold exceeds chance by half the labels' own edge (and 3 SE).

  The edge is the held-out labels' agreement with gold minus 1/2 (0.69 on the tiny lab).
  Members trained on labels flipped with probability 0.2 are exempt: their labels' edge is
  (a(1 − q) + (1 − a)q) − 1/2 ≈ 0.12 and 40 steps learn ~0.53, about one SE above chance
  (measured), so this test could not tell them from chance; the flips themselves are tested
  against the loss above.
  """
  config, workdir, _ = pipe
  for name in config.proxy_runs:
    d = os.path.join(workdir, name)
    a = json.load(open(os.path.join(d, reward.REFERENCE_FILE)))["label_gold_agreement"]
    steps = config.proxy_runs[name].train.steps
    final = [r for r in _rows(d) if r["step"] == steps and r["data_size"] == 512
             and r["label_noise"] == 0]
    assert final
    for r in final:
      need = max(0.5 + (a - 0.5) / 2, 0.5 + 3 * r["rm/gold_accuracy_se"])
      assert r["rm/gold_accuracy"] > need, (name, r)


def test_exported_proxies_score_like_the_trained_members(pipe, pipe_lab):
  """The proxy set on disk reproduces the run's own held-out accuracy, and load() checks it."""
  config, workdir, _ = pipe
  d = os.path.join(workdir, "proxies_L1")
  tiny_lab = pipe_lab
  ps = store.load(d, tiny_lab)
  steps = config.proxy_runs["proxies_L1"].train.steps
  final = sorted((r for r in _rows(d) if r["step"] == steps), key=lambda r: r["member"])
  assert ps.size == len(final) and ps.cfg.n_layers == 1
  test = tiny_lab.pairs("test")
  fn = jax.jit(lambda p, c, r, m: store.score_stack(ps.graphdef, ps.rest, p, c, r, m))
  s_w = np.asarray(fn(ps.params, test["prompt"], test["chosen"], test["chosen_mask"]))
  s_l = np.asarray(fn(ps.params, test["prompt"], test["rejected"], test["rejected_mask"]))
  for m, r in enumerate(final):
    got = reward.rm_metrics(s_w[m], s_l[m], test["gold_chosen"], test["gold_rejected"],
                            test["label_p"])["rm/gold_accuracy"]
    assert abs(got - r["rm/gold_accuracy"]) < 1e-6, (m, got, r["rm/gold_accuracy"])
  # normalisers: normalised scores of the held-out responses have mean 0 and std 1
  bank = bank_lib.ProxyBank((ps,))
  z = np.asarray(bank.score_fn()(bank.params(), test["prompt"], test["chosen"],
                                 test["chosen_mask"]))
  z2 = np.asarray(bank.score_fn()(bank.params(), test["prompt"], test["rejected"],
                                  test["rejected_mask"]))
  allz = np.concatenate([z, z2], axis=1)
  np.testing.assert_allclose(allz.mean(axis=1), 0, atol=1e-3)
  np.testing.assert_allclose(allz.std(axis=1), 1, atol=1e-3)


def test_a_damaged_or_foreign_proxy_set_is_refused(pipe, tmp_path, pipe_lab):
  import shutil
  _, workdir, _ = pipe
  d = tmp_path / "copy"
  shutil.copytree(os.path.join(workdir, "proxies_L1", store.DIRNAME), d / store.DIRNAME)
  with open(d / store.DIRNAME / store.PARAMS, "r+b") as f:
    f.seek(100)
    f.write(b"\x00\x01\x02")
  with pytest.raises(store.ProxyError, match="SHA-256"):
    store.load(str(d))
  meta = json.load(open(os.path.join(workdir, "proxies_L1", store.DIRNAME, store.META)))
  other = tmp_path / "other" / store.DIRNAME
  shutil.copytree(os.path.join(workdir, "proxies_L1", store.DIRNAME), other)
  meta["lab_hash"] = "000000000000"
  json.dump(meta, open(other / store.META, "w"))
  with pytest.raises(store.ProxyError, match="trained on lab 000000000000"):
    store.load(str(other), pipe_lab)
  with pytest.raises(store.ProxyError, match="no proxy set"):
    store.load(str(tmp_path / "missing"))


def test_a_proxy_sweep_member_equals_the_same_proxy_trained_alone(pipe, tmp_path):
  """Member (seed 1, all pairs) of the L1 sweep vs a run with only that member."""
  config, workdir, _ = pipe
  stages = pipeline.stage_configs(config, workdir)
  alone = stages["proxies_L1"]
  alone.unlock()
  alone.sweep.seeds = (1,)
  alone.sweep.data_sizes = (0,)
  alone.lock()
  d = str(tmp_path / "alone")
  loop.run(alone, d, log=lambda *_: None, progress=False)
  one = store.load(d)
  swept = store.load(os.path.join(workdir, "proxies_L1"))
  m = swept.names.index(one.names[0])
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(swept.params)):
    np.testing.assert_allclose(np.asarray(a)[0], np.asarray(b)[m], rtol=2e-4, atol=2e-5)


def test_rl_against_a_proxy_raises_the_proxy_and_writes_the_scored_pool(pipe):
  config, workdir, rl_dir = pipe
  rows = _rows(rl_dir)
  steps = config.rl.train.steps
  sel = rloo.build_selectors(pipeline.stage_configs(config, workdir)["rl"])
  pool = np.load(os.path.join(rl_dir, "bon_pool.npz"))
  e = config.rl.eval.n_prompts
  n = config.rl.eval.ref_samples_per_prompt
  assert pool["gold"].shape == (e, n)
  assert pool["proxies"].shape[1:] == (e, n) and pool["selector_mask"].shape[0] == sel.size
  assert list(pool["selector_names"]) == list(sel.names)
  first = {r["member"]: r for r in rows if r["step"] == 0}
  last = {r["member"]: r for r in rows if r["step"] == steps}
  assert set(first) == set(last) and len(last) == 4
  for m, r in first.items():
    assert abs(r["kl"]) < 1e-5 and abs(r["proxy/reward"]) < 4 * r["proxy/reward_se"] + 1e-6
    assert -1.0 <= r["proxy/gold_corr"] <= 1.0, r
  # At step 0 every member is π_ref and members of one seed draw the same samples: the
  # within-prompt proxy–gold correlation depends on the selector only.
  corr = {}
  for r in first.values():
    corr.setdefault(r["family"], set()).add(round(r["proxy/gold_corr"], 6))
  assert all(len(v) == 1 for v in corr.values()), corr
  assert len({v.pop() for v in corr.values()}) == len(corr), "selectors must differ"
  # With no KL penalty the proxy must rise beyond noise and KL must grow.
  for m, r in last.items():
    if r["beta"] == 0.0:
      assert r["proxy/reward"] > first[m]["proxy/reward"] + 3 * r["proxy/reward_se"], r
      assert r["kl"] > 0.05
  # The stronger KL penalty keeps the policy closer to π_ref (same selector and seed).
  for fam in {r["family"] for r in last.values()}:
    kl = {r["beta"]: r["kl"] for r in last.values() if r["family"] == fam}
    assert kl[0.1] < kl[0.0], (fam, kl)


def test_rl_member_zero_kl_coef_validation():
  with pytest.raises(ValueError, match="kl_coefs"):
    sel = selectors_lib.build(("a", "b"))
    rloo.make_members(sel, ("*",), kl_coefs=(-0.1,), n_train=64, batch_size=8)


def test_offline_policies_export_their_implicit_reward(pipe, pipe_lab):
  """The DPO stage's proxy set scores log π − log π_ref, normalised on held-out responses."""
  config, workdir, _ = pipe
  d = os.path.join(workdir, "policies_dpo")
  ps = store.load(d, pipe_lab)
  assert ps.kind == "implicit" and ps.names[0].startswith("implicit_logistic_be0.1_")
  with pytest.raises(store.ProxyError, match="needs the lab"):
    store.load(d)
  test = pipe_lab.pairs("test")
  ctx, resp, mask = test["prompt"][:32], test["chosen"][:32], test["chosen_mask"][:32]
  graphdef, _, rest = nnx.split(pipe_lab.policy(), nnx.Param, ...)
  ref = nnx.state(pipe_lab.policy(), nnx.Param)
  for m in range(ps.size):
    pol = jax.tree.map(lambda x: x[m], ps.params)
    want = (np.asarray(sequences.pair_logps(nnx.merge(graphdef, pol, rest), ctx, resp, mask, False))
            - np.asarray(sequences.pair_logps(nnx.merge(graphdef, ref, rest), ctx, resp, mask,
                                              False)))
    bank = bank_lib.ProxyBank((ps,))
    got = np.asarray(bank.score_fn()(bank.params(), ctx, resp, mask))[m]
    np.testing.assert_allclose(got * ps.std[m] + ps.mean[m], want, rtol=1e-4, atol=1e-4)
    assert np.std(want) > 1e-3, "the trained policy must differ from π_ref"


@pytest.mark.parametrize("field, value, error, pattern", [
    ("sweep.selectors", ("L9_*",), ValueError, "match no selector; valid choices"),
    ("rl.samples_per_prompt", 1, ValueError, "samples_per_prompt=1"),
    ("sweep.kl_coefs", (-1.0,), ValueError, "kl_coefs"),
    ("proxies.ensembles", {"e": ("nothing_*",)}, ValueError, "matches no proxy"),
    ("proxies.objectives", ("median",), ValueError, "unknown ensemble objective 'median'"),
])
def test_bad_rl_configs_fail_naming_the_value(pipe, tmp_path, field, value, error, pattern):
  from gpo_jax.run import config as config_lib
  config, workdir, _ = pipe
  rl = pipeline.stage_configs(config, workdir)["rl"]
  rl.unlock()
  *parents, key = field.split(".")
  node = rl
  for name in parents:
    node = node[name]
  node[key] = value
  with pytest.raises(error, match=pattern):
    config_lib.validate(rl, num_devices=1)


def test_rl_refuses_a_missing_proxy_set_and_only_flagged_gpo_runs_export(pipe, tmp_path):
  from gpo_jax.run import config as config_lib
  config, workdir, _ = pipe
  stages = pipeline.stage_configs(config, workdir)
  rl = stages["rl"]
  rl.unlock()
  rl.proxies.paths = (str(tmp_path / "nowhere"),)
  with pytest.raises(store.ProxyError, match="no proxy set"):
    config_lib.validate(rl, num_devices=1)
  assert stages["policies_dpo"].export_implicit is True
  assert not lab_fixture.load_config("cpu_sweep.py").get("export_implicit", False)
  with pytest.raises(ValueError, match="unknown pipeline"):
    bad = lab_fixture.load_config("proxy_setting.py", "tiny")
    bad.unlock()
    bad.pipeline = "other"
    pipeline.stage_configs(bad, str(tmp_path))


def test_within_prompt_correlation_matches_numpy():
  from gpo_jax.evaluation import policy
  rng = np.random.default_rng(0)
  a = rng.normal(size=(5, 7)) + rng.normal(size=(5, 1)) * 10
  b = 0.5 * a + rng.normal(size=(5, 7)) + rng.normal(size=(5, 1)) * 10
  ca, cb = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
  want = np.corrcoef(ca.ravel(), cb.ravel())[0, 1]
  got = float(policy._within_prompt_corr(jnp.asarray(a.ravel()), jnp.asarray(b.ravel()), 5))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert abs(want - np.corrcoef(a.ravel(), b.ravel())[0, 1]) > 0.05, "prompt means must not count"


def test_the_proxy_pool_split_over_devices_equals_one_device(tmp_path_factory):
  import multidevice
  root = lab_fixture.shared_root(tmp_path_factory)
  lab_fixture.get_tiny_lab(root)
  r = multidevice.run_json("proxy_pool_subprocess.py", root, devices=2)
  assert r["devices"] == 2 and r["one_groups"] == 1 and r["split_groups"] == 2
  np.testing.assert_array_equal(r["one"]["response_len"], r["split"]["response_len"])
  for k in ("gold", "proxies"):
    np.testing.assert_allclose(r["one"][k], r["split"][k], rtol=1e-5, atol=1e-5, err_msg=k)
  assert np.std(r["one"]["proxies"]) > 0


def test_rl_scores_only_the_proxies_its_selectors_read(pipe, pipe_lab):
  """The train step's proxy subset gives every member's selector the same reward as all proxies."""
  config, workdir, _ = pipe
  rl = pipeline.stage_configs(config, workdir)["rl"]
  algo = rloo.RLOO()
  full = algo._bank(rl, pipe_lab)
  sel = rloo.build_selectors(rl)
  sub, sub_sel = algo._train_proxies(rl, pipe_lab)
  assert 0 < sub.size < full.size
  test = pipe_lab.pairs("test")
  args = (test["prompt"][:16], test["chosen"][:16], test["chosen_mask"][:16])
  s_full = full.score_fn()(full.params(), *args)
  s_sub = sub.score_fn()(sub.params(), *args)
  t_full = {k: jnp.asarray(v) for k, v in sel.table().items()}
  t_sub = {k: jnp.asarray(v) for k, v in sub_sel.table().items()}
  members = algo.members(rl, n_train=512)
  for i in np.unique(members.columns["selector_idx"]):
    np.testing.assert_allclose(np.asarray(selectors_lib.apply(t_sub, s_sub, i)),
                               np.asarray(selectors_lib.apply(t_full, s_full, i)),
                               rtol=1e-5, atol=1e-5, err_msg=sel.names[i])
  chosen = np.unique(members.columns["selector_idx"])
  with pytest.raises(ValueError, match="would drop proxies"):
    sel.restrict(sel.used(chosen)[1:], chosen)


@pytest.mark.slow
def test_online_methods_train_against_a_proxy_ensemble(pipe, tmp_path):
  """Online DPO and Nash-MD with a proxy selector as the preference model (end to end)."""
  config, workdir, _ = pipe
  rl = pipeline.stage_configs(config, workdir)["rl"]
  on = lab_fixture.load_config("online.py", "tiny").online
  on.unlock()
  on.lab = rl.lab
  on.lab_root = rl.lab_root
  on.analyze = False
  on.proxies = rl.proxies
  on.online.preference = "proxy"
  on.online.proxy = str(rl.sweep.selectors[-1])          # an ensemble objective
  on.sweep.methods = {"online": ("logistic",), "nash_md": ()}
  on.sweep.betas = (0.5,)
  on.train.steps = 4
  on.eval.every = 4
  on.eval.n_prompts = 4
  on.lock()
  d = str(tmp_path / "online_proxy")
  loop.run(on, d, log=lambda *_: None, progress=False)
  rows = [r for r in _rows(d) if r["step"] == 4]
  assert len(rows) == 2 and all(np.isfinite(r["loss"]) and r["kl"] > 0 for r in rows), rows
  assert all(abs(r["objective/scores"]) < 50 for r in rows)
