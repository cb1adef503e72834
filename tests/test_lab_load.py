"""Tests of how a lab load failure is classified: only a bad artifact is moved aside and rebuilt."""

import errno
import hashlib
import json
import os
import shutil

import orbax.checkpoint as ocp
import pytest

from gpo_jax import lab as lab_lib
from gpo_jax.lab import builder as lab_builder
from gpo_jax.lab import store as lab_store

# The module, not the function ``build`` that ``gpo_jax.lab`` re-exports under the same name.

import lab_fixture


@pytest.fixture(scope="session")
def tiny_lab(tmp_path_factory):
  return lab_fixture.get_tiny_lab(lab_fixture.shared_root(tmp_path_factory))


@pytest.fixture
def work(tiny_lab, tmp_path):
  """A private copy of the tiny lab at ``<workdir>/<dirname>`` (the shared one stays intact)."""
  workdir = tmp_path / "labs"
  path = workdir / os.path.basename(tiny_lab.path)
  shutil.copytree(tiny_lab.path, path)
  return str(workdir), str(path)


@pytest.fixture
def fake_build(tiny_lab, monkeypatch):
  """Replaces the minutes-long build by a copy of the pristine tiny lab; records each call."""
  calls = []

  def build(cfg, out_dir, log=print):
    calls.append(out_dir)
    shutil.copytree(tiny_lab.path, out_dir)
    return {}

  monkeypatch.setattr(lab_builder, "build", build)
  return calls


def _snapshot(root):
  """{relative path: SHA-256} of every file under ``root``: equal snapshots, untouched lab."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return out


def _largest_weights_file(path):
  d = os.path.join(path, "policy", "ocdbt.process_0", "d")
  return max((os.path.join(d, f) for f in os.listdir(d)), key=os.path.getsize)


def _flip_byte(file):
  data = bytearray(open(file, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(file, "wb").write(bytes(data))


def _edit_meta(path, fn):
  """Edits lab.json and re-seals its self-checksum: a consistent lab.json that is wrong in the
  one way ``fn`` makes it (the seal itself is tested in test_hardening.py)."""
  meta_path = os.path.join(path, "lab.json")
  meta = json.load(open(meta_path))
  fn(meta)
  meta[lab_store.META_DIGEST] = lab_store.meta_digest(meta)
  json.dump(meta, open(meta_path, "w"))


def _replace_keeping_checksum(path, rel, data):
  """Overwrites ``rel`` and records its new SHA-256 in lab.json, so verification passes."""
  open(os.path.join(path, rel), "wb").write(data)
  _edit_meta(path, lambda m: m["files"].__setitem__(rel, hashlib.sha256(data).hexdigest()))


def _asides(workdir):
  return sorted(d for d in os.listdir(workdir) if ".corrupt-" in d)


def _assert_left_in_place(workdir, path, before, fake_build):
  assert os.path.isdir(path), f"the lab {path} was moved or deleted"
  assert _snapshot(path) == before, "the lab's files changed although it was not corrupt"
  assert not _asides(workdir), f"a lab that is not corrupt was moved aside: {_asides(workdir)}"
  assert not fake_build, "a lab that is not corrupt triggered a rebuild"


# ---------------------------------------------------------------------- corrupt: rebuild
def test_flipped_weights_byte_is_caught_by_checksum_before_any_restore(work, monkeypatch):
  _, path = work
  _flip_byte(_largest_weights_file(path))
  restored = []
  monkeypatch.setattr(lab_store, "_restore_state", lambda *a: restored.append(a))
  with pytest.raises(lab_lib.LabCorruptError, match=r"checksum mismatch.*policy/ocdbt"):
    lab_lib.load_lab(path)
  assert not restored, "orbax was asked to deserialise weights before their checksums passed"


def test_flipped_weights_byte_moves_lab_aside_and_rebuilds(work, fake_build):
  workdir, path = work
  _flip_byte(_largest_weights_file(path))
  damaged = _snapshot(path)
  msgs = []
  lab = lab_lib.build_or_load(lab_fixture.tiny_config(), workdir, log=msgs.append)
  assert len(fake_build) == 1, f"a corrupt lab must be rebuilt once, build ran {len(fake_build)}x"
  asides = _asides(workdir)
  assert len(asides) == 1, f"the corrupt lab must be moved aside, found {os.listdir(workdir)}"
  assert _snapshot(os.path.join(workdir, asides[0])) == damaged, \
      "the corrupt lab must be kept byte for byte next to the rebuilt one"
  assert any("invalid lab" in m and "checksum mismatch" in m for m in msgs), msgs
  assert lab.path == path and lab_lib.load_lab(path).cfg == lab_fixture.tiny_config()


def test_missing_lab_json_moves_lab_aside_and_rebuilds(work, fake_build):
  workdir, path = work
  os.remove(os.path.join(path, "lab.json"))
  msgs = []
  lab_lib.build_or_load(lab_fixture.tiny_config(), workdir, log=msgs.append)
  assert len(fake_build) == 1, "a lab without lab.json (unfinished build) must be rebuilt"
  assert len(_asides(workdir)) == 1
  assert any("lab.json is missing" in m for m in msgs), msgs


def _garbage_json(path):
  open(os.path.join(path, "lab.json"), "wb").write(b"\x00{not json")


def _stale_code(path):
  _edit_meta(path, lambda m: m.__setitem__("code_version", "0"))


def _no_files(path):
  _edit_meta(path, lambda m: m.__setitem__("files", {}))


def _bad_digest(path):
  _edit_meta(path, lambda m: m["files"].__setitem__("eval_prompts.npy", "not-a-sha256"))


def _config_edited(path):
  _edit_meta(path, lambda m: m["config"].__setitem__("seed", 12345))


def _unknown_config_field(path):
  _edit_meta(path, lambda m: m["config"].__setitem__("no_such_knob", 1))


def _missing_weights_file(path):
  os.remove(_largest_weights_file(path))


@pytest.mark.parametrize("damage, message", [
    (_garbage_json, "lab.json is unreadable or malformed"),
    (_stale_code, "lab code version '0'"),
    (_no_files, r"lists no files for \['policy/', 'gold/'"),
    (_bad_digest, "malformed \"files\" entries"),
    (_config_edited, "records config hash"),
    (_unknown_config_field, "not a valid LabConfig"),
    (_missing_weights_file, r"missing files \['policy/ocdbt"),
])
def test_bad_artifact_is_corrupt(work, damage, message):
  _, path = work
  damage(path)
  with pytest.raises(lab_lib.LabCorruptError, match=message):
    lab_lib.load_lab(path)


def test_config_hash_must_match_directory_name(work):
  workdir, path = work
  other = os.path.join(workdir, "tiny-000000000000")
  os.rename(path, other)
  with pytest.raises(lab_lib.LabCorruptError, match="directory name says config hash"):
    lab_lib.load_lab(other)
  # A name without a hash suffix is a user's relocation, not a contradiction.
  plain = os.path.join(workdir, "my_lab")
  os.rename(other, plain)
  assert lab_lib.load_lab(plain).cfg == lab_fixture.tiny_config()


# ---------------------------------------------------------------------- not corrupt: keep
def test_transient_restore_error_propagates_and_keeps_lab(work, fake_build, monkeypatch):
  workdir, path = work
  before = _snapshot(path)

  def failing_restore(self, *args, **kwargs):
    raise OSError(errno.EMFILE, "Too many open files")

  monkeypatch.setattr(ocp.StandardCheckpointer, "restore", failing_restore)
  msgs = []
  with pytest.raises(OSError) as info:
    lab_lib.build_or_load(lab_fixture.tiny_config(), workdir, log=msgs.append)
  assert info.value.errno == errno.EMFILE and not isinstance(info.value, lab_lib.LabError), \
      "a transient OSError must keep its type so callers can retry"
  notes = " ".join(getattr(info.value, "__notes__", []))
  assert path in notes and "policy/" in notes, f"the error must name the lab and stage: {notes!r}"
  assert any("left in place" in m and "Too many open files" in m for m in msgs), msgs
  _assert_left_in_place(workdir, path, before, fake_build)


def test_io_error_while_verifying_checksums_is_not_corruption(work, fake_build, monkeypatch):
  workdir, path = work
  before = _snapshot(path)

  def failing_sha256(file):
    raise OSError(errno.EIO, "Input/output error", file)

  monkeypatch.setattr(lab_store, "_sha256", failing_sha256)
  with pytest.raises(OSError, match="Input/output error") as info:
    lab_lib.build_or_load(lab_fixture.tiny_config(), workdir, log=lambda m: None)
  assert not isinstance(info.value, lab_lib.LabError)
  monkeypatch.undo()
  _assert_left_in_place(workdir, path, before, fake_build)


def test_unreadable_lab_json_is_not_missing(work, fake_build, monkeypatch):
  # EACCES on lab.json must not read as "lab.json is missing" (which would rebuild).
  workdir, path = work
  before = _snapshot(path)
  real_open = open

  def guarded_open(file, *args, **kwargs):
    if str(file).endswith("lab.json"):
      raise PermissionError(errno.EACCES, "Permission denied", str(file))
    return real_open(file, *args, **kwargs)

  monkeypatch.setattr("builtins.open", guarded_open)
  with pytest.raises(PermissionError):
    lab_lib.build_or_load(lab_fixture.tiny_config(), workdir, log=lambda m: None)
  monkeypatch.undo()
  _assert_left_in_place(workdir, path, before, fake_build)


def test_restore_bug_raises_load_error_and_keeps_lab(work, fake_build, monkeypatch):
  # What a multi-process orbax restore onto the wrong topology looked like: not corruption.
  workdir, path = work
  before = _snapshot(path)

  def failing_restore(self, *args, **kwargs):
    raise ValueError("sharding topology mismatch")

  monkeypatch.setattr(ocp.StandardCheckpointer, "restore", failing_restore)
  with pytest.raises(lab_lib.LabLoadError, match=r"policy/.*topology mismatch.*checksums"):
    lab_lib.build_or_load(lab_fixture.tiny_config(), workdir, log=lambda m: None)
  _assert_left_in_place(workdir, path, before, fake_build)


# After a failed tensorstore read, orbax's event loop reports a callback on a closed loop;
# it is orbax's own cleanup and does not affect the outcome.
_ORBAX_CLOSED_LOOP = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")
# The report can surface during whichever test of this module runs when the loop is
# collected, so the filter covers the module.
pytestmark = _ORBAX_CLOSED_LOOP


@_ORBAX_CLOSED_LOOP
@pytest.mark.parametrize("rel", ["eval_prompts.npy", "policy/_METADATA", "policy/manifest.ocdbt"])
def test_checksum_verified_file_that_fails_to_parse_is_not_rebuilt(work, fake_build, rel):
  workdir, path = work
  _replace_keeping_checksum(path, rel, b"bytes no loader understands\n" * 40)
  before = _snapshot(path)
  with pytest.raises(lab_lib.LabLoadError) as info:
    lab_lib.build_or_load(lab_fixture.tiny_config(), workdir, log=lambda m: None)
  msg = str(info.value)
  stage_file = rel if rel == "eval_prompts.npy" else "policy/"
  for want in (stage_file, path, "match the SHA-256 checksums", "version", "left in place"):
    assert want in msg, f"the error must name {want!r}; got: {msg}"
  assert info.value.__cause__ is not None, "the loader's own exception must be chained"
  _assert_left_in_place(workdir, path, before, fake_build)


def test_load_error_names_versions_that_changed_since_the_build(work):
  _, path = work
  _replace_keeping_checksum(path, "eval_prompts.npy", b"not an npy file")
  _edit_meta(path, lambda m: m["versions"].__setitem__("orbax", "0.0.1"))
  with pytest.raises(lab_lib.LabLoadError,
                     match=r"Versions differ from the build: orbax 0\.0\.1 ->"):
    lab_lib.load_lab(path)


def test_unparseable_pairs_name_the_tfds_dir(work):
  _, path = work
  rel = "tfds/gpo_lab/1.0.0/features.json"
  _replace_keeping_checksum(path, rel, b"{not json")
  lab = lab_lib.load_lab(path)  # pairs are read lazily
  with pytest.raises(lab_lib.LabLoadError, match=r"'train' pairs failed on tfds/gpo_lab/1.0.0"):
    lab.pairs("train")
  assert os.path.isdir(path)


@_ORBAX_CLOSED_LOOP
def test_unverified_load_failure_says_checksums_were_not_checked(work):
  _, path = work
  _flip_byte(os.path.join(path, "policy", "manifest.ocdbt"))
  with pytest.raises(lab_lib.LabLoadError, match="verify=False"):
    lab_lib.load_lab(path, verify=False)
  with pytest.raises(lab_lib.LabCorruptError, match="checksum mismatch"):
    lab_lib.load_lab(path)
