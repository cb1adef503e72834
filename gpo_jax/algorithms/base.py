"""The seam between the engine and a method family: what an algorithm must say about its members, step and evaluation.

The engine (``gpo_jax.engine``) owns everything that is the same for every method: the
member table's data order, the optimizer, divergence isolation, the member layout and
shardings, checkpoints and exact resume, metrics files. An algorithm owns what differs:

=====================  =====================================================================
``members``            the sweep axes → a :class:`~gpo_jax.engine.members.Members` table
                       (its traced columns are the per-member hyperparameters)
``member_count``       the number of members from the config alone (touches no device)
``model``              one member's initial model (an ``nnx.Module``) built from the lab
``init_member``        optional per-member change of the initial parameters (vmapped)
``train_data``         the ``[N, ...]`` arrays the step indexes with the data order; an
                       entry under :data:`SHARED` (frozen models, tables) reaches the loss
                       as ``batch[SHARED]``, whole and unindexed
``loss_fn``            the pure per-member loss ``(params, batch, hp, key) -> (loss, metrics)``
``train_metrics``      the names of the metrics ``loss_fn`` returns (besides ``loss``);
                       ``row_metrics``, a subset also written into the metrics rows
``evaluator``          an object with ``artifacts() -> {file name: JSON}`` (one-time work,
                       written once, e.g. ``bon.json``) and
                       ``__call__(params_M, hp, step) -> {name: [M]}``
``headline``           the metric the progress bar ranks members by, and how to describe one
``report``             the report written after training (offline GPO: ``gpo_jax.analysis``)
``export``             optional: writes the trained members for other runs (reward models:
                       a proxy set for best-of-n and RL against a proxy)
=====================  =====================================================================

Adding a method is one module implementing this class, registered in
``gpo_jax/algorithms/__init__.py``, plus one config (ARCHITECTURE.md has a worked example).
"""

import abc
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import numpy as np

from gpo_jax.engine import program
from gpo_jax.engine.members import Members

Array = jax.Array
#: key of ``train_data`` holding constants the loss reads whole (not indexed per example)
SHARED = program.SHARED


class Evaluator(Protocol):
  """What the engine calls to measure members."""

  def artifacts(self) -> dict[str, Any]:
    """One-time work before training; returns ``{file name: JSON-ready dict}`` to write."""

  def __call__(self, params_M, hparams: Mapping[str, Array], step: int) -> dict[str, np.ndarray]:
    """Metrics of every member at ``step``: ``{name: [M] array}``.

    Names starting with ``prompt/`` may instead hold ``[M, E]`` per-prompt (per-cluster)
    values and names starting with ``sample/`` ``[M, k, ...]`` sampled responses; the
    engine saves those to ``per_prompt/<step>.npz`` (``/`` spelled ``__``) rather than into
    the metrics rows, for the analysis's paired tests and the reports' examples.
    """


class Algorithm(abc.ABC):
  """A method family the engine can run (see the module docstring)."""

  name: str = ""
  #: the metric the progress bar ranks members by
  headline_metric: str = ""

  @abc.abstractmethod
  def members(self, config, n_train: int) -> Members:
    """The sweep's members; raises ValueError naming any bad swept value."""

  @abc.abstractmethod
  def member_count(self, config) -> int:
    """Number of members, from the config alone."""

  @abc.abstractmethod
  def model(self, lab, config):
    """One member's initial model (an ``nnx.Module``)."""

  def init_member(self, config):
    """``(params, hp) -> params`` applied per member at initialisation, or None."""
    return None

  @abc.abstractmethod
  def train_data(self, lab, config) -> dict[str, np.ndarray]:
    """The arrays the train step indexes (leading axis = examples)."""

  @abc.abstractmethod
  def loss_fn(self, graphdef, rest, members: Members, config):
    """The per-member loss ``(params, batch, hp, key) -> (loss, metrics)``."""

  train_metrics: tuple[str, ...] = ()
  #: train metrics also copied into the metrics rows (the last train step's value, next to
  #: ``loss``), for names users look for in metrics.jsonl (e.g. online's ``objective/kl``)
  row_metrics: tuple[str, ...] = ()

  @abc.abstractmethod
  def evaluator(self, lab, graphdef, rest, members: Members, config,
                sharding: jax.sharding.Sharding | None) -> Evaluator:
    """The evaluator of this algorithm's members."""

  def validate(self, config, n_train: int) -> Members:
    """Algorithm-specific config checks (default: building the members checks the axes)."""
    return self.members(config, n_train)

  def report(self, workdir: str, log) -> None:
    """Writes the run's report after training (``config.analyze``); default: none."""
    log(f"{self.name}: no report is defined; metrics.jsonl holds the numbers.")

  def export(self, workdir: str, lab, config, graphdef, params_M, members: Members) -> None:
    """Writes the final members for later runs (called on every process; default: nothing)."""

  def describe(self, row: Mapping[str, Any]) -> str:
    """A short label of a metrics row for the progress bar."""
    return f"member {row['member']}"
