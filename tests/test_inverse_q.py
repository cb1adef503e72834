"""Inverse-Q*-style token RL (our reconstruction): dense rewards from the in-context policy, members, one engine run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpo_jax.algorithms import inverse_q
from gpo_jax.algorithms.base import SHARED
from gpo_jax.core import model as model_lib
from gpo_jax.core import sampling
from gpo_jax.incontext import retrieval
from gpo_jax.run import loop
import lab_fixture


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory):
  """The coherent-gold tiny lab the tiny configs use (shared with the online and proxy tests)."""
  from gpo_jax import lab as lab_lib
  config = lab_fixture.load_config("inverse_q.py", "tiny")
  return lab_lib.build_or_load(lab_lib.LabConfig.from_dict(config.lab),
                               lab_fixture.shared_root(tmp_path_factory), log=lambda *_: None)


def _guided(lab, n=8, k=2):
  prompts = np.asarray(lab.pairs("train")["prompt"][:n])
  demos = retrieval.retrieve(retrieval.DemoPool.from_lab(lab),
                             retrieval.prompts_from_contexts(prompts), k, retriever="bm25")
  return prompts, demos.context(lab.corpus, retrieval.prompts_from_contexts(prompts))


def test_token_rewards_sum_to_the_in_context_sequence_log_ratio(tiny_lab):
  """Σ_t r_t (kl_coef = 0) = β·[log π_ref(y|c, x) − log π_ref(y|x)], each side computed by
  ``model.response_logprobs`` on the full sequences (an independent code path)."""
  prompts, guide = _guided(tiny_lab)
  ref = tiny_lab.policy()
  resp, mask = sampling.sample(ref, jnp.asarray(prompts), jax.random.key(0),
                               max_new_tokens=tiny_lab.cfg.corpus.response_len)
  lp_ref = inverse_q.response_token_logprobs(ref, jnp.asarray(prompts), resp, mask)
  lp_star = inverse_q.response_token_logprobs(ref, jnp.asarray(guide), resp, mask)
  r = inverse_q.token_rewards(lp_star, lp_ref, lp_ref, mask, 2.5, 0.0)
  full = lambda ctx: model_lib.response_logprobs(  # noqa: E731
      ref, *sampling.concat_response(jnp.asarray(ctx), resp, mask))
  np.testing.assert_allclose(jnp.sum(r, -1), 2.5 * (full(guide) - full(prompts)),
                             rtol=1e-4, atol=1e-4)
  # The KL part: with π = π_ref it is exactly 0 (β = 0 leaves only it).
  np.testing.assert_array_equal(inverse_q.token_rewards(lp_star, lp_ref, lp_ref, mask, 0.0, 1.0),
                                np.zeros_like(r))
  # Guidance changes the likelihoods (the demonstrations are read).
  assert float(jnp.max(jnp.abs(lp_star - lp_ref))) > 1e-2


def test_members_and_bad_values():
  m = inverse_q.make_members(("bm25", "random"), (1.0, 4.0), (0.5,), n_train=64, batch_size=4)
  assert list(m.columns["family"]) == ["iq_bm25"] * 2 + ["iq_random"] * 2
  np.testing.assert_allclose(m.columns["beta_eff_scale"], [2.0] * 4)
  with pytest.raises(ValueError, match="oracle"):
    inverse_q.make_members(("oracle",), (1.0,), n_train=64, batch_size=4)
  with pytest.raises(ValueError, match="kl_coefs"):
    inverse_q.make_members(("bm25",), (1.0,), (0.0,), n_train=64, batch_size=4)


def test_the_step_compiles_once_for_any_guidance_beta_and_kl(tiny_lab):
  prompts, guide_bm25 = _guided(tiny_lab, n=4)
  guide = jnp.stack([jnp.asarray(guide_bm25), jnp.asarray(guide_bm25)[::-1]], axis=1)
  graphdef, params, rest = nnx.split(tiny_lab.policy(), nnx.Param, ...)
  loss_fn = inverse_q.member_loss_fn(graphdef, rest, k=2,
                                     response_len=tiny_lab.cfg.corpus.response_len)
  batch = {"prompt": jnp.asarray(prompts), "guide": guide, SHARED: {"ref": params}}
  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  losses = []
  for g, b, kl in ((0, 1.0, 1.0), (1, 4.0, 0.5), (0, 0.5, 2.0)):
    hp = {"guidance_idx": jnp.int32(g), "beta": jnp.float32(b), "kl_coef": jnp.float32(kl)}
    (loss, metrics), grads = step(params, batch, hp, jax.random.key(0))
    losses.append(float(loss))
    assert set(metrics) == set(inverse_q.TRAIN_METRICS)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))
  assert step._cache_size() == 1 and len(set(losses)) == 3


def test_a_tiny_run_trains_every_guidance(tmp_path_factory, tiny_lab):
  config = lab_fixture.load_config("inverse_q.py", "tiny")
  config.unlock()
  config.lab_root = lab_fixture.shared_root(tmp_path_factory)
  config.analyze = False
  config.sweep.guidances = ("random", "bm25")
  config.sweep.betas = (4.0,)
  config.train.steps = 6
  config.eval.every = 6
  config.eval.n_prompts = 4
  config.checkpoint.every = 6
  config.lock()
  d = str(tmp_path_factory.mktemp("iq") / "run")
  loop.run(config, d, log=lambda *_: None, progress=False)
  rows = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
  last = [r for r in rows if r["step"] == 6]
  assert sorted(r["family"] for r in last) == ["iq_bm25", "iq_random"]
  assert all(r["kl"] > 0 and np.isfinite(r["iq/reward"]) and np.isfinite(r["loss"]) for r in last)
  # The retrieval is stored beside the lab and reused.
  store = os.path.join(config.lab_root, "retrieval")
  assert any(f.endswith(".npz") for _, _, fs in os.walk(store) for f in fs)
