"""``bodyage segment``: one label map per scan, from TotalSegmentator or imported.

:func:`segment_study` makes ``STUDY/masks/<scan id>.nii.gz`` for every scan of a study,
either by running TotalSegmentator (:mod:`bodyage.totalseg`, tasks ``total_mr`` and
optionally ``tissue_types_mr`` combined with organs winning) or by importing masks that
exist already (``source``: a multilabel NIfTI per scan, or TotalSegmentator's per-region
folders). It then writes, in ``STUDY/``:

- ``masks/<scan id>.nii.gz``: uint8/uint16 label map on the grid (and in the axis order)
  of the scan's images, ids of ``labels.json``;
- ``cohort.csv``: the ``mask`` column (empty for scans without a mask);
- ``labels.json``: the label table, extended with the tissue classes when they are run;
- ``masks/qc.csv``: per scan × expected region ``n_voxels`` and ``volume_ml`` (NaN when
  the region is missing: missing is counted, never 0), ``present`` and ``expected``
  (``False`` for a sex-specific region in the other sex);
- ``masks/failures.csv``: scans that could not be processed, with the stage and reason;
- ``masks/notes.csv``: what was done to particular scans (resampling, overlaps, odd
  orientation);
- ``masks/run.json``: provenance of the step.

**Resume.** Every mask is written atomically and stamped (NIfTI ``descrip``) with a
fingerprint of the configuration (source, tasks, ``--fast``, channels, label table); a
small record per scan (``masks/.segment/<scan id>.json``, written after the mask) keeps
its voxel counts. A scan whose record and mask match the current fingerprint is skipped,
so a killed run started again redoes only unfinished scans, and the tables at the end
are the same. Masks made otherwise (by ``simulate``, another import, other tasks) are
replaced; the summary says how many.

**Scale.** Under ``torchrun --nproc_per_node N`` the scans are split by rank
(:func:`bodyage.distributed.shard`); each rank writes only its scans' masks and records,
then all ranks meet at a ``torch.distributed`` barrier (gloo backend, no GPU needed, a
timeout of days since shards finish at different times), after which rank 0 merges the
per-scan records into the tables. The merge reads only the records, so a run whose ranks
all finished but whose merge was lost is completed by running the command again.

**Failures.** A scan that fails (an unreadable or normalised image, a mask that does not
fit its image, an unknown label, a TotalSegmentator error) is listed in
``failures.csv`` and the others go on; at the end, if any scan failed, the step raises
:class:`~bodyage.errors.SegmentationError` (exit code 1) naming the first failure, after
writing every table. Problems that concern every scan (missing weights, no licence, bad
options) stop the step before any scan is touched. If TotalSegmentator fails on the
first :data:`ABORT_AFTER` scans in a row, the step stops (a systematic problem).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from bodyage._typing import SEGMENT_TASKS, SegmentTask
from bodyage.errors import InputError, SegmentationError, StudyError, WeightsMissingError
from bodyage.progress import NO_PROGRESS, Progress
from bodyage.regions import (
    ORGAN_TASK,
    REGION_GROUPS,
    SEX_SPECIFIC_REGIONS,
    TISSUE_TASK,
    LabelTable,
    combined_label_table,
    group_of,
    totalsegmentator_class_map,
)
from bodyage.study import COHORT_FILE, DEFAULT_CHANNELS, LABELS_FILE, Study, load_study, write_cohort

log = logging.getLogger("bodyage.segment")

#: folder of the masks and of the step's tables, inside the study
MASKS_DIR = "masks"
QC_FILE = "qc.csv"
FAILURES_FILE = "failures.csv"
NOTES_FILE = "notes.csv"
RUN_FILE = "run.json"
#: per-scan records (voxel counts, notes, failures) the merge reads
STATE_DIR = ".segment"
#: stop when TotalSegmentator fails on this many scans in a row before any success
ABORT_AFTER = 3
#: an image whose largest absolute intensity is at most this looks normalised ([0, 1])
NORMALISED_MAX = 2.0
#: columns of masks/qc.csv
QC_COLUMNS = (
    "subject_id",
    "visit",
    "scan_id",
    "region",
    "label",
    "group",
    "expected",
    "present",
    "n_voxels",
    "volume_ml",
)
FAILURE_COLUMNS = ("subject_id", "visit", "scan_id", "stage", "reason")
NOTE_COLUMNS = ("subject_id", "visit", "scan_id", "note")


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SegmentConfig:
    """What makes a mask: an import folder, or TotalSegmentator tasks with their channels.

    Attributes
    ----------
    source
        Folder to import masks from (``None``: run TotalSegmentator).
    tasks
        TotalSegmentator tasks (empty for an import).
    fast
        TotalSegmentator's lower-resolution models.
    channels
        ``{task: image channel}`` fed to each task.
    """

    source: Path | None = None
    tasks: tuple[SegmentTask, ...] = ()
    fast: bool = False
    channels: Mapping[str, str] = field(default_factory=dict)

    @property
    def imports(self) -> bool:
        """Whether masks are imported rather than made."""
        return self.source is not None

    def describe(self) -> dict[str, Any]:
        """The configuration as recorded (and hashed into the fingerprint)."""
        if self.source is not None:
            return {"source": "import", "from": str(self.source.resolve())}
        return {
            "source": "totalsegmentator",
            "tasks": list(self.tasks),
            "fast": self.fast,
            "channels": dict(sorted(self.channels.items())),
        }

    def fingerprint(self, labels: LabelTable) -> str:
        """A short hash of :meth:`describe` and the label table: masks made alike share it."""
        blob = json.dumps({**self.describe(), "labels": labels.to_json_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def parse_channel_options(values: Sequence[str] | None) -> dict[str, str]:
    """Parse ``--channel TASK=CHANNEL`` options into ``{task: channel}``.

    Raises
    ------
    InputError
        For a malformed value, an unknown task or a task given twice.
    """
    out: dict[str, str] = {}
    for value in values or ():
        task, sep, channel = value.partition("=")
        task, channel = task.strip(), channel.strip()
        if not sep or not task or not channel:
            raise InputError(f"--channel must look like TASK=CHANNEL (e.g. total_mr=water); got {value!r}")
        if task not in SEGMENT_TASKS:
            raise InputError(f"--channel {value}: task must be one of {', '.join(SEGMENT_TASKS)}; got {task!r}")
        if task in out:
            raise InputError(f"--channel given twice for task {task}")
        out[task] = channel
    return out


def build_config(
    *,
    tasks: Sequence[str] | None,
    fast: bool,
    source: str | os.PathLike[str] | None,
    channels: Mapping[str, str] | None,
    ts_options: Mapping[str, object],
) -> SegmentConfig:
    """Validate the options of :func:`segment_study` into a :class:`SegmentConfig`.

    Parameters
    ----------
    ts_options
        Options that only make sense when running TotalSegmentator (``device``,
        ``license``, ``weights``), by name; any not ``None`` with ``source`` is an error.

    Raises
    ------
    InputError
        For unknown or repeated tasks, channels for tasks not run, a missing import
        folder, or TotalSegmentator options given with ``source``.
    """
    from bodyage.totalseg import require_totalsegmentator, task_spec

    chosen = parse_channel_options([f"{t}={c}" for t, c in (channels or {}).items()])
    if source is not None:
        given = [f"--{name}" for name, v in ts_options.items() if v is not None]
        if tasks:
            given.insert(0, "--task")
        if fast:
            given.append("--fast")
        if chosen:
            given.append("--channel")
        if given:
            raise InputError(
                f"--from imports existing masks; {', '.join(given)} only apply when running TotalSegmentator"
            )
        folder = Path(source)
        if not folder.is_dir():
            raise InputError(f"--from {folder}: folder not found")
        return SegmentConfig(source=folder)
    require_totalsegmentator()
    run = list(tasks) if tasks else ["total_mr"]
    for t in run:
        task_spec(t)
    dup = sorted({t for t in run if run.count(t) > 1})
    if dup:
        raise InputError(f"--task {dup[0]} given twice")
    ordered = tuple(t for t in SEGMENT_TASKS if t in run)  # organs first: a fixed order
    extra = sorted(set(chosen) - set(ordered))
    if extra:
        raise InputError(f"--channel {extra[0]}=...: task {extra[0]} is not run (add --task {extra[0]})")
    if fast and not any(task_spec(t).has_fast for t in ordered):
        raise InputError(f"--fast: task {', '.join(ordered)} has no fast model in TotalSegmentator")
    resolved: dict[str, str] = {t: chosen.get(t, task_spec(t).default_channel) for t in ordered}
    return SegmentConfig(tasks=ordered, fast=fast, channels=resolved)


def study_label_table(study: Study, config: SegmentConfig) -> LabelTable:
    """The label table masks are written in.

    ``labels.json`` is the authority when present; regions of the tasks to run that it
    lacks are added with their combined-map ids (docs/design.md §3) when those ids are free.

    Raises
    ------
    StudyError
        If a needed region's id is taken by another region in ``labels.json``.
    """
    from bodyage.totalseg import task_spec

    table = study.labels if study.labels is not None else combined_label_table()
    names = dict(table.names)
    for task in config.tasks:
        for ts_id, name in totalsegmentator_class_map(task).items():
            if name in table:
                continue
            want = ts_id + task_spec(task).id_offset
            if want in names:
                raise StudyError(
                    f"{study.root / LABELS_FILE}: region {name} of task {task} is missing and its id {want} "
                    f"is taken by {names[want]}; add {name} with a free id"
                )
            names[want] = name
    return LabelTable(names)


def region_family(name: str) -> str:
    """Which task a region belongs to (``total_mr``, ``tissue_types_mr`` or ``other``)."""
    for task in (ORGAN_TASK, TISSUE_TASK):
        if name in totalsegmentator_class_map(task).values():
            return task
    return "other"


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


def _read_json(path: Path) -> dict[str, Any] | None:
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
    rec = _read_json(paths.record(scan))
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


def _write_record(paths: StudyPaths, scan: str, record: Mapping[str, Any]) -> None:
    from bodyage.atomic import write_json

    write_json(paths.record(scan), dict(record))
    paths.failure(scan).unlink(missing_ok=True)


def _write_failure(paths: StudyPaths, scan: str, fingerprint: str, stage: str, reason: str) -> None:
    from bodyage.atomic import write_json

    reason = reason.removeprefix(f"scan {scan}: ")  # the table names the scan already
    write_json(paths.failure(scan), {"scan_id": scan, "fingerprint": fingerprint, "stage": stage, "reason": reason})


def _remove_stale_temporaries(paths: StudyPaths, scans: Sequence[str]) -> int:
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


@dataclass
class _Outcome:
    record: dict[str, Any] | None = None
    stage: str = ""
    reason: str = ""


class _ScanFailed(Exception):
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
        raise _ScanFailed("import", f"both {single} and {folder}/ exist; keep one layout per scan")
    if single.is_file():
        return single
    if folder.is_dir():
        return folder
    raise _ScanFailed("import", f"no mask in {source} (looked for {single.name} and {scan}/<region>.nii.gz)")


def _import_scan(
    row: pd.Series,
    study: Study,
    paths: StudyPaths,
    table: LabelTable,
    config: SegmentConfig,
    fingerprint: str,
) -> dict[str, Any]:
    from bodyage.masks import align_to_image, grid_of, label_dtype, read_multilabel, read_region_folder, write_mask

    assert config.source is not None
    scan = str(row["scan_id"])
    src = _locate_import(config.source, scan)
    image_path = study.path(row[study.channels[0]])
    try:
        image = grid_of(image_path)
    except InputError as err:
        raise _ScanFailed("image", str(err)) from err
    tissue_ids = frozenset(i for i, n in table.names.items() if region_family(n) == TISSUE_TASK)
    try:
        if src.is_dir():
            mask, notes = read_region_folder(src, table, scan=scan, tissue_ids=tissue_ids)
        else:
            mask, notes = read_multilabel(src, table, scan=scan)
        aligned = align_to_image(mask, image, scan=scan, source=str(src))
    except InputError as err:
        raise _ScanFailed("import", str(err)) from err
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


def _segment_scan(
    row: pd.Series,
    study: Study,
    paths: StudyPaths,
    table: LabelTable,
    config: SegmentConfig,
    fingerprint: str,
    session: Callable[[], Any],
) -> dict[str, Any]:
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
            raise _ScanFailed("image", str(err)) from err
    ref = volumes[reference]
    for ch, vol in volumes.items():
        if not same_grid(vol, ref):
            raise _ScanFailed(
                "image",
                f"the {ch} image is on grid {vol.shape} and the {reference} image on {ref.shape}; they must match",
            )
    for task, ch in config.channels.items():
        try:
            check_raw_intensities(volumes[ch].data, what=f"the {ch} image {study.path(row[ch])} (fed to {task})")
        except InputError as err:
            raise _ScanFailed("image", str(err)) from err
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
            raise _ScanFailed("totalsegmentator", f"task {task}: {type(err).__name__}: {err}") from err
        mapping = {i: table.id_of(n) for i, n in totalsegmentator_class_map(task).items()}
        maps[task] = relabel(ts_labels, mapping, dtype, what=f"scan {scan}: TotalSegmentator {task} output")
    combined = combine_label_maps(maps.get(ORGAN_TASK), maps.get(TISSUE_TASK), dtype)
    out = write_mask(paths.mask(scan), combined, ref, study.path(row[reference]), fingerprint=fingerprint, dtype=dtype)
    return _record(scan, fingerprint, combined, ref.spacing, out, table.max_id + 1, notes)


def _recover_record(
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


# ---------------------------------------------------------------- ranks


@contextmanager
def rank_group(world: Any) -> Iterator[Any]:
    """Join the torchrun process group (gloo) for the final barrier; no-op on one process.

    Yields a callable that blocks until every rank has called it. The group is created
    only if none exists (a caller's own group is used and left alone) and destroyed on
    exit.
    """
    if not world.distributed:
        yield lambda: None
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    already = sys.modules.get("torch.distributed")
    if missing and not (already is not None and already.is_initialized()):
        raise InputError(
            f"WORLD_SIZE={world.world_size} but {', '.join(missing)} is not set: start the ranks with torchrun"
        )
    import datetime

    import torch.distributed as dist

    if not dist.is_available():  # pragma: no cover - CPU builds have gloo
        raise InputError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    created = False
    if not dist.is_initialized():
        # shards finish hours apart: the barrier must wait that long
        dist.init_process_group(backend="gloo", timeout=datetime.timedelta(days=7))
        created = True
    try:
        yield dist.barrier
    finally:
        if created:
            dist.destroy_process_group()


# ---------------------------------------------------------------- merging the tables


@dataclass(frozen=True)
class SegmentSummary:
    """What :func:`segment_study` did.

    Attributes
    ----------
    study
        The study folder.
    n_scans
        Scans in the cohort (rank 0) or in this rank's shard (other ranks).
    n_new, n_skipped, n_failed
        Scans segmented or imported now, already done, failed (this process).
    n_replaced
        Masks made by another configuration that were replaced.
    n_with_mask
        Scans of the cohort with a mask after the merge (rank 0).
    missing
        ``{group: number of scans}`` lacking at least one expected region of the group
        (rank 0; see :func:`missing_by_group`).
    absent
        Expected regions found in no scan (rank 0).
    n_notes
        Scans with a note (``notes.csv``).
    merged
        Whether this process wrote the tables (rank 0).
    qc_table, failures_table
        The tables written (rank 0).
    """

    study: Path
    n_scans: int
    n_new: int
    n_skipped: int
    n_failed: int
    n_replaced: int = 0
    n_with_mask: int = 0
    missing: Mapping[str, int] = field(default_factory=dict)
    absent: tuple[str, ...] = ()
    n_notes: int = 0
    merged: bool = False
    qc_table: Path | None = None
    failures_table: Path | None = None
    rank: int = 0

    def line(self) -> str:
        """One line for the terminal."""
        head = f"{self.n_scans} scans: {self.n_new} new, {self.n_skipped} already done, {self.n_failed} failed" + (
            f", {self.n_replaced} older masks replaced" if self.n_replaced else ""
        )
        if not self.merged:
            return f"segment (rank {self.rank}): {head}; rank 0 writes the tables"
        if self.missing:
            top = sorted(self.missing.items(), key=lambda kv: (-kv[1], kv[0]))
            shown = ", ".join(f"{g} {n}" for g, n in top[:6]) + (", ..." if len(top) > 6 else "")
            lack = f"scans lacking a region: {shown}"
        else:
            lack = "no scan lacks a region the others have"
        if self.absent:
            shown = ", ".join(self.absent[:4]) + (", ..." if len(self.absent) > 4 else "")
            lack += f"; {len(self.absent)} regions in no scan ({shown})"
        notes = f"; {self.n_notes} scans with notes ({NOTES_FILE})" if self.n_notes else ""
        return f"segment: {head}; {lack}{notes}; tables in {self.study / MASKS_DIR}"


def _expected_families(config: SegmentConfig, present_names: set[str]) -> set[str]:
    if not config.imports:
        return set(config.tasks)
    return {region_family(n) for n in present_names}


def qc_table(
    cohort: pd.DataFrame,
    records: Mapping[str, Mapping[str, Any]],
    table: LabelTable,
    families: set[str],
) -> pd.DataFrame:
    """Build ``masks/qc.csv``: one row per scan with a mask × expected region.

    Vectorised: the voxel counts of all scans form one matrix; absent regions get NaN
    ``n_voxels`` and ``volume_ml`` (missing is not zero) and ``present = False``;
    ``expected`` is ``False`` for a sex-specific region in the other sex.

    Parameters
    ----------
    cohort
        The cohort (``scan_id``, ``subject_id``, ``visit``, ``sex``).
    records
        ``{scan id: record}`` of the scans with a mask.
    table
        The label table.
    families
        Task families whose regions are expected (``total_mr``, ``tissue_types_mr``, ``other``).
    """
    regions = [n for n in table.regions if region_family(n) in families]
    ids = np.array([table.id_of(n) for n in regions], dtype=np.int64)
    done = cohort[cohort["scan_id"].isin(list(records))]
    n_scans, n_regions = len(done), len(regions)
    counts = np.zeros((n_scans, table.max_id + 1), dtype=np.float64)
    voxel_ml = np.zeros(n_scans)
    for i, scan in enumerate(done["scan_id"]):
        rec = records[scan]
        voxel_ml[i] = float(rec["voxel_ml"])
        for k, v in rec["counts"].items():
            if int(k) <= table.max_id:
                counts[i, int(k)] = v
    c = counts[:, ids] if n_regions else np.zeros((n_scans, 0))
    present = c > 0
    n_vox = np.where(present, c, np.nan)
    sex = done["sex"].to_numpy()
    expected = np.ones((n_scans, n_regions), dtype=bool)
    for j, name in enumerate(regions):
        if name in SEX_SPECIFIC_REGIONS:
            expected[:, j] = sex == SEX_SPECIFIC_REGIONS[name]
    return pd.DataFrame(
        {
            "subject_id": np.repeat(done["subject_id"].to_numpy(), n_regions),
            "visit": np.repeat(done["visit"].to_numpy(), n_regions),
            "scan_id": np.repeat(done["scan_id"].to_numpy(), n_regions),
            "region": np.tile(np.asarray(regions, dtype=object), n_scans),
            "label": np.tile(ids, n_scans),
            "group": np.tile(np.asarray([group_of(n) for n in regions], dtype=object), n_scans),
            "expected": expected.ravel(),
            "present": present.ravel(),
            "n_voxels": n_vox.ravel(),
            "volume_ml": (n_vox * voxel_ml[:, None]).ravel(),
        },
        columns=list(QC_COLUMNS),
    )


def never_found(qc: pd.DataFrame) -> list[str]:
    """Expected regions present in no scan at all (outside the field of view, or never segmented)."""
    expected = qc[qc["expected"]]
    found = expected.groupby("region", sort=False)["present"].any()
    return [str(r) for r, f in found.items() if not f]


def missing_by_group(qc: pd.DataFrame) -> dict[str, int]:
    """``{group: scans}`` lacking at least one expected region of the group.

    Regions found in no scan are left out (see :func:`never_found`): they say what the
    protocol covers, not which scans are short of it. Groups are the largest of
    :data:`bodyage.regions.REGION_GROUPS` a region belongs to (``kidney``, ``gluteus``),
    else the region itself.
    """
    absent = set(never_found(qc))
    lacking = qc[qc["expected"] & ~qc["present"] & ~qc["region"].isin(absent)]
    if lacking.empty:
        return {}
    named = lacking.assign(group=lacking["region"].map(_coarse_group))
    per = named.drop_duplicates(["scan_id", "group"]).groupby("group").size()
    return {str(k): int(v) for k, v in per.items()}


def _coarse_group(name: str) -> str:
    """The largest registry group a region belongs to (``kidney``, ``gluteus``; itself if none)."""
    best: str | None = None
    for group, members in REGION_GROUPS.items():
        if name in members and (best is None or len(members) > len(REGION_GROUPS[best])):
            best = group
    return best if best is not None else name


def merge_outputs(
    root: str | os.PathLike[str],
    config: SegmentConfig,
    table: LabelTable,
    fingerprint: str,
    *,
    channels: Sequence[str] = DEFAULT_CHANNELS,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, dict[str, Any]]]:
    """Merge the per-scan records into ``cohort.csv``, ``labels.json`` and the tables.

    Any process can run it once every rank has finished (it reads only files). Scans with
    neither a current record nor a failure record are listed as failures ("not
    processed"), never dropped.

    Returns
    -------
    (qc, failures, notes, records)
    """
    paths = StudyPaths(Path(root))
    study = load_study(paths.root, channels=channels)
    cohort = study.cohort
    records: dict[str, dict[str, Any]] = {}
    fail_rows: list[dict[str, Any]] = []
    note_rows: list[dict[str, Any]] = []
    for sid, subject, visit in zip(cohort["scan_id"], cohort["subject_id"], cohort["visit"], strict=True):
        rec = finished_record(paths, sid, fingerprint)
        if rec is not None:
            records[sid] = rec
            note_rows.extend({"subject_id": subject, "visit": visit, "scan_id": sid, "note": n} for n in rec["notes"])
            continue
        failed = _read_json(paths.failure(sid))
        if failed is not None and failed.get("fingerprint") == fingerprint:
            stage, reason = str(failed["stage"]), str(failed["reason"])
        else:
            stage, reason = "merge", "not processed (a rank stopped before reaching it?); run the command again"
        fail_rows.append({"subject_id": subject, "visit": visit, "scan_id": sid, "stage": stage, "reason": reason})

    present = {table.names[int(k)] for r in records.values() for k in r["counts"] if int(k) in table.names}
    qc = qc_table(cohort, records, table, _expected_families(config, present))
    failures = pd.DataFrame(fail_rows, columns=list(FAILURE_COLUMNS))
    notes = pd.DataFrame(note_rows, columns=list(NOTE_COLUMNS))

    from bodyage.atomic import write_with

    table.write(paths.root / LABELS_FILE)
    updated = cohort.copy()
    mask_col = [paths.mask_rel(s) if s in records else np.nan for s in updated["scan_id"]]
    if "mask" in updated.columns:
        updated["mask"] = mask_col
    else:
        after = max(list(updated.columns).index(c) for c in study.channels)
        updated.insert(after + 1, "mask", mask_col)
    write_cohort(updated, paths.root / COHORT_FILE)
    write_with(paths.masks / QC_FILE, lambda p: qc.to_csv(p, index=False))  # full precision: volumes round-trip
    write_with(paths.masks / FAILURES_FILE, lambda p: failures.to_csv(p, index=False))
    write_with(paths.masks / NOTES_FILE, lambda p: notes.to_csv(p, index=False))
    return qc, failures, notes, records


# ---------------------------------------------------------------- the step


def segment_study(
    study: str | os.PathLike[str],
    *,
    tasks: Sequence[str] | None = None,
    device: str | None = None,
    fast: bool = False,
    source: str | os.PathLike[str] | None = None,
    license_key: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    channels: Mapping[str, str] | None = None,
    progress: Progress = NO_PROGRESS,
) -> SegmentSummary:
    """Make (or import) one mask per scan and write the study's mask tables.

    Parameters
    ----------
    study
        Study folder (docs/design.md §3).
    tasks
        TotalSegmentator tasks (default ``["total_mr"]``); ``tissue_types_mr`` needs a licence.
    device
        ``auto`` (a GPU if one is visible), ``cpu`` or ``cuda`` (``gpu`` is accepted for
        ``cuda``; default ``auto``).
    fast
        TotalSegmentator's 3 mm models where a task has one (``total_mr``).
    source
        Import masks from this folder instead of running TotalSegmentator:
        ``<scan id>.nii.gz`` (multilabel) or ``<scan id>/<region>.nii.gz`` per scan.
    license_key
        TotalSegmentator licence (``aca_...``) for ``tissue_types_mr``; default: the one
        in the user's TotalSegmentator config.
    weights
        Folder of TotalSegmentator weights (default ``TOTALSEG_WEIGHTS_PATH``, else
        ``~/.totalsegmentator/nnunet/results``); only read.
    channels
        ``{task: channel}`` image fed to each task (defaults: ``total_mr`` water,
        ``tissue_types_mr`` fat).
    progress
        Progress display.

    Returns
    -------
    SegmentSummary

    Raises
    ------
    InputError
        Bad options, a missing channel column or licence.
    WeightsMissingError
        A task's weights are missing or incomplete (before any scan is touched).
    StudyError
        The study is missing or inconsistent.
    SegmentationError
        Some scans failed (after every table is written; reasons in ``failures.csv``),
        or TotalSegmentator failed on the first scans in a row.
    """
    from bodyage.device import normalize_device
    from bodyage.distributed import shard, world_info
    from bodyage.provenance import build_run_record, finish_run_record, write_record
    from bodyage.totalseg import (
        TotalSegmentatorSession,
        check_license,
        check_weights,
        default_weights_dir,
        resolve_device,
        resolve_license,
        version_info,
    )

    if device is not None:
        normalize_device(device)  # a bad value fails before anything else, --from included
    config = build_config(
        tasks=tasks,
        fast=fast,
        source=source,
        channels=channels,
        ts_options={"device": device, "license": license_key, "weights": weights},
    )
    root = Path(study)
    world = world_info()
    columns = _cohort_columns(root)
    wanted = list(dict.fromkeys([*DEFAULT_CHANNELS, *config.channels.values()]))
    absent = [c for c in config.channels.values() if columns is not None and c not in columns]
    if absent:
        task = next(t for t, c in config.channels.items() if c == absent[0])
        raise InputError(
            f"--channel {task}={absent[0]}: {root / COHORT_FILE} has no column {absent[0]!r} "
            f"(image columns: {', '.join(c for c in DEFAULT_CHANNELS if c in (columns or []))})"
        )
    st = load_study(root, channels=wanted)
    table = study_label_table(st, config)
    fingerprint = config.fingerprint(table)
    paths = StudyPaths(root)

    extra: dict[str, Any] = {"fingerprint": fingerprint, "config": config.describe(), "world_size": world.world_size}
    session_args: dict[str, Any] = {}
    if not config.imports:
        key = resolve_license(license_key)
        check_license(config.tasks, key)
        wdir = Path(weights) if weights is not None else default_weights_dir()
        if weights is not None and not wdir.is_dir():
            raise InputError(f"--weights {wdir}: folder not found")
        found = check_weights(config.tasks, fast=config.fast, weights_dir=wdir)
        dev = resolve_device(device or "auto", world.local_rank)
        extra.update(version_info(found, wdir), device=dev, license="set" if key else None)
        session_args = {"fast": config.fast, "device": dev, "weights_dir": wdir, "license_key": key}

    record = build_run_record(
        "segment",
        {
            "study": root,
            "tasks": list(config.tasks),
            "device": device,
            "fast": config.fast,
            "source": config.source,
            "weights": weights,
            "channels": dict(config.channels),
        },
        inputs={"cohort": root / COHORT_FILE},
        extra=extra,
    )
    paths.masks.mkdir(parents=True, exist_ok=True)
    paths.state.mkdir(parents=True, exist_ok=True)
    rows = shard(list(range(len(st.cohort))), world)
    mine = [st.cohort.iloc[i] for i in rows]
    _remove_stale_temporaries(paths, [str(r["scan_id"]) for r in mine])

    n_new = n_skipped = n_failed = n_replaced = 0
    with rank_group(world) as barrier:
        bar = progress.task("import masks" if config.imports else "segment", len(mine))
        with ExitStack() as stack:
            sessions: list[Any] = []

            def session() -> Any:
                # started on the first scan that needs it: a finished run re-run only merges
                if not sessions:
                    sessions.append(stack.enter_context(TotalSegmentatorSession(config.tasks, **session_args)))
                return sessions[0]

            ts_failures_in_a_row = 0
            for row in mine:
                scan = str(row["scan_id"])
                if finished_record(paths, scan, fingerprint) is not None:
                    n_skipped += 1
                    bar.advance(skipped=n_skipped, failed=n_failed)
                    continue
                recovered = _recover_record(row, st, paths, table, fingerprint)
                if recovered is not None:
                    _write_record(paths, scan, recovered)
                    n_skipped += 1
                    bar.advance(skipped=n_skipped, failed=n_failed)
                    continue
                replacing = paths.mask(scan).exists()
                try:
                    if config.imports:
                        rec = _import_scan(row, st, paths, table, config, fingerprint)
                    else:
                        rec = _segment_scan(row, st, paths, table, config, fingerprint, session)
                except _ScanFailed as err:
                    n_failed += 1
                    _write_failure(paths, scan, fingerprint, err.stage, err.reason)
                    log.info("scan %s failed (%s): %s", scan, err.stage, err.reason)
                    if err.stage == "totalsegmentator" and n_new == 0:
                        ts_failures_in_a_row += 1
                        if ts_failures_in_a_row >= ABORT_AFTER:
                            raise SegmentationError(
                                f"TotalSegmentator failed on the first {ABORT_AFTER} scans; stopping "
                                f"(last: scan {scan}: {err.reason})"
                            ) from err
                else:
                    _write_record(paths, scan, rec)
                    n_new += 1
                    n_replaced += int(replacing)
                bar.advance(skipped=n_skipped, failed=n_failed)
        bar.close()
        barrier()

    if not world.is_main:
        return SegmentSummary(
            study=root,
            n_scans=len(mine),
            n_new=n_new,
            n_skipped=n_skipped,
            n_failed=n_failed,
            n_replaced=n_replaced,
            rank=world.rank,
        )

    qc, failures, notes, records = merge_outputs(root, config, table, fingerprint, channels=wanted)
    missing = missing_by_group(qc)
    summary = SegmentSummary(
        study=root,
        n_scans=len(st.cohort),
        n_new=n_new,
        n_skipped=n_skipped,
        n_failed=len(failures),
        n_replaced=n_replaced,
        n_with_mask=len(records),
        missing=missing,
        absent=tuple(never_found(qc)),
        n_notes=int(notes["scan_id"].nunique()) if len(notes) else 0,
        merged=True,
        qc_table=paths.masks / QC_FILE,
        failures_table=paths.masks / FAILURES_FILE,
        rank=world.rank,
    )
    write_record(
        paths.masks / RUN_FILE,
        finish_run_record(
            record,
            n_scans=summary.n_scans,
            n_new=n_new,
            n_skipped=n_skipped,
            n_failed=summary.n_failed,
            n_with_mask=summary.n_with_mask,
            missing_by_group=missing,
            regions_in_no_scan=never_found(qc),
            labels=table.to_json_dict(),
        ),
    )
    if len(failures):
        first = failures.iloc[0]
        raise SegmentationError(
            f"{len(failures)} of {summary.n_scans} scans have no mask (first: scan {first['scan_id']}: "
            f"{first['reason']}); the other {summary.n_with_mask} are written; reasons in "
            f"{paths.masks / FAILURES_FILE}"
        )
    return summary


def _cohort_columns(root: Path) -> list[str] | None:
    try:
        return list(pd.read_csv(root / COHORT_FILE, nrows=0).columns)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return None  # load_study reports it
