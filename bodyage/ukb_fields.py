"""UK Biobank fields, column names and the header of an export.

The field ids and codings ``bodyage cohort ukb`` reads (age 21003, sex 31, centre 54,
...), how an export names a (field, instance, array) column, the ``--field`` requests
that copy further fields into the cohort (:func:`parse_field_option`), and the header of
an export (:func:`read_layout`, which reads nothing else). Reading the rows is
:mod:`bodyage.ukb`. Three column-naming schemes are understood, so exports from
``ukbconv`` and from the Research Analysis Platform both work:

==========================  ==========================  =====================
scheme                      example                     eid column
==========================  ==========================  =====================
``ukbconv csv``             ``21003-2.0``               ``eid``
``ukbconv r`` / tab         ``f.21003.2.0``             ``f.eid``
Research Analysis Platform  ``p21003_i2``, ``p31``      ``eid``, ``participant.eid``
==========================  ==========================  =====================
"""

from __future__ import annotations

import csv
import lzma
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

from bodyage.errors import InputError
from bodyage.exportrows import open_text
from bodyage.study import RESERVED_COLUMNS

# ----------------------------------------------------------------------------- fields

#: "Age when attended assessment centre" (whole years, per instance)
AGE_FIELD = 21003
#: "Year of birth" (instance 0)
BIRTH_YEAR_FIELD = 34
#: "Month of birth" (instance 0)
BIRTH_MONTH_FIELD = 52
#: "Date of attending assessment centre" (per instance)
VISIT_DATE_FIELD = 53
#: "Sex" (instance 0; coding 9: 0 female, 1 male)
SEX_FIELD = 31
#: "UK Biobank assessment centre" (per instance; coding 10)
CENTRE_FIELD = 54
#: "Body mass index (BMI)" (per instance)
BMI_FIELD = 21001

#: the imaging visit (2) and the first repeat imaging visit (3)
IMAGING_INSTANCES: tuple[int, ...] = (2, 3)

#: assessment centres of the imaging visits (coding 10); other codes become ``centre_<code>``
UKB_CENTRES: dict[int, str] = {
    11025: "Cheadle",
    11026: "Reading",
    11027: "Newcastle",
    11028: "Bristol",
}

#: sex coding 9
UKB_SEX: dict[int, str] = {0: "F", 1: "M"}

#: fields whose value does not change between visits: they may come from an earlier instance
_TIME_INVARIANT_FIELDS = frozenset({SEX_FIELD, BIRTH_YEAR_FIELD, BIRTH_MONTH_FIELD})

#: standard fields, their cohort column (``None``: used to derive another column) and meaning
STANDARD_FIELDS: dict[int, tuple[str | None, str]] = {
    AGE_FIELD: ("age", "age at assessment (years)"),
    BIRTH_YEAR_FIELD: (None, "year of birth"),
    BIRTH_MONTH_FIELD: (None, "month of birth"),
    VISIT_DATE_FIELD: (None, "date of attending assessment centre"),
    SEX_FIELD: ("sex", "sex"),
    CENTRE_FIELD: ("site", "assessment centre"),
    BMI_FIELD: ("bmi", "body mass index"),
}

#: names of the columns :func:`read_visits` produces from the standard fields
STANDARD_COLUMNS: tuple[str, ...] = ("subject_id", "visit", "age", "sex", "site", "bmi")

Reducer = Literal["first", "mean", "min", "max", "any"]
#: how several array entries of one instance become one value
REDUCERS: tuple[Reducer, ...] = ("first", "mean", "min", "max", "any")

EID_COLUMNS: tuple[str, ...] = ("eid", "f.eid", "participant.eid")

_COLUMN_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"^(?P<field>\d+)-(?P<instance>\d+)\.(?P<array>\d+)$"),
    re.compile(r"^f\.(?P<field>\d+)\.(?P<instance>\d+)\.(?P<array>\d+)$"),
    re.compile(r"^(?:participant\.)?p(?P<field>\d+)(?:_i(?P<instance>\d+))?(?:_a(?P<array>\d+))?$"),
)
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FIELD_OPTION_RE = re.compile(r"^(?P<field>\d+)(?:\.(?P<array>\d+))?=(?P<name>[^:]*)(?::(?P<options>.*))?$")


@dataclass(frozen=True)
class FieldColumn:
    """One column of an export: a field's value at one instance and array index."""

    field: int
    instance: int
    array: int
    column: str


def parse_column(name: str) -> FieldColumn | None:
    """Return the (field, instance, array) a column name encodes, or ``None``.

    ``21003-2.0``, ``f.21003.2.0`` and ``p21003_i2`` all give field 21003, instance 2,
    array 0; a Research Analysis Platform column without ``_i`` (``p31``) is instance 0.
    """
    for pattern in _COLUMN_PATTERNS:
        m = pattern.match(name.strip())
        if m:
            return FieldColumn(
                field=int(m["field"]),
                instance=int(m["instance"] or 0),
                array=int(m["array"] or 0),
                column=name,
            )
    return None


@dataclass(frozen=True)
class FieldRequest:
    """A field to copy into the cohort as a phenotype column (``--field``).

    Attributes
    ----------
    field
        UK Biobank field id, e.g. 2443.
    name
        Cohort column name, e.g. ``diabetes``.
    array
        Use only this array index (``--field 22009.1=pc1``); ``None``: all of them.
    reduce
        How several array entries become one value: ``first`` (the first non-missing
        entry; the default, and the only choice needing no option when the field has one
        entry per instance), ``mean``, ``min``, ``max`` (numbers) or ``any`` (1 when any
        entry equals one of ``codes``, else 0: multiple-choice fields such as 20002).
    codes
        The codes ``any`` looks for, as written in the export.
    signed
        Keep negative numbers (otherwise negative codes become missing).
    """

    field: int
    name: str
    array: int | None = None
    reduce: Reducer | None = None
    codes: tuple[str, ...] = ()
    signed: bool = False

    def describe(self) -> str:
        """The option as a user would write it."""
        opts = []
        if self.reduce == "any":
            opts.append("any=" + ",".join(self.codes))
        elif self.reduce is not None:
            opts.append(self.reduce)
        if self.signed:
            opts.append("signed")
        array = f".{self.array}" if self.array is not None else ""
        return f"{self.field}{array}={self.name}" + (":" + ":".join(opts) if opts else "")


def parse_field_option(text: str) -> FieldRequest:
    """Parse a ``--field`` option: ``FIELD[.ARRAY]=NAME[:OPTION]...``.

    Options: ``first``, ``mean``, ``min``, ``max``, ``any=CODE[,CODE...]``, ``signed``.
    Examples: ``2443=diabetes``, ``4080=sbp:mean``, ``20002=diabetes_sr:any=1220,1223``,
    ``22009.1=pc1:signed``.

    Raises
    ------
    InputError
        Naming the option and what is wrong with it.
    """
    m = _FIELD_OPTION_RE.match(text.strip())
    if not m:
        raise InputError(f"--field {text!r}: expected FIELD[.ARRAY]=NAME[:OPTION], e.g. 2443=diabetes or 4080=sbp:mean")
    name = m["name"].strip()
    if not _NAME_RE.match(name):
        raise InputError(
            f"--field {text!r}: column name {name!r} must start with a letter or _ and hold only letters, digits and _"
        )
    reduce: Reducer | None = None
    codes: tuple[str, ...] = ()
    signed = False
    for opt in m["options"].split(":") if m["options"] is not None else []:
        opt = opt.strip()
        if opt == "signed":
            signed = True
            continue
        if opt.startswith("any="):
            new: Reducer = "any"
            codes = tuple(c.strip() for c in opt[4:].split(",") if c.strip())
            if not codes:
                raise InputError(f"--field {text!r}: 'any=' needs at least one code, e.g. any=1220,1223")
        elif opt in REDUCERS and opt != "any":
            new = cast(Reducer, opt)
        else:
            raise InputError(
                f"--field {text!r}: unknown option {opt!r}; options are first, mean, min, max, any=CODE[,CODE], signed"
            )
        if reduce is not None:
            raise InputError(f"--field {text!r}: give one of first/mean/min/max/any, not both {reduce} and {new}")
        reduce = new
    return FieldRequest(
        field=int(m["field"]),
        name=name,
        array=int(m["array"]) if m["array"] is not None else None,
        reduce=reduce,
        codes=codes,
        signed=signed,
    )


def check_field_requests(requests: Sequence[FieldRequest]) -> None:
    """Check that ``--field`` names are unique and clash with no cohort column.

    Raises
    ------
    InputError
        Naming the clashing name.
    """
    taken = {*RESERVED_COLUMNS, *STANDARD_COLUMNS, "water", "fat"}
    seen: dict[str, FieldRequest] = {}
    for req in requests:
        if req.name in taken:
            raise InputError(
                f"--field {req.describe()}: column name {req.name!r} is already used by bodyage "
                f"({', '.join(sorted(taken))}); choose another name"
            )
        if req.name in seen:
            raise InputError(
                f"--field {req.describe()}: column name {req.name!r} is also given to "
                f"--field {seen[req.name].describe()}"
            )
        seen[req.name] = req


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class ExportLayout:
    """The header of an export: which columns hold which (field, instance, array).

    Attributes
    ----------
    path
        The export file.
    sep
        Column separator (``,`` or tab).
    eid_column
        Name of the participant id column.
    columns
        ``{field: {instance: {array: column name}}}`` for every field column.
    n_columns
        Number of columns in the header.
    """

    path: Path
    sep: str
    eid_column: str
    columns: Mapping[int, Mapping[int, Mapping[int, str]]] = field(repr=False)
    n_columns: int = 0

    def has_field(self, field_id: int) -> bool:
        """Whether the export has any column of ``field_id``."""
        return field_id in self.columns

    def instances_of(self, field_id: int) -> list[int]:
        """Instances of ``field_id`` the export has, in increasing order."""
        return sorted(self.columns.get(field_id, {}))

    def resolve_instance(self, field_id: int, instance: int, *, fall_back: bool) -> int | None:
        """The instance to read ``field_id`` from for a visit at ``instance``.

        ``instance`` itself when the export has it; otherwise, with ``fall_back``, the
        latest earlier instance it has; otherwise ``None``.
        """
        have = self.instances_of(field_id)
        if instance in have:
            return instance
        if fall_back:
            earlier = [i for i in have if i < instance]
            if earlier:
                return earlier[-1]
        return None

    def columns_for(self, field_id: int, instance: int, array: int | None = None) -> list[str]:
        """Column names of ``field_id`` at ``instance`` in array order (one array if given)."""
        arrays = self.columns.get(field_id, {}).get(instance, {})
        if array is not None:
            return [arrays[array]] if array in arrays else []
        return [arrays[a] for a in sorted(arrays)]


def read_layout(path: str | os.PathLike[str]) -> ExportLayout:
    """Read the header of a UK Biobank export (nothing else).

    Raises
    ------
    InputError
        If the file is missing, empty, has no eid column, has no field columns or names
        one (field, instance, array) twice.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: phenotype export not found")
    try:
        with open_text(p) as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError, EOFError, lzma.LZMAError) as err:
        raise InputError(f"{p}: cannot read the phenotype export ({err})") from err
    if not first.strip():
        raise InputError(f"{p}: the phenotype export is empty (no header line)")
    sep = "\t" if first.count("\t") > first.count(",") else ","
    header = next(csv.reader([first], delimiter=sep))
    header = [h.strip() for h in header]
    eid = next((h for h in header if h in EID_COLUMNS), None)
    if eid is None:
        raise InputError(
            f"{p}: no participant id column; expected one of {', '.join(EID_COLUMNS)} "
            f"(the header starts {', '.join(header[:4])})"
        )
    columns: dict[int, dict[int, dict[int, str]]] = {}
    for name in header:
        fc = parse_column(name)
        if fc is None:
            continue
        arrays = columns.setdefault(fc.field, {}).setdefault(fc.instance, {})
        if fc.array in arrays:
            raise InputError(
                f"{p}: columns {arrays[fc.array]!r} and {name!r} both hold field {fc.field}, "
                f"instance {fc.instance}, array {fc.array}"
            )
        arrays[fc.array] = name
    if not columns:
        raise InputError(f"{p}: no UK Biobank field columns (expected names like 21003-2.0, f.21003.2.0 or p21003_i2)")
    return ExportLayout(path=p, sep=sep, eid_column=eid, columns=columns, n_columns=len(header))
