"""The study folder (docs/design.md §3): ``cohort.csv``, ``labels.json``, images and masks.

This module reads and validates studies with pandas only (no nibabel, no torch), so the
statistics layer can use it. Image loading lives in :mod:`bodyage.volumes`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bodyage.errors import StudyError, quoted
from bodyage.regions import LabelTable

#: default image channels of a Dixon study (one path column each in cohort.csv)
DEFAULT_CHANNELS: tuple[str, ...] = ("water", "fat")
#: columns every cohort.csv must have
REQUIRED_COLUMNS: tuple[str, ...] = ("subject_id", "visit", "age", "sex", "site")
#: columns that are never phenotypes (channel path columns are added per study)
RESERVED_COLUMNS: tuple[str, ...] = (*REQUIRED_COLUMNS, "mask", "scan_id")
#: plausible range of ages in years
AGE_RANGE: tuple[float, float] = (0.0, 120.0)

#: visits are whole numbers in this range (inclusive)
VISIT_RANGE: tuple[int, int] = (0, 999_999)
#: longest subject id (a scan id names files: ``<subject_id>_<visit>_<channel>.nii.gz``)
MAX_ID_LENGTH = 64
#: characters a subject id may hold; it may not start with ``.`` or ``-``
ID_CHARACTERS = "letters A-Z and a-z, digits, '_', '-' and '.'"
_ID_CHAR = re.compile(r"[A-Za-z0-9_.\-]")

COHORT_FILE = "cohort.csv"
LABELS_FILE = "labels.json"
TRUTH_FILE = "truth.json"
STUDY_FILE = "study.json"


def id_problem(subject_id: str) -> str | None:
    """Say what makes ``subject_id`` unsafe as part of a file name, or ``None`` if it is safe.

    Scan ids name files and folders (``masks/<scan_id>.nii.gz``, ``--from DIR/<scan_id>``),
    so a subject id must not be able to leave its folder or confuse a shell: 1 to
    :data:`MAX_ID_LENGTH` characters among :data:`ID_CHARACTERS`, not starting with ``.``
    (``..``, hidden files) or ``-`` (read as an option).
    """
    if subject_id == "":
        return "is empty"
    if len(subject_id) > MAX_ID_LENGTH:
        return f"has {len(subject_id)} characters (at most {MAX_ID_LENGTH})"
    for ch in subject_id:
        if not _ID_CHAR.fullmatch(ch):
            return f"holds {ch!r}, which ids may not hold (allowed: {ID_CHARACTERS})"
    if subject_id[0] in ".-":
        return f"starts with {subject_id[0]!r} (ids may not start with '.' or '-')"
    return None


def scan_id(subject_id: str, visit: int) -> str:
    """Return the id that names a scan's files: ``<subject_id>_<visit>``."""
    return f"{subject_id}_{int(visit)}"


@dataclass(frozen=True)
class Study:
    """A loaded, validated study folder.

    Attributes
    ----------
    root
        The study folder.
    cohort
        ``cohort.csv`` with dtypes fixed (``subject_id``/``site`` str, ``visit`` int,
        ``age`` float) and a ``scan_id`` column added.
    labels
        The study's label table (``labels.json``), or ``None`` if the file is absent.
    channels
        Image channel names (path columns).
    """

    root: Path
    cohort: pd.DataFrame = field(repr=False)
    labels: LabelTable | None = field(repr=False)
    channels: tuple[str, ...] = DEFAULT_CHANNELS

    @property
    def has_truth(self) -> bool:
        """Whether the study is simulated (has ``truth.json``)."""
        return (self.root / TRUTH_FILE).is_file()

    @property
    def has_masks(self) -> bool:
        """Whether every scan has a mask path."""
        return "mask" in self.cohort and bool(self.cohort["mask"].notna().all())

    def path(self, relative: str | os.PathLike[str]) -> Path:
        """Resolve a path stored in ``cohort.csv`` (relative to the study folder)."""
        p = Path(relative)
        return p if p.is_absolute() else self.root / p

    def image_paths(self, row: pd.Series) -> dict[str, Path]:
        """Return ``{channel: path}`` for one cohort row."""
        return {c: self.path(row[c]) for c in self.channels}

    def phenotype_columns(self) -> list[str]:
        """Return the cohort columns that are phenotypes (everything not reserved)."""
        return phenotype_columns(self.cohort, self.channels)


def phenotype_columns(cohort: pd.DataFrame, channels: Sequence[str] = DEFAULT_CHANNELS) -> list[str]:
    """Return the columns of ``cohort`` that are not reserved (docs/design.md §4)."""
    reserved = set(RESERVED_COLUMNS) | set(channels)
    return [c for c in cohort.columns if c not in reserved]


def validate_cohort(
    cohort: pd.DataFrame,
    *,
    channels: Sequence[str] = DEFAULT_CHANNELS,
    source: str = COHORT_FILE,
) -> pd.DataFrame:
    """Check a cohort table and return it with normalised dtypes and a ``scan_id`` column.

    Raises
    ------
    StudyError
        Naming the column or scan at fault: missing columns, a subject id that breaks
        the id rules (:func:`id_problem`), a visit that is not a whole number in
        :data:`VISIT_RANGE`, missing or absurd ages, sexes other than F/M, duplicate
        (subject_id, visit) keys, missing channel paths. Lines are those of
        ``cohort.csv`` (the header is line 1).
    """
    missing = [c for c in (*REQUIRED_COLUMNS, *channels) if c not in cohort.columns]
    if missing:
        raise StudyError(f"{source}: missing column(s) {', '.join(missing)}")
    if cohort.empty:
        raise StudyError(f"{source}: no scans")
    df = cohort.copy()
    for pos, raw_id in enumerate(df["subject_id"]):
        text = "" if _missing(raw_id) else str(raw_id)
        problem = id_problem(text)
        if problem is not None:
            raise StudyError(f"{source}: line {pos + 2}: subject_id {quoted(text)} {problem}")
    df["subject_id"] = df["subject_id"].astype(str)
    df["site"] = df["site"].astype(str)
    df["visit"] = _visits(df["visit"], source)
    keys = [scan_id(s, v) for s, v in zip(df["subject_id"], df["visit"], strict=True)]
    df["scan_id"] = keys
    dup = df["scan_id"][df["scan_id"].duplicated()]
    if len(dup):
        raise StudyError(f"{source}: duplicate scan key (subject_id, visit) for scan {dup.iloc[0]}")
    age = pd.to_numeric(df["age"], errors="coerce")
    bad = df["scan_id"][age.isna()]
    if len(bad):
        raise StudyError(
            f"{source}: scan {bad.iloc[0]} has a missing or non-numeric age ({df.loc[bad.index[0], 'age']!r})"
        )
    lo, hi = AGE_RANGE
    absurd = df.index[(age < lo) | (age > hi)]
    if len(absurd):
        i = absurd[0]
        raise StudyError(
            f"{source}: scan {df.loc[i, 'scan_id']} has an absurd age {age[i]!r} (expected {lo:g}–{hi:g} years)"
        )
    df["age"] = age.astype(float)
    sex_bad = df.index[~df["sex"].isin(["F", "M"])]
    if len(sex_bad):
        i = sex_bad[0]
        raise StudyError(f"{source}: scan {df.loc[i, 'scan_id']} has sex {df.loc[i, 'sex']!r}, expected 'F' or 'M'")
    for c in channels:
        miss = df.index[df[c].isna() | (df[c].astype(str).str.len() == 0)]
        if len(miss):
            raise StudyError(f"{source}: scan {df.loc[miss[0], 'scan_id']} has no path in channel column {c!r}")
    return df


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _visits(column: pd.Series, source: str) -> pd.Series:
    """The visit column as int64; a non-integer, missing or out-of-range visit raises."""
    lo, hi = VISIT_RANGE
    number = pd.to_numeric(column, errors="coerce").astype(float)
    whole = number.notna() & (number == number.round()) & number.between(lo, hi)
    if not whole.all():
        pos = int((~whole).to_numpy().argmax())
        value = column.iloc[pos]
        if _missing(value):
            raise StudyError(f"{source}: line {pos + 2}: visit is missing")
        value = value.item() if hasattr(value, "item") else value  # numpy scalar -> plain repr
        raise StudyError(f"{source}: line {pos + 2}: visit {quoted(value)} is not a whole number from {lo} to {hi}")
    return number.astype("int64")


def load_study(root: str | os.PathLike[str], *, channels: Sequence[str] = DEFAULT_CHANNELS) -> Study:
    """Load and validate a study folder.

    Raises
    ------
    StudyError
        If the folder or ``cohort.csv`` is missing, or the cohort fails :func:`validate_cohort`.
    """
    folder = Path(root)
    if not folder.is_dir():
        raise StudyError(f"{folder}: study folder not found")
    csv = folder / COHORT_FILE
    if not csv.is_file():
        raise StudyError(f"{csv}: cohort table not found (is {folder} a study folder?)")
    try:
        raw = pd.read_csv(csv, dtype={"subject_id": str, "site": str})
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise StudyError(f"{csv}: cannot be parsed as CSV ({err})") from err
    cohort = validate_cohort(raw, channels=channels, source=str(csv))
    labels_path = folder / LABELS_FILE
    labels = LabelTable.from_json(labels_path) if labels_path.is_file() else None
    return Study(root=folder, cohort=cohort, labels=labels, channels=tuple(channels))


def write_cohort(cohort: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``cohort.csv`` atomically, without the derived ``scan_id`` column."""
    from bodyage.atomic import write_with

    out = cohort.drop(columns=["scan_id"], errors="ignore")
    return write_with(path, lambda tmp: out.to_csv(tmp, index=False, float_format="%.6g"))
