"""Evaluation of reward-model members against gold on the lab's held-out pairs: accuracy, correlation, calibration.

For every member the scores ``r(x, y_w)``, ``r(x, y_l)`` of the held-out pairs are computed
on device (members a chunk at a time); the metrics are then NumPy on the host:

* ``rm/gold_accuracy`` (± ``_se``): agreement of ``sign(r_w − r_l)`` with the gold ordering
  ``sign(g_w − g_l)`` over pairs whose gold scores differ (a score tie counts one half).
  A perfect proxy reaches 1; the labels themselves only reach ``label_gold_agreement``.
* ``rm/label_accuracy``: agreement with the dataset's (noisy) labels over *all* held-out
  pairs (gold ties included: they carry a label too), the quantity a trainer sees;
  ``rm/loss`` the held-out BT loss against those labels. ``rm/n_pairs`` counts the
  untied pairs that ``rm/gold_accuracy`` uses.
* ``rm/gold_corr``: Pearson correlation of ``r`` with gold over all held-out responses;
  ``rm/margin_corr``: of ``r_w − r_l`` with ``g_w − g_l``.
* ``rm/ece``: expected calibration error of ``σ(r_w − r_l)`` against the gold
  Bradley–Terry probability ``label_p`` (equal-width bins; MMPO's calibration claim).

``artifacts()`` returns ``rm_reference.json``: the label noise ceiling of the same pairs.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpo_jax.core import sequences
from gpo_jax.objectives import calibration
from gpo_jax.runtime import cpu as cpu_lib
from gpo_jax.runtime import distributed

Array = jax.Array
REFERENCE_FILE = "rm_reference.json"


def _corr(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a - a.mean(), b - b.mean()
  den = np.sqrt((a * a).sum() * (b * b).sum())
  return float((a * b).sum() / den) if den > 0 else float("nan")


def rm_metrics(r_w: np.ndarray, r_l: np.ndarray, g_w: np.ndarray, g_l: np.ndarray,
               label_p: np.ndarray, ece_bins: int = 10) -> dict[str, float]:
  """The metrics of one reward model from its scores of held-out pairs (all ``[N]``)."""
  r_w, r_l, g_w, g_l = (np.asarray(x, np.float64) for x in (r_w, r_l, g_w, g_l))
  dr, dg = r_w - r_l, g_w - g_l
  untied = dg != 0
  agree = np.where(dr == 0, 0.5, (np.sign(dr) == np.sign(dg)).astype(np.float64))[untied]
  n = int(agree.size)
  acc = float(agree.mean()) if n else float("nan")
  pred = 1.0 / (1.0 + np.exp(-np.clip(dr, -60, 60)))
  return {
      "rm/gold_accuracy": acc,
      "rm/gold_accuracy_se": float(np.sqrt(acc * (1 - acc) / n)) if n > 1 else float("nan"),
      "rm/label_accuracy": float(np.mean(np.where(dr == 0, 0.5, dr > 0))),
      "rm/loss": float(np.mean(np.logaddexp(0.0, -dr))),
      "rm/gold_corr": _corr(np.concatenate([r_w, r_l]), np.concatenate([g_w, g_l])),
      "rm/margin_corr": _corr(dr, dg),
      "rm/ece": float(calibration.expected_calibration_error(
          pred, np.asarray(label_p, np.float64), n_bins=ece_bins)),
      "rm/n_pairs": n,
  }


class RewardEvaluator:
  """Scores held-out pairs with every reward-model member and compares them with gold."""

  def __init__(self, *, graphdef, rest, test_pairs: Mapping[str, np.ndarray],
               n_test_pairs: int = 0, member_chunk: int = 8, ece_bins: int = 10,
               sharding: jax.sharding.Sharding | None = None):
    n = len(test_pairs["chosen"])
    k = n if n_test_pairs <= 0 else min(n_test_pairs, n)
    if k < 2:
      raise ValueError(f"reward-model evaluation needs >= 2 held-out pairs, got {k}.")
    if member_chunk < 1:
      raise ValueError(f"eval.member_chunk={member_chunk} must be >= 1.")
    self.graphdef, self.rest = graphdef, rest
    self.member_chunk, self.ece_bins, self.sharding = member_chunk, ece_bins, sharding
    host = {key: np.asarray(test_pairs[key][:k]) for key in sequences.RM_PAIR_FIELDS + ("label_p",)}
    self.host = host
    self.test = distributed.put({key: jnp.asarray(host[key]) for key in sequences.RM_PAIR_FIELDS},
                                 sharding)
    self._scores = jax.jit(self._scores_fn, compiler_options=cpu_lib.compiler_options(
        None if sharding is None else next(iter(sharding.device_set)).platform, "forward"))

  @classmethod
  def from_lab(cls, lab, graphdef, rest, **kwargs) -> "RewardEvaluator":
    return cls(graphdef=graphdef, rest=rest, test_pairs=lab.pairs("test"), **kwargs)

  def _scores_fn(self, params_M, test):
    def one(params):
      return jnp.stack(sequences.pair_scores(nnx.merge(self.graphdef, params, self.rest), test))
    m = jax.tree.leaves(params_M)[0].shape[0]
    return jax.lax.map(one, params_M, batch_size=min(self.member_chunk, m))   # [M, 2, N]

  def artifacts(self) -> dict[str, Any]:
    """The label-noise ceiling of the held-out pairs, written as ``rm_reference.json``."""
    h = self.host
    dg = h["gold_chosen"].astype(np.float64) - h["gold_rejected"]
    untied = dg != 0
    return {REFERENCE_FILE: {
        "n_pairs": int(untied.sum()),
        # the dataset's labels put `chosen` first: how often that agrees with gold
        "label_gold_agreement": float(np.mean(dg[untied] > 0)),
        # the Bradley-Terry prediction of that agreement: E max(p, 1 - p)
        "label_gold_agreement_predicted": float(np.mean(np.maximum(h["label_p"],
                                                                   1 - h["label_p"]))),
    }}

  def __call__(self, params_M, hparams: Mapping[str, Array], step: int) -> dict[str, np.ndarray]:
    """``{metric: [M]}`` for every member (names as in the module docstring)."""
    del step
    s = distributed.to_host(self._scores(params_M, self.test)).astype(np.float64)
    h = self.host
    rows = [rm_metrics(s[m, 0], s[m, 1], h["gold_chosen"], h["gold_rejected"], h["label_p"],
                       self.ece_bins) for m in range(s.shape[0])]
    return {k: np.asarray([r[k] for r in rows]) for k in rows[0]}
