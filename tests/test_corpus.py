"""Tests of the synthetic corpus: format invariants, determinism, exact likelihoods, style structure."""

import itertools

import numpy as np
import pytest

from gpo_jax.lab import corpus as C


@pytest.fixture(scope="module")
def corpus():
  return C.Corpus(C.CorpusConfig())


def test_episode_format_invariants(corpus):
  cfg = corpus.cfg
  ep = corpus.sample_episodes(np.random.default_rng(0), 600)
  tok, k_n = ep["tokens"], ep["n_demos"]
  assert set(np.unique(k_n)) == set(range(cfg.max_demos + 1)), "every demo count must occur"
  assert np.all(tok[:, 0] == C.BOS), "episodes must start with BOS"
  assert np.all(tok[:, 1:] != C.BOS), "BOS appears only at position 0"
  for k in range(cfg.max_demos + 1):
    rows = tok[k_n == k]
    n_len = cfg.episode_len(k)
    assert np.all(rows[:, n_len:] == C.PAD), f"k={k}: tokens after the episode must be PAD"
    for j in range(k):
      s = 1 + j * cfg.slot_len
      assert np.all(rows[:, s:s + cfg.prompt_len] >= C.FIRST_CONTENT), "demo prompt tokens"
      assert np.all(rows[:, s + cfg.prompt_len] == C.SEP), f"SEP after demo prompt {j}"
      C.validate_responses(rows[:, s + cfg.prompt_len + 1:s + cfg.slot_len - 1])
      assert np.all(rows[:, s + cfg.slot_len - 1] == C.DEMO), f"DEMO closes slot {j}"
    s = 1 + k * cfg.slot_len
    assert np.all(rows[:, s:s + cfg.prompt_len] >= C.FIRST_CONTENT)
    assert np.all(rows[:, s + cfg.prompt_len] == C.SEP), "SEP after the final prompt"
    np.testing.assert_array_equal(rows[:, s + cfg.prompt_len + 1:n_len], ep["responses"][k_n == k])
    # SEP and DEMO counts: one SEP per prompt, one DEMO per demonstration.
    assert np.all((rows == C.SEP).sum(-1) == k + 1)
    assert np.all((rows == C.DEMO).sum(-1) == k)
  C.validate_responses(ep["responses"])
  # The response mask marks exactly the final response's content tokens and its EOS.
  np.testing.assert_array_equal(ep["response_mask"].sum(-1), (ep["responses"] != C.PAD).sum(-1))
  assert np.all(tok[ep["response_mask"]] >= C.EOS)
  last = tok.shape[1] - 1 - np.argmax(ep["response_mask"][:, ::-1], axis=-1)
  assert np.all(tok[np.arange(len(tok)), last] == C.EOS), "mask must end on the EOS"


def test_policy_sequence_layout(corpus):
  rng = np.random.default_rng(1)
  prompts = corpus.sample_prompts(rng, 5)
  resp, mask = corpus.sample_responses(rng, prompts, np.zeros(5, int))
  tokens, rmask = corpus.policy_sequence(prompts, resp)
  p = corpus.cfg.prompt_len
  assert tokens.shape == (5, corpus.cfg.policy_len)
  assert np.all(tokens[:, 0] == C.BOS) and np.all(tokens[:, p + 1] == C.SEP)
  np.testing.assert_array_equal(tokens[:, 1:p + 1], prompts)
  np.testing.assert_array_equal(rmask[:, p + 2:], mask)
  assert not rmask[:, :p + 2].any()


def test_deterministic_given_seeds():
  a = C.Corpus(C.CorpusConfig(seed=3))
  b = C.Corpus(C.CorpusConfig(seed=3))
  other = C.Corpus(C.CorpusConfig(seed=4))
  np.testing.assert_array_equal(a.style_SxKxK, b.style_SxKxK)
  assert not np.allclose(a.style_SxKxK, other.style_SxKxK), "world seed must matter"
  ea = a.sample_episodes(np.random.default_rng(7), 50)
  eb = b.sample_episodes(np.random.default_rng(7), 50)
  for key in ea:
    np.testing.assert_array_equal(ea[key], eb[key], err_msg=f"{key} not deterministic")
  ec = a.sample_episodes(np.random.default_rng(8), 50)
  assert not np.array_equal(ea["tokens"], ec["tokens"]), "sampling seed must matter"


def test_exact_likelihood_matches_sampler():
  # A world small enough to enumerate: 2 content tokens, responses of at most 4 tokens.
  cfg = C.CorpusConfig(vocab_size=7, n_styles=2, prompt_len=2, response_len=4, style_alpha=0.5,
                       eos_hazard_min=0.2, eos_hazard_max=0.5, seed=1)
  cor = C.Corpus(cfg)
  content = range(C.FIRST_CONTENT, cfg.vocab_size)
  support = []
  for n in range(1, cfg.response_len):
    for body in itertools.product(content, repeat=n):
      support.append(list(body) + [C.EOS] + [C.PAD] * (cfg.response_len - n - 1))
  support = np.asarray(support)
  prompt = np.array([[5, 6]])
  lp = cor.style_logprobs(np.repeat(prompt, len(support), 0), support)  # [R, S]
  np.testing.assert_allclose(np.exp(lp).sum(0), 1.0, atol=1e-12,
                             err_msg="exact response probabilities must sum to 1 per style")
  n = 40000
  for s in range(cfg.n_styles):
    resp, _ = cor.sample_responses(np.random.default_rng(s), np.repeat(prompt, n, 0),
                                   np.full(n, s))
    idx = {tuple(r): i for i, r in enumerate(support)}
    counts = np.bincount([idx[tuple(r)] for r in resp], minlength=len(support))
    p = np.exp(lp[:, s])
    z = (counts / n - p) / np.sqrt(p * (1 - p) / n + 1e-12)
    assert np.max(np.abs(z)) < 5, f"style {s}: sampler frequencies disagree with exact probs"


def test_styles_are_identifiable(corpus):
  cfg = corpus.cfg
  rng = np.random.default_rng(2)
  n = 3000
  unigram, lengths = [], []
  for s in range(cfg.n_styles):
    prompts = corpus.sample_prompts(rng, n)
    resp, mask = corpus.sample_responses(rng, prompts, np.full(n, s))
    content = resp[(resp >= C.FIRST_CONTENT)]
    unigram.append(np.bincount(content, minlength=cfg.vocab_size) / content.size)
    lengths.append(mask.sum(-1).mean())
  for a, b in itertools.combinations(range(cfg.n_styles), 2):
    tv = 0.5 * np.abs(unigram[a] - unigram[b]).sum()
    assert tv > 0.2, f"styles {a},{b} have near-identical token statistics (TV={tv:.3f})"
  assert np.all(np.diff(lengths) < 0), f"higher EOS hazard must mean shorter responses: {lengths}"
  # The exact posterior recovers the style far above chance (1/S) from one response.
  styles = corpus.sample_styles(rng, 2000)
  prompts = corpus.sample_prompts(rng, 2000)
  resp, _ = corpus.sample_responses(rng, prompts, styles)
  acc = np.mean(np.argmax(corpus.style_logprobs(prompts, resp), -1) == styles)
  assert acc > 0.7, f"style posterior accuracy {acc:.3f} is too close to chance"


def test_bayes_demos_help(corpus):
  rng = np.random.default_rng(3)
  n = 2000
  styles = corpus.sample_styles(rng, n)
  dp = corpus.sample_prompts(rng, n)
  dr, _ = corpus.sample_responses(rng, dp, styles)
  prompts = corpus.sample_prompts(rng, n)
  resp, _ = corpus.sample_responses(rng, prompts, styles)
  with_demo = corpus.mixture_logprob(prompts, resp, corpus.style_logprobs(dp, dr))
  without = corpus.mixture_logprob(prompts, resp)
  gain = with_demo - without
  assert gain.mean() > 5 * gain.std() / np.sqrt(n), "a same-style demo must raise the Bayes log-lik"


def test_bad_config_raises():
  with pytest.raises(ValueError, match="vocab_size"):
    C.CorpusConfig(vocab_size=5)
  with pytest.raises(ValueError, match="eos_hazard"):
    C.CorpusConfig(eos_hazard_min=0.5, eos_hazard_max=0.2)
  cor = C.Corpus(C.CorpusConfig())
  with pytest.raises(ValueError, match="demo_probs"):
    cor.sample_episodes(np.random.default_rng(0), 4, demo_probs=[0.5, 0.5])
  with pytest.raises(ValueError, match="prompts must be"):
    cor.context(np.zeros((2, 3), np.int32))
