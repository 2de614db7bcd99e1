"""The tables of a run folder (docs/design.md §3), loaded, checked and joined.

:func:`load_run` reads ``RUN/run.json`` (for the study path), ``predictions.parquet``,
``attributions.parquet`` (optional) and the study's ``cohort.csv``, checks that they fit
together, and returns a :class:`RunTables`. Every statistics function of this package
takes a :class:`RunTables` (or a run folder, loaded on the fly), so a script can build
one from data frames in memory with :meth:`RunTables.from_frames`.

The cohort is read here rather than with :func:`bodyage.study.load_study` because
``bodyage.study`` imports ``bodyage.regions``, which imports
``totalsegmentator.map_to_binary`` inside a function, and the import-linter contract
"analysis never imports the deep-learning stack" counts that path. The constants below
mirror ``bodyage.study``; a test keeps them equal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bodyage.errors import InputError, RunError, StudyError

#: mirror of ``bodyage.study.DEFAULT_CHANNELS``
DEFAULT_CHANNELS: tuple[str, ...] = ("water", "fat")
#: mirror of ``bodyage.study.REQUIRED_COLUMNS``
REQUIRED_COLUMNS: tuple[str, ...] = ("subject_id", "visit", "age", "sex", "site")
#: mirror of ``bodyage.study.RESERVED_COLUMNS``
RESERVED_COLUMNS: tuple[str, ...] = (*REQUIRED_COLUMNS, "mask", "scan_id")

RUN_RECORD = "run.json"
PREDICTIONS_FILE = "predictions.parquet"
ATTRIBUTIONS_FILE = "attributions.parquet"
COHORT_FILE = "cohort.csv"
LABELS_FILE = "labels.json"
STATS_DIR = "stats"
FIGURES_DIR = "figures"

#: columns of ``predictions.parquet`` (docs/design.md §3)
PREDICTION_COLUMNS: tuple[str, ...] = (
    "subject_id",
    "visit",
    "fold",
    "age",
    "predicted_age",
    "age_gap",
    "age_gap_corrected",
)
#: columns of ``attributions.parquet`` (docs/design.md §3)
ATTRIBUTION_COLUMNS: tuple[str, ...] = (
    "subject_id",
    "visit",
    "method",
    "region",
    "fold",
    "n_voxels",
    "volume_ml",
    "mass",
    "abs_mass",
    "share",
    "density",
    "enrichment",
)
#: numeric value columns of ``attributions.parquet``
ATTRIBUTION_VALUES: tuple[str, ...] = ATTRIBUTION_COLUMNS[5:]
#: ages of a cohort row and its prediction row may differ by rounding only (years)
AGE_TOLERANCE = 0.01


def scan_key(subject_id: pd.Series, visit: pd.Series) -> pd.Series:
    """Return ``<subject_id>_<visit>`` for each row (as ``bodyage.study.scan_id``)."""
    return subject_id.astype(str) + "_" + visit.astype(int).astype(str)


@dataclass(frozen=True)
class RunTables:
    """The checked tables of one run.

    Build it with :func:`load_run` (from a run folder) or :meth:`from_frames` (from data
    frames), never directly: the constructor does not check anything.

    Attributes
    ----------
    cohort
        ``cohort.csv``: one row per scan, with a ``scan_id`` column.
    predictions
        ``predictions.parquet``: one row per scan with an out-of-fold prediction.
    attributions
        ``attributions.parquet`` (long: scan × method × region), or ``None``.
    root
        The run folder (``None`` when built in memory).
    study_root
        The study folder (``None`` when built in memory).
    channels
        Image channel path columns of the cohort (never phenotypes).
    region_order
        Region names in label-id order (from ``labels.json``), for tables and figures.
    record
        The run's ``run.json``.
    """

    cohort: pd.DataFrame = field(repr=False)
    predictions: pd.DataFrame = field(repr=False)
    attributions: pd.DataFrame | None = field(repr=False, default=None)
    root: Path | None = None
    study_root: Path | None = None
    channels: tuple[str, ...] = DEFAULT_CHANNELS
    region_order: tuple[str, ...] = ()
    record: Mapping[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_frames(
        cls,
        cohort: pd.DataFrame,
        predictions: pd.DataFrame,
        attributions: pd.DataFrame | None = None,
        *,
        root: Path | None = None,
        study_root: Path | None = None,
        channels: Sequence[str] = DEFAULT_CHANNELS,
        region_order: Sequence[str] = (),
        record: Mapping[str, Any] | None = None,
        sources: Mapping[str, str] | None = None,
    ) -> RunTables:
        """Check and join the tables of a run given as data frames.

        Parameters
        ----------
        cohort, predictions, attributions
            Tables with the columns of docs/design.md §3.
        sources
            Names used in error messages for ``"cohort"``, ``"predictions"`` and
            ``"attributions"`` (file paths when loaded from disk).

        Raises
        ------
        StudyError
            If the cohort lacks a required column, has duplicate scans, bad ages or sexes.
        RunError
            If predictions or attributions lack columns, have duplicate rows, or name scans
            missing from the cohort (predictions) or from the predictions (attributions),
            or if ages or folds disagree between the tables.
        """
        src = {"cohort": COHORT_FILE, "predictions": PREDICTIONS_FILE, "attributions": ATTRIBUTIONS_FILE}
        src.update(sources or {})
        coh = _check_cohort(cohort, channels=channels, source=src["cohort"])
        pred = _check_predictions(predictions, coh, source=src["predictions"], cohort_source=src["cohort"])
        attr = None
        if attributions is not None:
            attr = _check_attributions(
                attributions, pred, source=src["attributions"], predictions_source=src["predictions"]
            )
        return cls(
            cohort=coh,
            predictions=pred,
            attributions=attr,
            root=root,
            study_root=study_root,
            channels=tuple(channels),
            region_order=tuple(region_order),
            record=dict(record or {}),
        )

    @cached_property
    def scans(self) -> pd.DataFrame:
        """One row per predicted scan: the prediction columns joined with the cohort's.

        Columns: ``scan_id``, ``subject_id``, ``visit``, ``fold``, ``age``,
        ``predicted_age``, ``age_gap``, ``age_gap_corrected``, ``sex``, ``site`` and every
        phenotype column of the cohort (channel and mask paths dropped). Ordered as the
        predictions.
        """
        drop = [c for c in (*self.channels, "mask") if c in self.cohort.columns]
        coh = self.cohort.drop(columns=drop).drop(columns=["subject_id", "visit", "age"])
        out = self.predictions.merge(coh, on="scan_id", how="left", validate="one_to_one")
        return out.reset_index(drop=True)

    @property
    def methods(self) -> tuple[str, ...]:
        """Attribution methods present in ``attributions`` (empty without attributions)."""
        if self.attributions is None:
            return ()
        return tuple(sorted(pd.unique(self.attributions["method"].astype(str))))

    @property
    def regions(self) -> tuple[str, ...]:
        """Regions present in ``attributions``, in label-id order where known."""
        if self.attributions is None:
            return ()
        present = set(pd.unique(self.attributions["region"].astype(str)))
        ordered = [r for r in self.region_order if r in present]
        return tuple(ordered + sorted(present - set(ordered)))

    @property
    def has_repeats(self) -> bool:
        """Whether some subject has more than one predicted scan."""
        return bool(self.predictions["subject_id"].duplicated().any())

    def phenotype_columns(self) -> list[str]:
        """Cohort columns that are phenotypes: every column that is not reserved (docs/design.md §4)."""
        reserved = set(RESERVED_COLUMNS) | set(self.channels)
        return [c for c in self.cohort.columns if c not in reserved]


def load_run(run_dir: str | os.PathLike[str], *, attributions: bool = True) -> RunTables:
    """Load the tables of a run folder and check that they fit together.

    Parameters
    ----------
    run_dir
        The run folder: ``run.json`` (recording the study path under ``"study"`` or
        ``"arguments"/"study"``), ``predictions.parquet`` and, if ``attributions``,
        ``attributions.parquet`` (skipped when absent).
    attributions
        Read ``attributions.parquet`` if it exists.

    Returns
    -------
    RunTables

    Raises
    ------
    RunError
        If the run folder, ``run.json`` or ``predictions.parquet`` is missing or
        unreadable, ``run.json`` records no study, or the tables disagree (see
        :meth:`RunTables.from_frames`).
    StudyError
        If the study folder or its ``cohort.csv`` is missing or invalid.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise RunError(f"{root}: run folder not found")
    record = read_run_record(root)
    study_root = study_path(root, record)
    cohort = read_cohort(study_root)
    pred_path = root / PREDICTIONS_FILE
    if not pred_path.is_file():
        raise RunError(f"{pred_path}: not found (run `bodyage train` first)")
    predictions = _read_parquet(pred_path)
    attr_path = root / ATTRIBUTIONS_FILE
    attr = _read_parquet(attr_path) if attributions and attr_path.is_file() else None
    return RunTables.from_frames(
        cohort,
        predictions,
        attr,
        root=root,
        study_root=study_root,
        region_order=read_region_order(study_root),
        record=record,
        sources={
            "cohort": str(study_root / COHORT_FILE),
            "predictions": str(pred_path),
            "attributions": str(attr_path),
        },
    )


def read_run_record(root: Path) -> dict[str, Any]:
    """Read ``RUN/run.json``; raise :class:`RunError` naming the file if missing or invalid."""
    path = root / RUN_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise RunError(f"{path}: not found (is {root} a run folder?)") from err
    except json.JSONDecodeError as err:
        raise RunError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(record, dict):
        raise RunError(f"{path}: expected a JSON object, found {type(record).__name__}")
    return record


def study_path(root: Path, record: Mapping[str, Any]) -> Path:
    """Return the study folder a run records (``"study"``, else ``"arguments"/"study"``).

    A relative path is tried against the current folder, then the run folder and its
    parent; the first that holds ``cohort.csv`` wins.

    Raises
    ------
    RunError
        If ``run.json`` records no study path.
    StudyError
        If no candidate folder holds ``cohort.csv``.
    """
    value = record.get("study")
    if value is None and isinstance(record.get("arguments"), Mapping):
        value = record["arguments"].get("study")
    if not isinstance(value, str) or not value:
        raise RunError(f"{root / RUN_RECORD}: records no study path (key 'study')")
    p = Path(value)
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, root / p, root.parent / p]
    for c in candidates:
        if (c / COHORT_FILE).is_file():
            return c
    raise StudyError(f"{value}: study folder of run {root} not found or has no {COHORT_FILE}")


def read_cohort(study_root: Path) -> pd.DataFrame:
    """Read ``STUDY/cohort.csv`` (checked later by :meth:`RunTables.from_frames`).

    Raises
    ------
    StudyError
        If the file is missing or cannot be parsed.
    """
    csv = study_root / COHORT_FILE
    try:
        return pd.read_csv(csv, dtype={"subject_id": str, "site": str, "sex": str})
    except FileNotFoundError as err:
        raise StudyError(f"{csv}: cohort table not found") from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise StudyError(f"{csv}: cannot be parsed as CSV ({err})") from err


def read_region_order(study_root: Path) -> tuple[str, ...]:
    """Region names of ``STUDY/labels.json`` in id order (empty when absent or unreadable)."""
    path = study_root / LABELS_FILE
    if not path.is_file():
        return ()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        pairs = sorted((int(k), str(v)) for k, v in raw.items())
    except (json.JSONDecodeError, ValueError, AttributeError) as err:
        raise StudyError(f"{path}: not a label table {{id: name}} ({err})") from err
    return tuple(name for _, name in pairs)


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as err:
        raise RunError(f"{path}: cannot be read as parquet ({err})") from err


def _missing(df: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    return [c for c in columns if c not in df.columns]


def _check_cohort(cohort: pd.DataFrame, *, channels: Sequence[str], source: str) -> pd.DataFrame:
    missing = _missing(cohort, REQUIRED_COLUMNS)
    if missing:
        raise StudyError(f"{source}: missing column(s) {', '.join(missing)}")
    if cohort.empty:
        raise StudyError(f"{source}: no scans")
    df = cohort.copy()
    df["subject_id"] = df["subject_id"].astype(str)
    df["site"] = df["site"].astype(str)
    df["sex"] = df["sex"].astype(str)
    try:
        df["visit"] = pd.to_numeric(df["visit"], errors="raise").astype(int)
    except (ValueError, TypeError) as err:
        raise StudyError(f"{source}: column 'visit' must hold integers") from err
    df["scan_id"] = scan_key(df["subject_id"], df["visit"])
    dup = df["scan_id"][df["scan_id"].duplicated()]
    if len(dup):
        raise StudyError(f"{source}: {len(dup)} duplicate scan key(s) (subject_id, visit), e.g. {dup.iloc[0]}")
    age = pd.to_numeric(df["age"], errors="coerce")
    if age.isna().any():
        raise StudyError(f"{source}: column 'age' has {int(age.isna().sum())} missing or non-numeric value(s)")
    df["age"] = age.astype(float)
    bad_sex = sorted(set(df["sex"]) - {"F", "M"})
    if bad_sex:
        raise StudyError(f"{source}: column 'sex' has value(s) {', '.join(map(repr, bad_sex))}, expected 'F' or 'M'")
    return df


def _check_predictions(pred: pd.DataFrame, cohort: pd.DataFrame, *, source: str, cohort_source: str) -> pd.DataFrame:
    missing = _missing(pred, PREDICTION_COLUMNS)
    if missing:
        raise RunError(f"{source}: missing column(s) {', '.join(missing)}")
    if pred.empty:
        raise RunError(f"{source}: no predictions")
    df = pred[list(PREDICTION_COLUMNS)].copy()
    df["subject_id"] = df["subject_id"].astype(str)
    for col in ("visit", "fold"):
        try:
            df[col] = pd.to_numeric(df[col], errors="raise").astype(int)
        except (ValueError, TypeError) as err:
            raise RunError(f"{source}: column {col!r} must hold integers") from err
    for col in ("age", "predicted_age", "age_gap", "age_gap_corrected"):
        try:
            df[col] = pd.to_numeric(df[col], errors="raise").astype(float)
        except (ValueError, TypeError) as err:
            raise RunError(f"{source}: column {col!r} must be numeric") from err
    for col in ("age", "predicted_age", "age_gap"):
        if not np.isfinite(df[col].to_numpy()).all():
            raise RunError(f"{source}: column {col!r} has missing or non-finite values")
    df.insert(0, "scan_id", scan_key(df["subject_id"], df["visit"]))
    dup = df["scan_id"][df["scan_id"].duplicated()]
    if len(dup):
        raise RunError(f"{source}: {len(dup)} scan(s) predicted twice, e.g. {dup.iloc[0]}")
    unknown = ~df["scan_id"].isin(cohort["scan_id"])
    if unknown.any():
        raise RunError(
            f"{source}: {int(unknown.sum())} scan(s) are not in {cohort_source}, "
            f"e.g. {df.loc[unknown, 'scan_id'].iloc[0]} (is the run's study the right one?)"
        )
    ages = df["scan_id"].map(cohort.set_index("scan_id")["age"])
    off = (ages - df["age"]).abs() > AGE_TOLERANCE
    if off.any():
        raise RunError(
            f"{source}: column 'age' disagrees with {cohort_source} for {int(off.sum())} scan(s), "
            f"e.g. {df.loc[off, 'scan_id'].iloc[0]}"
        )
    folds = df.groupby("subject_id")["fold"].nunique()
    if (folds > 1).any():
        raise RunError(f"{source}: {int((folds > 1).sum())} subject(s) have visits in different folds")
    return df.reset_index(drop=True)


def _check_attributions(
    attr: pd.DataFrame, pred: pd.DataFrame, *, source: str, predictions_source: str
) -> pd.DataFrame:
    missing = _missing(attr, ATTRIBUTION_COLUMNS)
    if missing:
        raise RunError(f"{source}: missing column(s) {', '.join(missing)}")
    df = attr[list(ATTRIBUTION_COLUMNS)].copy()
    df["subject_id"] = df["subject_id"].astype(str)
    try:
        df["visit"] = pd.to_numeric(df["visit"], errors="raise").astype(int)
        df["fold"] = pd.to_numeric(df["fold"], errors="raise").astype(int)
    except (ValueError, TypeError) as err:
        raise RunError(f"{source}: columns 'visit' and 'fold' must hold integers") from err
    for col in ATTRIBUTION_VALUES:
        try:
            df[col] = pd.to_numeric(df[col], errors="raise").astype(float)
        except (ValueError, TypeError) as err:
            raise RunError(f"{source}: column {col!r} must be numeric (NaN where a region is absent)") from err
    # the intensive measure (mean |map| per voxel), as bodyage.attribute defines it; derived, so older tables have it
    df["abs_density"] = df["abs_mass"] / df["n_voxels"].where(df["n_voxels"] > 0)
    df["method"] = df["method"].astype(str)
    df["region"] = df["region"].astype(str)
    df.insert(0, "scan_id", scan_key(df["subject_id"], df["visit"]))
    orphan = ~df["scan_id"].isin(pred["scan_id"])
    if orphan.any():
        scans = pd.unique(df.loc[orphan, "scan_id"])
        raise RunError(
            f"{source}: attributions for {len(scans)} scan(s) missing from {predictions_source}, e.g. {scans[0]}"
        )
    dup = df.duplicated(["scan_id", "method", "region"])
    if dup.any():
        row = df.loc[dup].iloc[0]
        raise RunError(
            f"{source}: {int(dup.sum())} duplicate row(s) (scan, method, region), "
            f"e.g. method {row['method']!r}, region {row['region']!r}"
        )
    folds = df["scan_id"].map(pred.set_index("scan_id")["fold"])
    if (folds != df["fold"]).any():
        raise RunError(
            f"{source}: column 'fold' disagrees with {predictions_source} for "
            f"{int(pd.unique(df.loc[folds != df['fold'], 'scan_id']).size)} scan(s): every attribution must come "
            "from the model that did not train on the scan"
        )
    for col in ("method", "region"):
        df[col] = df[col].astype("category")
    return df.reset_index(drop=True)


def as_run(run: RunTables | str | os.PathLike[str]) -> RunTables:
    """Return ``run`` itself, or the tables loaded from a run folder."""
    if isinstance(run, RunTables):
        return run
    if isinstance(run, (str, os.PathLike)):
        return load_run(run)
    raise InputError(f"expected a run folder or RunTables, got {type(run).__name__}")
