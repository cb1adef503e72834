"""The package's arrows run one way: each subpackage imports only the layers below it (ARCHITECTURE.md, package map)."""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "gpo_jax"

# subpackage -> the gpo_jax subpackages it may import (besides itself)
ALLOWED = {
    "core": set(),
    "runtime": set(),
    "objectives": {"core"},
    "lab": {"core", "objectives"},
    "engine": {"runtime", "core"},
    "proxies": {"core", "objectives", "runtime"},
    "evaluation": {"core", "objectives", "runtime", "proxies"},
    "incontext": {"core", "lab", "evaluation", "objectives", "runtime"},
    "algorithms": {"engine", "evaluation", "objectives", "core", "lab", "runtime", "analysis",
                   "proxies", "incontext"},
    "run": {"algorithms", "engine", "evaluation", "objectives", "core", "lab", "runtime",
            "analysis"},
    "pipeline": {"run", "analysis", "incontext", "lab", "runtime"},
    "main": {"run", "pipeline"},
    "analysis": {"evaluation.bon", "objectives.ensembles"},
}


def _imports(path: pathlib.Path) -> set[str]:
  """Every ``gpo_jax.<x>[.<y>]`` a file imports, at any depth (lazy imports count too)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gpo_jax"):
      parts = node.module.split(".")[1:]
      if not parts:          # from gpo_jax import x
        out |= {a.name for a in node.names}
      else:
        out.add(".".join(parts[:2]) if len(parts) > 1 else parts[0])
        if len(parts) == 1:
          out |= {f"{parts[0]}.{a.name}" for a in node.names}
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("gpo_jax."):
          out.add(".".join(a.name.split(".")[1:3]))
  return out


def _layer(path: pathlib.Path) -> str:
  rel = path.relative_to(PKG)
  return rel.parts[0] if len(rel.parts) > 1 else rel.stem


FILES = [p for p in sorted(PKG.rglob("*.py")) if p.name != "__init__.py" or p.parent != PKG]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_module_imports_only_lower_layers(path):
  layer = _layer(path)
  if layer not in ALLOWED:
    pytest.fail(f"{path.relative_to(PKG)} is in no layer of ALLOWED; add its package there")
  allowed = ALLOWED[layer] | {layer}
  bad = sorted(m for m in _imports(path)
               if m.split(".")[0] not in allowed and m not in allowed
               and not (layer == "analysis" and m.startswith("analysis")))
  # analysis may import exactly gpo_jax.evaluation.bon, nothing else of evaluation
  if layer == "analysis":
    bad = sorted(m for m in _imports(path) if not m.startswith("analysis")
                 and m not in ("evaluation.bon", "evaluation", "objectives.ensembles",
                               "objectives"))
  assert not bad, (f"{path.relative_to(PKG)} ({layer}) imports {bad}; allowed: "
                   f"{sorted(allowed)} — an arrow that runs back up")


def test_every_module_starts_with_a_docstring():
  missing = [str(p.relative_to(PKG)) for p in sorted(PKG.rglob("*.py"))
             if ast.get_docstring(ast.parse(p.read_text())) is None]
  assert not missing, f"modules without a one-sentence docstring: {missing}"
