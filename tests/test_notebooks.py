"""Executes the notebooks on tiny inputs and checks that each .ipynb matches its paired .py."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

import analysis_fixtures  # noqa: E402
import lab_fixture  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = ("run_explorer", "lab_explorer", "tabular_theory")
KERNEL = "gpo_jax_tests"
# The figures each notebook draws: tabular_theory and lab_explorer draw a fixed set;
# run_explorer draws the report's figures plus the step-budget figure.
TABULAR_FIGURES = 4   # minimisers, offline_reg vs KL, KL vs β / beta_eff, on-policy identity
LAB_FIGURES = 5       # SFT curve, gold distribution, label noise, ICL gain, entropy


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
  """A kernelspec that runs this interpreter, so the test works in any venv without `ipykernel install`."""
  root = tmp_path_factory.mktemp("jupyter")
  spec = root / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "gpo_jax tests", "language": "python"}))
  return root


def execute(name: str, kernel_dir, monkeypatch, tmp_path, **env) -> nbformat.NotebookNode:
  """Runs ``notebooks/<name>.ipynb`` in a fresh kernel with ``env`` set; raises on any cell error."""
  monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
  # The kernel imports gpo_jax from this checkout even when it is not pip-installed.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # run_explorer's figure folder
  for k, v in env.items():
    monkeypatch.setenv(k, str(v))
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=300,
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
  assert not errors, f"{name}: cells raised {[(e.ename, e.evalue) for e in errors]}"
  assert all(c.execution_count is not None for c in nb.cells if c.cell_type == "code"), (
      f"{name}: some code cells did not run")
  return nb


def images(nb) -> int:
  return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def markdown(nb) -> list[str]:
  return [o["data"]["text/markdown"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
          if "text/markdown" in o.get("data", {})]


def streams(nb) -> str:
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if o.output_type == "stream")


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory):
  return lab_fixture.get_tiny_lab(lab_fixture.shared_root(tmp_path_factory))


def test_tabular_theory_runs(kernel_dir, monkeypatch, tmp_path):
  nb = execute("tabular_theory", kernel_dir, monkeypatch, tmp_path, GPO_NB_STEPS=200)
  assert images(nb) == TABULAR_FIGURES, (
      f"tabular_theory drew {images(nb)} figures, expected {TABULAR_FIGURES}: a section lost its plot")


def test_lab_explorer_runs(kernel_dir, monkeypatch, tmp_path, tiny_lab):
  nb = execute("lab_explorer", kernel_dir, monkeypatch, tmp_path, GPO_LAB_DIR=tiny_lab.path, GPO_NB_SAMPLES=128)
  assert images(nb) == LAB_FIGURES, f"lab_explorer drew {images(nb)} figures, expected {LAB_FIGURES}"
  assert tiny_lab.path in streams(nb), "lab_explorer did not open the lab it was pointed at"


def expected_run_figures(run_dir) -> int:
  """Report figures for this run (4 always, 2 optional) plus the step-budget figure."""
  rows = [json.loads(line) for line in pathlib.Path(run_dir, "metrics.jsonl").read_text().splitlines() if line]
  has = lambda col: any(r.get(col) is not None for r in rows)  # noqa: E731
  return 4 + has("offline_reg") + (has("proxy/reward") or has("rewards/margins")) + 1


def check_run_explorer(nb, run_dir):
  assert images(nb) == expected_run_figures(run_dir), (
      f"run_explorer drew {images(nb)} figures, expected {expected_run_figures(run_dir)}")
  assert str(run_dir) in streams(nb), "run_explorer did not open the run it was pointed at"
  findings = [m for m in markdown(nb) if m.startswith(("**1.", "**2.", "**3."))]
  assert len(findings) == 3, f"run_explorer showed {len(findings)} of the report's 3 findings"
  assert not (pathlib.Path(run_dir) / "report").exists(), "run_explorer wrote into the run directory"


def test_run_explorer_on_synthetic_run(kernel_dir, monkeypatch, tmp_path):
  run_dir = analysis_fixtures.write_synthetic_run(tmp_path / "synthetic_run")
  nb = execute("run_explorer", kernel_dir, monkeypatch, tmp_path, GPO_RUN_DIR=run_dir, GPO_STEP=500)
  check_run_explorer(nb, run_dir)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_lab):
  """The real trainer's tiny sweep (``configs/tiny_sweep.py``), reusing the tiny lab."""
  workdir = tmp_path_factory.mktemp("tiny_sweep") / "run"
  cmd = [sys.executable, "-m", "gpo_jax.main", "--config", str(REPO / "configs" / "tiny_sweep.py"),
         "--workdir", str(workdir), f"--config.lab_root={os.path.dirname(tiny_lab.path)}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"tiny sweep failed:\n{proc.stderr[-3000:]}"
  return workdir


def test_run_explorer_on_tiny_sweep(kernel_dir, monkeypatch, tmp_path, tiny_run):
  nb = execute("run_explorer", kernel_dir, monkeypatch, tmp_path, GPO_RUN_DIR=tiny_run)
  check_run_explorer(nb, tiny_run)


@pytest.mark.parametrize("name", NAMES)
def test_py_and_ipynb_in_sync(name):
  py = jupytext.read(NOTEBOOKS / f"{name}.py")
  ipynb = jupytext.read(NOTEBOOKS / f"{name}.ipynb")
  cells = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]  # noqa: E731
  assert cells(py) == cells(ipynb), (
      f"notebooks/{name}.py and .ipynb differ: run `jupytext --sync notebooks/{name}.py`")
  assert ipynb.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent", (
      f"notebooks/{name}.ipynb is not paired with its .py (jupytext formats metadata)")


@pytest.mark.parametrize("name", NAMES)
def test_ipynb_outputs_stripped(name):
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  dirty = [i for i, c in enumerate(nb.cells)
           if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
  assert not dirty, f"notebooks/{name}.ipynb has outputs in cells {dirty}: strip them before committing"
