"""Times HF TRL's DPOTrainer on a GPT-2 config and the preference pairs that bench_sweep.py exports.

Runs in its own virtual environment (PyTorch CPU wheel + trl), never imported by gpo_jax:
bench_sweep.py starts it as a subprocess with ``--trl-python`` and reads the JSON it writes.

Usage (normally done for you by bench_sweep.py)::

  /work/venv_trl/bin/python experiments/bench_trl.py --data pairs.npz --out trl.json \
      --warmup 3 --steps 20

``pairs.npz`` holds ``prompt [N,P]``, ``chosen``/``rejected [N,T]``, their masks (1 up to
and including EOS) and a JSON string ``meta`` with the policy shape (``vocab_size``,
``d_model``, ``n_layers``, ``n_heads``, ``d_ff``, ``max_len``, ``tie_embeddings``) and the
training settings (``batch_size``, ``beta``, ``lr``, ``grad_clip``).

What is matched to the JAX step: the same token ids, vocabulary, width, depth, heads, MLP
width and position table; the same pairs per step; the same β, learning rate and
global-norm clip; float32 and no gradient checkpointing (TRL's defaults are bf16 and
checkpointing on); reference log-probs precomputed before training (our step reads them
from the dataset too); every batch padded to exactly ``P + T`` tokens (our step's length).
What differs, inherent to GPT-2: LayerNorm and biases instead of RMSNorm without biases,
and AdamW instead of Adam (weight decay 0 makes them the same update).

References:
  Rafailov et al. 2023, "Direct Preference Optimization", arXiv 2305.18290.
  von Werra et al., TRL, https://github.com/huggingface/trl.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

PAD, BOS, EOS = 0, 1, 3


def token_text(ids) -> str:
  """Token ids as a whitespace-separated word string the word-level tokenizer maps back exactly."""
  return " ".join(f"<{int(i)}>" for i in ids)


def make_tokenizer(vocab_size: int):
  """A word-level tokenizer whose word ``<i>`` is token id ``i`` (no merges, no added specials)."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  core = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token=f"<{PAD}>"))
  core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(
      tokenizer_object=core, pad_token=f"<{PAD}>", eos_token=f"<{EOS}>", bos_token=f"<{BOS}>")


def make_dataset(pairs: dict, n: int):
  """A TRL text preference dataset: prompt ids as words, completions up to and including EOS.

  Completions are written with a leading space so ``prompt + completion`` splits into the
  prompt's words followed by the completion's, as TRL's prefix check requires. A response
  that filled all ``T`` positions without EOS (π_ref samples may) gets an EOS word here, so
  TRL does not glue one on without a space; the collator's ``max_length = P + T`` then cuts
  it off again, leaving exactly the tokens the JAX step sees.
  """
  from datasets import Dataset

  rows = {"prompt": [], "chosen": [], "rejected": []}
  for i in range(n):
    rows["prompt"].append(token_text(pairs["prompt"][i]))
    for side in ("chosen", "rejected"):
      resp = pairs[side][i][pairs[f"{side}_mask"][i].astype(bool)]
      if resp.size == 0:
        raise ValueError(f"{side} response {i} has an empty mask; TRL needs a completion.")
      if resp[-1] != EOS:
        resp = np.append(resp, EOS)
      rows[side].append(" " + token_text(resp))
  return Dataset.from_dict(rows)


def torch_matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  """Best-of-``repeats`` float32 ``n x n @ n x n`` throughput of PyTorch on this CPU."""
  import torch

  a = torch.randn(n, n)
  b = torch.randn(n, n)
  a @ b
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best / 1e9


def step_times(ends: list[float], warmup: int, steps: int, t_start: float) -> dict:
  """Per-step timing from the step-end clock readings of a trainer callback: the median and
  mean of the ``steps`` gaps after ``warmup`` steps, and the first step's time (compile and
  setup)."""
  if len(ends) != warmup + steps:
    raise SystemExit(f"expected {warmup + steps} step callbacks, got {len(ends)}")
  dts = np.diff(ends[warmup - 1:])
  ms = 1e3 * statistics.median(dts)
  return {"ms_per_step": ms, "ms_per_step_mean": 1e3 * float(np.mean(dts)),
          "updates_per_s": 1e3 / ms, "steps_timed": int(dts.size), "warmup": warmup,
          "first_step_s": ends[0] - t_start}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data", required=True, help="pairs .npz written by bench_sweep.py")
  ap.add_argument("--out", required=True, help="JSON result path")
  ap.add_argument("--warmup", type=int, default=3, help="untimed first steps")
  ap.add_argument("--steps", type=int, default=20, help="timed steps after warm-up")
  args = ap.parse_args(argv)
  if args.warmup < 1 or args.steps < 2:
    raise SystemExit(f"need --warmup >= 1 and --steps >= 2, got {args.warmup}, {args.steps}")

  os.environ.setdefault("TQDM_DISABLE", "1")
  import torch
  import transformers
  import trl
  from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback
  from trl import DPOConfig, DPOTrainer

  with np.load(args.data) as z:
    pairs = {k: z[k] for k in z.files if k != "meta"}
    meta = json.loads(str(z["meta"]))
  bsz = int(meta["batch_size"])
  seq_len = pairs["prompt"].shape[1] + pairs["chosen"].shape[1]
  n_needed = bsz * (args.warmup + args.steps)
  if pairs["prompt"].shape[0] < n_needed:
    raise SystemExit(f"{args.data} has {pairs['prompt'].shape[0]} pairs; need "
                     f"batch_size*(warmup+steps)={n_needed}.")

  torch.manual_seed(0)
  gpt2 = GPT2Config(
      vocab_size=meta["vocab_size"], n_positions=max(meta["max_len"], seq_len),
      n_embd=meta["d_model"], n_layer=meta["n_layers"], n_head=meta["n_heads"],
      n_inner=meta["d_ff"], activation_function="gelu_new",
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      tie_word_embeddings=bool(meta["tie_embeddings"]),
      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
  model = GPT2LMHeadModel(gpt2)
  n_params = sum(p.numel() for p in model.parameters())

  dataset = make_dataset(pairs, n_needed)
  ends = []

  class StepClock(TrainerCallback):
    """Wall time at the end of every optimizer step (data loading and callbacks included)."""

    def on_step_end(self, args_, state, control, **kw):
      ends.append(time.perf_counter())

  with tempfile.TemporaryDirectory() as tmp:
    cfg = DPOConfig(
        output_dir=tmp, per_device_train_batch_size=bsz, max_steps=args.warmup + args.steps,
        learning_rate=float(meta["lr"]), lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=float(meta["grad_clip"]) or None,
        beta=float(meta["beta"]), loss_type=["sigmoid"],
        precompute_ref_log_probs=True, max_length=seq_len, pad_to_multiple_of=seq_len,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=0)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=dataset,
                         processing_class=make_tokenizer(meta["vocab_size"]),
                         callbacks=[StepClock()])
    batch = next(iter(trainer.get_train_dataloader()))
    t_start = time.perf_counter()
    trainer.train()
  result = {
      "ok": True,
      **step_times(ends, args.warmup, args.steps, t_start),
      "batch_input_shape": list(batch["input_ids"].shape),
      "n_params": int(n_params),
      "torch_threads": torch.get_num_threads(),
      "torch_matmul_gflops": torch_matmul_gflops(),
      "versions": {"python": platform.python_version(), "torch": torch.__version__,
                   "transformers": transformers.__version__, "trl": trl.__version__},
      "optim": str(cfg.optim),
  }
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
