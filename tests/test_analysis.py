"""Tests for the run-dir analysis: frontiers, Gao fits, statistics, findings, figures, report and CLI."""

import dataclasses
import json
import math
import pathlib
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import analysis_fixtures as af
from gpo_jax import analysis
from gpo_jax.analysis import __main__ as cli
from gpo_jax.analysis import comparison as compare_lib
from gpo_jax.analysis import frontier, gao, report, table
from gpo_jax.analysis.findings import NOT_SUPPORTED, SUPPORTED

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIGURES = ("frontiers_all", "frontiers_by_family", "gold_vs_beta", "offline_reg_vs_kl", "training_curves",
           "reward_vs_gold")


# ---------------------------------------------------------------- contract with the trainer

def _architecture_fields():
  text = (ROOT / "ARCHITECTURE.md").read_text()
  block = text.split("`<workdir>/metrics.jsonl`", 1)[1].split("```", 2)[1]
  names = [n.strip() for n in block.replace("\n", " ").split(",") if n.strip()]
  required = [re.sub(r"\s*\(.*\)$", "", n) for n in names if not n.startswith("[")]
  optional = [n.strip("[]") for n in names if n.startswith("[")]
  return required, optional


def test_field_names_match_architecture(tmp_path):
  required, optional = _architecture_fields()
  assert len(required) > 20, f"could not parse the metric field list from ARCHITECTURE.md: {required}"
  assert list(table.METRIC_FIELDS) == required, "table.METRIC_FIELDS drifted from ARCHITECTURE.md 'Metrics on disk'"
  assert list(table.OPTIONAL_FIELDS) == optional
  af.write_synthetic_run(tmp_path, families=("logistic",), betas=(0.1,), steps=(0, 10))
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert set(rows[0]) == set(required) | set(optional), "fixture rows must use exactly the ARCHITECTURE.md names"
  bon = json.loads((tmp_path / "bon.json").read_text())
  assert set(bon) == {"selector", "N", "n", "kl", "gold", "gold_se"}


def test_analysis_does_not_import_jax_or_trainer():
  code = ("import sys, gpo_jax.analysis, gpo_jax.evaluation.bon; "
          "bad = [m for m in ('jax', 'flax', 'gpo_jax.main', 'gpo_jax.engine', 'gpo_jax.run', 'gpo_jax.algorithms') if m in sys.modules]; "
          "assert not bad, bad")
  res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
  assert res.returncode == 0, f"analysis must not import JAX or the trainer: {res.stderr[-500:]}"


# ---------------------------------------------------------------- frontiers

def test_envelope_and_pareto_of_known_staircase():
  rng = np.random.default_rng(0)
  xk = np.linspace(0.0, 4.0, 9)
  yk = np.sqrt(xk)
  xr = rng.uniform(0, 4, 300)
  floor = xk[np.searchsorted(xk, xr, side="right") - 1]
  yr = np.sqrt(floor) - rng.uniform(0.01, 1.0, 300)  # strictly under the staircase: dominated
  x, y = np.concatenate([xk, xr]), np.concatenate([yk, yr])
  xs, env = frontier.running_max(x, y)
  grid = np.linspace(0, 4, 101)
  expected = np.sqrt(xk[np.searchsorted(xk, grid, side="right") - 1])
  np.testing.assert_allclose(frontier.envelope_at(xs, env, grid), expected, err_msg="running max is not the staircase")
  mask = frontier.pareto_mask(x, y)
  assert mask[:9].all() and not mask[9:].any(), "Pareto set must be exactly the staircase corners"
  assert np.isnan(frontier.envelope_at(xs, env, [-1.0]))[0], "envelope left of all data must be undefined"


def test_pareto_drops_overoptimised_tail():
  x = np.linspace(0, 2, 21)
  y = x * (2 - x)  # peak 1 at x = 1
  mask = frontier.pareto_mask(x, y)
  np.testing.assert_array_equal(mask, x <= 1 + 1e-12, err_msg="points past the peak are dominated by the peak")
  _, env = frontier.running_max(x, y)
  np.testing.assert_allclose(env[x > 1], 1.0, err_msg="envelope stays at the peak after it")


def test_frontier_gap_constant_offset_and_disjoint():
  d = np.linspace(0, 3, 30)
  mk = lambda x, y: frontier.frontier_of(pd.DataFrame({"sqrt_kl": x, "gold/reward": y}))  # noqa: E731
  a, b = mk(d, np.log1p(d)), mk(d[5:], np.log1p(d[5:]) + 0.3)
  g = frontier.frontier_gap(a, b)
  assert g["gap"] == pytest.approx(0.3, abs=1e-9) and g["lo"] == pytest.approx(d[5])
  far = mk(d + 10, d)
  assert math.isnan(frontier.frontier_gap(a, far)["gap"]), "disjoint KL ranges have no defined gap"


# ---------------------------------------------------------------- Gao fits

def test_gao_bon_fit_recovers_closed_form():
  d = np.linspace(0.1, 4, 40)
  fit = gao.fit_gao(d, d * (1 - 0.25 * d), "bon")
  assert (fit.alpha, fit.beta) == (pytest.approx(1.0, abs=1e-9), pytest.approx(0.25, abs=1e-9))
  assert fit.d_peak == pytest.approx(2.0) and fit.r_peak == pytest.approx(1.0), "peak of d(1 - d/4) is R=1 at d=2"
  assert fit.rmse < 1e-9


def test_gao_rl_fit_recovers_closed_form_with_noise():
  rng = np.random.default_rng(3)
  d = np.linspace(0.2, 12, 200)
  r = d * (1.2 - 0.4 * np.log(d)) + rng.normal(0, 0.01, d.size)
  fit = gao.fit_gao(d, r, "rl")
  assert fit.alpha == pytest.approx(1.2, abs=0.01) and fit.beta == pytest.approx(0.4, abs=0.005)
  assert fit.d_peak == pytest.approx(math.exp(2.0), rel=0.03), "RL peak is exp(alpha/beta - 1)"
  grid = np.linspace(0.01, 20, 20001)
  d_num = grid[np.argmax(gao.gao_curve("rl", fit.alpha, fit.beta, grid))]
  assert fit.d_peak == pytest.approx(d_num, rel=1e-3) and fit.r_peak == pytest.approx(fit.beta * fit.d_peak)
  assert fit.rmse == pytest.approx(0.01, rel=0.2), "rmse should match the injected noise"


@pytest.mark.parametrize("form,alpha,beta", [("bon", 1.0, 0.25), ("rl", 1.2, 0.4)])
def test_weighted_gao_fit_recovers_planted_coefficients_with_calibrated_errors(form, alpha, beta):
  """One curve with heteroscedastic SEs: the weighted fit is unbiased, its SEs cover, and it beats OLS."""
  rng = np.random.default_rng(7)
  d = np.linspace(0.2, 4.0, 12)
  se = np.where(d > 2.0, 0.3, 0.02)               # the far points are 15x noisier
  truth = gao.gao_curve(form, alpha, beta, d)
  z, err_w, err_u = [], [], []
  for _ in range(400):
    r = truth + se * rng.normal(size=d.size)
    w = gao.fit_gao(d, r, form, se=se)
    u = gao.fit_gao(d, r, form)
    z.append((w.alpha - alpha) / w.alpha_se)
    err_w.append((w.alpha - alpha) ** 2 + (w.beta - beta) ** 2)
    err_u.append((u.alpha - alpha) ** 2 + (u.beta - beta) ** 2)
  z = np.asarray(z)
  assert abs(z.mean()) < 0.2, f"weighted alpha is biased: mean z = {z.mean():.3f}"
  assert 0.92 <= np.mean(np.abs(z) < 1.96) <= 0.985, "alpha_se does not give 95% coverage"
  assert np.mean(err_w) < 0.5 * np.mean(err_u), "weighting by 1/se^2 should beat OLS here"
  # The peak's delta-method SE is finite and the peak is where the closed form says.
  fit = gao.fit_gao(d, truth + 0.01 * rng.normal(size=d.size), form, se=np.full(d.size, 0.01))
  want = alpha / (2 * beta) if form == "bon" else math.exp(alpha / beta - 1)
  assert fit.d_peak == pytest.approx(want, rel=0.05) and 0 < fit.d_peak_se < 0.2 * want
  assert 0.2 < fit.chi2_red < 3.0


def test_gao_no_peak_and_errors():
  d = np.linspace(0.1, 5, 20)
  fit = gao.fit_gao(d, 0.3 * d + 0.05 * d * d, "bon")
  assert not fit.has_peak and fit.beta < 0, "a convex rising curve has no interior peak"
  with pytest.raises(ValueError, match="choose one of"):
    gao.fit_gao(d, d, "ppo")
  with pytest.raises(ValueError, match="distinct d"):
    gao.fit_gao([1.0, 1.0], [0.5, 0.5], "rl")


# ---------------------------------------------------------------- loading

def test_load_errors_and_truncated_line(tmp_path):
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    table.load_run(tmp_path)
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "member": 0, "family": "logistic"}) + "\n")
  with pytest.raises(ValueError, match="beta"):
    table.load_run(tmp_path)
  run_dir = af.write_synthetic_run(tmp_path / "r", families=("logistic",), betas=(0.1, 0.2), steps=(0, 100),
                                   seeds=(0,))
  with open(run_dir / "metrics.jsonl", "a") as fh:
    fh.write('{"step": 200, "memb')
  with pytest.warns(UserWarning, match="truncated"):
    run = table.load_run(run_dir)
  assert len(run.table) == 4 and run.bon is not None and run.config["data_size"] == 1000
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()[:4]]
  # Two runs writing one file (no workdir lock) duplicate (member, step) rows: the analysis
  # refuses instead of silently keeping one of them (issue: concurrent runs on one workdir).
  rows.append({**rows[0], "gold/reward": 123.0})
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(ValueError, match=r"1 \(member, step\) pairs have more than one row, "
                                       r"e\.g\. \[\(0, 0\)\]; two runs wrote this file"):
    table.load_run(run_dir)


# ---------------------------------------------------------------- report on a synthetic sweep

NUM = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[+-]?\d+)?")


def cited_numbers(text: str) -> list[float]:
  text = text.replace("f''(0)", "").replace("f'(0)", "")
  return [float(t) for t in NUM.findall(text)]


def stat_values(rep) -> np.ndarray:
  vals = []
  for df in (rep.summary, rep.family_stats, rep.members, rep.best, rep.overlap, rep.by_beta,
             rep.peak_summary, rep.shifts, rep.overlap_tests, rep.seed_gaps):
    vals += list(df.select_dtypes(include=[np.number, bool]).to_numpy(float).ravel())
  vals += [float(v) for v in rep.overview.values()] + [float(v) for v in dataclasses.asdict(rep.thresholds).values()]
  return np.asarray([v for v in vals if np.isfinite(v)])


def assert_findings_cite_stats(rep):
  vals = stat_values(rep)
  for f in rep.findings:
    nums = cited_numbers(f.text)
    assert len(nums) >= 3, f"finding {f.key!r} cites too few numbers: {f.text}"
    for x in nums:
      ok = np.any(np.abs(vals - x) <= 6e-3 * np.abs(vals) + 1e-12)
      assert ok, f"finding {f.key!r} cites {x}, which is not a computed statistic: {f.text}"


def raw_rows(run_dir):
  return [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
  run_dir = af.write_synthetic_run(tmp_path_factory.mktemp("paper"))
  return run_dir, analysis.analyze(run_dir)


def test_report_files_and_tables(paper_run):
  run_dir, rep = paper_run
  assert rep.path == run_dir / "report" / "report.md" and rep.path.exists()
  md = rep.path.read_text()
  for name in FIGURES:
    for ext in ("png", "svg"):
      p = run_dir / "report" / "figures" / f"{name}.{ext}"
      assert p.exists() and p.stat().st_size > 1000, f"figure {p.name} missing or empty"
    assert f"figures/{name}.png" in md, f"report.md does not embed {name}"
  assert md.index("frontiers_all.png") < md.index("## Summary"), "the all-families frontier must be the first figure"
  assert list(rep.summary["family"]) == list(af.CURVATURE), "summary needs one row per family, in run order"
  assert rep.summary["rl_rmse"].max() < 0.05, "RL-form Gao fits of RL-form data must fit to the noise level"
  np.testing.assert_allclose(rep.summary["rl_d_peak"], 3.0, rtol=0.1, err_msg="synthetic gold peaks at d=3")
  # Per-member trajectory fits: members pushed past d = 3 have their fitted peak near 3.
  far = rep.member_fits[rep.member_fits["d_max"] > 4.5]
  assert len(far) > 10 and far["peak_inside"].all()
  np.testing.assert_allclose(far["d_peak"].median(), 3.0, rtol=0.05)
  for f in rep.findings:
    assert f.text in md and f.verdict in md


def test_statistics_match_independent_computation(paper_run):
  run_dir, rep = paper_run
  rows = [r for r in raw_rows(run_dir) if not r["diverged"]]
  final = max(r["step"] for r in rows)
  best = rep.best.set_index("family")
  for fam in af.CURVATURE:
    fam_rows = [r for r in rows if r["family"] == fam]
    top = max(fam_rows, key=lambda r: r["gold/reward"])
    assert rep.family_stats.set_index("family").loc[fam, "peak_gold"] == top["gold/reward"]
    at_final = [r for r in fam_rows if r["step"] == final]
    b = max(at_final, key=lambda r: r["gold/reward"])
    assert best.loc[fam, "best_beta"] == b["beta"], f"{fam}: best β at the final step is wrong"
    # The synthetic truth: KL is driven by beta_eff (hinge as logistic), best drive 0.1.
    assert b["beta"] * (af.CURVATURE[fam] or 0.5) == pytest.approx(0.1)
  pos = best[best["best_beta_eff"] > 0]
  assert rep.overview["spread_beta"] == pytest.approx(pos["best_beta"].max() / pos["best_beta"].min())
  assert not ((rep.by_beta["family"] == "exponential") & (rep.by_beta["beta"] == min(af.betas_of("exponential")))).any(), \
      "a member that diverged before the budget must not compete for best β"


def test_findings_support_paper_and_cite_numbers(paper_run):
  _, rep = paper_run
  verdicts = {f.key: f.verdict for f in rep.findings}
  assert verdicts == {"overlap": SUPPORTED, "best_beta": SUPPORTED, "overopt": SUPPORTED}, verdicts
  assert_findings_cite_stats(rep)
  assert "so the frontiers overlap" in rep.findings[0].text, rep.findings[0].text
  assert rep.overview["spread_beta_eff"] < rep.overview["spread_beta"]
  # Members pushed well past the gold peak (d = 3) fall; members short of it do not.
  t = rep.members
  beyond = t[t["kl_end"] > 3.0 ** 2 * 2.5]     # true drop >= 0.2, ~5 SE
  short = t[t["kl_end"] < 3.0 ** 2 * 0.7]
  # (short members plateau at the end: a null, where the test rejects at its level, 5 %)
  assert beyond["falls"].all() and short["falls"].mean() <= 0.15, t[["beta", "kl_end", "drop", "drop_z"]]
  # Registration: curves line up in beta_eff (truth: δ = 0), raw-β prediction excluded.
  sq = rep.shifts.set_index("family").loc["squared"]
  assert sq["lo"] <= 0.0 <= sq["hi"] and not sq["beta_in"] and abs(sq["shift"]) < 0.15


@pytest.mark.parametrize("kwargs,key,phrase", [
    (dict(peak=False), "overopt", "does not peak and fall beyond chance"),
    (dict(aligned=False), "best_beta", "excludes 0"),
    (dict(overlap=False), "overlap", "do not all overlap"),
])
def test_findings_flip_when_data_contradict_paper(tmp_path, kwargs, key, phrase):
  run_dir = af.write_synthetic_run(tmp_path, **kwargs)
  rep = report.compute(table.load_run(run_dir))
  got = {f.key: f for f in rep.findings}
  assert got[key].verdict == NOT_SUPPORTED and phrase in got[key].text, \
      f"{key} should flip for {kwargs}: {got[key].text}"
  # The other claims still hold in these data (without a peak, the best β sits at the grid edge: no claim).
  expected_rest = {"overlap", "overopt", "best_beta"} - {key} - ({"best_beta"} if key == "overopt" else set())
  for k in expected_rest:
    assert got[k].verdict == SUPPORTED, f"changing only {key} must not flip {k}: {got[k].text}"
  assert_findings_cite_stats(rep)


# ---------------------------------------------------------------- comparison and CLI

@pytest.mark.parametrize("large_peak,verdict", [((4.0, 1.3), SUPPORTED), ((2.0, 0.8), NOT_SUPPORTED)])
def test_compare_data_sizes(tmp_path, large_peak, verdict):
  small = af.write_synthetic_run(tmp_path / "small", data_size=1000, with_bon=False)
  large = af.write_synthetic_run(tmp_path / "large", data_size=4000, d_star=large_peak[0], r_scale=large_peak[1],
                                 seed=1, with_bon=False)
  cmp = compare_lib.compare([large, small], tmp_path / "cmp", figures=False)
  assert cmp.finding.verdict == verdict, cmp.finding.text
  assert cmp.path.exists() and cmp.finding.text in cmp.path.read_text()
  vals = cmp.peaks[["peak_gold", "kl_at_peak", "data_size"]].to_numpy(float).ravel()
  counts = range(len(af.CURVATURE) + 1)  # "k of 6 families", and the 2-standard-error rule
  for x in cited_numbers(cmp.finding.text):
    assert np.any(np.abs(vals - x) <= 6e-3 * np.abs(vals) + 1e-12) or x in counts, f"uncited number {x}"


def test_cli_single_run(tmp_path, capsys):
  run_dir = af.write_synthetic_run(tmp_path / "run", families=("logistic", "squared"), with_proxy=False)
  assert cli.main([str(run_dir), "--out", str(tmp_path / "out"), "--no-figures"]) == 0
  assert (tmp_path / "out" / "report.md").exists() and (tmp_path / "out" / "summary.csv").exists()
  assert "report.md" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    cli.main([str(run_dir), str(run_dir), "--step", "100"])


def test_long_horizon_summary_script(tmp_path):
  """experiments/long_horizon.py summarises runs from their files (on a synthetic run)."""
  import importlib.util
  run_dir = af.write_synthetic_run(tmp_path / "run", families=("logistic", "squared"), with_bon=False)
  spec = importlib.util.spec_from_file_location("lh", ROOT / "experiments" / "long_horizon.py")
  lh = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(lh)
  assert lh.main([str(run_dir), "--out", str(tmp_path / "out"), "--no-figures"]) == 0
  summary = pd.read_csv(tmp_path / "out" / "summary.csv")
  assert len(summary) == 2 * len(af.BETA_EFFS) and (summary["seeds"] == 3).all()
  md = (tmp_path / "out" / "summary.md").read_text()
  assert "seeds falling" in md and (tmp_path / "out" / "run" / "report.md").exists()
  # Members pushed past the synthetic peak fall in every seed.
  far = summary[summary["kl_end"] > 3.0 ** 2 * 2.5]
  assert len(far) and (far["falling"] == 3).all()
