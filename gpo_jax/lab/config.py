"""The lab's typed config and errors: everything that determines a lab, and how a lab fails to load.

A :class:`LabConfig` (with :data:`LAB_CODE_VERSION`) hashes to the ``<name>-<hash12>``
directory name of the lab it builds (:mod:`gpo_jax.lab.store`). The errors tell a bad
artifact (:class:`LabCorruptError`: moved aside and rebuilt) from a failure to read a good
one (:class:`LabLoadError`: left in place); the store's module docstring says when each is
raised.
"""

import dataclasses
import hashlib
import json
import os

from gpo_jax.lab import corpus as corpus_lib
from gpo_jax.lab.gold import GOLD_KINDS
from gpo_jax.core import model as model_lib

# Bump when a change to the code changes what a given config builds.
LAB_CODE_VERSION = "1"
_GOLD_FIELDS = ("gold_kind", "gold_coherence_weight", "gold_cap_penalty")
LAB_JSON = "lab.json"
EVAL_PROMPTS = "eval_prompts.npy"
SPLITS = ("train", "test")


class LabError(RuntimeError):
  """A lab directory cannot be used (raised as such when it does not exist)."""


class LabCorruptError(LabError):
  """The artifact itself is bad (``lab.json`` missing/malformed/stale, file missing, checksum).

  The only error on which :func:`build_or_load` moves a lab aside and rebuilds it.
  """


class LabLoadError(LabError):
  """A lab whose files match their checksums (or were not verified) failed to deserialise.

  Points to a version incompatibility or a bug, not to corruption: the lab is left in place.
  """


@dataclasses.dataclass(frozen=True)
class ModelShape:
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int


@dataclasses.dataclass(frozen=True)
class LabConfig:
  """Everything that determines a lab (see ``configs/lab.py`` for the meaning of each knob)."""

  name: str = "tiny"
  seed: int = 0
  corpus: corpus_lib.CorpusConfig = corpus_lib.CorpusConfig()
  policy: ModelShape = ModelShape(32, 2, 2, 64)
  sft_steps: int = 300
  sft_batch: int = 32
  sft_lr: float = 3e-3
  sft_warmup: int = 30
  sft_weight_decay: float = 0.01
  sft_eval_every: int = 100
  sft_eval_episodes: int = 256
  gold: ModelShape = ModelShape(48, 2, 2, 96)
  gold_init_scale: float = 3.0
  gold_pos_scale: float = 0.0
  gold_norm_samples: int = 1024
  gold_kind: str = "network"
  gold_coherence_weight: float = 1.0
  gold_cap_penalty: float = 1.0
  n_train_pairs: int = 512
  n_test_pairs: int = 256
  n_eval_prompts: int = 64
  label_temp: float = 1.0
  hard_labels: bool = False
  label_flip: float = 0.0
  sample_temperature: float = 1.0
  n_stat_episodes: int = 512
  batch_size: int = 256

  def __post_init__(self):
    for f in ("sft_steps", "sft_batch", "sft_eval_every", "sft_eval_episodes",
              "gold_norm_samples", "n_train_pairs", "n_test_pairs", "n_eval_prompts",
              "n_stat_episodes", "batch_size"):
      if getattr(self, f) < 2:
        raise ValueError(f"LabConfig.{f}={getattr(self, f)} must be >= 2")
    if not self.label_temp > 0:
      raise ValueError(f"LabConfig.label_temp={self.label_temp} must be > 0")
    if not 0.0 <= self.label_flip <= 0.5:
      raise ValueError(f"LabConfig.label_flip={self.label_flip} must be in [0, 0.5]")
    if not self.sample_temperature > 0:
      raise ValueError(f"LabConfig.sample_temperature={self.sample_temperature} must be > 0")
    if self.gold_kind not in GOLD_KINDS:
      raise ValueError(f"LabConfig.gold_kind={self.gold_kind!r} is not a gold kind; choose one "
                       f"of {list(GOLD_KINDS)}")
    if self.gold_coherence_weight < 0 or self.gold_cap_penalty < 0:
      raise ValueError(f"LabConfig.gold_coherence_weight={self.gold_coherence_weight} and "
                       f"gold_cap_penalty={self.gold_cap_penalty} must be >= 0")
    if self.name != os.path.basename(self.name) or not self.name:
      raise ValueError(f"LabConfig.name={self.name!r} must be a plain directory-name prefix")

  @classmethod
  def from_dict(cls, d) -> "LabConfig":
    """From a nested dict or a ``ConfigDict`` (unknown keys raise, naming the valid ones)."""
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - valid)
    if unknown:
      raise ValueError(f"unknown LabConfig fields {unknown}; valid: {sorted(valid)}")
    d["corpus"] = corpus_lib.CorpusConfig(**dict(d.get("corpus", {})))
    for k in ("policy", "gold"):
      if k in d:
        d[k] = ModelShape(**dict(d[k]))
    return cls(**d)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @property
  def policy_config(self) -> model_lib.TransformerConfig:
    p = self.policy
    return model_lib.TransformerConfig(
        vocab_size=self.corpus.vocab_size, d_model=p.d_model, n_layers=p.n_layers,
        n_heads=p.n_heads, d_ff=p.d_ff, max_len=self.corpus.max_episode_len)

  @property
  def gold_config(self) -> model_lib.TransformerConfig:
    g = self.gold
    return model_lib.TransformerConfig(
        vocab_size=self.corpus.vocab_size, d_model=g.d_model, n_layers=g.n_layers,
        n_heads=g.n_heads, d_ff=g.d_ff, max_len=self.corpus.policy_len)

  def config_hash(self) -> str:
    """12 hex digits of SHA-256 over the config (minus its name) and ``LAB_CODE_VERSION``."""
    d = self.to_dict()
    d.pop("name")
    # The gold-kind fields came after labs were first built: a network gold (which ignores
    # the coherence knobs) hashes as before they existed, so existing labs keep their names.
    if d.get("gold_kind") == "network":
      for k in _GOLD_FIELDS:
        d.pop(k)
    blob = json.dumps({"config": d, "code": LAB_CODE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]

  @property
  def dirname(self) -> str:
    return f"{self.name}-{self.config_hash()}"


def load_config(spec: str, **overrides) -> LabConfig:
  """``LabConfig`` from a config-file spec such as ``"configs/lab.py:small"``.

  Args:
    spec: ``path/to/file.py[:arg]``; the file's ``get_config(arg)`` is called.
    **overrides: top-level fields replaced afterwards (``dataclasses.replace``).
  """
  import importlib.util
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"config file {path!r} (from spec {spec!r}) does not exist")
  module_spec = importlib.util.spec_from_file_location(f"_lab_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  cfg = LabConfig.from_dict(module.get_config(arg or None))
  return dataclasses.replace(cfg, **overrides) if overrides else cfg
