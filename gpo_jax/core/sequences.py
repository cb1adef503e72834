"""Sequence helpers shared by algorithms and evaluation: prompt + response log-probs, pair log-ratios, pair fields.

A policy sequence is ``context + response`` where the context is ``[BOS] x [SEP]`` (the lab's
``prompt`` field) and the response has a fixed length with a mask up to and including EOS.
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gpo_jax.core import model as model_lib

Array = jax.Array

# The fields of ``Lab.pairs(split)`` that training and evaluation read.
PAIR_FIELDS = ("prompt", "chosen", "rejected", "chosen_mask", "rejected_mask",
               "ref_chosen_logps", "ref_rejected_logps", "gold_chosen", "gold_rejected")
# What a reward model trains and is evaluated on (no reference log-probs).
RM_PAIR_FIELDS = ("prompt", "chosen", "rejected", "chosen_mask", "rejected_mask",
                  "gold_chosen", "gold_rejected")


def pair_arrays(pairs: Mapping[str, np.ndarray],
                fields: Sequence[str] = PAIR_FIELDS) -> dict[str, Array]:
  """``fields`` of ``Lab.pairs(split)`` as device arrays; a missing field is named."""
  missing = [k for k in fields if k not in pairs]
  if missing:
    raise ValueError(f"preference pairs lack fields {missing}; have {sorted(pairs)}.")
  return {k: jnp.asarray(pairs[k]) for k in fields}


def pair_logps(model, prompt_BxP, resp_BxT, mask_BxT, length_normalize: bool) -> Array:
  """Policy sequence log-probs of responses given prompts (response tokens only), each
  ``prompt + response`` run as one sequence (the reference the shared-prompt path,
  :func:`chosen_rejected_logps`, is tested against)."""
  tokens = jnp.concatenate([prompt_BxP, resp_BxT], axis=1)
  mask = jnp.concatenate([jnp.zeros_like(prompt_BxP, dtype=mask_BxT.dtype), mask_BxT], axis=1)
  return model_lib.response_logprobs(model, tokens, mask, length_normalize=length_normalize)


def chosen_rejected_logps(model, batch: Mapping[str, Array],
                          length_normalize: bool) -> tuple[Array, Array]:
  """Policy log-probs of a batch's chosen and rejected responses, ``[B]`` each, in one
  forward that runs each prompt once (:func:`gpo_jax.core.model.prompt_response_logprobs`)."""
  return model_lib.prompt_response_logprobs(
      model, batch["prompt"], (batch["chosen"], batch["rejected"]),
      (batch["chosen_mask"], batch["rejected_mask"]), length_normalize)


def whole_sequence_logps(model, batch: Mapping[str, Array],
                         length_normalize: bool) -> tuple[Array, Array]:
  """:func:`chosen_rejected_logps` the former way: ``prompt + chosen`` and ``prompt +
  rejected`` each run whole, in one batch (the reference the shared-prompt path is
  compared with, in tests/test_model.py and experiments/bench_eval.py)."""
  b = batch["chosen"].shape[0]
  logp = pair_logps(
      model, jnp.concatenate([batch["prompt"], batch["prompt"]]),
      jnp.concatenate([batch["chosen"], batch["rejected"]]),
      jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]]), length_normalize)
  return logp[:b], logp[b:]


def pair_logratios(model, batch: Mapping[str, Array],
                   length_normalize: bool) -> tuple[Array, Array]:
  """``log π − log π_ref`` of chosen and rejected, both through one forward of ``model``
  that runs each prompt once (:func:`chosen_rejected_logps`).

  The reference log-probs are the dataset's (``ref_chosen_logps``, ``ref_rejected_logps``),
  so training never runs π_ref.
  """
  logp_w, logp_l = chosen_rejected_logps(model, batch, length_normalize)
  return logp_w - batch["ref_chosen_logps"], logp_l - batch["ref_rejected_logps"]


def pair_scores(reward_model, batch: Mapping[str, Array]) -> tuple[Array, Array]:
  """Reward-model scores of chosen and rejected (one forward over both), ``[B]`` each."""
  b = batch["chosen"].shape[0]
  ctx = jnp.concatenate([batch["prompt"], batch["prompt"]])
  resp = jnp.concatenate([batch["chosen"], batch["rejected"]])
  mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
  tokens = jnp.concatenate([ctx, resp], axis=1)
  valid = jnp.concatenate([ctx != 0, mask > 0], axis=1)
  r = reward_model(tokens, valid)
  return r[:b], r[b:]


def ends_with_eos(resp_BxT, mask_BxT, eos_id: int = 3) -> jax.Array:
  """1.0 where a response's last masked token is EOS (0.0: it ran into the length cap)."""
  last = jnp.maximum(jnp.sum(mask_BxT > 0, axis=-1) - 1, 0)
  tok = jnp.take_along_axis(resp_BxT, last[:, None], axis=-1)[:, 0]
  return (tok == eos_id).astype(jnp.float32)
