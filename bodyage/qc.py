"""Image-quality flags of a study (``bodyage qc``) and the scans a flag excludes.

Each scan's water and fat images are measured (:func:`measure_scan`), then the cohort's
measurements are turned into one boolean flag per problem (:func:`flag_scans`), written
to ``STUDY/qc.csv`` with the numbers behind each flag. Flags (:data:`QC_FLAGS`):

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
import numpy.typing as npt
import pandas as pd

from bodyage._typing import QC_FLAGS, QcFlag
from bodyage.errors import InputError, StudyError
from bodyage.progress import NO_PROGRESS, Progress
from bodyage.study import Study, load_study

#: the table written by :func:`run_qc`
QC_FILE = "qc.csv"
#: provenance of the QC run
QC_RECORD = "qc.json"
#: ``--exclude-qc all``: every flag
ALL_FLAGS = "all"
#: the columns that identify a scan in ``qc.csv``
KEY_COLUMNS: tuple[str, ...] = ("subject_id", "visit", "scan_id")
#: the label whose voxels must be fat-dominant, when masks exist
SAT_REGION = "subcutaneous_fat"

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

Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class QcThresholds:
    """The thresholds of the QC flags (defaults are the documented choices).

    Attributes
    ----------
    swap_ff
        Fat fraction below which a slice's subcutaneous fat is water-dominated.
    swap_run_mm
        Shortest run of such slices that flags a swap (a UK Biobank station is ~190 mm).
    shell_mm
        Thickness of the outer body shell taken as subcutaneous fat without masks (at
        least one voxel).
    coverage_fraction
        Body extent below this fraction of the cohort median flags missing coverage.
    max_gap_mm
        An empty gap inside the body extent at least this long flags missing coverage.
    intensity_factor
        A channel's body 99th percentile this many times above/below the cohort median
        is extreme.
    spike_factor
        A voxel brighter than this many times the channel's body 99th percentile is extreme.
    negative_fraction
        A channel minimum below minus this fraction of its 99th percentile is extreme.
    body_fraction
        The body is where water + fat exceeds this fraction of its 99th percentile.
    min_slice_fraction
        An axial slice holds body when at least this fraction of it is body.
    """

    swap_ff: float = 0.5
    swap_run_mm: float = 40.0
    shell_mm: float = 5.0
    coverage_fraction: float = 0.9
    max_gap_mm: float = 30.0
    intensity_factor: float = 3.0
    spike_factor: float = 20.0
    negative_fraction: float = 0.05
    body_fraction: float = 0.1
    min_slice_fraction: float = 0.01

    def __post_init__(self) -> None:
        checks = {
            "swap_ff": 0 < self.swap_ff < 1,
            "swap_run_mm": self.swap_run_mm > 0,
            "shell_mm": self.shell_mm > 0,
            "coverage_fraction": 0 < self.coverage_fraction <= 1,
            "max_gap_mm": self.max_gap_mm > 0,
            "intensity_factor": self.intensity_factor > 1,
            "spike_factor": self.spike_factor > 1,
            "negative_fraction": self.negative_fraction >= 0,
            "body_fraction": 0 < self.body_fraction < 1,
            "min_slice_fraction": 0 < self.min_slice_fraction < 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise InputError(f"QC threshold {name}={getattr(self, name)!r} is out of range")


# ----------------------------------------------------------------------------- one scan


def _axial(connect: bool = True) -> npt.NDArray[np.bool_]:
    """A 3×3×1 cross: neighbours within an axial slice only."""
    s = np.zeros((3, 3, 3), dtype=bool)
    s[1, 1, 1] = True
    if connect:
        s[0, 1, 1] = s[2, 1, 1] = s[1, 0, 1] = s[1, 2, 1] = True
    return s


def body_mask(water: Array, fat: Array, thresholds: QcThresholds = QcThresholds()) -> npt.NDArray[np.bool_]:
    """The body: water + fat above a fraction of its 99th percentile, holes filled per slice.

    Parameters
    ----------
    water, fat
        Finite arrays of shape ``(X, Y, Z)`` in RAS+ order (Z: inferior to superior).
    thresholds
        ``body_fraction`` sets the threshold.

    Returns
    -------
    ndarray of bool, shape ``(X, Y, Z)``
        Specks removed by an in-slice opening; holes (lungs, bowel gas) filled per slice.
    """
    from scipy import ndimage

    total = np.clip(water, 0, None) + np.clip(fat, 0, None)
    sample = total[::2, ::2, ::2]
    p99 = float(np.percentile(sample, 99)) if sample.size else 0.0
    if p99 <= 0:
        return np.zeros(total.shape, dtype=bool)
    mask = total > thresholds.body_fraction * p99
    cross = _axial()
    mask = ndimage.binary_opening(mask, structure=cross)
    return np.asarray(ndimage.binary_fill_holes(mask, structure=cross), dtype=bool)


def _runs(below: npt.NDArray[np.bool_]) -> tuple[int, int]:
    """Longest run of True: (length, start index)."""
    best = (0, 0)
    start = None
    for i, b in enumerate([*below.tolist(), False]):
        if b and start is None:
            start = i
        elif not b and start is not None:
            if i - start > best[0]:
                best = (i - start, start)
            start = None
    return best


def measure_scan(
    water: npt.ArrayLike,
    fat: npt.ArrayLike,
    affine: npt.ArrayLike,
    *,
    sat: npt.NDArray[np.bool_] | None = None,
    thresholds: QcThresholds = QcThresholds(),
) -> dict[str, Any]:
    """Measure one scan: the numbers behind every flag except the cohort-relative parts.

    Parameters
    ----------
    water, fat
        Arrays of shape ``(X, Y, Z)`` in RAS+ order (as :func:`~bodyage.volumes.load_volume`
        returns them), any intensity scale.
    affine
        4×4 voxel-to-world matrix (mm) of that grid.
    sat
        Subcutaneous fat mask of the same shape (from ``segment``); ``None``: the outer
        body shell is used.
    thresholds
        Shell thickness, body threshold, swap fat fraction.

    Returns
    -------
    dict
        Keys of :data:`MEASURE_COLUMNS` except the cohort ratios and ``error``. Fat
        fractions are NaN where no shell voxel exists.
    """
    from scipy import ndimage

    w = np.asarray(water, dtype=np.float32)
    f = np.asarray(fat, dtype=np.float32)
    aff = np.asarray(affine, dtype=np.float64)
    if w.shape != f.shape or w.ndim != 3:
        raise InputError(f"water {w.shape} and fat {f.shape} must be 3D arrays of one shape")
    spacing = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    dz = float(spacing[2])
    bad = ~np.isfinite(w) | ~np.isfinite(f)
    n_nonfinite = int(bad.sum())
    if n_nonfinite:
        w = np.where(bad, 0, w).astype(np.float32)
        f = np.where(bad, 0, f).astype(np.float32)
    out: dict[str, Any] = {"n_nonfinite": n_nonfinite, "fov_z_mm": w.shape[2] * dz}

    body = body_mask(w, f, thresholds)
    area = body.sum(axis=(0, 1))
    has_body = area >= thresholds.min_slice_fraction * w.shape[0] * w.shape[1]
    zs = np.flatnonzero(has_body)
    if zs.size:
        first, last = int(zs[0]), int(zs[-1])
        out["body_extent_mm"] = (last - first + 1) * dz
        out["body_gap_mm"] = _runs(~has_body[first : last + 1])[0] * dz
    else:
        first, last = 0, -1
        out["body_extent_mm"] = 0.0
        out["body_gap_mm"] = 0.0

    # fat fraction in subcutaneous fat (or the outer shell), per axial slice
    if sat is not None:
        if sat.shape != w.shape:
            raise InputError(f"subcutaneous fat mask {sat.shape} does not match the image grid {w.shape}")
        shell = sat.astype(bool) & body
        out["swap_region"] = SAT_REGION
    else:
        k = max(1, round(thresholds.shell_mm / float(min(spacing[0], spacing[1]))))
        inner = ndimage.binary_erosion(body, structure=_axial(), iterations=k, border_value=1)
        shell = body & ~inner
        out["swap_region"] = "shell"
    total = w + f
    ff = np.divide(f, total, out=np.full(w.shape, np.nan, dtype=np.float32), where=total > 0)
    sx, sy, sz = np.nonzero(shell)
    vals = ff[sx, sy, sz]
    ok = np.isfinite(vals)
    sz, vals = sz[ok], vals[ok]
    out["shell_ff"] = float(np.median(vals)) if vals.size else math.nan
    per_slice = np.full(w.shape[2], np.nan)
    if vals.size:
        order = np.argsort(sz, kind="stable")
        sz, vals = sz[order], vals[order]
        cuts = np.flatnonzero(np.diff(sz)) + 1
        min_voxels = 5
        for z_slice, group in zip(np.split(sz, cuts), np.split(vals, cuts), strict=True):
            if group.size >= min_voxels:
                per_slice[int(z_slice[0])] = float(np.median(group))
    measured = per_slice[first : last + 1] if last >= first else per_slice[:0]
    out["shell_ff_min"] = float(np.nanmin(measured)) if np.isfinite(measured).any() else math.nan
    run, start = _runs(np.nan_to_num(measured, nan=1.0) < thresholds.swap_ff)
    out["swap_run_mm"] = run * dz
    if run:
        centre = first + start + (run - 1) / 2
        out["swap_run_z_mm"] = float((aff @ np.array([(w.shape[0] - 1) / 2, (w.shape[1] - 1) / 2, centre, 1.0]))[2])
    else:
        out["swap_run_z_mm"] = math.nan

    # intensities inside the body
    for name, arr in (("water", w), ("fat", f)):
        inside = arr[body] if body.any() else arr.ravel()
        out[f"{name}_p99"] = float(np.percentile(inside, 99)) if inside.size else math.nan
        out[f"{name}_max"] = float(arr.max()) if arr.size else math.nan
        out[f"{name}_min"] = float(arr.min()) if arr.size else math.nan
    return out


def measure_study_scan(
    paths: Mapping[str, str | os.PathLike[str]],
    mask: str | os.PathLike[str] | None = None,
    sat_id: int | None = None,
    thresholds: QcThresholds = QcThresholds(),
) -> dict[str, Any]:
    """Load one scan (water, fat, optional mask) and :func:`measure_scan` it.

    Returns
    -------
    dict
        The measures, or ``{"error": message}`` when a file cannot be read.
    """
    from bodyage.volumes import load_labels, load_volume, same_grid

    try:
        water = load_volume(paths["water"], dtype=np.float32)
        fat = load_volume(paths["fat"], dtype=np.float32)
    except InputError as err:
        return {"error": str(err)}
    if not same_grid(water, fat):
        return {"error": f"{paths['water']} and {paths['fat']} are not on the same grid"}
    sat = None
    region_note = None
    if mask is not None and sat_id is not None:
        try:
            m = load_labels(mask)
            if same_grid(m, water):
                sat = np.asarray(m.data) == sat_id
            else:
                region_note = f"{mask}: not on the image grid; outer shell used"
        except InputError as err:
            region_note = f"{err}; outer shell used"
    out = measure_scan(water.data, fat.data, water.affine, sat=sat, thresholds=thresholds)
    if region_note:
        out["error"] = region_note
    return out


def _measure_job(job: tuple[dict[str, str], str | None, int | None, QcThresholds]) -> dict[str, Any]:
    paths, mask, sat_id, thresholds = job
    return measure_study_scan(paths, mask, sat_id, thresholds)


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
