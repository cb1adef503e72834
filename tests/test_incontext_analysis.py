"""The in-context report (gpo_jax.analysis.incontext) on synthetic pipeline directories with known effects."""

import json
import math
import pathlib

import numpy as np
import pandas as pd
import pytest

from gpo_jax.analysis import incontext
from gpo_jax.analysis.findings import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED

E = 40                     # eval prompts
STEPS = (0, 10, 20)
NS = (1, 2, 4, 8)
CONFIGS = ((1, "random", "base"), (1, "bm25", "bad"), (2, "bm25", "base"))
#: KL of each ICDPO config at its largest N: near offline member 1's step 10 (KL 1.5), none near 10
TOP_KL = {(1, "random", "base"): 1.4, (1, "bm25", "bad"): 10.0, (2, "bm25", "base"): 2.2}


def rng(seed):
  return np.random.default_rng(seed)


def kl_bon(n):
  return math.log(n) - (n - 1) / n


def write_run(path, members, algorithm, *, extra=None, bon=True):
  """A trainer run dir: metrics.jsonl, config.json, per_prompt/<step>.npz, bon.json.

  ``members``: ``(family, beta, kls [S], gold [S, E])`` per member.
  """
  path = pathlib.Path(path)
  (path / "per_prompt").mkdir(parents=True)
  rows = []
  for s, st in enumerate(STEPS):
    g = np.stack([m[3][s] for m in members]).astype(np.float32)       # [M, E]
    np.savez(path / "per_prompt" / f"{st:08d}.npz", prompt__gold__reward=g)
    for i, (fam, beta, kls, _) in enumerate(members):
      rows.append({"step": st, "member": i, "family": fam, "beta": beta, "beta_eff": beta,
                   "kl": kls[s], "gold/reward": float(g[i].mean()),
                   "gold/reward_se": float(g[i].std(ddof=1) / math.sqrt(E)), "n_prompts": E,
                   "diverged": False, **(extra or {})})
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (path / "config.json").write_text(json.dumps(
      {"algorithm": algorithm, "eval": {"n_prompts": E, "seed": 0, "samples_per_prompt": 4,
                                        "ref_samples_per_prompt": 16}}))
  if bon:
    (path / "bon.json").write_text(json.dumps(
        {"selector": "gold", "N": 16, "n": [1, 4, 16], "kl": [kl_bon(n) for n in (1, 4, 16)],
         "gold": [0.0, 0.8, 1.3], "gold_se": [0.05, 0.06, 0.07], "ref_gold_mean": -0.1}))
  return path


def pi_ref(seed):
  """π_ref's per-prompt gold at step 0: the same for every member (one evaluator, one pool)."""
  return 0.2 * rng(seed).normal(size=E)


def offline_members(seed=100):
  """Two logistic and one squared member; gold rises with KL (0.3 per nat) plus prompt noise."""
  ref = pi_ref(7)
  out = []
  for i, (fam, beta, kls) in enumerate((("logistic", 0.1, (0.0, 0.5, 1.0)),
                                        ("logistic", 0.5, (0.0, 1.5, 3.0)),
                                        ("squared", 0.1, (0.0, 0.8, 1.6)))):
    noise = 0.3 * rng(seed + i).normal(size=(len(STEPS), E))
    noise[0] = 0.0
    out.append((fam, beta, kls, ref + 0.3 * np.asarray(kls)[:, None] + noise))
  return out


def iq_members(shift, seed=200):
  """Inverse-Q* members on the offline law, shifted by ``shift`` past step 0."""
  ref = pi_ref(7)
  out = []
  for i, (fam, kls) in enumerate((("iq_bm25", (0.0, 0.6, 1.2)), ("iq_random", (0.0, 0.4, 0.9)))):
    noise = 0.3 * rng(seed + i).normal(size=(len(STEPS), E))
    noise[0] = 0.0
    sh = np.asarray([0.0, shift, shift])[:, None]
    out.append((fam, 1.0, kls, ref + 0.3 * np.asarray(kls)[:, None] + noise + sh))
  return out


def write_icdpo(path, shift, *, acc=0.5, n_pairs=200, seed=300, per_prompt=True):
  """An ICDPO evaluation whose ICDPO gold is best-of-N by likelihood's plus ``shift`` (and noise)."""
  path = pathlib.Path(path)
  path.mkdir(parents=True)
  r = rng(seed)
  j_n = np.log2(np.asarray(NS, float))
  lik = 0.1 * j_n[None, :] + 0.2 * r.normal(size=(E, 1)) * (j_n > 0)
  lik[:, 0] = 0.0                                   # best-of-1 of π_ref's own pool: 0 exactly
  arrays = {("bon_likelihood", 0, "-", "-"): lik,
            ("bon_gold", 0, "-", "-"): 0.4 * j_n[None, :] + 0.0 * lik}
  kls = {}
  for c, (k, ret, con) in enumerate(CONFIGS):
    icl = np.repeat(-0.1 + 0.2 * r.normal(size=(E, 1)), len(NS), axis=1)
    arrays[("icl_sample", k, ret, "-")] = icl
    arrays[("icdpo", k, ret, con)] = lik + shift + 0.3 * r.normal(size=(E, len(NS)))
    k1_top = TOP_KL[(k, ret, con)] - kl_bon(NS[-1])
    kls[(k, ret, con)] = [k1_top * (j + 1) / len(NS) for j in range(len(NS))]
  rows = []

  def add(method, k, ret, con, a, j, k1):
    n = NS[j]
    d = a[:, j] - lik[:, j]
    row = {"method": method, "n": n, "k": k, "retriever": ret, "contrast": con, "n_prompts": E,
           "gold": float(a[:, j].mean()), "gold_se": float(a[:, j].std(ddof=1) / math.sqrt(E)),
           "k1": k1, "kl_lower": k1, "kl": k1 + kl_bon(n), "kl_icl": 0.5,
           "kl_spec_bound": 0.5 + math.log(n), "sqrt_kl": math.sqrt(k1 + kl_bon(n))}
    if method != "bon_likelihood":
      row["d_gold"], row["d_gold_se"] = float(d.mean()), float(d.std(ddof=1) / math.sqrt(E))
    rows.append(row)

  for j in range(len(NS)):
    add("bon_likelihood", 0, "-", "-", lik, j, 0.0)
  for j in range(len(NS)):
    add("bon_gold", 0, "-", "-", arrays[("bon_gold", 0, "-", "-")], j, 0.0)
  for k, ret, con in CONFIGS:
    add("icl_sample", k, ret, "-", arrays[("icl_sample", k, ret, "-")], 0, kls[(k, ret, con)][0])
    for j in range(len(NS)):
      add("icdpo", k, ret, con, arrays[("icdpo", k, ret, con)], j, kls[(k, ret, con)][j])
  (path / "icdpo.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
  if per_prompt:
    np.savez(path / "icdpo_per_prompt.npz",
             **{"__".join([m, f"k{k}", ret, con, "gold"]): a for (m, k, ret, con), a in
                arrays.items()})
  reward = [{"reward": "likelihood", "k": 0, "retriever": "-", "contrast": "-", "accuracy": 0.6,
             "accuracy_se": math.sqrt(0.24 / n_pairs), "n_pairs": n_pairs}]
  for k, ret, con in CONFIGS:
    reward.append({"reward": "icdpo", "k": k, "retriever": ret, "contrast": con, "accuracy": acc,
                   "accuracy_se": math.sqrt(acc * (1 - acc) / n_pairs), "n_pairs": n_pairs})
  (path / "icdpo_reward.jsonl").write_text("".join(json.dumps(x) + "\n" for x in reward))
  (path / "icdpo_info.json").write_text(json.dumps(
      {"ns": list(NS), "n_prompts": E, "pool_per_prompt": 16, "ref_samples_per_prompt": 16,
       "ref_gold_mean": -0.05}))
  return arrays


def pipeline(tmp_path, *, shift=0.3, iq_shift=0.0, acc=0.5, seed=300,
             stages=("offline", "inverse_q", "icdpo")):
  root = tmp_path / "pipe"
  root.mkdir(parents=True)
  arrays = None
  if "offline" in stages:
    write_run(root / "offline", offline_members(), "gpo")
  if "inverse_q" in stages:
    write_run(root / "inverse_q", iq_members(iq_shift), "inverse_q", extra={"kl_coef": 1.0})
  if "icdpo" in stages:
    arrays = write_icdpo(root / "icdpo", shift, acc=acc, seed=seed)
  return root, arrays


def verdicts(rep):
  return {f.key: f.verdict for f in rep.findings}


def test_icdpo_beats_bon_when_shifted_and_the_paired_difference_matches_numpy(tmp_path):
  root, arrays = pipeline(tmp_path, shift=0.3)
  rep = incontext.compute(root)
  assert verdicts(rep)["icdpo_vs_bon"] == SUPPORTED
  lik = arrays[("bon_likelihood", 0, "-", "-")]
  for k, ret, con in CONFIGS:
    a = arrays[("icdpo", k, ret, con)]
    icl = arrays[("icl_sample", k, ret, "-")]
    for j, n in enumerate(NS):
      r = rep.paired[(rep.paired["config"] == f"k{k}/{ret}/{con}") & (rep.paired["n"] == n)]
      d = a[:, j] - lik[:, j]
      np.testing.assert_allclose(r["d_lik"].iloc[0], d.mean(), atol=1e-12)
      np.testing.assert_allclose(r["d_lik_se"].iloc[0], d.std(ddof=1) / math.sqrt(E), atol=1e-12)
      np.testing.assert_allclose(r["d_icl"].iloc[0], (a[:, j] - icl[:, j]).mean(), atol=1e-12)
      np.testing.assert_allclose(r["sel_d_lik"].iloc[0], d[0::2].mean(), atol=1e-12)
  # the held-out choice: the largest difference on the even prompts, measured on the odd ones
  cand = rep.paired[rep.paired["n"] >= 2]
  top = cand.loc[cand["sel_d_lik"].idxmax()]
  b = rep.best["row"]
  assert (b["config"], b["n"]) == (top["config"], top["n"])
  k, ret, con = incontext._parse_config(b["config"])
  j = NS.index(int(b["n"]))
  d = arrays[("icdpo", k, ret, con)][1::2, j] - lik[1::2, j]
  np.testing.assert_allclose(rep.best["lik"].diff, d.mean(), atol=1e-12)
  np.testing.assert_allclose(rep.best["lik"].se, d.std(ddof=1) / math.sqrt(E // 2), atol=1e-12)
  # the rows' d_gold agree with the recomputation; icdpo.csv carries d_icl and renames SPEC's formula
  assert "match the rows' d_gold" in " ".join(rep.notes)
  assert incontext.SPEC_COLUMN in rep.icdpo_rows and "kl_spec_bound" not in rep.icdpo_rows
  assert rep.icdpo_rows.loc[rep.icdpo_rows["method"] == "icdpo", "d_icl"].notna().all()


def test_no_shift_is_not_supported_or_inconclusive(tmp_path):
  # A level-α test: at shift 0 about 5% of seeds reject (5.5% of 200 measured); this one does not.
  root, _ = pipeline(tmp_path, shift=0.0, seed=301)
  rep = incontext.compute(root)
  assert verdicts(rep)["icdpo_vs_bon"] in (NOT_SUPPORTED, INCONCLUSIVE)
  root2, _ = pipeline(tmp_path / "worse", shift=-0.5)
  text = next(f for f in incontext.compute(root2).findings if f.key == "icdpo_vs_bon")
  assert text.verdict == NOT_SUPPORTED and "significantly better" in text.text


def test_matched_kl_pairs_the_nearest_offline_point(tmp_path):
  root, arrays = pipeline(tmp_path)
  rep = incontext.compute(root)
  m = rep.matched
  off = offline_members()
  # ICDPO k1/random/base at N = 8 has KL 1.4: logistic's nearest is member 1, step 10 (KL 1.5)
  r = m[(m["point"] == "k1/random/base") & (m["offline"] == "offline_dpo")].iloc[0]
  assert (r["offline_member"], r["offline_step"], r["offline_kl"]) == (1, 10, 1.5)
  assert bool(r["matched"]) and r["n"] == NS[-1]
  np.testing.assert_allclose(r["kl"], TOP_KL[(1, "random", "base")])
  g = arrays[("icdpo", 1, "random", "base")][:, -1]
  og = off[1][3][1].astype(np.float32).astype(np.float64)
  np.testing.assert_allclose(r["diff"], (g - og).mean(), atol=1e-9)
  np.testing.assert_allclose(r["diff_se"], (g - og).std(ddof=1) / math.sqrt(E), atol=1e-9)
  # squared (member 2: KL 0, 0.8, 1.6): the nearest to 1.4 is step 20
  r2 = m[(m["point"] == "k1/random/base") & (m["offline"] == "offline_ipo")].iloc[0]
  assert (r2["offline_member"], r2["offline_step"]) == (2, 20) and bool(r2["matched"])
  # KL 10: the nearest offline point (KL 3) is outside the tolerance, so no difference
  far = m[m["point"] == "k1/bm25/bad"]
  assert len(far) == 2 and not far["matched"].any() and far["diff"].isna().all()
  assert (far["offline_kl"] == [3.0, 1.6]).all()
  # Inverse-Q* Pareto points past step 0 are matched too
  assert set(m.loc[m["source"] == "inverse_q", "method"]) == {"iq_bm25", "iq_random"}
  assert (m.loc[m["source"] == "inverse_q", "step"] > 0).all()


def test_inverse_q_held_out_comparison_turns_with_the_shift(tmp_path):
  up = incontext.compute(pipeline(tmp_path / "up", iq_shift=1.0)[0])
  assert verdicts(up)["iq_vs_offline"] == SUPPORTED
  assert (up.iq_pairs["diff"] > 0.5).all() and len(up.iq_pairs) == 4
  # K is the smaller of the pair's largest KLs and both choices respect it
  p = up.iq_pairs
  assert (p["a_kl"] <= p["budget"]).all() and (p["b_kl"] <= p["budget"]).all()
  row = p[(p["a"] == "iq_bm25") & (p["b"] == "offline_dpo")].iloc[0]
  assert row["budget"] == 1.2
  down = incontext.compute(pipeline(tmp_path / "down", iq_shift=-1.0)[0])
  assert verdicts(down)["iq_vs_offline"] == NOT_SUPPORTED
  f = next(f for f in down.findings if f.key == "iq_vs_offline")
  assert "our reconstruction" in f.text


def test_reward_model_finding(tmp_path):
  good = incontext.compute(pipeline(tmp_path / "good", acc=0.7)[0])
  assert verdicts(good)["icdpo_reward"] == SUPPORTED
  chance = incontext.compute(pipeline(tmp_path / "chance", acc=0.5)[0])
  assert verdicts(chance)["icdpo_reward"] == NOT_SUPPORTED


def test_write_is_byte_identical(tmp_path):
  root, _ = pipeline(tmp_path)
  logged = []
  md = incontext.write(root, log=logged.append)
  out = root / "report"
  assert md == out / "incontext.md" and len(logged) == 4
  names = ["incontext.md", "icdpo.csv", "matched_kl.csv", "incontext_frontier.svg"]
  first = {n: (out / n).read_bytes() for n in names}
  assert (out / "incontext_frontier.png").exists()
  text = first["incontext.md"].decode()
  assert text.count("our reconstruction") >= 2 and "not a valid bound" in text
  assert "## Findings" in text and "No offline point near that KL" in text
  incontext.write(root, log=lambda *_: None)
  assert {n: (out / n).read_bytes() for n in names} == first
  csv = pd.read_csv(out / "icdpo.csv")
  assert len(csv) == len(pd.read_json(root / "icdpo" / "icdpo.jsonl", lines=True))


@pytest.mark.parametrize("stages", [("icdpo",), ("inverse_q",), ("offline",),
                                    ("offline", "icdpo"), ("inverse_q", "icdpo")])
def test_missing_stages_do_not_crash(tmp_path, stages):
  root, _ = pipeline(tmp_path, stages=stages)
  md = incontext.write(root, log=lambda *_: None, figures=stages == ("icdpo",))
  rep = incontext.compute(root)
  v = verdicts(rep)
  assert len(v) == 4
  if "icdpo" not in stages:
    assert v["icdpo_vs_bon"] == v["icdpo_reward"] == INCONCLUSIVE
  if "offline" not in stages:
    assert v["iq_vs_offline"] == v["on_frontier"] == INCONCLUSIVE
    assert pd.read_csv(root / "report" / "matched_kl.csv").empty
  assert md.read_text().startswith("# In-context alignment")


def test_icdpo_without_per_prompt_arrays(tmp_path):
  root = tmp_path / "pipe"
  write_run(root / "offline", offline_members(), "gpo")
  write_icdpo(root / "icdpo", 0.3, per_prompt=False)
  rep = incontext.compute(root)
  assert verdicts(rep)["icdpo_vs_bon"] == INCONCLUSIVE and rep.paired.empty
  # the rows still place every config against the offline frontier; nothing to pair
  assert len(rep.positions) == len(CONFIGS) and rep.matched.empty


def test_errors_name_the_bad_value(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    incontext.compute(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="'icdpo__x1__a__b__gold'"):
    incontext.parse_key("icdpo__x1__a__b__gold")
  root = tmp_path / "pipe"
  write_icdpo(root / "icdpo", 0.3)
  np.savez(root / "icdpo" / "icdpo_per_prompt.npz", icdpo__k1__random__base__gold=np.zeros((E, 3)))
  with pytest.raises(ValueError, match=r"\(40, 3\)"):
    incontext.compute(root)


def _with_lab(run_dir, lab):
  cfg = json.loads((run_dir / "config.json").read_text())
  cfg["lab"] = lab
  (run_dir / "config.json").write_text(json.dumps(cfg))


def test_compare_runs_are_drawn_matched_and_refused_when_bad(tmp_path):
  """compare.json: other methods' runs on the same lab join the figure and the matched-KL
  table (paired with the offline stage); another lab is figure-only; bad specs are refused."""
  root, _ = pipeline(tmp_path)
  ext = tmp_path / "ext"
  ext.mkdir()
  on = write_run(ext / "online", [("online_ipo", 0.1, (0.0, 0.6, 1.2), pi_ref(7)[None]
                                   + np.asarray([0.0, 0.5, 0.6])[:, None])], "online")
  rl = write_run(ext / "rl", [("L3_n1024/wco", 0.0, (0.0, 0.9, 2.5), pi_ref(7)[None]
                               + np.asarray([0.0, 0.3, -0.4])[:, None])], "rloo")
  for d in (root / "offline", root / "inverse_q", on, rl):
    _with_lab(d, {"name": "small", "seed": 0})
  (root / "compare.json").write_text(json.dumps({"online": "../ext/online", "rl_proxy": "../ext/rl"}))
  rep = incontext.compute(root)
  assert rep.other_families == {"online": ["online_ipo"], "rl_proxy": ["RL vs L3_n1024/wco"]}
  m = rep.matched[rep.matched["source"] == "online"]
  assert len(m) and m["matched"].any()
  # the paired difference is the online member's per-prompt gold minus the offline one's
  row = m[m["matched"].astype(bool)].iloc[0]
  og = incontext.prompt_gold(incontext.load_run(root / "offline"), "offline")[
      ("offline", int(row["offline_member"]), int(row["offline_step"]))]
  want = (pi_ref(7) + 0.6) - og if int(row["step"]) == STEPS[2] else (pi_ref(7) + 0.5) - og
  np.testing.assert_allclose(row["diff"], want.mean(), rtol=1e-5, atol=1e-6)
  assert any("online run" in n and "paired" in n for n in rep.notes)
  path = incontext.write(root, figures=True, log=lambda m: None)
  assert "online_ipo (online)" in (path.parent / "incontext_frontier.svg").read_text()
  # another lab: drawn, never paired
  _with_lab(rl, {"name": "small", "seed": 1})
  rep = incontext.compute(root)
  assert not (rep.matched["source"] == "rl_proxy").any()
  assert any("rl_proxy run" in n and "figure only" in n for n in rep.notes)
  (root / "compare.json").write_text(json.dumps({"offlinee": "../ext/online"}))
  with pytest.raises(ValueError, match="offlinee"):
    incontext.compute(root)
  (root / "compare.json").write_text(json.dumps({"online": "../ext/nowhere"}))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    incontext.compute(root)
