"""Loading a run directory (metrics.jsonl, config.json, manifest.json, bon.json) into one pandas table."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import warnings

import numpy as np
import pandas as pd

# One row per (member, eval step); the field list of ARCHITECTURE.md "Metrics on disk".
METRIC_FIELDS = (
    "step", "member", "family", "beta", "beta_eff", "lr", "seed", "gamma", "label_temp",
    "data_size", "kl", "kl_se", "kl_k1", "kl_k1_se", "kl_k3", "kl_k3_se", "sqrt_kl",
    "n_samples", "n_prompts", "gold/reward", "gold/reward_se", "gold/win_rate",
    "gold/win_rate_se", "response_len", "response_len_se", "eos_frac", "eos_frac_se",
    "entropy", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "rewards/gold_accuracies", "rho/mean", "offline_reg", "loss", "grad_norm", "diverged",
)
OPTIONAL_FIELDS = ("gold/network", "gold/network_se", "loglik", "loglik_se", "proxy/reward")
# The analysis cannot run without these; the rest are used when present.
REQUIRED_FIELDS = ("step", "member", "family", "beta", "beta_eff", "kl", "gold/reward")
# Member labels that are text, not numbers (``kind``: RL against a single proxy or an ensemble).
TEXT_FIELDS = ("family", "kind", "labels")
BON_KEYS = ("selector", "N", "n", "kl", "gold", "gold_se")

METRICS_FILE, CONFIG_FILE, MANIFEST_FILE, BON_FILE = (
    "metrics.jsonl", "config.json", "manifest.json", "bon.json")
PER_PROMPT_DIR = "per_prompt"     # <step:08d>.npz of [M, E] per-prompt means (runtime.writers)


@dataclasses.dataclass
class Run:
  """One run directory: the metrics table plus the optional JSON side files."""
  path: pathlib.Path
  table: pd.DataFrame
  config: dict | None
  manifest: dict | None
  bon: dict | None
  _per_prompt: dict | None = dataclasses.field(default=None, repr=False)

  @property
  def per_prompt(self) -> dict[int, dict[str, np.ndarray]]:
    """``{step: {name: array}}`` from ``per_prompt/`` (empty for runs that predate it).

    Names are the evaluator's: ``prompt/gold/reward`` etc. ``[M, E]`` per-prompt means
    (rows are member ids), ``sample/response`` etc. for shown samples.
    """
    if self._per_prompt is None:
      self._per_prompt = read_per_prompt(self.path)
    return self._per_prompt

  def prompt_matrix(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps [S], values [S, M, E])`` of per-prompt metric ``name`` (e.g. ``gold/reward``)."""
    pp = self.per_prompt
    key = "prompt/" + name
    steps = np.array(sorted(st for st in pp if key in pp[st]), dtype=np.int64)
    if steps.size == 0:
      raise KeyError(f"{self.path}: no per-prompt values of {name!r} (per_prompt/ missing "
                     "or from an older run)")
    shapes = {pp[int(st)][key].shape for st in steps}
    if len(shapes) != 1:
      raise ValueError(f"{self.path}: per-prompt {name!r} changes shape across steps: {shapes}")
    return steps, np.stack([pp[int(st)][key] for st in steps]).astype(np.float64)

  @property
  def valid(self) -> pd.DataFrame:
    """Rows usable for frontiers: not diverged, finite KL and gold."""
    t = self.table
    ok = ~t["diverged"] & np.isfinite(t["kl"]) & np.isfinite(t["gold/reward"])
    return t[ok]

  @property
  def families(self) -> list[str]:
    """Families in order of first appearance in the metrics file."""
    return list(dict.fromkeys(self.table["family"]))

  @property
  def label(self) -> str:
    """A short name for comparisons: the dataset size if unique, else the directory name."""
    sizes = self.table["data_size"].dropna().unique() if "data_size" in self.table else []
    if len(sizes) == 1:
      return f"data_size={_num(sizes[0])}"
    return self.path.name


def _num(x) -> str:
  x = float(x)
  return str(int(x)) if x.is_integer() else f"{x:g}"


def read_jsonl(path: pathlib.Path) -> list[dict]:
  """Reads JSON lines; a truncated final line (a crash mid-write) is skipped with a warning."""
  rows, lines = [], path.read_text().splitlines()
  for k, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if k == len(lines) - 1:
        warnings.warn(f"{path}: skipping truncated last line {k + 1}: {e}")
      else:
        raise ValueError(f"{path}: line {k + 1} is not JSON: {e}") from e
  return rows


def read_per_prompt(run_dir) -> dict[int, dict[str, np.ndarray]]:
  """Reads ``RUN_DIR/per_prompt/<step>.npz`` (keys spell ``/`` as ``__``)."""
  d = pathlib.Path(run_dir) / PER_PROMPT_DIR
  out = {}
  if not d.is_dir():
    return out
  for f in sorted(d.glob("*.npz")):
    if not f.stem.isdigit():
      continue
    with np.load(f) as z:
      out[int(f.stem)] = {k.replace("__", "/"): z[k] for k in z.files}
  return out


def _read_json(path: pathlib.Path) -> dict | None:
  return json.loads(path.read_text()) if path.exists() else None


def _check_bon(bon: dict, path: pathlib.Path) -> dict:
  missing = [k for k in BON_KEYS if k not in bon]
  if missing:
    raise ValueError(f"{path} lacks keys {missing}; expected {list(BON_KEYS)}")
  lengths = {k: len(bon[k]) for k in ("n", "kl", "gold", "gold_se")}
  if len(set(lengths.values())) != 1:
    raise ValueError(f"{path}: n/kl/gold/gold_se differ in length: {lengths}")
  return bon


def table_from_rows(rows: list[dict], source: str = "metrics") -> pd.DataFrame:
  """Builds the analysis table: checks required columns, fills ``sqrt_kl`` and ``diverged``."""
  if not rows:
    raise ValueError(f"{source}: no metric rows")
  t = pd.DataFrame(rows)
  missing = [c for c in REQUIRED_FIELDS if c not in t.columns]
  if missing:
    raise ValueError(f"{source}: missing required columns {missing}; the metric fields are {list(METRIC_FIELDS)}")
  for c in t.columns:
    if c not in TEXT_FIELDS + ("diverged",):
      t[c] = pd.to_numeric(t[c], errors="coerce")
  for c in TEXT_FIELDS:
    if c in t:
      t[c] = t[c].astype(str)
  t["diverged"] = t["diverged"].fillna(False).astype(bool) if "diverged" in t else False
  if "sqrt_kl" not in t:
    t["sqrt_kl"] = np.sqrt(t["kl"].clip(lower=0))
  # The writer drops rows past the resume step before re-logging them, so a (member, step)
  # pair appears once; a duplicate means two runs wrote one file (or a file was pasted
  # together), and averaging over it would be silently wrong.
  dup = t.duplicated(["member", "step"], keep=False)
  if dup.any():
    pairs = sorted({(int(m), int(st)) for m, st in t.loc[dup, ["member", "step"]].values})
    raise ValueError(f"{source}: {len(pairs)} (member, step) pairs have more than one row, "
                     f"e.g. {pairs[:5]}; two runs wrote this file. Rerun into a fresh workdir.")
  return t.sort_values(["member", "step"], kind="stable").reset_index(drop=True)


def load_run(run_dir) -> Run:
  """Loads ``RUN_DIR/metrics.jsonl`` and, if present, config, manifest and ``bon.json``.

  Args:
    run_dir: a trainer work directory.

  Returns:
    A ``Run``. Diverged rows stay in ``Run.table``; ``Run.valid`` drops them.
  """
  path = pathlib.Path(run_dir)
  metrics = path / METRICS_FILE
  if not metrics.exists():
    raise FileNotFoundError(f"{metrics} not found: is {path} a gpo_jax run directory?")
  table = table_from_rows(read_jsonl(metrics), str(metrics))
  bon = _read_json(path / BON_FILE)
  return Run(path=path, table=table, config=_read_json(path / CONFIG_FILE),
             manifest=_read_json(path / MANIFEST_FILE),
             bon=None if bon is None else _check_bon(bon, path / BON_FILE))
