"""Build a study folder (docs/design.md §3) from a UK Biobank export and a folder of NIfTIs.

:func:`build_ukb_study` is what ``bodyage cohort ukb`` calls. It

1. finds the scans: files under ``--images`` whose relative path matches ``--pattern``
   (placeholders ``{eid}``, ``{instance}``, ``{channel}``; ``*`` matches any run of
   characters within a folder name), grouped per (eid, instance);
2. reads age, sex, centre, BMI and the ``--field`` phenotypes of those participants from
   the export (:mod:`bodyage.ukb`: only the columns needed, in chunks);
3. checks every scan — a participant id that is safe in file names (the id rules of
   :func:`bodyage.study.id_problem`), all channels present, the participant's export row
   well formed (as many fields as the header), the participant in the export with an age
   and a sex, each file a readable 3D NIfTI (data decompressed unless ``read_data`` is
   off), a finite non-singular affine with voxel sizes in a plausible range, the channels
   on the same grid once reoriented to RAS+ — and lists each scan that fails a check in
   ``failures.csv`` with the reason (the first check it failed) and a detail naming the
   file, never dropping one silently;
4. writes ``cohort.csv`` (validated by :func:`bodyage.study.validate_cohort`),
   ``images.csv`` (grid, voxel size and on-disk orientation of each kept scan),
   ``failures.csv``, ``labels.json`` (the combined TotalSegmentator table, for
   ``segment``) and ``study.json`` (provenance, written last: its presence marks a
   finished build).

Images are not copied by default: ``images/<scan_id>_<channel>.nii.gz`` are symbolic
links to the source files (``images_as="link"``), so the study has the layout every
command expects at no cost in disk space (40,000 scans × 2 channels × ~15 MB of
compressed NIfTI would be over a terabyte of copies). ``images_as="path"`` stores
absolute source paths in ``cohort.csv`` instead (for file systems without symlinks),
``"copy"`` copies the files (a study that travels on its own).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bodyage._typing import IMAGES_AS, ImagesAs
from bodyage.errors import BodyageWarning, InputError, StudyError, quoted
from bodyage.progress import NO_PROGRESS, Progress
from bodyage.scanfiles import (
    DEFAULT_PATTERN,
    DEFAULT_SPACING_RANGE_MM,
    IMAGE_REJECT_REASONS,
    ImageCheck,
    check_scan_images,
    compile_pattern,
    find_images,
    parse_channels,
    parse_instances,
)
from bodyage.study import (
    COHORT_FILE,
    LABELS_FILE,
    STUDY_FILE,
    id_problem,
    scan_id,
    validate_cohort,
    write_cohort,
)
from bodyage.ukb_fields import IMAGING_INSTANCES, FieldRequest, check_field_requests, parse_field_option, read_layout

#: the table of rejected scans
FAILURES_FILE = "failures.csv"
#: grid, voxel size and on-disk orientation of each kept scan
IMAGES_TABLE = "images.csv"
#: site name of scans whose export row has no assessment centre
UNKNOWN_SITE = "unknown"

#: why a scan is rejected (checked in this order; a scan is listed with the first it fails)
REJECT_REASONS: dict[str, str] = {
    "bad_id": "the participant id in the file name breaks the id rules (letters, digits, _ - .)",
    "missing_channel": "a channel file is absent",
    "bad_export_row": "the participant's export row has another number of fields than the header",
    "not_in_export": "the participant is not in the phenotype export",
    "missing_age": "no age at this instance (fields 21003 or 34/52/53)",
    "missing_sex": "no sex (field 31)",
    **IMAGE_REJECT_REASONS,
}
_OWN_ENTRIES = frozenset({FAILURES_FILE, IMAGES_TABLE, LABELS_FILE, COHORT_FILE, "images"})


# ----------------------------------------------------------------------------- building


@dataclass(frozen=True)
class CohortSummary:
    """What :func:`build_ukb_study` found and wrote (counts only: no participant ids).

    Attributes
    ----------
    study
        The study folder written.
    n_found
        Scans (eid, instance) of the instances asked for with at least one file.
    n_kept
        Scans in ``cohort.csv``.
    rejected
        ``{reason: scans}`` listed in ``failures.csv`` (keys of :data:`REJECT_REASONS`).
    n_subjects
        Participants with at least one kept scan.
    n_repeat_subjects
        Participants with two or more kept scans (repeat imaging).
    n_other_instance
        Files of instances not asked for (ignored).
    n_unmatched
        Files not matching the pattern (ignored).
    age_sources
        Kept scans by the source of their age (``fractional``, ``whole_years``, ``conflict``).
    n_unknown_site
        Kept scans whose centre is missing in the export (site ``unknown``).
    """

    study: Path
    n_found: int
    n_kept: int
    rejected: Mapping[str, int]
    n_subjects: int
    n_repeat_subjects: int
    n_other_instance: int = 0
    n_unmatched: int = 0
    age_sources: Mapping[str, int] = field(default_factory=dict)
    n_unknown_site: int = 0

    @property
    def n_rejected(self) -> int:
        """Scans listed in ``failures.csv``."""
        return int(sum(self.rejected.values()))


def _check_job(
    job: tuple[tuple[str, int], dict[str, str], bool, tuple[float, float]],
) -> tuple[tuple[str, int], ImageCheck]:
    key, paths, read_data, spacing = job
    return key, check_scan_images(paths, read_data=read_data, spacing_range_mm=spacing)


def _prepare_out(out: Path) -> None:
    """Refuse a finished study or a foreign folder; clear an unfinished build of ours."""
    if out.exists() and not out.is_dir():
        raise StudyError(f"{out}: exists and is not a folder; choose a new study folder")
    if not out.exists():
        return
    entries = {e.name for e in out.iterdir()}
    if not entries:
        return
    if STUDY_FILE in entries:
        raise StudyError(f"{out}: is already a study (has {STUDY_FILE}); choose a new study folder")
    foreign = sorted(entries - _OWN_ENTRIES)
    if foreign:
        raise StudyError(
            f"{out}: exists and holds files bodyage did not write ({', '.join(foreign[:3])}); "
            "choose a new or empty study folder"
        )
    # an unfinished build of ours (no study.json): start it again
    images = out / "images"
    if images.is_dir():
        shutil.rmtree(images)
    for name in entries - {"images"}:
        (out / name).unlink()


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in (".nii.gz", ".nii"):
        if name.endswith(s):
            return s
    return "".join(path.suffixes)


def _place(src: Path, dst: Path, how: ImagesAs) -> None:
    if how == "link":
        dst.symlink_to(src.resolve())
    else:
        from bodyage.atomic import atomic_path

        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)


def _natural_order(ids: pd.Series) -> pd.Series:
    digits = ids.str.fullmatch(r"\d+").fillna(False).all()
    return pd.to_numeric(ids) if digits else ids


def build_ukb_study(
    phenotypes: str | os.PathLike[str],
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    pattern: str = DEFAULT_PATTERN,
    fields: Iterable[FieldRequest | str] = (),
    instances: str | Iterable[int] = IMAGING_INSTANCES,
    channels: str | Mapping[str, str] | None = None,
    images_as: ImagesAs = "link",
    read_data: bool = True,
    spacing_range_mm: tuple[float, float] = DEFAULT_SPACING_RANGE_MM,
    workers: int = 1,
    chunksize: int = 50_000,
    progress: Progress = NO_PROGRESS,
) -> CohortSummary:
    """Build a checked study folder from a UK Biobank export and a folder of NIfTIs.

    Parameters
    ----------
    phenotypes
        The export (CSV or tab-separated, optionally compressed); see :mod:`bodyage.ukb`.
    images
        Folder of NIfTI volumes, one file per channel per scan.
    out
        Study folder to write: new, empty, or an unfinished build of this function.
    pattern
        File path relative to ``images`` with ``{eid}``, ``{instance}``, ``{channel}``.
    fields
        Extra phenotype columns (``--field`` strings or :class:`~bodyage.ukb_fields.FieldRequest`).
    instances
        UK Biobank instances to take scans from (2: imaging, 3: repeat imaging).
    channels
        File-name tokens of the channels (:func:`parse_channels`).
    images_as
        ``link`` (symlinks in ``STUDY/images``), ``path`` (absolute paths in
        ``cohort.csv``) or ``copy``.
    read_data
        Decompress every file while checking (finds truncated files); off: headers only.
    spacing_range_mm
        Plausible voxel sizes in mm.
    workers
        Processes checking images.
    chunksize
        Rows of the export read at a time.
    progress
        Progress display.

    Returns
    -------
    CohortSummary
        Counts of scans found, kept and rejected by reason.

    Raises
    ------
    InputError
        Bad options, a missing file or folder, an export without age/sex/centre, no
        file matching the pattern, or no scan passing the checks (``failures.csv`` is
        written first and says why).
    StudyError
        If ``out`` is a finished study or a folder holding other files.
    """
    from bodyage.provenance import build_run_record, finish_run_record, write_record
    from bodyage.regions import combined_label_table
    from bodyage.ukb import plan_columns, read_visits

    if images_as not in IMAGES_AS:
        raise InputError(f"images_as must be one of {', '.join(IMAGES_AS)}; got {images_as!r}")
    lo, hi = spacing_range_mm
    if not 0 < lo < hi:
        raise InputError(f"spacing range must satisfy 0 < min < max mm, got {lo:g}–{hi:g}")
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    insts = parse_instances(instances)
    requests = [f if isinstance(f, FieldRequest) else parse_field_option(f) for f in fields]
    check_field_requests(requests)
    tokens = parse_channels(channels)
    compiled = compile_pattern(pattern, tokens.values())
    images_dir = Path(images)
    if not images_dir.is_dir():
        raise InputError(f"{images_dir}: images folder not found")
    layout = read_layout(phenotypes)
    with warnings.catch_warnings():  # fail fast on bad fields; read_visits warns once below
        warnings.simplefilter("ignore", BodyageWarning)
        plan_columns(layout, insts, requests)
    root = Path(out)
    _prepare_out(root)
    record = build_run_record(
        "cohort ukb",
        {
            "phenotypes": str(phenotypes),
            "images": str(images_dir),
            "out": str(root),
            "pattern": compiled.text,
            "fields": [r.describe() for r in requests],
            "instances": list(insts),
            "channels": tokens,
            "images_as": images_as,
            "read_data": read_data,
            "spacing_range_mm": list(spacing_range_mm),
        },
        inputs={"phenotypes": layout.path, "images": images_dir},
    )

    task = progress.task("find images", None)
    inventory = find_images(images_dir, compiled, tokens, insts)
    task.advance(len(inventory.scans))
    task.close()
    if not inventory.scans:
        seen = f" (for example {inventory.unmatched_example!r})" if inventory.unmatched_example else ""
        other = (
            f"; {inventory.n_other_instance} match other instances than {insts}" if inventory.n_other_instance else ""
        )
        raise InputError(
            f"{images_dir}: no file matches --pattern {compiled.text!r} with channels "
            f"{', '.join(tokens.values())}{seen}{other}"
        )

    visits = read_visits(  # warns about malformed rows; those of imaged participants go to failures.csv
        layout,
        instances=insts,
        fields=requests,
        eids={eid for eid, _ in inventory.scans},
        chunksize=chunksize,
        progress=progress,
    )
    table = visits.table.set_index(["subject_id", "visit"])
    in_export = set(visits.table["subject_id"])
    bad_rows = {r.eid: r for r in visits.bad_rows if r.eid is not None and r.eid not in in_export}
    no_age = set(table.index[table["age"].isna()])
    no_sex = set(table.index[table["sex"].isna()])

    failures: list[dict[str, object]] = []
    to_check: list[tuple[str, int]] = []
    for key in sorted(inventory.scans):
        eid, inst = key
        chans = inventory.scans[key]
        sid = scan_id(eid, inst)

        def fail(reason: str, detail: str, eid: str = eid, inst: int = inst, sid: str = sid) -> None:
            failures.append({"scan_id": sid, "subject_id": eid, "visit": inst, "reason": reason, "detail": detail})

        missing = [c for c in tokens if c not in chans]
        problem = id_problem(eid)
        if problem is not None:
            fail("bad_id", f"participant id {quoted(eid)} {problem}")
        elif missing:
            present = ", ".join(p.name for p in chans.values())
            fail("missing_channel", f"no {' or '.join(missing)} file (found {present})")
        elif eid in bad_rows:
            row = bad_rows[eid]
            fail(
                "bad_export_row",
                f"line {row.line} of {layout.path.name} has {row.n_fields} fields, the header {layout.n_columns}",
            )
        elif eid not in in_export:
            fail("not_in_export", f"participant not in {layout.path.name}")
        elif key in no_age:
            fail("missing_age", f"no age at instance {inst} in {layout.path.name} (fields 21003, or 34, 52 and 53)")
        elif key in no_sex:
            fail("missing_sex", f"no sex in {layout.path.name} (field 31)")
        else:
            to_check.append(key)

    checks: dict[tuple[str, int], ImageCheck] = {}
    jobs = [
        (key, {c: str(inventory.scans[key][c]) for c in tokens}, read_data, tuple(spacing_range_mm)) for key in to_check
    ]
    task = progress.task("check images", len(jobs))
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            key, check = _check_job(job)  # type: ignore[arg-type]
            checks[key] = check
            task.advance()
    else:
        import multiprocessing as mp
        import sys

        method = "forkserver" if "torch" in sys.modules else "fork"
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method)) as pool:
            for key, check in pool.map(_check_job, jobs, chunksize=8):
                checks[key] = check
                task.advance()
    task.close()

    kept = [k for k in to_check if checks[k].ok]
    for key in to_check:
        chk = checks[key]
        if not chk.ok:
            failures.append(
                {
                    "scan_id": scan_id(*key),
                    "subject_id": key[0],
                    "visit": key[1],
                    "reason": chk.reason,
                    "detail": chk.detail,
                }
            )
    from bodyage.atomic import write_with

    root.mkdir(parents=True, exist_ok=True)
    fail_df = pd.DataFrame(failures, columns=["scan_id", "subject_id", "visit", "reason", "detail"])
    if len(fail_df):
        order = {r: i for i, r in enumerate(REJECT_REASONS)}
        fail_df = fail_df.sort_values(
            ["reason", "subject_id", "visit"], key=lambda s: s.map(order) if s.name == "reason" else s
        )
    write_with(root / FAILURES_FILE, lambda p: fail_df.to_csv(p, index=False))
    if not kept:
        raise InputError(
            f"none of the {len(inventory.scans)} scans found passed the checks; the reasons are in "
            f"{root / FAILURES_FILE}"
        )

    # the cohort table
    rows = table.loc[kept].reset_index()
    cohort = pd.DataFrame(
        {
            "subject_id": rows["subject_id"].astype(str),
            "visit": rows["visit"].astype(int),
            "age": rows["age"].astype(float),
            "sex": rows["sex"].astype(str),
            "site": rows["site"].astype(object).where(rows["site"].notna(), UNKNOWN_SITE).astype(str),
        }
    )
    verb = {"link": "link images", "copy": "copy images", "path": "record image paths"}[images_as]
    task = progress.task(verb, len(kept))
    if images_as != "path":
        (root / "images").mkdir(parents=True, exist_ok=True)
    paths: dict[str, list[str]] = {c: [] for c in tokens}
    for key in kept:
        for channel in tokens:
            src = inventory.scans[key][channel]
            if images_as == "path":
                paths[channel].append(str(src.resolve()))
                continue
            rel = f"images/{scan_id(*key)}_{channel}{_suffix(src)}"
            _place(src, root / rel, images_as)
            paths[channel].append(rel)
        task.advance()
    task.close()
    for channel in tokens:
        cohort[channel] = paths[channel]
    extra = [c for c in rows.columns if c not in ("subject_id", "visit", "age", "sex", "site", "age_source")]
    for c in extra:
        cohort[c] = rows[c].to_numpy()
    cohort = validate_cohort(cohort, channels=tuple(tokens), source=f"{root / COHORT_FILE} (being built)")
    cohort = cohort.assign(_order=_natural_order(cohort["subject_id"]))
    cohort = cohort.sort_values(["_order", "visit"]).drop(columns="_order").reset_index(drop=True)

    info = pd.DataFrame(
        {
            "scan_id": [scan_id(*k) for k in kept],
            "subject_id": [k[0] for k in kept],
            "visit": [k[1] for k in kept],
            "shape": ["x".join(map(str, checks[k].shape or ())) for k in kept],
            "spacing_x_mm": [(checks[k].spacing or (np.nan,) * 3)[0] for k in kept],
            "spacing_y_mm": [(checks[k].spacing or (np.nan,) * 3)[1] for k in kept],
            "spacing_z_mm": [(checks[k].spacing or (np.nan,) * 3)[2] for k in kept],
            **{f"{c}_orientation": [checks[k].orientation.get(c, "") for k in kept] for c in tokens},
            **{f"{c}_dtype": [checks[k].dtype.get(c, "") for k in kept] for c in tokens},
        }
    )
    info = info.set_index("scan_id").loc[cohort["scan_id"]].reset_index()
    write_with(root / IMAGES_TABLE, lambda p: info.to_csv(p, index=False, float_format="%.6g"))
    combined_label_table().write(root / LABELS_FILE)
    write_cohort(cohort, root / COHORT_FILE)

    per_subject = cohort.groupby("subject_id").size()
    kept_sources = rows["age_source"].value_counts()
    summary = CohortSummary(
        study=root,
        n_found=len(inventory.scans),
        n_kept=len(cohort),
        rejected=dict(Counter(str(r) for r in fail_df["reason"])),
        n_subjects=int(per_subject.size),
        n_repeat_subjects=int((per_subject >= 2).sum()),
        n_other_instance=inventory.n_other_instance,
        n_unmatched=inventory.n_unmatched,
        age_sources={str(k): int(v) for k, v in kept_sources.items()},
        n_unknown_site=int((cohort["site"] == UNKNOWN_SITE).sum()),
    )
    write_record(
        root / STUDY_FILE,
        finish_run_record(
            record,
            source="UK Biobank",
            n_found=summary.n_found,
            n_kept=summary.n_kept,
            rejected=summary.rejected,
            n_subjects=summary.n_subjects,
            n_repeat_subjects=summary.n_repeat_subjects,
            age_sources=summary.age_sources,
            instance_sources=visits.instance_sources,
            export_columns_read=list(visits.columns_read),
            export_columns=layout.n_columns,
        ),
    )
    return summary
