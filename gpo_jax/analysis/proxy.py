"""``analyze_proxy(rl_dir)``: the report of Gao's proxy setting (SPEC §6, §7.4), a ``proxy.md`` whose findings cite its tables, with CSVs and figures.

A run against proxies (``algorithm = rloo``, ``bon_pool.npz`` next to its metrics) is
analysed in three layers: :mod:`gpo_jax.analysis.proxy_evidence` computes the pool, the
best-of-n and RL curves and the paired tests; :mod:`gpo_jax.analysis.proxy_findings`
turns them into verdicts; this module collects both in a :class:`ProxyReport`
(:func:`compute_proxy`), renders ``proxy.md`` (:func:`render_markdown`) and writes it with
the CSVs and figures (:func:`write_proxy`). :func:`analyze_proxy` does all of it.

The proxy sets are reward-model runs' and offline GPO runs' exports (``proxies.json``'s
``kind``: ``reward_model`` or ``implicit``); best-of-n reports SPEC §5's three selector
classes, labelled: the gold-selected oracle ceiling, the proxy reward models, and the
offline policies' implicit rewards ``log π − log π_ref``.
"""

from __future__ import annotations

import dataclasses
import pathlib

import pandas as pd

from gpo_jax.analysis.findings import Finding, Thresholds, fmt, render_findings
from gpo_jax.analysis.proxy_evidence import (BAR_Z, IMPLICIT, REWARD_MODEL, BonResult, BonVsRl,
                                             PeakVsProxy, Pool, RlResult, bon_curves, bon_table,
                                             bon_tests, bon_vs_rl, ensembles_vs_singles,
                                             ensembles_vs_singles_rl, load_pool, peak_vs_proxy,
                                             proxy_set_kind, proxy_table, rl_curves,
                                             with_proxy_kinds)
from gpo_jax.analysis.proxy_findings import findings
from gpo_jax.analysis.report import md_table
from gpo_jax.analysis.table import Run, load_run
from gpo_jax.evaluation import bon as bon_lib

REPORT_DIR, REPORT_FILE = "report", "proxy.md"
_FLOAT_FORMAT = "%.6g"


@dataclasses.dataclass
class ProxyReport:
  """Everything :func:`analyze_proxy` computed; ``findings`` cite the tables."""
  run: Run
  out_dir: pathlib.Path
  pool: Pool
  rm_dirs: list[str]
  proxies: pd.DataFrame
  bon: dict[str, BonResult]
  bon_table: pd.DataFrame
  bon_tests: pd.DataFrame
  rl: RlResult
  peak_vs_proxy: PeakVsProxy
  ensembles: pd.DataFrame
  ensembles_rl: pd.DataFrame
  bon_vs_rl: BonVsRl
  thresholds: Thresholds
  findings: list[Finding]
  set_kinds: dict = dataclasses.field(default_factory=dict)  # proxy-set dir -> kind (None: unreadable)
  figures: dict = dataclasses.field(default_factory=dict)   # name -> [png, svg]
  path: pathlib.Path | None = None


def _relocated(path: str, rl_dir) -> str:
  """A proxy run named in config.json, or its namesake beside ``rl_dir`` when the recorded
  path is gone (a pipeline's stages moved together, e.g. into experiments/results/)."""
  here = pathlib.Path(rl_dir).resolve().parent / pathlib.Path(path).name
  return path if pathlib.Path(path).exists() or not here.exists() else str(here)


def compute_proxy(rl_dir, out_dir=None, rm_dirs=None, *, ns=None,
                  thresholds: Thresholds | None = None, bootstrap_reps: int = 200) -> ProxyReport:
  """All statistics and findings of a run against proxies (no files written); see :func:`analyze_proxy`."""
  th = thresholds or Thresholds()
  run = load_run(rl_dir)
  pool = load_pool(rl_dir)
  if rm_dirs is None:
    rm_dirs = [_relocated(d, rl_dir) for d in
               ((run.config or {}).get("proxies") or {}).get("paths") or []]
  rm_dirs = [str(d) for d in rm_dirs]
  proxies = proxy_table(rm_dirs, pool)
  pool = with_proxy_kinds(pool, proxies)   # implicit rewards become selectors of kind "implicit"
  bon = bon_curves(pool, ns, alpha=th.alpha, power=th.power)
  kinds = {n: b.kind for n, b in bon.items()}
  rl = rl_curves(run, kinds, alpha=th.alpha, power=th.power)
  tests = bon_tests(bon, th.alpha)
  pvp = peak_vs_proxy(bon, proxies, alpha=th.alpha, power=th.power, bootstrap_reps=bootstrap_reps)
  ens = ensembles_vs_singles(bon, alpha=th.alpha, power=th.power)
  ens_rl = ensembles_vs_singles_rl(rl, pool, alpha=th.alpha, power=th.power)
  bvr = bon_vs_rl(bon, rl, alpha=th.alpha, power=th.power)
  return ProxyReport(run=run, out_dir=pathlib.Path(out_dir) if out_dir else run.path / REPORT_DIR,
                     pool=pool, rm_dirs=rm_dirs, proxies=proxies, bon=bon, bon_table=bon_table(bon),
                     bon_tests=tests, rl=rl, peak_vs_proxy=pvp, ensembles=ens, ensembles_rl=ens_rl,
                     bon_vs_rl=bvr, thresholds=th,
                     findings=findings(tests, rl, pvp, ens, bvr, th, pool.size, ens_rl),
                     set_kinds={d: proxy_set_kind(d) for d in rm_dirs})


FIGURE_CAPTIONS = {
    "proxy_bon_kinds": "Best-of-n gold vs sqrt KL for every selector on one axis, by class (SPEC §5): "
                       "the gold-selected oracle ceiling (thick grey), single proxy RMs (blue, solid), "
                       "ensemble objectives (purple, dashed) and offline policies' implicit rewards "
                       "(green, dash-dotted).",
    "proxy_bon": "Best-of-n against each selector (Gao et al. Fig. 1): gold (solid, ±1 SE band; blue "
                 "for a proxy RM, purple for an ensemble, green dash-dotted for an implicit reward) "
                 "and the selector's own score (dashed) vs sqrt KL, the Gao best-of-n fit (dotted), "
                 "the gold-selected oracle ceiling in grey, the held-out peak n as a thin red line. "
                 "At most 12 panels, shared out among the selector kinds in turn.",
    "proxy_rl": "RL against each selector: member trajectories coloured by the KL coefficient, gold "
                "(solid) and proxy reward (dashed) vs sqrt KL, per-member Gao RL fits (dotted).",
    "proxy_bon_vs_rl": "Best-of-n (black, ±1 SE band) and RL members (coloured by KL coefficient) gold vs "
                       "sqrt KL per selector.",
}

PROXY_COLUMNS = {"name": "proxy", "kind": "kind", "n_layers": "layers", "data_size": "data",
                 "labels": "labels / loss", "label_noise": "noise", "seed": "seed",
                 "gold_accuracy": "gold acc.", "gold_accuracy_se": "± se",
                 "gold_accuracy_n": "pairs", "ece": "ECE", "gold_corr": "gold corr (RM eval)",
                 "pool_corr": "pool corr", "within_prompt_corr": "within-prompt corr"}
BON_COLUMNS = {"selector": "selector", "kind": "kind", "within_prompt_corr": "within-prompt corr",
               "peak_n": "peak n", "kl_at_peak": "KL at peak", "peak_gold": "peak gold",
               "end_gold": "end gold", "drop": "drop", "drop_se": "± se", "drop_z": "z", "mde": "MDE",
               "gao_alpha": "Gao α", "gao_beta": "Gao β", "gao_d_peak": "d*", "gao_d_peak_se": "d* fit se",
               "proxy_rise": "proxy rise", "proxy_rise_z": "rise z"}
RL_COLUMNS = {"member": "member", "family": "selector", "beta": "β_KL", "seed": "seed",
              "peak_step": "peak step", "kl_at_peak": "KL at peak", "kl_end": "KL at end",
              "peak_gold": "peak gold", "end_gold": "end gold", "drop": "drop", "drop_se": "± se",
              "drop_z": "z", "mde": "MDE", "gao_alpha": "Gao α", "gao_beta": "Gao β",
              "gao_d_peak": "d*", "proxy_rise": "proxy rise", "proxy_rise_z": "rise z"}
GROUP_COLUMNS = {"n_layers": "layers", "data_size": "data", "labels": "labels", "label_noise": "noise",
                 "seeds": "seeds", "peak_gold": "peak gold", "peak_gold_se": "± se",
                 "kl_at_peak": "KL at peak", "gao_d_peak": "d* (mean)", "no_interior_peak": "no peak",
                 "drop": "drop"}
SCALE_COLUMNS = {"factor": "factor", "fixed": "fixed", "small": "small", "large": "large",
                 "diff": "Δ peak gold", "se": "± se", "z": "z", "mde": "MDE", "d_peak_diff": "Δ d*",
                 "d_peak_diff_se": "± se (boot)", "d_peak_z": "z"}
ENS_COLUMNS = {"selector": "ensemble", "n_singles": "members", "ens_peak_gold": "peak gold",
               "singles_peak_gold": "members' peak", "peak_gain_z": "z", "ens_fall": "fall",
               "singles_fall": "members' fall", "fall_reduction": "reduction",
               "fall_reduction_se": "± se", "fall_reduction_z": "z", "fall_reduction_mde": "MDE",
               "end_gain": "end gain", "end_gain_z": "z"}
ENS_RL_COLUMNS = {"member": "member", "selector": "ensemble", "beta": "β_KL", "seed": "seed",
                  "single_members": "single member(s)", "ens_kl_end": "KL at end",
                  "singles_kl_end": "singles' KL at end", "peak_gain": "Δ peak gold",
                  "peak_gain_z": "z", "ens_fall": "fall", "singles_fall": "singles' fall",
                  "fall_reduction": "reduction", "fall_reduction_se": "± se", "fall_reduction_z": "z",
                  "fall_reduction_p": "p", "fall_reduction_mde": "MDE"}
BVR_COLUMNS = {"selector": "selector", "at": "RL point", "members": "members", "mean_kl": "mean KL",
               "diff": "BoN − RL", "se": "± se", "z": "z", "mde": "MDE", "n_points": "points",
               "n_bon_better": "BoN higher", "n_rl_better": "RL higher", "n_out_of_range": "beyond BoN KL"}


def _plural(n: int, one: str, many: str | None = None) -> str:
  return f"{fmt(n)} {one if n == 1 else (many or one + 's')}"


def _sources_text(rm_dirs, set_kinds: dict) -> str:
  """``2 reward-model runs and 1 offline-policy run (`a`, `b`, `c`)``, by each set's kind."""
  kinds = [set_kinds.get(d, proxy_set_kind(d)) for d in rm_dirs]
  counts = [(sum(k == REWARD_MODEL for k in kinds), "reward-model run"),
            (sum(k == IMPLICIT for k in kinds), "offline-policy run"),
            (sum(k not in (REWARD_MODEL, IMPLICIT) for k in kinds), "unreadable run")]
  parts = [_plural(n, what) for n, what in counts if n]
  names = ", ".join(f"`{pathlib.Path(d).name}`" for d in rm_dirs) or "none given"
  if not parts:
    return f"no proxy-set runs ({names})"
  return (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + f" ({names})"


def _selectors_text(bon: dict) -> str:
  counts = {k: sum(b.kind == k for b in bon.values()) for k in ("single", "ensemble", "implicit")}
  parts = [_plural(n, what, many) for n, what, many in
           ((counts["single"], "single proxy RM", "single proxy RMs"),
            (counts["ensemble"], "ensemble objective", None),
            (counts["implicit"], "implicit reward", None)) if n]
  n_sel = sum(counts.values())
  return f"{_plural(n_sel, 'selector')} ({', '.join(parts) or 'none'}) beside the gold-selected oracle"


def render_markdown(rep: ProxyReport) -> str:
  """The text of ``proxy.md`` (deterministic: no timestamps, numbers via ``fmt``)."""
  th, pool = rep.thresholds, rep.pool
  rel = lambda p: p.relative_to(rep.out_dir).as_posix()  # noqa: E731
  t = rep.rl.trajectories
  betas = sorted(t["beta"].dropna().unique()) if not t.empty else []
  out = [f"# Overoptimisation against proxies: `{rep.run.path.name}`", "",
         f"{fmt(len(pool.proxy_names))} proxies from {_sources_text(rep.rm_dirs, rep.set_kinds)}; "
         f"{_selectors_text(rep.bon)}. Best-of-n: π_ref's pool of "
         f"N = {fmt(pool.size)} samples on each of {fmt(pool.num_prompts)} eval prompts, unbiased "
         f"estimator, KL = log n − (n − 1)/n up to {fmt(float(bon_lib.kl_bon(pool.size)))} nats. RL: "
         f"{fmt(t['member'].nunique() if not t.empty else 0)} members on "
         f"{fmt(t['family'].nunique() if not t.empty else 0)} selectors, KL coefficients "
         f"{', '.join(fmt(b) for b in betas) or 'n/a'}, evaluated on "
         f"{fmt(rep.rl.gold.shape[-1]) if rep.rl.gold is not None else 'n/a'} prompts. Gold and proxy "
         "are reference-subtracted per prompt (π_ref's pool mean), so R(0) = 0; every comparison is "
         "paired over prompts.", ""]
  out += render_findings(
      rep.findings, f"Every test is one-sided at level {fmt(th.alpha)}; minimum detectable effects "
      f"(MDE) are at {fmt(100 * th.power)}% power. \"Peaks and falls\" needs z ≥ {fmt(BAR_Z)}: the "
      "peak is chosen on the even prompts and the drop measured on the odd ones, paired.")
  if not rep.proxies.empty:
    out += ["## Proxies", "", "Final eval of each proxy's run. A reward model (kind reward_model): "
            "gold accuracy on held-out pairs, ECE, correlation with gold. An implicit reward (kind "
            "implicit: an offline GPO policy scored by log π − log π_ref, labelled by its loss and "
            "β_eff): the run's final-step rewards/gold_accuracies for that member (the sign of the "
            "implicit reward margin against the gold ordering on the held-out untied pairs; a zero "
            "margin counts as wrong), with a binomial SE over \"pairs\" untied pairs where that "
            "number is known (logged, or the rm/n_pairs of a reward-model set on the same lab and "
            "test pairs), no ECE. On the pool: the correlation with gold over all samples and within "
            "a prompt (what best-of-n ranks by).", "", md_table(rep.proxies, PROXY_COLUMNS), ""]
  out += ["## Best-of-n per selector", "",
          "Peak n chosen on the even prompts; peak, end (largest n) gold and the drop measured on the "
          "odd prompts; Gao best-of-n fit R(d) = d(α − β d) over all prompts, SE-weighted (its d* SE "
          "treats the n-points as independent, though they share pool samples); proxy rise: the "
          "selector's own score from the peak n to the largest n, paired. Kinds (SPEC §5): oracle "
          "(selects by gold: the ceiling), single (one proxy RM), ensemble (an objective over "
          "proxies), implicit (one offline policy's implicit reward, the like-for-like baseline).", "",
          md_table(rep.bon_tests, BON_COLUMNS), ""]
  if not rep.rl.tests.empty:
    out += ["## RL members", "", "Held-out peak test per member (peak step chosen on even prompts), "
            "Gao RL fit R(d) = d(α − β log d) per member trajectory, proxy rise from the peak step to "
            "the largest-KL step on the measuring prompts.", "", md_table(rep.rl.tests, RL_COLUMNS), ""]
  pvp = rep.peak_vs_proxy
  if not pvp.groups.empty:
    out += ["## Peak against proxy size and data", "", "Single proxy-RM selectors grouped by proxy "
            "(implicit rewards excluded), averaged over seeds (peak gold on the measuring prompts at "
            "each selector's own peak n).", "",
            md_table(pvp.groups, GROUP_COLUMNS), ""]
    if not pvp.tests.empty:
      out += [md_table(pvp.tests, SCALE_COLUMNS), ""]
  if not rep.ensembles.empty:
    out += ["## Ensembles against their members", "", "Per prompt on the measuring half: the "
            "ensemble against the mean of its members' single-proxy selectors; reduction = members' "
            "fall − ensemble's fall (positive: the ensemble falls less).", "",
            md_table(rep.ensembles, ENS_COLUMNS), ""]
  if not rep.ensembles_rl.empty:
    out += ["## Ensembles against their members under RL", "", "Each RL member optimising an "
            "ensemble selector, compared with the members at the same β_KL and seed that optimise one "
            "of the ensemble's proxies alone (their mean when several), per prompt on the measuring "
            "half; each member from its own held-out peak step to its largest-KL step. Δ peak gold = "
            "ensemble − singles; reduction = singles' fall − ensemble's fall (positive: the ensemble "
            "falls less).", "",
            md_table(rep.ensembles_rl, ENS_RL_COLUMNS), ""]
  if not rep.bon_vs_rl.summary.empty:
    out += ["## Best-of-n against RL at equal KL", "", "BoN gold of the member's selector, "
            "interpolated per prompt in sqrt KL at the member's KL, minus the member's gold; at each "
            "member's held-out peak (measuring prompts) and its largest-KL step (all prompts), "
            "averaged over the selector's members.", "", md_table(rep.bon_vs_rl.summary, BVR_COLUMNS), ""]
  if rep.figures:
    out += ["## Figures", ""]
    for name, paths in rep.figures.items():
      out += [f"![{name}]({rel(paths[0])})", "",
              f"*{FIGURE_CAPTIONS.get(name, name)}*" + (f" ([svg]({rel(paths[1])}))" if len(paths) > 1 else ""), ""]
  return "\n".join(out)


CSV_TABLES = {"proxies.csv": "proxies", "bon.csv": "bon_table", "bon_tests.csv": "bon_tests",
              "ensembles.csv": "ensembles", "ensembles_rl.csv": "ensembles_rl"}


def write_proxy(rep: ProxyReport, figures: bool = True) -> pathlib.Path:
  """Writes figures, ``proxy.md`` and the CSVs into ``rep.out_dir``."""
  rep.out_dir.mkdir(parents=True, exist_ok=True)
  if figures:
    from gpo_jax.analysis import proxy_plots   # matplotlib drawing only when asked
    rep.figures = proxy_plots.make_figures(rep)
  tables = {**{f: getattr(rep, a) for f, a in CSV_TABLES.items()},
            "rl_tests.csv": rep.rl.tests, "rl_curves.csv": rep.rl.trajectories,
            "peak_vs_proxy.csv": rep.peak_vs_proxy.tests,
            "peak_vs_proxy_groups.csv": rep.peak_vs_proxy.groups,
            "bon_vs_rl.csv": rep.bon_vs_rl.points, "bon_vs_rl_summary.csv": rep.bon_vs_rl.summary}
  for name, df in tables.items():
    df.to_csv(rep.out_dir / name, index=False, float_format=_FLOAT_FORMAT, lineterminator="\n")
  rep.path = rep.out_dir / REPORT_FILE
  rep.path.write_text(render_markdown(rep))
  return rep.path


def analyze_proxy(rl_dir, out_dir=None, rm_dirs=None, figures: bool = True, *, ns=None,
                  thresholds: Thresholds | None = None, bootstrap_reps: int = 200) -> ProxyReport:
  """Analyses a run against proxies: writes ``<out_dir>/proxy.md``, its CSVs and figures.

  Args:
    rl_dir: the RL run directory (``metrics.jsonl``, ``per_prompt/``, ``bon_pool.npz``).
    out_dir: where to write (default ``RL_DIR/report``).
    rm_dirs: the runs the proxy sets came from, reward-model runs and offline GPO runs
      (implicit rewards) alike (default: config.json's ``proxies.paths``); missing ones are
      described from the proxies' names.
    figures: draw the figures (PNG + SVG).
    ns: best-of-n grid (default: powers of 2 up to N, and N).
    thresholds: test level and power.
    bootstrap_reps: prompt resamples for the ``d*`` comparisons.

  Returns:
    The :class:`ProxyReport`; ``path`` is the written ``proxy.md``. Reruns write
    byte-identical markdown and CSVs.
  """
  rep = compute_proxy(rl_dir, out_dir, rm_dirs, ns=ns, thresholds=thresholds,
                      bootstrap_reps=bootstrap_reps)
  write_proxy(rep, figures=figures)
  return rep
