"""Online preference optimisation (SPEC §6): online IPO / DPO / SLiC with any ``f``, IPO-MD and Nash-MD-PG, as one sweep.

Every step, every member samples two fresh responses ``y, y′`` to each of its
``train.batch_size`` prompts inside the compiled step (sampling parameters under
``stop_gradient``), a preference model gives a **soft** label ``p = P(y ≻ y′)``, and the
member is updated by its method:

=============  ========================  =================================================
method         responses                 update
=============  ========================  =================================================
``online``     ``y, y′ ~ π``             GPO soft-label loss ``p f(βρ) + (1−p) f(−βρ)``,
                                         ``ρ`` the log-ratio margin; online IPO is
                                         ``f = squared`` (``β = 2τ``), online DPO
                                         ``logistic``, online SLiC ``hinge``, or any ``f``
``ipo_md``     ``y, y′ ~ π_mix``         the same loss; ``π_mix`` the token-level geometric
                                         mixture ``∝ π^(1−β_mix)·π_ref^β_mix``
``nash_md``    ``y ~ π``, ``y′ ~ π_mix``  Nash-MD-PG: ``−log π(y)·sg(p − ½ − τ·[log π(y) −
                                         log π_ref(y)])`` with the *sequence* log-ratio
                                         (``online.nash_md_per_token``: HF TRL's variant,
                                         each token's log-ratio multiplies its own score)
=============  ========================  =================================================

``τ = β/2`` for Nash-MD, so a Nash-MD member at ``β_mix = 0`` has the fixed point of the
online-IPO member with the same ``β`` (online IPO is Nash-MD's self-play limit; the tabular
game lab, :mod:`gpo_jax.lab.games`, checks both against the regularised Nash).

The mixture sampler (:func:`gpo_jax.core.sampling.sample_mixture`) runs π's and π_ref's
KV caches side by side; every member samples through it with a per-row ``β_mix`` (0 for the
responses drawn from π), so the method, ``β``, ``f`` and ``β_mix`` are all traced: one
compiled program trains the whole method × family × β × β_mix × seed × lr grid.

Preference models (``online.preference``): ``"gold"`` — the lab's gold Bradley–Terry
``σ((g(y) − g(y′))/label_temp)``, the same model that labelled the offline data;
``"proxy"`` — ``σ(s(y) − s(y′))`` of a proxy selector (``online.proxy``: a single proxy or an
ensemble objective of ``proxies.*``, normalised units); or ``"module:function"`` — any
importable pairwise callable ``(ctx, y, y_mask, y′, y′_mask) -> p [B]``. Hard labels
(``online.hard_labels``: ``p ∈ {0, ½, 1}`` by the argmax, as HF TRL's online DPO) only on
request.

Evaluation is offline GPO's (:mod:`gpo_jax.evaluation.policy`: on-policy ``kl`` at
temperature 1, ``gold/reward``, ``gold/win_rate`` ...), with each member's per-sample gold
kept so the report can build the head-to-head win-rate matrix between methods.

References:
  Calandriello et al. 2024, "Human Alignment of Large Language Models through Online
  Preference Optimisation", arXiv 2403.08635 (online IPO, IPO-MD).
  Munos et al. 2023, "Nash Learning from Human Feedback", arXiv 2312.00886 (Nash-MD-PG).
  Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback",
  arXiv 2402.04792 (online DPO).
"""

from collections.abc import Mapping
import functools
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpo_jax.algorithms.base import SHARED, Algorithm
from gpo_jax.core import logprobs
from gpo_jax.core import model as model_lib
from gpo_jax.core import sampling
from gpo_jax.engine import members as members_lib
from gpo_jax.engine.members import Members
from gpo_jax.objectives import losses

METHODS = ("online", "ipo_md", "nash_md")
#: display names of the well-known (method, f) pairs; others read "<method>_<f>"
_NAMES = {("online", "squared"): "online_ipo", ("online", "logistic"): "online_dpo",
          ("online", "hinge"): "online_slic", ("ipo_md", "squared"): "ipo_md",
          ("nash_md", None): "nash_md"}
TRAIN_METRICS = ("objective/kl", "objective/entropy", "objective/scores",
                 "objective/label", "rewards/chosen", "rewards/rejected", "rewards/margins",
                 "rewards/accuracies", "mixture_coef", "response_len")
#: the family Nash-MD members report ``beta_eff`` with (τ = β/2 is IPO's)
_NASH_F = "squared"


def display_name(method: str, f, mixture_coef: float | None, n_coefs: int) -> str:
  fname = None if f is None else (f if isinstance(f, str) else getattr(f, "__name__", "f"))
  name = _NAMES.get((method, fname)) or f"{method}_{fname}"
  if method != "online" and n_coefs > 1:
    name += f"_m{mixture_coef:g}"
  return name


def _methods(spec) -> dict[str, tuple]:
  """``sweep.methods`` ({method: families}) checked; Nash-MD's families are ignored."""
  spec = dict(spec)
  bad = [m for m in spec if m not in METHODS]
  if bad or not spec:
    raise ValueError(f"sweep.methods has {bad or 'nothing'}; valid methods: {list(METHODS)} "
                     "(a mapping method -> loss families, e.g. {'online': ('squared',), "
                     "'nash_md': ()}).")
  out = {}
  for m, fams in spec.items():
    fams = tuple(fams) if isinstance(fams, (list, tuple)) else (fams,)
    if m == "nash_md":
      out[m] = (None,)
      continue
    if not fams:
      raise ValueError(f"sweep.methods[{m!r}] lists no loss family; give some of "
                       f"{sorted(losses.GPO_FUNCTIONS)} (or a callable).")
    for f in fams:
      losses.get_f(f)
    out[m] = fams
  return out


def make_members(methods: Mapping[str, tuple], betas, mixture_coefs=(0.125,), seeds=(0,),
                 lrs=(1e-4,), *, n_train: int, batch_size: int) -> Members:
  """The product (method, f) × β × β_mix × seed × lr (β_mix only for IPO-MD and Nash-MD).

  Returns members with traced ``method_idx``, ``family_idx`` (into the table ``families``),
  ``beta``, ``mixture_coef``, ``seed``, ``lr``, ``data_size`` (all prompts) and
  ``beta_eff_scale``; ``family`` is the display name (``online_ipo``, ``ipo_md``,
  ``nash_md``, ...), ``method`` and ``f`` are shown in metrics rows.
  """
  spec = _methods(methods)
  members_lib.check_numbers("betas", betas)
  members_lib.check_numbers("mixture_coefs", mixture_coefs, inclusive=True)
  bad = [c for c in mixture_coefs if not 0.0 <= float(c) < 1.0]
  if bad:
    raise ValueError(f"sweep.mixture_coefs has {bad}: β_mix is the weight on π_ref and must "
                     "be in [0, 1) (0 = sample from π; TRL's mixture_coef).")
  members_lib.check_numbers("seeds", seeds, integer=True, inclusive=True)
  members_lib.check_numbers("lrs", lrs)
  size, = members_lib.data_sizes((0,), n_train=n_train, batch_size=batch_size)
  fams: list = []
  for m, fs in spec.items():
    for f in fs:
      g = _NASH_F if f is None else f
      if all(g is not x for x in fams) and (not isinstance(g, str) or g not in fams):
        fams.append(g)
  fam_index = lambda g: next(i for i, x in enumerate(fams) if x is g or x == g)  # noqa: E731
  scales = losses.beta_eff_scales(fams)
  rows = []
  for m, fs in spec.items():
    coefs = (0.0,) if m == "online" else tuple(mixture_coefs)
    for f in fs:
      g = _NASH_F if f is None else f
      block = members_lib.product([("beta", tuple(betas)), ("mix", coefs),
                                   ("seed", tuple(seeds)), ("lr", tuple(lrs))])
      for b, c, s, lr in zip(block["beta"], block["mix"], block["seed"], block["lr"]):
        rows.append((display_name(m, f, c, len(coefs)), m, "-" if f is None else
                     (g if isinstance(g, str) else getattr(g, "__name__", "f")),
                     METHODS.index(m), fam_index(g), b, c, s, lr))
  col = lambda i: [r[i] for r in rows]  # noqa: E731
  n = len(rows)
  columns = {
      "family": np.asarray(col(0), dtype=object),
      "method": np.asarray(col(1), dtype=object),
      "f": np.asarray(col(2), dtype=object),
      "method_idx": np.asarray(col(3), np.int32),
      "family_idx": np.asarray(col(4), np.int32),
      "beta": np.asarray(col(5), np.float64),
      "mixture_coef": np.asarray(col(6), np.float64),
      "seed": np.asarray(col(7), np.int32),
      "lr": np.asarray(col(8), np.float64),
      "data_size": np.full(n, size, np.int32),
      "beta_eff_scale": np.asarray([scales[i] for i in col(4)], np.float32),
  }
  return Members(columns=columns,
                 traced=("method_idx", "family_idx", "beta", "mixture_coef", "seed", "lr",
                         "data_size", "beta_eff_scale"),
                 hidden=("method_idx", "family_idx", "beta_eff_scale"),
                 tables={"families": tuple(fams)})


def gold_preference(gold_fn, label_temp: float):
  """``pref(shared, ctx, y, my, y′, my′) -> (p, score_y, score_y′)``: gold Bradley–Terry."""

  def pref(sh, ctx, ya, ma, yb, mb):
    g = gold_fn(sh["gold"], jnp.concatenate([ctx, ctx]), jnp.concatenate([ya, yb]),
                jnp.concatenate([ma, mb]))[0]
    ga, gb = jnp.split(g, 2)
    return jax.nn.sigmoid((ga - gb) / label_temp), ga, gb

  return pref


def proxy_preference(score_fn, table, selector_idx: int):
  """``σ(s(y) − s(y′))`` of one selector (a proxy or an ensemble objective), normalised units."""
  from gpo_jax.proxies import selectors as selectors_lib

  def pref(sh, ctx, ya, ma, yb, mb):
    s = score_fn(sh["proxies"], jnp.concatenate([ctx, ctx]), jnp.concatenate([ya, yb]),
                 jnp.concatenate([ma, mb]))
    sel = selectors_lib.apply(table, s, jnp.int32(selector_idx))
    sa, sb = jnp.split(sel, 2)
    return jax.nn.sigmoid(sa - sb), sa, sb

  return pref


def callable_preference(path: str):
  """A pairwise callable ``"module:function"``: ``(ctx, y, my, y′, my′) -> p [B]``."""
  mod, _, attr = path.partition(":")
  try:
    fn = getattr(importlib.import_module(mod), attr)
  except (ImportError, AttributeError, ValueError) as e:
    raise ValueError(f"online.preference={path!r} is neither 'gold', 'proxy' nor an "
                     f"importable 'module:function' ({e}).") from None

  def pref(sh, ctx, ya, ma, yb, mb):
    p = jnp.asarray(fn(ctx, ya, ma, yb, mb), jnp.float32)
    return p, p, 1.0 - p

  return pref


def hard_label(p):
  """HF TRL's online-DPO labels: the argmax of the preference (1, 0, or ½ on an exact tie)."""
  return jnp.where(p > 0.5, 1.0, jnp.where(p < 0.5, 0.0, 0.5))


def member_loss_fn(graphdef, rest, families, preference, *, response_len: int,
                   hard_labels: bool = False, nash_md_per_token: bool = False,
                   mixture: bool = True):
  """The per-member online loss ``(params, batch, hp, key) -> (loss, metrics)``.

  ``batch``: ``prompt [B, C]``, ``batch[SHARED]`` = ``{"ref": π_ref params, ...the
  preference model's constants}``. ``hp``: ``method_idx``, ``family_idx``, ``beta``,
  ``mixture_coef``, ``beta_eff_scale``. ``mixture=False`` (static: no member of the sweep
  ever draws from a mixture, e.g. only online IPO/DPO/SLiC members, or every ``β_mix = 0``)
  samples both responses with the plain sampler, skipping π_ref's decode.
  """
  fswitch = losses.switched_f(tuple(families))

  def loss_fn(params, batch, hp, key):
    sh = batch[SHARED]
    ctx = batch["prompt"]
    b = ctx.shape[0]
    method, beta, mix = hp["method_idx"], hp["beta"], hp["mixture_coef"]
    # y from π unless IPO-MD; y′ from π unless IPO-MD or Nash-MD.
    coef_a = jnp.where(method == 1, mix, 0.0)
    coef_b = jnp.where(method == 0, 0.0, mix)
    ctx2 = jnp.concatenate([ctx, ctx])
    coefs = jnp.concatenate([jnp.full((b,), coef_a), jnp.full((b,), coef_b)])
    sampler = nnx.merge(graphdef, jax.lax.stop_gradient(params), rest)
    ref = nnx.merge(graphdef, sh["ref"], rest)
    if mixture:
      resp, mask = sampling.sample_mixture(sampler, ref, ctx2, key, coefs,
                                           max_new_tokens=response_len)
    else:
      resp, mask = sampling.sample(sampler, ctx2, key, max_new_tokens=response_len)
    # Each prompt runs once for its two responses (rows of ctx2: y for every prompt, then y′).
    resp_Bx2xT = jnp.stack([resp[:b], resp[b:]], axis=1)

    def response_logits(model):                                                # [2B, T, V]
      l_Bx2xTxV = model_lib.grouped_response_logits(model, ctx, resp_Bx2xT)
      return jnp.concatenate([l_Bx2xTxV[:, 0], l_Bx2xTxV[:, 1]], axis=0)

    logits = response_logits(nnx.merge(graphdef, params, rest))
    ref_logits = jax.lax.stop_gradient(response_logits(ref))
    m = mask.astype(jnp.float32)
    lp_tok = logprobs.token_logprobs(logits, resp) * m
    lpref_tok = logprobs.token_logprobs(ref_logits, resp) * m
    h = jnp.sum(lp_tok - lpref_tok, axis=-1)                                   # [2B]
    ha, hb = jnp.split(h, 2)
    p, sa, sb = preference(sh, ctx, resp[:b], mask[:b], resp[b:], mask[b:])
    p = jax.lax.stop_gradient(p)
    if hard_labels:
      p = hard_label(p)
    gpo_B = losses.gpo_loss(ha - hb, beta, functools.partial(fswitch, hp["family_idx"]), p=p)
    tau = beta / 2.0
    hsg = jax.lax.stop_gradient(ha)
    if nash_md_per_token:
      tok_ratio = jax.lax.stop_gradient(lp_tok[:b] - lpref_tok[:b])
      score = jax.lax.stop_gradient(p - 0.5)[:, None] - tau * tok_ratio
      nash_B = -jnp.sum(lp_tok[:b] * score, axis=-1)
    else:
      nash_B = -jnp.sum(lp_tok[:b], axis=-1) * (p - 0.5 - tau * hsg)
    loss = jnp.mean(jnp.where(method == 2, nash_B, gpo_B))

    kl_a = jnp.sum(logprobs.token_kl(jax.lax.stop_gradient(logits[:b]), ref_logits[:b])
                   * m[:b], axis=-1)
    first = p >= 0.5
    r_a, r_b = beta * jax.lax.stop_gradient(ha), beta * jax.lax.stop_gradient(hb)
    chosen, rejected = jnp.where(first, r_a, r_b), jnp.where(first, r_b, r_a)
    return loss, {
        # Exact per-token KL(π‖π_ref) summed along the first responses: on-policy for
        # online and Nash-MD members (temperature 1); along π_mix samples for IPO-MD.
        "objective/kl": jnp.mean(kl_a),
        "objective/entropy": -jnp.mean(jnp.sum(jax.lax.stop_gradient(lp_tok[:b]), axis=-1)),
        "objective/scores": jnp.mean(jnp.concatenate([sa, sb])),
        "objective/label": jnp.mean(jnp.abs(p - 0.5)),
        "rewards/chosen": jnp.mean(chosen), "rewards/rejected": jnp.mean(rejected),
        "rewards/margins": jnp.mean(chosen - rejected),
        "rewards/accuracies": jnp.mean((chosen > rejected).astype(jnp.float32)),
        "mixture_coef": jnp.where(method == 0, 0.0, mix),
        "response_len": jnp.mean(jnp.sum(m[:b], axis=-1)),
    }

  return loss_fn


def needs_mixture(members: Members) -> bool:
  """Whether any member draws from the π/π_ref mixture (IPO-MD or Nash-MD with β_mix > 0):
  the static switch of :func:`member_loss_fn`'s ``mixture``."""
  return bool(((np.asarray(members.columns["method_idx"]) != 0)
               & (np.asarray(members.columns["mixture_coef"]) > 0)).any())


def _key(config) -> str:
  o = config.online
  return repr((o.preference, o.get("proxy", ""), tuple(config.get("proxies", {}).get("paths", ())),
               config.lab.to_json() if hasattr(config.lab, "to_json") else repr(config.lab)))


class OnlinePO(Algorithm):
  """Online IPO / DPO / SLiC (any f), IPO-MD and Nash-MD-PG against a preference model."""

  name = "online"
  headline_metric = "gold/reward"
  train_metrics = TRAIN_METRICS
  #: in the metrics rows too (the rows' rewards/* are the evaluator's held-out-pair ones)
  row_metrics = ("objective/kl", "objective/entropy", "objective/scores", "objective/label")

  def __init__(self):
    self._banks: dict = {}
    self._prefs: dict = {}

  def members(self, config, n_train: int) -> Members:
    s = config.sweep
    return make_members(dict(s.methods), tuple(s.betas), tuple(s.mixture_coefs),
                        tuple(s.seeds), tuple(s.lrs), n_train=n_train,
                        batch_size=config.train.batch_size)

  def member_count(self, config) -> int:
    s = config.sweep
    spec = _methods(dict(s.methods))
    per = len(s.betas) * len(s.seeds) * len(s.lrs)
    return sum(len(fs) * per * (1 if m == "online" else len(s.mixture_coefs))
               for m, fs in spec.items())

  def model(self, lab, config):
    return lab.policy()

  def _proxy(self, config, lab=None):
    from gpo_jax.algorithms import rloo
    from gpo_jax.proxies import bank as bank_lib
    sel = rloo.build_selectors(config)
    name = config.online.proxy
    if name not in sel.names:
      raise ValueError(f"online.proxy={name!r} is not a selector; valid choices: "
                       f"{list(sel.names)}.")
    idx = sel.index(name)
    used = sel.used(np.asarray([idx]))
    key = rloo.proxy_paths(config)
    if key not in self._banks:
      self._banks[key] = bank_lib.load(list(key), lab)
    # restrict() keeps the selector rows numbered as before: the preference applies row idx.
    return self._banks[key].subset(used), sel.restrict(used, np.asarray([idx])), idx

  def train_data(self, lab, config):
    shared = {"ref": nnx.state(lab.policy(), nnx.Param)}
    kind = config.online.preference
    if kind == "gold":
      shared["gold"] = lab.gold_fn()[1]
    elif kind == "proxy":
      bank, _, _ = self._proxy(config, lab)
      shared["proxies"] = bank.params()
    # The preference function closes over the lab's gold (or the proxies' score function):
    # built here, where the lab is at hand; loss_fn (called after train_data) reads it.
    self._prefs[_key(config)] = self._preference(config, lab)
    return {"prompt": jnp.asarray(lab.pairs("train")["prompt"]), SHARED: shared}

  def _preference(self, config, lab):
    kind = config.online.preference
    if kind == "gold":
      return gold_preference(lab.gold_fn()[0], float(config.lab.label_temp))
    if kind == "proxy":
      bank, sel, idx = self._proxy(config, lab)
      table = {k: jnp.asarray(v) for k, v in sel.table().items()}
      return proxy_preference(bank.score_fn(), table, idx)
    return callable_preference(kind)

  def loss_fn(self, graphdef, rest, members, config):
    pref = self._prefs.get(_key(config))
    if pref is None:
      raise RuntimeError("online: call train_data(lab, config) before loss_fn (the preference "
                         "model is built from the lab).")
    return member_loss_fn(graphdef, rest, members.families, pref,
                          response_len=int(config.lab.corpus.response_len),
                          hard_labels=bool(config.online.hard_labels),
                          nash_md_per_token=bool(config.online.nash_md_per_token),
                          mixture=needs_mixture(members))

  def evaluator(self, lab, graphdef, rest, members, config, sharding):
    from gpo_jax.evaluation import policy
    ecfg = policy.EvalConfig.from_config(config.eval, gold_samples=True)
    return policy.Evaluator.from_lab(lab, graphdef, rest, ecfg,
                                     config.train.length_normalize, sharding=sharding)

  def validate(self, config, n_train: int) -> Members:
    o = config.online
    if o.preference not in ("gold", "proxy") and ":" not in str(o.preference):
      raise ValueError(f"online.preference={o.preference!r}; valid choices: 'gold', 'proxy' "
                       "or an importable 'module:function' pairwise callable.")
    if o.preference != "gold" and ":" in str(o.preference):
      callable_preference(o.preference)
    if o.preference == "proxy" and (not config.get("proxies") or not config.proxies.get("paths")):
      raise ValueError("online.preference='proxy' needs a proxies section with proxies.paths "
                       "(proxy sets exported by reward_model runs) and online.proxy naming "
                       "one selector (a proxy or '<ensemble>/<objective>').")
    return self.members(config, n_train)

  def report(self, workdir: str, log) -> None:
    from gpo_jax import analysis
    analysis.analyze(workdir)
    from gpo_jax.analysis import online as online_report
    online_report.write(workdir, log=log)

  def describe(self, row) -> str:
    g = row.get("gold/reward")
    gold = f"{g:+.3f}" if g is not None and math.isfinite(g) else "nan"
    return f"{row['family']} β={row['beta']:g} gold={gold}"


ALGORITHM = OnlinePO()
