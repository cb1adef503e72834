"""The lab variants (SPEC §3): ``tiny`` (tests), ``small`` (the CPU lab of the experiments), ``large`` (accelerators).

``configs/lab.py`` and every run config take their lab section from :func:`lab_config`, so
the variants are defined once. Statistics of the built ``small`` lab are in README.md.
"""

import ml_collections


VARIANTS = ("tiny", "small", "large")


def lab_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The locked lab config of ``variant`` in :data:`VARIANTS` (default ``small``)."""
  variant = variant or "small"
  if variant not in VARIANTS:
    raise ValueError(f"unknown lab variant {variant!r}; choose one of {list(VARIANTS)}")

  c = ml_collections.ConfigDict()
  c.name = variant
  c.seed = 0

  c.corpus = ml_collections.ConfigDict(dict(
      vocab_size=32, n_styles=4, prompt_len=6, response_len=12, max_demos=2,
      style_alpha=0.05, topic_alpha=0.5, eos_hazard_min=0.08, eos_hazard_max=0.3, seed=0))

  # π_ref: trained on whole episodes (k = 0, 1, 2 demonstrations, equally likely).
  c.policy = ml_collections.ConfigDict(dict(d_model=64, n_layers=3, n_heads=4, d_ff=256))
  c.sft_steps = 1000
  c.sft_batch = 64
  c.sft_lr = 3e-3
  c.sft_warmup = 100
  c.sft_weight_decay = 0.01
  c.sft_eval_every = 200
  c.sft_eval_episodes = 512

  # Gold: a fixed, randomly initialised reward model, larger than any proxy. Weights are
  # scaled by gold_init_scale (sharper, more nonlinear attention than the 0.02 default)
  # and position embeddings by gold_pos_scale (0: length enters only through content).
  c.gold = ml_collections.ConfigDict(dict(d_model=128, n_layers=4, n_heads=4, d_ff=512))
  c.gold_init_scale = 3.0
  c.gold_pos_scale = 0.0
  c.gold_norm_samples = 4096
  # "network": the network alone; "coherent": + weight * standardised exact log-likelihood
  # under the true style mixture - penalty for ending at the cap without EOS (lab/gold.py).
  c.gold_kind = "network"
  c.gold_coherence_weight = 1.0
  c.gold_cap_penalty = 1.0

  # Preference data: two π_ref samples per prompt (no demonstrations in context), labelled
  # by gold Bradley-Terry P(a > b) = sigmoid((g_a - g_b) / label_temp); hard_labels takes
  # the gold argmax instead; label_flip flips each label with that probability.
  c.n_train_pairs = 4096
  c.n_test_pairs = 512
  c.n_eval_prompts = 256
  c.label_temp = 1.0
  c.hard_labels = False
  c.label_flip = 0.0
  c.sample_temperature = 1.0

  # Statistics (ICL gain, gold by style) and the fixed batch of every jitted pass.
  c.n_stat_episodes = 1024
  c.batch_size = 512

  if variant == "tiny":
    c.policy = ml_collections.ConfigDict(dict(d_model=32, n_layers=2, n_heads=2, d_ff=64))
    c.gold = ml_collections.ConfigDict(dict(d_model=48, n_layers=2, n_heads=2, d_ff=96))
    c.sft_steps = 400
    c.sft_batch = 32
    c.sft_lr = 1e-2
    c.sft_warmup = 40
    c.sft_eval_every = 100
    c.sft_eval_episodes = 256
    c.gold_norm_samples = 1024
    c.n_train_pairs = 512
    c.n_test_pairs = 256
    c.n_eval_prompts = 64
    c.n_stat_episodes = 1024
    c.batch_size = 256
  elif variant == "large":
    c.corpus.vocab_size = 64
    c.corpus.n_styles = 8
    c.corpus.prompt_len = 8
    c.corpus.response_len = 24
    c.policy = ml_collections.ConfigDict(dict(d_model=256, n_layers=6, n_heads=8, d_ff=1024))
    c.gold = ml_collections.ConfigDict(dict(d_model=512, n_layers=8, n_heads=8, d_ff=2048))
    c.sft_steps = 20000
    c.sft_batch = 256
    c.sft_lr = 1e-3
    c.sft_warmup = 500
    c.sft_eval_every = 1000
    c.sft_eval_episodes = 2048
    c.gold_norm_samples = 16384
    c.n_train_pairs = 65536
    c.n_test_pairs = 4096
    c.n_eval_prompts = 1024
    c.n_stat_episodes = 4096
    c.batch_size = 1024

  c.lock()
  return c
