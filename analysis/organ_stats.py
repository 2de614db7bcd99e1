"""Statistics on organ age gaps (docs/design.md §8): a clocks folder's gaps against the phenotypes.

``bodyage clocks STUDY --out DIR`` trains one age model per organ set (a *clock*) and
writes ``DIR/organ_ages.parquet`` (one row per scan × clock: ``age_gap_corrected`` and
``age_gap_conditioned``, the clock's gap residualised out of fold on the overall ageing
gap, the mean of the other informative organ clocks' gaps) and ``DIR/clocks.json`` (per
clock its regions, accuracy and ``informative`` flag). This module reads them
(:func:`load_clocks`) and fits, per clock, exactly the phenotype models ``bodyage stats``
fits on a whole-body gap (:func:`analysis.phenotypes.phenotype_models` on the clock's
rows: age, age² and sex, a random intercept for the site or, with repeat visits, the
subject; REML with Satterthwaite degrees of freedom; exclusions counted):

:func:`organ_gap_models`
    one row per gap (``corrected``, ``conditioned``) × clock × phenotype; ``q`` is the
    Benjamini–Hochberg q-value over every clock × phenotype of that gap (one family per
    gap). Clocks flagged uninformative are left out unless asked for
    (:func:`excluded_clocks` names them and why).
:func:`clock_correlations`
    Pearson r of the corrected gaps of every pair of clocks (scans that have both).

:func:`analysis.organ_outputs.run_organ_stats` writes them to ``DIR/stats`` and
``DIR/figures``. A clock is an ordinary run folder too (``DIR/<clock>``): ``bodyage stats
DIR/<clock>`` gives its full single-run statistics.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from analysis._typing import MixedEngine
from analysis.agegap import GapCorrectionResult
from analysis.design import DEFAULT_GROUP, EXCLUSION_COLUMNS
from analysis.fdr import benjamini_hochberg
from analysis.phenotypes import phenotype_models, resolve_phenotypes
from analysis.regionmodels import ALPHA
from analysis.run import (
    DEFAULT_CHANNELS,
    RUN_RECORD,
    RunTables,
    read_cohort,
    read_region_order,
    read_run_record,
    study_path,
)
from bodyage.accuracy import pearson_ci, prediction_metrics
from bodyage.errors import BodyageWarning, InputError, RunError
from bodyage.progress import NO_PROGRESS, Progress

#: files of a clocks folder (docs/design.md §8)
CLOCKS_FILE = "clocks.json"
ORGAN_AGES_FILE = "organ_ages.parquet"
OVERALL_GAP_FILE = "overall_gap.parquet"
#: the clock trained on the whole body
WHOLE_BODY_CLOCK = "whole_body"
#: columns of ``organ_ages.parquet`` (mirrors bodyage.clocks, which imports torch; a test checks they agree)
ORGAN_AGE_COLUMNS: tuple[str, ...] = (
    "subject_id",
    "visit",
    "fold",
    "clock",
    "age",
    "predicted_age",
    "age_gap",
    "age_gap_corrected",
    "age_gap_conditioned",
)

OrganGap = Literal["corrected", "conditioned"]
#: the gaps modelled, and their column in ``organ_ages.parquet``
GAP_COLUMNS: dict[OrganGap, str] = {"corrected": "age_gap_corrected", "conditioned": "age_gap_conditioned"}
ORGAN_GAPS: tuple[OrganGap, ...] = ("corrected", "conditioned")

#: columns of :func:`organ_gap_models`, in order
ORGAN_MODEL_COLUMNS: list[str] = [
    "gap",
    "clock",
    "informative",
    "phenotype",
    "kind",
    "per",
    "phenotype_sd",
    "n",
    *EXCLUSION_COLUMNS,
    "estimate",
    "se",
    "ci_low",
    "ci_high",
    "gap_sd",
    "std_estimate",
    "std_ci_low",
    "std_ci_high",
    "stat",
    "df",
    "p",
    "q",
    "significant",
    "random_effect",
    "fixed_effects",
    "n_groups",
    "group_var",
    "resid_var",
    "boundary",
    "converged",
    "engine",
    "warning",
    "covariates",
    "df_note",
]


def is_clocks_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a clocks folder (it holds ``clocks.json``)."""
    return (Path(path) / CLOCKS_FILE).is_file()


@dataclass(frozen=True)
class ClockTables:
    """The checked tables of a clocks folder.

    Build it with :func:`load_clocks` or :meth:`from_frames`.

    Attributes
    ----------
    cohort
        The study's ``cohort.csv``.
    organ_ages
        ``organ_ages.parquet``, rows without a finite prediction left out (counted in
        :attr:`no_prediction`).
    clocks
        Clock name -> its ``clocks.json`` entry (``regions``, ``informative``, ``mae``, ...),
        in the order of ``clocks.json``, then clocks only ``organ_ages`` names.
    root, study_root
        The clocks folder and the study (``None`` when built in memory).
    region_order
        Region names in label-id order.
    record
        ``clocks.json`` as read.
    no_prediction
        Clock -> rows of ``organ_ages.parquet`` without a finite prediction.
    """

    cohort: pd.DataFrame = field(repr=False)
    organ_ages: pd.DataFrame = field(repr=False)
    clocks: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    root: Path | None = None
    study_root: Path | None = None
    region_order: tuple[str, ...] = ()
    record: Mapping[str, Any] = field(repr=False, default_factory=dict)
    no_prediction: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_frames(
        cls,
        cohort: pd.DataFrame,
        organ_ages: pd.DataFrame,
        clocks: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        root: Path | None = None,
        study_root: Path | None = None,
        region_order: Sequence[str] = (),
        record: Mapping[str, Any] | None = None,
        source: str = ORGAN_AGES_FILE,
    ) -> ClockTables:
        """Check ``organ_ages`` and complete the clock entries.

        A clock of ``organ_ages`` without an entry gets one whose ``informative`` flag is
        :func:`bodyage.accuracy.prediction_metrics`'s rule applied to its rows.

        Raises
        ------
        RunError
            If ``organ_ages`` lacks a column or has no rows, or an entry has no boolean
            ``informative``.
        """
        missing = [c for c in ORGAN_AGE_COLUMNS if c not in organ_ages.columns]
        if missing:
            raise RunError(f"{source}: missing column(s) {', '.join(missing)}")
        if organ_ages.empty:
            raise RunError(f"{source}: no rows")
        ages = organ_ages[list(ORGAN_AGE_COLUMNS)].copy()
        ages["clock"] = ages["clock"].astype(str)
        for col in ORGAN_AGE_COLUMNS[4:]:
            try:
                ages[col] = pd.to_numeric(ages[col], errors="raise").astype(float)
            except (ValueError, TypeError) as err:
                raise RunError(f"{source}: column {col!r} must be numeric") from err
        finite = np.isfinite(ages[["age", "predicted_age", "age_gap"]].to_numpy()).all(axis=1)
        no_pred = ages.loc[~finite, "clock"].value_counts().to_dict()
        ages = ages[finite].reset_index(drop=True)
        given = dict(clocks or {})
        names = [c for c in given if c in set(ages["clock"])]
        names += [c for c in pd.unique(ages["clock"]) if c not in given]
        entries: dict[str, Mapping[str, Any]] = {}
        for name in names:
            entry = dict(given.get(name) or {})
            if "informative" not in entry:
                check = prediction_metrics(ages[ages["clock"] == name])
                entry.update(informative=check["informative"], informative_reason=check["informative_reason"])
            elif not isinstance(entry["informative"], bool):
                raise RunError(f"{CLOCKS_FILE}: clock {name!r}: 'informative' must be true or false")
            entries[name] = entry
        return cls(
            cohort=cohort,
            organ_ages=ages,
            clocks=entries,
            root=root,
            study_root=study_root,
            region_order=tuple(region_order),
            record=dict(record or {}),
            no_prediction={str(k): int(v) for k, v in no_pred.items()},
        )

    @property
    def names(self) -> list[str]:
        """Every clock with predictions."""
        return list(self.clocks)

    def informative(self, clock: str) -> bool:
        """Whether ``clock`` is flagged informative."""
        return bool(self.clocks[clock]["informative"])

    def regions(self, clock: str) -> list[str]:
        """The regions a clock reads (from ``clocks.json``; empty when not recorded)."""
        regions = self.clocks[clock].get("regions")
        return [str(r) for r in regions] if isinstance(regions, (list, tuple)) else []

    def run_tables(self, clock: str, gap: OrganGap = "corrected") -> tuple[RunTables, GapCorrectionResult]:
        """The clock's rows as run tables, and its ``gap`` as the gap the models use.

        Raises
        ------
        InputError
            For an unknown clock or gap.
        """
        if clock not in self.clocks:
            raise InputError(f"clock {clock!r} is not in {ORGAN_AGES_FILE}; clocks: {', '.join(self.names)}")
        if gap not in GAP_COLUMNS:
            raise InputError(f"gap {gap!r} is not one of {', '.join(GAP_COLUMNS)}")
        rows = self.organ_ages[self.organ_ages["clock"] == clock]
        tables = RunTables.from_frames(
            self.cohort,
            rows,
            root=self.root / clock if self.root is not None else None,
            study_root=self.study_root,
            channels=DEFAULT_CHANNELS,
            region_order=self.region_order,
            sources={"predictions": f"{ORGAN_AGES_FILE} (clock {clock})"},
        )
        value = rows.assign(scan_id=rows["subject_id"].astype(str) + "_" + rows["visit"].astype(int).astype(str))
        scans = tables.scans.copy()
        scans["gap"] = scans["scan_id"].map(value.set_index("scan_id")[GAP_COLUMNS[gap]]).astype(float)
        scans["predicted_age_corrected"] = scans["age"] + scans["gap"]
        return tables, GapCorrectionResult(scans=scans, coefficients=pd.DataFrame(), correction="train")


def load_clocks(folder: str | os.PathLike[str]) -> ClockTables:
    """Load a clocks folder: ``clocks.json``, ``organ_ages.parquet`` and the study's cohort.

    The study is the one ``clocks.json`` records under ``"study"``, else the one the
    ``whole_body`` (or the first clock's) run folder records in its ``run.json``.

    Raises
    ------
    RunError
        If the folder, ``clocks.json`` or ``organ_ages.parquet`` is missing or unreadable,
        or no study is recorded.
    StudyError
        If the study or its ``cohort.csv`` is missing.
    """
    root = Path(folder)
    if not root.is_dir():
        raise RunError(f"{root}: clocks folder not found")
    record = read_clocks_record(root)
    entries = clock_entries(record)
    ages_path = root / ORGAN_AGES_FILE
    if not ages_path.is_file():
        raise RunError(f"{ages_path}: not found (run `bodyage clocks` to the end first)")
    try:
        ages = pd.read_parquet(ages_path)
    except (OSError, ValueError) as err:
        raise RunError(f"{ages_path}: cannot be read as parquet ({err})") from err
    study_root = _study_root(root, record, [WHOLE_BODY_CLOCK, *entries])
    return ClockTables.from_frames(
        read_cohort(study_root),
        ages,
        entries,
        root=root,
        study_root=study_root,
        region_order=read_region_order(study_root),
        record=record,
        source=str(ages_path),
    )


def read_clocks_record(root: Path) -> dict[str, Any]:
    """Read ``DIR/clocks.json``; raise :class:`RunError` naming it when missing or invalid."""
    path = root / CLOCKS_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise RunError(f"{path}: not found (is {root} a clocks folder?)") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(record, dict):
        raise RunError(f"{path}: expected a JSON object, found {type(record).__name__}")
    return record


def clock_entries(record: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-clock entries of ``clocks.json``.

    Under ``"clocks"`` (a mapping, or a list of objects with ``name``), else every
    top-level object that has ``regions``.
    """
    raw = record.get("clocks")
    if isinstance(raw, list):
        return {str(e["name"]): dict(e) for e in raw if isinstance(e, dict) and "name" in e}
    source = raw if isinstance(raw, dict) else record
    return {str(k): dict(v) for k, v in source.items() if isinstance(v, dict) and ("regions" in v or raw is not None)}


def _study_root(root: Path, record: Mapping[str, Any], candidates: Sequence[str]) -> Path:
    if isinstance(record.get("study"), str) and record["study"]:
        return study_path(root, record)
    for name in candidates:
        run = root / name
        if (run / RUN_RECORD).is_file():
            return study_path(run, read_run_record(run))
    raise RunError(f"{root / CLOCKS_FILE}: records no study, and no clock run folder has a {RUN_RECORD}")


def excluded_clocks(clocks: ClockTables, *, include_uninformative: bool = False) -> dict[str, str]:
    """Clocks left out of the tests: ``{clock: reason}`` (uninformative ones, unless included)."""
    if include_uninformative:
        return {}
    return {
        c: str(clocks.clocks[c].get("informative_reason") or "flagged uninformative in clocks.json")
        for c in clocks.names
        if not clocks.informative(c)
    }


def organ_gap_models(
    clocks: ClockTables | str | os.PathLike[str],
    *,
    phenotypes: Sequence[str] | None = None,
    covariates: Sequence[str] | None = None,
    default_covariates: bool = True,
    group: str | None = DEFAULT_GROUP,
    engine: MixedEngine = "auto",
    gaps: Sequence[OrganGap] = ORGAN_GAPS,
    include_uninformative: bool = False,
    alpha: float = ALPHA,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Fit the phenotype models of every clock's gap (see the module docstring).

    Parameters
    ----------
    clocks
        A clocks folder or its tables.
    phenotypes, covariates, default_covariates, group, engine
        As :func:`analysis.phenotypes.phenotype_models` (phenotypes resolved once, on the cohort).
    gaps
        ``corrected`` (the clock's bias-corrected gap) and/or ``conditioned`` (its gap
        conditioned on the overall ageing gap).
    include_uninformative
        Also test the clocks flagged uninformative (``informative`` is ``False`` in their rows).
    alpha
        FDR level of ``significant``.
    progress
        Progress display (one step per clock and gap).

    Returns
    -------
    pandas.DataFrame
        :data:`ORGAN_MODEL_COLUMNS`: the columns of ``phenotype_models`` (separate models)
        with ``gap``, ``clock`` and ``informative``; ``gap_sd`` (SD of the clock's gap) and
        the estimate and CI divided by it (``std_*``: SDs of gap per unit of phenotype);
        ``q`` (Benjamini–Hochberg over clocks × phenotypes of each gap) and
        ``significant`` (``q < alpha``). A gap that is missing for every scan of a clock
        (e.g. no conditioned gap for the whole body) gives no rows.

    Raises
    ------
    InputError
        For an invalid phenotype, covariate, group or gap, or when every clock is left out.
    """
    tab = clocks if isinstance(clocks, ClockTables) else load_clocks(clocks)
    progress = progress or NO_PROGRESS
    for g in gaps:
        if g not in GAP_COLUMNS:
            raise InputError(f"gap {g!r} is not one of {', '.join(GAP_COLUMNS)}")
    skip = excluded_clocks(tab, include_uninformative=include_uninformative)
    tested = [c for c in tab.names if c not in skip]
    if not tested:
        raise InputError(
            f"every clock is flagged uninformative ({', '.join(tab.names)}); nothing to test "
            "(include them with --include-uninformative)"
        )
    first, _ = tab.run_tables(tested[0])
    phenos = resolve_phenotypes(first, phenotypes)
    task = progress.task("organ gap models", total=len(tested) * len(gaps))
    frames = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BodyageWarning)
        for g in gaps:
            for clock in tested:
                tables, gap = tab.run_tables(clock, g)
                if gap.scans["gap"].notna().any():
                    res = phenotype_models(
                        tables,
                        phenotypes=phenos,
                        covariates=covariates,
                        default_covariates=default_covariates,
                        group=group,
                        engine=engine,
                        joint=False,
                        gap=gap,
                    )
                    sd = float(gap.scans["gap"].std())
                    frames.append(res.assign(gap=g, clock=clock, informative=tab.informative(clock), gap_sd=sd))
                task.advance()
    task.close()
    seen: set[str] = set()
    for w in caught:
        if str(w.message) not in seen:
            seen.add(str(w.message))
            warnings.warn(str(w.message), w.category, stacklevel=2)
    out = pd.concat(frames, ignore_index=True)
    for col in ("estimate", "ci_low", "ci_high"):
        out[f"std_{col}"] = out[col] / out["gap_sd"]
    out["q"] = np.nan
    for _, idx in out.groupby("gap", sort=False).groups.items():
        out.loc[idx, "q"] = benjamini_hochberg(out.loc[idx, "p"].to_numpy(float))
    out["significant"] = out["q"] < alpha
    return out[ORGAN_MODEL_COLUMNS].reset_index(drop=True)


def clock_correlations(clocks: ClockTables | str | os.PathLike[str], *, gap: OrganGap = "corrected") -> pd.DataFrame:
    """Pearson r between the gaps of every pair of clocks (every clock, informative or not).

    Parameters
    ----------
    clocks
        A clocks folder or its tables.
    gap
        ``corrected`` (default) or ``conditioned``.

    Returns
    -------
    pandas.DataFrame
        One row per ordered pair (``clock_a``, ``clock_b``, diagonal included): ``n``
        (scans with both gaps), ``r``, ``ci_low``, ``ci_high`` (95 %, Fisher z),
        ``informative_a``, ``informative_b``, ``gap``.
    """
    tab = clocks if isinstance(clocks, ClockTables) else load_clocks(clocks)
    if gap not in GAP_COLUMNS:
        raise InputError(f"gap {gap!r} is not one of {', '.join(GAP_COLUMNS)}")
    ages = tab.organ_ages
    wide = ages.pivot_table(index=["subject_id", "visit"], columns="clock", values=GAP_COLUMNS[gap], aggfunc="first")
    names = [c for c in tab.names if c in wide.columns]
    rows = []
    for a in names:
        for b in names:
            both = wide[[a, b]].dropna() if a != b else wide[[a]].dropna()
            n = len(both)
            if a == b:
                r = 1.0 if n > 2 else float("nan")
            elif n > 2 and both[a].std() > 0 and both[b].std() > 0:
                r = float(np.corrcoef(both[a], both[b])[0, 1])
            else:
                r = float("nan")
            low, high = pearson_ci(r, n) if a != b else (float("nan"), float("nan"))
            rows.append(
                {
                    "gap": gap,
                    "clock_a": a,
                    "clock_b": b,
                    "n": n,
                    "r": r,
                    "ci_low": low,
                    "ci_high": high,
                    "informative_a": tab.informative(a),
                    "informative_b": tab.informative(b),
                }
            )
    return pd.DataFrame(rows)


def mean_correlation(corr: pd.DataFrame, *, informative_only: bool = True) -> float:
    """Mean off-diagonal r of :func:`clock_correlations` (informative clocks only by default)."""
    sub = corr[corr["clock_a"] < corr["clock_b"]]
    if informative_only:
        sub = sub[sub["informative_a"] & sub["informative_b"]]
    vals = sub["r"].to_numpy(float)
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if vals.size else float("nan")
