"""ICDPO and demonstration retrieval (gpo_jax.incontext) on the tiny lab: the scorer, the retrievers' guards, the stored retrieval and ICDPO's effect on gold."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpo_jax.incontext import icdpo
from gpo_jax.incontext import retrieval
from gpo_jax.lab import corpus as corpus_lib
import lab_fixture


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory):
  return lab_fixture.get_tiny_lab(lab_fixture.shared_root(tmp_path_factory))


@pytest.fixture(scope="module")
def pool(tiny_lab):
  return retrieval.DemoPool.from_lab(tiny_lab)


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _direct_logprobs(model, ctx_BxC, resp_BxT, mask_BxT) -> np.ndarray:
  """``log π(y | ctx)`` per candidate: a full-sequence forward of ``ctx + y``, then a loop over
  candidates and their response tokens in NumPy."""
  graphdef, state = nnx.split(model)
  seq = np.concatenate([ctx_BxC, resp_BxT], axis=1).astype(np.int32)
  logits = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, jnp.asarray(seq))
  c = ctx_BxC.shape[1]
  out = []
  for b in range(seq.shape[0]):
    logp = _log_softmax(logits[b])
    out.append(sum(logp[c - 1 + j, resp_BxT[b, j]] for j in range(int(mask_BxT[b].sum()))))
  return np.array(out)


def test_score_and_select_equal_a_direct_per_candidate_computation(tiny_lab, pool):
  model, corpus = tiny_lab.policy(), tiny_lab.corpus
  ctx_base = np.asarray(tiny_lab.eval_prompts[:3])
  queries = retrieval.prompts_from_contexts(ctx_base)
  good = retrieval.retrieve(pool, queries, 2, polarity="good", retriever="random", seed=1)
  bad = retrieval.retrieve(pool, queries, 1, polarity="bad", retriever="random", seed=1)
  ctx_plus, ctx_bad = good.context(corpus, queries), bad.context(corpus, queries)
  assert ctx_plus.shape[1] == corpus.cfg.episode_len(2) - corpus.cfg.response_len
  assert ctx_plus.shape[1] != ctx_bad.shape[1] != ctx_base.shape[1]
  n, T = 4, corpus.cfg.response_len
  out = icdpo.select(model, ctx_plus, ctx_base, jax.random.key(3), n, max_new_tokens=T)
  cand, cmask = out["candidates"], out["candidate_masks"]
  assert cand.shape == (3, n, T) and cmask.sum(-1).min() >= 2
  flat = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731
  rep = lambda c: np.repeat(c, n, axis=0)  # noqa: E731
  graphdef, state = nnx.split(model)
  score = jax.jit(lambda st, *a: icdpo.score(nnx.merge(graphdef, st), *a))
  r, m = flat(cand), flat(cmask)
  lp_plus = _direct_logprobs(model, rep(ctx_plus), r, m)
  for ctx_minus in (ctx_base, ctx_bad):
    s = np.asarray(score(state, rep(ctx_plus), rep(ctx_minus), r, m))
    direct = lp_plus - _direct_logprobs(model, rep(ctx_minus), r, m)
    np.testing.assert_allclose(s, direct, atol=1e-4, rtol=0)
    assert np.std(direct) > 0.1      # the candidates' scores differ: the check has teeth
  # select: the scores are S of its candidates (contrast base) and it returns their argmax.
  s_base = np.asarray(score(state, rep(ctx_plus), rep(ctx_base), r, m))
  np.testing.assert_allclose(out["scores"].reshape(-1), s_base, atol=1e-5)
  np.testing.assert_array_equal(out["index"], s_base.reshape(3, n).argmax(-1))
  np.testing.assert_array_equal(out["response"], cand[np.arange(3), out["index"]])


def test_runner_scores_each_context_once_with_the_same_numbers(tiny_lab, pool):
  """``Runner.lp_per_context`` / ``pair_per_context`` (each context once for its n samples,
  batches of whole groups, the last padded) equal ``lp`` / ``pair`` on repeated contexts and
  the direct per-candidate computation; the token KL between the two contexts too."""
  corpus = tiny_lab.corpus
  e, n = 5, 3
  cfg = icdpo.ICDPOConfig(ns=(1, 2), ks=(1,), retrievers=("random",), contrasts=("base",),
                          pool_per_prompt=n, ref_samples_per_prompt=n, batch_size=8)
  runner = icdpo.Runner(tiny_lab, cfg)            # 8 // 3 = 2 contexts per batch: 3 batches
  ctx_base = np.asarray(tiny_lab.eval_prompts[:e])
  queries = retrieval.prompts_from_contexts(ctx_base)
  good = retrieval.retrieve(pool, queries, 2, polarity="good", retriever="random", seed=2)
  ctx_plus = good.context(corpus, queries)
  resp, mask = runner.sample(ctx_plus, n, 7)
  rep = lambda c: np.repeat(c, n, axis=0)  # noqa: E731
  got = runner.lp_per_context(ctx_plus, resp, mask, n)
  want = runner.lp(rep(ctx_plus), resp, mask)
  assert got.shape == (e * n,)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  np.testing.assert_allclose(got, _direct_logprobs(tiny_lab.policy(), rep(ctx_plus), resp, mask),
                             atol=1e-4, rtol=0)
  pa, pb, kl = runner.pair_per_context(ctx_plus, ctx_base, resp, mask, n)
  wa, wb, wkl = runner.pair(rep(ctx_plus), rep(ctx_base), resp, mask)
  for g, w in ((pa, wa), (pb, wb), (kl, wkl)):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)
  assert np.std(pa - pb) > 0.05 and kl.min() >= 0 and kl.max() > 0.01
  with pytest.raises(ValueError, match="context-major"):
    runner.lp_per_context(ctx_plus, resp[:-1], mask[:-1], n)


def test_retrieval_respects_gold_rank_and_never_leaks_the_query(tiny_lab, pool):
  model = tiny_lab.policy()
  q = 0.25
  hi = np.quantile(pool.gold_N, 1 - q)
  lo = np.quantile(pool.gold_N, q)
  # Queries that ARE pool prompts, from each band (an exact match scores highest for bm25 and
  # embedding, so only the guard keeps their own responses out), plus held-out prompts.
  own_good = np.flatnonzero(pool.gold_N >= hi)[:4]
  own_bad = np.flatnonzero(pool.gold_N <= lo)[:4]
  queries = np.concatenate([pool.prompts_NxP[own_good], pool.prompts_NxP[own_bad],
                            retrieval.prompts_from_contexts(tiny_lab.eval_prompts[:8])])
  bm = retrieval.bm25_scores(pool.prompts_NxP, queries[:8])
  assert np.all(np.all(pool.prompts_NxP[bm.argmax(1)] == queries[:8], axis=1))
  for retriever in retrieval.RETRIEVERS:
    for polarity in retrieval.POLARITIES:
      d = retrieval.retrieve(pool, queries, 4, polarity=polarity, retriever=retriever, seed=0,
                             gold_quantile=q, model=model)
      assert d.index_ExK.shape == (len(queries), 4)
      if polarity == "good":
        assert d.threshold == pytest.approx(hi) and np.all(d.gold_ExK >= hi)
      else:
        assert d.threshold == pytest.approx(lo) and np.all(d.gold_ExK <= lo)
      np.testing.assert_array_equal(d.gold_ExK, pool.gold_N[d.index_ExK])
      for e in range(len(queries)):
        assert len(set(d.index_ExK[e].tolist())) == 4, (retriever, polarity, e)
        assert not np.any(np.all(d.prompts_ExKxP[e] == queries[e], axis=-1)), (retriever, e)
      first = 0 if polarity == "good" else 4    # the rows of the queries taken from this band
      own = own_good if polarity == "good" else own_bad
      for i, item in enumerate(own):
        assert item not in d.index_ExK[first + i] and item ^ 1 not in d.index_ExK[first + i]
  # k beyond what π_ref was trained on, and unknown choices, are named.
  with pytest.raises(ValueError, match=r"k=4 .*max_demos=2"):
    d.context(tiny_lab.corpus, queries)
  with pytest.raises(ValueError, match=r"'tfidf'.*\['random', 'bm25', 'embedding'\]"):
    retrieval.retrieve(pool, queries, 2, retriever="tfidf")
  with pytest.raises(ValueError, match=r"'best'.*\['good', 'bad'\]"):
    retrieval.retrieve(pool, queries, 2, polarity="best")
  with pytest.raises(ValueError, match="needs model"):
    retrieval.retrieve(pool, queries, 2, retriever="embedding")
  with pytest.raises(ValueError, match=r"contrast 'none'.*\['base', 'bad'\]"):
    icdpo.ICDPOConfig(contrasts=("none",))


def test_bm25_scores_by_hand_and_ranks_the_overlapping_prompt_first(pool):
  # Three documents of unigrams + bigrams; query (5, 6): n-grams (5,), (6,), (5, 6).
  docs = np.array([[5, 6, 7], [7, 8, 9], [5, 9, 9]])
  s = retrieval.bm25_scores(docs, np.array([[5, 6, 9]]), k1=1.5, b=0.75)[0]
  idf = lambda df: np.log1p((3 - df + 0.5) / (df + 0.5))  # noqa: E731
  sat = lambda f, dl, avg: f * 2.5 / (f + 1.5 * (0.25 + 0.75 * dl / avg))  # noqa: E731
  # Every doc has 5 n-grams; query n-grams (5,) (6,) (9,) (5,6) (6,9).
  want0 = idf(2) * sat(1, 5, 5) + idf(1) * sat(1, 5, 5) + idf(1) * sat(1, 5, 5)   # 5, 6, (5,6)
  want1 = idf(2) * sat(1, 5, 5)                                                     # 9
  want2 = idf(2) * sat(1, 5, 5) + idf(2) * sat(2, 5, 5)                             # 5, 9x2
  np.testing.assert_allclose(s, [want0, want1, want2], rtol=1e-12)
  # On the lab's pool: a pool prompt with its last token changed is nearest its original.
  g = np.flatnonzero(pool.eligible("good", 0.25))
  rng = np.random.default_rng(0)
  for i in rng.choice(g, 5, replace=False):
    q = pool.prompts_NxP[i].copy()
    q[-1] = corpus_lib.FIRST_CONTENT + (q[-1] - corpus_lib.FIRST_CONTENT + 1) % 27
    assert not np.any(np.all(pool.prompts_NxP == q, axis=1))
    d = retrieval.retrieve(pool, q[None], 2, polarity="good", retriever="bm25")
    np.testing.assert_array_equal(d.prompts_ExKxP[0, 0], pool.prompts_NxP[i])


def test_embedding_retrieval_returns_the_nearest_by_cosine(tiny_lab, pool):
  model = tiny_lab.policy()
  queries = retrieval.prompts_from_contexts(tiny_lab.eval_prompts[:6])
  d = retrieval.retrieve(pool, queries, 2, polarity="bad", retriever="embedding", model=model)

  graphdef, state = nnx.split(model)

  @jax.jit
  def hidden(st, ctx):
    m = nnx.merge(graphdef, st)
    return m.decoder(m.decoder.embed(ctx))[0]

  def mean_hidden(prompts):   # π_ref's final hidden states, mean over the prompt tokens
    h = hidden(state, jnp.asarray(tiny_lab.corpus.context(prompts)))
    return np.asarray(h, np.float64)[:, 1:-1].mean(1)

  elig = np.flatnonzero(pool.eligible("bad", 0.25))
  pe, qe = mean_hidden(pool.prompts_NxP[elig]), mean_hidden(queries)
  cos = (qe / np.linalg.norm(qe, axis=1, keepdims=True)) @ (
      pe / np.linalg.norm(pe, axis=1, keepdims=True)).T
  for e in range(len(queries)):
    order = elig[np.argsort(-cos[e], kind="stable")]
    distinct = [i for j, i in enumerate(order)
                if not any(np.array_equal(pool.prompts_NxP[i], pool.prompts_NxP[o])
                           for o in order[:j])]
    # Pair partners share a prompt (equal cosine, tie broken at random): compare prompts.
    np.testing.assert_array_equal(d.prompts_ExKxP[e], pool.prompts_NxP[distinct[:2]])
    np.testing.assert_allclose(d.score_ExK[e], cos[e, np.searchsorted(elig, distinct[:2])],
                               atol=1e-5)


def test_stored_retrieval_reloads_identically_and_its_hash_covers_the_settings(
    tiny_lab, pool, tmp_path, monkeypatch):
  queries = retrieval.prompts_from_contexts(tiny_lab.eval_prompts[:10])
  s = retrieval.RetrievalSettings(k=2, polarity="good", retriever="bm25", seed=0)
  first = retrieval.load_or_retrieve(str(tmp_path), tiny_lab, queries, s, pool=pool)
  files = os.listdir(tmp_path)
  assert files == [f"retrieval-{first.key}.npz"]
  # The second call must load, not recompute.
  monkeypatch.setattr(retrieval, "retrieve", lambda *a, **k: pytest.fail("recomputed"))
  again = retrieval.load_or_retrieve(str(tmp_path), tiny_lab, queries, s, pool=pool)
  monkeypatch.undo()
  for name, v in first.arrays().items():
    np.testing.assert_array_equal(again.arrays()[name], v, err_msg=name)
  assert again.settings == s and again.threshold == first.threshold
  keys = {first.key}
  for change in (dict(k=1), dict(seed=1), dict(polarity="bad"), dict(retriever="random"),
                 dict(gold_quantile=0.5), dict(distinct_prompts=False)):
    keys.add(retrieval.retrieval_key(retrieval.lab_digest(tiny_lab), pool, queries,
                                     dataclasses.replace(s, **change)))
  keys.add(retrieval.retrieval_key(retrieval.lab_digest(tiny_lab), pool, queries[:9], s))
  assert len(keys) == 8
  other = retrieval.load_or_retrieve(str(tmp_path), tiny_lab, queries,
                                     dataclasses.replace(s, seed=1), pool=pool)
  assert other.key != first.key and len(os.listdir(tmp_path)) == 2


def test_icdpo_raises_gold_over_best_of_n_by_likelihood(tiny_lab):
  """ICDPO (k = 2 good demos by BM25, contrast base) against best-of-N by log π_ref(y|x).

  Measured on the tiny lab (64 eval prompts, pools of 32 per prompt, seed 0; gold minus
  π_ref's per-prompt mean, SEs clustered by prompt), N = 16:
    ICDPO base +0.06 ± 0.08, best-of-16 by likelihood −0.33 ± 0.05, paired difference
    +0.38 ± 0.11 (z ≈ 3.4); plain π_ref(·|D⁺, x) sampling −0.06 ± 0.03; gold-selected
    best-of-16 (the ceiling) +1.60 ± 0.05.
  So ICDPO clearly beats best-of-N by likelihood (which selects short, likely responses
  that gold dislikes), but against π_ref itself its gain is not detectable on the tiny lab:
  its SE of ~0.08 would detect (2.8 SE: 5% two-sided, 80% power) an effect of about 0.23
  gold std. Demonstrations of high gold do not raise gold in context here (the tiny lab's
  gold is a random network whose style means differ by only ±0.15).
  """
  cfg = icdpo.ICDPOConfig(ns=(1, 4, 16), ks=(2,), retrievers=("bm25",),
                          contrasts=("base", "bad"), pool_per_prompt=32,
                          ref_samples_per_prompt=32, n_test_pairs=64)
  res = icdpo.evaluate(tiny_lab, cfg)
  (lik,) = res.find(method="bon_likelihood", n=16)
  (ic,) = res.find(method="icdpo", n=16, contrast="base")
  (plain,) = res.find(method="icl_sample")
  (best,) = res.find(method="bon_gold", n=16)
  # The effect: ICDPO's gold over best-of-N by likelihood, paired per prompt.
  assert ic["d_gold"] > 2.0 * ic["d_gold_se"] > 0, (ic["d_gold"], ic["d_gold_se"])
  assert ic["gold"] > lik["gold"]
  np.testing.assert_allclose(ic["d_gold"], ic["gold"] - lik["gold"], atol=1e-9)
  # Against π_ref: finite, with an SE small enough to see an effect of 0.3 gold std.
  assert np.isfinite(ic["gold"]) and 0 < ic["gold_se"] < 0.3 / 2.8
  assert best["gold"] > ic["gold"] + 0.5 and lik["gold"] < 0
  # Bookkeeping: N = 1 is plain sampling from q; KL bracket k1 <= KL <= k1 + kl_bon(N).
  (ic1,) = res.find(method="icdpo", n=1, contrast="base")
  assert ic1["gold"] == pytest.approx(plain["gold"]) and ic1["k1"] == pytest.approx(plain["k1"])
  assert plain["k1"] == pytest.approx(plain["kl_icl"], abs=4 * plain["kl_icl_se"] + 0.05)
  assert ic["kl_lower"] <= ic["kl"] == pytest.approx(ic["k1"] + np.log(16) - 15 / 16)
  assert ic["k1"] > plain["k1"]           # selection (contrast base: S = k1) raises k1
  assert lik["kl"] == pytest.approx(np.log(16) - 15 / 16) and lik["k1"] == 0
  assert res.per_prompt["icdpo/k2/bm25/base/gold"].shape == (64, 3)
  (acc,) = [r for r in res.reward_rows if r["reward"] == "icdpo" and r["contrast"] == "base"]
  assert 0 <= acc["accuracy"] <= 1 and acc["n_pairs"] > 50


def test_a_stored_evaluation_reloads_exactly(tmp_path):
  res = icdpo.ICDPOResult(
      rows=[{"method": "icdpo", "n": 4, "k": 2, "retriever": "bm25", "contrast": "base",
             "gold": 0.25, "gold_se": 0.1}],
      per_prompt={"icdpo/k2/bm25/base/gold": np.arange(6.0).reshape(3, 2)},
      reward_rows=[{"reward": "icdpo", "accuracy": 0.5, "n_pairs": 10}],
      info={"ns": [1, 4], "n_prompts": 3})
  d = icdpo.save(res, str(tmp_path / "icdpo"))
  back = icdpo.load(d)
  assert back.rows == res.rows and back.reward_rows == res.reward_rows and back.info == res.info
  np.testing.assert_array_equal(back.per_prompt["icdpo/k2/bm25/base/gold"],
                                res.per_prompt["icdpo/k2/bm25/base/gold"])
  with pytest.raises(FileNotFoundError, match="missing"):
    icdpo.load(str(tmp_path / "nowhere"))
