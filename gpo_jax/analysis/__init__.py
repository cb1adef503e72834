"""Analysis of a finished sweep: run dir → table, frontiers, Gao fits, statistics, plots and ``report.md``.

A run against proxy reward models (``bon_pool.npz`` in its directory) also gets
``proxy.md`` (:func:`analyze_proxy`, :mod:`gpo_jax.analysis.proxy`).

Importing this package never imports JAX or the trainer; it needs numpy, pandas,
scipy and matplotlib (Agg backend) only.
"""

from gpo_jax.analysis.table import METRIC_FIELDS, Run, load_run
from gpo_jax.analysis.frontier import Frontier, family_frontiers, frontier_gap, pareto_mask, running_max
from gpo_jax.analysis.gao import GaoFit, fit_gao, gao_curve
from gpo_jax.analysis.stats import best_beta, family_overoptimization
from gpo_jax.analysis.evidence import member_peak_tests, overlap_against_seeds, best_beta_shifts
from gpo_jax.analysis.findings import Finding, Thresholds
from gpo_jax.analysis.report import Report, analyze
from gpo_jax.analysis.comparison import Comparison, compare
from gpo_jax.analysis.proxy import ProxyReport, analyze_proxy

__all__ = [
    "METRIC_FIELDS", "Run", "load_run", "Frontier", "family_frontiers", "frontier_gap",
    "pareto_mask", "running_max", "GaoFit", "fit_gao", "gao_curve", "best_beta",
    "family_overoptimization", "member_peak_tests", "overlap_against_seeds", "best_beta_shifts",
    "Finding", "Thresholds", "Report", "analyze",
    "Comparison", "compare", "ProxyReport", "analyze_proxy",
]
