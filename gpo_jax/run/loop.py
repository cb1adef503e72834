"""The train/eval/checkpoint loop of any algorithm: config → lab → members → compiled step → metrics, checkpoints, report.

The run is resumable: starting the same command on an existing workdir restores the newest
valid checkpoint and continues; a run killed at any point and resumed writes the same
``metrics.jsonl`` as an uninterrupted one (batches and sampling keys depend only on the
member seed and the step). Outputs follow ARCHITECTURE.md "Metrics on disk".
"""

import dataclasses
import json
import logging
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gpo_jax import lab as lab_lib
from gpo_jax.engine import program
from gpo_jax.run import config as config_lib
from gpo_jax.run import guard
from gpo_jax.runtime import checkpoint as ckpt_lib
from gpo_jax.runtime import cpu as cpu_lib
from gpo_jax.runtime import distributed
from gpo_jax.runtime import sharding
from gpo_jax.runtime import writers as writers_lib

# Failures a user can act on: the CLI prints their message without a traceback.
EXPECTED_ERRORS = (ValueError, guard.RunError, lab_lib.LabError, ckpt_lib.CheckpointError)

METRICS = writers_lib.METRICS_FILE
CONFIG = "config.json"
MANIFEST = "manifest.json"


@dataclasses.dataclass
class Setup:
  """Everything a run (or a benchmark) builds before its first step."""
  algorithm: Any
  lab: Any
  members: Any
  mesh: Any
  graphdef: Any
  rest: Any
  params: Any              # one member's initial parameters, replicated on the mesh
  init_fn: Callable        # params -> stacked sweep state
  abstract_state: Any
  state_shardings: Any
  step_fn: Callable        # the jitted sweep step
  hparams: Any             # traced [M] hyperparameters on the mesh
  data: Any                # the training arrays on the mesh
  train_step: Callable | None = None   # the step before jax.jit (benchmarks re-jit it)


def setup(config, lab, *, log: Callable[[str], None] = logging.info,
          on_trace: Callable[[], None] | None = None) -> Setup:
  """Builds the members, the mesh, the initial state's shardings and the jitted step.

  Shared by :func:`run` and the benchmarks, so both compile the same program.
  """
  algo = config_lib.algorithm(config)
  data_np = algo.train_data(lab, config)
  n_train = int(next(v for k, v in data_np.items() if k != program.SHARED).shape[0])
  tcfg = config_lib.train_config(config)
  members = algo.members(config, n_train)
  mesh = sharding.make_mesh(config_lib.mesh_dict(config), num_members=members.size,
                            batch_size=tcfg.batch_size)
  graphdef, params, rest = nnx.split(algo.model(lab, config), nnx.Param, ...)
  replicated = NamedSharding(mesh, PartitionSpec())
  member_sh = NamedSharding(mesh, PartitionSpec(sharding.SWEEP))
  # The lab's weights sit on one local device; the jitted init needs them on the whole mesh.
  params = distributed.put(params, replicated)
  init_member = algo.init_member(config)
  init_fn = lambda p: program.init_state(p, members, tcfg, init_member)  # noqa: E731
  abstract = jax.eval_shape(init_fn, params)
  state_sh = program.state_shardings(abstract, mesh, config.mesh.preset)
  # A preset that leaves too much of the state replicated fails here, before compiling.
  report = sharding.check_replication(abstract, state_sh, mesh, config.mesh.preset)
  log(f"mesh {dict(mesh.shape)}, preset {config.mesh.preset}: "
      f"{report.fraction:.1%} of the state replicated within a member group")
  # Each member's batch over `data`; under presets that shard weights over `data` (fsdp,
  # fsdp_tp) the weights are gathered at use. A no-op on meshes with data = 1 (the CPU runs).
  gather = sharding.get_preset(config.mesh.preset).rules.get("embed") == sharding.DATA
  loss = program.place_on_data(algo.loss_fn(graphdef, rest, members, config), mesh,
                               state_sh["params"] if gather else None)
  step = program.make_train_step(
      loss, tcfg,
      member_groups=int(mesh.shape[sharding.SWEEP]),
      member_chunk=config_lib.member_chunk(config), on_trace=on_trace)
  return Setup(algorithm=algo, lab=lab, members=members, mesh=mesh, graphdef=graphdef,
               rest=rest, params=params, init_fn=init_fn, abstract_state=abstract,
               state_shardings=state_sh, step_fn=program.jit_train_step(step, state_sh, mesh),
               hparams=distributed.put(members.hparams(), member_sh),
               data=distributed.put(data_np, replicated), train_step=step)


def _check_config_json(config, workdir: str, primary: bool, log) -> list[str]:
  """Refuses a workdir made by a config that changes results; returns the layout keys changed."""
  cfg_path = os.path.join(workdir, CONFIG)
  new = json.loads(config_lib.to_json(config))
  changed: list[str] = []
  if os.path.exists(cfg_path):
    old = guard.read_json(cfg_path, "the run's config", "Restore it from a backup (the "
                          "checkpoints record the config too) or use a new --workdir.")
    changed = guard.compare_configs(old, new, f"{workdir} ({CONFIG})")
    if changed:
      log(f"resuming with changed layout keys {changed}: results are unaffected")
  # Every process compares before process 0 writes, so none reads a half-written file.
  distributed.barrier("config-checked")
  if primary and not os.path.exists(cfg_path):
    config_lib.write_config_json(config, workdir, CONFIG)
  return changed


def run(config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None,
        log: Callable[[str], None] = logging.info, progress: bool = True) -> str:
  """Trains and evaluates the sweep of ``config`` in ``workdir`` (resuming if possible).

  Args:
    config: a run config (``configs/*.py``; shared sections from ``gpo_jax.run.presets``).
    workdir: run directory.
    stop_at: stop abruptly after this many steps, without a final checkpoint or
      evaluation (tests use it to simulate a killed run).
    log: logging callable.
    progress: show a tqdm progress bar.

  Returns:
    The absolute workdir.
  """
  t_start = time.time()
  if not str(workdir).strip():
    raise guard.RunError("--workdir is empty (an unset shell variable?); refusing to turn the "
                         "current directory into a run directory.")
  # The CPU device count and multi-host initialisation must precede every device query
  # (validation counts devices).
  cpu_lib.configure_devices(config.mesh.cpu_devices, config_lib.member_count(config), log=log)
  distributed.maybe_initialize(config.distributed)
  config_lib.validate(config)
  workdir = os.path.abspath(workdir)
  primary = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  with guard.workdir_lock(workdir, enabled=primary):
    return _run_locked(config, workdir, primary, t_start, stop_at=stop_at, log=log,
                       progress=progress)


def check_data_position(restored) -> None:
  """A restored step whose recorded data position is not the step is a corrupt step."""
  if restored.metadata.get("data_position") != restored.step:
    raise ckpt_lib.CheckpointError(
        f"step {restored.step}: data position {restored.metadata.get('data_position')} "
        "differs from the step")


def _run_locked(config, workdir, primary, t_start, *, stop_at, log, progress) -> str:
  layout_changes = _check_config_json(config, workdir, primary, log)
  config_json = json.loads(config_lib.to_json(config))

  lab_root = config.lab_root or os.path.join(os.path.dirname(workdir), "labs")
  lab = lab_lib.build_or_load(lab_lib.LabConfig.from_dict(config.lab), lab_root, log=log)
  s = setup(config, lab, log=log)
  members, algo = s.members, s.algorithm
  replicated = NamedSharding(s.mesh, PartitionSpec())

  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               save_every=config.checkpoint.every, keep=config.checkpoint.keep)
  last_train: dict[str, list] = {}
  if ckpt.latest_step() is not None:
    try:
      restored = ckpt.restore(sharding.shape_dtype_structs(
          program._strip(s.abstract_state), s.state_shardings),
          validate=check_data_position)
      # The checkpoint's own record of its config: a run whose config.json was lost or
      # replaced cannot resume another config's state under new labels.
      guard.compare_configs(restored.metadata.get("config", {}),
                            guard.result_keys(config_json),
                            f"checkpoint step {restored.step} in {workdir}")
    except BaseException:
      ckpt.close()
      raise
    state, start = restored.state, restored.step
    last_train = restored.metadata.get("last_train", {})
    log(f"resuming from step {start}")
  else:
    state = jax.jit(s.init_fn, out_shardings=s.state_shardings)(s.params)
    start = 0

  evaluator = algo.evaluator(lab, s.graphdef, s.rest, members, config, replicated)
  t_ref = time.perf_counter()
  if primary:
    for name, payload in evaluator.artifacts().items():
      write_artifact(os.path.join(workdir, name), payload)
  else:
    evaluator.artifacts()
  # Where the wall time goes (manifest.json "timings"): the one-time π_ref pool, every
  # evaluation (timed after the pending train steps are done, so it is evaluation alone),
  # and the train/eval loop as a whole.
  timings = {"reference_s": time.perf_counter() - t_ref, "eval_s": 0.0, "evaluations": 0}

  # Rows from the resumed step on are recomputed (identically), so drop them first.
  writer = writers_lib.MetricsWriter(workdir, resume_step=start - 1 if start else None,
                                     log=log)
  steps, every = config.train.steps, config.eval.every
  missing = writer.missing_steps([st for st in range(start) if st % every == 0],
                                 members.size) if start else []
  if missing:
    log(f"WARNING: metrics.jsonl lacks rows of eval steps {missing} before the resume step "
        f"{start} (was the file deleted or replaced during an earlier run?). They cannot be "
        "recomputed from the checkpoint; manifest.json records them as missing.")
  # Per-step train metrics stay on device and go to TensorBoard in blocks, so logging them
  # never stalls the asynchronous dispatch of the next steps.
  pending: list[tuple[int, dict]] = []

  def flush_train():
    for st, m in pending:
      writer.write_train(st, {k: distributed.to_host(v) for k, v in m.items()})
    pending.clear()
  bar = None
  if progress and primary:
    from tqdm import tqdm
    bar = tqdm(total=steps, initial=start, desc=os.path.basename(workdir), dynamic_ncols=True)
  best = ""
  key = algo.headline_metric
  result_config = guard.result_keys(config_json)

  # Orbax writes the state plus a little metadata; keep a margin for the temporary copy.
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(s.abstract_state))
  need = int(1.2 * state_bytes / jax.process_count()) + (1 << 16)
  last_saved = [start]

  def save(step_done, metrics, force):
    nonlocal last_train
    flush_train()
    last_train = {k: distributed.to_host(v).tolist() for k, v in metrics.items()}
    hint = f"the run resumes exactly from step {last_saved[0]}."
    try:
      ckpt.wait_until_finished()   # the previous save's space is taken before measuring
      guard.check_free_space(ckpt.directory, need, f"checkpoint step {step_done}", hint)
      ckpt.save(step_done, state, force=force, metadata={
          "data_position": step_done, "last_train": last_train, "config": result_config})
    except guard.DiskFullError:
      raise
    except Exception as e:
      if guard.is_disk_full(e):
        raise guard.DiskFullError(f"disk full while writing checkpoint step {step_done} in "
                                  f"{ckpt.directory}; free space and rerun: {hint}") from None
      raise
    last_saved[0] = step_done

  t_loop = time.perf_counter()
  with guard.StopSignals() as stop:
    try:
      for step in range(start, steps + 1):
        if step % every == 0 or step == steps:
          per_prompt: dict = {}
          jax.block_until_ready(state)
          t_eval = time.perf_counter()
          rows = eval_rows(evaluator, members, state, s.hparams, step, last_train,
                           train_keys=("loss", "grad_norm") + tuple(algo.row_metrics),
                           label_temp=lab.cfg.label_temp, per_prompt=per_prompt)
          dt = time.perf_counter() - t_eval
          if not timings["evaluations"]:
            timings["first_eval_s"] = dt   # includes compiling the evaluation program
          timings["eval_s"] += dt
          timings["evaluations"] += 1
          writer.write(rows)
          if per_prompt:
            writer.write_per_prompt(step, per_prompt)
          top = max((r for r in rows if r.get(key) is not None and math.isfinite(r[key])),
                    key=lambda r: r[key], default=None)
          if top is not None:
            best = algo.describe(top)
            if bar is not None:
              bar.set_postfix_str(f"best {best}")
        if step == steps:
          break
        if stop_at is not None and step >= stop_at:
          return workdir
        state, metrics = s.step_fn(state, s.hparams, s.data)
        last_train = metrics
        pending.append((step + 1, metrics))
        if (step + 1) % config.train.log_every == 0:
          flush_train()
        if ckpt.should_save(step + 1) or step + 1 == steps:
          save(step + 1, metrics, force=step + 1 == steps)
        if bar is not None:
          bar.update(1)
        if stop.requested and step + 1 < steps:
          save(step + 1, metrics, force=True)
          name = signal.Signals(stop.signum).name
          raise guard.RunInterrupted(
              f"stopped by {name} after step {step + 1} of {steps}: checkpoint saved and "
              f"metrics flushed in {workdir}; rerun the same command to resume.", stop.signum)
    finally:
      if bar is not None:
        bar.close()
      flush_train()
      writer.close()
      try:
        ckpt.close()
      except Exception as e:
        if not guard.is_disk_full(e):
          raise
        raise guard.DiskFullError(f"disk full while finishing a checkpoint in {ckpt.directory}; "
                                  "free space and rerun the same command (resume is exact "
                                  "from the newest complete checkpoint).") from None

  timings["loop_s"] = time.perf_counter() - t_loop
  timings["train_s"] = timings["loop_s"] - timings["eval_s"]
  timings["eval_share"] = (timings["eval_s"] / timings["loop_s"]) if timings["loop_s"] > 0 else 0.0
  algo.export(workdir, lab, config, s.graphdef, state["params"], members)
  wall = time.time() - t_start
  if primary:
    write_manifest(workdir, lab, s.mesh, members, start, steps, wall, best, algo.name,
                   extra={"layout_changes": layout_changes, "missing_eval_steps": missing,
                          "timings": {k: round(v, 3) if isinstance(v, float) else v
                                      for k, v in timings.items()}},
                   log=log)
    log(f"done: {steps} steps, {members.size} members, {wall:.1f} s; best {best}")
    if config.analyze:
      algo.report(workdir, log)
  return workdir


def write_artifact(path: str, payload) -> None:
  """An evaluator's one-time artifact: ``.npz`` (a dict of arrays) or JSON, written aside then renamed."""
  if not path.endswith(".npz"):
    writers_lib.save_json_atomic(path, payload, indent=1)
    return
  writers_lib.write_aside(path, "wb", lambda f: np.savez_compressed(f, **payload))


#: evaluator results under these prefixes are per-prompt or per-sample arrays ([M, ...]),
#: saved to per_prompt/<step>.npz instead of the metrics rows
SAVED_PREFIXES = ("prompt/", "sample/")


def eval_rows(evaluator, members, state, hp, step, last_train, *, label_temp,
              per_prompt: dict | None = None,
              train_keys: tuple[str, ...] = ("loss", "grad_norm")) -> list[dict]:
  """Metrics rows of every member at ``step``: member columns, evaluation, last train loss.

  Per-prompt and per-sample results (names starting with one of :data:`SAVED_PREFIXES`)
  do not go into the rows; they are put into ``per_prompt`` (by full name) when it is given.
  """
  res = evaluator(state["params"], hp, step)
  for k in [k for k in res if k.startswith(SAVED_PREFIXES)]:
    v = res.pop(k)
    if per_prompt is not None:
      per_prompt[k] = distributed.to_host(v)
  train = {k: distributed.to_host(jnp.asarray(v)) for k, v in dict(last_train).items()}
  diverged = distributed.to_host(state["diverged"])
  rows = []
  for m in range(members.size):
    row = {"step": int(step)}
    row.update(members.row(m))
    row["label_temp"] = float(label_temp)
    row.update({k: v[m].item() for k, v in res.items()})
    for k in train_keys:
      if k in members.columns:      # a member column is never overwritten by a train metric
        continue
      row[k] = train[k][m].item() if k in train else None
    row["diverged"] = bool(diverged[m])
    rows.append(row)
  return rows


def versions() -> dict[str, str]:
  import flax
  import optax
  import orbax.checkpoint
  import gpo_jax
  return {"gpo_jax": gpo_jax.__version__, "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "orbax": orbax.checkpoint.__version__,
          "numpy": np.__version__, "python": platform.python_version()}


def write_manifest(workdir, lab, mesh, members, start, steps, wall, best,
                   algorithm: str = "gpo", extra: dict | None = None, log=logging.warning) -> None:
  path = os.path.join(workdir, MANIFEST)
  old = {}
  if os.path.exists(path):
    try:
      old = guard.read_json(path, "the run's manifest", "")
    except guard.RunError as e:
      # The manifest is a record, not an input: keep the damaged file and start a new one
      # rather than failing a run whose results are already on disk.
      aside = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
      os.replace(path, aside)
      log(f"WARNING: {e} Kept it as {aside}; writing a fresh manifest.")
  segment = {"start_step": start, "end_step": steps, "wall_time_s": wall,
             "finished": time.time()}
  segment.update({k: v for k, v in (extra or {}).items() if v})
  segments = old.get("segments", []) + [segment]
  dev = jax.devices()
  manifest = {
      "algorithm": algorithm,
      "versions": versions(),
      "lab": {"path": lab.path, "hash": lab.cfg.config_hash(), "name": lab.cfg.name},
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "devices": {"count": len(dev), "platform": dev[0].platform,
                  "kind": dev[0].device_kind, "processes": jax.process_count()},
      "members": members.size,
      "steps": steps,
      "wall_time_s": sum(s["wall_time_s"] for s in segments),
      "segments": segments,
      "best_final": best,
      "command": " ".join(sys.argv),
  }
  # Written aside, then renamed: a run killed mid-write must not leave a torn manifest,
  # which every later rerun of the workdir would fail to parse above.
  writers_lib.save_json_atomic(path, manifest, indent=1)
