"""Per-scan signals of every region, read from the study's images and masks (no model).

:func:`region_signals` returns one row per (scan, region present in the scan's mask):

``subject_id``, ``visit``, ``age``
    The scan key and the age in ``cohort.csv``.
``region``, ``n_voxels``, ``volume_ml``
    The region's name (``labels.json``), its voxel count and volume.
``water_mean``, ``fat_mean``
    Mean water and fat signal over the region's voxels.
``fat_fraction``
    ``fat_mean / (water_mean + fat_mean)``: the fat fraction of the region's mean signal
    (a ratio of means, not a mean of voxel ratios, which noise in dark voxels dominates).
``signal_sum``
    ``(water_mean + fat_mean) × volume_ml``: the region's summed signal (volume × intensity).

A region absent from a scan has no row (missing, not zero). These are the inputs of the
model-free floors (:mod:`bodyage.floors`). :func:`cached_region_signals` computes them once
per study and keeps them in ``RUN/region_signals.parquet`` under a hash of the study's
``cohort.csv`` and ``labels.json``.

The module reads the files with nibabel and pandas only: :mod:`analysis` imports it, and
neither torch nor TotalSegmentator may come with it (so not :mod:`bodyage.study`, whose
label registry imports TotalSegmentator's class map, nor :mod:`bodyage.volumes`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from bodyage.errors import InputError, StudyError

#: the cache under the run folder
REGION_SIGNALS_FILE = "region_signals.parquet"
#: image channels read (path columns of ``cohort.csv``)
CHANNELS: tuple[str, str] = ("water", "fat")
COLUMNS: tuple[str, ...] = (
    "subject_id",
    "visit",
    "age",
    "region",
    "n_voxels",
    "volume_ml",
    "water_mean",
    "fat_mean",
    "fat_fraction",
    "signal_sum",
)


def study_key(study_root: str | os.PathLike[str]) -> str:
    """Hash of the study's ``cohort.csv`` and ``labels.json`` (what the cache is valid for).

    ``cohort.csv`` names every image and mask file, so a re-segmented or re-simulated
    study gets a new key.
    """
    root = Path(study_root)
    h = hashlib.sha256()
    for name in ("cohort.csv", "labels.json"):
        path = root / name
        h.update(name.encode())
        h.update(path.read_bytes() if path.is_file() else b"<absent>")
    return h.hexdigest()[:16]


def _labels(root: Path) -> dict[int, str]:
    path = root / "labels.json"
    if not path.is_file():
        raise StudyError(f"{path}: not found (region signals need the study's label names)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {int(k): str(v) for k, v in raw.items()}
    except (json.JSONDecodeError, AttributeError, ValueError) as err:
        raise StudyError(f"{path}: expected a JSON object {{label id: region name}}") from err


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Data and affine of a NIfTI file (no reorientation: images and masks share a grid)."""
    import nibabel as nib

    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)  # type: ignore[attr-defined]
        affine = np.asarray(img.affine, dtype=np.float64)  # type: ignore[attr-defined]
    except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise InputError(f"{path}: cannot read NIfTI ({err})") from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    return data, affine


def scan_signals(water: np.ndarray, fat: np.ndarray, mask: np.ndarray, voxel_ml: float) -> pd.DataFrame:
    """Signals of every label present in one scan (one pass over the voxels with ``bincount``).

    Parameters
    ----------
    water, fat
        Channel volumes, same shape as ``mask``.
    mask
        Integer label map (0 = background).
    voxel_ml
        Volume of one voxel in ml.

    Returns
    -------
    pandas.DataFrame
        Indexed by label id (background and absent labels left out), columns ``n_voxels``,
        ``volume_ml``, ``water_mean``, ``fat_mean``, ``fat_fraction``, ``signal_sum``.

    Raises
    ------
    InputError
        If the shapes differ or the mask has negative labels.
    """
    if water.shape != mask.shape or fat.shape != mask.shape:
        raise InputError(f"region signals: image shapes {water.shape}, {fat.shape} differ from the mask's {mask.shape}")
    labels = np.asarray(mask).astype(np.int64).ravel()
    if labels.size and labels.min() < 0:
        raise InputError("region signals: the mask has negative labels")
    n = np.bincount(labels).astype(float)
    sw = np.bincount(labels, np.asarray(water, dtype=np.float64).ravel(), minlength=len(n))
    sf = np.bincount(labels, np.asarray(fat, dtype=np.float64).ravel(), minlength=len(n))
    ids = np.flatnonzero(n > 0)
    ids = ids[ids > 0]
    count = n[ids]
    wm, fm = sw[ids] / count, sf[ids] / count
    total = wm + fm
    with np.errstate(divide="ignore", invalid="ignore"):
        ff = np.where(total != 0, fm / total, np.nan)
    vol = count * voxel_ml
    return pd.DataFrame(
        {
            "n_voxels": count.astype(np.int64),
            "volume_ml": vol,
            "water_mean": wm,
            "fat_mean": fm,
            "fat_fraction": ff,
            "signal_sum": total * vol,
        },
        index=pd.Index(ids, name="label"),
    )


def region_signals(study_root: str | os.PathLike[str]) -> tuple[pd.DataFrame, list[str]]:
    """Signals of every region in every scan of a study (see the module docstring).

    Parameters
    ----------
    study_root
        Study folder with ``cohort.csv`` (columns ``subject_id``, ``visit``, ``age``,
        ``water``, ``fat``, ``mask``) and ``labels.json``.

    Returns
    -------
    (pandas.DataFrame, list of str)
        The table (columns :data:`COLUMNS`) and the scans (``<subject_id>_<visit>``) left
        out because a file could not be read, each with the reason.

    Raises
    ------
    StudyError
        If ``cohort.csv`` or ``labels.json`` is missing, or the cohort has no mask column.
    """
    root = Path(study_root)
    csv = root / "cohort.csv"
    if not csv.is_file():
        raise StudyError(f"{csv}: not found")
    cohort = pd.read_csv(csv, dtype={"subject_id": str})
    missing = [c for c in ("subject_id", "age", *CHANNELS, "mask") if c not in cohort.columns]
    if missing:
        raise StudyError(f"{csv}: region signals need the column(s) {', '.join(missing)} (run `bodyage segment`?)")
    names = _labels(root)
    visits = cohort["visit"] if "visit" in cohort.columns else pd.Series(0, index=cohort.index)
    frames: list[pd.DataFrame] = []
    skipped: list[str] = []
    ages = pd.to_numeric(cohort["age"], errors="coerce").to_numpy(dtype=float)
    columns = (cohort["subject_id"], visits, ages, cohort["mask"], cohort["water"], cohort["fat"])
    for subject, visit, age, mask_path, water_path, fat_path in zip(*columns, strict=True):
        sid, v = str(subject), int(visit)
        if not isinstance(mask_path, str) or not mask_path:
            skipped.append(f"{sid}_{v}: no mask")
            continue
        try:
            mask, affine = _read(root / mask_path)
            water, _ = _read(root / str(water_path))
            fat, _ = _read(root / str(fat_path))
            voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
            sig = scan_signals(water, fat, mask, voxel_ml)
        except InputError as err:
            skipped.append(f"{sid}_{v}: {err}")
            continue
        sig = sig[sig.index.isin(list(names))]
        sig.insert(0, "region", [names[int(i)] for i in sig.index])
        sig.insert(0, "age", float(age))
        sig.insert(0, "visit", v)
        sig.insert(0, "subject_id", sid)
        frames.append(sig.reset_index(drop=True))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in COLUMNS}), skipped
    return pd.concat(frames, ignore_index=True)[list(COLUMNS)], skipped


def cached_region_signals(
    study_root: str | os.PathLike[str], run: str | os.PathLike[str] | None = None
) -> pd.DataFrame:
    """:func:`region_signals`, kept in ``RUN/region_signals.parquet`` for the study it was made from.

    The file carries the study's :func:`study_key` in a ``study_key`` column; a file made
    from another version of the study is recomputed. With ``run=None`` nothing is cached.
    Scans that could not be read are left out (the count is in ``n_scans`` of the floors).

    Raises
    ------
    StudyError
        As :func:`region_signals`, or if no scan's files could be read.
    """
    key = study_key(study_root)
    path = Path(run) / REGION_SIGNALS_FILE if run is not None else None
    if path is not None and path.is_file():
        try:
            cached = pd.read_parquet(path)
        except (OSError, ValueError):
            cached = None
        if cached is not None and "study_key" in cached.columns and (cached["study_key"] == key).all():
            return cached.drop(columns="study_key")
    table, skipped = region_signals(study_root)
    if table.empty:
        first = f" (first: {skipped[0]})" if skipped else ""
        raise StudyError(f"{study_root}: no scan's images and mask could be read{first}")
    if path is not None and os.access(path.parent, os.W_OK):
        from functools import partial

        from bodyage.atomic import write_with

        write_with(path, partial(table.assign(study_key=key).to_parquet, index=False))
    return table
