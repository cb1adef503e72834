"""CLI: ``python -m gpo_jax.analysis RUN_DIR [RUN_DIR ...] [--out DIR]`` (report or comparison).

A single RUN_DIR that holds ``bon_pool.npz`` (a run against proxy reward models) also gets
the proxy report, ``proxy.md``, next to ``report.md``; an online run (``configs/online.py``'s
``online/`` stage, or the pipeline directory holding it) gets ``online.md``, the comparison
with the offline stage beside it; an incontext pipeline directory (``configs/incontext.py``)
gets ``incontext.md``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from gpo_jax.analysis import incontext as incontext_report
from gpo_jax.analysis import online as online_report
from gpo_jax.analysis.comparison import compare
from gpo_jax.analysis.findings import Thresholds
from gpo_jax.analysis.proxy import analyze_proxy
from gpo_jax.analysis.proxy_evidence import POOL_FILE
from gpo_jax.analysis.report import analyze


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m gpo_jax.analysis", description=__doc__)
  p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="trainer work directories")
  p.add_argument("--out", default=None, help="output directory (default RUN_DIR/report, or comparison/ next to the first run)")
  p.add_argument("--step", type=float, default=None, help="step budget for the best-β comparison (default: final step)")
  p.add_argument("--no-figures", action="store_true", help="skip the figures (faster)")
  p.add_argument("--alpha", type=float, default=Thresholds.alpha,
                  help="level of every test (default %(default)s)")
  p.add_argument("--power", type=float, default=Thresholds.power,
                  help="power at which minimum detectable effects are quoted (default %(default)s)")
  a = p.parse_args(argv)
  try:
    th = Thresholds(alpha=a.alpha, power=a.power)
  except ValueError as e:
    p.error(str(e))
  root = pathlib.Path(a.run_dirs[0])
  if len(a.run_dirs) == 1 and (root / incontext_report.ICDPO).is_dir():
    # an incontext pipeline directory: the standard report of its Inverse-Q* run, then
    # incontext.md over all stages
    if (root / incontext_report.INVERSE_Q / "metrics.jsonl").exists():
      iq_out = None if a.out is None else pathlib.Path(a.out) / incontext_report.INVERSE_Q
      rep = analyze(root / incontext_report.INVERSE_Q, iq_out, step=a.step, thresholds=th,
                    figures=not a.no_figures)
      print(rep.path)
    print(incontext_report.write(root, log=lambda msg: print(f"- {msg}"), out_dir=a.out,
                                 figures=not a.no_figures, thresholds=th))
  elif len(a.run_dirs) == 1 and online_report.is_online(a.run_dirs[0]):
    on_dir, _ = online_report.locate(a.run_dirs[0])
    rep = analyze(on_dir, a.out, step=a.step, thresholds=th, figures=not a.no_figures)
    print(rep.path)
    print(online_report.write(a.run_dirs[0], log=lambda msg: print(f"- {msg}"), out_dir=a.out,
                              figures=not a.no_figures, thresholds=th))
  elif len(a.run_dirs) == 1:
    rep = analyze(a.run_dirs[0], a.out, step=a.step, thresholds=th, figures=not a.no_figures)
    print(rep.path)
    for f in rep.findings:
      print(f"- {f.question} {f.verdict}")
    if (pathlib.Path(a.run_dirs[0]) / POOL_FILE).exists():
      prep = analyze_proxy(a.run_dirs[0], a.out, thresholds=th, figures=not a.no_figures)
      print(prep.path)
      for f in prep.findings:
        print(f"- {f.question} {f.verdict}")
  else:
    if a.step is not None:
      p.error("--step applies to a single run")
    cmp = compare(a.run_dirs, a.out, thresholds=th, figures=not a.no_figures)
    print(cmp.path)
    print(f"- {cmp.finding.question} {cmp.finding.verdict}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
