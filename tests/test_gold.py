"""The coherent gold (SPEC §3): exact log-likelihood against the corpus, ranking of degenerate text, a built coherent lab."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from gpo_jax.lab import corpus as corpus_lib
from gpo_jax.lab import gold as gold_lib
from gpo_jax import lab as lab_lib

import lab_fixture

CORPUS = corpus_lib.Corpus(corpus_lib.CorpusConfig())
T = CORPUS.cfg.response_len


def _corpus_samples(n, seed=0):
  rng = np.random.default_rng(seed)
  prompts = CORPUS.sample_prompts(rng, n)
  resp, mask = CORPUS.sample_responses(rng, prompts, CORPUS.sample_styles(rng, n))
  return prompts, CORPUS.context(prompts), resp, mask


def _loglik(ctx, resp, mask):
  return np.asarray(gold_lib.response_loglik(gold_lib.tables(CORPUS), jnp.asarray(ctx),
                                             jnp.asarray(resp), jnp.asarray(mask)), np.float64)


def test_loglik_equals_the_corpus_mixture_likelihood_per_token():
  prompts, ctx, resp, mask = _corpus_samples(512)
  want = CORPUS.mixture_logprob(prompts, resp) / mask.sum(-1)
  np.testing.assert_allclose(_loglik(ctx, resp, mask), want, rtol=1e-5, atol=1e-5)


def _degenerate(kind, prompts, resp, mask, rng):
  n = len(prompts)
  k = CORPUS.cfg.n_content
  if kind == "cap":        # runs into the cap: T content tokens, no EOS
    out = rng.integers(0, k, (n, T)) + corpus_lib.FIRST_CONTENT
    return out, np.ones((n, T), bool)
  if kind == "repeat":     # one token repeated up to the corpus sample's length, then EOS
    out = np.where(mask, resp[:, :1], corpus_lib.PAD)
    out[np.arange(n), mask.sum(-1) - 1] = corpus_lib.EOS
    return out, mask
  if kind == "shuffled":   # the corpus sample's own tokens in a random order, then EOS
    out = resp.copy()
    for i in range(n):
      m = mask[i].sum() - 1
      out[i, :m] = rng.permutation(resp[i, :m])
    return out, mask
  if kind == "special":    # a special token inside an otherwise corpus response
    out = resp.copy()
    out[:, 0] = corpus_lib.SEP
    return out, mask
  raise ValueError(kind)


@pytest.mark.parametrize("kind", ["cap", "repeat", "shuffled", "special"])
def test_coherence_ranks_corpus_text_above_degenerate_text(kind):
  """Paired on the same prompts, the world's own responses have the higher log-likelihood."""
  prompts, ctx, resp, mask = _corpus_samples(1024, seed=1)
  rng = np.random.default_rng(2)
  bad, bad_mask = _degenerate(kind, prompts, resp, mask, rng)
  good_ll, bad_ll = _loglik(ctx, resp, mask), _loglik(ctx, bad, bad_mask)
  floor = 0.9
  differ = np.any(bad != resp, axis=-1)    # a shuffle of 1-2 tokens may give the same text
  good_ll, bad_ll, mask = good_ll[differ], bad_ll[differ], mask[differ]
  if kind == "repeat":
    # Short responses repeat little; and with sparse bigrams some token has a strong
    # self-loop in some style, so a few repeats really are what the world says (~12 %).
    keep = mask.sum(-1) > 6
    good_ll, bad_ll = good_ll[keep], bad_ll[keep]
    floor = 0.8
  wins = np.mean(good_ll > bad_ll)
  assert wins > floor, f"{kind}: corpus responses beat degenerate ones in only {wins:.3f} of pairs"
  # The coherent gold carries the ranking through: equal network scores, higher gold.
  terms = gold_lib.GoldTerms("coherent", 1.0, 1.0, ll_mean=-2.0, ll_std=0.5, mean=0.1, std=1.3)
  g_good = np.asarray(gold_lib.combine(terms, 0.0, good_ll, 1.0))   # corpus text ends with EOS
  g_bad = np.asarray(gold_lib.combine(terms, 0.0, bad_ll, 0.0 if kind == "cap" else 1.0))
  assert np.mean(g_good > g_bad) == wins


def test_cap_penalty_and_network_kind():
  net = np.array([0.5, -0.2])
  assert np.array_equal(gold_lib.combine(gold_lib.GoldTerms(), net, np.zeros(2), np.zeros(2)), net)
  terms = gold_lib.GoldTerms("coherent", 0.0, 2.0)
  np.testing.assert_allclose(gold_lib.combine(terms, net, np.zeros(2), np.array([1.0, 0.0])),
                             [0.5, -2.2])
  with pytest.raises(ValueError, match=r"unknown gold kind 'human'.*network.*coherent"):
    gold_lib.GoldTerms("human")


def test_lab_config_gold_fields_validate_and_hash():
  base = lab_fixture.tiny_config()
  with pytest.raises(ValueError, match=r"gold_kind='nice'.*'network', 'coherent'"):
    dataclasses.replace(base, gold_kind="nice")
  with pytest.raises(ValueError, match="gold_cap_penalty=-1"):
    dataclasses.replace(base, gold_kind="coherent", gold_cap_penalty=-1.0)
  # The network gold ignores the coherence knobs, so they do not rename its lab...
  assert dataclasses.replace(base, gold_coherence_weight=3.0).config_hash() == base.config_hash()
  # ...while a coherent gold is a different lab, and its knobs matter.
  coh = dataclasses.replace(base, gold_kind="coherent")
  assert coh.config_hash() != base.config_hash()
  assert dataclasses.replace(coh, gold_cap_penalty=0.5).config_hash() != coh.config_hash()


@pytest.fixture(scope="module")
def coherent_lab(tmp_path_factory):
  cfg = lab_fixture.tiny_config(gold_kind="coherent", sft_steps=150)
  return lab_lib.build_or_load(cfg, lab_fixture.shared_root(tmp_path_factory),
                               log=lambda msg: None)


def test_coherent_lab_normalises_gold_and_labels_pairs_with_it(coherent_lab):
  lab = coherent_lab
  assert lab.gold_terms.kind == "coherent" and lab.stats["gold/kind"] == "coherent"
  # Fresh π_ref samples: the lab's gold has mean ~0 and std ~1 (as for the network gold).
  from gpo_jax.lab import steps
  ctx = lab.corpus.context(lab.corpus.sample_prompts(np.random.default_rng(7), 1024))
  graphdef, _ = lab_lib.store.nnx.split(lab.policy())
  resp, mask = steps.sample_responses(graphdef, lab.ref_state, ctx,
                                      lab_lib.store.jax.random.key(3),
                                      response_len=lab.cfg.corpus.response_len,
                                      temperature=1.0, batch_size=256)
  g = lab.gold_score(ctx, resp, mask)
  assert abs(g.mean()) < 0.15 and abs(g.std() - 1.0) < 0.15, (g.mean(), g.std())
  # The stored pair scores are the lab's gold (the coherent one) of the stored responses.
  train = lab.pairs("train")
  np.testing.assert_allclose(lab.gold_score(train["prompt"][:64], train["chosen"][:64],
                                            train["chosen_mask"][:64]),
                             train["gold_chosen"][:64], rtol=1e-4, atol=1e-4)
  # A response that runs into the cap scores below the same response cut short with EOS.
  capped = np.asarray(resp[:64]).copy()
  capped_mask = np.ones_like(capped, bool)
  capped[:, :] = np.where(capped < corpus_lib.FIRST_CONTENT, corpus_lib.FIRST_CONTENT, capped)
  ended = capped.copy()
  ended[:, -1] = corpus_lib.EOS
  gap = lab.gold_score(ctx[:64], ended, capped_mask) - lab.gold_score(ctx[:64], capped, capped_mask)
  assert gap.mean() > 0.5, f"ending at the cap costs only {gap.mean():.3f} gold on average"


@pytest.mark.parametrize("kind", ["network", "coherent"])
def test_gold_from_a_context_prefix_equals_the_full_pass(kind):
  """``GoldFn.after_prefix`` (contexts run once, responses after them) scores like the full
  pass, including responses with no valid token (read at the context's last token) and
  contexts with PAD; a prefix paired with the wrong contexts does not."""
  import jax
  from flax import nnx
  from gpo_jax.core import model as model_lib
  cfg = model_lib.TransformerConfig(vocab_size=CORPUS.cfg.vocab_size, d_model=16, n_layers=2,
                                    n_heads=2, d_ff=32, max_len=CORPUS.cfg.policy_len)
  net = model_lib.RewardModel(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(net)
  state = jax.tree.map(lambda x: x * 25.0, state)   # scores far from constant: checks bite
  terms = gold_lib.GoldTerms(kind=kind)
  fn = gold_lib.make_gold_fn(graphdef, 0.1, 2.0, terms)
  params = {"net": state, "tables": gold_lib.tables(CORPUS)}
  _, ctx, resp, mask = _corpus_samples(12, seed=3)
  ctx = np.asarray(ctx).copy()
  ctx[0, 1] = corpus_lib.PAD                 # a padded context
  mask = np.asarray(mask).copy()
  mask[1] = 0                                # a response with no valid token
  n = 3                                      # three responses per context, prompt-major
  ctx_B = np.repeat(ctx[:4], n, axis=0)
  full, full_parts = fn(params, ctx_B, resp, mask)
  prefix = fn.prefix(params, jnp.asarray(ctx[:4]))
  rows = jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), prefix)
  fast, fast_parts = jax.jit(fn.after_prefix)(params, rows, ctx_B, resp, mask)
  np.testing.assert_allclose(fast, full, rtol=1e-5, atol=1e-5)
  for name in full_parts:
    np.testing.assert_allclose(fast_parts[name], full_parts[name], rtol=1e-5, atol=1e-5)
  wrong = jax.tree.map(lambda x: jnp.repeat(x[::-1], n, axis=0), prefix)
  bad, _ = fn.after_prefix(params, wrong, ctx_B, resp, mask)
  assert float(jnp.std(full_parts["gold/network"])) > 0.1
  assert float(jnp.max(jnp.abs(bad - full))) > 0.1
