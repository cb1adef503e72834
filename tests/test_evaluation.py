"""Tests of the vectorised evaluation: exact KL on one-token responses, k1/k3 agreement, step-0 zeros, offline diagnostics, best-of-n."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpo_jax.evaluation import policy as evaluation
from gpo_jax.core import model as model_lib
from gpo_jax.algorithms import gpo
from gpo_jax.engine import program
from gpo_jax.lab import gold as gold_lib
from gpo_jax.runtime import cpu as cpu_lib

P, V = 4, 10
E, N_PER, N_REF, N_TEST = 8, 96, 16, 24


def _beta_eff(members):
  """``beta f''(0)/|f'(0)|`` of every member in NumPy float32 (the evaluator's arithmetic)."""
  return np.asarray(members.beta, np.float32) * np.asarray(members.beta_eff_scale, np.float32)


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def case():
  """One-token responses (T = 1): the sequence KL is the KL of one categorical per prompt."""
  cfg = model_lib.TransformerConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                    max_len=P + 1)
  policy = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, ref, rest = nnx.split(policy, nnx.Param, ...)
  # Sharpen π_ref so that perturbations give a KL of order 0.1-1.
  ref = jax.tree.map(lambda x: x * 10.0 if x.shape == (16, V) else x, ref)
  gold = model_lib.RewardModel(
      model_lib.TransformerConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                  max_len=P + 1), rngs=nnx.Rngs(1))
  gold_graphdef, gold_state = nnx.split(gold)
  gold_state = jax.tree.map(lambda x: x * 40.0 if x.shape == (16,) else x, gold_state)
  rng = np.random.default_rng(0)

  def prompts(n):
    return np.concatenate([np.ones((n, 1)), rng.integers(5, V, (n, P - 2)), 2 * np.ones((n, 1))],
                          1).astype(np.int32)

  test_prompt = prompts(N_TEST)
  chosen, rejected = (rng.integers(3, V, (N_TEST, 1)).astype(np.int32) for _ in range(2))
  ones = np.ones((N_TEST, 1), np.int32)
  ref_model = nnx.merge(graphdef, ref, rest)

  def lp(r):
    return np.asarray(model_lib.response_logprobs(
        ref_model, np.concatenate([test_prompt, r], 1),
        np.concatenate([np.zeros_like(test_prompt), ones], 1)))

  test = dict(prompt=test_prompt, chosen=chosen, rejected=rejected, chosen_mask=ones,
              rejected_mask=ones, ref_chosen_logps=lp(chosen), ref_rejected_logps=lp(rejected),
              gold_chosen=np.zeros(N_TEST, np.float32), gold_rejected=np.zeros(N_TEST, np.float32))
  members = gpo.make_members(["logistic", "squared"], [0.5], seeds=(0, 1), n_train=8,
                               batch_size=1)
  # Member 0 is π_ref itself (step 0); the others are π_ref with Gaussian perturbations.
  stacked = program.stack(ref, members.size)
  keys = jax.random.split(jax.random.key(42), members.size)
  scale = jnp.asarray([0.0, 0.3, 0.6, 1.0])

  def perturb(x, path_i):
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, path_i), x.shape[1:]))(keys)
    return x + scale.reshape((-1,) + (1,) * (x.ndim - 1)) * noise * jnp.std(x[0])

  leaves, treedef = jax.tree.flatten(stacked)
  stacked = jax.tree.unflatten(treedef, [perturb(x, i) for i, x in enumerate(leaves)])
  eval_prompts = prompts(E)
  ev = evaluation.Evaluator(
      graphdef=graphdef, rest=rest, ref_params=ref,
      gold_fn=gold_lib.make_gold_fn(gold_graphdef, 0.3, 2.0, gold_lib.GoldTerms()),
      gold_params={"net": gold_state, "tables": {}}, eval_prompts=eval_prompts,
      test_pairs=test,
      ecfg=evaluation.EvalConfig(n_prompts=E, samples_per_prompt=N_PER,
                                 ref_samples_per_prompt=N_REF, n_test_pairs=0, member_chunk=2,
                                 bon_n=(1, 2, 4, 16)))
  bon = ev.reference()
  res = ev(stacked, members.hparams(), 5)
  return dict(ev=ev, res=res, bon=bon, stacked=stacked, graphdef=graphdef, rest=rest, ref=ref,
              members=members, eval_prompts=eval_prompts, test=test, gold=(gold_graphdef,
                                                                           gold_state))


def _logits_last(case, params):
  m = nnx.merge(case["graphdef"], params, case["rest"])
  return np.asarray(m(jnp.asarray(case["eval_prompts"]))[:, -1], np.float64)


def test_exact_kl_equals_categorical_kl_for_one_token_responses(case):
  q = _softmax(_logits_last(case, case["ref"]))
  for m in range(case["members"].size):
    p = _softmax(_logits_last(case, jax.tree.map(lambda x: x[m], case["stacked"])))
    want = np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
    np.testing.assert_allclose(case["res"]["kl"][m], want, rtol=2e-4, atol=1e-6, err_msg=(
        f"member {m}: the exact per-token KL estimator differs from the categorical KL "
        "computed in NumPy (each prompt weighted equally, as the samples are)"))
  assert case["res"]["kl"][3] > 0.05, "the test needs a visibly perturbed policy"


def test_sample_estimators_agree_with_exact_kl_within_standard_errors(case):
  res = case["res"]
  for m in range(1, case["members"].size):
    for est in ("kl_k1", "kl_k3"):
      z = (res[est][m] - res["kl"][m]) / np.hypot(res[est + "_se"][m], res["kl_se"][m])
      assert abs(z) < 4, (f"member {m}: {est}={res[est][m]:.4f}±{res[est + '_se'][m]:.4f} "
                          f"disagrees with exact kl={res['kl'][m]:.4f} (z={z:.1f})")
  assert np.all(res["n_samples"] == E * N_PER)
  np.testing.assert_allclose(res["sqrt_kl"], np.sqrt(res["kl"]), rtol=1e-6)


def test_step_zero_policy_has_zero_kl_and_zero_gold(case):
  res = case["res"]
  # Policy and reference go through the same batched forward: exactly zero.
  for k in ("kl", "kl_k1", "kl_k3"):
    assert res[k][0] == 0.0, f"{k}={res[k][0]} for a policy equal to π_ref; it must be exactly 0"
  # Reference log-probs of the pairs come from the dataset (another code path): ~0.
  for k in ("rewards/chosen", "rewards/margins", "rho/mean", "offline_reg"):
    assert abs(res[k][0]) < 1e-5, f"{k}={res[k][0]} for a policy equal to π_ref; it must be 0"
  assert abs(res["gold/reward"][0]) < 4 * res["gold/reward_se"][0], (
      f"gold/reward={res['gold/reward'][0]} of π_ref samples is not 0 within 4 standard errors")
  assert abs(res["gold/win_rate"][0] - 0.5) < 4 * res["gold/win_rate_se"][0] + 1e-3, (
      f"π_ref's win rate against itself is {res['gold/win_rate'][0]}, not 1/2")


def test_offline_diagnostics_match_independent_log_probs(case):
  res, t = case["res"], case["test"]
  ctx = np.concatenate([t["prompt"], t["prompt"]])
  resp = np.concatenate([t["chosen"], t["rejected"]])
  for m in range(case["members"].size):
    model = nnx.merge(case["graphdef"], jax.tree.map(lambda x: x[m], case["stacked"]),
                      case["rest"])
    lp = np.asarray(model_lib.response_logprobs(
        model, np.concatenate([ctx, resp], 1),
        np.concatenate([np.zeros_like(ctx), np.ones_like(resp)], 1)), np.float64)
    w = lp[:N_TEST] - t["ref_chosen_logps"]
    l_ = lp[N_TEST:] - t["ref_rejected_logps"]
    beta = case["members"].beta[m]
    np.testing.assert_allclose(res["rewards/chosen"][m], beta * w.mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res["rewards/rejected"][m], beta * l_.mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res["rho/mean"][m], (w - l_).mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res["offline_reg"][m], 0.5 * np.mean((w - l_) ** 2), rtol=1e-4,
                               atol=1e-6)
    if m > 0:   # the NumPy margins of m = 0 are 0 only up to rounding; the evaluator's exactly
      np.testing.assert_allclose(res["rewards/accuracies"][m], np.mean(w > l_), atol=1e-6)
    else:       # π_ref's log-ratios come from the same forward as its own, so exactly 0
      assert res["rewards/accuracies"][0] == 0.0 and res["rho/mean"][0] == 0.0, (
          "a member equal to π_ref must have exactly zero offline margins and accuracy")
  np.testing.assert_allclose(res["beta_eff"], _beta_eff(case["members"]), rtol=1e-6)


def test_best_of_n_baseline(case):
  bon = case["bon"]
  assert bon["selector"] == "gold" and bon["N"] == N_REF and bon["n"] == [1, 2, 4, 16]
  assert abs(bon["gold"][0]) < 1e-6, "best-of-1 is the π_ref pool mean, which is subtracted"
  assert np.all(np.diff(bon["gold"]) > 0), f"best-of-n gold must grow with n: {bon['gold']}"
  ref_gold = np.asarray(case["ev"].ref_gold_ExN, np.float64)
  np.testing.assert_allclose(bon["gold"][-1], ref_gold.max(1).mean() - ref_gold.mean(),
                             rtol=1e-5, err_msg="best-of-N over a pool of N is the pool max")


def test_per_prompt_means_give_the_metric_and_its_prompt_clustered_se(case):
  """Every sampled metric is the mean of its [M, E] per-prompt means; its SE is their spread / sqrt(E)."""
  res = case["res"]
  for name in ("kl", "gold/reward", "gold/win_rate", "response_len", "eos_frac", "gold/network"):
    per = np.asarray(res["prompt/" + name], np.float64)
    assert per.shape == (case["members"].size, E), (name, per.shape)
    np.testing.assert_allclose(res[name], per.mean(1), rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(res[name + "_se"], per.std(1, ddof=1) / np.sqrt(E), rtol=1e-4,
                               atol=1e-7, err_msg=name)
  # gold/reward is paired with π_ref's pool mean on the same prompt (control variate).
  ref_e = np.asarray(case["ev"].ref_gold_ExN, np.float64).mean(1)
  assert np.all(np.isfinite(ref_e))
  np.testing.assert_allclose(case["bon"]["ref_per_prompt"]["gold"], ref_e, rtol=1e-5, atol=1e-6)
  assert np.all(res["n_prompts"] == E)
  # One-token responses never end with EOS unless the token is EOS.
  assert np.all((res["response_len"] == 1.0))


def test_measuring_while_sampling_equals_the_two_pass_evaluation(case):
  """The evaluator measures π against π_ref inside the sampler and scores gold from the
  eval contexts' cached states; the former path (sample, then a second forward of both
  models over the finished sequences, gold over whole sequences) gives the same metrics."""
  ev, res = case["ev"], case["res"]
  ev.two_pass = True
  try:
    old = ev(case["stacked"], case["members"].hparams(), 5)
  finally:
    ev.two_pass = False
  for name in ("kl", "kl_k1", "kl_k3", "entropy", "gold/reward", "gold/win_rate",
               "gold/network", "response_len", "rewards/margins"):
    np.testing.assert_allclose(res[name], old[name], rtol=1e-4, atol=1e-5, err_msg=name)
  np.testing.assert_array_equal(res[evaluation.SHOWN + "response"],
                                old[evaluation.SHOWN + "response"])
  assert float(np.max(res["kl"])) > 0.05 and float(np.std(res["gold/reward"])) > 0


def test_the_evaluation_compiles_as_a_forward_program_and_options_change_no_result(case):
  """The evaluator jits with the platform's options for forward programs — its compiled
  program's YNNPACK calls are single dots, unlike under JAX's default options — and JAX's
  default options (set on the evaluator: it re-jits and recomputes the gold prefix) give the
  same metrics and responses."""
  from test_cpu import _ynn_bodies
  ev, res = case["ev"], case["res"]
  assert ev.compiler_options == cpu_lib.compiler_options(None, "forward")
  if ev.compiler_options is None:
    pytest.skip("this jaxlib accepts no XLA:CPU options: nothing to compare")
  params, hp = case["stacked"], case["members"].hparams()

  def bodies():
    return _ynn_bodies(ev._run(params, hp, 5, lower=True).compile().as_text())

  opts = ev.compiler_options
  tuned = bodies()
  assert tuned and all(ops == {"dot"} for ops in tuned), tuned
  ev.compiler_options = None
  try:
    assert ev.gold_prefix is None
    default = bodies()
    other = ev(params, hp, 5)
  finally:
    ev.compiler_options = opts
  norm = lambda x: jnp.mean(jnp.square(jnp.tanh(x)), axis=-1)  # noqa: E731
  probe = _ynn_bodies(jax.jit(norm).lower(jnp.ones((512, 64))).compile().as_text())
  if not probe:
    pytest.skip("this jaxlib hands no elementwise/reduce work to YNNPACK by default")
  assert any(ops != {"dot"} for ops in default), (
      f"with JAX's default options the evaluation should use more than single dots: {default}")
  for name in ("kl", "entropy", "gold/reward", "gold/win_rate", "rewards/margins"):
    np.testing.assert_allclose(res[name], other[name], rtol=1e-4, atol=1e-5, err_msg=name)
  np.testing.assert_array_equal(res[evaluation.SHOWN + "response"],
                                other[evaluation.SHOWN + "response"])


def test_a_gold_function_without_a_prefix_path_scores_whole_sequences(case):
  """A user-supplied gold function (a plain callable, no ``prefix``/``after_prefix``) is
  called on whole sequences; it gives the lab gold's metrics (same function underneath)."""
  ev = case["ev"]
  plain = lambda p, c, r, m: ev.gold_fn(p, c, r, m)  # noqa: E731
  assert not hasattr(plain, "prefix")
  other = evaluation.Evaluator(
      graphdef=case["graphdef"], rest=case["rest"], ref_params=case["ref"], gold_fn=plain,
      gold_params=ev.gold_state, eval_prompts=case["eval_prompts"], test_pairs=case["test"],
      ecfg=ev.ecfg)
  other.reference()
  assert other.ref_gold_mean == pytest.approx(ev.ref_gold_mean, abs=1e-5)
  res = other(case["stacked"], case["members"].hparams(), 5)
  assert other.gold_prefix is None
  for name in ("gold/reward", "gold/win_rate", "gold/network"):
    np.testing.assert_allclose(res[name], case["res"][name], rtol=1e-4, atol=1e-5, err_msg=name)
