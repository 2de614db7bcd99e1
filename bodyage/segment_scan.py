"""One scan of ``bodyage segment``: its mask, made or imported, and its record.

:func:`import_scan` aligns a mask that exists already (a multilabel NIfTI or
TotalSegmentator's per-region folder) to the scan's image; :func:`segment_scan` runs
TotalSegmentator on the scan's channels (after :func:`check_raw_intensities`) and
combines the tasks' label maps, organs winning. Either writes the mask atomically,
stamped with the configuration's fingerprint, then a small record of its voxel counts
(``masks/.segment/<scan id>.json``, :class:`StudyPaths`). :func:`finished_record` and
:func:`recover_record` are what lets a killed run resume: a scan whose record and mask
match the fingerprint is not done again. A scan that cannot be done raises
:class:`ScanFailed`, which the step records in ``failures.csv`` and goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from bodyage.errors import InputError, WeightsMissingError
from bodyage.regions import ORGAN_TASK, TISSUE_TASK, LabelTable, totalsegmentator_class_map
from bodyage.segment_config import SegmentConfig, region_family
from bodyage.study import Study

log = logging.getLogger("bodyage.segment")  # the step's logger: one channel for the whole step

#: folder of the masks and of the step's tables, inside the study
MASKS_DIR = "masks"
#: per-scan records (voxel counts, notes, failures) the merge reads
STATE_DIR = ".segment"
#: an image whose largest absolute intensity is at most this looks normalised ([0, 1])
NORMALISED_MAX = 2.0


# ---------------------------------------------------------------- per-scan records


@dataclass(frozen=True)
class StudyPaths:
    """Where the step writes inside a study."""

    root: Path

    @property
    def masks(self) -> Path:
        """``STUDY/masks``."""
        return self.root / MASKS_DIR

    @property
    def state(self) -> Path:
        """``STUDY/masks/.segment``: per-scan records."""
        return self.masks / STATE_DIR

    def mask(self, scan: str) -> Path:
        """The mask of a scan."""
        return self.masks / f"{scan}.nii.gz"

    def mask_rel(self, scan: str) -> str:
        """The mask path as stored in cohort.csv (relative to the study)."""
        return f"{MASKS_DIR}/{scan}.nii.gz"

    def record(self, scan: str) -> Path:
        """The record of a finished scan."""
        return self.state / f"{scan}.json"

    def failure(self, scan: str) -> Path:
        """The record of a failed scan."""
        return self.state / f"{scan}.failed.json"


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object read from ``path``, or ``None`` if it is missing, unreadable or not an object."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def finished_record(paths: StudyPaths, scan: str, fingerprint: str) -> dict[str, Any] | None:
    """Return the record of a scan finished with this configuration, or ``None``.

    Finished means: a record with this fingerprint, and the mask it describes on disk with
    the recorded size and SHA-256 (a mask replaced, truncated or corrupted since does not
    count). Records written before the checksum was kept need the mask to read whole.
    """
    rec = read_json(paths.record(scan))
    if rec is None or rec.get("fingerprint") != fingerprint:
        return None
    mask = paths.mask(scan)
    try:
        if mask.stat().st_size != rec.get("mask_bytes"):
            return None
        if "mask_sha256" in rec:
            return rec if file_sha256(mask) == rec["mask_sha256"] else None
        import nibabel as nib

        np.asarray(nib.load(str(mask)).dataobj)  # type: ignore[attr-defined]  # every voxel: gzip checks its CRC
    except Exception:
        return None
    return rec


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_scan_record(paths: StudyPaths, scan: str, record: Mapping[str, Any]) -> None:
    """Write a finished scan's record (atomically) and remove its failure record."""
    from bodyage.atomic import write_json

    write_json(paths.record(scan), dict(record))
    paths.failure(scan).unlink(missing_ok=True)


def write_scan_failure(paths: StudyPaths, scan: str, fingerprint: str, stage: str, reason: str) -> None:
    """Write a failed scan's record: the stage and reason ``failures.csv`` will show."""
    from bodyage.atomic import write_json

    reason = reason.removeprefix(f"scan {scan}: ")  # the table names the scan already
    write_json(paths.failure(scan), {"scan_id": scan, "fingerprint": fingerprint, "stage": stage, "reason": reason})


def remove_stale_temporaries(paths: StudyPaths, scans: Sequence[str]) -> int:
    """Delete temporary files a killed run left for these scans (``.<name>.*.tmp*``)."""
    n = 0
    for folder, names in ((paths.masks, [f"{s}.nii.gz" for s in scans]), (paths.state, [f"{s}.json" for s in scans])):
        if not folder.is_dir():
            continue
        for name in names:
            for tmp in folder.glob(f".{name}.*.tmp*"):
                tmp.unlink(missing_ok=True)
                n += 1
    return n


# ---------------------------------------------------------------- making one mask


class ScanFailed(Exception):
    """One scan could not be done: the step records ``stage`` and ``reason`` and goes on."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


def _record(
    scan: str,
    fingerprint: str,
    labels: npt.NDArray[np.generic],
    spacing: tuple[float, float, float],
    mask_path: Path,
    n_labels: int,
    notes: Sequence[str],
) -> dict[str, Any]:
    from bodyage.masks import label_counts

    counts = label_counts(labels, n_labels)
    nz = np.flatnonzero(counts)
    return {
        "scan_id": scan,
        "fingerprint": fingerprint,
        "mask_bytes": mask_path.stat().st_size,
        "mask_sha256": file_sha256(mask_path),
        "voxel_ml": float(np.prod(spacing)) / 1000.0,
        "counts": {str(int(i)): int(counts[i]) for i in nz if i != 0},
        "notes": list(notes),
    }


def _locate_import(source: Path, scan: str) -> Path:
    single = source / f"{scan}.nii.gz"
    folder = source / scan
    if single.is_file() and folder.is_dir():
        raise ScanFailed("import", f"both {single} and {folder}/ exist; keep one layout per scan")
    if single.is_file():
        return single
    if folder.is_dir():
        return folder
    raise ScanFailed("import", f"no mask in {source} (looked for {single.name} and {scan}/<region>.nii.gz)")


def import_scan(
    row: pd.Series,
    study: Study,
    paths: StudyPaths,
    table: LabelTable,
    config: SegmentConfig,
    fingerprint: str,
) -> dict[str, Any]:
    """Import a scan's mask from ``config.source``, aligned to its image; return its record.

    Raises
    ------
    ScanFailed
        No or two masks for the scan, an unreadable image, or a mask that does not fit it.
    """
    from bodyage.masks import align_to_image, grid_of, label_dtype, read_multilabel, read_region_folder, write_mask

    assert config.source is not None
    scan = str(row["scan_id"])
    src = _locate_import(config.source, scan)
    image_path = study.path(row[study.channels[0]])
    try:
        image = grid_of(image_path)
    except InputError as err:
        raise ScanFailed("image", str(err)) from err
    tissue_ids = frozenset(i for i, n in table.names.items() if region_family(n) == TISSUE_TASK)
    try:
        if src.is_dir():
            mask, notes = read_region_folder(src, table, scan=scan, tissue_ids=tissue_ids)
        else:
            mask, notes = read_multilabel(src, table, scan=scan)
        aligned = align_to_image(mask, image, scan=scan, source=str(src))
    except InputError as err:
        raise ScanFailed("import", str(err)) from err
    if aligned.note:
        notes = [*notes, aligned.note]
    dtype = label_dtype(table.max_id)
    out = write_mask(paths.mask(scan), aligned.data, image, image_path, fingerprint=fingerprint, dtype=dtype)
    return _record(scan, fingerprint, aligned.data, image.spacing, out, table.max_id + 1, notes)


def check_raw_intensities(data: npt.NDArray[np.generic], *, what: str) -> None:
    """Refuse an image TotalSegmentator cannot use: non-finite values or normalised intensities.

    TotalSegmentator resamples the image as integers, so a volume scaled to [0, 1]
    segments to nothing (TotalSegmentator issue #455); feed the scanner's raw values.

    Raises
    ------
    InputError
        Naming the image and what was found.
    """
    arr = np.asarray(data)
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise InputError(f"{what} holds NaN or infinite values; TotalSegmentator needs finite raw intensities")
    hi = max(abs(float(arr.max())), abs(float(arr.min()))) if arr.size else 0.0
    if hi <= NORMALISED_MAX:
        raise InputError(
            f"{what} has intensities within ±{hi:.3g}: it looks normalised (or empty); TotalSegmentator needs "
            "the scanner's raw intensities, as it resamples them as integers (a [0, 1] image segments to "
            "nothing, TotalSegmentator issue #455)"
        )


def orientation_note(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> str | None:
    """A note when a RAS+ volume's longest physical axis is not head-to-foot.

    Neck-to-knee scans are longest along S-I; a header that puts another axis there
    is the known cause of failed segmentations (the spine must be posterior, the head up).
    """
    extent = [n * s for n, s in zip(shape, spacing, strict=True)]
    longest = int(np.argmax(extent))
    if longest == 2 or extent[longest] <= extent[2] * 1.05:
        return None
    axis = ("left-right", "anterior-posterior")[longest]
    return (
        f"orientation: the longest axis is {axis} ({extent[longest]:.0f} mm), not head-to-foot "
        f"({extent[2]:.0f} mm); check the image header if the masks look wrong"
    )


def segment_scan(
    row: pd.Series,
    study: Study,
    paths: StudyPaths,
    table: LabelTable,
    config: SegmentConfig,
    fingerprint: str,
    session: Callable[[], Any],
) -> dict[str, Any]:
    """Run TotalSegmentator's tasks on a scan, combine their label maps, write the mask; return its record.

    ``session`` returns the running TotalSegmentator session; it is called outside the
    per-scan error handling, so a session that cannot start stops the step.

    Raises
    ------
    ScanFailed
        An unreadable or normalised image, channels on different grids, or a TotalSegmentator error.
    WeightsMissingError
        Passed on: it concerns every scan.
    """
    from bodyage.masks import combine_label_maps, label_dtype, relabel, write_mask
    from bodyage.volumes import load_volume, same_grid

    scan = str(row["scan_id"])
    reference = study.channels[0]
    needed = list(dict.fromkeys([reference, *config.channels.values()]))
    volumes = {}
    for ch in needed:
        path = study.path(row[ch])
        try:
            volumes[ch] = load_volume(path)
        except InputError as err:
            raise ScanFailed("image", str(err)) from err
    ref = volumes[reference]
    for ch, vol in volumes.items():
        if not same_grid(vol, ref):
            raise ScanFailed(
                "image",
                f"the {ch} image is on grid {vol.shape} and the {reference} image on {ref.shape}; they must match",
            )
    for task, ch in config.channels.items():
        try:
            check_raw_intensities(volumes[ch].data, what=f"the {ch} image {study.path(row[ch])} (fed to {task})")
        except InputError as err:
            raise ScanFailed("image", str(err)) from err
    notes = [n for n in [orientation_note(ref.shape, ref.spacing)] if n]
    dtype = label_dtype(table.max_id)
    maps: dict[str, npt.NDArray[np.integer]] = {}
    ts = session()  # outside the per-scan error handling: a session that cannot start concerns every scan
    for task, ch in config.channels.items():
        vol = volumes[ch]
        try:
            ts_labels = ts.segment(vol.data, vol.affine, task)
        except WeightsMissingError:  # concerns every scan
            raise
        except Exception as err:  # TotalSegmentator / nnU-Net / CUDA errors are per scan: recorded, not hidden
            log.debug("TotalSegmentator failed on %s (%s)", scan, task, exc_info=True)
            raise ScanFailed("totalsegmentator", f"task {task}: {type(err).__name__}: {err}") from err
        mapping = {i: table.id_of(n) for i, n in totalsegmentator_class_map(task).items()}
        maps[task] = relabel(ts_labels, mapping, dtype, what=f"scan {scan}: TotalSegmentator {task} output")
    combined = combine_label_maps(maps.get(ORGAN_TASK), maps.get(TISSUE_TASK), dtype)
    out = write_mask(paths.mask(scan), combined, ref, study.path(row[reference]), fingerprint=fingerprint, dtype=dtype)
    return _record(scan, fingerprint, combined, ref.spacing, out, table.max_id + 1, notes)


def recover_record(
    row: pd.Series, study: Study, paths: StudyPaths, table: LabelTable, fingerprint: str
) -> dict[str, Any] | None:
    """Rebuild the record of a mask written (and stamped) by a run killed before its record."""
    from bodyage.masks import file_grid, read_stamp
    from bodyage.volumes import load_volume

    scan = str(row["scan_id"])
    mask = paths.mask(scan)
    if not mask.is_file() or read_stamp(mask) != fingerprint:  # unstamped or damaged: segment it again
        return None
    try:
        (mask_shape, mask_affine), (image_shape, image_affine) = (
            file_grid(mask),
            file_grid(study.path(row[study.channels[0]])),
        )
        if mask_shape != image_shape or not np.allclose(mask_affine, image_affine, atol=1e-3):
            return None
    except InputError:
        return None
    try:
        vol = load_volume(mask)
    except Exception:  # InputError, or a damaged gzip stream nibabel passes on
        return None
    log.debug("scan %s: record rebuilt from its stamped mask", scan)
    return _record(scan, fingerprint, vol.data, vol.spacing, mask, table.max_id + 1, [])
