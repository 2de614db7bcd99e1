"""Literal aliases and registries of the statistics layer: one place for each list of choices.

The command line builds its ``--correction``, ``--metric`` and ``--test`` choices from
these, so they cannot drift from what the library accepts.
"""

from __future__ import annotations

from typing import Literal

from bodyage._typing import AttributionMethod, ImportanceMeasure

#: how the age gap is bias-corrected (see :mod:`analysis.agegap`)
GapCorrection = Literal["train", "linear", "quadratic", "none"]
#: which column of ``attributions.parquet`` is a region's importance
RegionMetric = Literal["mass", "share", "enrichment", "density", "abs_mass", "abs_density"]
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
REGION_METRICS: tuple[RegionMetric, ...] = ("mass", "share", "enrichment", "density", "abs_mass", "abs_density")
GROUP_TESTS: tuple[GroupTest, ...] = ("welch", "mannwhitney")
REGION_LEVELS: tuple[RegionLevel, ...] = ("region", "group")
MIXED_ENGINES: tuple[MixedEngine, ...] = ("auto", "statsmodels", "reml")
FDR_FAMILIES: tuple[FdrFamily, ...] = ("method", "phenotype", "all")

#: attribution methods that score whole regions; their ``mass`` is a change in predicted
#: age in years (docs/design.md §3), so signed ``mass`` is their default importance (docs/design.md §7)
REGION_LEVEL_METHODS: tuple[AttributionMethod, ...] = ("ablation", "shapley")
#: how each attribution method ranks regions for recovery (docs/design.md §6): a mirror of the
#: ``importance_measure`` of :data:`bodyage.attribution.METHODS`, which analysis cannot
#: import (it imports torch inside functions); a test keeps them equal
METHOD_IMPORTANCE_MEASURES: dict[str, ImportanceMeasure] = {
    "gradcam": "abs_mass",
    "integrated_gradients": "abs_mass",
    "ablation": "abs_mass",
    "shapley": "abs_mass",
}
#: how the ablation baselines (``--baseline``) are named in outputs; ``shift`` keeps the option
#: value for compatibility but is the *mean-signal* ablation (mirror of
#: :data:`bodyage.attribute_figures.BASELINE_NAMES`; a test keeps them equal)
ABLATION_BASELINE_NAMES: dict[str, str] = {
    "shift": "mean-signal",
    "mean": "mean-fill",
    "erase": "erase",
    "blur": "blur",
}


def baseline_label(method: str, baseline: str) -> str:
    """``mean-signal ablation`` for ``ablation`` with ``shift``; ``shapley (mean-signal baseline)`` for others."""
    name = ABLATION_BASELINE_NAMES.get(baseline, baseline)
    return f"{name} ablation" if method == "ablation" else f"{method} ({name} baseline)"


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
