"""Image-quality flags of a study (``bodyage qc``) and the scans a flag excludes.

Each scan's water and fat images are measured (:func:`measure_scan`, in
:mod:`bodyage.qc_measure` with the thresholds :class:`QcThresholds`; importable from here
too), then the cohort's measurements are turned into one boolean flag per problem
(:func:`flag_scans`), written to ``STUDY/qc.csv`` with the numbers behind each flag.
Flags (:data:`QC_FLAGS`):

``unreadable``
    A channel cannot be read (every other measure is then missing).
``nonfinite``
    Any NaN or infinite voxel (``n_nonfinite`` > 0).
``fat_water_swap``
    In subcutaneous fat the fat signal must dominate. Without masks, the subcutaneous fat
    is taken to be the body's outer shell (the outer ``shell_mm`` of the body in each
    axial slice). The median fat fraction F/(W+F) of the shell is measured per axial
    slice; a scan is flagged when a run of consecutive slices at least ``swap_run_mm``
    long has a median below ``swap_ff`` (0.5: water dominates where fat must). UK
    Biobank swaps often affect one of the six stations (~190 mm) only, so a whole-scan
    average would miss them, while a single noisy slice must not flag a scan. With
    ``segment``'s masks the ``subcutaneous_fat`` label replaces the shell.
``missing_coverage``
    The body's extent along z (first to last axial slice with body) is shorter than
    ``coverage_fraction`` of the cohort's median (knees or neck cut off, a station
    missing from the stitched volume), or an empty gap of at least ``max_gap_mm`` lies
    inside it (a station filled with zeros).
``extreme_intensity``
    A channel's 99th percentile in the body is more than ``intensity_factor`` times above
    or below the cohort's median, a voxel is brighter than ``spike_factor`` × that
    percentile, a channel is negative by more than ``negative_fraction`` of it, or a
    channel is empty.

:func:`excluded_scans` is what ``train --exclude-qc FLAG,...`` calls.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bodyage._typing import QC_FLAGS, QcFlag
from bodyage.errors import InputError, StudyError
from bodyage.progress import NO_PROGRESS, Progress
from bodyage.qc_measure import SAT_REGION as SAT_REGION
from bodyage.qc_measure import Array as Array
from bodyage.qc_measure import QcThresholds as QcThresholds
from bodyage.qc_measure import _measure_job as _measure_job
from bodyage.qc_measure import body_mask as body_mask
from bodyage.qc_measure import measure_scan as measure_scan
from bodyage.qc_measure import measure_study_scan as measure_study_scan
from bodyage.study import Study, load_study

#: the table written by :func:`run_qc`
QC_FILE = "qc.csv"
#: provenance of the QC run
QC_RECORD = "qc.json"
#: ``--exclude-qc all``: every flag
ALL_FLAGS = "all"
#: the columns that identify a scan in ``qc.csv``
KEY_COLUMNS: tuple[str, ...] = ("subject_id", "visit", "scan_id")

#: the measurements behind the flags, in ``qc.csv`` order (after the flags)
MEASURE_COLUMNS: tuple[str, ...] = (
    "n_nonfinite",
    "swap_region",
    "shell_ff",
    "shell_ff_min",
    "swap_run_mm",
    "swap_run_z_mm",
    "body_extent_mm",
    "body_gap_mm",
    "fov_z_mm",
    "coverage_ratio",
    "water_p99",
    "fat_p99",
    "water_max",
    "fat_max",
    "water_min",
    "fat_min",
    "water_p99_ratio",
    "fat_p99_ratio",
    "error",
)


# ----------------------------------------------------------------------------- the cohort


def flag_scans(measures: pd.DataFrame, thresholds: QcThresholds = QcThresholds()) -> pd.DataFrame:
    """Turn per-scan measures into the QC flags (adds the cohort-relative measures).

    Parameters
    ----------
    measures
        One row per scan with the keys of :func:`measure_scan` (and ``error`` where a
        scan could not be read: an ``error`` without ``water_p99`` means unreadable).
    thresholds
        The flag thresholds.

    Returns
    -------
    DataFrame
        ``measures`` with one boolean column per flag of :data:`QC_FLAGS` and the
        columns ``coverage_ratio``, ``water_p99_ratio``, ``fat_p99_ratio`` (scan / cohort
        median). A flag needing a measure that is missing is False.
    """
    df = measures.copy()
    for col in MEASURE_COLUMNS:
        if col not in df.columns:
            df[col] = "" if col in ("error", "swap_region") else np.nan
    num = {c: pd.to_numeric(df[c], errors="coerce") for c in MEASURE_COLUMNS if c not in ("error", "swap_region")}
    readable = num["water_p99"].notna()
    df["unreadable"] = ~readable
    df["nonfinite"] = num["n_nonfinite"].fillna(0) > 0
    df["fat_water_swap"] = readable & (num["swap_run_mm"].fillna(0) >= thresholds.swap_run_mm)
    median_extent = float(num["body_extent_mm"][readable].median()) if readable.any() else math.nan
    df["coverage_ratio"] = num["body_extent_mm"] / median_extent if median_extent > 0 else np.nan
    df["missing_coverage"] = readable & (
        (pd.to_numeric(df["coverage_ratio"]).fillna(1.0) < thresholds.coverage_fraction)
        | (num["body_gap_mm"].fillna(0) >= thresholds.max_gap_mm)
    )
    extreme = pd.Series(False, index=df.index)
    for ch in ("water", "fat"):
        p99 = num[f"{ch}_p99"]
        med = float(p99[readable & (p99 > 0)].median()) if (readable & (p99 > 0)).any() else math.nan
        ratio = p99 / med if med > 0 else pd.Series(np.nan, index=df.index)
        df[f"{ch}_p99_ratio"] = ratio
        log_dev = np.abs(np.log(ratio.where(ratio > 0)))
        extreme |= log_dev.fillna(0) > math.log(thresholds.intensity_factor)
        extreme |= readable & (p99 <= 0)
        extreme |= (num[f"{ch}_max"] > thresholds.spike_factor * p99).fillna(False)
        extreme |= (num[f"{ch}_min"] < -thresholds.negative_fraction * p99.abs()).fillna(False)
    df["extreme_intensity"] = readable & extreme
    for flag in QC_FLAGS:
        df[flag] = df[flag].astype(bool)
    return df


@dataclass(frozen=True)
class QcSummary:
    """What :func:`run_qc` wrote (counts only: no participant ids).

    Attributes
    ----------
    study
        The study folder.
    table
        ``STUDY/qc.csv``.
    n_scans
        Scans measured.
    flagged
        ``{flag: scans}`` for every flag of :data:`QC_FLAGS`.
    n_flagged
        Scans with at least one flag.
    figures
        Figures written (one per raised flag, and the overview).
    """

    study: Path
    table: Path
    n_scans: int
    flagged: Mapping[str, int]
    n_flagged: int
    figures: tuple[Path, ...] = field(default=())


def run_qc(
    study: str | os.PathLike[str] | Study,
    *,
    thresholds: QcThresholds = QcThresholds(),
    workers: int = 1,
    figures: bool = True,
    progress: Progress = NO_PROGRESS,
) -> QcSummary:
    """Measure every scan of a study, flag problems, write ``qc.csv``, ``qc.json``, figures.

    Parameters
    ----------
    study
        A study folder (or a loaded :class:`~bodyage.study.Study`).
    thresholds
        Flag thresholds.
    workers
        Processes measuring scans.
    figures
        Write ``figures/qc_<flag>.png`` (the most extreme scan of each raised flag) and
        ``figures/qc_overview.png`` (the cohort's distributions and thresholds). Scans
        are named by their row in ``qc.csv``, never by participant id.
    progress
        Progress display.

    Returns
    -------
    QcSummary
        Counts per flag.

    Raises
    ------
    StudyError
        If the study folder or its cohort is missing or invalid.
    """
    from bodyage.atomic import write_with
    from bodyage.provenance import build_run_record, finish_run_record, write_record

    st = study if isinstance(study, Study) else load_study(study)
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    record = build_run_record("qc", {"study": str(st.root), **asdict(thresholds)}, hash_inputs=False)
    sat_id = st.labels.id_of(SAT_REGION) if st.labels is not None and SAT_REGION in st.labels else None
    has_mask = "mask" in st.cohort.columns
    jobs = []
    for _, row in st.cohort.iterrows():
        mask = row["mask"] if has_mask and isinstance(row["mask"], str) and row["mask"] else None
        jobs.append(
            (
                {c: str(p) for c, p in st.image_paths(row).items()},
                str(st.path(mask)) if mask else None,
                sat_id if mask else None,
                thresholds,
            )
        )
    task = progress.task("qc", len(jobs))
    results: list[dict[str, Any]] = []
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            results.append(_measure_job(job))
            task.advance()
    else:
        import multiprocessing as mp
        import sys

        method = "forkserver" if "torch" in sys.modules else "fork"
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method)) as pool:
            for res in pool.map(_measure_job, jobs, chunksize=4):
                results.append(res)
                task.advance()
    task.close()

    measures = pd.DataFrame(results, index=st.cohort.index)
    flagged = flag_scans(measures, thresholds)
    table = pd.concat([st.cohort[list(KEY_COLUMNS)].reset_index(drop=True), flagged.reset_index(drop=True)], axis=1)
    table = table[[*KEY_COLUMNS, *QC_FLAGS, *MEASURE_COLUMNS]]
    path = write_with(st.root / QC_FILE, lambda p: table.to_csv(p, index=False, float_format="%.6g"))

    written: tuple[Path, ...] = ()
    if figures:
        from bodyage.qc_figures import qc_figures

        written = tuple(qc_figures(st, table, thresholds))
    counts: dict[str, int] = {flag: int(table[flag].sum()) for flag in QC_FLAGS}
    n_flagged = int(table[list(QC_FLAGS)].any(axis=1).sum())
    write_record(
        st.root / QC_RECORD,
        finish_run_record(
            record,
            thresholds=asdict(thresholds),
            n_scans=len(table),
            flagged=counts,
            n_flagged=n_flagged,
            figures=[str(p.relative_to(st.root)) for p in written],
        ),
    )
    return QcSummary(
        study=st.root, table=path, n_scans=len(table), flagged=counts, n_flagged=n_flagged, figures=written
    )


# ----------------------------------------------------------------------------- using the flags


def parse_flags(flags: str | Iterable[str]) -> tuple[QcFlag, ...]:
    """Parse ``--exclude-qc`` (``"fat_water_swap,missing_coverage"`` or ``"all"``).

    Raises
    ------
    InputError
        Naming an unknown flag and listing the known ones.
    """
    items = [f.strip() for f in (flags.split(",") if isinstance(flags, str) else flags) if f.strip()]
    out: list[QcFlag] = []
    for item in items:
        if item == ALL_FLAGS:
            return QC_FLAGS
        if item not in QC_FLAGS:
            raise InputError(f"unknown QC flag {item!r}; known flags: {', '.join(QC_FLAGS)} (or '{ALL_FLAGS}')")
        flag = next(f for f in QC_FLAGS if f == item)
        if flag not in out:
            out.append(flag)
    return tuple(out)


def load_qc(study: str | os.PathLike[str] | Study) -> pd.DataFrame:
    """Read ``STUDY/qc.csv`` and check it covers the study's cohort.

    Raises
    ------
    StudyError
        If ``qc.csv`` is missing, lacks a flag column, or has no row for some scans of
        ``cohort.csv`` (QC older than the cohort).
    """
    st = study if isinstance(study, Study) else load_study(study)
    path = st.root / QC_FILE
    if not path.is_file():
        raise StudyError(f"{path}: not found; run `bodyage qc {st.root}` first")
    try:
        table = pd.read_csv(path, dtype={"subject_id": str, "scan_id": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise StudyError(f"{path}: cannot be parsed as CSV ({err})") from err
    missing = [c for c in ("scan_id", *QC_FLAGS) if c not in table.columns]
    if missing:
        raise StudyError(f"{path}: missing column(s) {', '.join(missing)}; run `bodyage qc {st.root}` again")
    uncovered = int((~st.cohort["scan_id"].isin(table["scan_id"])).sum())
    if uncovered:
        raise StudyError(
            f"{path}: has no row for {uncovered} scan(s) of cohort.csv (QC is older than the cohort); "
            f"run `bodyage qc {st.root}` again"
        )
    for flag in QC_FLAGS:
        col = table[flag]
        if col.dtype != bool:
            table[flag] = (
                col.astype(str).str.strip().str.lower().map({"true": True, "false": False, "1": True, "0": False})
            )
            if table[flag].isna().any():
                raise StudyError(f"{path}: column {flag!r} must hold True/False")
            table[flag] = table[flag].astype(bool)
    return table


def excluded_scans(study: str | os.PathLike[str] | Study, flags: str | Iterable[str]) -> set[str]:
    """Scan ids (``<subject_id>_<visit>``) raising any of ``flags`` in ``STUDY/qc.csv``.

    This is what ``bodyage train --exclude-qc FLAG,...`` calls.

    Parameters
    ----------
    study
        The study folder (or a loaded study).
    flags
        Flag names (:data:`QC_FLAGS`) as a comma-separated string or an iterable;
        ``"all"`` means every flag. Empty: nothing is excluded (and ``qc.csv`` is not
        needed).

    Returns
    -------
    set of str
        Scan ids to leave out.

    Raises
    ------
    InputError
        If a flag is unknown (the message lists the known flags).
    StudyError
        If ``qc.csv`` is missing or out of date (the message says to run ``bodyage qc``).
    """
    wanted = parse_flags(flags)
    if not wanted:
        return set()
    table = load_qc(study)
    hit = table[list(wanted)].any(axis=1)
    return set(table.loc[hit, "scan_id"].astype(str))
