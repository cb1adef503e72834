"""The controlled lab (SPEC §3): a synthetic world with a trained π_ref, a fixed gold reward model and gold-labelled pairs.

Modules: ``corpus`` (the latent-style text world), ``config`` (the typed ``LabConfig``,
whose hash names a lab, and the lab errors), ``steps`` (SFT of π_ref, gold network, pairs,
statistics), ``builder`` (runs the steps and writes a lab directory), ``dataset`` (the TFDS
array_record builder), ``store`` (the hashed artifact directory: integrity checks, loading,
locking, build-or-load), ``tabular`` (the exact one-step K-action lab), ``games`` (exact and
sampled online IPO, IPO-MD and Nash-MD on K-action preference games). The names below are
the lab's public face.
"""

from gpo_jax.lab.config import (
    LAB_CODE_VERSION, LAB_JSON, EVAL_PROMPTS, SPLITS, LabConfig, LabCorruptError, LabError,
    LabLoadError, ModelShape, load_config)
from gpo_jax.lab.store import Lab, build_or_load, load_lab, summary
from gpo_jax.lab.builder import build, arrays_digest
