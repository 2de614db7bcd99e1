r"""A small LaTeX table writer: booktabs rules, siunitx numbers, escaped text.

``DataFrame.to_latex`` does not escape by default (``kidney_left`` breaks pdflatex) and
pre-formats numbers (a ``31,245`` in an siunitx column prints as 31.245). This writer:

- escapes every piece of text (region names, phenotype names, notes, captions), and
  translates what plain pdflatex cannot typeset: Greek letters become
  ``\ensuremath{\beta}``, accented letters accent commands (``\'{e}``), other
  characters their ASCII compatibility form or a visible ``[U+2603]``;
- gives an estimate and its confidence interval the same decimals;
- wraps a text column whose longest entry is wider than :data:`WRAP_EM` (ragged right,
  breaking after underscores), so a long region name does not push the table past the
  margin;
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

import functools
import math
import os
import re
import unicodedata
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
#: widest a table may be, in em of its font: the \textwidth of the standard classes
#: (article/report/book at 10, 11 or 12 pt: 345-390 pt) is 38.5-40.6 em at \footnotesize
WIDTH_EM = 38.0
#: narrowest a long text column is wrapped to (em)
MIN_WRAP_EM = 6.0
#: layouts tried in turn until a table fits: font size, its em relative to \footnotesize's
#: (8.5 pt in a 10 pt document; \scriptsize 7.97 pt) and \tabcolsep (pt)
LAYOUTS: tuple[tuple[str, float, float], ...] = (
    (r"\footnotesize", 1.0, 3.0),
    (r"\scriptsize", 0.94, 3.0),
    (r"\scriptsize", 0.94, 1.5),
)
#: em of \footnotesize in a 10 pt document (pt)
_EM_PT = 8.5

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
    "`": r"\textasciigrave{}",
    # a cell starting with "[" would be read as the optional argument of the "\\" before it
    "[": "{[}",
    "]": "{]}",
    "²": r"\textsuperscript{2}",
    "³": r"\textsuperscript{3}",
    "¹": r"\textsuperscript{1}",
    "×": r"\ensuremath{\times}",
    "±": r"\ensuremath{\pm}",
    "÷": r"\ensuremath{\div}",
    "·": r"\ensuremath{\cdot}",
    "•": r"\ensuremath{\bullet}",
    "°": r"\ensuremath{^\circ}",
    "−": r"\ensuremath{-}",
    "–": "--",
    "—": "---",
    "…": r"\ldots{}",
    "≈": r"\ensuremath{\approx}",
    "≤": r"\ensuremath{\leq}",
    "≥": r"\ensuremath{\geq}",
    "≠": r"\ensuremath{\neq}",
    "→": r"\ensuremath{\rightarrow}",
    "←": r"\ensuremath{\leftarrow}",
    "∞": r"\ensuremath{\infty}",
    "√": r"\ensuremath{\surd}",
    "′": r"\ensuremath{'}",
    "‘": "`",
    "’": "'",
    "“": "``",
    "”": "''",
    "«": "<<",
    "»": ">>",
    "\u00a0": "~",
    "ß": r"\ss{}",
    "æ": r"\ae{}",
    "Æ": r"\AE{}",
    "œ": r"\oe{}",
    "Œ": r"\OE{}",
    "ø": r"\o{}",
    "Ø": r"\O{}",
    "ł": r"\l{}",
    "Ł": r"\L{}",
    "ı": r"\i{}",
    "§": r"\S{}",
    "¶": r"\P{}",
    "£": r"\pounds{}",
    "©": r"\copyright{}",
    "€": "EUR",
    "⁄": "/",
}
#: combining accents -> LaTeX accent commands that exist in the default (OT1) encoding
_ACCENTS = {
    "\u0300": "`",
    "\u0301": "'",
    "\u0302": "^",
    "\u0303": "~",
    "\u0304": "=",
    "\u0306": "u",
    "\u0307": ".",
    "\u0308": '"',
    "\u030a": "r",
    "\u030b": "H",
    "\u030c": "v",
    "\u0323": "d",
    "\u0327": "c",
}
#: Greek capitals without a LaTeX command look like these Latin letters
_GREEK_LATIN = {
    "ALPHA": "A",
    "BETA": "B",
    "EPSILON": "E",
    "ZETA": "Z",
    "ETA": "H",
    "IOTA": "I",
    "KAPPA": "K",
    "MU": "M",
    "NU": "N",
    "OMICRON": "O",
    "RHO": "P",
    "TAU": "T",
    "CHI": "X",
}


def escape(text: object) -> str:
    r"""Escape text for LaTeX so that plain pdflatex typesets it.

    Special characters are escaped (``_`` -> ``\_``, a backquote ->
    ``\textasciigrave{}``); Unicode is translated: Greek letters to math symbols
    (``β`` -> ``\ensuremath{\beta}``), accented letters to accent commands (``é`` ->
    ``\'{e}``), other characters to their ASCII compatibility form (``ﬁ`` -> ``fi``)
    or, failing that, to a visible code such as ``[U+4E2D]``. Nothing needs a package
    beyond the LaTeX kernel.
    """
    return "".join(_ESCAPES.get(ch) or (ch if ch < "\x80" else _unicode(ch)) for ch in str(text))


@functools.lru_cache(maxsize=1024)
def _unicode(ch: str) -> str:
    """LaTeX for one non-ASCII character not in :data:`_ESCAPES`."""
    name = unicodedata.name(ch, "")
    for prefix, capital in (("GREEK SMALL LETTER ", False), ("GREEK CAPITAL LETTER ", True)):
        letter = name.removeprefix(prefix)
        if letter != name and " " not in letter:
            letter = {"LAMDA": "LAMBDA"}.get(letter, letter)
            if letter == "OMICRON":
                return "O" if capital else "o"
            if capital and letter in _GREEK_LATIN:
                return _GREEK_LATIN[letter]
            command = letter.capitalize() if capital else letter.lower()
            return rf"\ensuremath{{\{command}}}"
    if name == "GREEK SMALL LETTER FINAL SIGMA":
        return r"\ensuremath{\varsigma}"
    decomposed = unicodedata.normalize("NFKD", ch)
    if decomposed != ch:
        base = "".join(c for c in decomposed if not unicodedata.combining(c))
        marks = [c for c in decomposed if unicodedata.combining(c)]
        text = escape(base)
        if marks and all(m in _ACCENTS for m in marks) and len(base) == 1 and base < "\x80":
            text = {"i": r"\i{}", "j": r"\j{}"}.get(text, text)
            for m in marks:
                text = rf"\{_ACCENTS[m]}{{{text}}}"
        return text
    return f"{{[}}U+{ord(ch):04X}{{]}}"


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
        Decimals of ``num``/``ci``; ``None``: chosen from the magnitude of the column's
        values, and of the values of every column on the same ``scale``.
    high
        For ``ci``: the upper-bound column.
    group
        Header group: consecutive columns with the same group share a spanning header
        with a ``\cmidrule`` under it.
    stars
        For ``p``: the q-value column whose stars follow the value.
    scale
        Columns with ``digits=None`` and the same ``scale`` print with the same decimals
        (an estimate, its standard error and its CI). Without one, a ``ci`` column with
        ``digits=None`` shares the scale of a ``num`` column with ``digits=None`` right
        before it, so an estimate and its CI always print alike.
    wrap
        For ``text``: whether the column may wrap (ragged right, breaking after
        underscores) when the table would be wider than :data:`WIDTH_EM`.
    """

    header: str
    key: str
    kind: ColumnKind = "num"
    digits: int | None = 2
    high: str | None = None
    group: str | None = None
    stars: str | None = None
    scale: str | None = None
    wrap: bool = True


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


def _digits(df: pd.DataFrame, cols: Sequence[Column]) -> list[int]:
    """Decimals of each column: its own, or :func:`auto_digits` over its scale's values."""
    scales: list[str | None] = []
    for i, col in enumerate(cols):
        scale = None
        if col.kind in ("num", "ci") and col.digits is None:
            scale = col.scale
            if scale is None and col.kind == "ci" and i and scales[-1] is not None and cols[i - 1].kind == "num":
                scale = scales[-1]
            scale = scale if scale is not None else f"#{i}"
        scales.append(scale)
    values: dict[str, list[np.ndarray]] = {}
    for col, scale in zip(cols, scales, strict=True):
        if scale is not None:
            keys = [col.key] + ([col.high] if col.high else [])
            values.setdefault(scale, []).append(df[keys].to_numpy(float).ravel())
    auto = {k: auto_digits(np.concatenate(v)) for k, v in values.items()}
    return [auto[sc] if sc is not None else (col.digits or 0) for col, sc in zip(cols, scales, strict=True)]


_COMMAND = re.compile(r"\\[a-zA-Z]+\*?(\[[^]]*\])?")
_SCI = re.compile(r"\\num\{(-?[\d.]+)e([-+]?\d+)\}")
_IGNORED = re.compile(r"\\(num|ensuremath|textit|allowbreak)(\[[^]]*\])?")
_SUPERSCRIPT = re.compile(r"\\textsuperscript\{([^}]*)\}")


def width_em(cell: str) -> float:
    r"""Rough printed width (em) of one cell of LaTeX text written by :func:`render`.

    Computer Modern widths: digits 0.5 em, most lower-case letters about 0.45,
    capitals about 0.72, punctuation 0.28-0.38; ``\num{1.2e-05}`` prints as
    ``1.2 × 10⁻⁵``, superscripts at about 70 %. Within about 10 % of what pdflatex
    measures; used to decide whether a table fits the text width, not to typeset.
    """
    text = _SCI.sub(lambda m: m.group(1) + "\x00" + "\x01" * len(m.group(2).lstrip("+")), cell)
    width = sum(0.45 * len(m) for m in _SUPERSCRIPT.findall(text))
    text = _SUPERSCRIPT.sub("", text)
    text = _IGNORED.sub("", text.replace(r"\_", "_"))
    text = _COMMAND.sub("m", text).replace("{", "").replace("}", "").replace("$", "").replace("--", "-")
    return width + sum(_char_em(ch) for ch in text)


def _char_em(ch: str) -> float:
    if ch == "\x00":  # " × 10" of scientific notation
        return 2.6
    if ch == "\x01":  # one character of an exponent
        return 0.4
    if ch.isdigit() or ch == "_":
        return 0.5
    if ch in "mwMW":
        return 0.85
    if ch.isupper():
        return 0.72
    if ch in ".,;:'!|il":
        return 0.28
    if ch in " ()[]-/tfjr":
        return 0.36
    return 0.47


def _wrapped(spec_width: float) -> str:
    return rf">{{\raggedright\arraybackslash}}p{{{spec_width:.1f}em}}"


def render(df: pd.DataFrame, table: LatexTable) -> str:
    """Return the LaTeX of ``table`` filled with the rows of ``df``."""
    cols = table.columns
    cells: list[list[str]] = [[] for _ in range(len(df))]
    specs: list[str] = []
    headers: list[str] = []
    used_stars = False
    for col, digits in zip(cols, _digits(df, cols), strict=True):
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
    titles = [escape(s) for s in dict.fromkeys(df[table.section])] if table.section else []
    (font, sep), specs, cells = _fit(cols, specs, headers, cells, titles)
    lines = [
        r"\begin{table}[htbp]",
        r"\centering",
        font,
        rf"\setlength{{\tabcolsep}}{{{sep:g}pt}}",
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


def _fit(
    cols: Sequence[Column], specs: list[str], headers: list[str], cells: list[list[str]], sections: Sequence[str]
) -> tuple[tuple[str, float], list[str], list[list[str]]]:
    r"""Font size, ``\tabcolsep`` and column specs that keep the table within :data:`WIDTH_EM`.

    For each of :data:`LAYOUTS` in turn, the widest wrappable text columns wrap (down to
    :data:`MIN_WRAP_EM`) until the table fits; the first layout that fits is used, the
    last one if none does.
    """
    content = [max([width_em(h), *(width_em(row[j]) for row in cells)]) for j, h in enumerate(headers)]
    span = max([0.0, *(width_em(s) + 0.5 for s in sections)])
    wrappable = [j for j, c in enumerate(cols) if c.kind == "text" and c.wrap]
    layout = LAYOUTS[0]
    for layout in LAYOUTS:
        _, scale, sep = layout
        budget = WIDTH_EM / scale
        pad = 2 * sep / (_EM_PT * scale)
        chosen = list(content)
        for j in sorted(wrappable, key=lambda k: -content[k]):
            excess = max(sum(chosen) + pad * len(chosen), span) - budget
            if excess <= 0:
                break
            chosen[j] = min(content[j], max(MIN_WRAP_EM, content[j] - excess))
        if max(sum(chosen) + pad * len(chosen), span) <= budget:
            break
    out_specs = list(specs)
    out_cells = [list(row) for row in cells]
    for j in wrappable:
        if chosen[j] < content[j]:
            out_specs[j] = _wrapped(chosen[j])
            for row in out_cells:
                row[j] = row[j].replace(r"\_", r"\_\allowbreak{}")
    return (layout[0], layout[2]), out_specs, out_cells


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
