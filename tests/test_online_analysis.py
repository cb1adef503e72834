"""The online-vs-offline report (gpo_jax.analysis.online) on synthetic pipeline directories with known win rates."""

import json
import math
import pathlib

import numpy as np
import pandas as pd
import pytest

from gpo_jax.analysis import online
from gpo_jax.analysis.findings import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED

E, N = 40, 4          # eval prompts, samples per prompt
STEPS = (0, 10, 20)


def member(family, beta, kl, gold, diverged=None):
  """One member: KL per step, per-sample gold ``[S, E, N]``, optional diverged flags per step."""
  gold = np.asarray(gold, np.float64)
  return {"family": family, "beta": beta, "kl": list(kl), "gold": gold,
          "diverged": list(diverged) if diverged is not None else [False] * len(kl)}


def write_stage(path, members, steps=STEPS, *, label_temp=1.0, n_prompts=E):
  """A run directory as the trainer writes it: metrics.jsonl, config.json, per_prompt/<step>.npz."""
  path = pathlib.Path(path)
  (path / "per_prompt").mkdir(parents=True)
  rows = []
  for k, st in enumerate(steps):
    g_all = np.stack([m["gold"][k] for m in members]).astype(np.float32)       # [M, E, N]
    np.savez(path / "per_prompt" / f"{st:08d}.npz", prompt__gold__reward=g_all.mean(-1),
             sample__gold_all=g_all)
    for i, m in enumerate(members):
      per_prompt = g_all[i].mean(-1)
      div = m["diverged"][k]
      rows.append({"step": st, "member": i, "family": m["family"], "beta": m["beta"],
                   "beta_eff": m["beta"], "kl": None if div else m["kl"][k],
                   "gold/reward": None if div else float(per_prompt.mean()),
                   "gold/reward_se": None if div else float(per_prompt.std(ddof=1) / math.sqrt(n_prompts)),
                   "n_prompts": n_prompts, "diverged": div})
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (path / "config.json").write_text(json.dumps(
      {"lab": {"label_temp": label_temp}, "eval": {"n_prompts": n_prompts, "seed": 0,
                                                   "samples_per_prompt": N}}))
  return path


def noise(seed, steps=len(STEPS), scale=1.0):
  return scale * np.random.default_rng(seed).normal(size=(steps, E, N))


RISE = np.asarray([0.0, 0.1, 0.2])[:, None, None]   # gold improves with step
KLS = (0.0, 0.2, 0.4)


def shifted_pipeline(tmp_path, shift=0.8, label_temp=2.0):
  """online_ipo's samples shifted by ``shift``; online_dpo, offline logistic/squared from the same law."""
  root = tmp_path / "pipe"
  write_stage(root / "online", [member("online_ipo", 0.1, KLS, noise(1) + RISE + shift),
                                member("online_dpo", 0.1, KLS, noise(2) + RISE)],
              label_temp=label_temp)
  write_stage(root / "offline", [member("logistic", 0.1, KLS, noise(3) + RISE),
                                 member("squared", 0.1, KLS, noise(4) + RISE)],
              label_temp=label_temp)
  return root


def _entry(wins, a, b):
  r = wins[(wins["a"] == a) & (wins["b"] == b)]
  assert len(r) == 1, (a, b, wins[["a", "b"]])
  return r.iloc[0]


def test_win_rate_matches_numpy_and_bradley_terry(tmp_path):
  root = shifted_pipeline(tmp_path)
  rep = online.compute(root)
  assert rep.label_temp == 2.0
  assert set(rep.offline_families) == {"offline_dpo", "offline_ipo"}
  # direct computation of the formula on the held-out (odd) prompts at the final step
  ga = np.load(root / "online/per_prompt/00000020.npz")["sample__gold_all"][0].astype(np.float64)
  gb = np.load(root / "offline/per_prompt/00000020.npz")["sample__gold_all"][0].astype(np.float64)
  odd = np.arange(1, E, 2)
  w_e = np.array([np.mean(1.0 / (1.0 + np.exp(-(ga[e][:, None] - gb[e][None, :]) / 2.0)))
                  for e in odd])
  want_w, want_se = w_e.mean(), w_e.std(ddof=1) / np.sqrt(len(odd))
  r = _entry(rep.wins_final, "online_ipo", "offline_dpo")
  assert r["win_rate"] == pytest.approx(want_w, rel=1e-9)
  assert r["se"] == pytest.approx(want_se, rel=1e-9)
  assert r["z"] == pytest.approx((want_w - 0.5) / want_se, rel=1e-9)
  assert r["n_prompts"] == len(odd) and r["a_step"] == 20 and r["b_step"] == 20
  for wins in (rep.wins_final, rep.wins_matched):
    for _, x in wins.iterrows():
      assert x["win_rate"] + _entry(wins, x["b"], x["a"])["win_rate"] == pytest.approx(1.0, abs=1e-12)
    for other in ("online_dpo", "offline_dpo", "offline_ipo"):
      assert _entry(wins, "online_ipo", other)["z"] > 2
    assert abs(_entry(wins, "online_dpo", "offline_dpo")["z"]) < 2    # same law, independent draws
  # the CSV holds the same numbers
  online.write(root, log=lambda *_: None, figures=False)
  csv = pd.read_csv(root / "online/report/win_rates_final.csv")
  row = csv[(csv["a"] == "online_ipo") & (csv["b"] == "offline_dpo")].iloc[0]
  assert row["win_rate"] == pytest.approx(want_w, rel=1e-5)
  assert rep.findings[0].verdict == SUPPORTED


def test_finding_turns_when_online_ipo_is_worse(tmp_path):
  rep = online.compute(shifted_pipeline(tmp_path, shift=-0.8))
  assert rep.findings[0].verdict == NOT_SUPPORTED
  assert "disagrees with Calandriello" in rep.findings[0].text
  assert _entry(rep.wins_matched, "online_ipo", "offline_ipo")["z"] < -2


def test_selection_uses_only_the_selection_half(tmp_path):
  even = (np.arange(E) % 2 == 0)[None, :, None]
  small = noise(5, scale=0.05)
  # member 0: great on the even (selection) prompts, bad on the odd ones; member 1: good on both
  tricky = np.where(even, 1.0, -1.0) + small
  steady = np.full((len(STEPS), E, N), 0.5) + noise(6, scale=0.05)
  root = tmp_path / "pipe"
  write_stage(root / "online", [member("online_ipo", 0.1, KLS, tricky),
                                member("online_ipo", 0.5, KLS, steady),
                                member("online_dpo", 0.1, KLS, noise(7, scale=0.05))])
  rep = online.compute(root)
  pick = rep.selected_final.set_index("family").loc["online_ipo"]
  assert int(pick["member"]) == 0          # best on the even prompts, not on all or the odd ones
  assert pick["sel_gold"] == pytest.approx(1.0, abs=0.05)
  assert pick["held_gold"] == pytest.approx(-1.0, abs=0.05)
  # measured on the odd prompts only, where the chosen member is the worse one
  assert _entry(rep.wins_final, "online_ipo", "online_dpo")["win_rate"] < 0.4
  assert rep.findings[0].verdict == INCONCLUSIVE      # no offline stage


def test_matched_kl_selection_respects_the_budget(tmp_path):
  root = tmp_path / "pipe"
  # online_dpo reaches far more KL, with its best gold only beyond the budget
  write_stage(root / "online", [member("online_ipo", 0.1, (0.0, 0.25, 0.5), noise(8) + RISE),
                                member("online_dpo", 0.1, (0.0, 0.4, 2.0),
                                       noise(9) + np.asarray([0, 0.3, 3.0])[:, None, None])])
  rep = online.compute(root)
  assert rep.budget == pytest.approx(0.5)
  sel = rep.selected_matched.set_index("family")
  assert (sel["kl"] <= rep.budget).all()
  assert int(sel.loc["online_dpo", "step"]) == 10
  assert int(rep.selected_final.set_index("family").loc["online_dpo", "step"]) == 20
  # the same rule on a hand-made table
  cands = pd.DataFrame({"family": ["a", "a", "b", "b", "b"], "stage": "online",
                        "member": [0, 0, 1, 1, 2], "step": [10, 20, 10, 20, 20],
                        "kl": [0.1, 0.3, 0.2, 0.9, 0.25], "sel_gold": [1.0, 2.0, 0.5, 9.0, 0.7]})
  chosen, k = online.select_matched_kl(cands)
  assert k == pytest.approx(0.3)
  assert list(chosen["member"]) == [0, 2] and list(chosen["step"]) == [20, 20]


def _robust_pipeline(tmp_path):
  """IPO-MD, a member diverging after step 0, offline families with a single eval point each."""
  root = tmp_path / "pipe"
  bad = noise(11) + RISE
  bad[1:] = np.nan
  write_stage(root / "online", [
      member("online_ipo", 0.1, KLS, noise(10) + RISE + 0.3),
      member("online_ipo", 0.01, KLS, bad, diverged=(False, True, True)),
      member("ipo_md", 0.1, KLS, noise(12) + RISE + 0.3),
      member("nash_md", 0.1, KLS, noise(13) + RISE)])
  write_stage(root / "offline", [member("logistic", 0.1, (0.3,), noise(14, steps=1) + 0.1),
                                 member("hinge", 0.1, (0.35,), noise(15, steps=1) + 0.1),
                                 member("exponential", 0.1, (0.3,), noise(16, steps=1) + 0.1)],
              steps=(20,))
  return root


def test_write_is_byte_identical_and_robust(tmp_path):
  root = _robust_pipeline(tmp_path)
  logged = []
  md = online.write(root, log=logged.append)
  out = root / "online" / "report"
  assert md == out / "online.md"
  names = ["online.md", "matched_kl.csv", "win_rates_final.csv", "win_rates_matched_kl.csv",
           "online_frontier.svg", "online_frontier.png"]
  first = {n: (out / n).read_bytes() for n in names}
  assert len(logged) == 2
  text = first["online.md"].decode()
  assert "diverged" in text and "offline_slic" in text and "offline_exponential" in text
  assert "## Findings" in text and "matched KL (K = " in text
  for name in ("win_rates_final.csv", "win_rates_matched_kl.csv"):
    w = pd.read_csv(out / name)
    assert not ((w["a"] == "online_ipo") & (w["a_member"] == 1)).any()   # the diverged member
    fams = {"offline_dpo", "offline_exponential"} | ({"offline_slic"} if "final" in name else set())
    assert set(w["b"]) == {"online_ipo", "ipo_md", "nash_md"} | fams
  # offline_slic's only point (KL 0.35) lies beyond K = 0.3: left out of the matched-KL matrix
  assert "Left out of the matched-KL win rates (no valid point with per-sample gold within K): offline_slic" in text
  m = pd.read_csv(out / "matched_kl.csv")
  assert set(m["online"]) == {"online_ipo", "ipo_md", "nash_md"}
  # the single-point offline frontiers have an empty sqrt-KL range: no gap, no points
  assert m["gap"].isna().all()
  # the online run directory alone finds its sibling offline stage: the same report
  md2 = online.write(root / "online", log=lambda *_: None)
  assert md2 == md
  assert {n: (out / n).read_bytes() for n in names if n.endswith((".md", ".csv", ".svg"))} == \
      {n: b for n, b in first.items() if n.endswith((".md", ".csv", ".svg"))}


def test_online_run_without_offline_stage(tmp_path):
  run = write_stage(tmp_path / "solo", [member("online_ipo", 0.1, KLS, noise(20) + RISE),
                                        member("online_dpo", 0.1, (0.0,) * 3, noise(21))])
  md = online.write(run, log=lambda *_: None, figures=False)
  rep = online.compute(run)
  assert rep.offline is None and rep.offline_families == []
  assert [f.verdict for f in rep.findings] == [INCONCLUSIVE, INCONCLUSIVE]
  assert "no offline stage" in md.read_text()
  assert pd.read_csv(run / "report" / "matched_kl.csv").empty
  assert len(pd.read_csv(run / "report" / "win_rates_final.csv")) == 2


def test_errors_name_the_bad_value(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    online.locate(tmp_path / "nowhere")
  root = tmp_path / "pipe"
  write_stage(root / "online", [member("online_ipo", 0.1, KLS, noise(30))])
  write_stage(root / "offline", [member("logistic", 0.1, KLS, noise(31)[:, :20])], n_prompts=20)
  with pytest.raises(ValueError, match="same prompts"):
    online.compute(root)
  with pytest.raises(ValueError, match="label_temp = 0"):
    online.prompt_win_rates(np.zeros((2, 2)), np.zeros((2, 2)), 0.0)
