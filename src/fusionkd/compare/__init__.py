"""Honest comparisons: run a method × model × seed grid (skipping finished runs, resuming interrupted ones),
aggregate mean ± std over seeds at the last and at the best-validation epoch, and write a report.

>>> from fusionkd.compare import CompareSpec, compare
>>> r = compare(CompareSpec(methods=["baseline", "frskd"], models=["resnet20"], seeds=[0, 1, 2],
...                         out="runs/cmp", common={"epochs": 15, "subset": 5000}))  # doctest: +SKIP
>>> r.report.markdown  # runs/cmp/report.md  # doctest: +SKIP

Also :func:`report_from_folders` (``fusionkd report``), :func:`fusionkd.compare.bench.bench`
(``fusionkd bench``) and :func:`fusionkd.compare.demo.demo` (``fusionkd demo``). See ``docs/compare.md``.
"""

from .aggregate import GroupStats, RunRecord, Stat, find_runs, load_run, run_rows, summarize
from .bench import BenchSpec
from .grid import CompareResult, CompareSpec, compare, plan
from .report import ReportFiles, report_from_folders, write_report

__all__ = ["BenchSpec", "CompareResult", "CompareSpec", "GroupStats", "ReportFiles", "RunRecord", "Stat",
           "compare", "find_runs", "load_run", "plan", "report_from_folders", "run_rows", "summarize",
           "write_report"]
