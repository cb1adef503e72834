"""Entry point that trains and evaluates a whole GPO sweep: ``python -m gpo_jax.main --config configs/x.py --workdir runs/x``.

The run is resumable: starting the same command on an existing workdir restores the newest
valid checkpoint and continues; a run killed at any point and resumed writes the same
``metrics.jsonl`` as an uninterrupted one (batches and sampling keys depend only on the
member seed and the step). Outputs follow ARCHITECTURE.md "Metrics on disk".
"""

import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gpo_jax import checkpoint as ckpt_lib
from gpo_jax import config_utils
from gpo_jax import cpu as cpu_lib
from gpo_jax import distributed
from gpo_jax import evaluation
from gpo_jax import lab as lab_lib
from gpo_jax import sharding
from gpo_jax import sweep as sweep_lib
from gpo_jax import writers as writers_lib

METRICS = writers_lib.METRICS_FILE
CONFIG = "config.json"
MANIFEST = "manifest.json"
BON = "bon.json"


# ----------------------------------------------------------------------------- config


def _betas(config) -> Any:
  betas = config.sweep.betas
  if isinstance(betas, Mapping) or hasattr(betas, "to_dict"):
    return {k: tuple(v) for k, v in dict(betas).items()}
  return tuple(betas)


def _data_sizes(config) -> tuple:
  return tuple(None if not d else int(d) for d in config.sweep.data_sizes)


def train_config(config) -> sweep_lib.TrainConfig:
  t = config.train
  return sweep_lib.TrainConfig(
      batch_size=t.batch_size, b1=t.b1, b2=t.b2, eps=t.eps, grad_clip=t.grad_clip,
      warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
      length_normalize=t.length_normalize)


def eval_config(config) -> evaluation.EvalConfig:
  e = config.eval
  return evaluation.EvalConfig(
      n_prompts=e.n_prompts, samples_per_prompt=e.samples_per_prompt,
      ref_samples_per_prompt=e.ref_samples_per_prompt, n_test_pairs=e.n_test_pairs,
      member_chunk=e.member_chunk, bon_n=tuple(e.bon_n), seed=e.seed)


def members_from_config(config, n_train: int) -> sweep_lib.Members:
  s = config.sweep
  return sweep_lib.make_members(
      list(s.families), _betas(config), seeds=tuple(s.seeds), lrs=tuple(s.lrs),
      gammas=tuple(s.gammas), data_sizes=_data_sizes(config), n_train=n_train,
      batch_size=config.train.batch_size)


def member_count(config) -> int:
  """Number of sweep members, computed from the config alone (touches no JAX device)."""
  s = config.sweep
  betas = _betas(config)
  n_beta = (sum(len(v) for v in betas.values()) if isinstance(betas, dict)
            else len(betas) * len(s.families))
  return n_beta * len(s.seeds) * len(s.lrs) * len(s.gammas) * len(s.data_sizes)


def member_chunk(config) -> int | None:
  """``train.member_chunk``: 0 = vmap all members at once (None), else members per loop step."""
  chunk = config.train.member_chunk
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
    raise ValueError(f"train.member_chunk={chunk!r} must be 0 (vmap all members) or a "
                     "positive number of members per loop iteration.")
  return chunk or None


def mesh_dict(config) -> dict[str, int]:
  return {k: int(config.mesh[k]) for k in sharding.MESH_AXES}


def validate_config(config, num_devices: int | None = None) -> sweep_lib.Members:
  """Checks a sweep config before anything expensive runs; errors name the bad value.

  Returns:
    The sweep members (with the lab's configured number of training pairs).
  """
  def positive_int(name, v, minimum=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
      raise ValueError(f"{name}={v!r} must be an int >= {minimum}.")

  positive_int("train.steps", config.train.steps, 0)
  positive_int("train.batch_size", config.train.batch_size)
  positive_int("eval.every", config.eval.every)
  positive_int("eval.n_prompts", config.eval.n_prompts)
  positive_int("eval.samples_per_prompt", config.eval.samples_per_prompt)
  positive_int("eval.ref_samples_per_prompt", config.eval.ref_samples_per_prompt)
  positive_int("checkpoint.every", config.checkpoint.every)
  positive_int("checkpoint.keep", config.checkpoint.keep)
  positive_int("train.log_every", config.train.log_every)
  member_chunk(config)
  if config.eval.n_prompts > config.lab.n_eval_prompts:
    raise ValueError(f"eval.n_prompts={config.eval.n_prompts} exceeds the lab's "
                     f"n_eval_prompts={config.lab.n_eval_prompts}.")
  lab_lib.LabConfig.from_dict(config.lab)
  members = members_from_config(config, n_train=config.lab.n_train_pairs)
  config_utils.validate_sweep_config(config, num_devices=num_devices, num_members=members.size)
  return members


# ----------------------------------------------------------------------------- outputs


def _versions() -> dict[str, str]:
  import flax
  import optax
  import orbax.checkpoint
  import gpo_jax
  return {"gpo_jax": gpo_jax.__version__, "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "orbax": orbax.checkpoint.__version__,
          "numpy": np.__version__, "python": platform.python_version()}


# ----------------------------------------------------------------------------- run


def state_shardings(abstract_state, mesh, preset) -> dict[str, Any]:
  """Shardings of the sweep state: members over ``sweep``, weights by the preset's rules."""
  member = NamedSharding(mesh, PartitionSpec(sharding.SWEEP))
  return _strip({
      "params": sharding.stacked_state_shardings(abstract_state["params"], mesh, preset),
      "opt": sharding.stacked_state_shardings(abstract_state["opt"], mesh, preset),
      "diverged": member,
      "step": NamedSharding(mesh, PartitionSpec()),
  })


def _strip(tree):
  """Plain arrays / shardings (no nnx.Variable wrappers), for jit shardings and targets."""
  return jax.tree.map(lambda x: x, tree)


def run(config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None,
        log: Callable[[str], None] = logging.info, progress: bool = True) -> str:
  """Trains and evaluates the sweep of ``config`` in ``workdir`` (resuming if possible).

  Args:
    config: a sweep config (see ``configs/cpu_sweep.py``).
    workdir: run directory.
    stop_at: stop abruptly after this many steps, without a final checkpoint or
      evaluation (tests use it to simulate a killed run).
    log: logging callable.
    progress: show a tqdm progress bar.

  Returns:
    The absolute workdir.
  """
  t_start = time.time()
  # The CPU device count and multi-host initialisation must precede every device query
  # (validation counts devices).
  cpu_lib.configure_devices(config.mesh.cpu_devices, member_count(config), log=log)
  _maybe_initialize_distributed(config)
  validate_config(config)
  workdir = os.path.abspath(workdir)
  primary = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  cfg_path = os.path.join(workdir, CONFIG)
  new = json.loads(config_utils.to_json(config))
  if os.path.exists(cfg_path):
    with open(cfg_path) as f:
      old = json.load(f)
    if old != new:
      diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      raise ValueError(f"{workdir} holds a run with a different config (sections {diff}); "
                       "use a new --workdir, or the same config to resume.")
  # Every process compares before process 0 writes, so none reads a half-written file.
  distributed.barrier("config-checked")
  if primary and not os.path.exists(cfg_path):
    config_utils.write_config_json(config, workdir, CONFIG)

  lab_root = config.lab_root or os.path.join(os.path.dirname(workdir), "labs")
  lab = lab_lib.build_or_load(lab_lib.LabConfig.from_dict(config.lab), lab_root, log=log)
  train_pairs = lab.pairs("train")
  n_train = int(train_pairs["chosen"].shape[0])
  tcfg = train_config(config)
  members = members_from_config(config, n_train)
  mesh = sharding.make_mesh(mesh_dict(config), num_members=members.size,
                            batch_size=tcfg.batch_size)
  preset = config.mesh.preset

  graphdef, params, rest = nnx.split(lab.policy(), nnx.Param, ...)
  replicated = NamedSharding(mesh, PartitionSpec())
  # The lab's weights sit on one local device; the jitted init needs them on the whole mesh.
  params = _put(params, replicated)
  init_fn = lambda p: sweep_lib.init_state(p, members, tcfg)  # noqa: E731
  abstract = jax.eval_shape(init_fn, params)
  state_sh = state_shardings(abstract, mesh, preset)
  member_sh = NamedSharding(mesh, PartitionSpec(sharding.SWEEP))

  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               save_every=config.checkpoint.every, keep=config.checkpoint.keep)
  last_train: dict[str, list] = {}
  if ckpt.latest_step() is not None:
    restored = ckpt.restore(sharding.shape_dtype_structs(_strip(abstract), state_sh))
    state, start = restored.state, restored.step
    last_train = restored.metadata.get("last_train", {})
    if restored.metadata.get("data_position") != start:
      raise ValueError(f"checkpoint at step {start} has data position "
                       f"{restored.metadata.get('data_position')}; it is corrupt.")
    log(f"resuming from step {start}")
  else:
    state = jax.jit(init_fn, out_shardings=state_sh)(params)
    start = 0
  hp = _put(members.hparams(), member_sh)
  data = _put(sweep_lib.train_arrays(train_pairs), replicated)
  step_fn = jax.jit(
      sweep_lib.make_train_step(graphdef, rest, members.families, tcfg,
                                member_groups=int(mesh.shape[sharding.SWEEP]),
                                member_chunk=member_chunk(config)),
      in_shardings=(state_sh, member_sh, replicated),
      out_shardings=(state_sh, member_sh), donate_argnums=0,
      compiler_options=cpu_lib.compiler_options(mesh.devices.flat[0].platform))

  evaluator = evaluation.Evaluator.from_lab(lab, graphdef, rest, members.families,
                                            eval_config(config), tcfg.length_normalize,
                                            sharding=replicated)
  bon = evaluator.reference()
  if primary:
    with open(os.path.join(workdir, BON), "w") as f:
      json.dump(bon, f, indent=1)

  # Rows from the resumed step on are recomputed (identically), so drop them first.
  writer = writers_lib.MetricsWriter(workdir, resume_step=start - 1 if start else None)
  steps, every = config.train.steps, config.eval.every
  # Per-step train metrics stay on device and go to TensorBoard in blocks, so logging them
  # never stalls the asynchronous dispatch of the next steps.
  pending: list[tuple[int, dict]] = []

  def flush_train():
    for s, m in pending:
      writer.write_train(s, {k: distributed.to_host(v) for k, v in m.items()})
    pending.clear()
  bar = None
  if progress and primary:
    from tqdm import tqdm
    bar = tqdm(total=steps, initial=start, desc=os.path.basename(workdir), dynamic_ncols=True)
  best = ""
  try:
    for step in range(start, steps + 1):
      if step % every == 0 or step == steps:
        rows = _eval_rows(evaluator, members, state, hp, step, last_train,
                          label_temp=lab.cfg.label_temp)
        writer.write(rows)
        top = max((r for r in rows if r["gold/reward"] is not None
                   and math.isfinite(r["gold/reward"])),
                  key=lambda r: r["gold/reward"], default=None)
        if top is not None:
          best = f"{top['family']} β={top['beta']:g} gold={top['gold/reward']:+.3f}"
          if bar is not None:
            bar.set_postfix_str(f"best {best}")
      if step == steps:
        break
      if stop_at is not None and step >= stop_at:
        return workdir
      state, metrics = step_fn(state, hp, data)
      last_train = metrics
      pending.append((step + 1, metrics))
      if (step + 1) % config.train.log_every == 0:
        flush_train()
      if ckpt.should_save(step + 1) or step + 1 == steps:
        flush_train()
        last_train = {k: distributed.to_host(v).tolist() for k, v in metrics.items()}
        ckpt.save(step + 1, state, force=step + 1 == steps,
                  metadata={"data_position": step + 1, "last_train": last_train})
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
    flush_train()
    writer.close()
    ckpt.close()

  wall = time.time() - t_start
  if primary:
    _write_manifest(workdir, lab, mesh, members, start, steps, wall, best)
    log(f"done: {steps} steps, {members.size} members, {wall:.1f} s; best {best}")
    try:
      from gpo_jax import analysis
      analyze = getattr(analysis, "analyze", None)
    except ImportError:
      analyze = None
    if analyze is not None and config.analyze:
      analyze(workdir)
  return workdir


def _eval_rows(evaluator, members, state, hp, step, last_train, *, label_temp) -> list[dict]:
  res = evaluator(state["params"], hp, step)
  train = {k: distributed.to_host(jnp.asarray(v)) for k, v in dict(last_train).items()}
  diverged = distributed.to_host(state["diverged"])
  rows = []
  for m in range(members.size):
    row = {"step": int(step)}
    row.update(members.row(m))
    row["label_temp"] = float(label_temp)
    row.update({k: v[m].item() for k, v in res.items()})
    for k in ("loss", "grad_norm"):
      row[k] = train[k][m].item() if k in train else None
    row["diverged"] = bool(diverged[m])
    rows.append(row)
  return rows


def _write_manifest(workdir, lab, mesh, members, start, steps, wall, best) -> None:
  path = os.path.join(workdir, MANIFEST)
  old = {}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  segments = old.get("segments", []) + [{"start_step": start, "end_step": steps,
                                         "wall_time_s": wall, "finished": time.time()}]
  dev = jax.devices()
  manifest = {
      "versions": _versions(),
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
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, path)


def _maybe_initialize_distributed(config) -> None:
  distributed.maybe_initialize(config.distributed)


def _put(tree, sharding_):
  """Places host arrays (identical on every process) onto a possibly multi-process sharding.

  Each process materialises only the shards its own devices hold.
  """
  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding_, lambda idx: x[idx])
  return jax.tree.map(one, tree)


# ----------------------------------------------------------------------------- CLI


def main(argv):
  del argv
  from absl import flags
  from absl import logging as absl_logging
  # orbax logs every save at INFO; keep the console for the progress bar.
  absl_logging.set_verbosity(absl_logging.WARNING)
  run(flags.FLAGS.config, flags.FLAGS.workdir, log=print)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Sweep config file (configs/*.py[:arg]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (resumed if it exists).")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
