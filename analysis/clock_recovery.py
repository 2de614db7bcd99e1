"""Recovery of the planted organ ageing by the organ clocks (``DIR/clock_recovery.json``, docs/design.md §8).

On a simulated study every scan's region has a planted biological age
(``STUDY/truth.parquet``: ``subject_id``, ``visit``, ``region``, ``age``,
``biological_age``): ``age + b + d_r + accelerations``, with ``b`` shared by all regions
of a subject and ``d_r`` the region's own deviation (:mod:`bodyage.simulate.planted`).
:func:`clock_recovery` scores each clock against it:

``clocks[<clock>]``
    ``r_planted``: Pearson r between the clock's corrected gap and the planted organ
    deviation, the mean of ``biological_age − age`` over the clock's regions;
    ``r_planted_specific``: r between the conditioned gap and the planted organ-specific
    deviation, the organ deviation minus the scan's shared deviation. The shared deviation
    is truth.parquet's ``shared_deviation`` column where the study has one, else the mean
    of ``biological_age − age`` over every region of the scan (``shared_source`` says
    which; with ~50 regions the mean's own noise is ``region_age_sd/√50``, a fraction of
    ``biological_age_sd``). Each with its 95 % CI and ``n``; ``planted`` (some region of
    the clock carries planted ageing, ``region_information > 0`` in truth.json),
    ``informative``, and ``goal_met`` (:data:`GOALS`). The whole-body clock (no region
    list) is scored against the shared deviation and has no specific r.
    ``r_planted_ceiling``: the same r for the best a clock reading only its regions could do
    on this study: an out-of-fold (the clock's folds) linear regression of age on its
    regions' planted quantities in ``truth.parquet`` (fat fraction, water signal, volume,
    texture, shape stretch, each also on its logit or log scale; the age-independent
    ``nuisance`` included, as the image shows it), its gap corrected for age like the clocks'. A planted clock
    below :data:`GOALS` with a ceiling below it too is limited by the scenario, not the clock.
``phenotypes[<phenotype>]``
    ``planted_clocks`` (clocks with a region the scenario ``accelerates`` for it),
    ``anatomy_clocks`` (regions with a planted ``anatomy`` effect: not ageing, but it moves
    a clock that reads those regions), ``significant_clocks`` and
    ``significant_clocks_conditioned`` (FDR ``alpha``, :func:`analysis.organ_stats.organ_gap_models`),
    ``false_positives`` (significant, neither planted nor anatomy; ``_conditioned`` for the
    conditioned gap, where an organ the phenotype does not age can show an effect of the
    opposite sign, taken from the overall gap it was conditioned on) and ``missed``
    (planted, tested, not significant in the corrected gap).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.organ_stats import WHOLE_BODY_CLOCK, ClockTables, load_clocks
from analysis.recovery import TRUTH_FILE, read_truth
from analysis.regionmodels import ALPHA
from bodyage.accuracy import pearson_ci
from bodyage.errors import InputError, StudyError

CLOCK_RECOVERY_FILE = "clock_recovery.json"
TRUTH_TABLE = "truth.parquet"
#: the goals of issue 17 per clock: a planted clock's corrected gap r and conditioned-gap r
#: at least these; an unplanted clock uninformative or its r below the last
GOALS: dict[str, float] = {"r_planted": 0.5, "r_planted_specific": 0.4, "r_unplanted": 0.2}
_TRUTH_COLUMNS = ("subject_id", "visit", "region", "age", "biological_age")
#: planted quantities of truth.parquet and the scale the ceiling regresses age on
_QUANTITIES: dict[str, str] = {
    "fat_fraction": "logit",
    "water_signal": "log",
    "volume_factor": "log",
    "texture_cv": "log",
    "shape_stretch": "log",
}


def read_truth_table(study_root: str | os.PathLike[str]) -> pd.DataFrame | None:
    """``STUDY/truth.parquet`` (``None`` when the study has none).

    Raises
    ------
    StudyError
        If the file cannot be read or lacks a column.
    """
    path = Path(study_root) / TRUTH_TABLE
    if not path.is_file():
        return None
    try:
        df = pd.read_parquet(path)
    except (OSError, ValueError) as err:
        raise StudyError(f"{path}: cannot be read as parquet ({err})") from err
    missing = [c for c in _TRUTH_COLUMNS if c not in df.columns]
    if missing:
        raise StudyError(f"{path}: missing column(s) {', '.join(missing)}")
    return df


def planted_deviations(truth: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series, str]:
    """Planted deviations per scan: regions wide, and the shared part.

    Returns
    -------
    wide : pandas.DataFrame
        Index (``subject_id``, ``visit``), one column per region: ``biological_age − age``.
    shared : pandas.Series
        The scan's shared deviation (same index).
    source : str
        ``"shared_deviation column"`` or ``"mean over all regions"``.
    """
    df = truth.assign(subject_id=truth["subject_id"].astype(str), visit=truth["visit"].astype(int))
    df = df.assign(deviation=df["biological_age"].astype(float) - df["age"].astype(float))
    wide = df.pivot_table(index=["subject_id", "visit"], columns="region", values="deviation", aggfunc="mean")
    if "shared_deviation" in df.columns:
        shared = df.groupby(["subject_id", "visit"])["shared_deviation"].first().reindex(wide.index).astype(float)
        return wide, shared, "shared_deviation column"
    return wide, wide.mean(axis=1), "mean over all regions"


def planted_quantities(truth: pd.DataFrame, regions: Sequence[str]) -> pd.DataFrame:
    """The regions' planted quantities per scan, on the scale the ceiling regresses age on.

    Returns
    -------
    pandas.DataFrame
        Index (``subject_id``, ``visit``), one column per region and quantity of
        :data:`_QUANTITIES` that truth.parquet has and that varies between scans, on the
        raw scale (``region:quantity``) and the transformed one (``region:log_quantity``).
    """
    df = truth[truth["region"].isin(list(regions))]
    df = df.assign(subject_id=df["subject_id"].astype(str), visit=df["visit"].astype(int))
    cols: dict[str, pd.Series] = {}
    for quantity, scale in _QUANTITIES.items():
        if quantity not in df.columns:
            continue
        raw = df[quantity].to_numpy(dtype=float)
        if scale == "logit":
            p = np.clip(raw, 1e-6, 1 - 1e-6)
            transformed = np.log(p / (1 - p))
        else:
            transformed = np.log(np.clip(raw, 1e-6, None))
        # both scales: ageing is linear on the raw one, the nuisance is drawn on the other
        for name, v in ((quantity, raw), (f"{scale}_{quantity}", transformed)):
            wide = df.assign(v=v).pivot_table(
                index=["subject_id", "visit"], columns="region", values="v", aggfunc="mean"
            )
            for region in wide.columns:
                col = wide[region]
                if col.std() > 1e-9:
                    cols[f"{region}:{name}"] = col
    return pd.DataFrame(cols)


def ceiling_gap(quantities: pd.DataFrame, age: pd.Series, fold: pd.Series) -> pd.Series:
    """Age-corrected gap of an out-of-fold linear regression of age on ``quantities``.

    Scans with a missing quantity, age or fold are NaN; so is everything when no column
    varies or a fold leaves too few scans to fit.
    """
    x = quantities.reindex(age.index)
    ok = x.notna().all(axis=1) & age.notna() & fold.notna()
    out = pd.Series(np.nan, index=age.index)
    if x.shape[1] == 0 or ok.sum() < x.shape[1] + 3:
        return out
    a = np.column_stack([np.ones(int(ok.sum())), x[ok].to_numpy(dtype=float)])
    y = age[ok].to_numpy(dtype=float)
    f = fold[ok].to_numpy()
    pred = np.full(len(y), np.nan)
    for k in np.unique(f):
        train = f != k
        if train.sum() < a.shape[1] + 2:
            return out
        beta = np.linalg.lstsq(a[train], y[train], rcond=None)[0]
        pred[~train] = a[~train] @ beta
    gap = pred - y
    slope, intercept = np.polyfit(y, gap, 1)
    out[ok] = gap - (intercept + slope * y)
    return out


def clock_regions(regions: Sequence[str], available: Sequence[str]) -> list[str]:
    """The truth regions a clock's region list names.

    Exact names, or a group's members (``kidney`` -> ``kidney_left``, ``kidney_right``).
    """
    have = list(available)
    out: list[str] = []
    for name in regions:
        hits = [name] if name in have else [r for r in have if r.startswith(name + "_")]
        out += [h for h in hits if h not in out]
    return out


def _r(a: pd.Series, b: pd.Series) -> dict[str, Any]:
    both = pd.concat([a, b], axis=1).dropna()
    n = len(both)
    if n < 3 or both.iloc[:, 0].std() == 0 or both.iloc[:, 1].std() == 0:
        return {"r": None, "ci_low": None, "ci_high": None, "n": n}
    r = float(np.corrcoef(both.iloc[:, 0], both.iloc[:, 1])[0, 1])
    low, high = pearson_ci(r, n)
    return {"r": r, "ci_low": _num(low), "ci_high": _num(high), "n": n}


def _num(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def clock_recovery(
    clocks: ClockTables | str | os.PathLike[str],
    models: pd.DataFrame | None = None,
    *,
    truth: Mapping[str, Any] | None = None,
    truth_table: pd.DataFrame | None = None,
    alpha: float = ALPHA,
) -> dict[str, Any]:
    """Score the clocks against the planted truth (see the module docstring).

    Parameters
    ----------
    clocks
        A clocks folder or its tables.
    models
        :func:`analysis.organ_stats.organ_gap_models` (``None``: no ``phenotypes`` part).
    truth, truth_table
        ``truth.json`` and ``truth.parquet``; ``None``: read from the study.
    alpha
        FDR level of the significant clocks.

    Returns
    -------
    dict
        The content of ``clock_recovery.json``.

    Raises
    ------
    StudyError
        If the study is not simulated (no ``truth.json`` or ``truth.parquet``).
    """
    tab = clocks if isinstance(clocks, ClockTables) else load_clocks(clocks)
    if truth is None or truth_table is None:
        if tab.study_root is None:
            raise InputError("clock tables built in memory need the truth (truth=..., truth_table=...)")
        truth = truth if truth is not None else read_truth(tab.study_root)
        truth_table = truth_table if truth_table is not None else read_truth_table(tab.study_root)
        if truth is None or truth_table is None:
            raise StudyError(
                f"{tab.study_root}: no {TRUTH_FILE} or {TRUTH_TABLE} (clock recovery needs a simulated study)"
            )
    information = {str(k): float(v) for k, v in (truth.get("region_information") or {}).items()}
    wide, shared, source = planted_deviations(truth_table)
    ages = tab.organ_ages.assign(subject_id=tab.organ_ages["subject_id"].astype(str))
    ages = ages.assign(visit=ages["visit"].astype(int)).set_index(["subject_id", "visit"])
    out: dict[str, Any] = {
        "alpha": alpha,
        "scenario": truth.get("scenario_name"),
        "shared_source": source,
        "goals": dict(GOALS),
        "clocks": {},
        "phenotypes": {},
    }
    members: dict[str, list[str]] = {}
    for clock in tab.names:
        rows = ages[ages["clock"] == clock]
        listed = tab.regions(clock)
        regions = clock_regions(listed, list(wide.columns))
        whole = not listed or clock == WHOLE_BODY_CLOCK
        members[clock] = list(wide.columns) if whole else regions
        planted = any(information.get(r, 0.0) > 0 for r in members[clock])
        entry: dict[str, Any] = {
            "regions": members[clock] if not whole else [],
            "regions_not_in_truth": [r for r in listed if not clock_regions([r], list(wide.columns))],
            "informative": tab.informative(clock),
            "planted": planted,
        }
        target: pd.Series | None = None
        specific: pd.Series | None = None
        if whole:
            target = shared
        elif regions:
            target = wide[regions].mean(axis=1)
            specific = target - shared
        corr = _r(rows["age_gap_corrected"], target.reindex(rows.index)) if target is not None else _r_none()
        ceiling = _r_none()
        if target is not None and not whole and regions:
            qty = planted_quantities(truth_table, regions)
            ceiling = _r(ceiling_gap(qty, rows["age"].astype(float), rows["fold"]), target.reindex(rows.index))
        spec = _r(rows["age_gap_conditioned"], specific.reindex(rows.index)) if specific is not None else _r_none()
        entry.update(
            r_planted=corr["r"],
            r_planted_ci=[corr["ci_low"], corr["ci_high"]],
            n=corr["n"],
            r_planted_specific=spec["r"],
            r_planted_specific_ci=[spec["ci_low"], spec["ci_high"]],
            n_specific=spec["n"],
            r_planted_ceiling=ceiling["r"],
        )
        entry["goal_met"] = _goal(entry, whole)
        out["clocks"][clock] = entry
    if models is not None and len(models):
        out["phenotypes"] = _phenotypes(truth, models, members, tab)
    return out


def _r_none() -> dict[str, Any]:
    return {"r": None, "ci_low": None, "ci_high": None, "n": 0}


def _goal(entry: Mapping[str, Any], whole: bool) -> bool | None:
    """Planted clock: r ≥ 0.5 and specific r ≥ 0.4; unplanted: uninformative or r < 0.2; whole body: None."""
    r, rs = entry["r_planted"], entry["r_planted_specific"]
    if whole:
        return None
    if entry["planted"]:
        return r is not None and rs is not None and r >= GOALS["r_planted"] and rs >= GOALS["r_planted_specific"]
    return (not entry["informative"]) or (r is not None and r < GOALS["r_unplanted"])


def _phenotypes(
    truth: Mapping[str, Any], models: pd.DataFrame, members: Mapping[str, Sequence[str]], tab: ClockTables
) -> dict[str, Any]:
    scenario = (truth.get("scenario") or {}).get("phenotypes") or {}
    out: dict[str, Any] = {}
    for pheno in pd.unique(models["phenotype"]):
        spec = scenario.get(pheno) or {}
        accel = {str(r) for r, v in (spec.get("accelerates") or {}).items() if _num(v)}
        anatomy = {str(r) for r in (spec.get("anatomy") or {})}
        tested = sorted(set(models.loc[models["phenotype"] == pheno, "clock"]))
        planted = [c for c in tab.names if accel & set(members[c]) and c != WHOLE_BODY_CLOCK]
        anat = [c for c in tab.names if anatomy & set(members[c]) and c != WHOLE_BODY_CLOCK]
        sig = {}
        for gap in ("corrected", "conditioned"):
            hit = models[(models["phenotype"] == pheno) & (models["gap"] == gap) & models["significant"]]
            sig[gap] = [c for c in tab.names if c in set(hit["clock"])]
        out[str(pheno)] = {
            "accelerates": sorted(accel),
            "anatomy_regions": sorted(anatomy),
            "planted_clocks": planted,
            "anatomy_clocks": anat,
            "tested_clocks": [c for c in tab.names if c in tested],
            "significant_clocks": sig["corrected"],
            "significant_clocks_conditioned": sig["conditioned"],
            "false_positives": [
                c for c in sig["corrected"] if c not in planted and c not in anat and c != WHOLE_BODY_CLOCK
            ],
            "false_positives_conditioned": [
                c for c in sig["conditioned"] if c not in planted and c not in anat and c != WHOLE_BODY_CLOCK
            ],
            "missed": [c for c in planted if c in tested and c not in sig["corrected"]],
        }
    return out
