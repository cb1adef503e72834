"""Online preference optimisation against offline GPO on the CPU lab, one command (SPEC §6, §7.5).

Run (``cpu``: 9 min 38 s on 2 CPU cores with the ``small`` lab already built — offline
stage 2.6 min, online stage 6.9 min; results in ``experiments/results/online``)::

  python -m gpo_jax.main --config configs/online.py --workdir runs/online

Stages (``gpo_jax/pipeline.py``), each an ordinary resumable run in ``<workdir>/<stage>``:

* ``offline``: offline GPO (DPO = logistic, IPO = squared, SLiC = hinge) on the lab's
  gold-labelled pairs, a β grid — the baseline;
* ``online``: online IPO / DPO / SLiC (two fresh samples per prompt each step, gold
  Bradley–Terry soft labels), IPO-MD and Nash-MD-PG (β_mix = 0.125, the paper's best), on
  the same β grid, the same prompts and the same number of steps;
* report ``online/report/online.md``: gold vs sqrt KL of every method on one frontier
  figure, the methods' gold at matched KL, and the head-to-head win-rate matrix of the
  final policies under the gold preference (each entry with a prompt-paired SE).

Both stages evaluate on the same eval prompts with the same number of samples and keep
every sample's gold (``eval.gold_samples``), which the win-rate matrix needs.

``arg``: ``cpu`` (default; the ``small`` lab with coherent gold, shared with the main job)
or ``tiny`` (the test lab, seconds per stage). Override any stage field, e.g.
``--config.online.sweep.betas='(0.1,)'``; ``--config.lab.*`` applies to both stages.
"""

import ml_collections

from gpo_jax.run import presets

VARIANTS = ("cpu", "tiny")
#: measured wall time of the ``cpu`` variant on 2 CPU cores, the ``small`` lab prebuilt
RUNTIME_CPU = "9 min 38 s"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The locked pipeline config; ``arg`` in :data:`VARIANTS`."""
  variant = arg or "cpu"
  if variant not in VARIANTS:
    raise ValueError(f"unknown online variant {variant!r}; choose one of {list(VARIANTS)}")
  tiny = variant == "tiny"
  lab = "tiny" if tiny else "small"
  evaluation = dict(every=10, n_prompts=16 if tiny else 128,
                    samples_per_prompt=4, ref_samples_per_prompt=16 if tiny else 64,
                    member_chunk=4, bon_n=(1, 4, 16) if tiny else (1, 4, 16, 64),
                    gold_samples=True)
  betas = (0.1, 0.5) if tiny else (0.05, 0.2, 0.8)
  steps = 20 if tiny else 150

  c = ml_collections.ConfigDict()
  c.pipeline = "online"
  c.lab = presets.base("gpo", lab, presets.gpo_eval()).lab
  c.lab.gold_kind = "coherent"
  c.lab_root = ""
  c.analyze = True

  off = presets.offline_gpo_stage(lab, evaluation, betas, steps)

  on = presets.base("online", lab, presets.gpo_eval(**evaluation))
  on.online = ml_collections.ConfigDict(dict(
      preference="gold",          # gold BT soft labels; "proxy" or "module:function"
      proxy="",                   # the selector when preference = "proxy"
      hard_labels=False,          # True: argmax labels (HF TRL's online DPO)
      nash_md_per_token=False))   # True: HF TRL's per-token Nash-MD estimator
  on.sweep = ml_collections.ConfigDict(dict(
      methods={"online": ("squared", "logistic", "hinge"), "ipo_md": ("squared",),
               "nash_md": ()},
      betas=betas, mixture_coefs=(0.125,), seeds=(0,), lrs=(3e-4,)))
  on.train.update(dict(steps=steps, batch_size=16, warmup_steps=5, log_every=10))
  on.checkpoint.every = 10 if tiny else 50
  c.offline = off
  c.online = on
  if tiny:
    for stage in (off, on):
      stage.mesh.cpu_devices = 0      # tests run where the JAX backend is already up
  c.lock()
  return c
