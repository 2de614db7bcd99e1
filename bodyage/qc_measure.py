"""Measuring one scan for ``bodyage qc``: the body mask, the subcutaneous fat fraction, the numbers.

:func:`measure_scan` turns one scan's water and fat images (and, when ``segment`` made
them, its subcutaneous fat mask) into the numbers behind every QC flag that does not
depend on the rest of the cohort: non-finite voxels, the body's extent along z and the
longest gap in it, the median fat fraction of the subcutaneous fat (or of the outer body
shell) per axial slice and its longest water-dominated run, and each channel's intensity
percentiles. :func:`measure_study_scan` loads a scan of a study and measures it;
:class:`QcThresholds` holds every threshold of the measures and of the flags. How the
cohort's measures become flags (:func:`bodyage.qc.flag_scans`) and what each flag means
is in :mod:`bodyage.qc`; every public name here is also importable from there.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from bodyage.errors import InputError

#: the label whose voxels must be fat-dominant, when masks exist
SAT_REGION = "subcutaneous_fat"

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
