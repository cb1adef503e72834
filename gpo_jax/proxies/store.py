"""A proxy set on disk: the final members of a reward-model run (or an offline GPO run's implicit rewards), frozen for best-of-n and RL against them (SPEC §5–§6).

Two kinds of set: ``reward_model`` (Bradley–Terry proxies, scored ``r(x, y)``) and
``implicit`` (offline GPO policies, scored by their implicit reward
``log π(y|x) − log π_ref(y|x)``; SPEC §5's like-for-like best-of-n baseline — the member's β
only rescales it, and the normalisers below remove any scale).

``export`` writes ``<run>/proxies/``:

* ``params.msgpack``: the stacked parameters ``[P, ...]`` of the run's members (flax msgpack
  of the pure parameter dict);
* ``proxies.json``: the schema, the lab's hash, the reward model's shape, each member's row
  (seed, data size, labels, γ, label noise, lr) and name, the SHA-256 of the parameters, and
  the **normalisers**: the mean and standard deviation of each proxy's raw score over the
  lab's held-out responses (π_ref samples). Every consumer scores with
  ``(r − mean)/std``, so a proxy's reward is in units of its spread on π_ref's own samples,
  like the lab's normalised gold, and a KL coefficient means the same against every proxy.

``load`` checks the schema, the lab and the checksum before deserialising, and names the
file and the remedy when one fails. Files are written aside and renamed, so a killed
export never leaves a half-written set that looks complete.
"""

from collections.abc import Mapping
import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import serialization

from gpo_jax.core import model as model_lib
from gpo_jax.core import sequences
from gpo_jax.runtime import distributed, writers

SCHEMA = 1
DIRNAME = "proxies"
PARAMS = "params.msgpack"
META = "proxies.json"


KINDS = ("reward_model", "implicit")


class ProxyError(RuntimeError):
  """A proxy set that is missing, damaged, or built on another lab."""


@dataclasses.dataclass(frozen=True)
class ProxySet:
  """``P`` frozen reward models of one shape with their normalisers.

  Attributes:
    path: the ``proxies/`` directory.
    cfg: the reward models' trunk shape.
    graphdef, rest: ``nnx.split`` of one reward model (``rest``: non-parameter state).
    params: stacked parameters, leading axis ``P``.
    names: one name per proxy (``L<layers>_n<data size>_<labels>[_q<noise>]_s<seed>``).
    rows: each proxy's member row of the reward-model run.
    mean, std: ``[P]`` normalisers (raw score → normalised score).
  """
  path: str
  cfg: model_lib.TransformerConfig
  graphdef: Any
  rest: Any
  params: Any
  names: tuple[str, ...]
  rows: tuple[dict, ...]
  mean: np.ndarray
  std: np.ndarray
  kind: str = "reward_model"
  ref: Any = None          # π_ref's parameters (implicit sets only)

  @property
  def size(self) -> int:
    return len(self.names)


def proxy_name(row: Mapping[str, Any], n_layers: int, lr_in_name: bool = False) -> str:
  """A readable unique name of one reward-model member."""
  q = float(row.get("label_noise", 0.0))
  noise = f"_q{q:g}" if q > 0 else ""
  lr = f"_lr{float(row['lr']):g}" if lr_in_name else ""
  return f"L{n_layers}_n{int(row['data_size'])}_{row['labels']}{noise}{lr}_s{int(row['seed'])}"


def implicit_name(row: Mapping[str, Any]) -> str:
  """A readable unique name of one offline GPO member's implicit reward."""
  return (f"implicit_{row['family']}_be{float(row['beta_eff']):g}_n{int(row['data_size'])}"
          f"_s{int(row['seed'])}")


def score_stack(graphdef, rest, params_P, ctx_BxC, resp_BxT, mask_BxT, *,
                kind: str = "reward_model", ref=None) -> jax.Array:
  """Raw scores ``[P, B]`` of every stacked model on ``context + response``.

  ``reward_model``: the reward model's score; ``implicit``: ``log π − log π_ref`` of the
  response (``ref``: π_ref's parameters, same graph as the policies).
  """
  if kind == "implicit":
    tokens, rmask = _sequence(ctx_BxC, resp_BxT, mask_BxT)
    logp = lambda p: model_lib.response_logprobs(nnx.merge(graphdef, p, rest), tokens, rmask)  # noqa: E731
    return jax.vmap(logp)(params_P) - logp(ref)[None]
  tokens = jnp.concatenate([ctx_BxC, resp_BxT], axis=1)
  valid = jnp.concatenate([ctx_BxC != 0, mask_BxT > 0], axis=1)
  return jax.vmap(lambda p: nnx.merge(graphdef, p, rest)(tokens, valid))(params_P)


def _sequence(ctx_BxC, resp_BxT, mask_BxT):
  tokens = jnp.concatenate([ctx_BxC, resp_BxT], axis=1)
  rmask = jnp.concatenate([jnp.zeros_like(ctx_BxC, dtype=jnp.float32),
                           mask_BxT.astype(jnp.float32)], axis=1)
  return tokens, rmask


def _model(kind: str, cfg: model_lib.TransformerConfig):
  if kind not in KINDS:
    raise ProxyError(f"unknown proxy-set kind {kind!r}; valid choices: {list(KINDS)}.")
  cls = model_lib.RewardModel if kind == "reward_model" else model_lib.Transformer
  return cls(cfg, rngs=nnx.Rngs(0))


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _write_atomic(path: str, data: bytes) -> None:
  writers.write_aside(path, "wb", lambda f: f.write(data))


def _normalisers(graphdef, rest, params_P, pairs, chunk: int = 512, *, kind="reward_model",
                 ref=None):
  """Mean and std of each proxy's raw score over the held-out pairs' responses."""
  ctx = np.concatenate([pairs["prompt"], pairs["prompt"]])
  resp = np.concatenate([pairs["chosen"], pairs["rejected"]])
  mask = np.concatenate([pairs["chosen_mask"], pairs["rejected_mask"]])
  fn = jax.jit(lambda p, c, r, m: score_stack(graphdef, rest, p, c, r, m, kind=kind, ref=ref))
  out = [np.asarray(fn(params_P, ctx[i:i + chunk], resp[i:i + chunk], mask[i:i + chunk]))
         for i in range(0, len(ctx), chunk)]
  s = np.concatenate(out, axis=1).astype(np.float64)
  return s.mean(axis=1), s.std(axis=1)


def export(workdir: str, lab, cfg: model_lib.TransformerConfig, params_M, members, *,
           trunk_layers: int = 0, kind: str = "reward_model") -> str | None:
  """Writes the members of a finished run as ``<workdir>/proxies``.

  Args:
    workdir: the run directory.
    lab: the lab the members were trained on (its held-out responses give the normalisers).
    cfg: the models' shape (a reward model's trunk, or the policy's for ``implicit``).
    params_M: the stacked parameter state (leading member axis).
    members: the run's member table.
    trunk_layers: the reward-model run's ``model.trunk_layers`` (recorded).
    kind: ``reward_model`` or ``implicit`` (offline GPO policies; :data:`KINDS`).

  Called on every process (the parameters are gathered to each host); only process 0
  writes. Returns the directory (None on other processes).
  """
  host = jax.tree.map(lambda x: np.asarray(distributed.to_host(x)), nnx.to_pure_dict(params_M))
  graphdef, one, rest = nnx.split(_model(kind, cfg), nnx.Param, ...)
  state_P = _as_state(one, jax.tree.map(jnp.asarray, host))
  ref = nnx.state(lab.policy(), nnx.Param) if kind == "implicit" else None
  pair_fields = sequences.RM_PAIR_FIELDS
  mean, std = _normalisers(graphdef, rest, state_P,
                           sequences.pair_arrays(lab.pairs("test"), pair_fields),
                           kind=kind, ref=ref)
  if jax.process_index() != 0:
    return None
  out = os.path.join(workdir, DIRNAME)
  os.makedirs(out, exist_ok=True)
  blob = serialization.msgpack_serialize(host)
  _write_atomic(os.path.join(out, PARAMS), blob)
  lr_in_name = len({float(v) for v in members.columns["lr"]}) > 1
  rows = []
  for m in range(members.size):
    row = {k: (v.item() if hasattr(v, "item") else v) for k, v in members.row(m).items()}
    if kind == "implicit":
      row["beta_eff"] = float(row["beta"]) * float(members.columns["beta_eff_scale"][m])
      row["name"] = implicit_name(row)
    else:
      row["name"] = proxy_name(row, cfg.n_layers, lr_in_name)
    rows.append(row)
  names = [r["name"] for r in rows]
  if len(set(names)) != len(names):
    raise ProxyError(f"proxy names are not unique: {names}")
  meta = {"schema": SCHEMA, "kind": kind, "lab_hash": lab.cfg.config_hash(),
          "lab_path": lab.path, "model": dataclasses.asdict(cfg),
          "trunk_layers": int(trunk_layers), "members": rows, "norm_mean": mean.tolist(),
          "norm_std": std.tolist(), "params_sha256": hashlib.sha256(blob).hexdigest()}
  _write_atomic(os.path.join(out, META), json.dumps(meta, indent=1).encode())
  return out


def _as_state(abstract_one, stacked_pure):
  """The stacked pure dict as an ``nnx.State`` shaped like one model's parameter state."""
  state = jax.tree.map(lambda x: x, abstract_one)
  nnx.replace_by_pure_dict(state, stacked_pure)
  return state


def load(path: str, lab=None) -> ProxySet:
  """The proxy set under ``path`` (a reward-model run dir or its ``proxies/``).

  Raises:
    ProxyError: naming the file: missing (run the reward-model config to completion
      first), unreadable, wrong schema, a checksum mismatch, or a set trained on another
      lab than ``lab``.
  """
  d = path if os.path.basename(os.path.normpath(path)) == DIRNAME else os.path.join(path, DIRNAME)
  meta_path, params_path = os.path.join(d, META), os.path.join(d, PARAMS)
  if not (os.path.exists(meta_path) and os.path.exists(params_path)):
    raise ProxyError(f"no proxy set at {d} ({META} and {PARAMS} expected): train the "
                     "reward-model run to its last step, which exports it.")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise ProxyError(f"cannot read {meta_path}: {e}") from e
  if meta.get("schema") != SCHEMA:
    raise ProxyError(f"{meta_path} has schema {meta.get('schema')!r}, this code reads "
                     f"{SCHEMA}; re-export it by rerunning its reward-model run.")
  if _sha256(params_path) != meta.get("params_sha256"):
    raise ProxyError(f"{params_path} does not match the SHA-256 in {meta_path} (damaged or "
                     "replaced); rerun the reward-model run to export it again.")
  if lab is not None and meta.get("lab_hash") != lab.cfg.config_hash():
    raise ProxyError(f"the proxies in {d} were trained on lab {meta.get('lab_hash')}, not on "
                     f"this run's lab {lab.cfg.config_hash()} ({lab.path}).")
  kind = meta.get("kind", "reward_model")
  if kind == "implicit" and lab is None:
    raise ProxyError(f"{d} holds implicit rewards (offline GPO policies): loading it needs "
                     "the lab, whose π_ref they are measured against.")
  cfg = model_lib.TransformerConfig(**meta["model"])
  graphdef, one, rest = nnx.split(_model(kind, cfg), nnx.Param, ...)
  with open(params_path, "rb") as f:
    pure = serialization.msgpack_restore(f.read())
  stacked = _as_state(one, jax.tree.map(jnp.asarray, pure))
  rows = tuple(meta["members"])
  return ProxySet(path=d, cfg=cfg, graphdef=graphdef, rest=rest, params=stacked,
                  names=tuple(r["name"] for r in rows), rows=rows,
                  mean=np.asarray(meta["norm_mean"], np.float64),
                  std=np.asarray(meta["norm_std"], np.float64), kind=kind,
                  ref=nnx.state(lab.policy(), nnx.Param) if kind == "implicit" else None)
