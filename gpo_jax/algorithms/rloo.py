"""RL against a proxy (Gao's setting, SPEC §6): KL-regularised policy gradient with the RLOO estimator, members are selector × KL coefficient × seed × lr.

Each step, every member samples ``k = rl.samples_per_prompt`` responses for each of its
``train.batch_size`` prompts with the KV-cache sampler, inside the compiled step and with
the sampling parameters under ``stop_gradient``. The reward of a response is its
*selector's* score — one proxy, or an ensemble of proxies under the mean / WCO / UWO
objective (:mod:`gpo_jax.proxies.selectors`) — in normalised units (each proxy's spread on
π_ref's samples), minus ``kl_coef · (log π(y) − log π_ref(y))`` (the sequence log-ratio).
RLOO uses the other ``k − 1`` rewards of the same prompt as the baseline
(:mod:`gpo_jax.objectives.policy_gradient`; the estimator is tested against the exact
gradient of the KL-regularised objective in a tabular bandit).

The selector index and ``kl_coef`` are traced, so one compiled program trains every proxy
choice and KL coefficient. The proxies and π_ref are frozen constants of the step
(``train_data()[SHARED]``). The prompts are the lab's training-pair prompts (no labels are
read). Evaluation is offline GPO's (:mod:`gpo_jax.evaluation.policy`) plus
``proxy/reward``: the member's own selector on its samples, paired per prompt with π_ref's
pool mean under that selector; the π_ref pool (``eval.ref_samples_per_prompt``, large
enough for best-of-n to reach ~6 nats) is scored by every proxy and saved as
``bon_pool.npz``, so best-of-n against every selector is on the same prompts and axes.
Metrics rows use the offline names: ``family`` is the selector, ``beta`` (= ``beta_eff``)
is ``kl_coef``, so the standard report's frontiers, peak tests and Gao fits apply as is.

References:
  Gao, Schulman, Hilton 2023, arXiv 2210.10760 (RL against a proxy RM).
  Ahmadian et al. 2024, arXiv 2402.14740 (RLOO for RLHF).
  Coste et al. 2023, arXiv 2310.02743 (ensembles, WCO/UWO).
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
from gpo_jax.proxies import bank as bank_lib
from gpo_jax.proxies import selectors as selectors_lib
from gpo_jax.proxies import store

TRAIN_METRICS = ("rl/proxy", "rl/kl", "rl/reward", "rl/response_len")


def proxy_paths(config) -> tuple[str, ...]:
  return tuple(os.path.abspath(os.path.expanduser(p)) for p in config.proxies.paths)


def proxy_names(config) -> tuple[str, ...]:
  """The proxies' names, read from the sets' ``proxies.json`` (no lab, no device)."""
  import json
  names = []
  for p in proxy_paths(config):
    d = p if os.path.basename(p) == store.DIRNAME else os.path.join(p, store.DIRNAME)
    meta = os.path.join(d, store.META)
    if not os.path.exists(meta):
      raise store.ProxyError(f"no proxy set at {d} ({store.META} expected): train the "
                             "reward-model run named in proxies.paths to its last step first.")
    with open(meta) as f:
      names += [r["name"] for r in json.load(f)["members"]]
  return tuple(names)


def build_selectors(config) -> selectors_lib.Selectors:
  p = config.proxies
  return selectors_lib.build(proxy_names(config), singles=tuple(p.singles),
                             ensembles_spec={k: tuple(v) for k, v in dict(p.ensembles).items()},
                             objectives=tuple(p.objectives), uwo_lambda=float(p.uwo_lambda))


def make_members(selectors: selectors_lib.Selectors, chosen: tuple[str, ...],
                 kl_coefs, seeds=(0,), lrs=(1e-5,), *, n_train: int, batch_size: int
                 ) -> Members:
  """The product selector × kl_coef × seed × lr (row-major, lr fastest).

  ``chosen``: fnmatch patterns over the selector names (``"*"`` = all of them).
  """
  import fnmatch
  picked = [n for n in selectors.names if any(fnmatch.fnmatchcase(n, c) for c in chosen)]
  if not picked:
    raise ValueError(f"sweep.selectors {list(chosen)} match no selector; valid choices: "
                     f"{list(selectors.names)}.")
  members_lib.check_numbers("kl_coefs", kl_coefs, inclusive=True)
  members_lib.check_numbers("seeds", seeds, integer=True, inclusive=True)
  members_lib.check_numbers("lrs", lrs)
  size, = members_lib.data_sizes((0,), n_train=n_train, batch_size=batch_size)
  cols = members_lib.product([("family", tuple(picked)), ("beta", tuple(kl_coefs)),
                              ("seed", tuple(seeds)), ("lr", tuple(lrs))])
  m = len(cols["family"])
  columns = {
      "family": np.asarray(cols["family"], dtype=object),
      "selector_idx": np.asarray([selectors.index(n) for n in cols["family"]], np.int32),
      "kind": np.asarray([selectors.kind[selectors.index(n)] for n in cols["family"]],
                         dtype=object),
      "beta": np.asarray(cols["beta"], np.float64),
      "seed": np.asarray(cols["seed"], np.int32),
      "lr": np.asarray(cols["lr"], np.float64),
      "data_size": np.full(m, size, np.int32),
      "beta_eff_scale": np.ones(m, np.float32),
  }
  return Members(columns=columns,
                 traced=("selector_idx", "beta", "seed", "lr", "data_size", "beta_eff_scale"),
                 hidden=("selector_idx", "beta_eff_scale"))


def member_loss_fn(graphdef, rest, score_fn, *, k: int, response_len: int):
  """The per-member RLOO loss ``(params, batch, hp, key) -> (loss, metrics)``.

  ``batch``: ``prompt [B, C]`` and ``batch[SHARED]`` = ``{"ref": π_ref params,
  "proxies": the bank's parameters, "selectors": the selector table}``.
  """

  def loss_fn(params, batch, hp, key):
    sh = batch[SHARED]
    ctx = jnp.repeat(batch["prompt"], k, axis=0)                        # [B*k, C]
    sampler = nnx.merge(graphdef, jax.lax.stop_gradient(params), rest)
    resp, mask = sampling.sample(sampler, batch["prompt"], key, max_new_tokens=response_len,
                                 repeats=k)                             # = ctx's rows
    b = batch["prompt"].shape[0]
    # Each prompt runs once for its k samples (rows context-major, as sampled).
    grouped = lambda p: model_lib.grouped_response_logprobs(  # noqa: E731
        nnx.merge(graphdef, p, rest), batch["prompt"], resp.reshape(b, k, -1),
        mask.astype(jnp.float32).reshape(b, k, -1)).reshape(b * k)
    logp = grouped(params)
    logp_ref = jax.lax.stop_gradient(grouped(sh["ref"]))
    scores = score_fn(sh["proxies"], ctx, resp, mask)                   # [P, B*k]
    proxy = selectors_lib.apply(sh["selectors"], scores, hp["selector_idx"])
    reward = pg.kl_regularised_reward(proxy, logp, logp_ref, hp["beta"])
    loss = pg.rloo_loss(logp.reshape(b, k), reward.reshape(b, k))
    return loss, {"rl/proxy": jnp.mean(proxy),
                  "rl/kl": jnp.mean(jax.lax.stop_gradient(logp) - logp_ref),
                  "rl/reward": jnp.mean(reward),
                  "rl/response_len": jnp.mean(jnp.sum(mask, axis=-1).astype(jnp.float32))}

  return loss_fn


class RLOO(Algorithm):
  """KL-regularised RLOO against a proxy reward model or an ensemble of them."""

  name = "rloo"
  headline_metric = "gold/reward"
  train_metrics = TRAIN_METRICS

  def __init__(self):
    self._banks: dict = {}

  def _bank(self, config, lab=None) -> bank_lib.ProxyBank:
    """The proxies of ``config``, loaded (and checked against ``lab``) once per process.

    ``train_data`` loads them with the lab before ``loss_fn`` asks without one.
    """
    key = proxy_paths(config)
    if lab is not None:
      key_lab = (key, lab.cfg.config_hash())
      if key_lab not in self._banks:
        self._banks[key_lab] = self._banks[key] = bank_lib.load(list(key), lab)
      return self._banks[key_lab]
    if key not in self._banks:
      self._banks[key] = bank_lib.load(list(key))
    return self._banks[key]

  def members(self, config, n_train: int) -> Members:
    s = config.sweep
    return make_members(build_selectors(config), tuple(s.selectors), tuple(s.kl_coefs),
                        tuple(s.seeds), tuple(s.lrs), n_train=n_train,
                        batch_size=config.train.batch_size)

  def member_count(self, config) -> int:
    s = config.sweep
    import fnmatch
    names = build_selectors(config).names
    picked = [n for n in names if any(fnmatch.fnmatchcase(n, c) for c in s.selectors)]
    return len(picked) * len(s.kl_coefs) * len(s.seeds) * len(s.lrs)

  def model(self, lab, config):
    return lab.policy()

  def _train_proxies(self, config, lab=None):
    """The bank and selector table the train step uses: only the proxies that some
    member's selector reads (the pool and the evaluation still see every proxy)."""
    sel = build_selectors(config)
    members = self.members(config, n_train=1 << 30)
    chosen = np.unique(members.columns["selector_idx"])
    used = sel.used(chosen)
    return self._bank(config, lab).subset(used), sel.restrict(used, chosen)

  def train_data(self, lab, config):
    bank, sel = self._train_proxies(config, lab)
    return {"prompt": jnp.asarray(lab.pairs("train")["prompt"]),
            SHARED: {"ref": nnx.state(lab.policy(), nnx.Param), "proxies": bank.params(),
                     "selectors": {k: jnp.asarray(v) for k, v in sel.table().items()}}}

  def loss_fn(self, graphdef, rest, members, config):
    bank, _ = self._train_proxies(config)
    return member_loss_fn(graphdef, rest, bank.score_fn(),
                          k=int(config.rl.samples_per_prompt),
                          response_len=int(config.lab.corpus.response_len))

  def evaluator(self, lab, graphdef, rest, members, config, sharding):
    from gpo_jax.evaluation import policy
    ecfg = policy.EvalConfig.from_config(config.eval)
    bank = self._bank(config, lab)
    sub, sub_sel = self._train_proxies(config, lab)
    proxy = policy.ProxyEval(score_fn=bank.score_fn(), params=bank.params(),
                             proxy_names=bank.names, selectors=build_selectors(config),
                             member_score_fn=sub.score_fn(), member_params=sub.params(),
                             member_selectors=sub_sel)
    return policy.Evaluator.from_lab(lab, graphdef, rest, ecfg,
                                     config.train.length_normalize, sharding=sharding,
                                     proxy=proxy)

  def validate(self, config, n_train: int) -> Members:
    k = config.rl.samples_per_prompt
    if not isinstance(k, int) or k < 2:
      raise ValueError(f"rl.samples_per_prompt={k!r} must be an integer >= 2 (RLOO's "
                       "baseline is the other samples of the same prompt).")
    return self.members(config, n_train)

  def report(self, workdir: str, log) -> None:
    from gpo_jax import analysis
    analysis.analyze(workdir)

  def describe(self, row) -> str:
    g, p = row.get("gold/reward"), row.get("proxy/reward")
    fmt = lambda v: f"{v:+.3f}" if v is not None and math.isfinite(v) else "nan"  # noqa: E731
    return f"{row['family']} kl={row['beta']:g} gold={fmt(g)} proxy={fmt(p)}"


ALGORITHM = RLOO()
