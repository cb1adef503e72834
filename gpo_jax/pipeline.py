"""Multi-stage runs: Gao's proxy setting (proxy reward models → RL and best-of-n against them → reports) and the online-vs-offline comparison, each one command.

``pipeline = "online"`` (``configs/online.py``): an offline GPO stage ``offline`` and an
online stage ``online`` (:mod:`gpo_jax.algorithms.online`) on one lab, then the comparison
report (:mod:`gpo_jax.analysis.online`) under ``<workdir>/online/report``.

A pipeline config (``configs/proxy_setting.py``) has ``pipeline = "proxy_setting"``, one
``lab`` section shared by every stage, ``proxy_runs`` (named reward-model run configs,
e.g. one per proxy size), optionally ``policy_runs`` (offline GPO runs whose final
policies' implicit rewards ``log π − log π_ref`` become selectors too, SPEC §5) and ``rl``
(an ``rloo`` run config). The stages are ordinary runs
in ``<workdir>/<name>``, each with its own config.json, checkpoints and exact resume, so
rerunning the command after an interruption continues where it stopped and skips what is
done. The RL stage loads the proxy sets the reward-model stages exported
(``proxies.paths`` is filled in here) and samples the π_ref best-of-n pool, scored by every
proxy, on its eval prompts. Finally the RL run's standard report and the proxy-setting
report (:mod:`gpo_jax.analysis.proxy`) are written under ``<workdir>/rl/report``.
"""

import os

import ml_collections

from gpo_jax.run import loop
from gpo_jax.runtime import writers

STAGE_PREFIX_RL = "rl"


def _stage(config: ml_collections.ConfigDict, lab, lab_root: str, **extra):
  c = ml_collections.ConfigDict(config.to_dict())
  c.lab = ml_collections.ConfigDict(lab.to_dict())
  c.lab_root = lab_root
  c.analyze = False
  for k, v in extra.items():
    keys = k.split(".")
    node = c
    for key in keys[:-1]:
      node = node[key]
    node[keys[-1]] = v
  c.lock()
  return c


PIPELINES = ("proxy_setting", "online", "incontext")
STAGE_OFFLINE, STAGE_ONLINE = "offline", "online"
STAGE_INVERSE_Q, STAGE_ICDPO = "inverse_q", "icdpo"
STAGE_ICDPO_POOL = "icdpo_pool"
#: the incontext report draws these runs beside the in-context methods (``config.compare``)
COMPARE_FILE, COMPARE_KEYS = "compare.json", ("online", "rl_proxy")


def _lab_root(config, workdir: str) -> str:
  return config.lab_root or os.path.join(os.path.dirname(os.path.abspath(workdir)), "labs")


def stage_configs(config, workdir: str) -> dict[str, ml_collections.ConfigDict]:
  """``{stage dir name: run config}`` in run order."""
  kind = config.get("pipeline")
  if kind not in PIPELINES:
    raise ValueError(f"unknown pipeline {kind!r}; valid choices: {list(PIPELINES)}.")
  lab_root = _lab_root(config, workdir)
  if kind == "incontext":
    out = {}
    for name, want in ((STAGE_OFFLINE, "gpo"), (STAGE_INVERSE_Q, "inverse_q")):
      if config[name].get("algorithm") != want:
        raise ValueError(f"{name} has algorithm {config[name].get('algorithm')!r}; the "
                         f"incontext pipeline's {name} stage is a {want!r} run.")
      out[name] = _stage(config[name], config.lab, lab_root)
    return out
  if kind == "online":
    out = {}
    for name, want in ((STAGE_OFFLINE, "gpo"), (STAGE_ONLINE, "online")):
      if config[name].get("algorithm") != want:
        raise ValueError(f"{name} has algorithm {config[name].get('algorithm')!r}; the online "
                         f"pipeline's {name} stage is a {want!r} run.")
      out[name] = _stage(config[name], config.lab, lab_root)
    return out
  workdir = os.path.abspath(workdir)
  names = list(config.proxy_runs.keys())
  if not names:
    raise ValueError("proxy_runs is empty: name at least one reward-model run.")
  if STAGE_PREFIX_RL in names:
    raise ValueError(f"proxy_runs may not be named {STAGE_PREFIX_RL!r} (the RL stage's dir).")
  out = {}
  for name in names:
    rm = config.proxy_runs[name]
    if rm.get("algorithm") != "reward_model":
      raise ValueError(f"proxy_runs.{name} has algorithm {rm.get('algorithm')!r}; proxy runs "
                       "are reward_model runs.")
    out[name] = _stage(rm, config.lab, lab_root)
  # Offline GPO runs whose final policies' implicit rewards become selectors too.
  policy_runs = config.get("policy_runs") or {}
  for name in policy_runs.keys():
    if name in out or name == STAGE_PREFIX_RL:
      raise ValueError(f"policy_runs.{name} repeats a stage name; stage names must be unique.")
    g = policy_runs[name]
    if g.get("algorithm") != "gpo":
      raise ValueError(f"policy_runs.{name} has algorithm {g.get('algorithm')!r}; policy runs "
                       "are offline gpo runs.")
    g = ml_collections.ConfigDict(g.to_dict())
    g.export_implicit = True
    out[name] = _stage(g, config.lab, lab_root)
    names.append(name)
  paths = tuple(os.path.join(workdir, n) for n in names)
  out[STAGE_PREFIX_RL] = _stage(config.rl, config.lab, lab_root, **{"proxies.paths": paths})
  return out


def run(config, workdir: str, *, log=print, progress: bool = True) -> str:
  """Runs (or resumes) every stage, then writes the reports; returns the last stage's dir."""
  stages = stage_configs(config, workdir)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  for name, cfg in stages.items():
    log(f"== stage {name} ({cfg.algorithm})")
    loop.run(cfg, os.path.join(workdir, name), log=log, progress=progress)
  if config.pipeline == "incontext":
    icdpo_dir = run_icdpo(config, workdir, log=log)
    pool = config.get("icdpo_pool")
    if pool is not None and pool.get("run"):
      run_icdpo_pool(config, workdir, log=log)
    write_compare(config, workdir)
    if config.get("analyze", True):
      from gpo_jax import analysis
      from gpo_jax.analysis import incontext as incontext_report
      analysis.analyze(os.path.join(workdir, STAGE_INVERSE_Q))
      path = incontext_report.write(workdir, log=log)
      log(f"reports: {path}")
    return icdpo_dir
  if config.pipeline == "online":
    on_dir = os.path.join(workdir, STAGE_ONLINE)
    if config.get("analyze", True):
      from gpo_jax import analysis
      from gpo_jax.analysis import online as online_report
      analysis.analyze(on_dir)
      path = online_report.write(workdir, log=log)
      log(f"reports: {path}")
    return on_dir
  rl_dir = os.path.join(workdir, STAGE_PREFIX_RL)
  if config.get("analyze", True):
    from gpo_jax import analysis
    from gpo_jax.analysis import proxy as proxy_report
    analysis.analyze(rl_dir)
    proxy_report.analyze_proxy(rl_dir)
    log(f"reports: {os.path.join(rl_dir, 'report')}")
  return rl_dir


def write_compare(config, workdir: str) -> str | None:
  """``<workdir>/compare.json`` from ``config.compare`` (paths of other runs on the same lab,
  stored relative to the workdir); None when no run is named."""
  c = config.get("compare")
  spec = {k: c.get(k, "") for k in COMPARE_KEYS} if c is not None else {}
  bad = sorted(set(c.keys()) - set(COMPARE_KEYS)) if c is not None else []
  if bad:
    raise ValueError(f"compare: unknown keys {bad}; valid choices: {list(COMPARE_KEYS)}")
  spec = {k: v for k, v in spec.items() if v}
  if not spec:
    return None
  root = os.path.abspath(workdir)
  rel = {}
  for k, v in spec.items():
    d = os.path.abspath(v)
    if not os.path.exists(os.path.join(d, "metrics.jsonl")):
      raise FileNotFoundError(f"compare.{k}={v!r}: {d} is not a run directory (no metrics.jsonl)")
    rel[k] = os.path.relpath(d, root)
  path = os.path.join(root, COMPARE_FILE)
  return writers.save_json_atomic(path, rel, indent=1, sort_keys=True)


def _incontext_lab(config, workdir: str, log):
  """The pipeline's lab and the directory its retrievals are stored in (beside the lab)."""
  from gpo_jax import lab as lab_lib
  lab_root = _lab_root(config, workdir)
  lab = lab_lib.build_or_load(lab_lib.LabConfig.from_dict(config.lab.to_dict()), lab_root,
                              log=log)
  return lab, os.path.join(lab_root, "retrieval", os.path.basename(lab.path))


def run_icdpo_pool(config, workdir: str, *, log=print) -> str:
  """ICDPO's score on the proxy setting's π_ref pool (``config.icdpo_pool.run``, an RL run
  with ``bon_pool.npz``): ``<workdir>/icdpo_pool`` (:mod:`gpo_jax.incontext.pool_bon`)."""
  from gpo_jax.incontext import pool_bon
  out = os.path.join(os.path.abspath(workdir), STAGE_ICDPO_POOL)
  if os.path.exists(os.path.join(out, pool_bon.OUT_JSON)):
    log(f"== stage {STAGE_ICDPO_POOL}: done already ({out})")
    return out
  log(f"== stage {STAGE_ICDPO_POOL} (evaluation on {config.icdpo_pool.run})")
  lab, retrieval_dir = _incontext_lab(config, workdir, log)
  c, p = config.icdpo, config.icdpo_pool
  return pool_bon.run(lab, p.run, out, ks=tuple(p.ks), retrievers=tuple(p.retrievers),
                      contrasts=tuple(p.contrasts), seed=int(c.seed),
                      gold_quantile=float(c.gold_quantile), retrieval_dir=retrieval_dir, log=log)


def run_icdpo(config, workdir: str, *, log=print) -> str:
  """The ICDPO stage of the incontext pipeline: an evaluation (no training) written to
  ``<workdir>/icdpo`` (:func:`gpo_jax.incontext.icdpo.save`); skipped when it is there."""
  from gpo_jax.incontext import icdpo
  out = os.path.join(os.path.abspath(workdir), STAGE_ICDPO)
  if os.path.exists(os.path.join(out, icdpo.INFO_FILE)):
    log(f"== stage {STAGE_ICDPO}: done already ({out})")
    return out
  log(f"== stage {STAGE_ICDPO} (evaluation)")
  lab, retrieval_dir = _incontext_lab(config, workdir, log)
  c = config.icdpo
  cfg = icdpo.ICDPOConfig(
      ns=tuple(c.ns), ks=tuple(c.ks), retrievers=tuple(c.retrievers),
      contrasts=tuple(c.contrasts), gold_quantile=float(c.gold_quantile),
      n_prompts=int(c.n_prompts), pool_per_prompt=int(c.pool_per_prompt),
      ref_samples_per_prompt=int(c.ref_samples_per_prompt), n_test_pairs=int(c.n_test_pairs),
      seed=int(c.seed))
  result = icdpo.evaluate(lab, cfg, retrieval_dir=retrieval_dir, log=log)
  return icdpo.save(result, out)
