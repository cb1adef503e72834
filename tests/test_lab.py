"""Tests of the lab artifact: gold normalisation, label statistics, π_ref quality, data integrity, corruption."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest

from gpo_jax.lab import corpus as corpus_lib
from gpo_jax import lab as lab_lib
from gpo_jax.lab import builder as lab_builder
from gpo_jax.lab import store as lab_store
from gpo_jax.lab import gold as gold_lib
from gpo_jax.lab import steps as lab_build

# The module, not the function ``build`` that ``gpo_jax.lab`` re-exports under the same name.

import lab_fixture


@pytest.fixture(scope="session")
def tiny_lab(tmp_path_factory):
  return lab_fixture.get_tiny_lab(lab_fixture.shared_root(tmp_path_factory))


def _models(lab):
  import flax.nnx as nnx
  pg, ps = nnx.split(lab.policy())
  gg, gs = nnx.split(lab.gold())
  return lab_build.Models(pg, ps, gg, gs, lab.gold_mean, lab.gold_std, lab.gold_terms,
                          gold_lib.tables(lab.corpus))


# ---------------------------------------------------------------------- labels (pure)
def test_bt_labels_soft_hard_and_flip_match_predictions():
  rng = np.random.default_rng(0)
  n = 40000
  ga, gb = rng.normal(size=n), rng.normal(size=n)
  for temp in (0.3, 1.0):
    for hard, flip in ((False, 0.0), (True, 0.0), (False, 0.2), (True, 0.1)):
      a_wins = lab_build.bt_labels(np.random.default_rng(1), ga, gb, temp, hard, flip)
      g_c, g_r = np.where(a_wins, ga, gb), np.where(a_wins, gb, ga)
      obs, m = lab_build.observed_agreement(g_c, g_r)
      pred = lab_build.predicted_agreement(ga, gb, temp, hard, flip)
      if hard and flip == 0:
        assert obs == 1.0, "hard labels must always pick the gold argmax"
      # Independent closed form of the predicted agreement.
      a = np.ones(n) if hard else 1 / (1 + np.exp(-np.abs(ga - gb) / temp))
      np.testing.assert_allclose(pred, np.mean((1 - flip) * a + flip * (1 - a)), rtol=1e-12)
      se = np.sqrt(np.sum(((1 - flip) * a + flip * (1 - a)) * (flip * a + (1 - flip) * (1 - a)))) / m
      se = max(se, 1e-9)
      assert abs(obs - pred) < 4 * se + 1e-12, (
          f"temp={temp} hard={hard} flip={flip}: agreement {obs:.4f} vs BT prediction "
          f"{pred:.4f} (se {se:.4f}); the label sampler does not follow Bradley-Terry")


def test_bt_labels_bad_input():
  with pytest.raises(ValueError, match="label_temp"):
    lab_build.bt_labels(np.random.default_rng(0), np.zeros(2), np.zeros(2), 0.0)
  with pytest.raises(ValueError, match="label_flip"):
    lab_build.bt_labels(np.random.default_rng(0), np.zeros(2), np.zeros(2), 1.0, flip=1.5)


# ---------------------------------------------------------------------- the tiny lab
def test_gold_normalised_under_fresh_ref_samples(tiny_lab):
  lab = tiny_lab
  models = _models(lab)
  cor = lab.corpus
  n = 2048
  ctx = cor.context(cor.sample_prompts(np.random.default_rng(12345), n))
  resp, mask = lab_build.sample_responses(models.policy_graphdef, models.policy_state, ctx,
                                       jax.random.key(999), response_len=cor.cfg.response_len,
                                       temperature=lab.cfg.sample_temperature, batch_size=256)
  g = lab_build.score_gold(models, ctx, resp, mask, 256)
  n_norm = lab.cfg.gold_norm_samples
  # The constants carry their own sampling error (n_norm samples): combine both.
  se_mean = np.sqrt(1 / n + 1 / n_norm)
  assert abs(g.mean()) < 4 * se_mean, f"fresh π_ref gold mean {g.mean():.3f} is not ~0"
  m4 = np.mean((g - g.mean()) ** 4)
  se_std = np.sqrt((m4 - g.var() ** 2) / n) / (2 * g.std()) * np.sqrt(1 + n / n_norm)
  assert abs(g.std() - 1) < 4 * se_std, f"fresh π_ref gold std {g.std():.3f} is not ~1"
  # Lab.gold_score (the public path) agrees with the batched scorer.
  np.testing.assert_allclose(lab.gold_score(ctx[:8], resp[:8], mask[:8]), g[:8], rtol=1e-4,
                             atol=1e-4)


def test_stored_labels_follow_gold_bt(tiny_lab):
  lab = tiny_lab
  p = {k: np.concatenate([lab.pairs("train")[k], lab.pairs("test")[k]])
       for k in ("gold_chosen", "gold_rejected", "label_p")}
  g_c, g_r = p["gold_chosen"].astype(np.float64), p["gold_rejected"].astype(np.float64)
  untied = g_c != g_r
  a = 1 / (1 + np.exp(-np.abs(g_c - g_r)[untied] / lab.cfg.label_temp))
  obs = np.mean(g_c[untied] > g_r[untied])
  se = np.sqrt(np.sum(a * (1 - a))) / untied.sum()
  assert abs(obs - a.mean()) < 4 * se, (
      f"stored labels agree with gold on {obs:.3f}, BT predicts {a.mean():.3f} ± {se:.3f}")
  np.testing.assert_allclose(p["label_p"], 1 / (1 + np.exp(-(g_c - g_r) / lab.cfg.label_temp)),
                             rtol=1e-5, atol=1e-6, err_msg="label_p must be σ(Δgold / temp)")


def test_hard_and_noisy_labels_through_make_pairs(tiny_lab):
  lab = tiny_lab
  models = _models(lab)
  kw = dict(label_temp=1.0, temperature=1.0, batch_size=256)
  hard = lab_build.make_pairs(models, lab.corpus, 256, 5, 1, hard=True, flip=0.0, **kw)
  assert np.all(hard["gold_chosen"] >= hard["gold_rejected"]), "hard labels must follow gold"
  eps = 0.3
  noisy = lab_build.make_pairs(models, lab.corpus, 512, 5, 2, hard=True, flip=eps, **kw)
  obs, m = lab_build.observed_agreement(noisy["gold_chosen"], noisy["gold_rejected"])
  se = np.sqrt(eps * (1 - eps) / m)
  assert abs(obs - (1 - eps)) < 4 * se, f"flip noise {eps}: agreement {obs:.3f}, expected {1 - eps}"


def test_ref_logps_equal_recomputation(tiny_lab):
  lab = tiny_lab
  pairs = lab.pairs("test")
  model = lab.policy()
  for side in ("chosen", "rejected"):
    tokens = np.concatenate([pairs["prompt"], pairs[side]], axis=1)[:64]
    logits = np.asarray(model(tokens[:, :-1]), np.float64)
    # Independent NumPy log-softmax and target gather.
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logp = np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0] - logz
    c = pairs["prompt"].shape[1]
    want = (logp[:, c - 1:] * pairs[f"{side}_mask"][:64]).sum(-1)
    np.testing.assert_allclose(pairs[f"ref_{side}_logps"][:64], want, rtol=1e-4, atol=1e-3,
                               err_msg=f"stored ref_{side}_logps differ from π_ref's log-probs")


def test_pairs_layout(tiny_lab):
  lab = tiny_lab
  c = lab.cfg.corpus
  for split, n in (("train", lab.cfg.n_train_pairs), ("test", lab.cfg.n_test_pairs)):
    p = lab.pairs(split)
    assert p["prompt"].shape == (n, c.prompt_len + 2)
    assert np.all(p["prompt"][:, 0] == corpus_lib.BOS) and np.all(p["prompt"][:, -1] == corpus_lib.SEP)
    for side in ("chosen", "rejected"):
      assert p[side].shape == (n, c.response_len)
      # The mask covers positions up to and including the first EOS (by position, not by
      # token id: π_ref may rarely sample a PAD id inside a response).
      is_eos = p[side] == corpus_lib.EOS
      first = np.where(is_eos.any(-1), np.argmax(is_eos, -1), c.response_len - 1)
      want = (np.arange(c.response_len)[None] <= first[:, None]).astype(np.int32)
      np.testing.assert_array_equal(p[f"{side}_mask"], want, err_msg=f"{split} {side}_mask")
      after = np.arange(c.response_len)[None] > first[:, None]
      assert np.all(p[side][after] == corpus_lib.PAD), "tokens after EOS must be PAD"
  assert lab.eval_prompts.shape == (lab.cfg.n_eval_prompts, c.prompt_len + 2)


def test_icl_gain_positive(tiny_lab):
  s = tiny_lab.stats
  assert s["icl/bayes_gain"] > 0.5, "the corpus must reward in-context style inference"
  assert s["icl/gain"] > 3 * s["icl/gain_se"], (
      f"π_ref gains {s['icl/gain']:.3f} ± {s['icl/gain_se']:.3f} nats/response from two "
      "same-style demonstrations: it does not use its context")
  assert s["icl/gain"] < s["icl/bayes_gain"] + 4 * s["icl/gain_se"], "gain beyond Bayes-optimal"


def test_ref_entropy_in_band(tiny_lab):
  s = tiny_lab.stats
  h, log_v = s["ref/entropy_per_token"], s["ref/log_vocab"]
  assert 0.5 < h < log_v - 0.2, (
      f"π_ref entropy {h:.3f} nats/token should be well inside (0, log V = {log_v:.3f}): "
      "near log V means SFT failed, near 0 leaves nothing to optimise")


def test_tfds_roundtrip_in_fresh_process(tiny_lab, tmp_path):
  lab = tiny_lab
  out = tmp_path / "from_tfds.npz"
  script = textwrap.dedent(f"""
      import numpy as np, tensorflow_datasets as tfds
      src = tfds.data_source("gpo_lab", split="test", data_dir={os.path.join(lab.path, 'tfds')!r})
      b = tfds.builder_from_directory({lab.tfds_dir!r}).as_data_source(split="test")
      assert len(src) == len(b)
      ex = [src[i] for i in range(len(src))]
      np.savez({str(out)!r}, **{{k: np.stack([np.asarray(e[k]) for e in ex]) for k in ex[0]}})
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=str(tmp_path),
                 capture_output=True)
  got = np.load(out)
  want = lab.pairs("test")
  assert set(got.files) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k].astype(want[k].dtype), want[k],
                                  err_msg=f"{k} differs between a fresh tfds reader and Lab.pairs")


def test_load_lab_twice_reuses(tiny_lab, tmp_path_factory):
  msgs = []
  lab = lab_lib.build_or_load(lab_fixture.tiny_config(),
                              lab_fixture.shared_root(tmp_path_factory), log=msgs.append)
  assert any("reusing" in m for m in msgs), f"second build_or_load must reuse, got {msgs}"
  assert lab.path == tiny_lab.path
  assert lab.stats["data/sha256"] == tiny_lab.stats["data/sha256"]


# ---------------------------------------------------------------------- corruption
def _copy(lab, tmp_path):
  dst = tmp_path / os.path.basename(lab.path)
  shutil.copytree(lab.path, dst)
  return str(dst)


def _array_record(path):
  d = os.path.join(path, "tfds", "gpo_lab", "1.0.0")
  return os.path.join(d, sorted(f for f in os.listdir(d) if "train.array_record" in f)[0])


def test_copied_lab_loads(tiny_lab, tmp_path):
  # A lab is relocatable: nothing in it depends on its absolute path.
  lab = lab_lib.load_lab(_copy(tiny_lab, tmp_path))
  for k, v in tiny_lab.pairs("test").items():
    np.testing.assert_array_equal(lab.pairs("test")[k], v)
  np.testing.assert_array_equal(lab.eval_prompts, tiny_lab.eval_prompts)


def test_load_lab_rejects_missing_lab_json(tiny_lab, tmp_path):
  path = _copy(tiny_lab, tmp_path)
  os.remove(os.path.join(path, "lab.json"))
  with pytest.raises(lab_lib.LabError, match="lab.json is missing"):
    lab_lib.load_lab(path)


def test_load_lab_rejects_missing_file(tiny_lab, tmp_path):
  path = _copy(tiny_lab, tmp_path)
  os.remove(os.path.join(path, "eval_prompts.npy"))
  with pytest.raises(lab_lib.LabError, match="missing files.*eval_prompts.npy"):
    lab_lib.load_lab(path)


def test_load_lab_rejects_flipped_bytes(tiny_lab, tmp_path):
  path = _copy(tiny_lab, tmp_path)
  target = _array_record(path)
  data = bytearray(open(target, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(target, "wb").write(bytes(data))
  with pytest.raises(lab_lib.LabError, match="checksum mismatch.*array_record"):
    lab_lib.load_lab(path)


def _micro_config():
  # The tiny lab cut down further (same shapes, so compiled functions are reused when the
  # tiny lab was built in this process): a valid lab in a few seconds, for rebuild tests.
  return lab_fixture.tiny_config(name="micro", sft_steps=20, sft_eval_every=10,
                                 gold_norm_samples=64, n_train_pairs=32, n_test_pairs=16,
                                 n_eval_prompts=8, n_stat_episodes=32)


def test_corrupt_lab_is_rebuilt_identically(tmp_path):
  cfg = _micro_config()
  lab1 = lab_lib.build_or_load(cfg, str(tmp_path), log=lambda m: None)
  digest = lab1.stats["data/sha256"]
  arrays1 = {s: lab1.pairs(s) for s in ("train", "test")}
  target = _array_record(lab1.path)
  with open(target, "r+b") as f:
    f.truncate(os.path.getsize(target) // 2)
  msgs = []
  lab2 = lab_lib.build_or_load(cfg, str(tmp_path), log=msgs.append)
  assert any("invalid lab" in m and "checksum mismatch" in m for m in msgs), msgs
  aside = [d for d in os.listdir(tmp_path) if ".corrupt-" in d]
  assert len(aside) == 1, f"the corrupt lab must be moved aside, found {os.listdir(tmp_path)}"
  # Same config and seed: identical bytes.
  assert lab2.stats["data/sha256"] == digest, "rebuilding with the same seed changed the data"
  for s in ("train", "test"):
    for k, v in arrays1[s].items():
      np.testing.assert_array_equal(lab2.pairs(s)[k], v, err_msg=f"{s}/{k} not reproducible")
  assert lab_lib.arrays_digest(lab2.pairs("train")) == digest["train"]
  lab_lib.load_lab(lab2.path)  # the rebuilt lab verifies


def test_build_or_load_builds_once_under_concurrency(tmp_path, monkeypatch):
  cfg = _micro_config()
  calls = []

  def fake_build(cfg_, out_dir, log=print):
    calls.append(out_dir)
    os.makedirs(out_dir)
    time.sleep(0.3)
    open(os.path.join(out_dir, "lab.json"), "w").write("{}")

  def fake_load(path, verify=True):
    if not os.path.exists(os.path.join(path, "lab.json")):
      raise lab_lib.LabError("incomplete")
    return path

  monkeypatch.setattr(lab_builder, "build", fake_build)
  monkeypatch.setattr(lab_store, "load_lab", fake_load)
  results = []
  threads = [threading.Thread(target=lambda: results.append(
      lab_lib.build_or_load(cfg, str(tmp_path), log=lambda m: None))) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(calls) == 1, f"concurrent build_or_load built {len(calls)} times"
  assert len(set(results)) == 1 and len(results) == 3


def test_config_hash_and_overrides():
  a = lab_fixture.tiny_config()
  assert a.config_hash() == lab_fixture.tiny_config().config_hash()
  assert a.config_hash() == lab_fixture.tiny_config(name="other").config_hash(), \
      "the name is a label, not content"
  assert a.config_hash() != lab_fixture.tiny_config(seed=1).config_hash()
  assert lab_lib.LabConfig.from_dict(json.loads(json.dumps(a.to_dict()))) == a
  with pytest.raises(ValueError, match="unknown LabConfig fields"):
    lab_lib.LabConfig.from_dict({"not_a_field": 1})
  with pytest.raises(ValueError, match="label_temp"):
    lab_fixture.tiny_config(label_temp=0.0)


def test_load_lab_missing_directory(tmp_path):
  with pytest.raises(lab_lib.LabError, match="does not exist"):
    lab_lib.load_lab(str(tmp_path / "nope"))


# ---------------------------------------------------------------------- slow: the small lab
@pytest.mark.slow
def test_small_lab_icl_gain_and_entropy(tmp_path_factory):
  cfg = lab_lib.load_config(os.path.join(lab_fixture.REPO, "configs", "lab.py") + ":small")
  lab = lab_lib.build_or_load(cfg, lab_fixture.shared_root(tmp_path_factory))
  s = lab.stats
  assert s["icl/gain"] > 4 * s["icl/gain_se"], (
      f"small π_ref shows no in-context gain: {s['icl/gain']:.3f} ± {s['icl/gain_se']:.3f}")
  assert 0.5 < s["ref/entropy_per_token"] < s["ref/log_vocab"] - 0.5
  assert s["sft/final_heldout"] < s["sft/first_heldout"]
