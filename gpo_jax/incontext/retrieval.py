"""Demonstration retrieval for in-context alignment: D⁺ (high-gold) and D⁻ (low-gold) demos for a prompt.

The pool is the lab's gold-labelled training pairs: every pair gives two items
``(prompt, response, mask, gold)`` that share the prompt (:meth:`DemoPool.from_lab`).
For a query prompt ``x`` a retriever returns ``k`` pool items as demonstrations:

* **Polarity.** ``"good"`` restricts the candidates to items whose gold is at least the
  pool's ``1 − gold_quantile`` quantile (the top ``gold_quantile`` of the pool, e.g. 25%);
  ``"bad"`` to items at most its ``gold_quantile`` quantile (the bottom).
* **Retriever** (the swept choice), ranking the eligible candidates for each query:

  - ``"random"``: a uniformly random order, seeded per ``(seed, query index)``;
  - ``"bm25"``: Okapi BM25 of the query's token n-grams (unigrams and bigrams of the
    prompt tokens) against each pool prompt's (:func:`bm25_scores`);
  - ``"embedding"``: cosine similarity of mean-pooled π_ref final hidden states of the
    prompts (:func:`prompt_embeddings`, jitted and batched).

  Ties in the score are broken by a seeded random order, so no retriever favours low pool
  indices.
* **Guards.** A pool item whose prompt equals the query prompt exactly is never returned
  (no leakage of the query's own responses), no pool item appears twice for one query, and
  (``distinct_prompts=True``, the default) no two demos of one query share a prompt (the
  two responses of one pair would otherwise often both be retrieved).

The returned :class:`Demos` are ranked best first (``[:, :j]`` of a ``k``-retrieval is the
``j``-retrieval with the same settings, for every retriever). Retrieval is data:
:func:`load_or_retrieve` computes it once and stores it as ``retrieval-<hash12>.npz``, the
hash covering the lab (config hash and ``lab.json``'s self-checksum, which covers π_ref's
weights), the pool, the query prompts and the settings.

References:
  Song et al. 2024, "ICDPO: Effectively Borrowing Alignment Capability of Others via
  In-context Direct Preference Optimization", arXiv 2402.09320 (retrieved demonstrations).
  Robertson & Zaragoza 2009, "The Probabilistic Relevance Framework: BM25 and Beyond".
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpo_jax.lab import corpus as corpus_lib
from gpo_jax.lab.builder import arrays_digest
from gpo_jax.runtime import writers

POLARITIES = ("good", "bad")
RETRIEVERS = ("random", "bm25", "embedding")
#: bump when a change to this module changes what given settings retrieve
RETRIEVAL_VERSION = "1"
_BM25_K1 = 1.5
_BM25_B = 0.75
_TIE_STREAM = 0x71E
_RANDOM_STREAM = 0x4A4D


# ---------------------------------------------------------------------- the pool
@dataclasses.dataclass(frozen=True)
class DemoPool:
  """Gold-labelled (prompt, response) items that demonstrations are drawn from.

  Attributes:
    prompts_NxP: prompts (content tokens only, no ``BOS``/``SEP``), int32 ``[N, P]``.
    responses_NxT: responses (``content* EOS PAD*``), int32 ``[N, T]``.
    masks_NxT: 1 on response tokens up to and including EOS, int32 ``[N, T]``.
    gold_N: normalised gold score of each response, float64 ``[N]``.
    source: where the items came from (e.g. ``"train"``), recorded with retrievals.
  """
  prompts_NxP: np.ndarray
  responses_NxT: np.ndarray
  masks_NxT: np.ndarray
  gold_N: np.ndarray
  source: str = ""

  def __post_init__(self):
    n = self.prompts_NxP.shape[0]
    shapes = (self.responses_NxT.shape[0], self.masks_NxT.shape[0], self.gold_N.shape[0])
    if self.prompts_NxP.ndim != 2 or any(s != n for s in shapes):
      raise ValueError(f"DemoPool arrays disagree: prompts {self.prompts_NxP.shape}, "
                       f"responses {self.responses_NxT.shape}, masks {self.masks_NxT.shape}, "
                       f"gold {self.gold_N.shape}; need [N, P], [N, T], [N, T], [N]")
    if self.responses_NxT.shape != self.masks_NxT.shape:
      raise ValueError(f"responses {self.responses_NxT.shape} and masks "
                       f"{self.masks_NxT.shape} must have the same shape")

  def __len__(self) -> int:
    return int(self.prompts_NxP.shape[0])

  @classmethod
  def from_pairs(cls, pairs: Mapping[str, np.ndarray], source: str = "") -> "DemoPool":
    """Items ``2i`` (chosen) and ``2i + 1`` (rejected) of pair ``i`` of ``Lab.pairs(split)``."""
    prompts = prompts_from_contexts(pairs["prompt"])

    def inter(a, b):
      return np.stack([np.asarray(a), np.asarray(b)], axis=1).reshape(
          (-1,) + np.asarray(a).shape[1:])

    return cls(prompts_NxP=np.repeat(prompts, 2, axis=0).astype(np.int32),
               responses_NxT=inter(pairs["chosen"], pairs["rejected"]).astype(np.int32),
               masks_NxT=inter(pairs["chosen_mask"], pairs["rejected_mask"]).astype(np.int32),
               gold_N=inter(pairs["gold_chosen"], pairs["gold_rejected"]).astype(np.float64),
               source=source)

  @classmethod
  def from_lab(cls, lab, split: str = "train") -> "DemoPool":
    """The pool of the lab's ``split`` pairs (``"train"``: the test pairs stay held out)."""
    return cls.from_pairs(lab.pairs(split), source=split)

  def digest(self) -> str:
    """SHA-256 of the pool's arrays."""
    return arrays_digest({"prompts": self.prompts_NxP, "responses": self.responses_NxT,
                    "masks": self.masks_NxT, "gold": self.gold_N})

  def threshold(self, polarity: str, gold_quantile: float) -> float:
    """Gold bound of ``polarity``: the ``1 − q`` quantile (good, a floor) or ``q`` (bad, a ceiling)."""
    check_choice("polarity", polarity, POLARITIES)
    _check_quantile(gold_quantile)
    q = 1.0 - gold_quantile if polarity == "good" else gold_quantile
    return float(np.quantile(self.gold_N, q))

  def eligible(self, polarity: str, gold_quantile: float) -> np.ndarray:
    """Boolean ``[N]``: the items of the required gold rank."""
    t = self.threshold(polarity, gold_quantile)
    return self.gold_N >= t if polarity == "good" else self.gold_N <= t


def prompts_from_contexts(ctx_NxC: np.ndarray) -> np.ndarray:
  """``[BOS] prompt [SEP]`` contexts (the lab's ``prompt`` field) → prompts ``[N, C − 2]``."""
  ctx = np.asarray(ctx_NxC)
  if ctx.ndim != 2 or ctx.shape[1] < 3 or np.any(ctx[:, 0] != corpus_lib.BOS) or np.any(
      ctx[:, -1] != corpus_lib.SEP):
    raise ValueError(f"contexts must be [N, P + 2] rows of [BOS] prompt [SEP] (BOS="
                     f"{corpus_lib.BOS}, SEP={corpus_lib.SEP}), got shape {ctx.shape}")
  return ctx[:, 1:-1].astype(np.int32)


# ---------------------------------------------------------------------- settings, result
@dataclasses.dataclass(frozen=True)
class RetrievalSettings:
  """What to retrieve: ``k`` demos of ``polarity`` by ``retriever``.

  Attributes:
    k: demonstrations per query (at most the corpus's ``max_demos``; checked where the
      corpus is known, :func:`check_k`).
    polarity: ``"good"`` (top gold quantile) or ``"bad"`` (bottom).
    retriever: ``"random"``, ``"bm25"`` or ``"embedding"``.
    seed: seed of the random order (``random``) and of tie-breaks (all retrievers).
    gold_quantile: fraction of the pool in each polarity's band, in (0, 1].
    distinct_prompts: at most one demo per distinct prompt for a query.
  """
  k: int = 2
  polarity: str = "good"
  retriever: str = "bm25"
  seed: int = 0
  gold_quantile: float = 0.25
  distinct_prompts: bool = True

  def __post_init__(self):
    if not isinstance(self.k, (int, np.integer)) or isinstance(self.k, bool) or self.k < 1:
      raise ValueError(f"k={self.k!r} must be a positive int (demonstrations per query)")
    object.__setattr__(self, "k", int(self.k))
    check_choice("polarity", self.polarity, POLARITIES)
    check_choice("retriever", self.retriever, RETRIEVERS)
    _check_quantile(self.gold_quantile)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Demos:
  """Retrieved demonstrations for ``E`` queries, ranked best first.

  Attributes:
    prompts_ExKxP: demo prompts, int32 ``[E, k, P]``.
    responses_ExKxT: demo responses, int32 ``[E, k, T]``.
    masks_ExKxT: their response masks, int32 ``[E, k, T]``.
    gold_ExK: their normalised gold, float64 ``[E, k]``.
    index_ExK: their pool indices, int64 ``[E, k]``.
    score_ExK: the retriever's score (BM25, cosine; random: 0), float64 ``[E, k]``.
    threshold: the gold bound of the polarity (good: floor, bad: ceiling).
    settings: the :class:`RetrievalSettings`.
    key: the content hash (``""`` when not computed by :func:`load_or_retrieve`).
  """
  prompts_ExKxP: np.ndarray
  responses_ExKxT: np.ndarray
  masks_ExKxT: np.ndarray
  gold_ExK: np.ndarray
  index_ExK: np.ndarray
  score_ExK: np.ndarray
  threshold: float
  settings: RetrievalSettings
  key: str = ""

  def first(self, k: int) -> "Demos":
    """The best ``k`` of each query's demos (what a ``k``-retrieval returns)."""
    have = self.index_ExK.shape[1]
    if not 1 <= k <= have:
      raise ValueError(f"k={k} must be in [1, {have}] (the demos retrieved per query)")
    return dataclasses.replace(
        self, prompts_ExKxP=self.prompts_ExKxP[:, :k], responses_ExKxT=self.responses_ExKxT[:, :k],
        masks_ExKxT=self.masks_ExKxT[:, :k], gold_ExK=self.gold_ExK[:, :k],
        index_ExK=self.index_ExK[:, :k], score_ExK=self.score_ExK[:, :k],
        settings=dataclasses.replace(self.settings, k=k), key="")

  def context(self, corpus: corpus_lib.Corpus, query_prompts_ExP: np.ndarray) -> np.ndarray:
    """``[BOS] demos prompt [SEP]`` with the best-ranked demo last (nearest the query), ``[E, C]``."""
    check_k(self.index_ExK.shape[1], corpus.cfg)
    return corpus.context(query_prompts_ExP, self.prompts_ExKxP[:, ::-1],
                          self.responses_ExKxT[:, ::-1])

  # -------------------------------------------------------------------- storage
  def arrays(self) -> dict[str, np.ndarray]:
    return {"prompts": self.prompts_ExKxP, "responses": self.responses_ExKxT,
            "masks": self.masks_ExKxT, "gold": self.gold_ExK, "index": self.index_ExK,
            "score": self.score_ExK, "threshold": np.float64(self.threshold),
            "settings": np.asarray(json.dumps(self.settings.to_dict(), sort_keys=True)),
            "key": np.asarray(self.key)}

  def save(self, path: str) -> None:
    """Writes the demos to ``path`` (``.npz``) atomically."""
    writers.save_npz_atomic(path, self.arrays())

  @classmethod
  def load(cls, path: str) -> "Demos":
    with np.load(path, allow_pickle=False) as z:
      return cls(prompts_ExKxP=z["prompts"], responses_ExKxT=z["responses"],
                 masks_ExKxT=z["masks"], gold_ExK=z["gold"], index_ExK=z["index"],
                 score_ExK=z["score"], threshold=float(z["threshold"]),
                 settings=RetrievalSettings(**json.loads(str(z["settings"]))),
                 key=str(z["key"]))


# ---------------------------------------------------------------------- checks
def check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")


def _check_quantile(q) -> None:
  if not 0.0 < float(q) <= 1.0:
    raise ValueError(f"gold_quantile={q!r} must be in (0, 1] (the fraction of the pool "
                     "in the good or bad band)")


def check_k(k: int, corpus_cfg: corpus_lib.CorpusConfig, max_len: int | None = None) -> None:
  """Raises unless ``k`` demos fit: ``k <= max_demos`` (π_ref never saw more) and the episode
  ``episode_len(k)`` fits ``max_len`` (π_ref's position table; default the corpus's
  ``max_episode_len``)."""
  if k < 0 or k > corpus_cfg.max_demos:
    raise ValueError(f"k={k} demonstrations is outside [0, max_demos={corpus_cfg.max_demos}]: "
                     f"π_ref was trained on episodes with at most {corpus_cfg.max_demos} demos")
  limit = corpus_cfg.max_episode_len if max_len is None else max_len
  if corpus_cfg.episode_len(k) > limit:
    raise ValueError(f"k={k} demonstrations make episodes of {corpus_cfg.episode_len(k)} "
                     f"tokens, over the policy's max_len={limit}")


# ---------------------------------------------------------------------- scores
def _ngrams(prompts_NxP: np.ndarray) -> list[list[tuple]]:
  """Unigrams ``(t,)`` and bigrams ``(t, u)`` of each prompt."""
  out = []
  for row in np.asarray(prompts_NxP).tolist():
    out.append([(t,) for t in row] + [(a, b) for a, b in zip(row[:-1], row[1:])])
  return out


def bm25_scores(pool_prompts_NxP: np.ndarray, query_prompts_ExP: np.ndarray,
                k1: float = _BM25_K1, b: float = _BM25_B) -> np.ndarray:
  """Okapi BM25 of each query against each pool prompt over token unigrams + bigrams, ``[E, N]``.

  ``score(q, d) = Σ_{g ∈ q} idf(g) · f(g, d)(k1 + 1) / (f(g, d) + k1(1 − b + b·|d|/avgdl))``
  summed over the query's n-grams with multiplicity, ``f(g, d)`` the count of n-gram ``g``
  in document ``d``, ``|d|`` its n-gram count, ``idf(g) = log(1 + (N − n_g + 0.5)/(n_g +
  0.5))`` (the non-negative Lucene form) with ``n_g`` the pool documents containing ``g``.
  """
  docs = _ngrams(pool_prompts_NxP)
  n = len(docs)
  vocab: dict[tuple, int] = {}
  for d in docs:
    for g in d:
      vocab.setdefault(g, len(vocab))
  tf_NxG = np.zeros((n, len(vocab)), np.float64)
  for i, d in enumerate(docs):
    for g in d:
      tf_NxG[i, vocab[g]] += 1.0
  df_G = (tf_NxG > 0).sum(axis=0)
  idf_G = np.log1p((n - df_G + 0.5) / (df_G + 0.5))
  dl_N = tf_NxG.sum(axis=1)
  norm_N = k1 * (1.0 - b + b * dl_N / dl_N.mean())
  sat_NxG = tf_NxG * (k1 + 1.0) / (tf_NxG + norm_N[:, None])
  queries = _ngrams(query_prompts_ExP)
  qtf_ExG = np.zeros((len(queries), len(vocab)), np.float64)
  for e, q in enumerate(queries):
    for g in q:
      if g in vocab:          # n-grams absent from the pool score 0
        qtf_ExG[e, vocab[g]] += 1.0
  return (qtf_ExG * idf_G[None]) @ sat_NxG.T


@functools.lru_cache(maxsize=None)
def _make_embed_fn(graphdef):
  @jax.jit
  def fn(state, ctx_BxC):
    model = nnx.merge(graphdef, state)
    h_BxCxD, _ = model.decoder(model.decoder.embed(ctx_BxC))
    # Mean over the prompt tokens (between BOS and SEP).
    return jnp.mean(h_BxCxD[:, 1:-1].astype(jnp.float32), axis=1)
  return fn


def prompt_embeddings(model, prompts_NxP: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """π_ref's final (normed) hidden states of ``[BOS] prompt [SEP]``, mean over the prompt
  positions, ``[N, D]``."""
  from gpo_jax.lab import steps
  prompts = np.asarray(prompts_NxP, np.int32)
  n = prompts.shape[0]
  ctx = np.concatenate([np.full((n, 1), corpus_lib.BOS, np.int32), prompts,
                        np.full((n, 1), corpus_lib.SEP, np.int32)], axis=1)
  graphdef, state = nnx.split(model)
  fn = _make_embed_fn(graphdef)
  return steps.batched(lambda c: fn(state, c), [ctx], min(batch_size, n)).astype(np.float64)


def cosine_scores(pool_emb_NxD: np.ndarray, query_emb_ExD: np.ndarray) -> np.ndarray:
  """Cosine similarity of every query to every pool item, ``[E, N]``."""
  def unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return unit(np.asarray(query_emb_ExD, np.float64)) @ unit(np.asarray(pool_emb_NxD,
                                                                        np.float64)).T


# ---------------------------------------------------------------------- retrieval
def retrieve(pool: DemoPool, query_prompts_ExP: np.ndarray, k: int, *, polarity: str = "good",
             retriever: str = "bm25", seed: int = 0, gold_quantile: float = 0.25,
             distinct_prompts: bool = True, model=None, batch_size: int = 256) -> Demos:
  """``k`` demonstrations of ``polarity`` for each query prompt, ranked by ``retriever``.

  Args:
    pool: the gold-labelled items (:class:`DemoPool`).
    query_prompts_ExP: query prompts (content tokens, no ``BOS``/``SEP``), ``[E, P]``.
    k: demos per query.
    polarity: ``"good"`` (gold ≥ the pool's ``1 − gold_quantile`` quantile) or ``"bad"``
      (gold ≤ its ``gold_quantile`` quantile).
    retriever: ``"random"``, ``"bm25"`` or ``"embedding"`` (module docstring).
    seed: seed of the random order and of tie-breaks.
    gold_quantile: the band's fraction of the pool.
    distinct_prompts: at most one demo per distinct prompt for a query.
    model: π_ref (a ``Transformer``), needed by ``"embedding"`` only.
    batch_size: rows per jitted embedding call.

  Returns:
    :class:`Demos` ``[E, k, ...]``, best first.

  Raises:
    ValueError: an unknown polarity/retriever, a bad ``k``, a query of the wrong width, or
      fewer than ``k`` admissible demos for some query.
  """
  settings = RetrievalSettings(k=k, polarity=polarity, retriever=retriever, seed=seed,
                               gold_quantile=gold_quantile, distinct_prompts=distinct_prompts)
  queries = np.asarray(query_prompts_ExP, np.int32)
  if queries.ndim != 2 or queries.shape[1] != pool.prompts_NxP.shape[1]:
    raise ValueError(f"query prompts must be [E, {pool.prompts_NxP.shape[1]}] (the pool's "
                     f"prompt length, without BOS/SEP), got {queries.shape}")
  e, n = queries.shape[0], len(pool)
  eligible_N = pool.eligible(polarity, gold_quantile)
  cand = np.flatnonzero(eligible_N)
  if retriever == "random":
    score_ExC = np.zeros((e, cand.size))
  elif retriever == "bm25":
    score_ExC = bm25_scores(pool.prompts_NxP[cand], queries)
  else:
    if model is None:
      raise ValueError("retriever='embedding' needs model=π_ref (its hidden states embed the "
                       "prompts); the other retrievers ('random', 'bm25') do not")
    emb = prompt_embeddings(model, np.concatenate([pool.prompts_NxP[cand], queries]),
                            batch_size)
    score_ExC = cosine_scores(emb[:cand.size], emb[cand.size:])

  out_idx = np.zeros((e, k), np.int64)
  out_score = np.zeros((e, k), np.float64)
  cand_prompts = pool.prompts_NxP[cand]
  for q in range(e):
    # The random order doubles as the tie-break of the other retrievers.
    rng = np.random.default_rng([seed, _RANDOM_STREAM if retriever == "random" else _TIE_STREAM,
                                 q])
    tie = rng.permutation(cand.size)
    order = np.lexsort((tie, -score_ExC[q]))      # by score desc, then the random order
    leaked = np.all(cand_prompts == queries[q], axis=1)
    picked, seen = [], set()
    for j in order:
      if leaked[j]:
        continue
      key = cand_prompts[j].tobytes()
      if distinct_prompts and key in seen:
        continue
      picked.append(j)
      seen.add(key)
      if len(picked) == k:
        break
    if len(picked) < k:
      raise ValueError(
          f"query {q}: only {len(picked)} admissible {polarity} demos (pool of {n}, "
          f"{cand.size} in the gold band gold_quantile={gold_quantile}, distinct_prompts="
          f"{distinct_prompts}) for k={k}; lower k or raise gold_quantile")
    out_idx[q] = cand[picked]
    out_score[q] = score_ExC[q, picked]
  return Demos(prompts_ExKxP=pool.prompts_NxP[out_idx],
               responses_ExKxT=pool.responses_NxT[out_idx], masks_ExKxT=pool.masks_NxT[out_idx], gold_ExK=pool.gold_N[out_idx],
               index_ExK=out_idx, score_ExK=out_score,
               threshold=pool.threshold(polarity, gold_quantile), settings=settings)


# ---------------------------------------------------------------------- stored retrieval
def lab_digest(lab) -> str:
  """The lab's identity: its config hash and ``lab.json``'s self-checksum (which covers the
  SHA-256 of every lab file, π_ref's weights included), when it has one."""
  meta = ""
  path = os.path.join(lab.path, "lab.json")
  if os.path.exists(path):
    with open(path) as f:
      meta = json.load(f).get("meta_sha256", "")
  return f"{lab.cfg.config_hash()}:{meta}"


def retrieval_key(lab_id: str, pool: DemoPool, query_prompts_ExP: np.ndarray,
                  settings: RetrievalSettings) -> str:
  """12 hex digits of SHA-256 over (lab, pool, queries, settings, code version)."""
  blob = json.dumps({"lab": lab_id, "pool": pool.digest(), "pool_source": pool.source,
                     "queries": arrays_digest({"q": np.asarray(query_prompts_ExP, np.int32)}),
                     "settings": settings.to_dict(), "version": RETRIEVAL_VERSION},
                    sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def load_or_retrieve(directory: str, lab, query_prompts_ExP: np.ndarray,
                     settings: RetrievalSettings, pool: DemoPool | None = None,
                     model=None) -> Demos:
  """The stored retrieval for these settings under ``directory``, computed and saved if absent.

  The file is ``<directory>/retrieval-<key>.npz`` with ``key`` = :func:`retrieval_key`;
  a file whose recorded key differs (a rename) is recomputed.

  Args:
    directory: where retrievals are stored (created if needed).
    lab: the :class:`gpo_jax.lab.Lab` (its identity enters the key; π_ref embeds prompts).
    query_prompts_ExP: query prompts without ``BOS``/``SEP``.
    settings: :class:`RetrievalSettings`.
    pool: the pool (default: :meth:`DemoPool.from_lab` of the train pairs).
    model: π_ref for ``"embedding"`` (default: ``lab.policy()``).
  """
  pool = DemoPool.from_lab(lab) if pool is None else pool
  key = retrieval_key(lab_digest(lab), pool, query_prompts_ExP, settings)
  path = os.path.join(directory, f"retrieval-{key}.npz")
  if os.path.exists(path):
    demos = Demos.load(path)
    if demos.key == key and demos.settings == settings:
      return demos
  if settings.retriever == "embedding" and model is None:
    model = lab.policy()
  demos = retrieve(pool, query_prompts_ExP, settings.k, polarity=settings.polarity,
                   retriever=settings.retriever, seed=settings.seed,
                   gold_quantile=settings.gold_quantile,
                   distinct_prompts=settings.distinct_prompts, model=model)
  demos = dataclasses.replace(demos, key=key)
  os.makedirs(directory, exist_ok=True)
  demos.save(path)
  return demos
