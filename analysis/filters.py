"""The restricted filter grammar of ``--cohort`` and ``--reference`` (docs/design.md §4).

User text is tokenised and parsed here, never passed to ``eval``, ``DataFrame.query``
or a formula. Grammar::

    filter     := condition ("and" condition)*
    condition  := column op value
                | column "in" "[" value ("," value)* "]"
                | column "not" "in" "[" value ("," value)* "]"
    op         := "==" | "!=" | "<" | "<=" | ">" | ">="
    column     := name | `any text in backquotes`
    value      := number | 'text' | "text" | name | true | false

Names are letters, digits, ``_`` and ``.``, not starting with a digit. A bare name on the
right is text (``sex == F``). ``true``/``false`` compare with boolean or 0/1 columns.

Semantics: a number compares numerically with a numeric column and as written with a
text column (``site == 11025`` matches the site ``"11025"``); ``<``, ``<=``, ``>``, ``>=``
need a numeric column. A scan whose value is missing matches no condition, not even
``!=`` or ``not in``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from bodyage.errors import InputError

COMPARISONS: tuple[str, ...] = ("==", "!=", "<", "<=", ">", ">=")
ORDERING: frozenset[str] = frozenset({"<", "<=", ">", ">="})

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<op>==|!=|<=|>=|<|>)
  | (?P<lbr>\[) | (?P<rbr>\]) | (?P<comma>,)
  | (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![A-Za-z_]))
  | (?P<string>'[^']*'|"[^"]*")
  | (?P<quoted>`[^`]+`)
  | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Value:
    """A literal: its text as written and, when it is one, its number or boolean."""

    text: str
    number: float | None = None
    boolean: bool | None = None


@dataclass(frozen=True)
class Condition:
    """One condition: ``column op value`` or ``column [not] in [values]``."""

    column: str
    op: str
    values: tuple[Value, ...]

    def __str__(self) -> str:
        col = self.column if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", self.column) else f"`{self.column}`"
        if self.op in ("in", "not in"):
            return f"{col} {self.op} [{', '.join(_show(v) for v in self.values)}]"
        return f"{col} {self.op} {_show(self.values[0])}"


def _show(v: Value) -> str:
    if v.number is not None or v.boolean is not None:
        return v.text
    return repr(v.text)


@dataclass(frozen=True)
class Filter:
    """A parsed filter: conditions joined by ``and``.

    Attributes
    ----------
    text
        The filter as the user wrote it.
    conditions
        The parsed conditions.
    """

    text: str
    conditions: tuple[Condition, ...]

    def __str__(self) -> str:
        return " and ".join(str(c) for c in self.conditions)

    @property
    def columns(self) -> tuple[str, ...]:
        """Columns the filter reads."""
        return tuple(dict.fromkeys(c.column for c in self.conditions))

    def mask(self, df: pd.DataFrame, *, option: str = "filter") -> npt.NDArray[np.bool_]:
        """Return which rows of ``df`` match.

        Raises
        ------
        InputError
            Naming the option and expression: a column that does not exist, a value of the
            wrong type for its column, or an ordering on a text column.
        """
        keep = np.ones(len(df), dtype=bool)
        for cond in self.conditions:
            if cond.column not in df.columns:
                raise InputError(
                    f"{option} {self.text!r}: column {cond.column!r} does not exist; "
                    f"columns: {', '.join(map(str, df.columns))}"
                )
            keep &= _match(df[cond.column], cond, option, self.text)
        return keep


def parse_filter(text: str, *, option: str = "filter") -> Filter:
    """Parse a filter expression (see the module docstring).

    Parameters
    ----------
    text
        The expression, e.g. ``"diabetes == 1 and age >= 60"``.
    option
        Name of the option it came from (``--cohort``), for error messages.

    Raises
    ------
    InputError
        Naming the option, the expression and the position of the problem.
    """
    tokens = _tokenise(text, option)
    if not tokens:
        raise InputError(f'{option} {text!r}: empty filter; expected e.g. "diabetes == 1"')
    parser = _Parser(tokens, text, option)
    conditions = [parser.condition()]
    while not parser.done():
        kind, value, pos = parser.next()
        if kind == "name" and value == "and":
            conditions.append(parser.condition())
        elif kind == "name" and value in ("or", "not"):
            raise InputError(f"{option} {text!r}: only 'and' joins conditions ({value!r} at position {pos})")
        else:
            raise InputError(f"{option} {text!r}: expected 'and' at position {pos}, found {value!r}")
    return Filter(text=text, conditions=tuple(conditions))


def _tokenise(text: str, option: str) -> list[tuple[str, str, int]]:
    out = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise InputError(
                f"{option} {text!r}: unexpected {text[pos]!r} at position {pos}; a filter is conditions like "
                "`column == value`, `column in [a, b]` joined by 'and'"
            )
        kind = m.lastgroup or ""
        if kind != "ws":
            out.append((kind, m.group(), pos))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, tokens: list[tuple[str, str, int]], text: str, option: str) -> None:
        self.tokens = tokens
        self.i = 0
        self.text = text
        self.option = option

    def done(self) -> bool:
        return self.i >= len(self.tokens)

    def next(self) -> tuple[str, str, int]:
        if self.done():
            raise InputError(f"{self.option} {self.text!r}: the filter ends too early")
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def fail(self, expected: str, tok: tuple[str, str, int]) -> InputError:
        return InputError(f"{self.option} {self.text!r}: expected {expected} at position {tok[2]}, found {tok[1]!r}")

    def condition(self) -> Condition:
        kind, value, pos = self.next()
        if kind == "quoted":
            column = value[1:-1]
        elif kind == "name" and value not in ("and", "or", "not", "in"):
            column = value
        else:
            raise self.fail("a column name", (kind, value, pos))
        tok = self.next()
        if tok[0] == "op":
            return Condition(column, tok[1], (self.value(),))
        if tok[0] == "name" and tok[1] == "in":
            return Condition(column, "in", self.values())
        if tok[0] == "name" and tok[1] == "not":
            nxt = self.next()
            if nxt[0] == "name" and nxt[1] == "in":
                return Condition(column, "not in", self.values())
            raise self.fail("'in' after 'not'", nxt)
        raise self.fail(f"one of {', '.join(COMPARISONS)}, 'in' or 'not in' after {column!r}", tok)

    def value(self) -> Value:
        kind, text, pos = self.next()
        if kind == "number":
            return Value(text, number=float(text))
        if kind == "string":
            return Value(text[1:-1])
        if kind == "name" and text.lower() in ("true", "false"):
            return Value(text, boolean=text.lower() == "true", number=1.0 if text.lower() == "true" else 0.0)
        if kind == "name" and text not in ("and", "or", "not", "in"):
            return Value(text)
        raise self.fail("a value (number, 'text' or name)", (kind, text, pos))

    def values(self) -> tuple[Value, ...]:
        tok = self.next()
        if tok[0] != "lbr":
            raise self.fail("'[' starting a list of values", tok)
        vals = [self.value()]
        while True:
            tok = self.next()
            if tok[0] == "rbr":
                return tuple(vals)
            if tok[0] != "comma":
                raise self.fail("',' or ']'", tok)
            vals.append(self.value())


def _match(col: pd.Series, cond: Condition, option: str, text: str) -> npt.NDArray[np.bool_]:
    present = col.notna().to_numpy()
    numeric = pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)
    if numeric:
        bad = [v.text for v in cond.values if v.number is None]
        if bad:
            raise InputError(f"{option} {text!r}: column {cond.column!r} is numeric but {bad[0]!r} is not a number")
        data = col.astype(float).to_numpy()
        targets = np.array([v.number for v in cond.values], dtype=float)
    else:
        if cond.op in ORDERING:
            raise InputError(f"{option} {text!r}: {cond.op!r} needs a numeric column; {cond.column!r} holds text")
        data = np.array([None if pd.isna(v) else str(v) for v in col], dtype=object)
        targets = np.array([v.text for v in cond.values], dtype=object)
    if cond.op == "in":
        hit = np.isin(data, targets)
    elif cond.op == "not in":
        hit = ~np.isin(data, targets)
    else:
        t = targets[0]
        hit = {
            "==": lambda: data == t,
            "!=": lambda: data != t,
            "<": lambda: data < t,
            "<=": lambda: data <= t,
            ">": lambda: data > t,
            ">=": lambda: data >= t,
        }[cond.op]()
    return np.asarray(hit, dtype=bool) & present
