"""ICDPO: in-context direct preference optimisation, a fine-tuning-free evaluation-time method (SPEC §6).

For a prompt ``x`` with good demonstrations ``D⁺`` (high-gold responses retrieved for ``x``,
:mod:`gpo_jax.incontext.retrieval`), ICDPO draws ``N`` candidates from the in-context
policy ``q(·|x) = π_ref(·|D⁺, x)`` with the KV-cache sampler, scores each by how much the
good demonstrations raise its likelihood against a contrast context ``C⁻``::

    S(y) = Σ_t log π_ref(y_t | D⁺, x, y_<t) − Σ_t log π_ref(y_t | C⁻, x, y_<t)

(``C⁻`` empty: contrast ``"base"``; bad demonstrations ``D⁻``: contrast ``"bad"``) and
returns the argmax (:func:`select`). :func:`score` is ``S``; :func:`evaluate` sweeps ``N``,
``k``, the retriever and the contrast on the lab's eval prompts, beside the baselines, and
measures ICDPO's scorer as a reward model on the held-out test pairs.

**Estimation.** For each ``(k, retriever)`` :func:`evaluate` samples a pool of
``N_pool ≥ max N`` candidates per prompt from ``q`` once, and reports for every ``N`` the
*exact* mean, over uniformly random ``N``-subsets of the pool, of a measure at the subset's
``S``-argmax (:func:`gpo_jax.evaluation.bon.per_prompt`, ties averaged). In expectation
this is :func:`select` with ``N`` candidates, with less variance; every ``N``, ``k``,
retriever and contrast shares the pool's random numbers, so differences are paired.

**Measures** (means over eval prompts of per-prompt values; ``*_se`` clustered by prompt:
the spread of the per-prompt values over ``sqrt(n_prompts)``):

* ``gold``: the lab's normalised gold of the selected response to ``x`` (no demos in the
  gold's context) minus π_ref's mean gold on the same prompt, from π_ref's own samples
  with context ``x`` only (the ``R(0) = 0`` convention of :mod:`gpo_jax.evaluation.policy`:
  a per-prompt control variate). ``win_rate``: ``σ(g(y) − g(y_ref))`` averaged over π_ref's
  pool on the prompt (gold Bradley–Terry).
* ``kl_icl``: ``KL(q(·|x) ‖ π_ref(·|x))``, the in-context policy's divergence, estimated by
  the exact per-token KL over the vocabulary summed along samples ``y ~ q`` (unbiased for
  the sequence KL by the chain rule). Independent of ``N``.
* ``k1``: ``E_{π_sel}[log q(y|x) − log π_ref(y|x)]``, the in-context log-ratio averaged over
  the *selected* responses (a sampled estimate). With ``π_sel`` ICDPO's selection policy,
  ``KL(π_sel ‖ π_ref) = KL(π_sel ‖ q) + k1`` exactly, and ``0 ≤ KL(π_sel ‖ q) ≤ log N −
  (N − 1)/N`` for any best-of-``N`` selection from iid draws of ``q`` (Beirami et al. 2024,
  arXiv 2401.01879; the bound is attained for continuous, tie-free scores). Hence
  ``k1 ≤ KL(π_sel ‖ π_ref) ≤ k1 + log N − (N − 1)/N``: ``kl_lower = k1`` and ``kl = k1 +
  kl_bon(N)``, reported as the point estimate (an upper bound, tight when the ``N``
  candidates are distinct). ``KL(π_sel ‖ π_ref)`` itself has no closed form: ``π_sel(y)``
  needs the law of ``S`` under ``q``.
* ``kl_spec_bound``: ``kl_icl + log N``, the bound SPEC §6 asks for. It is **not** a valid
  upper bound in general, because ICDPO selects for a large log-ratio: the valid bound
  uses ``k1`` on the selected responses, not ``kl_icl`` on ``q``'s. (Counterexample: two
  outcomes, ``π_ref = (ε, 1 − ε)``, ``q = (½, ½)``, contrast base; ICDPO picks the first
  outcome with probability ``1 − 2^{−N}``, so ``KL(π_sel ‖ π_ref) → log(1/ε)`` while
  ``kl_icl + log N ≈ ½ log(1/ε) + log N``.) Reported for comparison with the paper.
* ``response_len`` (tokens including EOS) and ``eos_frac`` beside gold.

**Methods** (rows of :attr:`ICDPOResult.rows`):

* ``icdpo``: best of ``N`` candidates from ``q`` by ``S`` (per ``k``, retriever, contrast).
* ``icl_sample``: plain sampling from ``q = π_ref(·|D⁺, x)`` (``N = 1``).
* ``bon_likelihood``: best of ``N`` from ``π_ref(·|x)`` by ``log π_ref(y|x)`` (the baseline
  with the same number of samples and no demonstrations; ``kl = kl_bon(N)``).
* ``bon_icdpo_score``: best of ``N`` from ``π_ref(·|x)``'s pool by ``S`` (ICDPO's scorer as a
  best-of-``N`` selector on the π_ref pool that proxy-selected best-of-``N`` uses).
* ``bon_gold``: best of ``N`` from ``π_ref(·|x)`` by gold (the oracle ceiling).

Each non-baseline row also carries ``d_gold`` (``d_gold_se``): its per-prompt paired gold
difference to ``bon_likelihood`` at the same ``N``.

**Reward model** (:attr:`ICDPOResult.reward_rows`): ``S`` as a reward on the lab's
held-out test pairs, with demonstrations retrieved for each test prompt; accuracy is the
fraction of pairs with distinct gold where ``S(chosen) − S(rejected)`` has the sign of the
gold difference (a zero difference counts as wrong), with a binomial SE. Baselines:
``log π_ref(y|x)`` and ``log π_ref(y|D⁺, x)`` as rewards.

References:
  Song et al. 2024, "ICDPO: Effectively Borrowing Alignment Capability of Others via
  In-context Direct Preference Optimization", arXiv 2402.09320.
  Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment policy",
  arXiv 2401.01879.
  Gao, Schulman, Hilton 2023, arXiv 2210.10760 (R(0) = 0, unbiased best-of-n estimator).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpo_jax.core import logprobs
from gpo_jax.core import model as model_lib
from gpo_jax.core import sampling
from gpo_jax.evaluation import bon as bon_lib
from gpo_jax.incontext import retrieval as retrieval_lib
from gpo_jax.lab import steps
from gpo_jax.runtime import writers

Array = jax.Array

CONTRASTS = ("base", "bad")
METHODS = ("icdpo", "icl_sample", "bon_likelihood", "bon_icdpo_score", "bon_gold")
#: per-candidate measures averaged at the selected response
MEASURES = ("gold", "win_rate", "k1", "response_len", "eos_frac")
_REF_STREAM = 0x7EF1
_ICL_STREAM = 0x1CD0


# ---------------------------------------------------------------------- scoring
def context_logprobs(model: model_lib.Transformer, ctx_BxC: Array, resp_BxT: Array,
                     mask_BxT: Array) -> Array:
  """``Σ_t log π(y_t | ctx, y_<t)`` over the masked response tokens, ``[B]``."""
  tokens_BxL, mask_BxL = sampling.concat_response(jnp.asarray(ctx_BxC), jnp.asarray(resp_BxT),
                                                  jnp.asarray(mask_BxT))
  return model_lib.response_logprobs(model, tokens_BxL, mask_BxL)


def score(model: model_lib.Transformer, ctx_plus_BxC1: Array, ctx_minus_BxC2: Array,
          resp_BxT: Array, mask_BxT: Array) -> Array:
  """ICDPO's score ``S(y) = log π(y | ctx⁺) − log π(y | ctx⁻)``, ``[B]``.

  Args:
    model: π_ref.
    ctx_plus_BxC1: ``[BOS] D⁺ x [SEP]`` contexts.
    ctx_minus_BxC2: the contrast contexts, ``[BOS] x [SEP]`` (base) or ``[BOS] D⁻ x [SEP]``
      (bad); ``C2`` may differ from ``C1``.
    resp_BxT: responses; mask_BxT: 1 on response tokens up to and including EOS.
  """
  return (context_logprobs(model, ctx_plus_BxC1, resp_BxT, mask_BxT)
          - context_logprobs(model, ctx_minus_BxC2, resp_BxT, mask_BxT))


def _response_logits(model, ctx_BxC, resp_BxT) -> Array:
  """Logits predicting each response token, ``[B, T, V]``."""
  tokens = jnp.concatenate([ctx_BxC, resp_BxT.astype(ctx_BxC.dtype)], axis=1)
  return model(tokens[:, :-1])[:, ctx_BxC.shape[1] - 1:]


@functools.lru_cache(maxsize=None)
def _make_pair_fn(graphdef):
  """``(state, ctx_a, ctx_b, resp, mask) -> (lp_a, lp_b, kl_ab)`` with ``kl_ab`` the exact
  per-token ``KL(π(·|a, y_<t) ‖ π(·|b, y_<t))`` summed over the response."""
  @jax.jit
  def fn(state, ctx_a, ctx_b, resp, mask):
    model = nnx.merge(graphdef, state)
    return _pair_measures(_response_logits(model, ctx_a, resp),
                          _response_logits(model, ctx_b, resp), resp, mask)
  return fn


def _pair_measures(la, lb, resp, mask):
  """Summed log-probs of ``resp`` under logits ``la`` and ``lb`` (``[..., T, V]``) and the
  exact per-token ``KL(a ‖ b)`` summed over the masked positions."""
  m = mask.astype(bool)
  tok = resp.astype(jnp.int32)
  lp_a = logprobs.sequence_logprobs(logprobs.token_logprobs(la, tok), m)
  lp_b = logprobs.sequence_logprobs(logprobs.token_logprobs(lb, tok), m)
  kl = jnp.sum(jnp.where(m, logprobs.token_kl(la, lb), 0.0), axis=-1)
  return lp_a, lp_b, kl


@functools.lru_cache(maxsize=None)
def _make_lp_fn(graphdef):
  @jax.jit
  def fn(state, ctx, resp, mask):
    return context_logprobs(nnx.merge(graphdef, state), ctx, resp, mask)
  return fn


@functools.lru_cache(maxsize=None)
def _make_grouped_pair_fn(graphdef):
  """:func:`_make_pair_fn` for ``N`` responses per context pair, each context run once:
  ``(state, ctx_a_ExCa, ctx_b_ExCb, resp_ExNxT, mask_ExNxT) -> [E, N]`` each."""
  @jax.jit
  def fn(state, ctx_a, ctx_b, resp, mask):
    model = nnx.merge(graphdef, state)
    return _pair_measures(model_lib.grouped_response_logits(model, ctx_a, resp),  # [E,N,T,V]
                          model_lib.grouped_response_logits(model, ctx_b, resp), resp, mask)
  return fn


@functools.lru_cache(maxsize=None)
def _make_grouped_lp_fn(graphdef):
  """``(state, ctx_ExC, resp_ExNxT, mask_ExNxT) -> [E, N]``: each context run once."""
  @jax.jit
  def fn(state, ctx, resp, mask):
    return model_lib.grouped_response_logprobs(nnx.merge(graphdef, state), ctx, resp, mask)
  return fn


@functools.lru_cache(maxsize=None)
def _make_sample_fn(graphdef, max_new_tokens: int):
  """``(state, ctx_BxC, keys_B) -> (resp, mask)``: one key per row, so a row's draw does not
  depend on how rows are batched."""
  @jax.jit
  def fn(state, ctx_BxC, keys_B):
    model = nnx.merge(graphdef, state)
    one = lambda c, k: sampling.sample(model, c[None], k, max_new_tokens=max_new_tokens)  # noqa: E731
    resp, mask = jax.vmap(one)(ctx_BxC, keys_B)
    return resp[:, 0], mask[:, 0]
  return fn


def _row_keys(seed: int, stream: int, e: int, n: int) -> Array:
  """Keys of candidate ``j`` of prompt ``i``: ``fold_in(fold_in(fold_in(key(seed), stream), i), j)``."""
  base = jax.random.fold_in(jax.random.key(seed), stream)
  ii, jj = np.meshgrid(np.arange(e), np.arange(n), indexing="ij")
  fold = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(base, i), j))
  return fold(jnp.asarray(ii.reshape(-1)), jnp.asarray(jj.reshape(-1)))


# ---------------------------------------------------------------------- selection
@functools.lru_cache(maxsize=None)
def _make_select_fn(graphdef, n: int, max_new_tokens: int):
  @jax.jit
  def fn(state, ctx_plus_ExC1, ctx_minus_ExC2, key):
    model = nnx.merge(graphdef, state)
    e = ctx_plus_ExC1.shape[0]
    plus = jnp.repeat(ctx_plus_ExC1, n, axis=0)
    minus = jnp.repeat(ctx_minus_ExC2, n, axis=0)
    resp, mask = sampling.sample(model, ctx_plus_ExC1, key, max_new_tokens=max_new_tokens,
                                 repeats=n)                            # = plus's rows
    s_ExN = score(model, plus, minus, resp, mask).reshape(e, n)
    idx_E = jnp.argmax(s_ExN, axis=-1)
    resp_ExNxT = resp.reshape(e, n, -1)
    mask_ExNxT = mask.reshape(e, n, -1)
    take = lambda a: jnp.take_along_axis(a, idx_E[:, None, None], axis=1)[:, 0]  # noqa: E731
    return {"response": take(resp_ExNxT), "mask": take(mask_ExNxT), "index": idx_E,
            "scores": s_ExN, "candidates": resp_ExNxT, "candidate_masks": mask_ExNxT}
  return fn


def select(model: model_lib.Transformer, ctx_plus_ExC1, ctx_minus_ExC2, key: Array, n: int,
           *, max_new_tokens: int) -> dict[str, np.ndarray]:
  """ICDPO's selection: ``n`` candidates per prompt from ``π(·|ctx⁺)``, argmax of ``S``.

  Args:
    model: π_ref.
    ctx_plus_ExC1: ``[BOS] D⁺ x [SEP]`` per prompt (candidates are sampled from it).
    ctx_minus_ExC2: the contrast context per prompt (``[BOS] x [SEP]`` or ``[BOS] D⁻ x [SEP]``).
    key: a ``jax.random.key`` (the KV-cache sampler, temperature 1).
    n: candidates per prompt.
    max_new_tokens: the response length ``T``.

  Returns:
    ``response [E, T]``, ``mask [E, T]`` (the selected), ``index [E]``, ``scores [E, n]``,
    ``candidates [E, n, T]``, ``candidate_masks [E, n, T]``.
  """
  if not isinstance(n, int) or n < 1:
    raise ValueError(f"n={n!r} must be a positive int (candidates per prompt)")
  ctx_plus, ctx_minus = np.asarray(ctx_plus_ExC1), np.asarray(ctx_minus_ExC2)
  if ctx_plus.shape[0] != ctx_minus.shape[0]:
    raise ValueError(f"ctx_plus has {ctx_plus.shape[0]} prompts but ctx_minus has "
                     f"{ctx_minus.shape[0]}")
  graphdef, state = nnx.split(model)
  out = _make_select_fn(graphdef, n, max_new_tokens)(state, ctx_plus, ctx_minus, key)
  return {k: np.asarray(v) for k, v in out.items()}


# ---------------------------------------------------------------------- evaluation
@dataclasses.dataclass(frozen=True)
class ICDPOConfig:
  """The sweep and sizes of :func:`evaluate`.

  Attributes:
    ns: candidate counts ``N`` reported (each ``<= pool_per_prompt`` and
      ``<= ref_samples_per_prompt``).
    ks: demonstrations per context (each ``<= max_demos``).
    retrievers: retrievers swept (:data:`gpo_jax.incontext.retrieval.RETRIEVERS`).
    contrasts: contrast contexts swept, ``"base"`` and/or ``"bad"``.
    gold_quantile: the good/bad bands of the demo pool (top/bottom fraction).
    n_prompts: eval prompts used (the first ones of ``Lab.eval_prompts``; 0 = all).
    pool_per_prompt: candidates drawn from ``q`` per prompt and ``(k, retriever)`` (0 =
      ``max(ns)``); larger pools lower the variance of the best-of-``N`` estimates.
    ref_samples_per_prompt: π_ref(·|x) samples per prompt: the ``R(0)`` baseline, the
      win-rate opponents and the baselines' candidate pool.
    n_test_pairs: held-out test pairs for the reward-model accuracy (0 = all, -1 = skip).
    seed: seed of the samples and of the retrieval.
    batch_size: rows per jitted call.
  """
  ns: tuple[int, ...] = (1, 2, 4, 8, 16)
  ks: tuple[int, ...] = (1, 2)
  retrievers: tuple[str, ...] = retrieval_lib.RETRIEVERS
  contrasts: tuple[str, ...] = CONTRASTS
  gold_quantile: float = 0.25
  n_prompts: int = 0
  pool_per_prompt: int = 32
  ref_samples_per_prompt: int = 32
  n_test_pairs: int = 0
  seed: int = 0
  batch_size: int = 512

  def __post_init__(self):
    if not self.ns or any(int(n) < 1 for n in self.ns):
      raise ValueError(f"ns={self.ns} must be positive candidate counts")
    if not self.ks or any(int(k) < 1 for k in self.ks):
      raise ValueError(f"ks={self.ks} must be positive demo counts")
    for r in self.retrievers:
      retrieval_lib.check_choice("retriever", r, retrieval_lib.RETRIEVERS)
    for c in self.contrasts:
      retrieval_lib.check_choice("contrast", c, CONTRASTS)
    if not self.retrievers or not self.contrasts:
      raise ValueError(f"need at least one retriever and contrast, got retrievers="
                       f"{self.retrievers}, contrasts={self.contrasts}")
    pool = self.pool_size
    if max(self.ns) > pool or max(self.ns) > self.ref_samples_per_prompt:
      raise ValueError(f"max(ns)={max(self.ns)} exceeds pool_per_prompt={pool} or "
                       f"ref_samples_per_prompt={self.ref_samples_per_prompt}")
    if self.n_prompts < 0 or self.batch_size < 1:
      raise ValueError(f"n_prompts={self.n_prompts} must be >= 0 and batch_size="
                       f"{self.batch_size} >= 1")

  @property
  def pool_size(self) -> int:
    return self.pool_per_prompt or max(self.ns)


@dataclasses.dataclass
class ICDPOResult:
  """What :func:`evaluate` returns.

  Attributes:
    rows: one dict per (method, N, k, retriever, contrast) with the measures of the module
      docstring and their prompt-clustered SEs.
    per_prompt: ``"<method>/k<k>/<retriever>/<contrast>/<measure>"`` → ``[E, len(ns)]``
      per-prompt estimates (the input of any paired comparison; baselines use ``k0``,
      retriever and contrast ``"-"``).
    reward_rows: the scorer as a reward model on the test pairs (accuracy, SE, counts).
    info: sizes, π_ref's mean gold, retrieval keys, timings.
  """
  rows: list[dict[str, Any]]
  per_prompt: dict[str, np.ndarray]
  reward_rows: list[dict[str, Any]]
  info: dict[str, Any]

  def find(self, **match) -> list[dict[str, Any]]:
    """Rows whose fields equal ``match`` (e.g. ``find(method="icdpo", n=16)``)."""
    return [r for r in self.rows if all(r.get(k) == v for k, v in match.items())]


class Runner:
  """The jitted pieces of an ICDPO evaluation (sampling, scoring, log-probs, gold), batched to
  ``batch_size`` rows; also what :mod:`gpo_jax.incontext.pool_bon` scores a pool with."""

  def __init__(self, lab, cfg: ICDPOConfig):
    self.cfg = cfg
    self.graphdef, self.state = nnx.split(lab.policy())
    self.T = lab.cfg.corpus.response_len
    gold_fn, self.gold_params = lab.gold_fn()
    self.gold_fn = jax.jit(lambda p, c, r, m: gold_fn(p, c, r, m)[0])

  def _batched(self, fn, arrays):
    # Always full batches (the last one padded): one compilation per context length.
    return steps.batched(fn, [np.asarray(a) for a in arrays], self.cfg.batch_size)

  def sample(self, ctx_ExC, n, stream):
    e = ctx_ExC.shape[0]
    keys = jax.random.key_data(_row_keys(self.cfg.seed, stream, e, n))
    fn = _make_sample_fn(self.graphdef, self.T)
    resp, mask = self._batched(
        lambda c, k: fn(self.state, c, jax.random.wrap_key_data(k)),
        [np.repeat(ctx_ExC, n, axis=0), np.asarray(keys)])
    return resp.astype(np.int32), mask.astype(np.float32)

  def pair(self, ctx_a, ctx_b, resp, mask):
    fn = _make_pair_fn(self.graphdef)
    return [np.asarray(x, np.float64) for x in self._batched(
        lambda a, b, r, m: fn(self.state, a, b, r, m), [ctx_a, ctx_b, resp, mask])]

  def lp(self, ctx, resp, mask):
    fn = _make_lp_fn(self.graphdef)
    return np.asarray(self._batched(lambda c, r, m: fn(self.state, c, r, m),
                                    [ctx, resp, mask]), np.float64)

  def _per_context(self, fn, contexts, resp, mask, n):
    """``fn`` over ``[E, n, T]`` groups (rows context-major: row ``i·n + j`` answers context
    ``i``), each context run once; batches of ``max(1, batch_size // n)`` contexts."""
    e = contexts[0].shape[0]
    resp, mask = np.asarray(resp), np.asarray(mask)
    if resp.shape[0] != e * n or mask.shape != resp.shape:
      raise ValueError(f"{resp.shape[0]} response rows (mask {mask.shape}) for {e} contexts "
                       f"× n={n}; need {e * n} rows, context-major.")
    out = steps.batched(fn, [np.asarray(c) for c in contexts]
                        + [resp.reshape(e, n, -1), mask.reshape(e, n, -1)],
                        max(1, self.cfg.batch_size // n))
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [np.asarray(x, np.float64).reshape(e * n) for x in outs]

  def pair_per_context(self, ctx_a_E, ctx_b_E, resp, mask, n):
    """:meth:`pair` of ``np.repeat(ctx_a_E, n)``, ``np.repeat(ctx_b_E, n)`` with each context
    run once for its ``n`` responses (same numbers up to float rounding)."""
    fn = _make_grouped_pair_fn(self.graphdef)
    return self._per_context(lambda a, b, r, m: fn(self.state, a, b, r, m),
                             [ctx_a_E, ctx_b_E], resp, mask, n)

  def lp_per_context(self, ctx_E, resp, mask, n):
    """:meth:`lp` of ``np.repeat(ctx_E, n)`` with each context run once for its ``n``
    responses (same numbers up to float rounding)."""
    fn = _make_grouped_lp_fn(self.graphdef)
    return self._per_context(lambda c, r, m: fn(self.state, c, r, m), [ctx_E], resp, mask,
                             n)[0]

  def gold(self, ctx, resp, mask):
    return np.asarray(self._batched(lambda c, r, m: self.gold_fn(self.gold_params, c, r, m),
                                    [ctx, resp, mask]), np.float64)


def _mean_se(x_E: np.ndarray) -> tuple[float, float]:
  e = x_E.shape[0]
  se = float(np.std(x_E, ddof=1) / np.sqrt(e)) if e > 1 else float("nan")
  return float(np.mean(x_E)), se


def _candidate_measures(runner: Runner, ctx_base_ExC, resp, mask, ref_gold_ExR,
                        ref_mean_E) -> dict[str, np.ndarray]:
  """Per-candidate gold (reference-subtracted), win rate, length, EOS; ``[E, n]`` each."""
  e, r = ref_gold_ExR.shape
  n = resp.shape[0] // e
  g = runner.gold(np.repeat(ctx_base_ExC, n, axis=0), resp, mask).reshape(e, n)
  win = np.mean(1.0 / (1.0 + np.exp(-(g[:, :, None] - ref_gold_ExR[:, None, :]))), axis=-1)
  length = mask.sum(-1).reshape(e, n)
  last = np.maximum(length.reshape(-1).astype(int) - 1, 0)
  eos = (resp[np.arange(resp.shape[0]), last] == sampling.EOS).astype(np.float64).reshape(e, n)
  return {"gold": g - ref_mean_E[:, None], "win_rate": win, "response_len": length,
          "eos_frac": eos}


def evaluate(lab, cfg: ICDPOConfig = ICDPOConfig(), *, retrieval_dir: str | None = None,
             log=None) -> ICDPOResult:
  """ICDPO and its baselines on the lab's eval prompts, and its scorer on the test pairs.

  Args:
    lab: a built :class:`gpo_jax.lab.Lab`.
    cfg: the sweep (:class:`ICDPOConfig`).
    retrieval_dir: where retrievals are stored and reused
      (:func:`gpo_jax.incontext.retrieval.load_or_retrieve`); None computes them in memory.
    log: optional ``log(str)`` progress callback.

  Returns:
    :class:`ICDPOResult`; the measures are defined in the module docstring.

  Runtime: the default grid (N up to 16, k in {1, 2}, three retrievers, both contrasts, 64
  eval prompts, pools of 32, 256 test pairs) takes about 45 s on the tiny lab on 2 shared
  CPU cores, most of it compilation; one retriever and k about 6 s once compiled.
  """
  t0 = time.time()
  log = log or (lambda msg: None)
  corpus = lab.corpus
  for k in cfg.ks:
    retrieval_lib.check_k(int(k), corpus.cfg, lab.policy_cfg.max_len)
  ns = np.asarray(sorted({int(n) for n in cfg.ns}), np.int64)
  k_max = max(cfg.ks)
  runner = Runner(lab, cfg)
  pool = retrieval_lib.DemoPool.from_lab(lab, "train")
  model = lab.policy()
  n_eval = cfg.n_prompts or len(lab.eval_prompts)
  if n_eval > len(lab.eval_prompts) or n_eval < 2:
    raise ValueError(f"n_prompts={cfg.n_prompts} must select 2..{len(lab.eval_prompts)} of "
                     "the lab's eval prompts (0 = all)")
  ctx_base = np.asarray(lab.eval_prompts[:n_eval], np.int32)
  queries = retrieval_lib.prompts_from_contexts(ctx_base)
  e, R, Np = n_eval, cfg.ref_samples_per_prompt, cfg.pool_size
  timings: dict[str, float] = {}

  def get_demos(query_prompts, polarity, retriever):
    s = retrieval_lib.RetrievalSettings(k=k_max, polarity=polarity, retriever=retriever,
                                        seed=cfg.seed, gold_quantile=cfg.gold_quantile)
    if retrieval_dir is not None:
      return retrieval_lib.load_or_retrieve(retrieval_dir, lab, query_prompts, s, pool=pool,
                                            model=model)
    return retrieval_lib.retrieve(pool, query_prompts, k_max, polarity=polarity,
                                  retriever=retriever, seed=cfg.seed,
                                  gold_quantile=cfg.gold_quantile, model=model)

  # π_ref(·|x): the R(0) baseline, the win-rate opponents and the baselines' pool.
  t = time.time()
  ref_resp, ref_mask = runner.sample(ctx_base, R, _REF_STREAM)
  ctx_base_R = np.repeat(ctx_base, R, axis=0)
  ref_gold = runner.gold(ctx_base_R, ref_resp, ref_mask).reshape(e, R)
  ref_mean = ref_gold.mean(axis=1)
  ref_lp_base = runner.lp_per_context(ctx_base, ref_resp, ref_mask, R).reshape(e, R)
  ref_meas = _candidate_measures(runner, ctx_base, ref_resp, ref_mask, ref_gold, ref_mean)
  ref_meas["k1"] = np.zeros((e, R))
  timings["reference"] = time.time() - t
  log(f"π_ref pool: {e} prompts x {R}, mean gold {ref_gold.mean():+.3f}")

  rows: list[dict[str, Any]] = []
  per_prompt: dict[str, np.ndarray] = {}
  kl_bon = bon_lib.kl_bon(ns)

  def add(method, k, retriever, contrast, select_ExN, meas, kl_icl_E=None):
    name = f"{method}/k{k}/{retriever}/{contrast}"
    est = {m: bon_lib.per_prompt(select_ExN, meas[m], ns) for m in MEASURES}
    for m, v in est.items():
      per_prompt[f"{name}/{m}"] = v
    base = per_prompt.get("bon_likelihood/k0/-/-/gold")
    for j, n in enumerate(ns):
      if method == "icl_sample" and n != 1:
        continue
      row = {"method": method, "n": int(n), "k": int(k), "retriever": retriever,
             "contrast": contrast, "n_prompts": e}
      for m, v in est.items():
        row[m], row[m + "_se"] = _mean_se(v[:, j])
      if kl_icl_E is None:        # candidates from π_ref: best-of-n's KL
        row.update(kl=float(kl_bon[j]), kl_lower=0.0, kl_icl=0.0, kl_icl_se=0.0,
                   kl_spec_bound=float(np.log(n)))
      else:
        row["kl_icl"], row["kl_icl_se"] = _mean_se(kl_icl_E)
        row.update(kl_lower=row["k1"], kl=row["k1"] + float(kl_bon[j]),
                   kl_spec_bound=row["kl_icl"] + float(np.log(n)))
      row["sqrt_kl"] = float(np.sqrt(max(row["kl"], 0.0)))
      if base is not None and method != "bon_likelihood":
        row["d_gold"], row["d_gold_se"] = _mean_se(est["gold"][:, j] - base[:, j])
      rows.append(row)

  add("bon_likelihood", 0, "-", "-", ref_lp_base, ref_meas)
  add("bon_gold", 0, "-", "-", ref_gold, ref_meas)

  retrieval_keys = {}
  t = time.time()
  for retriever in cfg.retrievers:
    good = get_demos(queries, "good", retriever)
    bad = get_demos(queries, "bad", retriever) if "bad" in cfg.contrasts else None
    retrieval_keys[f"eval/{retriever}"] = (good.key, bad.key if bad else "")
    for k in sorted({int(k) for k in cfg.ks}):
      ctx_plus = good.first(k).context(corpus, queries)
      ctx_bad = bad.first(k).context(corpus, queries) if bad is not None else None
      # Candidates from q = π_ref(·|D⁺, x); one stream for every (k, retriever): paired.
      resp, mask = runner.sample(ctx_plus, Np, _ICL_STREAM)
      lp_plus, lp_base, kl_tok = runner.pair_per_context(ctx_plus, ctx_base, resp, mask, Np)
      meas = _candidate_measures(runner, ctx_base, resp, mask, ref_gold, ref_mean)
      meas["k1"] = (lp_plus - lp_base).reshape(e, Np)
      kl_icl_E = kl_tok.reshape(e, Np).mean(axis=1)
      add("icl_sample", k, retriever, "-", np.zeros((e, Np)), meas, kl_icl_E)
      minus = {"base": lp_base}
      ref_lp_plus = runner.lp_per_context(ctx_plus, ref_resp, ref_mask, R)
      ref_minus = {"base": ref_lp_base.reshape(-1)}
      if ctx_bad is not None:
        minus["bad"] = runner.lp_per_context(ctx_bad, resp, mask, Np)
        ref_minus["bad"] = runner.lp_per_context(ctx_bad, ref_resp, ref_mask, R)
      for contrast in cfg.contrasts:
        s = (lp_plus - minus[contrast]).reshape(e, Np)
        add("icdpo", k, retriever, contrast, s, meas, kl_icl_E)
        add("bon_icdpo_score", k, retriever, contrast,
            (ref_lp_plus - ref_minus[contrast]).reshape(e, R), ref_meas)
      log(f"{retriever} k={k}: kl_icl {kl_icl_E.mean():.3f}, icl gold "
          f"{meas['gold'].mean():+.3f}")
  timings["icdpo"] = time.time() - t

  t = time.time()
  reward_rows = [] if cfg.n_test_pairs < 0 else _reward_accuracy(
      lab, runner, cfg, get_demos, retrieval_keys)
  timings["reward"] = time.time() - t
  timings["total"] = time.time() - t0
  info = {"ns": ns.tolist(), "n_prompts": e, "pool_per_prompt": Np,
          "ref_samples_per_prompt": R, "ref_gold_mean": float(ref_gold.mean()),
          "demo_pool": len(pool), "gold_quantile": cfg.gold_quantile,
          "retrieval_keys": retrieval_keys, "seconds": timings,
          "config": dataclasses.asdict(cfg)}
  return ICDPOResult(rows=rows, per_prompt=per_prompt, reward_rows=reward_rows, info=info)


def _reward_accuracy(lab, runner: Runner, cfg: ICDPOConfig, get_demos,
                     retrieval_keys) -> list[dict[str, Any]]:
  """Accuracy of ``S`` (and likelihood baselines) against the gold ordering of test pairs."""
  pairs = lab.pairs("test")
  m = len(pairs["chosen"]) if cfg.n_test_pairs == 0 else min(cfg.n_test_pairs,
                                                            len(pairs["chosen"]))
  ctx = np.asarray(pairs["prompt"][:m], np.int32)
  queries = retrieval_lib.prompts_from_contexts(ctx)
  resp = np.concatenate([pairs["chosen"][:m], pairs["rejected"][:m]]).astype(np.int32)
  mask = np.concatenate([pairs["chosen_mask"][:m], pairs["rejected_mask"][:m]]).astype(
      np.float32)
  dg = (np.asarray(pairs["gold_chosen"][:m], np.float64)
        - np.asarray(pairs["gold_rejected"][:m], np.float64))
  untied = dg != 0
  ctx2 = np.concatenate([ctx, ctx])

  def row(name, k, retriever, contrast, r_2M):
    diff = r_2M[:m] - r_2M[m:]
    correct = (diff * dg > 0)[untied].astype(np.float64)
    acc = float(correct.mean()) if correct.size else float("nan")
    return {"reward": name, "k": k, "retriever": retriever, "contrast": contrast,
            "accuracy": acc, "accuracy_se": float(np.sqrt(acc * (1 - acc) / max(correct.size,
                                                                               1))),
            "n_pairs": int(correct.size)}

  lp_base = runner.lp(ctx2, resp, mask)
  out = [row("likelihood", 0, "-", "-", lp_base)]
  corpus = lab.corpus
  for retriever in cfg.retrievers:
    good = get_demos(queries, "good", retriever)
    bad = get_demos(queries, "bad", retriever) if "bad" in cfg.contrasts else None
    retrieval_keys[f"test/{retriever}"] = (good.key, bad.key if bad else "")
    for k in sorted({int(k) for k in cfg.ks}):
      plus = np.concatenate([good.first(k).context(corpus, queries)] * 2)
      lp_plus = runner.lp(plus, resp, mask)
      out.append(row("icl_likelihood", k, retriever, "-", lp_plus))
      for contrast in cfg.contrasts:
        if contrast == "base":
          minus = lp_base
        else:
          minus = runner.lp(np.concatenate([bad.first(k).context(corpus, queries)] * 2),
                            resp, mask)
        out.append(row("icdpo", k, retriever, contrast, lp_plus - minus))
  return out


def format_rows(result: ICDPOResult, methods=METHODS) -> str:
  """A plain-text table of the summary rows."""
  head = (f"{'method':<16}{'N':>4}{'k':>3} {'retriever':<10}{'contrast':<9}"
          f"{'gold':>16}{'d_gold vs lik':>17}{'win':>7}{'k1':>7}{'kl':>7}{'kl_icl':>7}"
          f"{'spec':>7}")
  lines = [head]
  for r in result.rows:
    if r["method"] not in methods:
      continue
    d = (f"{r['d_gold']:+.3f}±{r['d_gold_se']:.3f}" if "d_gold" in r else "")
    lines.append(f"{r['method']:<16}{r['n']:>4}{r['k']:>3} {r['retriever']:<10}"
                 f"{r['contrast']:<9}{r['gold']:+9.3f}±{r['gold_se']:.3f}{d:>17}"
                 f"{r['win_rate']:7.3f}{r['k1']:7.3f}{r['kl']:7.3f}{r['kl_icl']:7.3f}"
                 f"{r['kl_spec_bound']:7.3f}")
  for r in result.reward_rows:
    lines.append(f"reward {r['reward']:<15} k={r['k']} {r['retriever']:<10}{r['contrast']:<6}"
                 f" acc {r['accuracy']:.3f}±{r['accuracy_se']:.3f} (n={r['n_pairs']})")
  return "\n".join(lines)


# ---------------------------------------------------------------------- on disk
#: files of a stored evaluation (``save`` / ``load``), all in one directory
ROWS_FILE, REWARD_FILE, PER_PROMPT_FILE, INFO_FILE = (
    "icdpo.jsonl", "icdpo_reward.jsonl", "icdpo_per_prompt.npz", "icdpo_info.json")


def _jsonable(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def save(result: ICDPOResult, out_dir: str) -> str:
  """Writes ``result`` to ``out_dir`` (rows and reward rows as JSON lines, per-prompt
  arrays as ``.npz`` with ``/`` spelled ``__``, info as JSON), each file written aside and
  renamed; returns ``out_dir``."""
  os.makedirs(out_dir, exist_ok=True)

  def put(name, write):
    writers.write_aside(os.path.join(out_dir, name), "wb" if name.endswith(".npz") else "w",
                        write)

  lines = lambda rows: "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows)  # noqa: E731
  put(ROWS_FILE, lambda f: f.write(lines(result.rows)))
  put(REWARD_FILE, lambda f: f.write(lines(result.reward_rows)))
  put(PER_PROMPT_FILE, lambda f: np.savez(
      f, **{k.replace("/", "__"): np.asarray(v) for k, v in result.per_prompt.items()}))
  put(INFO_FILE, lambda f: json.dump(result.info, f, indent=1, default=_jsonable))
  return out_dir


def load(out_dir: str) -> ICDPOResult:
  """Reads what :func:`save` wrote; a missing file raises ``FileNotFoundError`` naming it."""
  paths = {n: os.path.join(out_dir, n) for n in (ROWS_FILE, REWARD_FILE, PER_PROMPT_FILE, INFO_FILE)}
  missing = [p for p in paths.values() if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f"no stored ICDPO evaluation in {out_dir}: missing {missing}")
  read = lambda p: [json.loads(line) for line in open(p) if line.strip()]  # noqa: E731
  with np.load(paths[PER_PROMPT_FILE]) as z:
    per_prompt = {k.replace("__", "/"): z[k] for k in z.files}
  with open(paths[INFO_FILE]) as f:
    info = json.load(f)
  return ICDPOResult(rows=read(paths[ROWS_FILE]), per_prompt=per_prompt,
                     reward_rows=read(paths[REWARD_FILE]), info=info)
