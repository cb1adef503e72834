"""Times HF ``transformers`` ``generate`` (KV cache, sampling) on a GPT-2 of the shape that bench_sampling.py exports.

Runs in its own virtual environment (PyTorch CPU wheel + transformers), never imported by
gpo_jax: bench_sampling.py starts it as a subprocess with ``--hf-python`` and reads the JSON
it writes, exactly as bench_sweep.py runs bench_trl.py.

Usage (normally done for you by bench_sampling.py)::

  /work/venv_trl/bin/python experiments/bench_hf_generate.py --data ctx.npz --out hf.json \
      --batches 32,256,1024 --threads 2

``ctx.npz`` holds ``context [N, C]`` (``[BOS] prompt [SEP]`` token ids; the first ``B`` rows
are used for batch size ``B``) and a JSON string ``meta`` with the policy shape
(``vocab_size``, ``d_model``, ``n_layers``, ``n_heads``, ``d_ff``, ``max_len``,
``tie_embeddings``) and ``response_len`` (``T``).

What is matched to the JAX sampler: the same context token ids, vocabulary, width, depth,
heads, MLP width and position table (``n_positions = max_len``); ``do_sample=True``,
temperature 1, ``top_k=0``, ``top_p=1`` (no filtering), ``use_cache=True``, float32,
``torch.inference_mode()``; exactly ``T`` new tokens per row (``eos_token_id=None``, so
``generate`` neither stops early nor masks EOS: the JAX sampler also runs all ``T``
positions whatever it samples). What differs, inherent to GPT-2: LayerNorm and biases
instead of RMSNorm without biases; random init (the speed of ``generate`` does not depend
on the weights once EOS cannot stop it).

For each batch size it times ``generate(max_new_tokens=T)`` (the whole call) and
``generate(max_new_tokens=1)`` (prefill and one sampled token); per decode step is their
difference over ``T - 1``.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

PAD, BOS, EOS = 0, 1, 3


def time_call(fn, min_s: float, min_calls: int = 3) -> dict:
  """Median (and min) seconds of ``fn()`` over a block of at least ``min_calls`` calls lasting ~``min_s``."""
  fn()  # warm-up
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  n = max(min_calls, int(min_s / max(first, 1e-6)))
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return {"s": statistics.median(times), "s_min": min(times), "calls": n}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data", required=True, help="contexts .npz written by bench_sampling.py")
  ap.add_argument("--out", required=True, help="JSON result path")
  ap.add_argument("--batches", default="32,256,1024", help="comma-separated batch sizes")
  ap.add_argument("--threads", type=int, default=0,
                  help="torch intra-op threads (0: torch's default, one per core)")
  ap.add_argument("--block-s", type=float, default=1.0, help="seconds per timed block")
  args = ap.parse_args(argv)
  batches = [int(b) for b in args.batches.split(",")]

  import torch
  import transformers
  from transformers import GPT2Config, GPT2LMHeadModel

  if args.threads > 0:
    torch.set_num_threads(args.threads)
  with np.load(args.data) as z:
    ctx_all = z["context"]
    meta = json.loads(str(z["meta"]))
  t, c = int(meta["response_len"]), ctx_all.shape[1]
  if max(batches) > ctx_all.shape[0]:
    raise SystemExit(f"{args.data} has {ctx_all.shape[0]} contexts; need {max(batches)}.")
  cfg = GPT2Config(
      vocab_size=meta["vocab_size"], n_positions=max(meta["max_len"], c + t),
      n_embd=meta["d_model"], n_layer=meta["n_layers"], n_head=meta["n_heads"],
      n_inner=meta["d_ff"], activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
      attn_pdrop=0.0, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
      tie_word_embeddings=bool(meta["tie_embeddings"]))
  torch.manual_seed(0)
  model = GPT2LMHeadModel(cfg).eval()
  by_batch = {}
  with torch.inference_mode():
    for b in batches:
      ids = torch.from_numpy(np.ascontiguousarray(ctx_all[:b]).astype(np.int64))
      mask = torch.ones_like(ids)

      def gen(n):
        return model.generate(
            ids, attention_mask=mask, do_sample=True, max_new_tokens=n, top_k=0, top_p=1.0,
            temperature=1.0, use_cache=True, pad_token_id=PAD, eos_token_id=None)

      out = gen(t)
      if tuple(out.shape) != (b, c + t):
        raise SystemExit(f"generate returned {tuple(out.shape)}, expected {(b, c + t)}")
      full = time_call(lambda: gen(t), args.block_s)
      first = time_call(lambda: gen(1), args.block_s / 2)
      by_batch[str(b)] = {
          "s_per_call": full["s"], "s_per_call_min": full["s_min"], "calls": full["calls"],
          "tokens_per_s": b * t / full["s"],
          "prefill_s": first["s"],
          "decode_step_s": max(full["s"] - first["s"], 0.0) / max(t - 1, 1),
      }
      print(f"HF generate B={b} threads={torch.get_num_threads()}: "
            f"{1e3 * full['s']:.1f} ms/call, {b * t / full['s']:.0f} tokens/s", flush=True)
  result = {
      "ok": True,
      "by_batch": by_batch,
      "response_len": t, "context_len": c,
      "n_params": int(sum(p.numel() for p in model.parameters())),
      "torch_threads": torch.get_num_threads(),
      "settings": (f"GPT2LMHeadModel.generate(input_ids, attention_mask, do_sample=True, "
                   f"max_new_tokens={t}, top_k=0, top_p=1.0, temperature=1.0, use_cache=True, "
                   "eos_token_id=None) under torch.inference_mode(), float32"),
      "versions": {"python": platform.python_version(), "torch": torch.__version__,
                   "transformers": transformers.__version__},
  }
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
