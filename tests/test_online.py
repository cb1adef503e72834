"""Online preference optimisation in the LM lab: the token-level mixture sampler, the online step and the tiny pipeline."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from gpo_jax import pipeline
from gpo_jax.algorithms import online
from gpo_jax.algorithms.base import SHARED
from gpo_jax.core import model as model_lib
from gpo_jax.core import sampling
from gpo_jax.run import loop
import lab_fixture

CFG = model_lib.TransformerConfig(vocab_size=6, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                  max_len=8)


def _sharp_model(seed: int, scale: float = 40.0):
  """A random model with far-from-uniform next-token distributions (weights scaled up)."""
  m = model_lib.Transformer(CFG, rngs=nnx.Rngs(seed))
  gd, st = nnx.split(m)
  return nnx.merge(gd, jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, st))


def _exact_two_token_probs(model, ref, ctx_C, beta_mix):
  """Exact ``P(t1, t2)`` of two tokens from the per-token mixture (EOS then PAD is forced)."""
  v = CFG.vocab_size
  l1, _ = model.prefill(ctx_C[None])
  r1, _ = ref.prefill(ctx_C[None])
  p1 = np.exp(np.asarray(sampling.mixture_logits(l1, r1, beta_mix))[0], dtype=np.float64)
  ctx2 = np.concatenate([np.repeat(ctx_C[None], v, 0), np.arange(v)[:, None]], axis=1)
  l2, _ = model.prefill(jnp.asarray(ctx2))
  r2, _ = ref.prefill(jnp.asarray(ctx2))
  p2 = np.exp(np.asarray(sampling.mixture_logits(l2, r2, beta_mix)), dtype=np.float64)
  joint = p1[:, None] * p2
  joint[sampling.EOS] = 0.0
  joint[sampling.EOS, sampling.PAD] = p1[sampling.EOS]
  return joint / joint.sum()


def _chi2_pvalue(tokens_Nx2, probs_VxV):
  v = probs_VxV.shape[0]
  counts = np.zeros((v, v))
  np.add.at(counts, (tokens_Nx2[:, 0], tokens_Nx2[:, 1]), 1)
  n = len(tokens_Nx2)
  expected = probs_VxV.ravel() * n
  obs = counts.ravel()
  # Pool the cells expected below 5 into one (the chi-square approximation needs it).
  small = expected < 5
  e = np.append(expected[~small], expected[small].sum())
  o = np.append(obs[~small], obs[small].sum())
  if e[-1] == 0:
    e, o = e[:-1], o[:-1]
  return stats.chisquare(o, e).pvalue, int(obs[probs_VxV.ravel() == 0].sum())


def test_mixture_sampler_draws_the_exact_per_token_geometric_mixture():
  """Chi-square over all two-token outcomes against the exact per-token mixture (p > 1e-3),
  and the coin flip between a π sample and a π_ref sample (EasyDeL's "Nash-MD") is rejected
  by the same test (p < 1e-6): the test has power against the wrong mixture."""
  model, ref = _sharp_model(0), _sharp_model(1)
  ctx = jnp.asarray([1, 4, 2], jnp.int32)
  n, beta_mix = 40000, 0.4
  exact = _exact_two_token_probs(model, ref, np.asarray(ctx), beta_mix)
  ctx_N = jnp.broadcast_to(ctx, (n, 3))
  toks, mask = jax.jit(lambda k: sampling.sample_mixture(
      model, ref, ctx_N, k, beta_mix, max_new_tokens=2))(jax.random.key(0))
  p, impossible = _chi2_pvalue(np.asarray(toks), exact)
  assert impossible == 0 and p > 1e-3, p
  # Negative control: each row is a whole π sample with probability 1 − β, else π_ref's.
  a, _ = sampling.sample(model, ctx_N, jax.random.key(1), max_new_tokens=2)
  b, _ = sampling.sample(ref, ctx_N, jax.random.key(2), max_new_tokens=2)
  coin = jax.random.bernoulli(jax.random.key(3), beta_mix, (n, 1))
  p_coin, _ = _chi2_pvalue(np.asarray(jnp.where(coin, b, a)), exact)
  assert p_coin < 1e-6, p_coin


def test_mixture_weight_zero_and_one_are_the_two_models():
  model, ref = _sharp_model(0), _sharp_model(1)
  ctx = jnp.tile(jnp.asarray([[1, 4, 2]], jnp.int32), (64, 1))
  key = jax.random.key(5)
  t0, m0 = sampling.sample_mixture(model, ref, ctx, key, 0.0, max_new_tokens=4)
  t_pi, m_pi = sampling.sample(model, ctx, key, max_new_tokens=4)
  t1, _ = sampling.sample_mixture(model, ref, ctx, key, 1.0, max_new_tokens=4)
  t_ref, _ = sampling.sample(ref, ctx, key, max_new_tokens=4)
  np.testing.assert_array_equal(t0, t_pi)
  np.testing.assert_array_equal(m0, m_pi)
  np.testing.assert_array_equal(t1, t_ref)
  # Per-row weights: rows with 0 follow π, rows with 1 follow π_ref, in one call.
  rows = jnp.where(jnp.arange(64) % 2 == 0, 0.0, 1.0)
  t_mix, _ = sampling.sample_mixture(model, ref, ctx, key, rows, max_new_tokens=4)
  assert not np.array_equal(t_pi, t_ref)
  with pytest.raises(ValueError, match="beta_mix"):
    sampling.sample_mixture(model, ref, ctx, key, 1.5, max_new_tokens=4)
  assert t_mix.shape == t_pi.shape


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory):
  from gpo_jax import lab as lab_lib
  config = lab_fixture.load_config("online.py", "tiny")
  return lab_lib.build_or_load(lab_lib.LabConfig.from_dict(config.lab),
                               lab_fixture.shared_root(tmp_path_factory), log=lambda *_: None)


def _members(**kw):
  args = dict(methods={"online": ("squared", "logistic"), "ipo_md": ("squared",),
                       "nash_md": ()}, betas=(0.1, 0.5), mixture_coefs=(0.125,), seeds=(0,),
              lrs=(1e-3,), n_train=64, batch_size=4)
  args.update(kw)
  return online.make_members(args.pop("methods"), args.pop("betas"), args.pop("mixture_coefs"),
                             args.pop("seeds"), args.pop("lrs"), **args)


def _loss_setup(lab, members, **kw):
  graphdef, params, rest = nnx.split(lab.policy(), nnx.Param, ...)
  pref = online.gold_preference(lab.gold_fn()[0], 1.0)
  loss_fn = online.member_loss_fn(graphdef, rest, members.families, pref,
                                  response_len=int(lab.cfg.corpus.response_len), **kw)
  batch = {"prompt": jnp.asarray(lab.pairs("train")["prompt"][:4]),
           SHARED: {"ref": params, "gold": lab.gold_fn()[1]}}
  return loss_fn, params, batch


def test_members_names_and_bad_values():
  m = _members()
  fams = list(m.columns["family"])
  assert fams == ["online_ipo"] * 2 + ["online_dpo"] * 2 + ["ipo_md"] * 2 + ["nash_md"] * 2
  assert list(m.columns["mixture_coef"]) == [0, 0, 0, 0, 0.125, 0.125, 0.125, 0.125]
  assert list(m.columns["method_idx"]) == [0, 0, 0, 0, 1, 1, 2, 2]
  two = _members(mixture_coefs=(0.0, 0.5))
  assert "ipo_md_m0.5" in set(two.columns["family"]) and two.size == 4 + 4 + 4
  with pytest.raises(ValueError, match="nash_mdx"):
    _members(methods={"nash_mdx": ()})
  with pytest.raises(ValueError, match=r"\[1.0\]"):
    _members(mixture_coefs=(1.0,))
  with pytest.raises(ValueError, match="cubic"):
    _members(methods={"online": ("cubic",)})
  with pytest.raises(ValueError, match="betas"):
    _members(betas=(0.0,))


def test_online_step_compiles_once_for_any_beta_tau_mixture_and_method(tiny_lab):
  """The method, f, β (τ = β/2) and β_mix are traced: new values reuse one executable."""
  members = _members()
  loss_fn, params, batch = _loss_setup(tiny_lab, members)
  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  hp_all = members.hparams()
  seen = []
  for m in (0, 3, 4, 7):
    hp = {k: v[m] for k, v in hp_all.items()}
    (loss, metrics), g = step(params, batch, hp, jax.random.key(0))
    seen.append(float(loss))
    assert np.isfinite(float(loss)) and set(metrics) == set(online.TRAIN_METRICS)
  hp = dict({k: v[7] for k, v in hp_all.items()}, beta=jnp.float32(2.0),
            mixture_coef=jnp.float32(0.3))
  step(params, batch, hp, jax.random.key(0))
  assert step._cache_size() == 1
  assert len(set(seen)) > 1


def test_online_member_ignores_the_mixture_weight_and_nash_md_uses_it(tiny_lab):
  members = _members()
  loss_fn, params, batch = _loss_setup(tiny_lab, members)
  params = jax.tree.map(lambda x: x * 1.05, params)     # π ≠ π_ref, so π_mix ≠ π
  hp_all = members.hparams()
  run = jax.jit(lambda hp: loss_fn(params, batch, hp, jax.random.key(1)))
  for m, same in ((0, True), (6, False)):
    hp = {k: v[m] for k, v in hp_all.items()}
    a = run(dict(hp, mixture_coef=jnp.float32(0.0)))
    b = run(dict(hp, mixture_coef=jnp.float32(0.9)))
    assert (float(a[0]) == float(b[0])) == same, (m, a[0], b[0])
    assert float(b[1]["mixture_coef"]) == (0.0 if same else np.float32(0.9))


def test_nash_md_per_token_estimator_matches_sequence_one_only_without_kl(tiny_lab):
  """With τ → 0 both Nash-MD estimators are ``−Σ_t ∇log π(y_t)·(p − ½)``; with τ > 0 the
  sequence-level one (SPEC default) and TRL's per-token one differ."""
  members = _members()
  hp = {k: v[7] for k, v in members.hparams().items()}
  grads = {}
  for per_token in (False, True):
    loss_fn, params, batch = _loss_setup(tiny_lab, members, nash_md_per_token=per_token)
    # Move away from π_ref so the log-ratios (the KL term) are not zero.
    params = jax.tree.map(lambda x: x * 1.05, params)
    g = jax.jit(jax.grad(lambda p, h: loss_fn(p, batch, h, jax.random.key(2))[0]))
    grads[per_token] = [g(params, dict(hp, beta=jnp.float32(b))) for b in (1e-9, 4.0)]
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
  np.testing.assert_allclose(flat(grads[False][0]), flat(grads[True][0]), rtol=1e-4, atol=1e-7)
  diff = np.abs(flat(grads[False][1]) - flat(grads[True][1])).max()
  assert diff > 1e-3 * np.abs(flat(grads[False][1])).max()


def _whole_response_logits(model, prompt_BxP, resp_BxNxT):
  """Each prompt repeated for its N responses and run whole (the step's former computation)."""
  b, n, t = resp_BxNxT.shape
  tokens = jnp.concatenate([jnp.repeat(prompt_BxP, n, axis=0),
                            resp_BxNxT.reshape(b * n, t).astype(prompt_BxP.dtype)], axis=1)
  return model(tokens[:, :-1])[:, prompt_BxP.shape[1] - 1:].reshape(b, n, t, -1)


def test_online_step_runs_each_prompt_once_with_the_same_loss_gradients_and_rows(tiny_lab):
  """The step's logits of y and y′ come from each prompt run once for both
  (``model.grouped_response_logits``): loss, gradients and metrics equal the step computing
  every sequence whole, and the metrics put y and y′ on the right rows (entropy of y, and
  the chosen + rejected rewards β(h(y) + h(y′)), against direct forwards of ``ctx + y``)."""
  from unittest import mock
  members = _members()
  loss_fn, params, batch = _loss_setup(tiny_lab, members)
  ref = params
  params = jax.tree.map(lambda x: x * 1.05, params)     # π ≠ π_ref: h(y) ≠ 0
  hp_all = members.hparams()
  key = jax.random.key(5)
  vg = jax.value_and_grad(loss_fn, has_aux=True)
  graphdef, _, rest = nnx.split(tiny_lab.policy(), nnx.Param, ...)
  ctx = batch["prompt"]
  b, t = ctx.shape[0], int(tiny_lab.cfg.corpus.response_len)
  resp, mask = sampling.sample(nnx.merge(graphdef, params, rest), jnp.concatenate([ctx, ctx]),
                               key, max_new_tokens=t)
  ctx2 = jnp.concatenate([ctx, ctx])
  lp = lambda p: model_lib.response_logprobs(  # noqa: E731
      nnx.merge(graphdef, p, rest), *sampling.concat_response(ctx2, resp, mask))
  h = np.asarray(lp(params) - lp(ref))                 # direct h(y) for rows [y; y′]
  assert np.abs(h).max() > 1e-3
  for m in (0, 6):                                     # online GPO, Nash-MD
    hp = {k: v[m] for k, v in hp_all.items()}
    (loss, metrics), grads = jax.jit(vg)(params, batch, hp, key)
    with mock.patch.object(model_lib, "grouped_response_logits", _whole_response_logits):
      (want, want_metrics), want_grads = jax.jit(vg)(params, batch, hp, key)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5, atol=1e-6)
    for k in metrics:
      np.testing.assert_allclose(float(metrics[k]), float(want_metrics[k]), rtol=1e-5,
                                 atol=1e-5, err_msg=k)
    for a, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-4, atol=1e-6)
    if m == 0:
      beta = float(hp["beta"])
      np.testing.assert_allclose(
          float(metrics["rewards/chosen"]) + float(metrics["rewards/rejected"]),
          beta * (h[:b].mean() + h[b:].mean()), rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(float(metrics["objective/entropy"]),
                                 -float(np.mean(np.asarray(lp(params))[:b])), rtol=1e-5)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, tiny_lab):
  config = lab_fixture.load_config("online.py", "tiny")
  config.unlock()
  config.lab_root = lab_fixture.shared_root(tmp_path_factory)
  config.analyze = False
  for st in (config.offline, config.online):
    st.train.steps = 8
    st.eval.every = 4
    st.eval.n_prompts = 8
    st.checkpoint.every = 8
  config.lock()
  workdir = str(tmp_path_factory.mktemp("online") / "pipe")
  pipeline.run(config, workdir, log=lambda *_: None, progress=False)
  return config, workdir


def test_the_comparison_report_is_written_from_the_pipeline(pipe):
  from gpo_jax.analysis import online as online_report
  config, workdir = pipe
  md = online_report.write(workdir, log=lambda *_: None)
  text = md.read_text()
  assert "offline_dpo" in text and "nash_md" in text and "win rate" in text.lower()
  for name in ("matched_kl.csv", "win_rates_final.csv", "win_rates_matched_kl.csv",
               "online_frontier.svg"):
    assert (md.parent / name).exists(), name


def _rows(path):
  return [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]


def test_pipeline_trains_every_method_and_keeps_every_samples_gold(pipe):
  config, workdir = pipe
  rows = _rows(os.path.join(workdir, "online"))
  last = {r["member"]: r for r in rows if r["step"] == 8}
  first = {r["member"]: r for r in rows if r["step"] == 0}
  assert {r["family"] for r in last.values()} == {
      "online_ipo", "online_dpo", "online_slic", "ipo_md", "nash_md"}
  for m, r in last.items():
    assert abs(first[m]["kl"]) < 1e-6 and r["kl"] > 0 and np.isfinite(r["gold/reward"]), r
    # Member columns survive in every row; the train metrics join from the first update on.
    assert first[m]["mixture_coef"] == r["mixture_coef"] == (
        0.0 if r["method"] == "online" else 0.125), (first[m], r)
    assert first[m]["objective/kl"] is None and r["objective/kl"] >= 0.0
    assert r["loss"] is not None and np.isfinite(r["loss"])
  for stage in ("offline", "online"):
    pp = np.load(os.path.join(workdir, stage, "per_prompt", "00000008.npz"))
    g = pp["sample__gold_all"]
    e, n = config[stage].eval.n_prompts, config[stage].eval.samples_per_prompt
    assert g.shape[1:] == (e, n)
    # Its per-prompt means are the per-prompt gold the paired tests use.
    np.testing.assert_allclose(g.mean(-1), pp["prompt__gold__reward"], rtol=1e-5, atol=1e-6)


def test_an_online_member_equals_the_same_configuration_alone(pipe, tmp_path):
  config, workdir = pipe
  alone = pipeline.stage_configs(config, workdir)["online"]
  alone.unlock()
  alone.sweep.methods = {"nash_md": ()}
  alone.sweep.betas = (0.5,)
  alone.lock()
  d = str(tmp_path / "alone")
  loop.run(alone, d, log=lambda *_: None, progress=False)
  one = [r for r in _rows(d) if r["step"] == 8]
  swept = [r for r in _rows(os.path.join(workdir, "online"))
           if r["step"] == 8 and r["family"] == "nash_md" and r["beta"] == 0.5]
  assert len(one) == len(swept) == 1
  for k in ("kl", "gold/reward", "loss", "entropy"):
    np.testing.assert_allclose(one[0][k], swept[0][k], rtol=2e-3, atol=1e-5, err_msg=k)


def test_bad_online_configs_fail_naming_the_value(pipe, tmp_path):
  config, workdir = pipe
  for field, value, pattern in (("online.preference", "nonsense", "nonsense"),
                                ("online.preference", "os:no_such_fn", "no_such_fn")):
    c = pipeline.stage_configs(config, workdir)["online"]
    c.unlock()
    keys = field.split(".")
    c[keys[0]][keys[1]] = value
    c.lock()
    with pytest.raises(ValueError, match=pattern):
      loop.run(c, str(tmp_path / field.replace(".", "_")), log=lambda *_: None, progress=False)


def shorter_wins(ctx, ya, ma, yb, mb):
  """A plain pairwise preference (importable as ``test_online:shorter_wins``)."""
  return jax.nn.sigmoid(jnp.sum(mb, -1) - jnp.sum(ma, -1))


def test_proxy_and_callable_preferences_give_the_documented_labels():
  from gpo_jax.proxies import selectors as selectors_lib
  sel = selectors_lib.build(("a", "b", "c"), singles=("*",), ensembles_spec={"e": ("a", "b")},
                            objectives=("mean", "wco"))
  table = {k: jnp.asarray(v) for k, v in sel.table().items()}
  s = jnp.asarray([[0.0, 1.0, 2.0, 0.5], [1.0, 3.0, -1.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
  score_fn = lambda params, ctx, resp, mask: s  # noqa: E731  (rows a, b, c over [y; y′])
  ctx = jnp.zeros((2, 3), jnp.int32)
  y = jnp.zeros((2, 4), jnp.int32)
  m = jnp.ones((2, 4))
  for name, want in (("b", jax.nn.sigmoid(jnp.asarray([1.0 - (-1.0), 3.0 - 0.0]))),
                     ("e/wco", jax.nn.sigmoid(jnp.asarray([0.0 - (-1.0), 1.0 - 0.0])))):
    pref = online.proxy_preference(score_fn, table, sel.index(name))
    p, _, _ = pref({"proxies": None}, ctx, y, m, y, m)
    np.testing.assert_allclose(p, want, rtol=1e-6)
  pref = online.callable_preference("test_online:shorter_wins")
  p, _, _ = pref({}, ctx, y, m, y, m.at[0, 3].set(0.0))
  np.testing.assert_allclose(p, [jax.nn.sigmoid(-1.0), 0.5], rtol=1e-6)
  with pytest.raises(ValueError, match="no_such"):
    online.callable_preference("test_online:no_such")


def test_hard_labels_are_the_argmax_and_change_the_online_loss(tiny_lab):
  np.testing.assert_array_equal(online.hard_label(jnp.asarray([0.2, 0.5, 0.51, 1.0])),
                                [0.0, 0.5, 1.0, 1.0])
  members = _members()
  hp = {k: v[2] for k, v in members.hparams().items()}      # online DPO
  losses_ = []
  for hard in (False, True):
    loss_fn, params, batch = _loss_setup(tiny_lab, members, hard_labels=hard)
    params = jax.tree.map(lambda x: x * 1.05, params)
    losses_.append(float(jax.jit(lambda p: loss_fn(p, batch, hp, jax.random.key(3))[0])(params)))
  # Same samples, labels pushed to 0/1: the logistic loss of hard labels differs.
  assert np.isfinite(losses_).all() and abs(losses_[0] - losses_[1]) > 1e-4, losses_


def test_plain_sampler_when_no_member_mixes(tiny_lab):
  """Without mixing members the loss samples with the plain sampler (no π_ref decode): the
  same draws as the mixture sampler at β_mix = 0, so the same loss; OnlinePO picks it statically."""
  members = _members(methods={"online": ("squared", "logistic")})
  hp = {k: v[1] for k, v in members.hparams().items()}
  mixed, params, batch = _loss_setup(tiny_lab, members)
  plain, _, _ = _loss_setup(tiny_lab, members, mixture=False)
  a, ma = jax.jit(mixed)(params, batch, hp, jax.random.key(2))
  b, mb = jax.jit(plain)(params, batch, hp, jax.random.key(2))
  np.testing.assert_allclose(float(a), float(b), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(ma["response_len"]), float(mb["response_len"]))
  # the plain program has no π_ref decode: fewer transformer layers inside its scan
  n_dots = lambda f: str(jax.make_jaxpr(f)(params, batch, hp, jax.random.key(2))).count(  # noqa: E731
      "dot_general")
  assert n_dots(plain) < n_dots(mixed)
  algo = online.OnlinePO()
  for mems, want in ((members, False), (_members(), True),
                     (_members(methods={"ipo_md": ("squared",)}, mixture_coefs=(0.0,)), False)):
    picked = []
    orig = online.member_loss_fn
    online.member_loss_fn = lambda *a, **k: picked.append(k["mixture"])  # noqa: E731
    try:
      algo._prefs[online._key(_cfg_stub(tiny_lab))] = object()
      algo.loss_fn(None, None, mems, _cfg_stub(tiny_lab))
    finally:
      online.member_loss_fn = orig
    assert picked == [want]


def _cfg_stub(lab):
  """The tiny online pipeline's online-stage config."""
  return lab_fixture.load_config("online.py", "tiny").online
