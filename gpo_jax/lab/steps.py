"""The computations that fill a lab: SFT of π_ref, the gold reward model, preference pairs and statistics.

Everything here is a function of arrays, configs and seeds; ``gpo_jax.lab`` owns the
artifact (directories, checksums, loading). Sequences follow ``gpo_jax.lab.corpus``: a policy
sequence is ``[BOS] prompt [SEP] response`` and the *context* ``[BOS] prompt [SEP]`` is
what the preference data stores as ``prompt``.
"""

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gpo_jax.lab import corpus as corpus_lib
from gpo_jax.lab import gold as gold_lib
from gpo_jax.core import logprobs
from gpo_jax.core import model as model_lib
from gpo_jax.core import sampling
from gpo_jax.core import sequences


# ---------------------------------------------------------------------- batching helpers
def batched(fn, arrays, batch_size: int):
  """Applies a jitted ``fn(*arrays)`` in fixed-size batches (the last one padded).

  A fixed batch shape keeps ``fn`` to one compilation whatever the dataset size.
  """
  n = arrays[0].shape[0]
  outs = []
  for start in range(0, n, batch_size):
    chunk = [a[start:start + batch_size] for a in arrays]
    m = chunk[0].shape[0]
    if m < batch_size:
      chunk = [np.concatenate([c, np.repeat(c[-1:], batch_size - m, axis=0)]) for c in chunk]
    out = fn(*chunk)
    outs.append(jax.tree.map(lambda x: np.asarray(x)[:m], out))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


@functools.lru_cache(maxsize=None)
def make_logprob_fn(graphdef):
  """``(state, tokens, response_mask) -> logp_B``: summed response log-probs, jitted."""
  @jax.jit
  def fn(state, tokens_BxL, mask_BxL):
    return model_lib.response_logprobs(nnx.merge(graphdef, state), tokens_BxL, mask_BxL)
  return fn


@functools.lru_cache(maxsize=None)
def make_sample_fn(graphdef, max_new_tokens: int):
  """``(state, context, key, temperature) -> (tokens, mask)`` from π, jitted."""
  @jax.jit
  def fn(state, ctx_BxC, key, temperature):
    return sampling.sample(nnx.merge(graphdef, state), ctx_BxC, key,
                           max_new_tokens=max_new_tokens, temperature=temperature)
  return fn


def sample_responses(graphdef, state, contexts_NxC, key, *, response_len: int,
                     temperature: float, batch_size: int):
  """Samples one response per context from the policy; returns NumPy ``(tokens, bool mask)``."""
  fn = make_sample_fn(graphdef, response_len)
  n = contexts_NxC.shape[0]
  keys = jax.random.split(key, math.ceil(n / batch_size))
  outs = []
  for i, start in enumerate(range(0, n, batch_size)):
    ctx = contexts_NxC[start:start + batch_size]
    m = ctx.shape[0]
    if m < batch_size:
      ctx = np.concatenate([ctx, np.repeat(ctx[-1:], batch_size - m, axis=0)])
    tok, mask = fn(state, jnp.asarray(ctx), keys[i], jnp.float32(temperature))
    outs.append((np.asarray(tok)[:m], np.asarray(mask)[:m] > 0))
  return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def init_model(cls, cfg: model_lib.TransformerConfig, seed: int):
  """``(graphdef, state)`` of a freshly initialised ``cls(cfg)``.

  Initialising inside one ``jax.jit`` compiles a single program instead of one small
  program per eager initialiser call, which dominates a tiny lab's build time on CPU.
  """
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(params=seed))))
  # The "rbg" generator compiles several times faster than threefry on CPU; the values
  # are deterministic for a given seed and backend, which is all a lab needs.
  key = jax.random.key(seed, impl="rbg")
  state = jax.jit(lambda k: nnx.split(cls(cfg, rngs=nnx.Rngs(params=k)))[1])(key)
  return graphdef, state


# ---------------------------------------------------------------------- SFT of π_ref
@dataclasses.dataclass(frozen=True)
class SFTConfig:
  steps: int
  batch: int
  lr: float
  warmup: int
  weight_decay: float
  eval_every: int
  eval_episodes: int


def episode_loss_mask(tokens_BxL: np.ndarray) -> np.ndarray:
  """Which next-token targets the SFT loss counts: every non-PAD token after BOS.

  π_ref models whole episodes (prompts, demonstrations, separators and responses), not
  only the final response: predicting demonstrations is what teaches it to infer the style.
  """
  return tokens_BxL[:, 1:] != corpus_lib.PAD


@functools.lru_cache(maxsize=None)
def _make_sft_fns(graphdef, weight_decay: float):
  """The jitted SFT step and held-out loss (cached, so repeated builds compile once).

  AdamW runs with unit learning rate and the step scales the update by a traced ``lr``,
  so the schedule (and the step count) never triggers a recompilation.
  """
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(1.0, weight_decay=weight_decay))

  def loss_fn(p, tokens_BxL, mask_BxT):
    logits = nnx.merge(graphdef, p)(tokens_BxL[:, :-1])
    logp_BxT = logprobs.token_logprobs(logits, tokens_BxL[:, 1:])
    m = mask_BxT.astype(jnp.float32)
    return -jnp.sum(logp_BxT * m) / jnp.maximum(jnp.sum(m), 1.0)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, o, tokens_BxL, mask_BxT, lr):
    loss, grads = jax.value_and_grad(loss_fn)(p, tokens_BxL, mask_BxT)
    updates, o = tx.update(grads, o, p)
    updates = jax.tree.map(lambda u: lr * u, updates)
    return optax.apply_updates(p, updates), o, loss

  return step, jax.jit(loss_fn), tx


def train_sft(model_cfg: model_lib.TransformerConfig, corpus: corpus_lib.Corpus,
              sft: SFTConfig, seed: int, log=print):
  """Trains π_ref with AdamW on fresh episodes each step.

  Returns:
    ``(graphdef, params_state, curve)`` where ``curve`` lists ``(step, train_loss,
    heldout_loss, heldout_response_loss)`` in nats per token.
  """
  graphdef, params = init_model(model_lib.Transformer, model_cfg, seed)
  step, eval_loss, tx = _make_sft_fns(graphdef, sft.weight_decay)
  opt_state = tx.init(params)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, sft.lr, sft.warmup, max(sft.steps, sft.warmup + 1), end_value=sft.lr * 0.05)
  rng = np.random.default_rng([seed, 0x5F7])
  held = corpus.sample_episodes(np.random.default_rng([seed, 0xE7A1]), sft.eval_episodes)
  held_all = episode_loss_mask(held["tokens"])
  held_resp = held["response_mask"][:, 1:]

  curve = []
  t0 = time.time()
  chunk = 100
  train_losses = []
  for c0 in range(0, sft.steps, chunk):
    n_steps = min(chunk, sft.steps - c0)
    eps = corpus.sample_episodes(rng, n_steps * sft.batch)["tokens"]
    eps = eps.reshape(n_steps, sft.batch, -1)
    for i in range(n_steps):
      s = c0 + i
      params, opt_state, loss = step(params, opt_state, eps[i], episode_loss_mask(eps[i]),
                                     np.float32(schedule(s)))
      train_losses.append(loss)
      if (s + 1) % sft.eval_every == 0 or s + 1 == sft.steps:
        tl = float(np.mean(jax.device_get(train_losses[-sft.eval_every:])))
        hl = float(eval_loss(params, held["tokens"], held_all))
        hr = float(eval_loss(params, held["tokens"], held_resp))
        curve.append((s + 1, tl, hl, hr))
        log(f"  sft step {s + 1:5d}/{sft.steps}  train {tl:.4f}  held-out {hl:.4f}  "
            f"held-out response {hr:.4f} nats/token  ({time.time() - t0:.0f}s)")
  return graphdef, params, curve


# ---------------------------------------------------------------------- gold reward model
def init_gold(gold_cfg: model_lib.TransformerConfig, seed: int, init_scale: float,
              pos_scale: float):
  """A randomly initialised ``RewardModel``: the lab's fixed notion of quality.

  Weights (not the RMSNorm scales) are multiplied by ``init_scale``, which sharpens the
  attention patterns so the score is a nonlinear function of the content; the position
  table is multiplied by ``pos_scale`` (0 removes a direct length signal at the read-out).
  """
  graphdef, state = init_model(model_lib.RewardModel, gold_cfg, seed)

  def rescale(path, x):
    names = {str(p) for p in path}
    if "scale" in names:
      return x
    if "pos_embed" in names:
      return x * pos_scale
    return x * init_scale

  return graphdef, jax.tree.map_with_path(rescale, state)


@functools.lru_cache(maxsize=None)
def make_gold_fn(graphdef):
  """``(state, tokens, valid) -> raw score_B`` of ``[BOS] prompt [SEP] response``, jitted.

  ``valid`` marks the context and the response mask: the score is read at the last valid
  token (the EOS), even if π sampled a PAD id inside its response.
  """
  @jax.jit
  def fn(state, tokens_BxL, valid_BxL):
    return nnx.merge(graphdef, state)(tokens_BxL, valid_BxL)
  return fn


# ---------------------------------------------------------------------- labels
def sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def bt_labels(rng: np.random.Generator, gold_a_N: np.ndarray, gold_b_N: np.ndarray,
              label_temp: float, hard: bool = False, flip: float = 0.0) -> np.ndarray:
  """Whether response ``a`` is labelled the winner, under a noisy gold Bradley–Terry rater.

  ``P(a ≻ b) = σ((g_a − g_b) / label_temp)``; ``hard`` takes the gold argmax instead
  (``a`` on ties); then each label is flipped with probability ``flip``.

  References:
    Bradley & Terry (1952); Gao, Schulman & Hilton, arXiv 2210.10760 (gold-labelled data).
  """
  if not label_temp > 0:
    raise ValueError(f"label_temp must be > 0, got {label_temp}")
  if not 0.0 <= flip <= 1.0:
    raise ValueError(f"label_flip must be in [0, 1], got {flip}")
  gold_a_N, gold_b_N = np.asarray(gold_a_N, np.float64), np.asarray(gold_b_N, np.float64)
  if hard:
    a_wins = gold_a_N >= gold_b_N
  else:
    a_wins = rng.random(gold_a_N.shape) < sigmoid((gold_a_N - gold_b_N) / label_temp)
  if flip > 0:
    a_wins ^= rng.random(gold_a_N.shape) < flip
  return a_wins


def predicted_agreement(gold_a_N, gold_b_N, label_temp: float, hard: bool, flip: float) -> float:
  """Expected fraction of labels agreeing with the gold ordering under :func:`bt_labels`.

  Pairs with equal gold scores (identical responses) have no ordering and are excluded,
  here and in :func:`observed_agreement`.
  """
  dg = np.abs(np.asarray(gold_a_N, np.float64) - np.asarray(gold_b_N, np.float64))
  dg = dg[dg > 0]
  agree = np.ones_like(dg) if hard else sigmoid(dg / label_temp)
  return float(np.mean((1.0 - flip) * agree + flip * (1.0 - agree)))


def observed_agreement(gold_chosen_N, gold_rejected_N) -> tuple[float, int]:
  """Fraction of (untied) pairs whose label agrees with the gold ordering, and their count."""
  gc, gr = np.asarray(gold_chosen_N, np.float64), np.asarray(gold_rejected_N, np.float64)
  untied = gc != gr
  return float(np.mean(gc[untied] > gr[untied])), int(untied.sum())


# ---------------------------------------------------------------------- preference pairs
@dataclasses.dataclass(frozen=True)
class Models:
  """π_ref and the gold model as (graphdef, state) pairs plus the gold normalisation."""
  policy_graphdef: object
  policy_state: object
  gold_graphdef: object
  gold_state: object
  gold_mean: float = 0.0
  gold_std: float = 1.0
  gold_terms: gold_lib.GoldTerms = gold_lib.GoldTerms()
  tables: Any = None       # gold_lib.tables(corpus); needed by a "coherent" gold


@functools.lru_cache(maxsize=None)
def _coherence_fn():
  @jax.jit
  def fn(tbl, ctx, resp, mask):
    return (gold_lib.response_loglik(tbl, ctx, resp, mask),
            sequences.ends_with_eos(resp, mask, corpus_lib.EOS))
  return fn


def coherence_inputs(tbl, ctx_NxC, resp_NxT, mask_NxT, batch_size: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Per response: mean per-token log-likelihood under the style mixture, and ends-with-EOS."""
  fn = _coherence_fn()
  out = batched(lambda c, r, m: jnp.stack(fn(tbl, c, r, m), axis=-1),
                [np.asarray(ctx_NxC), np.asarray(resp_NxT), np.asarray(mask_NxT)], batch_size)
  return out[:, 0].astype(np.float64), out[:, 1].astype(np.float64)


def score_gold(models: Models, ctx_NxC, resp_NxT, mask_NxT, batch_size: int,
               normalise: bool = True) -> np.ndarray:
  """Gold scores of responses in context.

  ``normalise=False`` gives the raw network score; otherwise the lab's gold: the network
  normalised with ``models.gold_mean/std``, combined with the coherence terms of a
  ``"coherent"`` gold (:mod:`gpo_jax.lab.gold`).
  """
  fn = make_gold_fn(models.gold_graphdef)
  tokens = np.concatenate([ctx_NxC, resp_NxT], axis=1)
  valid = np.concatenate([ctx_NxC != corpus_lib.PAD, np.asarray(mask_NxT) > 0], axis=1)
  raw = batched(lambda t, v: fn(models.gold_state, t, v), [tokens, valid],
                batch_size).astype(np.float64)
  if not normalise:
    return raw
  net = (raw - models.gold_mean) / models.gold_std
  if models.gold_terms.kind == "network":
    return net
  ll, eos = coherence_inputs(models.tables, ctx_NxC, resp_NxT, mask_NxT, batch_size)
  return np.asarray(gold_lib.combine(models.gold_terms, net, ll, eos), np.float64)


def ref_logprobs(models: Models, ctx_NxC, resp_NxT, mask_NxT, batch_size: int) -> np.ndarray:
  """``log π_ref(response | context)`` summed over the response mask (float32)."""
  fn = make_logprob_fn(models.policy_graphdef)
  tokens = np.concatenate([ctx_NxC, resp_NxT], axis=1)
  mask = np.concatenate([np.zeros(ctx_NxC.shape, bool), mask_NxT.astype(bool)], axis=1)
  return batched(lambda t, m: fn(models.policy_state, t, m), [tokens, mask], batch_size)


def make_pairs(models: Models, corpus: corpus_lib.Corpus, n: int, seed: int, stream: int, *,
               label_temp: float, hard: bool, flip: float, temperature: float,
               batch_size: int) -> dict[str, np.ndarray]:
  """``n`` preference pairs: two π_ref samples per fresh prompt, labelled by gold BT.

  Returns the fields of ``Lab.pairs`` (ARCHITECTURE.md); ``prompt`` is the context
  ``[BOS] prompt [SEP]``, chosen/rejected are ordered by the sampled label, ``label_p`` is
  ``P(chosen ≻ rejected)`` under the noiseless gold BT model.
  """
  rng = np.random.default_rng([seed, stream])
  ctx = corpus.context(corpus.sample_prompts(rng, n))
  t = corpus.cfg.response_len
  key = jax.random.fold_in(jax.random.key(seed), stream)
  resp, mask = sample_responses(models.policy_graphdef, models.policy_state,
                                np.concatenate([ctx, ctx]), key, response_len=t,
                                temperature=temperature, batch_size=batch_size)
  gold = score_gold(models, np.concatenate([ctx, ctx]), resp, mask, batch_size)
  a_wins = bt_labels(rng, gold[:n], gold[n:], label_temp, hard, flip)
  pick = lambda a, b: np.where(a_wins.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)  # noqa: E731
  chosen, rejected = pick(resp[:n], resp[n:]), pick(resp[n:], resp[:n])
  chosen_mask, rejected_mask = pick(mask[:n], mask[n:]), pick(mask[n:], mask[:n])
  g_c, g_r = pick(gold[:n], gold[n:]), pick(gold[n:], gold[:n])
  logps = ref_logprobs(models, np.concatenate([ctx, ctx]), np.concatenate([chosen, rejected]),
                       np.concatenate([chosen_mask, rejected_mask]), batch_size)
  return dict(prompt=ctx.astype(np.int32), chosen=chosen.astype(np.int32),
              rejected=rejected.astype(np.int32), chosen_mask=chosen_mask.astype(np.int32),
              rejected_mask=rejected_mask.astype(np.int32),
              ref_chosen_logps=logps[:n].astype(np.float32),
              ref_rejected_logps=logps[n:].astype(np.float32),
              gold_chosen=g_c.astype(np.float32), gold_rejected=g_r.astype(np.float32),
              label_p=sigmoid((g_c - g_r) / label_temp).astype(np.float32))


# ---------------------------------------------------------------------- statistics
def _mean_se(x) -> tuple[float, float]:
  x = np.asarray(x, np.float64)
  return float(x.mean()), float(x.std(ddof=1) / math.sqrt(max(len(x), 1)))


def icl_gain(models: Models, corpus: corpus_lib.Corpus, n: int, seed: int,
             batch_size: int) -> dict[str, float]:
  """Log-prob gain of a held-out response from two same-style demonstrations in context.

  Compares ``log π_ref(y | demos, x)`` with ``log π_ref(y | x)`` on the same ``(x, y)``;
  the Bayes-optimal gain (exact style posterior from the corpus) is the reference.
  """
  c = corpus.cfg
  rng = np.random.default_rng([seed, 0x1C1])
  styles = corpus.sample_styles(rng, n)
  k = min(2, c.max_demos)
  dp = np.stack([corpus.sample_prompts(rng, n) for _ in range(k)], axis=1)
  dr = np.stack([corpus.sample_responses(rng, dp[:, j], styles)[0] for j in range(k)], axis=1)
  prompts = corpus.sample_prompts(rng, n)
  resp, mask = corpus.sample_responses(rng, prompts, styles)
  with_demos = ref_logprobs(models, corpus.context(prompts, dp, dr), resp, mask, batch_size)
  without = ref_logprobs(models, corpus.context(prompts), resp, mask, batch_size)
  demo_lp = sum(corpus.style_logprobs(dp[:, j], dr[:, j]) for j in range(k))
  bayes = (corpus.mixture_logprob(prompts, resp, demo_lp)
           - corpus.mixture_logprob(prompts, resp))
  gain, gain_se = _mean_se(with_demos - without)
  n_tok = mask.sum()
  return {"icl/gain": gain, "icl/gain_se": gain_se,
          "icl/gain_per_token": float((with_demos - without).sum() / n_tok),
          "icl/bayes_gain": float(bayes.mean()),
          "icl/n_demos": k, "icl/n_episodes": n,
          "ref/response_nll_per_token": float(-without.sum() / n_tok),
          "ref/response_nll_per_token_with_demos": float(-with_demos.sum() / n_tok),
          "corpus/bayes_nll_per_token": float(-corpus.mixture_logprob(prompts, resp).sum() / n_tok),
          "corpus/true_style_nll_per_token": float(
              -corpus.style_logprobs(prompts, resp)[np.arange(n), styles].sum() / n_tok)}


@functools.lru_cache(maxsize=None)
def _make_entropy_fn(graphdef):
  @jax.jit
  def fn(state, tokens, mask):
    logits = nnx.merge(graphdef, state)(tokens[:, :-1])
    h = logprobs.token_entropy(logits)
    m = mask[:, 1:].astype(jnp.float32)
    return jnp.sum(h * m, -1), jnp.sum(m, -1)
  return fn


def ref_entropy(models: Models, ctx_NxC, resp_NxT, mask_NxT, batch_size: int) -> float:
  """Mean per-token entropy (nats) of π_ref's next-token distribution over response positions."""
  fn = _make_entropy_fn(models.policy_graphdef)

  tokens = np.concatenate([ctx_NxC, resp_NxT], axis=1)
  mask = np.concatenate([np.zeros(ctx_NxC.shape, bool), mask_NxT.astype(bool)], axis=1)
  h, m = batched(lambda t, mm: fn(models.policy_state, t, mm), [tokens, mask], batch_size)
  return float(h.sum() / m.sum())


def quantiles(x) -> dict[str, float]:
  qs = (0.05, 0.25, 0.5, 0.75, 0.95)
  return {f"q{int(q * 100):02d}": float(v) for q, v in zip(qs, np.quantile(x, qs))}


def ref_and_gold_stats(cfg, corpus, models, norm_ctx, norm_resp, norm_mask) -> dict:
  """π_ref entropy/length and gold distribution (overall, by style, vs length); ``cfg``: LabConfig."""
  c = cfg.corpus
  bs = cfg.batch_size
  out = {}
  lengths = norm_mask.sum(-1)
  out["ref/entropy_per_token"] = ref_entropy(models, norm_ctx, norm_resp, norm_mask, bs)
  out["ref/log_vocab"] = float(np.log(c.vocab_size))
  out["ref/mean_length"] = float(lengths.mean())
  out["ref/frac_no_eos"] = float(np.mean(~np.any(norm_resp == corpus_lib.EOS, axis=-1)))
  # π_ref may (rarely) emit a special id inside a response; masks, not ids, delimit responses.
  inside = norm_mask & (norm_resp != corpus_lib.EOS)
  out["ref/frac_special_tokens"] = float(np.mean(norm_resp[inside] < corpus_lib.FIRST_CONTENT))
  gold = score_gold(models, norm_ctx, norm_resp, norm_mask, bs)
  out["gold/kind"] = models.gold_terms.kind
  out["ref/frac_eos"] = float(np.mean(sequences.ends_with_eos(norm_resp, norm_mask,
                                                               corpus_lib.EOS)))
  out["gold/ref_mean"] = float(gold.mean())
  out["gold/ref_std"] = float(gold.std())
  out["gold/ref_quantiles"] = quantiles(gold)
  out["gold/length_corr"] = float(np.corrcoef(gold, lengths)[0, 1])
  # Gold by latent style, on responses drawn from the corpus itself (π_ref's samples carry
  # no style label).
  rng = np.random.default_rng([cfg.seed, 0x571E])
  n = cfg.n_stat_episodes
  by_style, len_by_style = {}, {}
  for s in range(c.n_styles):
    prompts = corpus.sample_prompts(rng, n)
    resp, mask = corpus.sample_responses(rng, prompts, np.full(n, s))
    g = score_gold(models, corpus.context(prompts), resp, mask, bs)
    by_style[str(s)] = {"mean": float(g.mean()), "se": float(g.std() / np.sqrt(n))}
    len_by_style[str(s)] = float(mask.sum(-1).mean())
  out["gold/by_style"] = by_style
  out["corpus/length_by_style"] = len_by_style
  return out


def pair_stats(cfg, train) -> dict:
  """Label agreement with gold vs the Bradley–Terry prediction on the train pairs."""
  g_c, g_r = train["gold_chosen"], train["gold_rejected"]
  obs, n_untied = observed_agreement(g_c, g_r)
  pred = predicted_agreement(g_c, g_r, cfg.label_temp, cfg.hard_labels, cfg.label_flip)
  return {"data/label_agreement": obs, "data/label_agreement_predicted": pred,
          "data/n_untied": n_untied, "data/frac_tied": float(np.mean(g_c == g_r)),
          "data/mean_abs_gold_margin": float(np.mean(np.abs(g_c - g_r))),
          "data/n_train": int(len(g_c)), "data/n_test": cfg.n_test_pairs,
          "data/n_eval_prompts": cfg.n_eval_prompts}
