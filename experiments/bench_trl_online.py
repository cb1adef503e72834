"""Times HF TRL's OnlineDPOTrainer on a GPT-2 policy and the prompts that bench_online.py exports.

Runs in its own virtual environment (PyTorch CPU wheel + trl), never imported by gpo_jax:
bench_online.py starts it as a subprocess with ``--trl-python`` and reads the JSON it writes.

Usage (normally done for you by bench_online.py)::

  /work/venv_trl/bin/python experiments/bench_trl_online.py --data prompts.npz --out trl.json \
      --warmup 3 --steps 20

``prompts.npz`` holds ``prompt [N, C]`` (contexts ``[BOS] prompt [SEP]`` as token ids) and a
JSON string ``meta`` with the policy shape (``vocab_size``, ``d_model``, ``n_layers``,
``n_heads``, ``d_ff``, ``max_len``, ``tie_embeddings``), the gold network's shape (``gold``:
``d_model``, ``n_layers``, ``n_heads``, ``d_ff``, ``max_len``) and the training settings
(``batch_size``, ``beta``, ``lr``, ``grad_clip``, ``response_len``).

What is matched to the JAX step: the same token ids (prompts are written as ``<id>`` words
of a word-level tokenizer that maps them back exactly), vocabulary, width, depth, heads and
MLP width; the same prompts per step; two completions per prompt of at most
``response_len`` new tokens sampled at temperature 1 with no top-k / top-p filtering (TRL's
default temperature is 0.9); a reward model of the gold network's shape scoring all
``2B`` completions; the same β, learning rate and global-norm clip; float32 and no gradient
checkpointing (TRL's defaults are bf16 and checkpointing on); HF ``generate`` on the CPU
(no vLLM). What differs, inherent to the setup: GPT-2 has LayerNorm and biases; the policy
and reward model are randomly initialised (speed does not depend on the weights, except
that ``generate`` stops early once every row has emitted EOS, which a random 32-token
policy practically never does within 12 tokens); TRL's preference is the reward model's
hard argmax (its online DPO), ours a soft Bradley–Terry label (same cost); AdamW with
weight decay 0 is Adam.

References:
  Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv 2402.04792.
  von Werra et al., TRL, https://github.com/huggingface/trl.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_trl import (BOS, EOS, PAD, make_tokenizer, step_times, token_text,  # noqa: E402
                       torch_matmul_gflops)


def online_dpo_classes():
  """``(OnlineDPOConfig, OnlineDPOTrainer, import path)`` from wherever this TRL keeps them."""
  try:
    from trl import OnlineDPOConfig, OnlineDPOTrainer
    return OnlineDPOConfig, OnlineDPOTrainer, "trl.OnlineDPOTrainer"
  except ImportError:
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
    return OnlineDPOConfig, OnlineDPOTrainer, "trl.experimental.online_dpo.OnlineDPOTrainer"


def prompt_texts(prompts, n: int) -> list[str]:
  """Contexts as word strings; the trailing space keeps ``prompt + completion`` word-split."""
  return [token_text(prompts[i]) + " " for i in range(n)]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data", required=True, help="prompts .npz written by bench_online.py")
  ap.add_argument("--out", required=True, help="JSON result path")
  ap.add_argument("--warmup", type=int, default=3, help="untimed first steps")
  ap.add_argument("--steps", type=int, default=20, help="timed steps after warm-up")
  ap.add_argument("--threads", type=int, default=0,
                  help="torch intra-op threads (0: torch's default, one per core)")
  args = ap.parse_args(argv)
  if args.warmup < 1 or args.steps < 2:
    raise SystemExit(f"need --warmup >= 1 and --steps >= 2, got {args.warmup}, {args.steps}")

  os.environ.setdefault("TQDM_DISABLE", "1")
  os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
  import torch
  import transformers
  import trl
  from datasets import Dataset
  from transformers import (GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel,
                            TrainerCallback)

  if args.threads > 0:
    torch.set_num_threads(args.threads)
  Config, Trainer, trainer_path = online_dpo_classes()
  with np.load(args.data) as z:
    prompts = z["prompt"]
    meta = json.loads(str(z["meta"]))
  bsz, t = int(meta["batch_size"]), int(meta["response_len"])
  c = prompts.shape[1]
  n_needed = bsz * (args.warmup + args.steps)
  if prompts.shape[0] < n_needed:
    raise SystemExit(f"{args.data} has {prompts.shape[0]} prompts; need "
                     f"batch_size*(warmup+steps)={n_needed}.")

  def gpt2(shape, **kw):
    return GPT2Config(
        vocab_size=meta["vocab_size"], n_positions=max(shape["max_len"], c + t),
        n_embd=shape["d_model"], n_layer=shape["n_layers"], n_head=shape["n_heads"],
        n_inner=shape["d_ff"], activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, **kw)

  torch.manual_seed(0)
  model = GPT2LMHeadModel(gpt2(meta, tie_word_embeddings=bool(meta["tie_embeddings"])))
  reward = GPT2ForSequenceClassification(gpt2(meta["gold"], num_labels=1))
  tok = make_tokenizer(meta["vocab_size"])
  dataset = Dataset.from_dict({"prompt": prompt_texts(prompts, n_needed)})
  ends, lens = [], []

  class StepClock(TrainerCallback):
    """Wall time at the end of every optimizer step (generation and scoring included)."""

    def on_step_end(self, args_, state, control, **kw):
      ends.append(time.perf_counter())

  settings = dict(
      per_device_train_batch_size=bsz, max_steps=args.warmup + args.steps,
      learning_rate=float(meta["lr"]), lr_scheduler_type="constant", warmup_steps=0,
      weight_decay=0.0, max_grad_norm=float(meta["grad_clip"]) or None,
      beta=[float(meta["beta"])], loss_type="sigmoid", max_new_tokens=t, max_length=c + t,
      temperature=1.0, top_k=0, top_p=1.0, use_vllm=False,
      bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
      logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True,
      dataloader_num_workers=0, seed=0)
  with tempfile.TemporaryDirectory() as tmp:
    cfg = Config(output_dir=tmp, **settings)
    trainer = Trainer(model=model, reward_funcs=reward, args=cfg, train_dataset=dataset,
                      processing_class=tok, reward_processing_classes=tok,
                      callbacks=[StepClock()])
    # Completion lengths, read off the generate call (a wrapper, not a change to the step).
    generate = trainer._generate

    def measured(*a, **kw):
      out = generate(*a, **kw)
      lens.append(float(out[3].sum(dim=1).float().mean()))
      return out

    trainer._generate = measured
    t_start = time.perf_counter()
    trainer.train()
  result = {
      "ok": True,
      "trainer": trainer_path,
      **step_times(ends, args.warmup, args.steps, t_start),
      "n_params": int(sum(p.numel() for p in model.parameters())),
      "n_params_reward": int(sum(p.numel() for p in reward.parameters())),
      "reward_arg": "reward_funcs=GPT2ForSequenceClassification(...)",
      "settings": (f"{bsz} prompts per step, 2 completions each (`num_generations` is fixed at "
                   f"2), max_new_tokens={t}, temperature=1.0, top_k=0, top_p=1.0, "
                   f"max_length={c + t}, loss_type=sigmoid, β={meta['beta']}, "
                   f"lr={meta['lr']} constant, max_grad_norm={meta['grad_clip']}, "
                   "bf16=False, gradient_checkpointing=False, use_vllm=False, use_cpu=True"),
      "mean_completion_len": round(float(np.mean(lens)), 2) if lens else None,
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
