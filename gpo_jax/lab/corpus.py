"""The synthetic corpus of the lab: prompts, latent-style responses and demonstration episodes.

Generative story (all NumPy, deterministic given ``CorpusConfig.seed`` and the sampling
``rng``):

* **Tokens.** ``PAD=0, BOS=1, SEP=2, EOS=3, DEMO=4``; content tokens are
  ``FIRST_CONTENT=5 .. vocab_size-1`` (``K = vocab_size - 5`` of them).
* **Prompts.** Fixed length ``P``; the first token is uniform over content tokens, the
  rest follow a "topic" Markov chain whose rows are ``Dirichlet(topic_alpha)`` draws.
  Prompts do not depend on the style, so without demonstrations the style is hidden.
* **Styles.** ``S`` latent styles, each a sparse bigram matrix over content tokens
  (rows ``Dirichlet(style_alpha)``, so styles use visibly different tokens) plus an EOS
  hazard ``h_s`` (styles differ in response length).
* **Responses.** At most ``T`` tokens, the last one ``EOS``, then ``PAD``. The first token
  continues the prompt: it is drawn from the style's bigram row of the prompt's last token.
  After at least one content token, each position ends the response with probability
  ``h_s``; otherwise the next token follows the style's bigram row. Position ``T-1`` is
  always ``EOS``.
* **Episodes.** ``[BOS] (demo_prompt [SEP] demo_response [DEMO]) x k  prompt [SEP] response``
  with ``k`` in ``{0, .., max_demos}`` demonstrations that share the episode's style.
  Every demonstration occupies a fixed-size slot of ``P + T + 2`` tokens (its response
  padded with ``PAD`` to ``T``), so an episode with ``k`` demos has a fixed layout and
  batches of contexts need no ragged handling; the model learns to skip the padding.

A language model trained on episodes learns the style mixture when ``k = 0`` (entropy left
to optimise) and infers the style from demonstrations when ``k > 0`` (in-context gain).
Exact log-likelihoods under each style (:meth:`Corpus.style_logprobs`) give the
Bayes-optimal reference for both.
"""

import dataclasses

import numpy as np

PAD, BOS, SEP, EOS, DEMO = 0, 1, 2, 3, 4
FIRST_CONTENT = 5
SPECIAL_NAMES = {PAD: "PAD", BOS: "BOS", SEP: "SEP", EOS: "EOS", DEMO: "DEMO"}


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  """Parameters of the synthetic world (the "physics" every lab component shares).

  Attributes:
    vocab_size: total vocabulary including the 5 special tokens.
    n_styles: number of latent styles ``S``.
    prompt_len: fixed prompt length ``P``.
    response_len: maximum response length ``T`` including the final ``EOS``.
    max_demos: maximum number of demonstrations in an episode.
    style_alpha: Dirichlet concentration of each style's bigram rows (small = sparse).
    topic_alpha: Dirichlet concentration of the prompt chain's rows.
    eos_hazard_min: EOS hazard of the most verbose style.
    eos_hazard_max: EOS hazard of the tersest style (hazards are evenly spaced).
    seed: seed of the world's parameters (not of the samples drawn from it).
  """

  vocab_size: int = 32
  n_styles: int = 4
  prompt_len: int = 6
  response_len: int = 12
  max_demos: int = 2
  style_alpha: float = 0.05
  topic_alpha: float = 0.5
  eos_hazard_min: float = 0.08
  eos_hazard_max: float = 0.3
  seed: int = 0

  def __post_init__(self):
    if self.vocab_size < FIRST_CONTENT + 2:
      raise ValueError(f"vocab_size={self.vocab_size} must be >= {FIRST_CONTENT + 2} "
                       f"(5 special tokens + at least 2 content tokens)")
    for name in ("n_styles", "prompt_len"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.response_len < 2:
      raise ValueError(f"response_len={self.response_len} must be >= 2 (content + EOS)")
    if self.max_demos < 0:
      raise ValueError(f"max_demos={self.max_demos} must be >= 0")
    if not 0.0 < self.eos_hazard_min <= self.eos_hazard_max < 1.0:
      raise ValueError(f"need 0 < eos_hazard_min <= eos_hazard_max < 1, got "
                       f"{self.eos_hazard_min}, {self.eos_hazard_max}")
    if self.style_alpha <= 0 or self.topic_alpha <= 0:
      raise ValueError(f"Dirichlet concentrations must be > 0, got style_alpha="
                       f"{self.style_alpha}, topic_alpha={self.topic_alpha}")

  @property
  def n_content(self) -> int:
    return self.vocab_size - FIRST_CONTENT

  @property
  def slot_len(self) -> int:
    """Length of one demonstration slot: prompt, SEP, padded response, DEMO."""
    return self.prompt_len + self.response_len + 2

  @property
  def policy_len(self) -> int:
    """Length of ``[BOS] prompt [SEP] response`` (no demonstrations)."""
    return self.prompt_len + self.response_len + 2

  def episode_len(self, n_demos: int) -> int:
    return 1 + n_demos * self.slot_len + self.prompt_len + 1 + self.response_len

  @property
  def max_episode_len(self) -> int:
    return self.episode_len(self.max_demos)


def _categorical_rows(rng: np.random.Generator, cdf_NxK: np.ndarray) -> np.ndarray:
  """One draw per row of a batch of categorical distributions given their CDFs."""
  u = rng.random(cdf_NxK.shape[0]) * cdf_NxK[:, -1]
  idx = (cdf_NxK < u[:, None]).sum(axis=-1)
  return np.minimum(idx, cdf_NxK.shape[-1] - 1)


class Corpus:
  """The world's parameters (drawn once from ``cfg.seed``) and samplers over them.

  Attributes:
    cfg: the :class:`CorpusConfig`.
    topic_KxK: prompt-chain transition matrix over content tokens (row-stochastic).
    style_SxKxK: per-style bigram matrices over content tokens.
    hazard_S: per-style EOS hazard.
  """

  def __init__(self, cfg: CorpusConfig = CorpusConfig()):
    self.cfg = cfg
    rng = np.random.default_rng([cfg.seed, 0xC0])
    k, s = cfg.n_content, cfg.n_styles
    self.topic_KxK = rng.dirichlet(np.full(k, cfg.topic_alpha), size=k)
    self.style_SxKxK = rng.dirichlet(np.full(k, cfg.style_alpha), size=(s, k))
    # Floor the sparse rows so that every bigram has nonzero probability: exact
    # log-likelihoods stay finite and a trained LM is never asked for -inf.
    self.style_SxKxK = 0.995 * self.style_SxKxK + 0.005 / k
    self.hazard_S = np.linspace(cfg.eos_hazard_min, cfg.eos_hazard_max, s)
    self._topic_cdf = np.cumsum(self.topic_KxK, axis=-1)
    self._style_cdf = np.cumsum(self.style_SxKxK, axis=-1)

  # ---------------------------------------------------------------- sampling
  def sample_styles(self, rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, self.cfg.n_styles, size=n).astype(np.int32)

  def sample_prompts(self, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` prompts, ``int32[n, P]`` of content tokens."""
    c = self.cfg
    out = np.empty((n, c.prompt_len), np.int32)
    cur = rng.integers(0, c.n_content, size=n)
    out[:, 0] = cur
    for t in range(1, c.prompt_len):
      cur = _categorical_rows(rng, self._topic_cdf[cur])
      out[:, t] = cur
    return out + FIRST_CONTENT

  def sample_responses(self, rng: np.random.Generator, prompts_NxP: np.ndarray,
                       styles_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Responses in the given styles: ``(int32[n, T] tokens, bool[n, T] mask)``.

    The mask covers content tokens and the final ``EOS``.
    """
    c = self.cfg
    prompts_NxP = np.asarray(prompts_NxP)
    styles_N = np.asarray(styles_N)
    n = prompts_NxP.shape[0]
    out = np.full((n, c.response_len), PAD, np.int32)
    prev = prompts_NxP[:, -1] - FIRST_CONTENT
    alive = np.ones(n, bool)
    hazard = self.hazard_S[styles_N]
    for t in range(c.response_len):
      nxt = _categorical_rows(rng, self._style_cdf[styles_N, prev]) + FIRST_CONTENT
      if t == c.response_len - 1:
        stop = np.ones(n, bool)
      elif t == 0:
        stop = np.zeros(n, bool)
      else:
        stop = rng.random(n) < hazard
      tok = np.where(stop, EOS, nxt)
      out[:, t] = np.where(alive, tok, PAD)
      prev = np.where(alive & ~stop, nxt - FIRST_CONTENT, prev)
      alive &= ~stop
    return out, out != PAD

  def sample_episodes(self, rng: np.random.Generator, n: int,
                      demo_probs=None) -> dict[str, np.ndarray]:
    """``n`` episodes right-padded to ``max_episode_len``.

    Args:
      rng: NumPy generator.
      n: number of episodes.
      demo_probs: probabilities of ``k = 0..max_demos`` demonstrations (uniform if None).

    Returns:
      dict with ``tokens [n, L]``, ``n_demos [n]``, ``styles [n]``, ``prompts [n, P]``,
      ``responses [n, T]``, ``response_mask [n, L]`` (the final response's tokens in the
      episode), ``demo_prompts [n, max_demos, P]`` and ``demo_responses [n, max_demos, T]``
      (unused slots are PAD).
    """
    c = self.cfg
    m = c.max_demos
    probs = np.full(m + 1, 1.0 / (m + 1)) if demo_probs is None else np.asarray(demo_probs)
    if probs.shape != (m + 1,) or np.any(probs < 0) or not np.isclose(probs.sum(), 1.0):
      raise ValueError(f"demo_probs must be {m + 1} probabilities summing to 1, got {demo_probs}")
    styles = self.sample_styles(rng, n)
    k_n = rng.choice(m + 1, size=n, p=probs).astype(np.int32)
    demo_p = np.full((n, m, c.prompt_len), PAD, np.int32)
    demo_r = np.full((n, m, c.response_len), PAD, np.int32)
    for j in range(m):
      dp = self.sample_prompts(rng, n)
      dr, _ = self.sample_responses(rng, dp, styles)
      use = (j < k_n)[:, None]
      demo_p[:, j] = np.where(use, dp, PAD)
      demo_r[:, j] = np.where(use, dr, PAD)
    prompts = self.sample_prompts(rng, n)
    responses, _ = self.sample_responses(rng, prompts, styles)
    tokens = np.full((n, c.max_episode_len), PAD, np.int32)
    rmask = np.zeros((n, c.max_episode_len), bool)
    for k in range(m + 1):
      sel = k_n == k
      if not sel.any():
        continue
      seq = self.episode_tokens(prompts[sel], responses[sel], demo_p[sel, :k], demo_r[sel, :k])
      tokens[sel, :seq.shape[1]] = seq
      start = seq.shape[1] - c.response_len
      rmask[np.flatnonzero(sel)[:, None], start + np.arange(c.response_len)] = (
          responses[sel] != PAD)
    return dict(tokens=tokens, n_demos=k_n, styles=styles, prompts=prompts,
                responses=responses, response_mask=rmask, demo_prompts=demo_p,
                demo_responses=demo_r)

  # ---------------------------------------------------------------- formatting
  def context(self, prompts_NxP, demo_prompts_NxKxP=None, demo_responses_NxKxT=None):
    """``[BOS] (demo slots) prompt [SEP]``: the context a policy samples a response from."""
    c = self.cfg
    prompts_NxP = np.asarray(prompts_NxP, np.int32)
    n = prompts_NxP.shape[0]
    if prompts_NxP.ndim != 2 or prompts_NxP.shape[1] != c.prompt_len:
      raise ValueError(f"prompts must be [N, {c.prompt_len}], got {prompts_NxP.shape}")
    parts = [np.full((n, 1), BOS, np.int32)]
    if demo_prompts_NxKxP is not None:
      dp = np.asarray(demo_prompts_NxKxP, np.int32)
      dr = np.asarray(demo_responses_NxKxT, np.int32)
      if dp.shape[:2] != dr.shape[:2] or dp.shape[2] != c.prompt_len or dr.shape[2] != c.response_len:
        raise ValueError(f"demo prompts/responses must be [N, k, {c.prompt_len}] and "
                         f"[N, k, {c.response_len}], got {dp.shape} and {dr.shape}")
      for j in range(dp.shape[1]):
        parts += [dp[:, j], np.full((n, 1), SEP, np.int32), dr[:, j],
                  np.full((n, 1), DEMO, np.int32)]
    parts += [prompts_NxP, np.full((n, 1), SEP, np.int32)]
    return np.concatenate(parts, axis=1)

  def episode_tokens(self, prompts_NxP, responses_NxT, demo_prompts_NxKxP=None,
                     demo_responses_NxKxT=None) -> np.ndarray:
    """The full sequence: :meth:`context` followed by the response."""
    ctx = self.context(prompts_NxP, demo_prompts_NxKxP, demo_responses_NxKxT)
    return np.concatenate([ctx, np.asarray(responses_NxT, np.int32)], axis=1)

  def policy_sequence(self, prompts_NxP, responses_NxT) -> tuple[np.ndarray, np.ndarray]:
    """``[BOS] prompt [SEP] response`` and its response mask, both ``[N, P + T + 2]``."""
    tokens = self.episode_tokens(prompts_NxP, responses_NxT)
    mask = np.zeros(tokens.shape, bool)
    mask[:, -self.cfg.response_len:] = np.asarray(responses_NxT) != PAD
    return tokens, mask

  # ---------------------------------------------------------------- exact likelihoods
  def style_logprobs(self, prompts_NxP, responses_NxT) -> np.ndarray:
    """Exact ``log p(response | prompt, style)`` for every style, ``float64[N, S]``."""
    c = self.cfg
    prompts_NxP = np.asarray(prompts_NxP)
    responses_NxT = np.asarray(responses_NxT)
    n = responses_NxT.shape[0]
    out = np.zeros((n, c.n_styles))
    logb = np.log(self.style_SxKxK)
    prev = prompts_NxP[:, -1] - FIRST_CONTENT
    alive = np.ones(n, bool)
    for t in range(c.response_len):
      tok = responses_NxT[:, t]
      is_eos = tok == EOS
      content = alive & ~is_eos
      cur = np.clip(tok - FIRST_CONTENT, 0, c.n_content - 1)
      lb = logb[:, prev, cur].T  # [N, S]
      if 0 < t < c.response_len - 1:
        out += np.where(content[:, None], np.log1p(-self.hazard_S)[None] + lb, 0.0)
        out += np.where((alive & is_eos)[:, None], np.log(self.hazard_S)[None], 0.0)
      elif t == 0:
        out += np.where(content[:, None], lb, 0.0)
        out += np.where((alive & is_eos)[:, None], -np.inf, 0.0)
      else:
        out += np.where(content[:, None], -np.inf, 0.0)
      prev = np.where(content, cur, prev)
      alive &= ~is_eos
    return out

  def mixture_logprob(self, prompts_NxP, responses_NxT, demo_logprob_NxS=None) -> np.ndarray:
    """Bayes log-likelihood of a response with the style marginalised out.

    Args:
      prompts_NxP: prompts.
      responses_NxT: responses.
      demo_logprob_NxS: optional summed ``style_logprobs`` of the episode's
        demonstrations; the style posterior given them replaces the uniform prior.
    """
    lp = self.style_logprobs(prompts_NxP, responses_NxT)
    prior = np.zeros_like(lp) if demo_logprob_NxS is None else demo_logprob_NxS
    prior = prior - _logsumexp(prior)
    return _logsumexp(prior + lp)[:, 0]


def _logsumexp(x_NxS: np.ndarray) -> np.ndarray:
  m = np.max(x_NxS, axis=-1, keepdims=True)
  return m + np.log(np.sum(np.exp(x_NxS - m), axis=-1, keepdims=True))


def validate_responses(responses_NxT: np.ndarray) -> None:
  """Raise if any row violates ``content* EOS PAD*`` with at least one content token."""
  r = np.asarray(responses_NxT)
  eos = r == EOS
  if not np.all(eos.sum(-1) == 1):
    bad = np.flatnonzero(eos.sum(-1) != 1)[:5]
    raise ValueError(f"rows {bad.tolist()} do not contain exactly one EOS")
  pos = np.argmax(eos, axis=-1)
  idx = np.arange(r.shape[1])[None]
  before, after = idx < pos[:, None], idx > pos[:, None]
  if np.any((r < FIRST_CONTENT) & before) or np.any((r != PAD) & after) or np.any(pos == 0):
    raise ValueError("responses must be >=1 content tokens, then EOS, then PAD only")
