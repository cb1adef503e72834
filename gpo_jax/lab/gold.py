"""The gold score as a pure function: the lab's network, optionally with a coherence term (SPEC §3).

Two kinds of gold (``LabConfig.gold_kind``):

* ``"network"``: the randomly initialised gold network alone, normalised to mean 0, std 1
  under π_ref samples. It scores every token sequence, including text the world never
  produces (responses that run into the length cap without EOS, special tokens inside a
  response, bigrams no style uses), and it scores such text arbitrarily.
* ``"coherent"``: a rater who also reads for sense. With ``g_net`` the normalised network
  score, ``ℓ`` the response's mean per-token log-likelihood under the corpus's true style
  mixture (:func:`response_loglik`), standardised under π_ref samples to ``z_ℓ``, and
  ``c = 1`` for a response that hits the cap without EOS::

      raw = g_net + coherence_weight · z_ℓ − cap_penalty · c,   gold = (raw − mean) / std

  with ``mean``/``std`` again over π_ref samples, so gold keeps mean 0, std 1 under π_ref.

The corpus is a known generative process, so ``ℓ`` is exact: events the world gives
probability 0 (an EOS first, a content token where the world always ends, a special token
inside a response) get the log-probability :data:`LOGP_FLOOR`, below any event the world
can produce, instead of ``−inf``.

Everything here is jittable; :class:`GoldTerms` holds the scalars a built lab records in
``lab.json`` (``gold_terms``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gpo_jax.core import sequences
from gpo_jax.lab import corpus as corpus_lib

GOLD_KINDS = ("network", "coherent")
#: log-probability of an event the world cannot produce (the smallest possible event of the
#: default corpus, a floored bigram after a continue decision, is about −9)
LOGP_FLOOR = -12.0


@dataclasses.dataclass(frozen=True)
class GoldTerms:
  """How the normalised network score combines with the coherence terms.

  Attributes:
    kind: one of :data:`GOLD_KINDS`.
    coherence_weight: weight of the standardised log-likelihood ``z_ℓ``.
    cap_penalty: subtracted from responses that end at the cap without EOS.
    ll_mean, ll_std: ``ℓ``'s mean and std under π_ref samples.
    mean, std: the combined score's mean and std under π_ref samples.
  """
  kind: str = "network"
  coherence_weight: float = 0.0
  cap_penalty: float = 0.0
  ll_mean: float = 0.0
  ll_std: float = 1.0
  mean: float = 0.0
  std: float = 1.0

  def __post_init__(self):
    if self.kind not in GOLD_KINDS:
      raise ValueError(f"unknown gold kind {self.kind!r}; choose one of {list(GOLD_KINDS)}")
    if not (self.ll_std > 0 and self.std > 0):
      raise ValueError(f"gold terms need positive spreads, got ll_std={self.ll_std}, "
                       f"std={self.std}")

  @classmethod
  def from_dict(cls, d: dict | None) -> "GoldTerms":
    """From ``lab.json``'s ``gold_terms`` (absent in labs built before it: the network gold)."""
    return cls() if d is None else cls(**d)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def tables(corpus: corpus_lib.Corpus) -> dict[str, np.ndarray]:
  """The world's exact likelihood tables as float32 arrays (a pytree for jit)."""
  return {"log_bigram": np.log(corpus.style_SxKxK).astype(np.float32),
          "log_hazard": np.log(corpus.hazard_S).astype(np.float32),
          "log1m_hazard": np.log1p(-corpus.hazard_S).astype(np.float32)}


def response_loglik(tbl, ctx_BxC, resp_BxT, mask_BxT) -> jax.Array:
  """Mean per-token log-likelihood of each response under the uniform style mixture.

  ``log p(y|x) = log (1/S) Σ_s Π_t p_s(y_t | y_<t, x)`` (the style is fixed for a whole
  response, as in the corpus), divided by the number of response tokens (EOS included).
  For responses the corpus can emit it equals ``Corpus.mixture_logprob / length``;
  impossible events contribute :data:`LOGP_FLOOR` each.

  Args:
    tbl: :func:`tables`.
    ctx_BxC: contexts ending ``prompt [SEP]`` (the prompt's last token is ``ctx[:, -2]``).
    resp_BxT: response tokens; ``mask_BxT`` marks them (up to and including EOS).
  """
  logb = jnp.asarray(tbl["log_bigram"])
  s, k = logb.shape[0], logb.shape[-1]
  t_len = resp_BxT.shape[1]
  mask = mask_BxT > 0
  content = mask & (resp_BxT >= corpus_lib.FIRST_CONTENT)
  eos = mask & (resp_BxT == corpus_lib.EOS)
  cur = jnp.clip(resp_BxT - corpus_lib.FIRST_CONTENT, 0, k - 1)
  first = jnp.clip(ctx_BxC[:, -2] - corpus_lib.FIRST_CONTENT, 0, k - 1)
  prev = jnp.concatenate([first[:, None], cur[:, :-1]], axis=1)
  lb = logb[:, prev, cur]                                           # [S, B, T]
  pos = jnp.arange(t_len)[None, :]
  inner = (pos > 0) & (pos < t_len - 1)
  lh = jnp.asarray(tbl["log_hazard"])[:, None, None]
  l1h = jnp.asarray(tbl["log1m_hazard"])[:, None, None]
  lp = jnp.where(content & (pos == 0), lb, LOGP_FLOOR)
  lp = jnp.where(content & inner, l1h + lb, lp)
  lp = jnp.where(eos & inner, lh, lp)
  lp = jnp.where(eos & (pos == t_len - 1), 0.0, lp)
  lp = jnp.where(mask, lp, 0.0)
  total_SxB = jnp.sum(lp, axis=-1)
  mix = jax.nn.logsumexp(total_SxB, axis=0) - jnp.log(float(s))
  return mix / jnp.maximum(jnp.sum(mask, axis=-1), 1)


def combine(terms: GoldTerms, net_B, loglik_B, eos_B) -> jax.Array:
  """The gold score from the normalised network score and the coherence inputs."""
  if terms.kind == "network":
    return net_B
  raw = (net_B + terms.coherence_weight * (loglik_B - terms.ll_mean) / terms.ll_std
         - terms.cap_penalty * (1.0 - eos_B))
  return (raw - terms.mean) / terms.std


def make_gold_fn(graphdef, net_mean: float, net_std: float, terms: GoldTerms) -> "GoldFn":
  """``fn(params, ctx_BxC, resp_BxT, mask_BxT) -> (gold_B, parts)`` for ``params = {"net", "tables"}``.

  Pure and jittable: the network reads ``[context, response]`` with the context's non-PAD
  tokens and the response mask valid, its score is normalised with the lab's constants,
  then :func:`combine` adds the coherence terms of a ``"coherent"`` gold. ``parts`` holds
  per-response diagnostics whatever the kind: ``gold/network`` (the normalised network
  score) and, when ``params["tables"]`` is given, ``loglik`` (:func:`response_loglik`, how
  much the world would say this response). :class:`GoldFn` also scores many responses to
  one context from the context's cached states (``prefix`` / ``after_prefix``).
  """
  return GoldFn(graphdef, float(net_mean), float(net_std), terms)


class GoldFn:
  """The lab's gold as a pure function (:func:`make_gold_fn`), with a context-prefix path.

  ``fn.prefix(params, ctx_ExC)`` runs the network over contexts once;
  ``fn.after_prefix(params, prefix_B, ctx_BxC, resp_BxT, mask_BxT)`` then scores responses
  from it (``prefix_B``: the prefix's rows taken for each response's context), running the
  network over the ``T`` response positions only (its last block's query, attention and MLP
  at the read position only, ``RewardModel.score_after``): the same score as ``fn(...)`` up
  to float rounding, at less than ``T / (C + T)`` of the network's FLOPs. An evaluation
  that scores the same eval prompts for every member and step computes the prefix once per
  run.
  """

  def __init__(self, graphdef, net_mean: float, net_std: float, terms: GoldTerms):
    self.graphdef, self.net_mean, self.net_std, self.terms = graphdef, net_mean, net_std, terms

  def _net(self, params):
    from flax import nnx
    return nnx.merge(self.graphdef, params["net"])

  def __call__(self, params, ctx_BxC, resp_BxT, mask_BxT):
    tokens = jnp.concatenate([ctx_BxC, resp_BxT], axis=1)
    valid = jnp.concatenate([ctx_BxC != corpus_lib.PAD, mask_BxT > 0], axis=1)
    return self._finish(params, self._net(params)(tokens, valid), ctx_BxC, resp_BxT, mask_BxT)

  def prefix(self, params, ctx_ExC):
    """The network's states of each context (``RewardModel.prefix``), a pytree with rows
    ``[E, ...]``: take rows (``jax.tree.map(lambda x: x[idx], prefix)``) to pair them with
    responses."""
    return self._net(params).prefix(ctx_ExC, ctx_ExC != corpus_lib.PAD)

  def after_prefix(self, params, prefix_B, ctx_BxC, resp_BxT, mask_BxT):
    """``self(params, ctx_BxC, resp_BxT, mask_BxT)`` from ``prefix_B`` (the rows of
    :meth:`prefix` for ``ctx_BxC``)."""
    raw = self._net(params).score_after(prefix_B, resp_BxT, mask_BxT > 0)
    return self._finish(params, raw, ctx_BxC, resp_BxT, mask_BxT)

  def _finish(self, params, raw_B, ctx_BxC, resp_BxT, mask_BxT):
    net_B = (raw_B - self.net_mean) / self.net_std
    parts, gold = {"gold/network": net_B}, net_B
    if params["tables"]:
      parts["loglik"] = ll = response_loglik(params["tables"], ctx_BxC, resp_BxT, mask_BxT)
      if self.terms.kind != "network":
        gold = combine(self.terms, net_B, ll, sequences.ends_with_eos(resp_BxT, mask_BxT))
    elif self.terms.kind != "network":
      raise ValueError(f"a {self.terms.kind!r} gold needs the corpus tables (params['tables'])")
    return gold, parts
