"""Statistics on bodyage's tables: age gap, mixed models, comparisons, LaTeX, figures.

This package never imports torch (nor captum or TotalSegmentator), so a statistician can
run ``bodyage stats`` on the tables of a run without the deep-learning stack. The
contract is checked by import-linter and by ``tests/test_layers.py``.

The public API is re-exported here, loaded on first use (``import analysis`` itself
imports nothing heavy, so ``bodyage --help`` stays instant)::

    from analysis import load_run, compare

    run = load_run("runs/r1")
    res = compare(run, cohort="diabetes == 1", reference="diabetes == 0", match="age,sex")
    res.tests[res.tests.significant]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from analysis.agegap import GapCorrectionResult, age_accuracy, correct_gap
    from analysis.clock_recovery import clock_recovery
    from analysis.compare import ComparisonResult, compare, run_compare, write_comparison
    from analysis.fdr import benjamini_hochberg
    from analysis.filters import Filter, parse_filter
    from analysis.organ_outputs import OrganStatsResult, run_organ_stats
    from analysis.organ_stats import ClockTables, clock_correlations, load_clocks, organ_gap_models
    from analysis.phenotypes import phenotype_models
    from analysis.regionjoint import joint_region_model
    from analysis.regionmodels import importance_matrix, region_gap_correlations, region_models
    from analysis.report import ReportResult, write_report
    from analysis.report_organs import write_organ_report
    from analysis.run import RunTables, load_run
    from analysis.stats import StatsResult, run_stats

_EXPORTS: dict[str, str] = {
    "load_run": "analysis.run",
    "RunTables": "analysis.run",
    "correct_gap": "analysis.agegap",
    "age_accuracy": "analysis.agegap",
    "GapCorrectionResult": "analysis.agegap",
    "phenotype_models": "analysis.phenotypes",
    "region_models": "analysis.regionmodels",
    "joint_region_model": "analysis.regionjoint",
    "region_gap_correlations": "analysis.regionmodels",
    "importance_matrix": "analysis.regionmodels",
    "compare": "analysis.compare",
    "run_compare": "analysis.compare",
    "write_comparison": "analysis.compare",
    "ComparisonResult": "analysis.compare",
    "parse_filter": "analysis.filters",
    "Filter": "analysis.filters",
    "benjamini_hochberg": "analysis.fdr",
    "run_stats": "analysis.stats",
    "StatsResult": "analysis.stats",
    "write_report": "analysis.report",
    "load_clocks": "analysis.organ_stats",
    "ClockTables": "analysis.organ_stats",
    "organ_gap_models": "analysis.organ_stats",
    "clock_correlations": "analysis.organ_stats",
    "clock_recovery": "analysis.clock_recovery",
    "run_organ_stats": "analysis.organ_outputs",
    "OrganStatsResult": "analysis.organ_outputs",
    "write_organ_report": "analysis.report_organs",
    "ReportResult": "analysis.report",
}

__all__ = [
    "ClockTables",
    "ComparisonResult",
    "Filter",
    "GapCorrectionResult",
    "OrganStatsResult",
    "ReportResult",
    "RunTables",
    "StatsResult",
    "age_accuracy",
    "benjamini_hochberg",
    "clock_correlations",
    "clock_recovery",
    "compare",
    "correct_gap",
    "importance_matrix",
    "joint_region_model",
    "load_clocks",
    "load_run",
    "organ_gap_models",
    "parse_filter",
    "phenotype_models",
    "region_gap_correlations",
    "region_models",
    "run_compare",
    "run_organ_stats",
    "run_stats",
    "write_comparison",
    "write_organ_report",
    "write_report",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
