"""Benchmark: online-DPO, RLOO and Inverse-Q* train steps and ICDPO's pool scoring with each
prompt run once for its k samples, side by side with the same programs running every
sample's whole sequence.

Both algorithms sample ``k`` responses per prompt (``sampling.sample(..., repeats=k)``, one
prefill per prompt) and then need log-probs of each response under π (with gradients) and
π_ref; Inverse-Q* also under π_ref given the guidance context ``[BOS] demos x [SEP]``. Since
this commit they run each context once for its ``k`` responses
(``model.grouped_token_logprobs`` / ``grouped_response_logprobs``: the context's keys and
values once, the responses extend them); the online methods take the logits of their two
responses per prompt the same way (``model.grouped_response_logits``: per-token KL and
Nash-MD need the whole distributions). The *whole-sequence* variant swaps those three
functions (``unittest.mock.patch``, at trace time) for the former computation: the context
repeated ``k`` times and ``context + response`` run whole. Everything else — the sampler,
the proxy, the loss — is the same program.

Per algorithm: ``M`` members vmapped (one jitted ``value_and_grad`` of the per-member loss
with the train step's XLA:CPU options), random small-lab-shaped weights (π and π_ref
differ), the small lab's shapes: online DPO as ``configs/online.py``'s ``online`` stage
(batch 16, two responses per prompt, a stand-in preference: the longer response), RLOO as ``configs/proxy_setting.py``'s ``rl`` stage
(batch 16, k = 4, contexts C = 8, T = 12 new tokens); Inverse-Q* as ``configs/incontext.py``'s
``inverse_q`` stage (batch 16, k = 4, guidance of 2 demonstrations: C_g = 48). ICDPO's pool
scoring (``icdpo.Runner.lp_per_context``, used by the ICDPO evaluation and ``pool_bon``):
π_ref's log-probs of 64 samples per in-context prompt of C_g tokens, 512 rows per call, under
the forward programs' compiler options. Timing: every
program compiles first, then ``--rounds`` interleaved rounds, each timing every program as
the median of ``--calls`` calls; a row keeps its fastest round. XLA FLOPs from
``cost_analysis()`` (the sampler's decode loop body counted once in both variants).

Run::

  python experiments/bench_grouped.py --write   # -> experiments/BENCH_GROUPED.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from unittest import mock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
sys.path.insert(0, REPO)

import bench_sweep  # noqa: E402  (machine info, load average, XLA cost, outputs: one place)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from gpo_jax.algorithms import inverse_q, online, rloo  # noqa: E402
from gpo_jax.algorithms.base import SHARED  # noqa: E402
from gpo_jax.core import logprobs  # noqa: E402
from gpo_jax.core import model as model_lib  # noqa: E402
from gpo_jax.lab import corpus as corpus_lib  # noqa: E402
from gpo_jax.lab import presets  # noqa: E402
from gpo_jax.lab.config import LabConfig  # noqa: E402
from gpo_jax.proxies import selectors as selectors_lib  # noqa: E402
from gpo_jax.runtime import cpu  # noqa: E402

OUT_MD = os.path.join(REPO, "experiments", "BENCH_GROUPED.md")
OUT_JSON = os.path.join(REPO, "experiments", "bench_grouped.json")


def whole_response_logits(model, prompt_BxP, resp_BxNxT):
  """The former computation: each prompt repeated for its N responses, run whole;
  ``[B, N, T, V]`` logits predicting the response tokens."""
  b, n, t = resp_BxNxT.shape
  ctx = jnp.repeat(prompt_BxP, n, axis=0)
  tokens = jnp.concatenate([ctx, resp_BxNxT.reshape(b * n, t).astype(ctx.dtype)], axis=1)
  return model(tokens[:, :-1])[:, prompt_BxP.shape[1] - 1:].reshape(b, n, t, -1)


def whole_token_logprobs(model, prompt_BxP, resp_BxNxT):
  """Per-token log-probs from :func:`whole_response_logits`, ``[B, N, T]``."""
  b, n, t = resp_BxNxT.shape
  logits = whole_response_logits(model, prompt_BxP, resp_BxNxT).reshape(b * n, t, -1)
  tok = resp_BxNxT.reshape(b * n, t).astype(prompt_BxP.dtype)
  return logprobs.token_logprobs(logits, tok).reshape(b, n, t)


def whole_response_logprobs(model, prompt_BxP, resp_BxNxT, mask_BxNxT, length_normalize=False):
  b, n, t = resp_BxNxT.shape
  lp = whole_token_logprobs(model, prompt_BxP, resp_BxNxT).reshape(b * n, t)
  return logprobs.sequence_logprobs(lp, mask_BxNxT.reshape(b * n, t),
                                    length_normalize).reshape(b, n)


def setup(m: int, batch: int, k: int, lab: str = "small"):
  """The two algorithms' per-member losses, batches and hyper-parameters at the lab's shapes."""
  lc = LabConfig.from_dict(presets.lab_config(lab))
  cfg = lc.policy_config
  corpus = corpus_lib.Corpus(lc.corpus)
  t = lc.corpus.response_len
  graphdef, params, rest = nnx.split(model_lib.Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  ref = nnx.state(model_lib.Transformer(cfg, rngs=nnx.Rngs(1)), nnx.Param)
  rng = np.random.default_rng(0)
  vocab = (4, lc.corpus.vocab_size)
  prompts = rng.integers(*vocab, (batch, lc.corpus.prompt_len))
  prompt = jnp.asarray(corpus.context(prompts))
  d = min(2, lc.corpus.max_demos)        # Inverse-Q*'s guidance: 2 demonstrations
  guides = [corpus.context(prompts, rng.integers(*vocab, (batch, d, lc.corpus.prompt_len)),
                           rng.integers(*vocab, (batch, d, t))) for _ in range(2)]
  guide = jnp.asarray(np.stack(guides, axis=1))
  score_fn = lambda pr, ctx, resp, mask: pr["w"][:, None] * (  # noqa: E731
      jnp.sum(mask, -1) + jnp.sum((resp == 5) * mask, -1))[None]
  table = {k_: jnp.asarray(v) for k_, v in selectors_lib.build(("p0",)).table().items()}
  stacked = jax.tree.map(lambda x: jnp.stack([x] * m), params)
  om = online.make_members({"online": ("logistic",)}, (0.1,), (0.0,), (0,), (1e-3,),
                           n_train=64 * batch, batch_size=batch)
  pref = lambda sh, ctx, ya, ma, yb, mb: (  # noqa: E731  a stand-in preference: the longer
      jax.nn.sigmoid(jnp.sum(ma, -1) - jnp.sum(mb, -1)), jnp.sum(ma, -1), jnp.sum(mb, -1))
  ohp = {k_: jnp.stack([v[0]] * m) for k_, v in om.hparams().items()}
  algos = {
      "online DPO": (online.member_loss_fn(graphdef, rest, om.families, pref, response_len=t,
                                           mixture=False),
                     {"prompt": prompt, SHARED: {"ref": ref}}, ohp),
      "RLOO": (rloo.member_loss_fn(graphdef, rest, score_fn, k=k, response_len=t),
               {"prompt": prompt, SHARED: {"ref": ref, "proxies": {"w": jnp.asarray([0.1])},
                                           "selectors": table}},
               {"selector_idx": jnp.zeros(m, jnp.int32), "beta": jnp.full(m, 0.1)}),
      "Inverse-Q*": (inverse_q.member_loss_fn(graphdef, rest, k=k, response_len=t),
                     {"prompt": prompt, "guide": guide, SHARED: {"ref": ref}},
                     {"guidance_idx": jnp.zeros(m, jnp.int32), "beta": jnp.full(m, 1.0),
                      "kl_coef": jnp.full(m, 1.0)}),
  }
  # ICDPO's scoring of a best-of-n pool (``Runner.lp_per_context``): π_ref's log-probs of
  # ``pool_n`` samples per in-context prompt, 512 rows per call (ICDPOConfig.batch_size).
  pool_n = 64
  e_pool = max(1, 512 // pool_n)
  scoring = (jnp.asarray(np.resize(guide[:, 0], (e_pool, guide.shape[2]))),
             jnp.asarray(rng.integers(*vocab, (e_pool, pool_n, t)), jnp.int32),
             jnp.asarray(np.arange(t) < rng.integers(1, t + 1, (e_pool, pool_n, 1)), jnp.float32))
  shapes = {"lab": lab, "pool_n": pool_n, "pool_contexts": e_pool, "C": int(prompt.shape[1]), "C_g": int(guide.shape[2]), "T": t,
            "B": batch, "k": k, "M": m,
            "policy": f"d_model {cfg.d_model}, {cfg.n_layers} layers, d_ff {cfg.d_ff}, "
                      f"V {cfg.vocab_size}"}
  return algos, stacked, shapes, (graphdef, rest, ref, scoring)


def compile_variant(loss_fn, stacked, batch, hp, keys, whole: bool):
  step = jax.jit(jax.vmap(jax.value_and_grad(loss_fn, has_aux=True), in_axes=(0, None, 0, 0)))
  opts = cpu.compiler_options(jax.devices()[0].platform, "train")
  patches = (mock.patch.object(model_lib, "grouped_token_logprobs", whole_token_logprobs),
             mock.patch.object(model_lib, "grouped_response_logprobs", whole_response_logprobs),
             mock.patch.object(model_lib, "grouped_response_logits", whole_response_logits)
             ) if whole else ()
  for p in patches:
    p.start()
  try:
    return step.lower(stacked, batch, hp, keys).compile(compiler_options=opts)
  finally:
    for p in patches:
      p.stop()


def compile_scoring(graphdef, rest, ref, scoring, whole: bool):
  """ICDPO's pool scoring: ``grouped_response_logprobs`` of π_ref, or the whole sequences."""
  fn = whole_response_logprobs if whole else model_lib.grouped_response_logprobs
  step = jax.jit(lambda p, c, r, m: fn(nnx.merge(graphdef, p, rest), c, r, m))
  opts = cpu.compiler_options(jax.devices()[0].platform, "forward")
  return step.lower(ref, *scoring).compile(compiler_options=opts)


NAMES = ("online DPO", "RLOO", "Inverse-Q*", "ICDPO pool scoring")
VARIANTS = ("each prompt once", "whole sequences")


def run(m: int, batch: int, k: int, rounds: int, calls: int, lab: str = "small") -> dict:
  algos, stacked, shapes, (graphdef, rest, ref, scoring) = setup(m, batch, k, lab)
  keys = jax.random.split(jax.random.key(0), m)
  progs = {}
  for name, (loss_fn, b, hp) in algos.items():
    for variant in VARIANTS:
      c = compile_variant(loss_fn, stacked, b, hp, keys, variant == "whole sequences")
      progs[(name, variant)] = (c, (stacked, b, hp, keys))
  for variant in VARIANTS:
    c = compile_scoring(graphdef, rest, ref, scoring, variant == "whole sequences")
    progs[(NAMES[-1], variant)] = (c, (ref,) + scoring)
  outs = {key: jax.block_until_ready(c(*args)) for key, (c, args) in progs.items()}
  agree = {name: max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(outs[(name, VARIANTS[0])]), jax.tree.leaves(outs[(name, VARIANTS[1])])))
      for name in NAMES}
  times = {key: [] for key in progs}
  loads = [bench_sweep.load_avg()]
  for _ in range(rounds):
    for key, (c, args) in progs.items():
      ts = []
      for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(c(*args))
        ts.append(time.perf_counter() - t0)
      times[key].append(statistics.median(ts))
    loads.append(bench_sweep.load_avg())
  rows = []
  for (name, variant), (c, _) in progs.items():
    rows.append({"algorithm": name, "variant": variant, "ms": 1e3 * min(times[(name, variant)]),
                 "ms_rounds": [round(1e3 * x, 2) for x in times[(name, variant)]],
                 "xla_gflop": bench_sweep.xla_cost(c)["flops"] / 1e9})
  return {"shapes": shapes, "rows": rows, "agree": agree, "loads": loads,
          "machine": bench_sweep.machine_info(), "jax": jax.__version__,
          "rounds": rounds, "calls": calls}


def render(res: dict, command: str, wall_s: float) -> str:
  s = res["shapes"]
  by = {(r["algorithm"], r["variant"]): r for r in res["rows"]}
  mach = res["machine"]
  lines = [
      "# Grouped log-probs: online, RLOO, Inverse-Q* steps and ICDPO scoring, each prompt once vs whole sequences",
      "",
      f"Written by `experiments/bench_grouped.py` at "
      f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; what it measures: "
      "the script's docstring.",
      "",
      f"- **Command:** `{command}` (wall time {wall_s:.0f} s)",
      f"- **Machine:** {mach['cpu']}, {mach.get('cores', '?')} cores, JAX {res['jax']} "
      f"on `{mach.get('jax_device', 'cpu')}`.",
      f"- **Load average (1/5/15 min):** start {res['loads'][0]}, after each round "
      f"{res['loads'][1:]}.",
      f"- **Shapes:** M = {s['M']} members vmapped, B = {s['B']} prompts × k = {s['k']} samples, "
      f"contexts C = {s['C']}, guidance C_g = {s['C_g']}, T = {s['T']} new tokens "
      f"({s.get('lab', 'small')} lab); policy "
      f"{s['policy']}.",
      f"- **Timing:** {res['rounds']} interleaved rounds × median of {res['calls']} calls; each "
      "row its fastest round (all rounds listed).",
      "",
      f"- **ICDPO pool scoring:** π_ref's log-probs of {s['pool_n']} samples per in-context "
      f"prompt (C_g tokens), {s['pool_contexts']} prompts = {s['pool_n'] * s['pool_contexts']} "
      "rows per call, as `icdpo.Runner.lp_per_context` batches a best-of-n pool (the whole "
      "variant: what `Runner.lp` on repeated contexts ran); the forward programs' options.",
      "",
      "| algorithm | variant | XLA GFLOP per call | ms per call | every round (ms) | whole / once |",
      "|---|---|---:|---:|---|---:|",
  ]
  for name in NAMES:
    once, whole = by[(name, "each prompt once")], by[(name, "whole sequences")]
    for r in (once, whole):
      ratio = (f"**{whole['ms'] / once['ms']:.2f}×** time, {whole['xla_gflop'] / once['xla_gflop']:.2f}× FLOPs"
               if r is whole else "")
      lines.append(f"| {name} | {r['variant']} | {r['xla_gflop']:.2f} | {r['ms']:.1f} | "
                   f"{r['ms_rounds']} | {ratio} |")
  lines += ["", "Agreement of the two variants (same sampled tokens; max |difference| of the "
            "outputs: loss and gradients over members, or log-probs): " + "; ".join(
                f"{name}: {a:.1e}" for name, a in res["agree"].items()) + "."]
  notes = bench_sweep.contention_notes([], [x[0] for x in res["loads"]])
  lines += [""] + [f"- {n}" for n in notes] if notes else []
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--lab", default="small", help="lab preset whose shapes are used")
  ap.add_argument("--members", type=int, default=8)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--k", type=int, default=4)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--calls", type=int, default=5)
  ap.add_argument("--write", nargs="?", const=OUT_MD, default=None,
                  help=f"write the table (default {OUT_MD}) and its JSON beside it")
  args = ap.parse_args(argv)
  t0 = time.time()
  res = run(args.members, args.batch, args.k, args.rounds, args.calls, args.lab)
  command = "python experiments/bench_grouped.py " + " ".join(argv if argv is not None
                                                              else sys.argv[1:])
  md = render(res, command.strip(), time.time() - t0)
  json_path = (OUT_JSON if args.write == OUT_MD else
               os.path.splitext(args.write)[0] + ".json") if args.write else None
  bench_sweep.write_outputs(md, res, args.write, json_path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
