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
then all ranks meet at a ``torch.distributed`` barrier
(:func:`bodyage.distributed.rank_group`; gloo backend, no GPU needed, a timeout of days
since shards finish at different times), after which rank 0 merges the per-scan records
into the tables. The merge reads only the records, so a run whose ranks
all finished but whose merge was lost is completed by running the command again.

**Failures.** A scan that fails (an unreadable or normalised image, a mask that does not
fit its image, an unknown label, a TotalSegmentator error) is listed in
``failures.csv`` and the others go on; at the end, if any scan failed, the step raises
:class:`~bodyage.errors.SegmentationError` (exit code 1) naming the first failure, after
writing every table. Problems that concern every scan (missing weights, no licence, bad
options) stop the step before any scan is touched. If TotalSegmentator fails on the
first :data:`ABORT_AFTER` scans in a row, the step stops (a systematic problem).

This module holds the step itself (:func:`segment_study`, its :class:`SegmentSummary` and
the ranks' barrier); the configuration is in :mod:`bodyage.segment_config`, one scan's
mask and record in :mod:`bodyage.segment_scan`, and the merge into the tables in
:mod:`bodyage.segment_tables`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bodyage.distributed import rank_group as rank_group  # moved there; importable from here as before
from bodyage.errors import InputError, SegmentationError
from bodyage.progress import NO_PROGRESS, Progress
from bodyage.segment_config import build_config, study_label_table
from bodyage.segment_scan import (
    MASKS_DIR,
    ScanFailed,
    StudyPaths,
    finished_record,
    import_scan,
    recover_record,
    remove_stale_temporaries,
    segment_scan,
    write_scan_failure,
    write_scan_record,
)
from bodyage.segment_tables import FAILURES_FILE, NOTES_FILE, QC_FILE, merge_outputs, missing_by_group, never_found
from bodyage.study import COHORT_FILE, DEFAULT_CHANNELS, load_study

log = logging.getLogger("bodyage.segment")

#: the step's provenance, in ``STUDY/masks``
RUN_FILE = "run.json"
#: stop when TotalSegmentator fails on this many scans in a row before any success
ABORT_AFTER = 3


# ---------------------------------------------------------------- what the step did


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
        (rank 0; see :func:`~bodyage.segment_tables.missing_by_group`).
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
    remove_stale_temporaries(paths, [str(r["scan_id"]) for r in mine])

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
                recovered = recover_record(row, st, paths, table, fingerprint)
                if recovered is not None:
                    write_scan_record(paths, scan, recovered)
                    n_skipped += 1
                    bar.advance(skipped=n_skipped, failed=n_failed)
                    continue
                replacing = paths.mask(scan).exists()
                try:
                    if config.imports:
                        rec = import_scan(row, st, paths, table, config, fingerprint)
                    else:
                        rec = segment_scan(row, st, paths, table, config, fingerprint, session)
                except ScanFailed as err:
                    n_failed += 1
                    write_scan_failure(paths, scan, fingerprint, err.stage, err.reason)
                    log.info("scan %s failed (%s): %s", scan, err.stage, err.reason)
                    if err.stage == "totalsegmentator" and n_new == 0:
                        ts_failures_in_a_row += 1
                        if ts_failures_in_a_row >= ABORT_AFTER:
                            raise SegmentationError(
                                f"TotalSegmentator failed on the first {ABORT_AFTER} scans; stopping "
                                f"(last: scan {scan}: {err.reason})"
                            ) from err
                else:
                    write_scan_record(paths, scan, rec)
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
