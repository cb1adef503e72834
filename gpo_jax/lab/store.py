"""The lab artifact store: the hashed lab directory, its integrity checks, loading, and build-or-load.

A lab directory ``<workdir>/<name>-<hash12>/`` (the hash covers the config and
``LAB_CODE_VERSION``; see :mod:`gpo_jax.lab.config`) contains::

  policy/            orbax checkpoint of π_ref's parameters (pure dict)
  gold/              orbax checkpoint of the gold reward model's parameters
  tfds/gpo_lab/1.0.0 the preference pairs, splits train/test, array_record (TFDS)
  eval_prompts.npy   held-out contexts ``[BOS] prompt [SEP]``, int32 [M, P + 2]
  lab.json           config, statistics, versions, SHA-256 of every other file, build time

``lab.json`` is written last (by :func:`gpo_jax.lab.builder.build`), so its presence marks a
complete build. :func:`build_or_load` builds into a temporary directory that is renamed
into place, under an ``fcntl`` lock so concurrent processes build once.

Loading separates a bad artifact from a failure to read a good one, because a rebuild
costs minutes to hours and must never be triggered by a transient error:

* :class:`LabCorruptError` — evidence that the artifact itself is bad: ``lab.json`` missing,
  unparseable, of the wrong schema or code version, or disagreeing with the directory
  name's config hash; a listed file missing; a SHA-256 mismatch. All of this is checked
  before anything is deserialised. :func:`build_or_load` moves such a lab aside to
  ``<dir>.corrupt-<time>-<pid>`` (kept, never deleted) and rebuilds it.
* :class:`LabLoadError` — the checksums verified, yet a file failed to deserialise (an
  orbax/tensorstore/TFDS version incompatibility or a bug): the error names the file, the
  lab and the versions recorded at build time; the lab is left in place.
* ``OSError`` / ``MemoryError`` (EMFILE, EIO, EACCES, out of memory) propagate with their
  type, plus a note naming the lab and the stage, so callers can retry; the lab is left in
  place.
"""

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import math
import platform
import re
import shutil
import stat
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpo_jax.lab import corpus as corpus_lib
from gpo_jax.lab import gold as gold_lib
from gpo_jax.lab.config import (
    LAB_CODE_VERSION, LAB_JSON, EVAL_PROMPTS, SPLITS, LabConfig, LabCorruptError, LabError,
    LabLoadError)
from gpo_jax.core import model as model_lib


# ---------------------------------------------------------------------- the loaded lab
@dataclasses.dataclass
class Lab:
  """A built lab, loaded. ``pairs(split)`` reads the TFDS dataset (memoised per instance).

  Attributes:
    path: absolute lab directory.
    cfg: its :class:`LabConfig`.
    stats: the statistics recorded at build time (``lab.json``).
    policy_cfg, ref_state: π_ref's ``TransformerConfig`` and parameter ``nnx.State``.
    gold_cfg, gold_state, gold_mean, gold_std: the gold network and the raw-score constants
      that normalise it to mean 0, std 1 under π_ref samples.
    gold_terms: how the lab's gold combines the network with coherence terms
      (:mod:`gpo_jax.lab.gold`; ``kind="network"``: the network alone).
    eval_prompts: held-out contexts ``[BOS] prompt [SEP]``, int32 ``[M, P + 2]``.
  """

  path: str
  cfg: LabConfig
  stats: dict
  policy_cfg: model_lib.TransformerConfig
  ref_state: Any
  gold_cfg: model_lib.TransformerConfig
  gold_state: Any
  gold_mean: float
  gold_std: float
  eval_prompts: np.ndarray
  gold_terms: gold_lib.GoldTerms = gold_lib.GoldTerms()
  _pairs_cache: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def corpus(self) -> corpus_lib.Corpus:
    return corpus_lib.Corpus(self.cfg.corpus)

  @property
  def tfds_dir(self) -> str:
    from gpo_jax.lab import dataset as lab_tfds
    return os.path.join(self.path, "tfds", lab_tfds.DATASET_NAME, lab_tfds.DATASET_VERSION)

  def policy(self) -> model_lib.Transformer:
    """A fresh ``Transformer`` holding a copy of π_ref's parameters."""
    return _merge_copy(model_lib.Transformer, self.policy_cfg, self.ref_state)

  def gold(self) -> model_lib.RewardModel:
    """The gold ``RewardModel`` (raw scores; see :meth:`gold_score` for normalised ones)."""
    return _merge_copy(model_lib.RewardModel, self.gold_cfg, self.gold_state)

  def gold_score(self, ctx_BxC, resp_BxT, mask_BxT=None) -> np.ndarray:
    """The lab's gold score (any kind) of responses to contexts ``[BOS] prompt [SEP]``.

    ``mask_BxT`` marks the response tokens up to and including EOS; it defaults to
    ``resp != PAD``, right unless a response contains a PAD id.
    """
    resp_BxT = np.asarray(resp_BxT)
    if mask_BxT is None:
      mask_BxT = resp_BxT != corpus_lib.PAD
    fn, params = self.gold_fn()
    gold, _ = fn(params, np.asarray(ctx_BxC), resp_BxT, np.asarray(mask_BxT))
    return np.asarray(gold, np.float64)

  def gold_fn(self):
    """``(fn, params)``: ``fn(params, ctx_BxC, resp_BxT, mask_BxT) -> (gold_B, parts)``, jittable.

    ``parts`` are per-response diagnostics (``gold/network``, ``loglik``;
    :func:`gpo_jax.lab.gold.make_gold_fn`).

    ``params`` is a pytree (the network's state and the corpus's likelihood tables), so it
    can be placed on a mesh and passed through ``jit`` like any other argument.
    """
    graphdef, _ = nnx.split(self.gold())
    fn = gold_lib.make_gold_fn(graphdef, self.gold_mean, self.gold_std, self.gold_terms)
    return fn, {"net": self.gold_state, "tables": gold_lib.tables(self.corpus)}

  def pairs(self, split: str) -> dict[str, np.ndarray]:
    """Preference pairs of ``split`` as NumPy arrays, read through the TFDS data source.

    Fields: ``prompt [N, P+2]`` (the context ``[BOS] prompt [SEP]``), ``chosen``,
    ``rejected`` ``[N, T]`` int32, ``chosen_mask``, ``rejected_mask`` ``[N, T]`` int32 (1 on
    response tokens up to and including EOS), ``ref_chosen_logps``, ``ref_rejected_logps``,
    ``gold_chosen``, ``gold_rejected`` (normalised), ``label_p`` ``[N]`` float32.
    """
    from gpo_jax.lab import dataset as lab_tfds
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    if split not in self._pairs_cache:
      rel = os.path.relpath(self.tfds_dir, self.path)
      with _deserialising(self.path, rel, f"reading the {split!r} pairs", verified=None):
        self._pairs_cache[split] = lab_tfds.read_split(self.tfds_dir, split)
    return {k: v.copy() for k, v in self._pairs_cache[split].items()}


def _merge_copy(cls, cfg, state):
  abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract)
  return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.array(x, copy=True), state))


# ---------------------------------------------------------------------- checksums / io
def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _all_files(root: str) -> list[str]:
  out = []
  for d, _, files in os.walk(root):
    for f in files:
      rel = os.path.relpath(os.path.join(d, f), root)
      if rel != LAB_JSON:
        out.append(rel)
  return sorted(out)


def _save_state(path: str, state) -> None:
  import orbax.checkpoint as ocp
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.abspath(path), nnx.to_pure_dict(state))
  ckpt.wait_until_finished()
  ckpt.close()


def _restore_state(path: str, cls, cfg):
  import orbax.checkpoint as ocp
  abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
  _, abstract_state = nnx.split(abstract)
  # NumPy targets: every process reads the whole (small) weights; restoring onto the saved
  # single-device sharding fails with a topology mismatch in a multi-process run.
  target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nnx.to_pure_dict(abstract_state))
  # Each process restores on its own: build_or_load holds a file lock here, so a cross-process
  # barrier inside orbax would deadlock the processes waiting for that lock.
  me = jax.process_index()
  ckpt = ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}))
  try:
    restored = ckpt.restore(os.path.abspath(path), target)
  finally:
    ckpt.close()
  nnx.replace_by_pure_dict(abstract_state, jax.tree.map(jnp.asarray, restored))
  return abstract_state


def _versions() -> dict:
  import flax
  import optax
  import orbax.checkpoint
  import tensorflow_datasets
  import gpo_jax
  return {"gpo_jax": gpo_jax.__version__, "lab_code": LAB_CODE_VERSION, "jax": jax.__version__,
          "flax": flax.__version__, "optax": optax.__version__,
          "orbax": orbax.checkpoint.__version__, "tfds": tensorflow_datasets.__version__,
          "numpy": np.__version__, "python": platform.python_version(),
          "backend": jax.default_backend(), **_dist_versions("tensorstore", "array-record")}


def _dist_versions(*names: str) -> dict:
  """Installed versions of the storage libraries beneath orbax and TFDS (a failed load of an
  intact lab is usually theirs), by distribution name."""
  from importlib import metadata
  out = {}
  for n in names:
    try:
      out[n] = metadata.version(n)
    except metadata.PackageNotFoundError:
      out[n] = None
  return out


# ---------------------------------------------------------------------- load
_HEX12_SUFFIX = re.compile(r"-([0-9a-f]{12})$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Every complete lab lists at least one file under each of these (see the module docstring).
_REQUIRED = ("policy/", "gold/", "tfds/gpo_lab/1.0.0/", EVAL_PROMPTS)
_MISSING = (errno.ENOENT, errno.ENOTDIR)


def _with_note(e: BaseException, note: str) -> BaseException:
  e.add_note(note)
  return e


def _stat(path: str, lab: str, stage: str):
  """``os.stat``; None when the path does not exist. Other OSErrors (EACCES, EIO) propagate,
  so an unreadable file is never mistaken for a missing one."""
  try:
    return os.stat(path)
  except OSError as e:
    if e.errno in _MISSING:
      return None
    raise _with_note(e, f"while {stage} of lab {lab}; the lab was left in place")


META_DIGEST = "meta_sha256"


def meta_digest(meta: dict) -> str:
  """SHA-256 of ``lab.json``'s canonical JSON without its own digest field."""
  body = {k: v for k, v in meta.items() if k != META_DIGEST}
  text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
  return hashlib.sha256(text.encode()).hexdigest()


def _read_meta(path: str) -> tuple[dict, LabConfig]:
  """Parses and validates ``lab.json``; every defect in it is a :class:`LabCorruptError`."""
  meta_path = os.path.join(path, LAB_JSON)
  try:
    with open(meta_path, "rb") as f:
      raw = f.read()
  except OSError as e:
    if e.errno in _MISSING:
      raise LabCorruptError(f"lab {path} is incomplete: {LAB_JSON} is missing (the build did "
                            f"not finish); build_or_load moves it aside and rebuilds") from None
    raise _with_note(e, f"while reading {meta_path}; the lab was left in place")
  try:
    meta = json.loads(raw)
    if not isinstance(meta, dict):
      raise TypeError(f"top level is {type(meta).__name__}, not an object")
    required = ("code_version", "hash", "config", "files", "stats", "gold_mean", "gold_std")
    absent = [k for k in required if k not in meta]
    if absent:
      raise KeyError(f"keys {absent} absent")
  except (ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError is a ValueError
    raise LabCorruptError(f"lab {path}: {LAB_JSON} is unreadable or malformed ({e})") from e
  if meta["code_version"] != LAB_CODE_VERSION:
    raise LabCorruptError(f"lab {path} was built by lab code version {meta['code_version']!r}, "
                          f"this code is {LAB_CODE_VERSION!r}; rebuild it")
  try:
    cfg = LabConfig.from_dict(meta["config"])
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise LabCorruptError(f"lab {path}: the config in {LAB_JSON} is not a valid LabConfig "
                          f"({type(e).__name__}: {e})") from e
  digest = cfg.config_hash()
  if meta["hash"] != digest:
    raise LabCorruptError(f"lab {path}: {LAB_JSON} records config hash {meta['hash']!r} but "
                          f"its config hashes to {digest!r}")
  named = _HEX12_SUFFIX.search(os.path.basename(path))
  # A directory renamed without a hash suffix is allowed (labs are relocatable); one whose
  # name claims a hash must hold that config.
  if named and named.group(1) != digest:
    raise LabCorruptError(f"lab {path}: the directory name says config hash {named.group(1)!r} "
                          f"but {LAB_JSON} holds a config hashing to {digest!r}")
  files = meta["files"]
  if not isinstance(files, dict):
    raise LabCorruptError(f"lab {path}: \"files\" in {LAB_JSON} is not an object")
  bad_entries = [(f, d) for f, d in files.items()
                 if not (isinstance(d, str) and _SHA256.match(d) and f and f != LAB_JSON
                         and not os.path.isabs(f) and ".." not in f.split("/"))]
  if bad_entries:
    raise LabCorruptError(f"lab {path}: malformed \"files\" entries in {LAB_JSON}: "
                          f"{bad_entries[:3]}")
  unlisted = [r for r in _REQUIRED if not any(f == r or f.startswith(r) for f in files)]
  if unlisted:
    raise LabCorruptError(f"lab {path}: {LAB_JSON} lists no files for {unlisted}")
  numbers = (meta["gold_mean"], meta["gold_std"])
  if (not isinstance(meta["stats"], dict)
      or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers)
      or not meta["gold_std"] > 0):
    raise LabCorruptError(f"lab {path}: {LAB_JSON} has malformed stats or gold constants "
                          f"(gold_mean={meta['gold_mean']!r}, gold_std={meta['gold_std']!r})")
  # Last, so a structurally bad lab.json gets its specific message above.
  if META_DIGEST in meta and meta[META_DIGEST] != meta_digest(meta):
    raise LabCorruptError(f"lab {path}: {LAB_JSON} does not match its own SHA-256 (the gold "
                          "normalisation constants, statistics or file list were changed)")
  if META_DIGEST not in meta:
    logging.warning("lab %s: %s predates its self-checksum; its gold normalisation constants "
                    "are not verified (rebuild the lab to cover them)", path, LAB_JSON)
  return meta, cfg


def _check_files(path: str, files: dict[str, str], verify: bool) -> None:
  """Raises :class:`LabCorruptError` on a listed file that is missing or (``verify``) whose
  SHA-256 differs from ``lab.json``; read errors propagate as ``OSError``."""
  missing = []
  for f in files:
    st = _stat(os.path.join(path, f), path, f"checking that {f} exists")
    if st is None or not stat.S_ISREG(st.st_mode):
      missing.append(f)
  if missing:
    raise LabCorruptError(f"lab {path} is corrupt: missing files {missing[:5]}"
                          f"{' ...' if len(missing) > 5 else ''}")
  if verify:
    bad = []
    for f, want in files.items():
      try:
        got = _sha256(os.path.join(path, f))
      except OSError as e:
        raise _with_note(e, f"while verifying the checksum of {f} in lab {path}; the lab was "
                            "left in place")
      if got != want:
        bad.append(f)
    if bad:
      raise LabCorruptError(f"lab {path} is corrupt: checksum mismatch in {bad[:5]}")


def _version_drift(path: str) -> str:
  """Versions recorded in ``lab.json`` that differ from the installed ones, as text."""
  try:
    with open(os.path.join(path, LAB_JSON)) as f:
      built = json.load(f).get("versions", {})
    now = _versions()
  except Exception as e:  # only decorates an error message; never mask the real failure
    return f"(could not compare package versions: {type(e).__name__}: {e})"
  drift = [f"{k} {built[k]} -> {now[k]}" for k in sorted(now)
           if k in built and built[k] != now[k]]
  if drift:
    return "Versions differ from the build: " + ", ".join(drift) + "."
  return ("The installed versions equal those recorded at build time, so a bug or an "
          "environment problem is more likely than an incompatibility.")


@contextlib.contextmanager
def _deserialising(path: str, rel: str, what: str, verified: bool | None):
  """Gives a failure to read ``rel`` of lab ``path`` its context; never signals corruption.

  ``OSError``/``MemoryError`` keep their type (callers may retry) and gain a note; any other
  ``Exception`` becomes :class:`LabLoadError`. ``verified``: whether the checksums were just
  checked (None: at load time, earlier).
  """
  try:
    yield
  except LabError:
    raise
  except (OSError, MemoryError) as e:
    e.add_note(f"while {what} from {rel} of lab {path}; a transient failure, not corruption: "
               "the lab was left in place")
    raise
  except Exception as e:
    if verified:
      integrity = (f"The lab's files match the SHA-256 checksums in {LAB_JSON}, so {rel} holds "
                   "the bytes the build wrote: this is not corruption.")
    elif verified is None:
      integrity = (f"Checksums were verified when the lab was loaded; load_lab({path!r}) "
                   "verifies them again.")
    else:
      integrity = (f"Checksums were not verified (verify=False); load_lab({path!r}) with "
                   "verify=True tells corruption apart.")
    cause = str(e) if len(str(e)) <= 400 else str(e)[:400] + " ... (full text in the cause)"
    raise LabLoadError(
        f"lab {path}: {what} failed on {rel} ({type(e).__name__}: {cause}). {integrity} Likely "
        f"cause: an incompatible orbax/tensorstore/tensorflow-datasets/numpy version or a "
        f"bug in the loading code. {_version_drift(path)} The lab was left in place (not "
        "moved, not rebuilt).") from e


def load_lab(path: str, verify: bool = True) -> Lab:
  """Loads a complete lab directory.

  ``lab.json`` and the files it lists are validated (SHA-256 unless ``verify=False``)
  before anything is deserialised.

  Raises:
    LabError: ``path`` does not exist.
    LabCorruptError: the artifact is bad (see the module docstring).
    LabLoadError: an intact file failed to deserialise.
    OSError, MemoryError: a transient failure, with a note naming the lab and the stage.
  """
  path = os.path.abspath(path)
  st = _stat(path, path, "opening the lab directory")
  if st is None:
    raise LabError(f"lab directory {path} does not exist")
  if not stat.S_ISDIR(st.st_mode):
    raise LabCorruptError(f"lab {path} is not a directory")
  meta, cfg = _read_meta(path)
  _check_files(path, meta["files"], verify)
  with _deserialising(path, "policy/", "restoring π_ref's weights", verify):
    ref_state = _restore_state(os.path.join(path, "policy"), model_lib.Transformer,
                               cfg.policy_config)
  with _deserialising(path, "gold/", "restoring the gold model's weights", verify):
    gold_state = _restore_state(os.path.join(path, "gold"), model_lib.RewardModel,
                                cfg.gold_config)
  with _deserialising(path, EVAL_PROMPTS, "loading the eval prompts", verify):
    eval_prompts = np.load(os.path.join(path, EVAL_PROMPTS), allow_pickle=False)
  return Lab(path=path, cfg=cfg, stats=meta["stats"], policy_cfg=cfg.policy_config,
             ref_state=ref_state, gold_cfg=cfg.gold_config, gold_state=gold_state,
             gold_mean=float(meta["gold_mean"]), gold_std=float(meta["gold_std"]),
             eval_prompts=eval_prompts, gold_terms=_gold_terms(path, meta))


def _gold_terms(path: str, meta: dict) -> gold_lib.GoldTerms:
  try:
    terms = gold_lib.GoldTerms.from_dict(meta.get("gold_terms"))
  except (TypeError, ValueError) as e:
    raise LabCorruptError(f"lab {path}: lab.json's gold_terms are invalid ({e})") from None
  if terms.kind != meta["config"].get("gold_kind", "network"):
    raise LabCorruptError(f"lab {path}: lab.json's gold_terms are of kind {terms.kind!r} but "
                          f"the config says gold_kind={meta['config'].get('gold_kind')!r}")
  return terms


# ---------------------------------------------------------------------- build or load
def _reuse(final: str, log, *, move_corrupt: bool) -> Lab | None:
  """Loads the lab at ``final``; None if it is corrupt (moved aside when ``move_corrupt``).

  Any other failure is logged as "not evidence of corruption" and re-raised.
  """
  try:
    lab = load_lab(final)
  except LabCorruptError as e:
    if move_corrupt:
      aside = f"{final}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
      log(f"invalid lab ({e}); moving it to {aside} (kept for inspection) and rebuilding")
      os.rename(final, aside)
    return None
  except Exception as e:
    notes = "".join(f"; {n}" for n in getattr(e, "__notes__", ()))
    log(f"cannot load lab {final} ({type(e).__name__}: {e}{notes}); this is not evidence "
        "of corruption, so the lab is left in place and NOT rebuilt")
    raise
  log(f"reusing lab {final}")
  return lab


def build_or_load(cfg: LabConfig, workdir: str, log=print) -> Lab:
  """Returns the lab for ``cfg`` under ``workdir``, building it if absent or corrupt.

  A valid lab is reused. Only a :class:`LabCorruptError` (evidence that the artifact is
  bad) moves the lab aside to ``<dir>.corrupt-<time>-<pid>`` and rebuilds it; any other
  failure to load it (:class:`LabLoadError`, ``OSError``, ...) is logged and re-raised with
  the lab left in place, so a transient error never costs a rebuild. Concurrent callers
  are serialised by an ``fcntl`` lock, so a lab is built once.
  """
  workdir = os.path.abspath(workdir)
  final = os.path.join(workdir, cfg.dirname)
  # A complete lab is read without the build lock, so prebuilt labs on read-only storage
  # work; lab.json is written last and the directory renamed into place, so a lab that
  # has it is whole. Only a missing or corrupt lab takes the lock (and needs write access).
  if os.path.exists(os.path.join(final, LAB_JSON)):
    lab = _reuse(final, log, move_corrupt=False)   # corrupt: handled under the lock below
    if lab is not None:
      return lab
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, f".{cfg.dirname}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if _stat(final, final, "checking whether it exists") is not None:
      lab = _reuse(final, log, move_corrupt=True)
      if lab is not None:
        return lab
    # Under the lock no other process is building this lab, so any leftover build
    # directory belongs to a crashed build.
    for stale in os.listdir(workdir):
      if stale.startswith(f".building-{cfg.dirname}-"):
        shutil.rmtree(os.path.join(workdir, stale), ignore_errors=True)
    tmp = os.path.join(workdir, f".building-{cfg.dirname}-{os.getpid()}")
    # Imported here, not at the top: gpo_jax.lab.builder imports this module for its io
    # helpers. Looked up on each call, so a patched ``gpo_jax.lab.builder.build`` is the one run.
    from gpo_jax.lab.builder import build
    try:
      build(cfg, tmp, log=log)
      os.rename(tmp, final)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    return load_lab(final)


def summary(lab: Lab) -> str:
  """Human-readable key statistics of a lab."""
  s = lab.stats
  styles = ", ".join(f"{k}: {v['mean']:+.3f}" for k, v in s["gold/by_style"].items())
  lines = [
      f"lab {lab.path}",
      f"  π_ref {s['ref/params']:,} params; SFT held-out loss {s['sft/first_heldout']:.3f} -> "
      f"{s['sft/final_heldout']:.3f} nats/token (all episode tokens)",
      f"  response NLL without demos: π_ref {s['ref/response_nll_per_token']:.3f}, Bayes "
      f"mixture {s['corpus/bayes_nll_per_token']:.3f}, style known "
      f"{s['corpus/true_style_nll_per_token']:.3f} nats/token",
      f"  π_ref entropy {s['ref/entropy_per_token']:.3f} nats/token (log V = "
      f"{s['ref/log_vocab']:.3f}); mean response length {s['ref/mean_length']:.2f}",
      f"  ICL gain (2 demos) {s['icl/gain']:.3f} ± {s['icl/gain_se']:.3f} nats/response "
      f"({s['icl/gain_per_token']:.3f}/token; Bayes-optimal {s['icl/bayes_gain']:.3f})",
      f"  gold {s['gold/params']:,} params; under π_ref mean {s['gold/ref_mean']:.3f} std "
      f"{s['gold/ref_std']:.3f}; corr(gold, length) {s['gold/length_corr']:+.3f}",
      f"  gold by style (corpus responses): {styles}",
      f"  labels agree with gold on {s['data/label_agreement']:.3f} of untied train pairs "
      f"(BT prediction {s['data/label_agreement_predicted']:.3f})",
      f"  build time {s['build/seconds']['total']:.1f}s "
      + ", ".join(f"{k} {v:.1f}s" for k, v in s["build/seconds"].items() if k != "total"),
  ]
  return "\n".join(lines)
