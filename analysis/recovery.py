"""Validation on planted truth (docs/design.md §6): does the pipeline find the ageing we planted.

:func:`recovery` compares a run on a simulated study with the study's ``truth.json`` and
returns the dictionary ``report`` writes to ``RUN/recovery.json`` (the keys of docs/design.md
§6 are a contract; more are added):

``mae``, ``oracle_mae``, ``mae_ratio``
    The run's out-of-fold MAE (uncorrected, as ``metrics.json``), the oracle's floor and
    their ratio; ``baseline_mae`` and ``informative`` (:mod:`bodyage.accuracy`: the MAE
    of predicting the mean age of the other folds, and whether the model beat it).
``methods[<method>]``
    ``k`` (regions with ``region_information > 0``), ``precision_at_k`` (fraction of
    them among the k most important regions), ``spearman`` (rank correlation of
    ``region_information`` with importance over every region present), ``top_regions``
    (the k most important), ``importance_measure``, ``by_effect`` (precision among the
    planted regions of each effect type) and ``agreement_with_ablation`` (Spearman of
    the method's importance with ``ablation``'s); beside them what the precision must
    beat (:mod:`analysis.floors`, :mod:`bodyage.floors`): ``floors`` ({``volume``,
    ``volume_intensity``, ``signal_spread``, ``univariate_screen``}: precision@k of
    model-free rankings), ``floor_max``, ``floor_max_by``, ``beats_floors_by``
    (precision@k − ``floor_max``) and, when ``RUN/attributions_null.parquet`` exists,
    ``nulls`` ({``random_weights``, ``permuted_labels``}: precision@k of the null copies,
    ``ci_low``, ``ci_high``, ``n_copies``), ``clears_nulls`` and ``beats_nulls_by``; and how
    much the ranking moves between models: ``stability`` (over the fold models: Kendall's W,
    top-k Jaccard) and, with ``attribute --runs``, ``run_stability``, as ``attribute``
    recorded them in ``attribution_recovery.json`` (``stability`` is ``None`` without).
``phenotypes[<phenotype>]``
    ``planted`` (the scenario accelerates some region's ageing), ``gap_effect``,
    ``ci_low``, ``ci_high``, ``q`` (separate phenotype model on the corrected gap),
    ``planted_regions`` and ``significant_regions[<method>]`` (region models at FDR
    ``alpha``).
``goals``
    The goals of docs/design.md §6, each with its target, value and ``met``.

Region importance (:func:`region_importance`) is the mean over scans of ``|mass|`` for
region-level methods (``ablation``, ``shapley``), whose signed values cancel between young
and old scans; for voxel methods the measure the attribution step declares (see
:func:`declared_measures`), else the one the method registry declares
(:data:`analysis._typing.METHOD_IMPORTANCE_MEASURES`); a method declared nowhere is an
error, never a silent default. ``density`` ranks by the mean of ``|density|`` (a strongly
negative region matters as much as a positive one). Always per region, never grouped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis._typing import METHOD_IMPORTANCE_MEASURES, REGION_LEVEL_METHODS
from analysis.floors import no_floors, read_nulls, read_stability, study_floor_scores
from analysis.recovery_tex import ABS_MASS, RECOVERY_FILE, RECOVERY_TEX, recovery_latex, write_recovery
from analysis.regionmodels import ALPHA
from analysis.run import RunTables, as_run
from analysis.stats_record import current_table
from bodyage.accuracy import prediction_metrics
from bodyage.errors import InputError, StudyError
from bodyage.floors import floors_entry, margins, null_entry

__all__ = [
    "ABS_MASS",
    "RECOVERY_FILE",
    "RECOVERY_TEX",
    "declared_measures",
    "importance_measure",
    "method_recovery",
    "read_truth",
    "recovery",
    "recovery_latex",
    "region_importance",
    "write_recovery",
]

TRUTH_FILE = "truth.json"
METRICS_FILE = "metrics.json"
#: files of the attribution step that may declare each voxel method's importance measure
MEASURE_SOURCES: tuple[str, ...] = ("attribution_recovery.json", "attribute.json", "attribute/run.json")
#: measures whose sign carries no rank: regions are ranked by the mean of their absolute value
ABSOLUTE_MEASURES: tuple[str, ...] = ("density",)
VOXEL_MEASURES: tuple[str, ...] = ("share", "enrichment", "density", "abs_mass", "abs_density")
#: the method every other method is compared with
REFERENCE_METHOD = "ablation"


def read_truth(study_root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Read ``STUDY/truth.json``; ``None`` when the study is not simulated.

    Raises
    ------
    StudyError
        If the file exists but is not a JSON object with ``region_information``.
    """
    path = Path(study_root) / TRUTH_FILE
    if not path.is_file():
        return None
    try:
        truth = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise StudyError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(truth, dict) or not isinstance(truth.get("region_information"), dict):
        raise StudyError(f"{path}: expected a JSON object with 'region_information'")
    return truth


def declared_measures(run_root: str | os.PathLike[str] | None) -> dict[str, str]:
    """Importance measures the attribution step declares for its voxel methods.

    Looked up, first found wins, in :data:`MEASURE_SOURCES` under the run folder: a key
    ``importance_measure`` holding ``{method: measure}`` (or one measure for every voxel
    method), or ``methods: {method: {"importance_measure": measure}}``.

    Returns
    -------
    dict
        ``{method: measure}``; empty when nothing is declared.
    """
    if run_root is None:
        return {}
    root = Path(run_root)
    for name in MEASURE_SOURCES:
        path = root / name
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        if not isinstance(raw, dict):
            continue
        found: dict[str, str] = {}
        value = raw.get("importance_measure")
        if isinstance(value, dict):
            found.update({str(k): str(v) for k, v in value.items()})
        elif isinstance(value, str):
            found["*"] = value
        methods = raw.get("methods")
        if isinstance(methods, dict):
            for m, entry in methods.items():
                if isinstance(entry, dict) and isinstance(entry.get("importance_measure"), str):
                    found[str(m)] = entry["importance_measure"]
        if found:
            return found
    return {}


def importance_measure(method: str, declared: Mapping[str, str] | None = None) -> str:
    """The importance measure of ``method``.

    ``abs_mass`` for region-level methods; else what the run declares
    (:func:`declared_measures`), else what the method registry declares
    (:data:`analysis._typing.METHOD_IMPORTANCE_MEASURES`).

    Raises
    ------
    InputError
        If nothing declares a measure for ``method``, or the declared measure is not one of
        :data:`VOXEL_MEASURES`.
    """
    if method in REGION_LEVEL_METHODS:
        return ABS_MASS
    declared = declared or {}
    measure = declared.get(method, declared.get("*", METHOD_IMPORTANCE_MEASURES.get(method)))
    if measure is None:
        raise InputError(
            f"importance measure of {method!r} is declared nowhere (not in the run's "
            f"{', '.join(MEASURE_SOURCES)} nor the method registry); pass one, e.g. measures={{{method!r}: 'share'}}"
        )
    if measure not in VOXEL_MEASURES:
        raise InputError(
            f"importance measure of {method!r} must be one of {', '.join(VOXEL_MEASURES)}; {measure!r} was given"
        )
    return measure


def region_importance(attributions: pd.DataFrame, method: str, measure: str) -> pd.DataFrame:
    """Mean importance per region over scans, with a 95% confidence interval.

    Parameters
    ----------
    attributions
        ``attributions.parquet`` (long table).
    method
        Attribution method.
    measure
        Column averaged; ``abs_mass`` is computed as ``|mass|`` and ``density`` as
        ``|density|`` (:data:`ABSOLUTE_MEASURES`). Scans where a region is absent (NaN) are
        left out of that region's mean.

    Returns
    -------
    pandas.DataFrame
        Indexed by region, columns ``mean``, ``ci_low``, ``ci_high`` (mean ± 1.96 SE) and
        ``n`` (scans), sorted by ``mean`` descending (ties by region name). Regions absent
        from every scan are dropped.
    """
    sub = attributions[attributions["method"].astype(str) == method]
    if sub.empty:
        raise InputError(f"attributions: no rows for method {method!r}")
    values = sub["mass"].abs() if measure == ABS_MASS else sub[measure]
    if measure in ABSOLUTE_MEASURES:
        values = values.abs()
    frame = pd.DataFrame({"region": sub["region"].astype(str).to_numpy(), "value": values.to_numpy(float)})
    grouped = frame.dropna().groupby("region")["value"]
    out = pd.DataFrame({"mean": grouped.mean(), "sd": grouped.std(ddof=1), "n": grouped.size()})
    se = out["sd"] / np.sqrt(out["n"])
    out["ci_low"] = out["mean"] - 1.959964 * se
    out["ci_high"] = out["mean"] + 1.959964 * se
    out = out.drop(columns="sd").reset_index()
    out = out.sort_values(["mean", "region"], ascending=[False, True], kind="mergesort").set_index("region")
    return out[["mean", "ci_low", "ci_high", "n"]]


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman rank correlation of two series over their common index (average ranks; NaN if undefined)."""
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    if len(both) < 2:
        return math.nan
    ra = both["a"].rank(method="average").to_numpy()
    rb = both["b"].rank(method="average").to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def region_effects(truth: Mapping[str, Any]) -> dict[str, str]:
    """``{region: effect}`` of the scenario's planted ageing (``fat_fraction``, ``volume``, ``water_signal``)."""
    ageing = (truth.get("scenario") or {}).get("ageing") or []
    return {str(e["region"]): str(e["effect"]) for e in ageing if isinstance(e, Mapping) and "region" in e}


def method_recovery(
    importance: pd.Series,
    information: Mapping[str, float],
    effects: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Score one method's region ranking against the planted information.

    Parameters
    ----------
    importance
        Region -> importance (larger is more important).
    information
        ``truth.json``'s ``region_information``: region -> rise of the oracle's MAE when
        the region is withheld (0 for regions without planted ageing).
    effects
        Region -> planted effect type, for ``by_effect``.

    Returns
    -------
    dict
        ``k``, ``precision_at_k``, ``spearman``, ``top_regions``, ``by_effect``. A planted
        region missing from ``importance`` counts as not found.
    """
    info = pd.Series({str(k): float(v) for k, v in information.items()}, dtype=float)
    planted = set(info.index[info > 0])
    k = len(planted)
    imp = importance.dropna()
    order = sorted(imp.index, key=lambda r: (-float(imp[r]), str(r)))
    top = [str(r) for r in order[:k]]
    hits = planted.intersection(top)
    present = info.reindex(imp.index).fillna(0.0)
    by_effect: dict[str, float] = {}
    for effect in sorted(set((effects or {}).values())):
        regions = [r for r in planted if (effects or {}).get(r) == effect]
        if regions:
            by_effect[effect] = len(hits.intersection(regions)) / len(regions)
    return {
        "k": k,
        "precision_at_k": len(hits) / k if k else math.nan,
        "spearman": spearman(present, imp),
        "top_regions": top,
        "by_effect": by_effect,
    }


def recovery_options(alpha: float) -> dict[str, Any]:
    """The ``stats`` options the recovery's phenotype and region results are defined with.

    Tables of ``RUN/stats`` made with other options (:mod:`analysis.stats_record`) are not
    used: the recovery fits its own.
    """
    from analysis.design import DEFAULT_GROUP

    return {
        "covariates": None,
        "default_covariates": True,
        "group": DEFAULT_GROUP,
        "correction": "train",
        "engine": "auto",
        "metric": None,
        "level": "region",
        "alpha": alpha,
        "fdr_family": "method",
    }


def _phenotype_results(tables: RunTables, phenotypes: Sequence[str], alpha: float) -> tuple[pd.DataFrame, str]:
    """Separate phenotype models: from ``RUN/stats`` if current and made with :func:`recovery_options`, else fitted."""
    from analysis.phenotypes import phenotype_models

    path = current_table(tables.root, "phenotype_models", recovery_options(alpha))
    if path is not None:
        res = pd.read_parquet(path)
        if set(phenotypes) <= set(res["phenotype"]):
            return res[res["model"] == "separate"], "stats"
    res = phenotype_models(tables, phenotypes=list(phenotypes), joint=False)
    return res[res["model"] == "separate"], "computed"


def _region_results(tables: RunTables, phenotypes: Sequence[str], alpha: float) -> tuple[pd.DataFrame | None, str]:
    """Region-level region models: from ``RUN/stats`` if current and made with :func:`recovery_options`, else fitted."""
    from analysis.regionmodels import region_models

    if tables.attributions is None:
        return None, "none"
    path = current_table(tables.root, "region_models", recovery_options(alpha))
    if path is not None:
        res = pd.read_parquet(path)
        if (
            (res["level"] == "region").all()
            and set(phenotypes) <= set(res["phenotype"])
            and set(tables.methods) <= set(res["method"].astype(str))
        ):
            return res, "stats"
    return region_models(tables, phenotypes=list(phenotypes), alpha=alpha), "computed"


def _run_mae(tables: RunTables) -> float:
    """Out-of-fold MAE (``metrics.json`` when present, else the predictions); never of the corrected predictions."""
    metrics: dict[str, Any] = {}
    if tables.root is not None and (tables.root / METRICS_FILE).is_file():
        try:
            metrics = json.loads((tables.root / METRICS_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            metrics = {}
    pred = tables.predictions
    mae = (metrics.get("overall") or {}).get("mae")
    if not isinstance(mae, (int, float)):
        mae = float((pred["predicted_age"] - pred["age"]).abs().mean())
    return float(mae)


def recovery(
    run: RunTables | str | os.PathLike[str],
    truth: Mapping[str, Any] | None = None,
    *,
    measures: Mapping[str, str] | None = None,
    alpha: float = ALPHA,
) -> dict[str, Any]:
    """Compare a run with the planted truth of its simulated study (docs/design.md §6).

    Parameters
    ----------
    run
        Run folder or tables.
    truth
        The study's ``truth.json``; ``None``: read from the run's study.
    measures
        ``{method: measure}`` for voxel methods, overriding what the attribution step
        declares (:func:`declared_measures`) and the method registry.
    alpha
        FDR level of ``significant_regions`` and of the goals.

    Returns
    -------
    dict
        The content of ``recovery.json`` (see the module docstring). Phenotype and region
        models are read from ``RUN/stats`` when it is current, else fitted here with the
        defaults of ``bodyage stats``; ``sources`` says which. The floors come from the
        study's images and masks (cached in ``RUN/region_signals.parquet``); without them
        ``floors`` is ``None`` and ``floors_note`` says why.

    Raises
    ------
    StudyError
        If the study has no ``truth.json`` (not simulated) or it is invalid.
    """
    tables = as_run(run)
    if truth is None:
        if tables.study_root is None:
            raise InputError("run tables built in memory need the truth (truth=...)")
        truth = read_truth(tables.study_root)
        if truth is None:
            raise StudyError(f"{tables.study_root / TRUTH_FILE}: not found (recovery needs a simulated study)")
    information = {str(k): float(v) for k, v in truth["region_information"].items()}
    effects = region_effects(truth)
    mae = _run_mae(tables)
    check = prediction_metrics(tables.predictions)
    oracle = truth.get("oracle_mae")
    oracle_mae = float(oracle) if isinstance(oracle, (int, float)) else math.nan
    out: dict[str, Any] = {
        "mae": mae,
        "oracle_mae": oracle_mae,
        "mae_ratio": mae / oracle_mae if oracle_mae and math.isfinite(oracle_mae) else math.nan,
        "baseline_mae": check["baseline_mae"],
        "informative": check["informative"],
        "n_scans": len(tables.predictions),
        "scenario": truth.get("scenario_name"),
        "alpha": alpha,
        "planted_regions": sorted(r for r, v in information.items() if v > 0),
        "methods": {},
        "phenotypes": {},
    }

    declared = dict(declared_measures(tables.root))
    declared.update(measures or {})
    importances: dict[str, pd.Series] = {}
    scores, n_floor_scans, floors_note = study_floor_scores(tables.study_root, tables.root)
    nulls = read_nulls(tables.root)
    stability = read_stability(tables.root)

    def score(imp: pd.Series) -> float:
        return float(method_recovery(imp, information)["precision_at_k"])

    for method in tables.methods:
        measure = importance_measure(method, declared)
        imp = region_importance(tables.attributions, method, measure)["mean"]  # type: ignore[arg-type]
        importances[method] = imp
        entry = method_recovery(imp, information, effects)
        entry["importance_measure"] = measure
        entry["measure_source"] = (
            "region-level"
            if method in REGION_LEVEL_METHODS
            else ("declared" if method in declared or "*" in declared else "registry")
        )
        entry.update(floors_entry(scores, score) if scores is not None else no_floors(floors_note))
        entry["floors_n_scans"] = n_floor_scans
        entry.update(
            null_entry(
                nulls,
                method,
                imp,
                lambda t, m=method, ms=measure: region_importance(t, m, ms)["mean"],  # type: ignore[misc]
                score,
            )
        )
        entry.update(stability.get(method, {"stability": None}))  # run-to-run: over folds (and --runs)
        out["methods"][method] = margins(entry)
    for method, entry in out["methods"].items():
        ref = importances.get(REFERENCE_METHOD)
        if method == REFERENCE_METHOD:
            entry["agreement_with_ablation"] = 1.0
        else:
            entry["agreement_with_ablation"] = spearman(importances[method], ref) if ref is not None else None

    planted_by_pheno = truth.get("phenotype_regions") or {}
    scenario_phenos = (truth.get("scenario") or {}).get("phenotypes") or {}
    names = [p for p in scenario_phenos if p in tables.cohort.columns] or [
        p for p in planted_by_pheno if p in tables.cohort.columns
    ]
    sources: dict[str, str] = {}
    if names:
        gap, sources["phenotype_models"] = _phenotype_results(tables, names, alpha)
        regions, sources["region_models"] = _region_results(tables, names, alpha)
        for p in names:
            row = gap[gap["phenotype"] == p]
            r = row.iloc[0] if len(row) else None
            planted_regions = [str(x) for x in planted_by_pheno.get(p, [])]
            sig: dict[str, list[str]] = {}
            if regions is not None:
                for method in tables.methods:
                    hit = regions[
                        (regions["method"].astype(str) == method) & (regions["phenotype"] == p) & regions["significant"]
                    ]
                    sig[method] = sorted(hit["region"].astype(str))
            anatomy = (scenario_phenos.get(p) or {}).get("anatomy") or {}
            out["phenotypes"][p] = {
                "planted": bool(planted_regions),
                "gap_effect": _num(r, "estimate"),
                "ci_low": _num(r, "ci_low"),
                "ci_high": _num(r, "ci_high"),
                "p": _num(r, "p"),
                "q": _num(r, "q"),
                "planted_regions": planted_regions,
                "anatomy_regions": sorted(str(x) for x in anatomy),
                "significant_regions": sig,
            }
    out["sources"] = sources
    out["goals"] = evaluate_goals(out, alpha=alpha)
    evaluated = [g["met"] for g in out["goals"].values() if g["met"] is not None]
    out["goals_met"] = all(evaluated) if len(evaluated) == len(out["goals"]) else None
    return out


def _num(row: pd.Series | None, key: str) -> float | None:
    if row is None or key not in row.index:
        return None
    v = row[key]
    return float(v) if v is not None and pd.notna(v) else None


#: the margin by which the best region method must beat the floors and its permuted-label null
GOAL_MARGIN = 0.25
#: the demo's accuracy goal: out-of-fold MAE at most this multiple of the oracle's
GOAL_MAE_RATIO = 1.55
#: the goals of docs/design.md §6 on the default scenario (wave 2): name -> description. GradCAM has
#: no precision goal (docs/design.md §6: only once it clears its null)
GOALS: dict[str, str] = {
    "mae_ratio": f"MAE / oracle MAE <= {GOAL_MAE_RATIO}",
    "region_method_beats_floors": "best region-level method: precision@k >= largest model-free floor + 0.25",
    "region_method_beats_permuted_null": "best region-level method: precision@k >= its permuted-label null + 0.25",
    "diabetes_gap": "diabetes raises the corrected gap, q < alpha",
    "diabetes_liver_ablation": "liver among diabetes' significant ablation regions",
    "smoking_null": "smoking significant nowhere (gap and every method's regions)",
}


def evaluate_goals(rec: Mapping[str, Any], *, alpha: float = ALPHA) -> dict[str, dict[str, Any]]:
    """Evaluate :data:`GOALS` on a recovery dictionary.

    Returns
    -------
    dict
        ``{name: {"goal": text, "value": ..., "met": bool | None}}``; ``met`` is ``None``
        when the goal cannot be evaluated (its method, phenotype, floors or nulls are
        absent). The two precision goals take the region-level method (``ablation``,
        ``shapley``) with the largest precision@k, name it under ``method``, and give the
        margin (precision@k − floor or null) as the value.
    """
    goals: dict[str, dict[str, Any]] = {}

    def put(name: str, value: Any, met: bool | None) -> None:
        goals[name] = {"goal": GOALS[name], "value": value, "met": met}

    ratio: Any = rec.get("mae_ratio")
    put("mae_ratio", ratio, bool(ratio <= GOAL_MAE_RATIO) if _finite(ratio) else None)
    methods = rec.get("methods", {})
    region = [m for m in methods if m in REGION_LEVEL_METHODS and _finite(methods[m].get("precision_at_k"))]
    best = max(region, key=lambda m: methods[m]["precision_at_k"]) if region else None
    entry = methods.get(best, {}) if best else {}
    p = float(entry["precision_at_k"]) if best else math.nan
    floor_max: Any = entry.get("floor_max")
    null: Any = ((entry.get("nulls") or {}).get("permuted_labels") or {}).get("precision_at_k")
    floor_margin = p - float(floor_max) if best and _finite(floor_max) else None
    null_margin = p - float(null) if best and _finite(null) else None
    for name, margin in (
        ("region_method_beats_floors", floor_margin),
        ("region_method_beats_permuted_null", null_margin),
    ):
        put(name, margin, bool(margin >= GOAL_MARGIN - 1e-9) if margin is not None else None)
        goals[name]["method"] = best
    phenos = rec.get("phenotypes", {})
    dia = phenos.get("diabetes")
    if dia is not None and _finite(dia.get("q")) and _finite(dia.get("gap_effect")):
        put("diabetes_gap", dia["q"], bool(dia["q"] < alpha and dia["gap_effect"] > 0))
    else:
        put("diabetes_gap", None, None)
    abl = (dia or {}).get("significant_regions", {}).get("ablation")
    put("diabetes_liver_ablation", abl, ("liver" in abl) if abl is not None else None)
    smo = phenos.get("smoking")
    if smo is not None and _finite(smo.get("q")):
        anywhere = [m for m, regions in smo.get("significant_regions", {}).items() if regions]
        value = {"q": smo["q"], "methods_with_significant_regions": anywhere}
        put("smoking_null", value, bool(smo["q"] >= alpha and not anywhere))
    else:
        put("smoking_null", None, None)
    return goals


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
