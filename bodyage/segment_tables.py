"""Merging ``bodyage segment``'s per-scan records into the study's tables, and their QC.

:func:`merge_outputs` reads only the per-scan records (:mod:`bodyage.segment_scan`), so
any process can run it once every rank has finished; it writes ``cohort.csv`` (the
``mask`` column), ``labels.json`` and, in ``masks/``, ``qc.csv`` (:func:`qc_table`: per
scan × expected region, NaN where a region is missing, never 0), ``failures.csv`` and
``notes.csv``. :func:`never_found` and :func:`missing_by_group` summarise ``qc.csv`` by
the region groups of :data:`bodyage.regions.REGION_GROUPS`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bodyage.regions import REGION_GROUPS, SEX_SPECIFIC_REGIONS, LabelTable, group_of
from bodyage.segment_config import SegmentConfig, region_family
from bodyage.segment_scan import StudyPaths, finished_record, read_json
from bodyage.study import COHORT_FILE, DEFAULT_CHANNELS, LABELS_FILE, load_study, write_cohort

#: tables of the step, in ``STUDY/masks``
QC_FILE = "qc.csv"
FAILURES_FILE = "failures.csv"
NOTES_FILE = "notes.csv"
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
        failed = read_json(paths.failure(sid))
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
