"""Literal aliases and registries of the statistics layer: one place for each list of choices.

The command line builds its ``--correction``, ``--metric`` and ``--test`` choices from
these, so they cannot drift from what the library accepts.
"""

from __future__ import annotations

from typing import Literal

from bodyage._typing import AttributionMethod

#: how the age gap is bias-corrected (see :mod:`analysis.agegap`)
GapCorrection = Literal["train", "linear", "quadratic", "none"]
#: which column of ``attributions.parquet`` is a region's importance
RegionMetric = Literal["mass", "share", "enrichment", "density", "abs_mass"]
#: two-group test of a cohort comparison
GroupTest = Literal["welch", "mannwhitney"]
#: regions one by one, or the named groups of :data:`bodyage.regions.REGION_GROUPS`
RegionLevel = Literal["region", "group"]
#: solver of the random-intercept model (see :mod:`analysis.mixed`): ``auto`` is the exact
#: REML solver (lme4's fit, Satterthwaite df); ``statsmodels`` is MixedLM with z-tests, opt-in
MixedEngine = Literal["auto", "statsmodels", "reml"]
#: the tests one Benjamini–Hochberg correction of the region analyses spans (see :mod:`analysis.fdr`)
FdrFamily = Literal["method", "phenotype", "all"]

GAP_CORRECTIONS: tuple[GapCorrection, ...] = ("train", "linear", "quadratic", "none")
REGION_METRICS: tuple[RegionMetric, ...] = ("mass", "share", "enrichment", "density", "abs_mass")
GROUP_TESTS: tuple[GroupTest, ...] = ("welch", "mannwhitney")
REGION_LEVELS: tuple[RegionLevel, ...] = ("region", "group")
MIXED_ENGINES: tuple[MixedEngine, ...] = ("auto", "statsmodels", "reml")
FDR_FAMILIES: tuple[FdrFamily, ...] = ("method", "phenotype", "all")

#: attribution methods that score whole regions; their ``mass`` is a change in predicted
#: age in years (DESIGN.md §3), so signed ``mass`` is their default importance (DESIGN.md §7)
REGION_LEVEL_METHODS: tuple[AttributionMethod, ...] = ("ablation", "shapley")
#: default importance of voxel-level methods (GradCAM, integrated gradients, ...)
VOXEL_METHOD_METRIC: RegionMetric = "share"
#: default importance of region-level methods
REGION_METHOD_METRIC: RegionMetric = "mass"


def default_metric(method: str) -> RegionMetric:
    """Return the default importance column of an attribution method.

    Signed ``mass`` (years) for region-level methods (``ablation``, ``shapley``): an
    older-looking liver pushes the prediction up, and the direction is the finding.
    ``share`` for voxel-level methods, whose summed attribution has no fixed scale.
    """
    return REGION_METHOD_METRIC if method in REGION_LEVEL_METHODS else VOXEL_METHOD_METRIC
