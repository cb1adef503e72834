"""ICDPO's score on another run's π_ref pool (gpo_jax.incontext.pool_bon) and its report section (gpo_jax.analysis.incontext_pool)."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from gpo_jax.analysis import incontext_pool
from gpo_jax.analysis.findings import Thresholds
from gpo_jax.evaluation import bon as bon_lib
from gpo_jax.evaluation import policy
from gpo_jax.incontext import icdpo
from gpo_jax.incontext import pool_bon
from gpo_jax.incontext import retrieval
import lab_fixture

E, N = 4, 8


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory):
  return lab_fixture.get_tiny_lab(lab_fixture.shared_root(tmp_path_factory))


def _evaluator(lab, n_prompts=E, n=N, seed=0):
  graphdef, _, rest = nnx.split(lab.policy(), nnx.Param, ...)
  ecfg = policy.EvalConfig(n_prompts=n_prompts, ref_samples_per_prompt=n, seed=seed,
                           n_test_pairs=1, bon_n=(1, 4, n))
  return policy.Evaluator.from_lab(lab, graphdef, rest, ecfg)


@pytest.fixture(scope="module")
def rl_dir(tiny_lab, tmp_path_factory):
  """A stand-in for the proxy setting's RL run: its config's eval section and a bon_pool.npz
  (gold from the evaluator, two 'proxies' = gold plus noise of two sizes)."""
  d = tmp_path_factory.mktemp("rl")
  ev = _evaluator(tiny_lab)
  pool = ev.ref_pool()
  gold = pool["gold"]
  rng = np.random.default_rng(0)
  proxies = np.stack([gold + 0.3 * rng.standard_normal(gold.shape),
                      gold + 3.0 * rng.standard_normal(gold.shape)]).astype(np.float32)
  np.savez(d / pool_bon.POOL_FILE, gold=gold, proxies=proxies, response_len=pool["response_len"],
           proxy_names=np.array(["good", "noisy"]), selector_names=np.array(["good", "noisy",
                                                                             "ens/mean"]),
           selector_mask=np.array([[1, 0], [0, 1], [1, 1]], np.float32),
           selector_objective=np.array([0, 0, 0], np.int32),
           selector_lam=np.zeros(3, np.float32))
  (d / "config.json").write_text(json.dumps(
      {"eval": {"n_prompts": E, "ref_samples_per_prompt": N, "seed": 0, "bon_n": [1, 4, N]}}))
  return str(d)


@pytest.fixture(scope="module")
def regen(tiny_lab, rl_dir):
  return pool_bon.regenerate(tiny_lab, rl_dir)


def test_ref_pool_is_the_pool_reference_scores(tiny_lab):
  ev = _evaluator(tiny_lab)
  pool = ev.ref_pool()
  assert pool["tokens"].shape == (E, N, tiny_lab.cfg.corpus.response_len)
  bon = ev.reference()
  np.testing.assert_allclose(pool["gold"].mean(axis=1), bon["ref_per_prompt"]["gold"], rtol=0,
                             atol=1e-6)
  np.testing.assert_allclose(pool["mask"].sum(-1), pool["response_len"])
  # the tokens are π_ref's samples of those prompts: gold recomputed from them matches
  gold_fn, gold_params = tiny_lab.gold_fn()
  ctx = np.repeat(np.asarray(tiny_lab.eval_prompts[:E]), N, axis=0)
  g, _ = gold_fn(gold_params, ctx, pool["tokens"].reshape(E * N, -1),
                 pool["mask"].reshape(E * N, -1))
  np.testing.assert_allclose(np.asarray(g).reshape(E, N), pool["gold"], atol=1e-5)
  # another seed draws another pool
  other = _evaluator(tiny_lab, seed=1).ref_pool()
  assert not np.array_equal(other["tokens"], pool["tokens"])


def test_regenerate_matches_the_stored_pool_and_refuses_another(tiny_lab, rl_dir, regen,
                                                                tmp_path):
  pool = regen
  assert pool["check"]["matching"] == 1.0 and pool["check"]["max_abs_diff"] < 1e-5
  # a pool from another seed is refused, naming the lab
  bad = tmp_path / "bad"
  bad.mkdir()
  with np.load(os.path.join(rl_dir, pool_bon.POOL_FILE)) as z:
    arrays = {k: z[k] for k in z.files}
  arrays["gold"] = _evaluator(tiny_lab, seed=5).ref_pool()["gold"]
  np.savez(bad / pool_bon.POOL_FILE, **arrays)
  (bad / "config.json").write_text(open(os.path.join(rl_dir, "config.json")).read())
  with pytest.raises(pool_bon.PoolMismatch, match="match"):
    pool_bon.regenerate(tiny_lab, str(bad))
  with pytest.raises(FileNotFoundError, match="proxy_setting"):
    pool_bon.regenerate(tiny_lab, str(tmp_path))


def test_score_pool_equals_icdpo_score_per_candidate(tiny_lab, regen):
  pool = regen
  s = pool_bon.score_pool(tiny_lab, pool["tokens"], pool["mask"], ks=(1,), retrievers=("bm25",),
                          contrasts=("base", "bad"), seed=0, batch_size=32)
  assert set(s) == {"likelihood", "icdpo/k1/bm25/base", "icdpo/k1/bm25/bad"}
  # direct: ICDPO's score of every candidate with its prompt's retrieved demonstrations
  ctx = np.asarray(tiny_lab.eval_prompts[:E], np.int32)
  q = retrieval.prompts_from_contexts(ctx)
  dpool = retrieval.DemoPool.from_lab(tiny_lab, "train")
  good = retrieval.retrieve(dpool, q, 1, polarity="good", retriever="bm25", seed=0)
  bad = retrieval.retrieve(dpool, q, 1, polarity="bad", retriever="bm25", seed=0)
  rep = lambda c: np.repeat(c, N, axis=0)  # noqa: E731
  resp, mask = pool["tokens"].reshape(E * N, -1), pool["mask"].reshape(E * N, -1)
  model = tiny_lab.policy()
  plus = rep(good.context(tiny_lab.corpus, q))
  want_base = np.asarray(icdpo.score(model, plus, rep(ctx), resp, mask)).reshape(E, N)
  want_bad = np.asarray(icdpo.score(model, plus, rep(bad.context(tiny_lab.corpus, q)), resp,
                                    mask)).reshape(E, N)
  np.testing.assert_allclose(s["icdpo/k1/bm25/base"], want_base, atol=2e-4)
  np.testing.assert_allclose(s["icdpo/k1/bm25/bad"], want_bad, atol=2e-4)
  lik = np.asarray(icdpo.context_logprobs(model, rep(ctx), resp, mask)).reshape(E, N)
  np.testing.assert_allclose(s["likelihood"], lik, atol=2e-4)


def test_run_writes_curves_the_report_reads(tiny_lab, rl_dir, regen, tmp_path):
  out = pool_bon.run(tiny_lab, rl_dir, str(tmp_path / "icdpo_pool"), ks=(1,),
                     retrievers=("random",), contrasts=("base",))
  st = incontext_pool.load(out)
  assert st.ns == [1, 2, 4, 8]
  assert set(st.per_prompt) == {"likelihood", "icdpo/k1/random/base", pool_bon.ORACLE,
                                "proxy/good", "proxy/noisy", "proxy/ens/mean"}
  assert st.kinds["proxy/good"] == "proxy" and st.kinds[pool_bon.ORACLE] == "oracle"
  # every selector's n = 1 is π_ref (0 after the per-prompt reference subtraction); the oracle
  # bounds every selector at every n; the curves are bon.per_prompt of the scores
  for name, a in st.per_prompt.items():
    np.testing.assert_allclose(a[:, 0], 0.0, atol=1e-6)
    assert np.all(st.per_prompt[pool_bon.ORACLE] >= a - 1e-9), name
  pool = regen
  g = pool["gold"].astype(np.float64)
  g = g - g.mean(axis=1, keepdims=True)
  want = bon_lib.per_prompt(pool["proxies"][0], g, st.ns)
  np.testing.assert_allclose(st.per_prompt["proxy/good"], want, atol=1e-9)
  # the better proxy beats the noisy one at the largest n (gold + 0.3 noise vs gold + 3 noise)
  assert st.per_prompt["proxy/good"][:, -1].mean() > st.per_prompt["proxy/noisy"][:, -1].mean()
  c = incontext_pool.compare(st)
  assert c.proxy[0] in ("proxy/good", "proxy/ens/mean")
  f = incontext_pool.finding(st, Thresholds())
  assert "ICDPO − proxy" in f.text and f.verdict in ("supported", "not supported")
  lines = incontext_pool.render(st)
  assert any("proxy selectors: median" in line for line in lines)
  incontext_pool.write_csv(st, tmp_path)
  csv = (tmp_path / incontext_pool.CSV).read_text().splitlines()
  assert csv[0] == ",".join(incontext_pool.COLUMNS) and len(csv) == 1 + 6 * 4


def test_load_refuses_inconsistent_arrays(tmp_path):
  (tmp_path / incontext_pool.JSON).write_text(json.dumps({"ns": [1, 2], "kinds": {"a": "proxy"}}))
  np.savez(tmp_path / incontext_pool.NPZ, a=np.zeros((4, 3)))
  with pytest.raises(ValueError, match="do not share"):
    incontext_pool.load(tmp_path)
  np.savez(tmp_path / incontext_pool.NPZ, a=np.zeros((4, 2)), b=np.zeros((4, 2)))
  with pytest.raises(ValueError, match="no kind"):
    incontext_pool.load(tmp_path)


def test_pi_ref_pool_is_cached_beside_the_lab_and_never_trusted_blindly(tiny_lab):
  """The scored π_ref pool is kept under <lab root>/pools/<lab dir>/ and reused by later
  evaluators with the same lab, prompts, size, seed and device layout; a damaged file is
  recomputed; cache_pool=False never touches it."""
  import dataclasses
  import glob
  fresh = _evaluator(tiny_lab, seed=12345)
  for f in glob.glob(fresh._pool_path()):
    os.remove(f)
  bon = fresh.reference()
  assert fresh.pool_cache_hit is False and os.path.exists(fresh._pool_path())
  assert os.path.dirname(fresh._pool_path()).endswith(
      os.path.join(policy.POOL_CACHE_DIR, os.path.basename(tiny_lab.path)))
  again = _evaluator(tiny_lab, seed=12345)
  again._sample_pool = lambda: pytest.fail("sampled although the pool is cached")  # noqa: E731
  assert again.reference() == bon and again.pool_cache_hit is True
  np.testing.assert_array_equal(np.asarray(again.ref_gold_ExN), np.asarray(fresh.ref_gold_ExN))
  assert fresh.lab_id.endswith(json.load(open(os.path.join(tiny_lab.path, "lab.json")))[
      "meta_sha256"]) and len(fresh.lab_id) > 20
  # another seed, size or lab is another pool
  other = _evaluator(tiny_lab, seed=12345)
  other.lab_id = "another lab"
  assert other._pool_path() != fresh._pool_path()
  assert _evaluator(tiny_lab, seed=12346)._pool_path() != fresh._pool_path()
  assert _evaluator(tiny_lab, seed=12345, n=N // 2)._pool_path() != fresh._pool_path()
  # ... and so are other compiler options (they may round differently)
  opts = _evaluator(tiny_lab, seed=12345)
  opts.compiler_options = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
  assert opts._pool_path() != fresh._pool_path()
  opts.compiler_options = fresh.compiler_options
  assert opts._pool_path() == fresh._pool_path()
  # a damaged cache is recomputed (same values) and rewritten
  with open(fresh._pool_path(), "wb") as f:
    f.write(b"not an npz")
  third = _evaluator(tiny_lab, seed=12345)
  assert third.reference() == bon and third.pool_cache_hit is False
  assert _evaluator(tiny_lab, seed=12345).reference() == bon
  # opting out
  graphdef, _, rest = nnx.split(tiny_lab.policy(), nnx.Param, ...)
  off = policy.Evaluator.from_lab(tiny_lab, graphdef, rest, dataclasses.replace(
      _evaluator(tiny_lab).ecfg, cache_pool=False))
  assert off.pool_cache is None
  off.reference()
  assert off.pool_cache_hit is None
