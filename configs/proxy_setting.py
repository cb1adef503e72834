"""Gao's proxy setting on the CPU lab, one command: proxy reward models of two sizes → RL (RLOO) and best-of-n against them → reports.

Run (measured 17 min 8 s on 2 CPU cores with the ``small`` lab already built, which the
main job shares; building it adds ~3.5 min; results in ``experiments/results/proxy_setting``)::

  python -m gpo_jax.main --config configs/proxy_setting.py --workdir runs/proxy_setting

Stages (``gpo_jax/pipeline.py``), each an ordinary resumable run in ``<workdir>/<stage>``:

* ``proxies_L1``, ``proxies_full``: Bradley–Terry proxies with π_ref's first block / all three
  blocks as trunk (two proxy sizes), hard labels, on 256 / 1024 / 4096 of the lab's pairs,
  seeds 0–3 (the four seeds of one data size form an ensemble);
* ``policies_dpo``: offline DPO (logistic, β_eff 0.1, 1024 pairs, 2 seeds); the final
  policies' implicit rewards ``log π − log π_ref`` join the proxies as best-of-n selectors
  (SPEC §5's like-for-like baseline);
* ``rl``: RLOO against a proxy (``rl.sweep.selectors``), KL coefficients
  ``rl.sweep.kl_coefs``; its π_ref pool (``eval.ref_samples_per_prompt`` per eval prompt,
  enough for best-of-n to reach ~6 nats) is scored by every proxy, so best-of-n against
  every single proxy and every ensemble objective (mean, WCO, UWO) is on the same prompts;
* reports: ``rl/report/report.md`` (the standard sweep report of the RL members) and
  ``rl/report/proxy.md`` (Gao's Figure 1 for best-of-n and RL, peaks vs proxy data and
  size, ensembles vs single proxies, best-of-n vs RL KL-efficiency; every finding with its
  test and power).

``arg``: ``cpu`` (default; the ``small`` lab with coherent gold, shared with the main job)
or ``tiny`` (the test lab, seconds per stage). Any stage field can be overridden, e.g.
``--config.rl.sweep.kl_coefs='(0.0,)'``; ``--config.lab.*`` applies to every stage.
"""

import ml_collections

from gpo_jax.lab import presets as lab_presets
from gpo_jax.run import presets

VARIANTS = ("cpu", "tiny")


def _proxies(lab: str, trunk_layers: int, data_sizes, seeds, steps: int, every: int,
             label_noises=(0.0,)):
  c = presets.base("reward_model", lab, presets.rm_eval(every=every, member_chunk=8))
  c.model = ml_collections.ConfigDict(dict(trunk_layers=trunk_layers))
  c.sweep = ml_collections.ConfigDict(dict(
      seeds=seeds, lrs=(1e-3,), gammas=(0.0,), label_noises=label_noises,
      data_sizes=data_sizes))
  c.train.update(dict(steps=steps, batch_size=32, warmup_steps=20))
  c.checkpoint.every = steps
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The locked pipeline config; ``arg`` in :data:`VARIANTS`."""
  variant = arg or "cpu"
  if variant not in VARIANTS:
    raise ValueError(f"unknown proxy_setting variant {variant!r}; choose one of {list(VARIANTS)}")
  tiny = variant == "tiny"
  lab = "tiny" if tiny else "small"
  c = ml_collections.ConfigDict()
  c.pipeline = "proxy_setting"
  c.lab = lab_presets.lab_config(lab)
  c.lab.unlock()
  c.lab.gold_kind = "coherent"
  c.lab_root = ""
  c.analyze = True
  sizes = (128, 0) if tiny else (256, 1024, 0)
  seeds = (0, 1) if tiny else (0, 1, 2, 3)
  steps = 40 if tiny else 400
  c.proxy_runs = ml_collections.ConfigDict({
      # tiny: also proxies trained on labels flipped with probability 0.2 (the noise knob)
      "proxies_L1": _proxies(lab, 1, sizes, seeds, steps, steps // 2,
                             (0.0, 0.2) if tiny else (0.0,)),
      "proxies_full": _proxies(lab, 0, sizes, seeds, steps, steps // 2),
  })
  # An offline DPO policy on the proxies' middle data size: its implicit reward is the
  # like-for-like best-of-n selector of SPEC §5 (and a proxy RL could optimise).
  dpo = presets.base("gpo", lab, presets.gpo_eval(
      every=steps // 4 if tiny else 75, n_prompts=16 if tiny else 64, samples_per_prompt=1,
      ref_samples_per_prompt=16, member_chunk=2, bon_n=(1, 4, 16)))
  dpo.sweep = ml_collections.ConfigDict(dict(
      families=("logistic",), beta_effs=(0.1,), betas=(), seeds=(0, 1), lrs=(3e-4,),
      gammas=(0.0,), data_sizes=(sizes[0] if tiny else 1024,)))
  dpo.train.steps = 30 if tiny else 150
  dpo.checkpoint.every = dpo.train.steps
  c.policy_runs = ml_collections.ConfigDict({"policies_dpo": dpo})
  rl = presets.base("rloo", lab, presets.gpo_eval(
      every=10 if tiny else 20, n_prompts=16 if tiny else 128,
      samples_per_prompt=4 if tiny else 8,
      ref_samples_per_prompt=64 if tiny else 1024, member_chunk=4,
      bon_n=(1, 2, 4, 8, 16, 32, 64) if tiny else (1, 4, 16, 64, 256, 1024)))
  n_small = sizes[0]
  rl.proxies = ml_collections.ConfigDict(dict(
      paths=(),                      # filled in by the pipeline (the proxy stages' dirs)
      singles=("*",),                # every proxy alone
      # ensembles of the seeds of one data size and size (Coste et al.: K members by seed)
      ensembles={f"L{n_layers}_n{n}": (f"L{n_layers}_n{n}_*",)
                 for n_layers in ((1, 2) if tiny else (1, 3))
                 for n in ((n_small,) if tiny else (1024,))},
      objectives=("mean", "wco", "uwo"),
      uwo_lambda=1.0))
  big = 2 if tiny else 3
  rl.sweep = ml_collections.ConfigDict(dict(
      selectors=(f"L{big}_n{n_small}_hard_s0", f"L{big}_n{n_small}/wco") if tiny else
      ("L3_n256_hard_s0", "L3_n1024_hard_s0", "L3_n1024/wco", "L3_n1024/uwo"),
      kl_coefs=(0.0, 0.1) if tiny else (0.0, 0.05),
      seeds=(0,),
      lrs=(1e-3,) if tiny else (2e-4,)))
  rl.rl = ml_collections.ConfigDict(dict(samples_per_prompt=4))
  rl.train.update(dict(steps=30 if tiny else 240, batch_size=16, warmup_steps=5,
                       log_every=10))
  rl.checkpoint.every = 10 if tiny else 40
  c.rl = rl
  if tiny:
    for stage in (*c.proxy_runs.values(), *c.policy_runs.values(), c.rl):
      stage.mesh.cpu_devices = 0      # tests run where the JAX backend is already up
  c.lock()
  return c
