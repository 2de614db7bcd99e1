"""Streaming the rows of a delimited export file, with every row's field count checked.

A wide export (a UK Biobank download: 500,000 rows x thousands of columns) is read as
text, a block at a time: lines without a quote character have their separators counted
(with NumPy, on the whole block), lines with one are parsed by :mod:`csv` (which also
joins the lines of a quoted field holding a newline). Rows with as many fields as the header go to
:func:`pandas.read_csv` (only the columns asked for, about 16 MB of text at a time);
others are reported as :class:`BadRow`. ``pandas.read_csv(usecols=...)`` alone does not
check field counts: a row with one field too many would be read with its values shifted.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import itertools
import lzma
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt
import pandas as pd

from bodyage.errors import InputError

#: UTF-8, with or without a byte-order mark (Excel writes one)
_ENCODING = "utf-8-sig"


def open_text(path: Path) -> io.TextIOBase:
    """Open ``path`` as UTF-8 text (BOM dropped), decompressing ``.gz``, ``.bz2``, ``.xz``."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return cast(io.TextIOBase, gzip.open(path, "rt", encoding=_ENCODING, newline=""))
    if suffix == ".bz2":
        return cast(io.TextIOBase, bz2.open(path, "rt", encoding=_ENCODING, newline=""))
    if suffix == ".xz":
        return cast(io.TextIOBase, lzma.open(path, "rt", encoding=_ENCODING, newline=""))
    return cast(io.TextIOBase, open(path, encoding=_ENCODING, newline=""))


#: characters of export text handed to the parser at a time (bounds memory for wide exports)
_BLOCK_CHARS = 1 << 24
#: how many malformed rows a warning or error quotes
_QUOTED_BAD_ROWS = 3


@dataclass(frozen=True)
class BadRow:
    """A row of an export whose number of fields differs from the header's.

    Attributes
    ----------
    line
        Line of the file where the row starts (the header is line 1).
    eid
        The participant id in the row's eid column (``None`` if the row is too short),
        only a guess: the fields of a malformed row may be shifted.
    n_fields
        Fields found in the row.
    """

    line: int
    eid: str | None
    n_fields: int


class _Lines:
    """Physical lines of a text file, counted (``n``), remembering the last ones taken."""

    def __init__(self, fh: Iterable[str]) -> None:
        self._it = iter(fh)
        self.n = 0
        self.taken: list[str] = []

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = next(self._it)
        self.n += 1
        self.taken.append(line)
        return line


def _records(fh: Iterable[str], sep: str) -> Iterator[tuple[int, str, list[str] | None]]:
    """Yield ``(first line, text, fields or None)`` of each non-blank record.

    A line without a quote character is one record (its fields are counted later, a
    block at a time); a line with one is parsed by :mod:`csv`, which also joins the lines
    of a quoted field holding a newline.
    """
    src = _Lines(fh)
    for line in src:
        start = src.n
        if '"' not in line:
            if not line.isspace():
                yield start, line, None
            src.taken.clear()
            continue
        src.taken = [line]
        reader = csv.reader(itertools.chain([line], src), delimiter=sep, skipinitialspace=True)
        row = next(reader, [])
        text = "".join(src.taken)
        src.taken.clear()
        yield start, text, row


def _field_counts(body: bytes, texts: list[str], parsed: list[list[str] | None], sep: str) -> npt.NDArray[np.int64]:
    """Fields of each record of a block (``body``: the records' text, encoded).

    When every record is one line ending in a newline (no quoted field), the separators
    are counted with NumPy on the whole block (2-3 times faster than ``str.count`` per
    line); otherwise line by line.
    """
    if all(p is None for p in parsed):
        arr = np.frombuffer(body, dtype=np.uint8)
        ends = np.flatnonzero(arr == 10)
        if len(ends) == len(texts):
            seps = np.flatnonzero(arr == ord(sep))
            return np.diff(np.searchsorted(seps, ends), prepend=0) + 1
    return np.array([len(p) if p is not None else t.count(sep) + 1 for t, p in zip(texts, parsed, strict=True)])


def _eid_of(text: str, fields: list[str] | None, sep: str, index: int) -> str | None:
    parts = fields if fields is not None else text.rstrip("\r\n").split(sep)
    return parts[index].strip() if index < len(parts) else None


def read_chunks(
    path: Path,
    *,
    sep: str,
    n_columns: int,
    id_column: str,
    usecols: Sequence[str],
    chunksize: int = 50_000,
    bad_rows: list[BadRow] | None = None,
) -> Iterator[pd.DataFrame]:
    """Yield chunks of rows of ``usecols`` (plus ``id_column``), all as strings.

    Every row's number of fields is checked against the header while the file is
    streamed (``pandas.read_csv(usecols=...)`` alone does not check it, and a row with
    one field too many would have its values shifted into the wrong columns). Memory is
    bounded by ``chunksize`` rows of the columns read and about 16 MB of raw text.

    Parameters
    ----------
    path
        The file (``.gz``, ``.bz2`` and ``.xz`` are decompressed while reading).
    sep
        Column separator.
    n_columns
        Fields every row must have (the header's).
    id_column
        The column whose value :class:`BadRow` records (the participant id).
    usecols
        Columns to return.
    chunksize
        Rows per chunk at most (chunks may be smaller).
    bad_rows
        Where rows with the wrong number of fields go (left out of the chunks); ``None``:
        the first one raises :class:`InputError`.

    Yields
    ------
    pandas.DataFrame
        Strings (missing cells NaN), indexed by the line each row starts on.

    Raises
    ------
    InputError
        If the file cannot be read or decompressed to the end (a truncated ``.gz``), is
        not UTF-8, or a row has the wrong number of fields (without ``bad_rows``).
    """
    wanted = [id_column, *[c for c in usecols if c != id_column]]
    line = 1
    try:
        with open_text(path) as fh:
            records = _records(fh, sep)
            first = next(records, None)
            if first is None:
                return
            header = first[1] if first[1].endswith("\n") else first[1] + "\n"
            names = [name.strip() for name in next(csv.reader([header], delimiter=sep))]
            eid_index = names.index(id_column)
            texts: list[str] = []
            parsed: list[list[str] | None] = []
            lines: list[int] = []
            size = 0
            head = header.encode("utf-8")

            def parse() -> pd.DataFrame | None:
                nonlocal texts, parsed, lines
                body = "".join(texts).encode("utf-8")
                counts = _field_counts(body, texts, parsed, sep)
                wrong = np.flatnonzero(counts != n_columns)
                if len(wrong):
                    for i in wrong:
                        n = int(counts[i])
                        if bad_rows is None:
                            raise InputError(f"{path}: line {lines[i]} has {n} fields but the header has {n_columns}")
                        bad_rows.append(
                            BadRow(line=lines[i], eid=_eid_of(texts[i], parsed[i], sep, eid_index), n_fields=n)
                        )
                    keep = np.ones(len(texts), dtype=bool)
                    keep[wrong] = False
                    texts = [t for t, k in zip(texts, keep, strict=True) if k]
                    lines = [n for n, k in zip(lines, keep, strict=True) if k]
                    if not texts:
                        return None
                    body = "".join(texts).encode("utf-8")
                try:
                    frame = pd.read_csv(
                        io.BytesIO(head + body),  # bytes parse 2x faster than text
                        sep=sep,
                        usecols=wanted,
                        dtype=str,
                        skipinitialspace=True,
                    )
                except (pd.errors.ParserError, ValueError) as err:
                    raise InputError(
                        f"{path}: lines {lines[0]}-{lines[-1]} cannot be parsed as a UK Biobank export ({err})"
                    ) from err
                if len(frame) != len(lines):
                    raise InputError(f"{path}: lines {lines[0]}-{lines[-1]} cannot be parsed as a UK Biobank export")
                frame.index = pd.Index(lines, name="line")
                return frame

            for line, text, fields in records:
                texts.append(text if text.endswith("\n") else text + "\n")
                parsed.append(fields)
                lines.append(line)
                size += len(text)
                if len(lines) >= chunksize or size >= _BLOCK_CHARS:
                    frame = parse()
                    if frame is not None:
                        yield frame
                    texts, parsed, lines, size = [], [], [], 0
            if lines:
                frame = parse()
                if frame is not None:
                    yield frame
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text after line {line} ({err.reason}); save the export as UTF-8") from err
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as err:
        raise InputError(f"{path}: cannot be read to the end after line {line} (truncated or corrupt? {err})") from err


def bad_rows_message(path: Path, rows: Sequence[BadRow], n_columns: int) -> str:
    """One line saying which rows of ``path`` have the wrong number of fields."""
    shown = ", ".join(f"line {r.line} ({r.n_fields} fields)" for r in rows[:_QUOTED_BAD_ROWS])
    more = f" and {len(rows) - _QUOTED_BAD_ROWS} more" if len(rows) > _QUOTED_BAD_ROWS else ""
    return f"{path}: {len(rows)} row(s) do not have the header's {n_columns} fields: {shown}{more}"
