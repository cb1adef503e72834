"""On-policy and offline evaluation of every sweep member at once: KL, gold reward, win rate, entropy, TRL diagnostics.

Each member samples ``n`` responses per held-out eval prompt with the KV-cache sampler
(vmapped over the stacked parameters; sampling keys depend on the member's seed and the
step only, so members with the same seed share common random numbers). Along those
samples we measure (SPEC §4):

* ``kl``: exact per-token ``KL(π(·|s_t) ‖ π_ref(·|s_t))`` over the vocabulary, summed over
  the response; unbiased for the sequence KL and of low variance. Also the sample
  estimators ``kl_k1 = mean(log π(y) − log π_ref(y))`` and ``kl_k3 = mean(r − 1 − log r)``
  with ``r = π_ref(y)/π(y)`` per sequence. ``sqrt_kl`` is Gao's ``d``.
* ``gold/reward``: the gold score (normalised with the lab's constants) minus the mean gold
  of ``π_ref`` samples on the same prompts, so ``R(0) = 0``; ``gold/win_rate`` is the mean
  of ``σ(g(y) − g(y_ref))`` over the ``π_ref`` pool of the prompt (gold Bradley–Terry).
* ``entropy``: the policy's per-token entropy along its own samples.
* Offline diagnostics on held-out test pairs with TRL names: ``rewards/chosen`` ``=
  β(log π(y_w) − log π_ref(y_w))``, ``rewards/rejected``, ``rewards/margins``,
  ``rewards/accuracies``, plus ``rho/mean``, ``offline_reg = ½ mean ρ²``, ``beta_eff``, and
  ``rewards/gold_accuracies`` (the implicit reward's accuracy against the gold ordering).
  ``log π_ref`` is recomputed alongside ``log π`` (not read from the dataset), so at
  ``π = π_ref`` every margin is exactly 0 and the accuracy 0, whatever the mesh.

Every member is evaluated on the *same* prompts (all of the lab's eval prompts by
default), so members, steps and π_ref can be compared prompt by prompt (SPEC §4). Each
sampled estimate is the mean of per-prompt means and comes with ``n_samples``,
``n_prompts`` and a standard error ``*_se`` clustered by prompt (the spread of the
per-prompt means over ``sqrt(n_prompts)``: samples of one prompt are not independent).
``gold/reward`` is paired per prompt with π_ref's pool mean on that prompt (a control
variate: the prompt's difficulty cancels). The per-prompt means themselves come back
as ``[M, E]`` arrays under ``prompt/<name>`` (saved to ``per_prompt/<step>.npz``); the
analysis builds paired step-vs-step and member-vs-member tests from them. Also
``response_len`` (mean tokens including EOS) and ``eos_frac`` (fraction of responses that
end with EOS rather than at the length cap) beside gold, and the gold function's parts
(the lab's: ``gold/network``, the normalised network score, and ``loglik``, the exact mean
per-token log-likelihood of the response under the corpus): a gold gain from responses
the world never produces is visible as such (SPEC §3). The policy
and the reference are run through the *same* vmapped program (stacked as a pair), so at
step 0, where the parameters equal π_ref, the exact KL and every offline log-ratio are
exactly 0, on one device or a sharded mesh.

Nothing is computed twice: π_ref decodes beside π inside the sampler, fed π's tokens
(:func:`gpo_jax.core.sampling.sample_measured`), so the KL terms, log-probs and entropy come
with the sampling rather than from a second pass over the finished sequences; the gold
network runs over the eval contexts once per run and then over each response's positions
only (:class:`gpo_jax.lab.gold.GoldFn`); π_ref's scored pool is cached beside the lab.
``Evaluator.two_pass = True`` restores the former two-pass path (for the benchmark and the
test that compares the two).

References:
  Schulman 2020, "Approximating KL divergence" (k1, k3 estimators).
  Gao, Schulman, Hilton 2023, "Scaling Laws for Reward Model Overoptimization",
  arXiv 2210.10760 (R(0) = 0 convention, best-of-n baseline).
"""

from collections.abc import Mapping
import dataclasses
import functools
import hashlib
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpo_jax.core import logprobs
from gpo_jax.core import sampling
from gpo_jax.core import sequences
from gpo_jax.evaluation import bon as bon_lib
from gpo_jax.objectives import diagnostics
from gpo_jax.proxies import selectors as selectors_lib
from gpo_jax.runtime import cpu as cpu_lib
from gpo_jax.runtime import distributed
from gpo_jax.runtime import sharding as sharding_lib
from gpo_jax.runtime import writers

Array = jax.Array

# fold_in tags keeping evaluation randomness apart from the data-order stream.
_EVAL_STREAM = 0xE7A1
_REF_STREAM = 0x7EF
BON_FILE = "bon.json"
#: π_ref's scored pool is cached under ``<lab root>/POOL_CACHE_DIR/<lab dir>/``
POOL_CACHE_DIR = "pools"
#: bump when the sampler or the gold scoring changes what a pool holds
POOL_CACHE_VERSION = 4
#: the π_ref pool scored by gold and by every proxy (runs against a proxy only)
POOL_FILE = "bon_pool.npz"
SWEEP_AXIS = "sweep"     # the mesh axis members (and the proxy-scored pool's prompts) use
DATA_AXIS = "data"       # the mesh axis one member's sample rows and test pairs are split over
#: prefix of the ``[M, E]`` per-prompt arrays in the evaluator's result (saved by the loop
#: to ``per_prompt/<step>.npz``, the input of every paired comparison in the analysis)
PER_PROMPT = "prompt/"
#: prefix of the ``[M, k, ...]`` sampled responses kept for reports (first sample of each
#: of the first ``N_SHOWN`` prompts), saved with the per-prompt arrays
SHOWN = "sample/"
N_SHOWN = 4


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Sizes of one evaluation.

  Attributes:
    n_prompts: held-out eval prompts used (the first ``n_prompts`` of ``Lab.eval_prompts``;
      0 = all of them, the default: every member is compared on the same prompts).
    samples_per_prompt: policy samples per prompt and member (``n_samples = n_prompts *
      samples_per_prompt``).
    ref_samples_per_prompt: ``π_ref`` pool per prompt (the ``R(0)`` baseline, win rate
      opponents and the best-of-n pool ``N``).
    n_test_pairs: held-out preference pairs for the offline diagnostics (0 = all).
    member_chunk: members evaluated together (vmapped) at a time; bounds memory.
    bon_n: best-of-n sizes reported in ``bon.json`` (clipped to ``N``).
    seed: seed of the ``π_ref`` pool.
    cache_pool: keep π_ref's scored pool beside the lab (``<lab root>/pools/``) and reuse it
      in every later run with the same lab, eval prompts, pool size, seed and device layout
      (the loaded arrays are the ones a fresh run computes, so results are unchanged). Runs
      against a proxy never reuse it (their pool is scored by the proxies as well).
    gold_samples: also return every sample's reference-subtracted gold as
      ``sample/gold_all`` ``[M, E, n]`` (saved with the per-prompt arrays): the input of
      head-to-head win rates between members (``gpo_jax.analysis.online``).
  """
  n_prompts: int = 0
  samples_per_prompt: int = 4
  ref_samples_per_prompt: int = 64
  n_test_pairs: int = 256
  member_chunk: int = 8
  bon_n: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
  seed: int = 0
  gold_samples: bool = False
  cache_pool: bool = True

  @classmethod
  def from_config(cls, e, **overrides) -> "EvalConfig":
    """From a run config's ``eval`` section (its ``every`` is the loop's business)."""
    fields = dict(n_prompts=e.n_prompts, samples_per_prompt=e.samples_per_prompt,
                  ref_samples_per_prompt=e.ref_samples_per_prompt,
                  n_test_pairs=e.n_test_pairs, member_chunk=e.member_chunk,
                  bon_n=tuple(e.bon_n), seed=e.seed,
                  gold_samples=bool(e.get("gold_samples", False)),
                  cache_pool=bool(e.get("cache_pool", True)))
    fields.update(overrides)
    return cls(**fields)


@dataclasses.dataclass(frozen=True)
class ProxyEval:
  """Proxies to measure members against (RL against a proxy; SPEC §6).

  Attributes:
    score_fn: ``(params, ctx, resp, mask) -> [P, B]`` normalised scores of every proxy
      (:meth:`gpo_jax.proxies.bank.ProxyBank.score_fn`).
    params: its parameters (a pytree).
    proxy_names: the ``P`` proxies' names.
    selectors: a :class:`gpo_jax.proxies.selectors.Selectors` over them; each member's
      ``hp["selector_idx"]`` picks the one it optimises, reported as ``proxy/reward``.
  """
  score_fn: Any
  params: Any
  proxy_names: tuple[str, ...]
  selectors: Any
  # Optional: the same selectors over only the proxies members read (scoring members'
  # samples with every proxy of the pool would cost a forward each and change nothing).
  member_score_fn: Any = None
  member_params: Any = None
  member_selectors: Any = None

  def for_members(self):
    """``(score_fn, params, selectors)`` used on the members' own samples."""
    if self.member_score_fn is None:
      return self.score_fn, self.params, self.selectors
    return self.member_score_fn, self.member_params, self.member_selectors


def _mean_se(x_MxE: Array) -> tuple[Array, Array]:
  """Mean over prompts and its prompt-clustered standard error.

  ``x_MxE`` holds per-prompt means (every prompt has the same number of samples, so the
  mean of the per-prompt means is the sample mean). Samples of one prompt share the prompt
  and are not independent; the prompt means are, so their spread gives the SE.
  """
  e = x_MxE.shape[-1]
  mean = jnp.mean(x_MxE, axis=-1)
  se = jnp.std(x_MxE, axis=-1, ddof=1) / jnp.sqrt(e) if e > 1 else jnp.full_like(mean, jnp.nan)
  return mean, se


def _within_prompt_corr(a_B: Array, b_B: Array, e: int) -> Array:
  """Pearson correlation of two per-sample scores after removing each prompt's means
  (``[E * n]`` prompt-major); 0 where either has no within-prompt spread."""
  a = a_B.reshape(e, -1)
  b = b_B.reshape(e, -1)
  a = a - jnp.mean(a, axis=1, keepdims=True)
  b = b - jnp.mean(b, axis=1, keepdims=True)
  den = jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b))
  return jnp.where(den > 0, jnp.sum(a * b) / jnp.where(den > 0, den, 1.0), 0.0)


def _per_prompt(x_B: Array, e: int) -> Array:
  """``[E * n]`` samples (prompt-major) → ``[E]`` per-prompt means."""
  return jnp.mean(x_B.reshape(e, -1), axis=-1)


class Evaluator:
  """Evaluates stacked sweep parameters against the lab's reference, gold model and test pairs.

  Build it with :meth:`from_lab`, call :meth:`reference` once (π_ref pool: baseline and
  best-of-n), then :meth:`__call__` at every eval step.
  """

  def __init__(self, *, graphdef, rest, ref_params, gold_fn, gold_params,
               eval_prompts: np.ndarray,
               test_pairs: Mapping[str, np.ndarray],
               ecfg: EvalConfig, length_normalize: bool = False,
               sharding: jax.sharding.Sharding | None = None,
               proxy: "ProxyEval | None" = None, pool_cache: str | None = None,
               lab_id: str = ""):
    if ecfg.n_prompts > len(eval_prompts) or ecfg.n_prompts < 0:
      raise ValueError(f"eval.n_prompts={ecfg.n_prompts} must be in [0, "
                       f"{len(eval_prompts)}] (the lab's eval prompts; 0 = all).")
    n_prompts = ecfg.n_prompts or len(eval_prompts)
    if n_prompts < 2:
      raise ValueError(f"evaluation needs at least 2 prompts for prompt-clustered standard "
                       f"errors, got eval.n_prompts={ecfg.n_prompts}.")
    self.ecfg = ecfg
    self.sharding = sharding
    self.graphdef, self.rest = graphdef, rest
    self.ref_params = self._place(ref_params)
    # gold_fn(gold_params, ctx, resp, mask) -> (normalised gold of the lab's kind, parts):
    # parts are per-response diagnostics ({name: [B]}) reported beside gold.
    self.gold_fn, self.gold_state = gold_fn, self._place(gold_params)
    self.prompts_ExP = self._place(jnp.asarray(eval_prompts[:n_prompts]))
    n_test = len(test_pairs["chosen"])
    k = n_test if ecfg.n_test_pairs <= 0 else min(ecfg.n_test_pairs, n_test)
    self.test = self._place({key: jnp.asarray(v[:k])
                             for key, v in sequences.pair_arrays(test_pairs).items()})
    self.resp_len = int(test_pairs["chosen"].shape[1])
    self.length_normalize = length_normalize
    self.ref_gold_ExN = None
    self.ref_gold_E = None
    self.ref_gold_mean = None
    self.gold_prefix = None       # the gold's states of the eval contexts (first __call__)
    # True: the former evaluation path (sample, then a second forward of π and π_ref over
    # the finished sequences; gold over whole sequences) — for benchmarks and tests only.
    self.two_pass = False
    # One member's weight shardings inside the member map (set at the first call from the
    # stacked params' shardings when the mesh has a data axis; see _on_data).
    self._weights_at_use = None
    # Against a proxy: the proxies' parameters and the selector table, and (after
    # reference()) each selector's π_ref pool mean per prompt, [S, E].
    self.proxy = proxy
    self.proxy_params = None if proxy is None else self._place(proxy.params)
    self.member_proxy_params = self.proxy_table = None
    if proxy is not None:
      _, member_params, member_sel = proxy.for_members()
      self.member_proxy_params = self._place(member_params)
      self.proxy_table = self._place(
          {k: jnp.asarray(v) for k, v in member_sel.table().items()})
    self.ref_proxy_SxE = None
    self.pool_arrays: dict[str, np.ndarray] = {}
    # the directory of π_ref's cached pools (None: never cached); see reference().
    self.pool_cache = pool_cache if (proxy is None and ecfg.cache_pool) else None
    self.lab_id = lab_id
    self.pool_cache_hit: bool | None = None
    self.compiler_options = cpu_lib.compiler_options(
        None if sharding is None else next(iter(sharding.device_set)).platform, "forward")

  @property
  def compiler_options(self) -> dict[str, str] | None:
    """XLA compiler options of the evaluation's programs (default: the platform's for
    forward programs, :func:`gpo_jax.runtime.cpu.compiler_options`); setting them re-jits
    and drops the gold prefix (recomputed under the new options at the next call)."""
    return self._compiler_options

  @compiler_options.setter
  def compiler_options(self, options: dict[str, str] | None) -> None:
    self._compiler_options = options
    jit = functools.partial(jax.jit, compiler_options=options)
    self._eval = jit(self._eval_all)
    self._eval_two_pass = jit(functools.partial(self._eval_all, two_pass=True))
    self._pool = jit(self._pool_fn)
    self._gold_prefix_jit = jit(self._gold_prefix)
    self.gold_prefix = None

  def _place(self, tree):
    """Copies host-identical constants onto ``self.sharding`` (no-op without one)."""
    return distributed.put(tree, self.sharding)

  @classmethod
  def from_lab(cls, lab, graphdef, rest, ecfg: EvalConfig,
               length_normalize: bool = False,
               sharding: jax.sharding.Sharding | None = None,
               proxy: "ProxyEval | None" = None) -> "Evaluator":
    gold_fn, gold_params = lab.gold_fn()
    ref_params = nnx.state(lab.policy(), nnx.Param)
    lab_dir = os.path.abspath(lab.path)
    cache = os.path.join(os.path.dirname(lab_dir), POOL_CACHE_DIR, os.path.basename(lab_dir))
    try:    # lab.json's self-checksum covers every lab file, π_ref's weights included
      with open(os.path.join(lab_dir, "lab.json")) as f:
        lab_id = f"{lab.cfg.config_hash()}:{json.load(f).get('meta_sha256', '')}"
    except (OSError, ValueError):
      cache, lab_id = None, ""     # no identity, no cache
    return cls(graphdef=graphdef, rest=rest, ref_params=ref_params,
               gold_fn=gold_fn, gold_params=gold_params,
               eval_prompts=np.asarray(lab.eval_prompts), test_pairs=lab.pairs("test"),
               ecfg=ecfg, length_normalize=length_normalize,
               sharding=sharding, proxy=proxy, pool_cache=cache, lab_id=lab_id)

  # ------------------------------------------------------------------ shared pieces

  def _gold(self, gold_state, ctx_BxP, resp_BxT, mask_BxT) -> tuple[Array, dict]:
    """The lab's normalised gold score (before reference subtraction) and its parts."""
    return self.gold_fn(gold_state, ctx_BxP, resp_BxT, mask_BxT)

  def _gold_prefix(self, gold_state, prompts_ExP):
    """The gold network's states of the eval contexts (computed once; None when the gold
    function has no prefix path, e.g. a user-supplied one)."""
    if not hasattr(self.gold_fn, "prefix"):
      return None
    return self.gold_fn.prefix(gold_state, prompts_ExP)

  def _gold_rows(self, gold_state, prefix_E, n, ctx_BxP, resp_BxT, mask_BxT):
    """:meth:`_gold` of ``n`` responses per eval context (rows prompt-major), from the
    contexts' cached gold states when there are some: the contexts are the same for every
    member and step, so only the response positions run (``GoldFn.after_prefix``)."""
    if prefix_E is None:
      return self._gold(gold_state, ctx_BxP, resp_BxT, mask_BxT)
    rows = jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), prefix_E)
    return self.gold_fn.after_prefix(gold_state, rows, ctx_BxP, resp_BxT, mask_BxT)

  def _sample(self, params, ctx_BxP, key, repeats: int = 1):
    # Always temperature 1: the KL and gold estimates are about π itself.
    model = nnx.merge(self.graphdef, params, self.rest)
    return sampling.sample(model, ctx_BxP, key, max_new_tokens=self.resp_len, repeats=repeats)

  # ------------------------------------------------------------------ reference pool

  def _pool_fn(self, ref_params, gold_state, prompts_ExP, key, proxy_params=None):
    n = self.ecfg.ref_samples_per_prompt

    def one_prompt(ctx_P, k):
      ctx = jnp.broadcast_to(ctx_P, (n,) + ctx_P.shape)
      resp, mask = self._sample(ref_params, ctx_P[None], k, repeats=n)
      gold, parts = self._gold_rows(gold_state, self._gold_prefix(gold_state, ctx_P[None]),
                                    n, ctx, resp, mask)
      if proxy_params is not None:    # every proxy's normalised score of the pool, [P, n]
        parts = dict(parts, proxies=self.proxy.score_fn(proxy_params, ctx, resp, mask))
      return (gold, jnp.sum(mask, axis=-1).astype(jnp.float32),
              sequences.ends_with_eos(resp, mask, sampling.EOS), parts, resp, mask)

    e = prompts_ExP.shape[0]
    keys = jax.random.split(key, e)
    groups = self._pool_groups(e) if proxy_params is not None else 1
    if groups == 1:
      return jax.lax.map(lambda a: one_prompt(*a), (prompts_ExP, keys))
    # Against a proxy the pool is large (N ~ 1024 per prompt, every proxy scores it): its
    # prompts are split over the sweep axis of the mesh, so each device samples and scores
    # its own prompts instead of every device repeating the whole pool. Every prompt keeps
    # its own key, so the samples are those of the unsplit pool.
    sh = jax.sharding.NamedSharding(self.sharding.mesh, jax.sharding.PartitionSpec(SWEEP_AXIS))
    split = lambda x: jax.lax.with_sharding_constraint(  # noqa: E731
        x.reshape((groups, e // groups) + x.shape[1:]), sh)
    out = jax.vmap(lambda p, k: jax.lax.map(lambda a: one_prompt(*a), (p, k)))(
        split(prompts_ExP), split(keys))
    return jax.tree.map(lambda x: x.reshape((e,) + x.shape[2:]), out)

  def _data_devices(self) -> int:
    mesh = getattr(self.sharding, "mesh", None)
    return 1 if mesh is None else int(dict(mesh.shape).get(DATA_AXIS, 1))

  def _on_data(self, rows):
    """One member's rows (samples, test pairs: leading axis) split over the mesh's ``data``
    axis, as the train step splits a member's batch (``engine.program.place_on_data``).

    Inside the member map nothing else tells XLA where a member's rows live: every ``data``
    device of a member group then repeated the member's whole evaluation (found in
    experiments/POD_PLAN.md). A no-op without a ``data`` axis larger than 1, or when it does
    not divide the rows.
    """
    d = self._data_devices()
    if d <= 1:
      return rows
    sh = jax.sharding.NamedSharding(self.sharding.mesh, jax.sharding.PartitionSpec(DATA_AXIS))
    return jax.tree.map(
        lambda a: jax.lax.with_sharding_constraint(a, sh)
        if getattr(a, "ndim", 0) >= 1 and a.shape[0] % d == 0 else a, rows)

  def _weights(self, params, lead: int = 0):
    """A member's weights gathered over ``data`` at use (model split kept), as the train
    step does under FSDP presets; ``lead`` leading unsharded axes (a chunk of members)."""
    if self._weights_at_use is None:
      return params
    none = (None,) * lead
    return jax.tree.map(
        lambda a, sh: jax.lax.with_sharding_constraint(a, jax.sharding.NamedSharding(
            sh.mesh, jax.sharding.PartitionSpec(*none, *sh.spec))), params, self._weights_at_use)

  def _pool_groups(self, e: int) -> int:
    """Devices on the mesh's sweep axis when they divide the ``e`` prompts (else 1)."""
    mesh = getattr(self.sharding, "mesh", None)
    if mesh is None or SWEEP_AXIS not in mesh.shape:
      return 1
    d = int(mesh.shape[SWEEP_AXIS])
    return d if d > 1 and e % d == 0 else 1

  def reference(self) -> dict[str, Any]:
    """Samples the ``π_ref`` pool once; sets the gold baseline and returns ``bon.json``.

    Returns:
      The best-of-n curve (ARCHITECTURE.md ``bon.json`` layout) from pools of
      ``N = ref_samples_per_prompt`` samples per eval prompt, selected by gold; gold is
      reference-subtracted (the pool mean), so ``n = 1`` gives 0. Also ``ref_per_prompt``:
      π_ref's per-prompt pool means (gold before subtraction, response length, EOS
      fraction), the control variate every member's gold is paired with.
    """
    e, n = self.prompts_ExP.shape[0], self.ecfg.ref_samples_per_prompt
    cached = self._load_pool()
    if cached is not None:
      gold, length, eos, parts = cached
    else:
      gold, length, eos, parts, _, _ = self._sample_pool()
      self._save_pool(gold, length, eos, parts)
    parts = dict(parts)
    proxies = parts.pop("proxies", None)
    gold_ExN = distributed.to_host(gold).astype(np.float64)
    length_ExN = distributed.to_host(length).astype(np.float64)
    eos_ExN = distributed.to_host(eos).astype(np.float64)
    self.ref_gold_mean = float(gold_ExN.mean())
    self.ref_gold_ExN = self._place(jnp.asarray(gold_ExN, jnp.float32))
    self.ref_gold_E = self._place(jnp.asarray(gold_ExN.mean(axis=1), jnp.float32))
    ns = sorted({int(v) for v in self.ecfg.bon_n if 1 <= v <= n} | {1})
    curve = bon_lib.best_of_n(gold_ExN - self.ref_gold_mean, ns=ns, selector="gold")
    out = curve.to_json_dict()
    out["ref_gold_mean"] = self.ref_gold_mean
    out["num_prompts"] = int(e)
    out["ref_response_len"] = float(length_ExN.mean())
    out["ref_eos_frac"] = float(eos_ExN.mean())
    for name, v in parts.items():   # π_ref's value of each gold part (e.g. ref_loglik)
      out["ref_" + name.replace("/", "_")] = float(np.mean(distributed.to_host(v)))
    if proxies is not None:
      self._proxy_reference(gold_ExN, distributed.to_host(proxies), length_ExN)
      out["proxy_selectors"] = list(self.proxy.selectors.names)
    out["ref_per_prompt"] = {"gold": gold_ExN.mean(axis=1).tolist(),
                             "gold_sd": gold_ExN.std(axis=1, ddof=1).tolist(),
                             "response_len": length_ExN.mean(axis=1).tolist(),
                             "eos_frac": eos_ExN.mean(axis=1).tolist()}
    return out

  # ------------------------------------------------------------------ pool cache

  def _pool_key(self) -> str:
    """What the pool depends on: the lab's files, the prompts, the pool's size and seed, the
    sampler's code version, the device layout and the compiler options (XLA:CPU may round
    differently under others)."""
    h = hashlib.sha256()
    h.update(self.lab_id.encode())
    h.update(np.ascontiguousarray(distributed.to_host(self.prompts_ExP)).tobytes())
    dev = jax.devices()
    h.update(json.dumps([POOL_CACHE_VERSION, self.ecfg.ref_samples_per_prompt, self.ecfg.seed,
                         self.resp_len, dev[0].platform, len(dev), jax.__version__,
                         sorted((self.compiler_options or {}).items())]).encode())
    return h.hexdigest()[:16]

  def _pool_path(self) -> str:
    return os.path.join(self.pool_cache, f"pool-{self._pool_key()}.npz")

  def _load_pool(self):
    """The cached ``(gold, length, eos, parts)`` host arrays, or None (absent, unreadable or
    not this pool: recomputed, never trusted)."""
    self.pool_cache_hit = None
    if self.pool_cache is None:
      return None
    path = self._pool_path()
    self.pool_cache_hit = False
    if not os.path.exists(path):
      return None
    try:
      with np.load(path, allow_pickle=False) as z:
        if str(z["key"]) != os.path.basename(path)[5:-4]:
          raise ValueError("key mismatch")
        e, n = self.prompts_ExP.shape[0], self.ecfg.ref_samples_per_prompt
        out = tuple(np.asarray(z[k]) for k in ("gold", "length", "eos"))
        if any(a.shape != (e, n) for a in out):
          raise ValueError(f"shapes {[a.shape for a in out]} != {(e, n)}")
        parts = {k[len("part__"):].replace("__", "/"): np.asarray(z[k])
                 for k in z.files if k.startswith("part__")}
    except Exception as err:   # a damaged cache costs a recomputation, never a wrong baseline
      logging.warning("ignoring π_ref pool cache %s (%s); recomputing it", path, err)
      return None
    self.pool_cache_hit = True
    return out + (parts,)

  def _save_pool(self, gold, length, eos, parts) -> None:
    if self.pool_cache is None or jax.process_index() != 0:
      return
    path = self._pool_path()
    arrays = {"gold": distributed.to_host(gold), "length": distributed.to_host(length),
              "eos": distributed.to_host(eos), "key": np.asarray(os.path.basename(path)[5:-4])}
    arrays.update({"part__" + k.replace("/", "__"): distributed.to_host(v)
                   for k, v in parts.items()})
    try:
      os.makedirs(self.pool_cache, exist_ok=True)
      writers.save_npz_atomic(path, arrays)
    except OSError as err:      # a read-only or full disk: the run goes on without a cache
      logging.warning("could not cache the π_ref pool at %s (%s)", path, err)

  def _sample_pool(self):
    key = jax.random.fold_in(jax.random.key(self.ecfg.seed), _REF_STREAM)
    return self._pool(self.ref_params, self.gold_state, self.prompts_ExP, key,
                      self.proxy_params)

  def ref_pool(self) -> dict[str, np.ndarray]:
    """π_ref's pool itself, the samples :meth:`reference` scores (same keys, same program).

    Returns host arrays: ``tokens [E, N, T]`` int32, ``mask [E, N, T]``, ``gold [E, N]``
    (normalised, not reference-subtracted), ``response_len`` and ``eos`` ``[E, N]``. Other
    scorers (ICDPO's in-context score, a new proxy) can select from exactly the pool a
    run's best-of-n curves were drawn from, without the pool being stored.
    """
    gold, length, eos, _, resp, mask = self._sample_pool()
    host = distributed.to_host
    return {"tokens": host(resp).astype(np.int32), "mask": host(mask).astype(np.float32),
            "gold": host(gold).astype(np.float32), "response_len": host(length),
            "eos": host(eos).astype(np.float32)}

  def _proxy_reference(self, gold_ExN, proxies_ExPxN, length_ExN) -> None:
    """π_ref's per-prompt mean of every selector (the R(0) of ``proxy/reward``) and the pool."""
    sel = self.proxy.selectors
    proxies_PxExN = np.transpose(np.asarray(proxies_ExPxN, np.float64), (1, 0, 2))
    ref_SxE = np.stack([sel.apply_np(proxies_PxExN, s).mean(axis=-1) for s in range(sel.size)])
    self.ref_proxy_SxE = self._place(jnp.asarray(ref_SxE, jnp.float32))
    self.pool_arrays = {
        "gold": gold_ExN.astype(np.float32),          # normalised gold, not ref-subtracted
        "proxies": proxies_PxExN.astype(np.float32),  # normalised proxy scores [P, E, N]
        "response_len": length_ExN.astype(np.float32),
        "proxy_names": np.asarray(self.proxy.proxy_names),
        "selector_names": np.asarray(sel.names),
        **{"selector_" + k: v for k, v in sel.table().items()},
    }

  def artifacts(self) -> dict[str, Any]:
    """The engine's one-time hook: samples the π_ref pool and returns ``{"bon.json": ...}``.

    Against a proxy also ``bon_pool.npz``: the pool's gold and every proxy's score
    (``[E, N]``, ``[P, E, N]``), from which the analysis draws best-of-n under any
    selector, single proxy or ensemble.
    """
    out: dict[str, Any] = {BON_FILE: self.reference()}
    if self.pool_arrays:
      out[POOL_FILE] = self.pool_arrays
    return out

  # ------------------------------------------------------------------ members

  def _eval_member(self, params, hp, step, aux, two_pass=False):
    """All metrics of one member (vmapped over members by the caller)."""
    e, n = aux["prompts"].shape[0], self.ecfg.samples_per_prompt
    ref_params, gold_state = aux["ref_params"], aux["gold_state"]
    prompts = self._on_data(aux["prompts"])                            # [E, P]
    ctx = self._on_data(jnp.repeat(prompts, n, axis=0))                # [E*n, P]
    params = self._weights(params)
    key = jax.random.fold_in(
        jax.random.fold_in(jax.random.key(hp["seed"]), _EVAL_STREAM), step)
    # Policy and reference decode side by side in one batched program (the reference fed
    # the policy's tokens), so equal params give equal logits and the measures along the
    # samples come with the sampling (no second pass over the finished sequences).
    pair = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, ref_params)
    if two_pass:
      resp, mask, sums = self._two_pass(params, pair, ctx, key)
    else:   # each prompt prefilled once for its n samples
      resp, mask, sums = sampling.sample_measured(
          lambda st: nnx.merge(self.graphdef, st, self.rest), pair, prompts, key,
          max_new_tokens=self.resp_len, repeats=n)
    m = mask.astype(jnp.float32)
    kl_B = sums["kl"]
    k1_B = sums["logp"] - sums["ref_logp"]
    log_r = -k1_B
    k3_B = jnp.expm1(log_r) - log_r
    ent = jnp.sum(sums["entropy"]) / jnp.maximum(jnp.sum(m), 1.0)

    gold_B, parts = self._gold_rows(gold_state, None if two_pass else aux["gold_prefix"], n,
                                    ctx, resp, mask)
    ref_ExN = aux["ref_gold"]
    win_B = jnp.mean(jax.nn.sigmoid(
        gold_B.reshape(e, n, 1) - ref_ExN[:, None, :]), axis=-1).reshape(-1)
    per_sample = {"kl": kl_B, "kl_k1": k1_B, "kl_k3": k3_B,
                  # Paired with π_ref's mean on the same prompt (the control variate):
                  # the prompt's own difficulty cancels from every comparison.
                  "gold/reward": gold_B - jnp.repeat(aux["ref_gold_E"], n),
                  "gold/win_rate": win_B,
                  "response_len": jnp.sum(m, axis=-1),
                  "eos_frac": sequences.ends_with_eos(resp, mask, sampling.EOS),
                  **parts}
    if self.proxy is not None:
      # The member's own selector (a single proxy or an ensemble objective), paired per
      # prompt with π_ref's pool mean under that selector, like gold.
      scores_PxB = self.proxy.for_members()[0](aux["proxy_params"], ctx, resp, mask)
      idx = hp["selector_idx"]
      selected = selectors_lib.apply(aux["proxy_table"], scores_PxB, idx)
      per_sample["proxy/reward"] = selected - jnp.repeat(aux["ref_proxy"][idx], n)
      # How well the optimised reward still tracks gold on the member's own samples, within
      # prompts (prompt means removed from both: what the member's ranking sees).
      extra = {"proxy/gold_corr": _within_prompt_corr(selected, gold_B, e)}
    else:
      extra = {}
    if self.ecfg.gold_samples:
      extra["gold_all"] = (gold_B - jnp.repeat(aux["ref_gold_E"], n)).reshape(e, n)
    k = min(N_SHOWN, e)
    return {
        "per_prompt": {name: _per_prompt(v, e) for name, v in per_sample.items()},
        **extra,
        "entropy": ent,
        # The first sample on each of the first k prompts, for reports to show as text.
        "shown": {"response": resp[::n][:k], "mask": mask[::n][:k].astype(jnp.int8),
                  "gold": gold_B[::n][:k] - aux["ref_gold_E"][:k]},
    }

  def _two_pass(self, params, pair, ctx, key):
    """The former path (kept for the benchmark and the tests that compare the two): sample,
    then run the policy and the reference over the finished sequences."""
    resp, mask = self._sample(params, ctx, key)
    tokens = jnp.concatenate([ctx, resp], axis=1)
    logits_2xBxLxV = jax.vmap(
        lambda st: nnx.merge(self.graphdef, st, self.rest)(tokens[:, :-1]))(pair)
    # Logits at position t predict token t + 1: the response is predicted from P-1 on.
    pol, ref = logits_2xBxLxV[:, :, ctx.shape[1] - 1:]
    m = mask.astype(jnp.float32)
    sums = {"kl": jnp.sum(logprobs.token_kl(pol, ref) * m, axis=-1),
            "logp": jnp.sum(logprobs.token_logprobs(pol, resp) * m, axis=-1),
            "ref_logp": jnp.sum(logprobs.token_logprobs(ref, resp) * m, axis=-1),
            "entropy": jnp.sum(logprobs.token_entropy(pol) * m, axis=-1)}
    return resp, mask, sums

  def _offline_log_ratios(self, params_M, ref_params, test) -> Array:
    """``[M, 2B]`` log π − log π_ref of the test pairs (chosen then rejected) per member.

    The reference log-probs are computed here instead of read from the dataset, in the same
    vmapped forward as the members' (π_ref is row 0 of every member chunk): batch rows go
    through identical arithmetic, so a member equal to π_ref has log-ratios of exactly 0 on
    any mesh. With the dataset's values, the rounding of a sharded forward broke the exact
    ties in ``rewards/accuracies`` at step 0 (0 on one device, ~0.4 on an 8-device mesh;
    tests/test_evaluation_sharded.py). One reference row per chunk, not per member, keeps the
    extra cost at ``1/member_chunk`` of the offline forward.
    """
    m_all = jax.tree.leaves(params_M)[0].shape[0]
    return self._by_device(lambda p: self._offline_group(p, ref_params, test), params_M, m_all)

  def _offline_group(self, params_M, ref_params, test) -> Array:
    """:meth:`_offline_log_ratios` of one device's members."""
    m = jax.tree.leaves(params_M)[0].shape[0]
    c = min(self.ecfg.member_chunk, m)
    n_chunks = -(-m // c)
    names = ("prompt", "chosen", "rejected", "chosen_mask", "rejected_mask")
    pairs = dict(zip(names, self._on_data(tuple(test[k] for k in names))))

    def chunk(p_CxP):
      p_CxP = self._weights(p_CxP, lead=1)
      rows = jax.tree.map(lambda r, x: jnp.concatenate([r[None], x]), ref_params, p_CxP)
      logp = jax.vmap(lambda st: jnp.concatenate(sequences.chosen_rejected_logps(
          nnx.merge(self.graphdef, st, self.rest), pairs, self.length_normalize)))(rows)
      return logp[1:] - logp[0]

    # Pad the member axis with copies of π_ref up to whole chunks; their rows are dropped.
    padded = jax.tree.map(
        lambda x, r: jnp.concatenate(
            [x, jnp.broadcast_to(r, (n_chunks * c - m,) + r.shape)]).reshape(
                (n_chunks, c) + r.shape), params_M, ref_params)
    lr_NxCx2B = jax.lax.map(chunk, padded)
    return lr_NxCx2B.reshape((n_chunks * c,) + lr_NxCx2B.shape[2:])[:m]

  def _by_device(self, group_fn, args, m: int):
    """``group_fn`` over the members of ``args`` (leading axis ``M``), each device of the
    mesh's sweep axis running it on its own members.

    A ``lax.map`` over a member axis that is sharded over ``sweep`` cannot be partitioned:
    XLA gathers every member onto every device and each repeats the whole evaluation. So
    the members are regrouped ``[G, M/G]`` with the ``G`` groups on the sweep axis (vmapped),
    and ``group_fn`` maps over a group's members (as the train step does,
    :func:`gpo_jax.engine.program.map_members`). ``G = 1`` without a sweep axis dividing ``M``.
    """
    g = self._pool_groups(m)
    if g == 1:
      return group_fn(args)
    sh = jax.sharding.NamedSharding(self.sharding.mesh, jax.sharding.PartitionSpec(SWEEP_AXIS))
    split = lambda x: jax.lax.with_sharding_constraint(  # noqa: E731
        x.reshape((g, m // g) + x.shape[1:]), sh)
    out = jax.vmap(group_fn)(jax.tree.map(split, args))
    return jax.tree.map(lambda x: x.reshape((m,) + x.shape[2:]), out)

  def _eval_all(self, params_M, hparams, step, aux, two_pass=False):
    fn = functools.partial(self._eval_member, step=step, aux=aux, two_pass=two_pass)
    m = hparams["beta"].shape[0]
    chunk = min(self.ecfg.member_chunk, m // self._pool_groups(m))
    out = self._by_device(lambda a: jax.lax.map(lambda t: fn(*t), a, batch_size=chunk),
                          (params_M, hparams), m)
    per = out.pop("per_prompt")
    shown = out.pop("shown")
    res = dict(out)
    res.update({SHOWN + name: v for name, v in shown.items()})
    if "gold_all" in res:
      res[SHOWN + "gold_all"] = res.pop("gold_all")
    # Offline diagnostics on held-out pairs (TRL names), the same definitions as training.
    lr_Mx2B = self._offline_log_ratios(params_M, aux["ref_params"], aux["test"])
    b = lr_Mx2B.shape[1] // 2
    res.update(diagnostics.preference_diagnostics(
        lr_Mx2B[:, :b], lr_Mx2B[:, b:], hparams["beta"][:, None],
        hparams["beta_eff_scale"][:, None]))
    # The implicit reward's accuracy against the *gold* ordering (not the sampled labels):
    # the fraction of held-out pairs with distinct gold whose ρ has the sign of the gold
    # difference (ρ = 0, as at π = π_ref, counts as wrong, like rewards/accuracies).
    dg = aux["test"]["gold_chosen"] - aux["test"]["gold_rejected"]
    rho = lr_Mx2B[:, :b] - lr_Mx2B[:, b:]
    untied = (dg != 0).astype(jnp.float32)
    res["rewards/gold_accuracies"] = (jnp.sum((rho * dg[None] > 0) * untied, axis=-1)
                                      / jnp.maximum(jnp.sum(untied), 1.0))
    for name, x_MxE in per.items():
      res[name], res[name + "_se"] = _mean_se(x_MxE)
      res[PER_PROMPT + name] = x_MxE
    res["sqrt_kl"] = jnp.sqrt(jnp.maximum(res["kl"], 0.0))
    return res

  def __call__(self, params_M, hparams: Mapping[str, Array], step: int) -> dict[str, np.ndarray]:
    """Metrics of every member: a dict of ``[M]`` NumPy arrays (names as in metrics.jsonl).

    Args:
      params_M: stacked policy parameters (leading member axis).
      hparams: :meth:`gpo_jax.engine.sweep.Members.hparams`.
      step: the training step the parameters belong to.
    """
    res = self._run(params_M, hparams, step)
    out = {k: distributed.to_host(v) for k, v in res.items()}
    out["n_prompts"] = np.full(hparams["beta"].shape, self.prompts_ExP.shape[0], np.int64)
    out["n_samples"] = np.full(hparams["beta"].shape, self.prompts_ExP.shape[0]
                               * self.ecfg.samples_per_prompt, np.int64)
    return out

  def _run(self, params_M, hparams, step, lower: bool = False):
    """The jitted evaluation's device results (``lower=True``: its ``Lowered``, for cost
    and memory analysis)."""
    if self.ref_gold_ExN is None:
      raise RuntimeError("call Evaluator.reference() before evaluating members.")
    if self._weights_at_use is None and self._data_devices() > 1:
      shardings = jax.tree.map(lambda a: getattr(a, "sharding", None), params_M)
      leaves = jax.tree.leaves(shardings, is_leaf=lambda x: x is None)
      if leaves and all(isinstance(x, jax.sharding.NamedSharding) for x in leaves):
        self._weights_at_use = sharding_lib.gathered_at_use(shardings, self.sharding.mesh)
    if self.gold_prefix is None and hasattr(self.gold_fn, "prefix"):
      self.gold_prefix = self._gold_prefix_jit(self.gold_state, self.prompts_ExP)
    aux = {"ref_params": self.ref_params, "gold_state": self.gold_state,
           "gold_prefix": self.gold_prefix,
           "ref_gold": self.ref_gold_ExN, "ref_gold_E": self.ref_gold_E,
           "prompts": self.prompts_ExP, "test": self.test}
    if self.proxy is not None:
      aux.update(proxy_params=self.member_proxy_params, proxy_table=self.proxy_table,
                 ref_proxy=self.ref_proxy_SxE)
    # A NumPy scalar, not a device-0 array: jit accepts it alongside multi-process arrays.
    run = self._eval_two_pass if self.two_pass else self._eval
    if lower:
      return run.lower(params_M, hparams, np.int32(step), aux)
    return run(params_M, hparams, np.int32(step), aux)
