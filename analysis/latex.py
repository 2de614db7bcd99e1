r"""A small LaTeX table writer: booktabs rules, siunitx numbers, escaped text.

``DataFrame.to_latex`` does not escape by default (``kidney_left`` breaks pdflatex) and
pre-formats numbers (a ``31,245`` in an siunitx column prints as 31.245). This writer:

- escapes every piece of text (region names, phenotype names, notes, captions);
- puts estimates in siunitx ``S`` columns whose ``table-format`` is computed from the
  data, integers raw (siunitx groups the digits), missing values as ``{--}``;
- writes confidence intervals as ``[\num{a}, \num{b}]`` and p/q-values with ``\num``,
  in scientific notation below 10⁻³;
- marks significance with stars after the q-value (``*`` q < 0.05, ``**`` < 0.01,
  ``***`` < 0.001) and explains them in the notes;
- uses ``\toprule``/``\midrule``/``\bottomrule`` and ``\cmidrule`` under grouped
  headers (never ``\cline``), a caption and a label.

Every table compiles in a minimal document::

    \documentclass{article}
    \usepackage{booktabs}
    \usepackage{siunitx}
    \begin{document} \input{table.tex} \end{document}
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

ColumnKind = Literal["text", "int", "num", "p", "ci"]

#: thresholds and marks of the significance stars (by q-value)
STARS: tuple[tuple[float, str], ...] = ((0.001, "***"), (0.01, "**"), (0.05, "*"))
#: p/q-values below this are written in scientific notation
SCI_BELOW = 1e-3
#: smallest p/q-value written as a number; below, "< 1e-300"
P_FLOOR = 1e-300
MISSING = "--"

_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"$<$",
    ">": r"$>$",
    "|": r"$|$",
    "²": r"\textsuperscript{2}",
    "³": r"\textsuperscript{3}",
    "×": r"\texttimes{}",
    "±": r"\textpm{}",
    "–": "--",
    "—": "---",
    "≈": r"$\approx$",
    "≤": r"$\leq$",
    "≥": r"$\geq$",
    "≠": r"$\neq$",
    "α": r"$\alpha$",
    "δ": r"$\delta$",
    "’": "'",
    "“": "``",
    "”": "''",
}


def escape(text: object) -> str:
    """Escape text for LaTeX (special characters and a few common Unicode symbols)."""
    return "".join(_ESCAPES.get(ch, ch) for ch in str(text))


@dataclass(frozen=True)
class Column:
    r"""One column of a LaTeX table.

    Attributes
    ----------
    header
        Header text (escaped when written).
    key
        Data column (for ``ci``: the lower bound).
    kind
        ``text`` (escaped), ``int`` (raw integer, ``S`` column), ``num`` (``S`` column),
        ``p`` (p/q-value with ``\num``), ``ci`` (``[low, high]``).
    digits
        Decimals of ``num``/``ci``; ``None``: chosen from the column's magnitude.
    high
        For ``ci``: the upper-bound column.
    group
        Header group: consecutive columns with the same group share a spanning header
        with a ``\cmidrule`` under it.
    stars
        For ``p``: the q-value column whose stars follow the value.
    """

    header: str
    key: str
    kind: ColumnKind = "num"
    digits: int | None = 2
    high: str | None = None
    group: str | None = None
    stars: str | None = None


@dataclass(frozen=True)
class LatexTable:
    """A table: columns, caption, label and notes (plain text, escaped when written).

    Attributes
    ----------
    section
        Optional data column: where its value changes, a spanning italic row names the
        new block (e.g. one block per phenotype), instead of repeating it in a column.
    """

    columns: tuple[Column, ...]
    caption: str
    label: str
    notes: tuple[str, ...] = ()
    section: str | None = None


def auto_digits(values: Sequence[float] | np.ndarray) -> int:
    """Decimals that show about three significant digits of a column's typical value (1–6)."""
    arr = np.abs(np.asarray(values, dtype=float))
    arr = arr[np.isfinite(arr) & (arr > 0)]
    if arr.size == 0:
        return 2
    typical = float(np.median(arr))
    return int(min(6, max(1, 2 - math.floor(math.log10(typical)))))


def format_number(value: object, digits: int) -> str:
    """Fixed-point text of a number (``--`` when missing); ``-0.00`` is written ``0.00``."""
    v = _float(value)
    if v is None:
        return MISSING
    text = f"{v:.{digits}f}"
    if float(text) == 0.0:
        text = text.lstrip("-")
    return text


def format_p(value: object) -> str:
    r"""``\num{0.0123}`` (3 significant digits) or ``\num{1.2e-05}`` below 10⁻³; ``--`` if missing."""
    v = _float(value)
    if v is None:
        return MISSING
    if v < P_FLOOR:
        return r"$<$\num{1e-300}"
    if v < SCI_BELOW:
        return rf"\num{{{v:.1e}}}"
    return rf"\num[group-digits=integer]{{{v:.3g}}}"


def stars(q: object) -> str:
    """Significance stars of a q-value (empty when not significant or missing)."""
    v = _float(q)
    if v is None:
        return ""
    for threshold, mark in STARS:
        if v < threshold:
            return mark
    return ""


def _float(value: object) -> float | None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _s_format(texts: list[str]) -> str:
    nums = [t for t in texts if t != MISSING]
    if not nums:
        return "1.0"
    sign = "-" if any(t.startswith("-") for t in nums) else ""
    ints = max(len(t.lstrip("-").split(".")[0]) for t in nums)
    decs = max((len(t.split(".")[1]) if "." in t else 0) for t in nums)
    return f"{sign}{ints}.{decs}"


def render(df: pd.DataFrame, table: LatexTable) -> str:
    """Return the LaTeX of ``table`` filled with the rows of ``df``."""
    cols = table.columns
    cells: list[list[str]] = [[] for _ in range(len(df))]
    specs: list[str] = []
    headers: list[str] = []
    used_stars = False
    for col in cols:
        if col.kind in ("num", "ci"):
            keys = [col.key] + ([col.high] if col.high else [])
            digits = col.digits if col.digits is not None else auto_digits(df[keys].to_numpy().ravel())
        else:
            digits = col.digits or 0
        if col.kind == "text":
            texts = [escape(v) if _present(v) else MISSING for v in df[col.key]]
            specs.append("l")
            headers.append(escape(col.header))
        elif col.kind == "int":
            texts = [str(int(v)) if _float(v) is not None else MISSING for v in df[col.key]]
            specs.append(f"S[table-format={_s_format(texts)}]")
            texts = [t if t != MISSING else "{--}" for t in texts]
            headers.append("{" + escape(col.header) + "}")
        elif col.kind == "num":
            texts = [format_number(v, digits) for v in df[col.key]]
            specs.append(f"S[table-format={_s_format(texts)}]")
            texts = [t if t != MISSING else "{--}" for t in texts]
            headers.append("{" + escape(col.header) + "}")
        elif col.kind == "ci":
            if col.high is None:
                raise ValueError(f"column {col.header!r}: a 'ci' column needs `high`")
            texts = [
                rf"[\num{{{format_number(lo, digits)}}}, \num{{{format_number(hi, digits)}}}]"
                if _float(lo) is not None and _float(hi) is not None
                else MISSING
                for lo, hi in zip(df[col.key], df[col.high], strict=True)
            ]
            specs.append("c")
            headers.append(escape(col.header))
        else:  # p
            marks = [stars(q) for q in df[col.stars]] if col.stars else [""] * len(df)
            used_stars = used_stars or any(marks)
            texts = [
                format_p(v) + (rf"\textsuperscript{{{m}}}" if m else "")
                for v, m in zip(df[col.key], marks, strict=True)
            ]
            specs.append("r")
            headers.append(escape(col.header))
        for i, t in enumerate(texts):
            cells[i].append(t)
    lines = [
        r"\begin{table}[htbp]",
        r"\centering",
        r"\footnotesize",
        r"\setlength{\tabcolsep}{3pt}",
        rf"\caption{{{escape(table.caption)}}}",
        rf"\label{{{table.label}}}",
        r"\begin{tabular}{" + " ".join(specs) + "}",
        r"\toprule",
    ]
    lines.extend(_group_header(cols))
    lines.append(" & ".join(headers) + r" \\")
    lines.append(r"\midrule")
    if cells:
        sections = list(df[table.section]) if table.section else [None] * len(cells)
        previous: object = None
        for i, (row, sec) in enumerate(zip(cells, sections, strict=True)):
            if table.section and (i == 0 or sec != previous):
                if i:
                    lines.append(r"\addlinespace")
                lines.append(rf"\multicolumn{{{len(cols)}}}{{l}}{{\textit{{{escape(sec)}}}}} \\")
            previous = sec
            lines.append(" & ".join(row) + r" \\")
    else:
        lines.append(rf"\multicolumn{{{len(cols)}}}{{l}}{{(no rows)}} \\")
    lines.append(r"\bottomrule")
    lines.append(r"\end{tabular}")
    notes = [escape(n) for n in table.notes]
    if used_stars:
        notes.append(
            r"Stars mark Benjamini--Hochberg $q$-values: \textsuperscript{*}\,$q<0.05$, "
            r"\textsuperscript{**}\,$q<0.01$, \textsuperscript{***}\,$q<0.001$."
        )
    if notes:
        lines.append(r"\par\smallskip")
        lines.append(r"\begin{minipage}{\linewidth}\footnotesize")
        lines.append(" ".join(notes))
        lines.append(r"\end{minipage}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def _present(v: object) -> bool:
    if v is None:
        return False
    try:
        return not bool(pd.isna(v))  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return True


def _group_header(cols: Sequence[Column]) -> list[str]:
    if not any(c.group for c in cols):
        return []
    spans: list[tuple[str | None, int, int]] = []
    for i, c in enumerate(cols, start=1):
        if spans and spans[-1][0] == c.group and c.group is not None:
            g, start, _ = spans[-1]
            spans[-1] = (g, start, i)
        else:
            spans.append((c.group, i, i))
    cells = []
    rules = []
    for g, start, end in spans:
        width = end - start + 1
        if g is None:
            cells.extend([""] * width)
        else:
            cells.append(rf"\multicolumn{{{width}}}{{c}}{{{escape(g)}}}")
            rules.append(rf"\cmidrule(lr){{{start}-{end}}}")
    return [" & ".join(cells) + r" \\", " ".join(rules)]


def write_latex(path: str | os.PathLike[str], df: pd.DataFrame, table: LatexTable) -> Path:
    """Render ``table`` with ``df`` and write it atomically to ``path``."""
    from bodyage.atomic import write_text

    return write_text(path, render(df, table))
