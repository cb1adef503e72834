"""Inverse-Q*-style token-level RL from an in-context policy — **our reconstruction** (SPEC §6), members guidance × β × KL coefficient × seed × lr.

Xia et al. 2024 (arXiv 2408.14874) publish neither equations nor code for Inverse-Q*; this
module is the one place our definition lives, and every report that shows it calls it a
reconstruction. The definition:

* **The conditionally optimal policy** ``π̂*(·|s_t) = π_ref(·| c, s_t)``: the frozen
  reference, conditioned on guidance ``c`` — ``k`` good (top gold quantile) demonstrations
  retrieved for the prompt from the lab's gold-labelled pairs
  (:mod:`gpo_jax.incontext.retrieval`; the retriever, ``random`` / ``bm25`` /
  ``embedding``, is the swept guidance choice). π_ref gains ~1.2 nats per response from two
  same-style demonstrations in this lab, so ``c`` carries real information about what gold
  likes.
* **Dense token rewards** on the policy's own samples ``y ~ π(·|x)`` (no preference labels,
  no reward model):
  ``r_t = β·[log π̂*(y_t|c, x, y_<t) − log π_ref(y_t|x, y_<t)] − kl_coef·[log π(y_t|x, y_<t) − log π_ref(y_t|x, y_<t)]``,
  all under stop-gradient. Their first part sums to ``β·log(π̂*(y|c,x)/π_ref(y|x))``, the
  sequence log-ratio of the in-context policy to π_ref (tested).
* **Token-level policy gradient** with returns-to-go and a leave-one-out baseline over the
  ``k_s = inverse_q.samples_per_prompt`` samples of each prompt
  (:func:`gpo_jax.objectives.policy_gradient.token_rloo_loss`; unbiased for
  ``∇{β·E_π[log π̂*/π_ref] − kl_coef·KL(π‖π_ref)}``, tested against the exact gradient of a
  tabular two-token MDP). The optimum of that objective is
  ``π ∝ π_ref·(π̂*/π_ref)^(β/kl_coef)`` at the sequence level: ``β = kl_coef`` imitates the
  in-context policy, ``β > kl_coef`` sharpens it beyond what the demonstrations say — where
  overoptimisation of the in-context "reward" can show.

The guidance index, ``β`` and ``kl_coef`` are traced. Metrics rows use the offline names:
``family`` is the guidance (``iq_<retriever>``), ``beta`` is β (``beta_eff = β/kl_coef``
is what sets the optimum), and evaluation is offline GPO's
(:mod:`gpo_jax.evaluation.policy`), so the standard report and frontiers apply.

References:
  Xia et al. 2024, "Inverse-Q*: Token Level Reinforcement Learning for Aligning Large
  Language Models Without Preference Data", arXiv 2408.14874 (the idea; not its equations).
  Williams 1992 (REINFORCE); Kool et al. 2019 (leave-one-out baseline).
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpo_jax.algorithms.base import SHARED, Algorithm
from gpo_jax.core import model as model_lib
from gpo_jax.core import sampling
from gpo_jax.engine import members as members_lib
from gpo_jax.engine.members import Members
from gpo_jax.objectives import policy_gradient as pg

#: the guidance choices: how the good demonstrations of a training prompt are retrieved
GUIDANCES = ("random", "bm25", "embedding")
TRAIN_METRICS = ("iq/reward", "iq/kl", "iq/seq_logratio", "iq/response_len")
#: marks every Inverse-Q* report and metrics row family
RECONSTRUCTION = "reconstruction (Xia et al. 2024 give no equations or code; SPEC §6)"


def family_name(guidance: str) -> str:
  return f"iq_{guidance}"


def make_members(guidances, betas, kl_coefs=(1.0,), seeds=(0,), lrs=(1e-4,), *,
                 n_train: int, batch_size: int) -> Members:
  """The product guidance × β × kl_coef × seed × lr (row-major, lr fastest)."""
  guidances = tuple(guidances)
  bad = [g for g in guidances if g not in GUIDANCES]
  if bad or not guidances:
    raise ValueError(f"sweep.guidances has {bad or 'nothing'}; valid choices: {list(GUIDANCES)}.")
  if len(set(guidances)) != len(guidances):
    raise ValueError(f"sweep.guidances must be distinct, got {list(guidances)}.")
  members_lib.check_numbers("betas", betas)
  members_lib.check_numbers("kl_coefs", kl_coefs)
  members_lib.check_numbers("seeds", seeds, integer=True, inclusive=True)
  members_lib.check_numbers("lrs", lrs)
  size, = members_lib.data_sizes((0,), n_train=n_train, batch_size=batch_size)
  cols = members_lib.product([("guidance", guidances), ("beta", tuple(betas)),
                              ("kl_coef", tuple(kl_coefs)), ("seed", tuple(seeds)),
                              ("lr", tuple(lrs))])
  m = len(cols["guidance"])
  beta = np.asarray(cols["beta"], np.float64)
  kl = np.asarray(cols["kl_coef"], np.float64)
  return Members(
      columns={
          "family": np.asarray([family_name(g) for g in cols["guidance"]], dtype=object),
          "guidance_idx": np.asarray([guidances.index(g) for g in cols["guidance"]], np.int32),
          "beta": beta, "kl_coef": kl,
          "seed": np.asarray(cols["seed"], np.int32),
          "lr": np.asarray(cols["lr"], np.float64),
          "data_size": np.full(m, size, np.int32),
          # beta_eff = β/kl_coef: the exponent of the optimum's tilt (module docstring)
          "beta_eff_scale": (1.0 / kl).astype(np.float32),
      },
      traced=("guidance_idx", "beta", "kl_coef", "seed", "lr", "data_size", "beta_eff_scale"),
      hidden=("guidance_idx", "beta_eff_scale"),
      tables={"guidances": guidances})


def token_rewards(lp_star_BxT, lp_ref_BxT, lp_BxT, mask_BxT, beta, kl_coef):
  """``r_t`` of the module docstring (stop-gradient), ``[B, T]``, 0 past the response."""
  sg = jax.lax.stop_gradient
  r = beta * (sg(lp_star_BxT) - sg(lp_ref_BxT)) - kl_coef * (sg(lp_BxT) - sg(lp_ref_BxT))
  return r * mask_BxT


def response_token_logprobs(model, context_BxC, resp_BrxT, mask_BrxT, repeats: int = 1):
  """Per-token ``log model(y_t | context, y_<t)`` of the responses, ``[B·repeats, T]`` (0 off
  the mask). Rows ``b·repeats … b·repeats + repeats − 1`` answer context ``b`` (context-major,
  as ``sampling.sample(..., repeats=repeats)`` returns them); each context runs once
  (``model.grouped_token_logprobs``)."""
  b = context_BxC.shape[0]
  if resp_BrxT.shape[0] != b * repeats:
    raise ValueError(f"{resp_BrxT.shape[0]} response rows for {b} contexts × repeats="
                     f"{repeats}; need {b * repeats}.")
  lp = model_lib.grouped_token_logprobs(model, context_BxC,
                                        resp_BrxT.reshape(b, repeats, -1))
  return lp.reshape(resp_BrxT.shape) * mask_BrxT


def member_loss_fn(graphdef, rest, *, k: int, response_len: int):
  """The per-member loss ``(params, batch, hp, key) -> (loss, metrics)``.

  ``batch``: ``prompt [B, C]`` (``[BOS] x [SEP]``), ``guide [B, G, C_g]`` (``[BOS] demos x
  [SEP]`` per guidance), ``batch[SHARED]["ref"]`` (π_ref's parameters).
  """

  def loss_fn(params, batch, hp, key):
    ref = nnx.merge(graphdef, batch[SHARED]["ref"], rest)
    b = batch["prompt"].shape[0]
    ctx = batch["prompt"]                                                         # [B, C]
    guide = batch["guide"][:, hp["guidance_idx"]]                                 # [B, Cg]
    sampler = nnx.merge(graphdef, jax.lax.stop_gradient(params), rest)
    resp, mask = sampling.sample(sampler, ctx, key, max_new_tokens=response_len,
                                 repeats=k)                  # [B*k, T], context-major
    m = mask.astype(jnp.float32)
    # Each context (prompt, guidance) runs once for its k samples.
    lp = response_token_logprobs(nnx.merge(graphdef, params, rest), ctx, resp, m, k)
    lp_ref = jax.lax.stop_gradient(response_token_logprobs(ref, ctx, resp, m, k))
    lp_star = jax.lax.stop_gradient(response_token_logprobs(ref, guide, resp, m, k))
    r = token_rewards(lp_star, lp_ref, lp, m, hp["beta"], hp["kl_coef"])
    t = resp.shape[1]
    loss = pg.token_rloo_loss(lp.reshape(b, k, t), r.reshape(b, k, t), m.reshape(b, k, t))
    return loss, {
        "iq/reward": jnp.mean(jnp.sum(hp["beta"] * (lp_star - lp_ref), -1)),
        "iq/kl": jnp.mean(jnp.sum(jax.lax.stop_gradient(lp) - lp_ref, -1)),
        "iq/seq_logratio": jnp.mean(jnp.sum(lp_star - lp_ref, -1)),
        "iq/response_len": jnp.mean(jnp.sum(m, -1)),
    }

  return loss_fn


def guidance_contexts(lab, config, prompts_NxC: np.ndarray) -> np.ndarray:
  """``[N, G, C_g]``: each training prompt's context with its ``k`` good demonstrations, per
  guidance (retrieved once per lab and stored beside it, ``<lab_root>/retrieval/<lab>``)."""
  from gpo_jax.incontext import retrieval
  g = config.inverse_q
  queries = retrieval.prompts_from_contexts(prompts_NxC)
  directory = os.path.join(os.path.dirname(os.path.abspath(lab.path)), "retrieval",
                           os.path.basename(os.path.abspath(lab.path)))
  out = []
  for name in config.sweep.guidances:
    settings = retrieval.RetrievalSettings(k=int(g.k), polarity="good", retriever=name,
                                           seed=int(g.retrieval_seed),
                                           gold_quantile=float(g.gold_quantile))
    demos = retrieval.load_or_retrieve(directory, lab, queries, settings)
    out.append(demos.context(lab.corpus, queries))
  return np.stack(out, axis=1).astype(np.int32)


class InverseQ(Algorithm):
  """Inverse-Q*-style token-level RL from an in-context policy (a reconstruction)."""

  name = "inverse_q"
  headline_metric = "gold/reward"
  train_metrics = TRAIN_METRICS
  row_metrics = ("iq/reward", "iq/kl")

  def members(self, config, n_train: int) -> Members:
    s = config.sweep
    return make_members(tuple(s.guidances), tuple(s.betas), tuple(s.kl_coefs), tuple(s.seeds),
                        tuple(s.lrs), n_train=n_train, batch_size=config.train.batch_size)

  def member_count(self, config) -> int:
    s = config.sweep
    return len(s.guidances) * len(s.betas) * len(s.kl_coefs) * len(s.seeds) * len(s.lrs)

  def model(self, lab, config):
    return lab.policy()

  def train_data(self, lab, config):
    prompts = np.asarray(lab.pairs("train")["prompt"])
    return {"prompt": jnp.asarray(prompts),
            "guide": jnp.asarray(guidance_contexts(lab, config, prompts)),
            SHARED: {"ref": nnx.state(lab.policy(), nnx.Param)}}

  def loss_fn(self, graphdef, rest, members, config):
    return member_loss_fn(graphdef, rest, k=int(config.inverse_q.samples_per_prompt),
                          response_len=int(config.lab.corpus.response_len))

  def evaluator(self, lab, graphdef, rest, members, config, sharding):
    from gpo_jax.evaluation import policy
    ecfg = policy.EvalConfig.from_config(config.eval)
    return policy.Evaluator.from_lab(lab, graphdef, rest, ecfg,
                                     config.train.length_normalize, sharding=sharding)

  def validate(self, config, n_train: int) -> Members:
    g = config.inverse_q
    k = g.samples_per_prompt
    if not isinstance(k, int) or k < 2:
      raise ValueError(f"inverse_q.samples_per_prompt={k!r} must be an integer >= 2 (the "
                       "leave-one-out baseline uses the other samples of the prompt).")
    max_demos = int(config.lab.corpus.max_demos)
    if not isinstance(g.k, int) or not 1 <= g.k <= max_demos:
      raise ValueError(f"inverse_q.k={g.k!r} demonstrations; valid: 1..{max_demos} (the "
                       "lab's corpus.max_demos, what π_ref was trained to read).")
    return self.members(config, n_train)

  def report(self, workdir: str, log) -> None:
    from gpo_jax import analysis
    analysis.analyze(workdir)

  def describe(self, row) -> str:
    g = row.get("gold/reward")
    gold = f"{g:+.3f}" if g is not None and math.isfinite(g) else "nan"
    return f"{row['family']} β={row['beta']:g} kl={row['kl_coef']:g} gold={gold}"


ALGORITHM = InverseQ()
