"""In-context alignment on the CPU lab, one command (SPEC §6, §7.7): ICDPO and Inverse-Q* (our reconstruction) beside offline GPO and best-of-n.

Run (``cpu``: 9 min 20 s on 2 CPU cores with the ``small`` lab already built — offline
2.8 min, Inverse-Q* 4.3 min, ICDPO 2 min; results in ``experiments/results/incontext``)::

  python -m gpo_jax.main --config configs/incontext.py --workdir runs/incontext

Stages (``gpo_jax/pipeline.py``), each resumable in ``<workdir>/<stage>``:

* ``offline``: offline GPO (DPO, IPO, SLiC) × β — the frontier the in-context methods are
  placed against (the same run as ``configs/online.py``'s offline stage);
* ``inverse_q``: Inverse-Q*-style token-level RL (:mod:`gpo_jax.algorithms.inverse_q`, a
  reconstruction: dense rewards from π_ref conditioned on two good retrieved
  demonstrations) × guidance retriever × β;
* ``icdpo``: ICDPO, an evaluation (no training, :mod:`gpo_jax.incontext.icdpo`): N
  candidates from π_ref(·|D⁺, x), the contrastive in-context score picks one; × N, k,
  retriever, contrast; with best-of-N by likelihood, by ICDPO's score on π_ref(·|x) samples
  and by gold (the ceiling) on the same prompts;
* ``icdpo_pool`` (only with ``icdpo_pool.run``, an RL-against-a-proxy run of
  ``configs/proxy_setting.py`` holding ``bon_pool.npz``): ICDPO's score as a best-of-n
  selector on that run's own π_ref pool (128 prompts × 1024 samples, regenerated from the
  lab and checked sample by sample against the stored gold), beside every proxy selector
  (:mod:`gpo_jax.incontext.pool_bon`); measured once: 33.6 min wall (16 min CPU) on 2 cores
  shared with other jobs, for 3 retrievers × 2 contrasts (regenerating the pool: 6.7 min of it);
* report ``<workdir>/report/incontext.md``: every method on one gold-vs-sqrt-KL figure,
  gold at matched KL with paired SEs, what in-context scoring buys over best-of-N. Runs named
  in ``compare.online`` / ``compare.rl_proxy`` (an online pipeline's ``online`` stage, the
  proxy setting's ``rl`` stage, on the same lab) are drawn beside them and matched by KL.

The committed ``experiments/results/incontext`` was made with the other pipelines' runs::

  python -m gpo_jax.main --config configs/incontext.py --workdir runs/incontext \
      --config.icdpo_pool.run=runs/proxy_setting/rl \
      --config.compare.online=runs/online/online --config.compare.rl_proxy=runs/proxy_setting/rl

All stages use the same 128 eval prompts, so every comparison is paired by prompt.
``arg``: ``cpu`` (default; the ``small`` coherent-gold lab shared with the main job) or
``tiny`` (the test lab).
"""

import ml_collections

from gpo_jax.run import presets

VARIANTS = ("cpu", "tiny")
#: measured wall time of the ``cpu`` variant on 2 CPU cores, the ``small`` lab prebuilt
RUNTIME_CPU = "9 min 20 s"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "cpu"
  if variant not in VARIANTS:
    raise ValueError(f"unknown incontext variant {variant!r}; choose one of {list(VARIANTS)}")
  tiny = variant == "tiny"
  lab = "tiny" if tiny else "small"
  n_prompts = 16 if tiny else 128
  evaluation = dict(every=10, n_prompts=n_prompts, samples_per_prompt=4,
                    ref_samples_per_prompt=16 if tiny else 64, member_chunk=4,
                    bon_n=(1, 4, 16) if tiny else (1, 4, 16, 64), gold_samples=True)
  steps = 20 if tiny else 150

  c = ml_collections.ConfigDict()
  c.pipeline = "incontext"
  c.lab = presets.base("gpo", lab, presets.gpo_eval()).lab
  c.lab.gold_kind = "coherent"
  c.lab_root = ""
  c.analyze = True

  off = presets.offline_gpo_stage(lab, evaluation, (0.1, 0.5) if tiny else (0.05, 0.2, 0.8), steps)

  iq = presets.base("inverse_q", lab, presets.gpo_eval(**evaluation))
  iq.inverse_q = ml_collections.ConfigDict(dict(
      k=2, samples_per_prompt=4, gold_quantile=0.25, retrieval_seed=0))
  iq.sweep = ml_collections.ConfigDict(dict(
      guidances=("random", "bm25", "embedding"), betas=(1.0, 4.0) if tiny else (1.0, 2.0, 4.0),
      kl_coefs=(1.0,), seeds=(0,), lrs=(1e-3,) if tiny else (3e-4,)))
  iq.train.update(dict(steps=steps, batch_size=8 if tiny else 16, warmup_steps=5,
                       log_every=10))
  iq.checkpoint.every = 10 if tiny else 50

  c.offline = off
  c.inverse_q = iq
  c.icdpo = ml_collections.ConfigDict(dict(
      ns=(1, 2, 4, 8, 16, 32), ks=(1, 2), retrievers=("random", "bm25", "embedding"),
      contrasts=("base", "bad"), gold_quantile=0.25, n_prompts=n_prompts,
      pool_per_prompt=32, ref_samples_per_prompt=32, n_test_pairs=0 if not tiny else 64,
      seed=0))
  # ICDPO's score on the proxy setting's own best-of-n pool (its RL run's bon_pool.npz; ""
  # skips the stage): every (retriever, contrast) at k = 2 against every proxy selector.
  c.icdpo_pool = ml_collections.ConfigDict(dict(
      run="", ks=(2,) if not tiny else (1,), retrievers=("random", "bm25", "embedding"),
      contrasts=("base", "bad")))
  # other methods' runs on the same lab, drawn on the report's figure and matched by KL
  c.compare = ml_collections.ConfigDict(dict(online="", rl_proxy=""))
  if tiny:
    for stage in (off, iq):
      stage.mesh.cpu_devices = 0
  c.lock()
  return c
