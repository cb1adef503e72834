"""Shared helper for tests that need a built lab: ``get_tiny_lab(tmp_root)`` builds ``configs/lab.py:tiny`` once."""

import os

from gpo_jax import lab as lab_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SPEC = os.path.join(REPO, "configs", "lab.py") + ":tiny"


def tiny_config(**overrides) -> lab_lib.LabConfig:
  """The ``tiny`` lab config, optionally with top-level fields replaced."""
  return lab_lib.load_config(TINY_SPEC, **overrides)


def shared_root(tmp_path_factory) -> str:
  """A directory shared by all pytest-xdist workers of one run (the base temp's parent).

  Each xdist worker gets its own base temp ``.../popen-gwN``; their parent is common, so
  labs built there are built once per run and reused by every worker.
  """
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  path = os.path.join(str(root), "shared_labs")
  os.makedirs(path, exist_ok=True)
  return path


def get_tiny_lab(tmp_root) -> lab_lib.Lab:
  """Builds (once, even across concurrent xdist workers: ``build_or_load`` holds an fcntl
  lock) or loads the tiny lab under ``tmp_root``.

  Typical use in a test module::

    @pytest.fixture(scope="session")
    def tiny_lab(tmp_path_factory):
      return lab_fixture.get_tiny_lab(lab_fixture.shared_root(tmp_path_factory))
  """
  return lab_lib.build_or_load(tiny_config(), str(tmp_root), log=lambda msg: None)


def load_config(name: str, arg: str | None = None):
  """``configs/<name>``'s ``get_config(arg)``, loaded by path as the ``--config`` flag does."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(REPO, "configs",
                                                                               name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
