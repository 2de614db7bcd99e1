"""Reading a UK Biobank phenotype export: only the columns needed, in chunks.

A UK Biobank export is a wide table, one row per participant (``eid``) and one column per
(field, instance, array) — thousands of columns and ~500,000 rows. The fields, the three
column-naming schemes (``ukbconv`` and Research Analysis Platform exports) and the header
are :mod:`bodyage.ukb_fields`.

:func:`~bodyage.ukb_fields.read_layout` reads only the header; :func:`read_visits` then
reads only the columns it needs in chunks of rows (:mod:`bodyage.exportrows`, which
checks that every row has the header's number of fields: a row that has not is left out
and reported, never read with shifted values), keeps only the participants asked for,
and turns each chunk into one row per (participant, instance) before the next is read,
so memory is bounded by the chunk size and the participants kept, not by the export.
UTF-8 with or without a byte-order mark, plain or ``.gz``/``.bz2``/``.xz``.

Conventions (each is a decision; see docs/guide/cohort.md):

- **Negative codes are missing.** UK Biobank codes "do not know" (-1), "prefer not to
  answer" (-3), "none of the above" (-7), "less than one" (-10), ... as negative
  integers. In the standard fields and, by default, in ``--field`` fields every negative
  number becomes missing; a ``--field`` with the ``signed`` option (``22009.1=pc1:signed``)
  keeps negative values (genetic principal components, z-scores).
- **Instances.** A value for a scan at instance *i* comes from the field's instance *i*.
  Fields that are asked only once (sex 31, birth year 34, birth month 52, and any
  ``--field`` without a column for instance *i*) fall back to the latest earlier
  instance the export has; each fall-back is reported (``instance_sources``) and warned
  about for ``--field`` fields. Visit-specific standard fields (age 21003, visit date 53,
  centre 54, BMI 21001) never fall back.
- **Age** in years as a float: from birth year 34, birth month 52 (birth taken as the
  middle of the month) and the visit date 53 when all three are present and agree with
  21003 (within 0.1 year of ``[21003, 21003 + 1)``); otherwise ``21003 + 0.5``, the
  expected age of someone whose age in whole years is 21003, so scans without dates are
  not biased half a year young against scans with them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bodyage.errors import BodyageWarning, InputError
from bodyage.exportrows import BadRow, bad_rows_message, read_chunks
from bodyage.progress import NO_PROGRESS, Progress
from bodyage.ukb_fields import (
    AGE_FIELD,
    BIRTH_MONTH_FIELD,
    BIRTH_YEAR_FIELD,
    BMI_FIELD,
    CENTRE_FIELD,
    IMAGING_INSTANCES,
    SEX_FIELD,
    STANDARD_FIELDS,
    UKB_CENTRES,
    UKB_SEX,
    VISIT_DATE_FIELD,
    ExportLayout,
    FieldRequest,
    check_field_requests,
    parse_column,
    parse_field_option,
    read_layout,
)

# ----------------------------------------------------------------------------- reading


def iter_export_chunks(
    layout: ExportLayout,
    usecols: Sequence[str],
    *,
    chunksize: int = 50_000,
    bad_rows: list[BadRow] | None = None,
) -> Iterator[pd.DataFrame]:
    """Yield chunks of rows of ``usecols`` (plus the eid column), indexed by line number.

    Every row's number of fields is checked against the header
    (:func:`bodyage.exportrows.read_chunks`); rows that differ go to ``bad_rows``, or,
    without it, the first one raises :class:`InputError` naming its line.
    """
    return read_chunks(
        layout.path,
        sep=layout.sep,
        n_columns=layout.n_columns,
        id_column=layout.eid_column,
        usecols=usecols,
        chunksize=chunksize,
        bad_rows=bad_rows,
    )


@dataclass(frozen=True)
class ExportVisits:
    """One row per (participant, requested instance), read from an export.

    Attributes
    ----------
    table
        Columns ``subject_id`` (str), ``visit`` (int), ``age`` (float, NaN if unknown),
        ``sex`` ("F"/"M"/NA), ``site`` (str/NA), ``bmi`` (float; absent if the export has
        no field 21001), then one column per :class:`FieldRequest`.
    n_participants
        Participants read (after the ``eids`` filter).
    age_sources
        Rows by where their age came from: ``fractional``, ``whole_years`` (21003 +
        0.5), ``conflict`` (fractional age disagreed with 21003; 21003 + 0.5 used),
        ``missing``.
    instance_sources
        ``{column: {visit: instance read}}`` wherever a field was read from an instance
        other than the visit's.
    columns_read
        The export columns read.
    bad_rows
        Rows left out because their number of fields differs from the header's (every
        such row, whatever ``eids`` says; their participants are not in ``table``).
    """

    table: pd.DataFrame = field(repr=False)
    n_participants: int
    age_sources: Mapping[str, int]
    instance_sources: Mapping[str, Mapping[int, int]]
    columns_read: tuple[str, ...] = field(repr=False)
    bad_rows: tuple[BadRow, ...] = ()


@dataclass(frozen=True)
class _Plan:
    """Which columns feed which output column at each visit."""

    columns: dict[tuple[str, int], list[str]]  # (output name, visit) -> export columns
    instance_sources: dict[str, dict[int, int]]
    has_bmi: bool

    @property
    def usecols(self) -> list[str]:
        out: list[str] = []
        for cols in self.columns.values():
            out.extend(c for c in cols if c not in out)
        return out


def plan_columns(layout: ExportLayout, instances: Sequence[int], requests: Sequence[FieldRequest]) -> _Plan:
    """Decide which export columns to read for each output column and visit.

    Raises
    ------
    InputError
        If a required standard field (age, sex, centre) or a requested field is absent,
        or a field with several array entries per instance has no reducer.
    """
    p = layout.path
    if not layout.has_field(AGE_FIELD) and not all(
        layout.has_field(f) for f in (BIRTH_YEAR_FIELD, BIRTH_MONTH_FIELD, VISIT_DATE_FIELD)
    ):
        raise InputError(
            f"{p}: no column for field {AGE_FIELD} (age at assessment) nor for all of fields {BIRTH_YEAR_FIELD}, "
            f"{BIRTH_MONTH_FIELD}, {VISIT_DATE_FIELD} (birth year, birth month, visit date); the export needs age"
        )
    for fid in (SEX_FIELD, CENTRE_FIELD):
        if not layout.has_field(fid):
            raise InputError(f"{p}: no column for field {fid} ({STANDARD_FIELDS[fid][1]}); add it to the export")
    columns: dict[tuple[str, int], list[str]] = {}
    sources: dict[str, dict[int, int]] = {}

    def take(out: str, fid: int, visit: int, *, fall_back: bool, array: int | None = 0) -> None:
        inst = layout.resolve_instance(fid, visit, fall_back=fall_back)
        if inst is None:
            columns[(out, visit)] = []
            return
        if inst != visit:
            sources.setdefault(out, {})[visit] = inst
        columns[(out, visit)] = layout.columns_for(fid, inst, array)

    for visit in instances:
        take("_age_years", AGE_FIELD, visit, fall_back=False)
        take("_birth_year", BIRTH_YEAR_FIELD, visit, fall_back=True)
        take("_birth_month", BIRTH_MONTH_FIELD, visit, fall_back=True)
        take("_visit_date", VISIT_DATE_FIELD, visit, fall_back=False)
        take("sex", SEX_FIELD, visit, fall_back=True)
        take("site", CENTRE_FIELD, visit, fall_back=False)
        if layout.has_field(BMI_FIELD):
            take("bmi", BMI_FIELD, visit, fall_back=False)
    for req in requests:
        if not layout.has_field(req.field):
            raise InputError(f"--field {req.describe()}: the export {p} has no column of field {req.field}")
        for visit in instances:
            take(req.name, req.field, visit, fall_back=True, array=req.array)
            cols = columns[(req.name, visit)]
            inst = layout.resolve_instance(req.field, visit, fall_back=True)
            if req.array is not None and not cols and inst is not None:
                raise InputError(
                    f"--field {req.describe()}: the export has no array {req.array} of field {req.field} "
                    f"at instance {inst}"
                )
            if len(cols) > 1 and req.reduce is None:
                raise InputError(
                    f"--field {req.describe()}: field {req.field} has {len(cols)} entries per instance "
                    f"({', '.join(cols[:3])}{', ...' if len(cols) > 3 else ''}); say how to combine them, e.g. "
                    f"{req.field}={req.name}:mean (first, mean, min, max, any=CODE,...) or pick one with "
                    f"{req.field}.{_array_of(cols[0])}={req.name}"
                )
        missing = [v for v in instances if not columns[(req.name, v)]]
        if missing:
            warnings.warn(
                f"field {req.field} ({req.name}) has no instance at or before visit(s) "
                f"{', '.join(map(str, missing))} in the export; those values are missing",
                BodyageWarning,
                stacklevel=3,
            )
        if sources.get(req.name):
            used = ", ".join(f"instance {i} for visit {v}" for v, i in sorted(sources[req.name].items()))
            warnings.warn(
                f"field {req.field} ({req.name}) has no column at some imaging instances; using {used}",
                BodyageWarning,
                stacklevel=3,
            )
    return _Plan(columns=columns, instance_sources=sources, has_bmi=layout.has_field(BMI_FIELD))


def _array_of(column: str) -> int:
    fc = parse_column(column)
    return fc.array if fc is not None else 0


def _numbers(frame: pd.DataFrame, cols: list[str], *, signed: bool, what: str) -> pd.DataFrame:
    """Parse string columns as floats; negative codes -> NaN unless ``signed``."""
    out = {}
    for c in cols:
        raw = frame[c]
        num = pd.to_numeric(raw, errors="coerce")
        bad = raw.notna() & num.isna()
        if bad.any():
            raise InputError(f"column {c} ({what}) holds {raw[bad].iloc[0]!r}, not a number")
        out[c] = num if signed else num.where(num >= 0)
    return pd.DataFrame(out, index=frame.index, dtype=float)


def _first(frame: pd.DataFrame, cols: list[str]) -> pd.Series:
    """First non-missing entry across ``cols`` (left to right)."""
    if not cols:
        return pd.Series(np.nan, index=frame.index, dtype=float)
    out = frame[cols[0]]
    for c in cols[1:]:
        out = out.where(out.notna(), frame[c])
    return out


def _decimal_year(dates: pd.Series) -> pd.Series:
    d = pd.to_datetime(dates, format="ISO8601", errors="coerce")
    days = np.where(d.dt.is_leap_year.fillna(False).to_numpy(dtype=bool), 366.0, 365.0)
    return d.dt.year + (d.dt.day_of_year - 0.5) / days


def _sex(chunk: pd.DataFrame, cols: list[str]) -> pd.Series:
    """Sex as "F"/"M"/NA from coding 9 (0/1) or from the labels Female/Male."""
    if not cols:
        return pd.Series(pd.NA, index=chunk.index, dtype="string")
    raw = _first(chunk, cols)
    labels = raw.astype("string").str.strip().str.lower().map({"female": "F", "male": "M"})
    codes = pd.to_numeric(raw, errors="coerce").map(UKB_SEX)
    bad = raw.notna() & labels.isna() & codes.isna() & (pd.to_numeric(raw, errors="coerce").fillna(0) >= 0)
    if bad.any():
        raise InputError(f"column {cols[0]} (sex) holds {raw[bad].iloc[0]!r}; expected 0/1 (coding 9) or Female/Male")
    return codes.where(codes.notna(), labels).astype("string")


def _site(chunk: pd.DataFrame, cols: list[str]) -> pd.Series:
    """Centre name from coding 10 (imaging centres named, others ``centre_<code>``) or a label."""
    if not cols:
        return pd.Series(pd.NA, index=chunk.index, dtype="string")
    raw = _first(chunk, cols).astype("string").str.strip()
    code = pd.to_numeric(raw, errors="coerce")
    code = code.where(code >= 0)
    named = code.map(UKB_CENTRES)
    other = "centre_" + code.astype("Int64").astype("string")
    out = named.where(named.notna(), other)
    is_label = raw.notna() & pd.to_numeric(raw, errors="coerce").isna()
    return out.where(~is_label, raw).astype("string")


def _derive_chunk(
    chunk: pd.DataFrame,
    eid_column: str,
    plan: _Plan,
    instances: Sequence[int],
    requests: Sequence[FieldRequest],
) -> pd.DataFrame:
    """Turn one chunk of the wide export into rows per (participant, visit)."""
    rows = []
    eids = chunk[eid_column].astype(str).str.strip()
    for visit in instances:

        def cols(name: str, v: int = visit) -> list[str]:
            return plan.columns[(name, v)]

        def number(name: str) -> pd.Series:
            c = cols(name)
            if not c:
                return pd.Series(np.nan, index=chunk.index, dtype=float)
            return _first(_numbers(chunk, c, signed=False, what=name.lstrip("_")), c)

        whole = number("_age_years")
        birth = number("_birth_year") + (number("_birth_month") - 0.5) / 12.0
        date_cols = cols("_visit_date")
        visit_year = _decimal_year(_first(chunk, date_cols)) if date_cols else pd.Series(np.nan, index=chunk.index)
        fractional = (visit_year - birth).astype(float)
        agree = fractional.between(whole - 0.1, whole + 1.1) | whole.isna()
        use_frac = fractional.notna() & agree
        age = fractional.where(use_frac, whole + 0.5)
        source = np.select(
            [use_frac.to_numpy(), (fractional.notna() & ~agree).to_numpy(), whole.notna().to_numpy()],
            ["fractional", "conflict", "whole_years"],
            default="missing",
        )
        out = pd.DataFrame(
            {
                "subject_id": eids,
                "visit": visit,
                "age": age.astype(float),
                "sex": _sex(chunk, cols("sex")),
                "site": _site(chunk, cols("site")),
                "age_source": source,
            },
            index=chunk.index,
        )
        if plan.has_bmi:
            out["bmi"] = number("bmi")
        for req in requests:
            out[req.name] = _requested(chunk, cols(req.name), req)
        rows.append(out)
    return pd.concat(rows, ignore_index=True)


def _requested(chunk: pd.DataFrame, cols: list[str], req: FieldRequest) -> pd.Series:
    """One value per row of ``chunk`` for a ``--field`` request (strings for ``first``)."""
    if not cols:
        return pd.Series(pd.NA, index=chunk.index, dtype="object")
    how = req.reduce or "first"
    if how == "first":
        return _first(chunk, cols).astype("object")
    if how == "any":
        frame = chunk[cols]
        numeric_codes = pd.to_numeric(pd.Series(req.codes), errors="coerce")
        if numeric_codes.notna().all():
            values = frame.apply(pd.to_numeric, errors="coerce")
            hit = values.isin(set(numeric_codes.astype(float))).any(axis=1)
        else:
            hit = frame.apply(lambda s: s.str.strip()).isin(set(req.codes)).any(axis=1)
        return hit.astype(float)
    nums = _numbers(chunk, cols, signed=req.signed, what=f"field {req.field}, {how}")
    if how == "mean":
        return nums.mean(axis=1)
    if how == "min":
        return nums.min(axis=1)
    return nums.max(axis=1)


def _finish_first(values: pd.Series, req: FieldRequest) -> pd.Series:
    """Make a ``first`` column numeric when every value is a number; negative codes -> NaN."""
    present = values.dropna()
    num = pd.to_numeric(present, errors="coerce")
    if len(present) and num.isna().any():
        return values.astype("string")
    out = pd.to_numeric(values, errors="coerce").astype(float)
    return out if req.signed else out.where(out >= 0)


def read_visits(
    layout: ExportLayout | str | os.PathLike[str],
    *,
    instances: Sequence[int] = IMAGING_INSTANCES,
    fields: Iterable[FieldRequest | str] = (),
    eids: Collection[str] | None = None,
    chunksize: int = 50_000,
    progress: Progress = NO_PROGRESS,
) -> ExportVisits:
    """Read age, sex, centre, BMI and requested fields per (participant, instance).

    Parameters
    ----------
    layout
        An export, or its :func:`read_layout`.
    instances
        Visits to produce rows for (imaging: 2 and 3).
    fields
        Extra phenotype fields, as :class:`FieldRequest` or ``--field`` strings.
    eids
        Keep only these participants (ids as strings); ``None`` keeps everyone.
    chunksize
        Rows read at a time: peak memory grows with it.
    progress
        Advanced once per chunk.

    Returns
    -------
    ExportVisits
        ``len(instances)`` rows per participant kept, in export order, instance-major
        within each chunk.

    Raises
    ------
    InputError
        Missing file or columns, a duplicate eid, a non-number in a numeric field.
    """
    lay = layout if isinstance(layout, ExportLayout) else read_layout(layout)
    requests = [f if isinstance(f, FieldRequest) else parse_field_option(f) for f in fields]
    check_field_requests(requests)
    insts = [int(i) for i in instances]
    if not insts or any(i < 0 for i in insts) or len(set(insts)) != len(insts):
        raise InputError(f"instances must be distinct non-negative integers, got {insts}")
    plan = plan_columns(lay, insts, requests)
    keep = {str(e) for e in eids} if eids is not None else None
    parts: list[pd.DataFrame] = []
    seen: set[str] = set()
    n_rows = 0
    task = progress.task("read export", None)
    bad_rows: list[BadRow] = []
    for chunk in iter_export_chunks(lay, plan.usecols, chunksize=chunksize, bad_rows=bad_rows):
        raw_ids = chunk[lay.eid_column]
        ids = raw_ids.astype(str).str.strip()
        wrong = raw_ids.isna() | (ids == "") | ids.duplicated()
        if wrong.any():
            line = chunk.index[wrong.to_numpy()][0]
            raise InputError(f"{lay.path}: line {line} has an empty or repeated participant id")
        # membership in Python sets (seen holds kept ids only): Series.isin(set) would
        # convert the whole set on every chunk
        dup = np.fromiter((i in seen for i in ids), dtype=bool, count=len(ids))
        if dup.any():
            raise InputError(f"{lay.path}: line {chunk.index[dup][0]} repeats a participant id of an earlier line")
        n_rows += len(chunk)
        if keep is not None:
            kept = np.fromiter((i in keep for i in ids), dtype=bool, count=len(ids))
            chunk, ids = chunk[kept], ids[kept]
        seen.update(ids)
        if len(chunk):
            derived = _derive_chunk(chunk, lay.eid_column, plan, insts, requests)
            parts.append(derived)
        task.advance(1, rows=n_rows)
    task.close()
    if bad_rows:
        warnings.warn(
            bad_rows_message(lay.path, bad_rows, lay.n_columns) + "; those rows are left out",
            BodyageWarning,
            stacklevel=2,
        )
    if parts:
        table = pd.concat(parts, ignore_index=True)
    else:
        cols = ["subject_id", "visit", "age", "sex", "site", "age_source", *(["bmi"] if plan.has_bmi else [])]
        table = pd.DataFrame({c: pd.Series(dtype=object) for c in [*cols, *(r.name for r in requests)]})
    for req in requests:
        if (req.reduce or "first") == "first":
            table[req.name] = _finish_first(table[req.name], req)
    table["visit"] = table["visit"].astype(int)
    return ExportVisits(
        table=table,
        n_participants=len(seen),
        age_sources={str(k): int(v) for k, v in table["age_source"].value_counts().items()},
        instance_sources=plan.instance_sources,
        columns_read=tuple(plan.usecols),
        bad_rows=tuple(bad_rows),
    )
