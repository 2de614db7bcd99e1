"""Design matrices built column by column from checked names: no formula sees user text.

docs/design.md §4 asks that phenotype and covariate names be checked against the cohort
before they reach a model. This module goes one step further: the models of this
package take numeric matrices built here, so no user-supplied name is ever parsed by
patsy/formulaic. A name only ever selects a column after :func:`check_columns` found it.

Coding:

- ``age`` becomes two columns, ``age`` (years, centred on the cohort mean) and
  ``age^2`` (the square of the centred age): docs/design.md §7 keeps age and age² as
  covariates of every downstream model.
- ``sex`` becomes ``sex[M]`` (1 for men, 0 for women).
- numeric and boolean columns are used as they are; other columns are categorical,
  coded with one indicator per level except the first (sorted) level.

Exclusions: :func:`build_design` keeps the complete rows and counts every row it leaves
out under exactly one reason, the first that applies in this order: a missing phenotype
(:data:`MISSING_PHENOTYPE`), a missing value of each covariate in turn
(``"missing_covariate:<name>"``), a missing group (:data:`MISSING_GROUP`), anything else
(:data:`OTHER`, e.g. a missing outcome). The counts therefore add up to the rows left out.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pandas as pd

from bodyage.errors import InputError

FloatArray = npt.NDArray[np.float64]

#: covariates used when the caller gives none (docs/design.md §4)
DEFAULT_COVARIATES: tuple[str, ...] = ("age", "sex")
#: the grouping column used when the caller gives none (docs/design.md §4)
DEFAULT_GROUP = "site"

#: exclusion reasons (keys of :attr:`Design.exclusions`); a covariate's key is ``MISSING_COVARIATE + name``
MISSING_PHENOTYPE = "missing_phenotype"
MISSING_COVARIATE = "missing_covariate:"
MISSING_GROUP = "missing_group"
OTHER = "other"
#: model-row columns holding the exclusion counts (:func:`exclusion_columns`)
EXCLUSION_COLUMNS: tuple[str, ...] = (
    "n_missing_phenotype",
    "n_missing_covariate",
    "n_missing_group",
    "n_missing_other",
    "missing_by_covariate",
)


def check_columns(df: pd.DataFrame, names: Iterable[str], role: str) -> None:
    """Raise :class:`InputError` if a name is not a column of ``df``.

    Parameters
    ----------
    role
        What the names are (``"phenotype"``, ``"covariate"``, ``"group"``), for the message.
    """
    for name in names:
        if name not in df.columns:
            known = ", ".join(str(c) for c in df.columns)
            raise InputError(f"{role} {name!r} is not a column of the cohort or predictions; columns: {known}")


def numeric_values(df: pd.DataFrame, name: str, role: str) -> pd.Series:
    """Return column ``name`` as floats, checking that it can be a numeric model term.

    Booleans become 0/1. Missing values stay NaN (the caller excludes and counts them).

    Raises
    ------
    InputError
        If the column is missing, not numeric, entirely missing, or constant.
    """
    check_columns(df, [name], role)
    col = df[name]
    if pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
        values = col.astype(float)
    else:
        present = col.dropna()
        example = ", ".join(repr(v) for v in pd.unique(present)[:3])
        raise InputError(
            f"{role} {name!r} is not numeric (values like {example}); code it as numbers (e.g. 0/1 for a binary trait)"
        )
    finite = values[np.isfinite(values.to_numpy())]
    if finite.empty:
        raise InputError(f"{role} {name!r} has no non-missing values")
    if finite.nunique() < 2:
        raise InputError(f"{role} {name!r} is constant ({finite.iloc[0]:g} in every scan with a value)")
    return values.where(np.isfinite(values.to_numpy()))


def is_binary(values: pd.Series) -> bool:
    """Whether the non-missing values are all 0 or 1."""
    v = values.dropna().unique()
    return bool(len(v) > 0 and np.isin(v, (0.0, 1.0)).all())


def covariate_block(df: pd.DataFrame, covariates: Sequence[str], *, role: str = "covariate") -> pd.DataFrame:
    """Return the numeric columns coding ``covariates`` (NaN where a value is missing).

    See the module docstring for the coding.

    Raises
    ------
    InputError
        If a covariate is not a column, entirely missing, or constant.
    """
    check_columns(df, covariates, role)
    cols: dict[str, pd.Series] = {}
    sources: dict[str, str] = {}
    for name in covariates:
        col = df[name]
        if name == "age":
            age = numeric_values(df, name, role)
            centred = age - age.mean()
            block = {"age": centred, "age^2": centred**2}
        elif name == "sex" and set(col.dropna().astype(str)) <= {"F", "M"}:
            sex = col.astype("string")
            if sex.dropna().nunique() < 2:
                raise InputError(f"{role} 'sex' is constant ({sex.dropna().iloc[0]} in every scan)")
            block = {"sex[M]": (sex == "M").astype(float).where(sex.notna())}
        elif pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
            block = {name: numeric_values(df, name, role)}
        else:
            block = indicator_block(df, name, role=role)
        cols.update(block)
        sources.update(dict.fromkeys(block, name))
    out = pd.DataFrame(cols, index=df.index)
    out.attrs["sources"] = sources
    return out


def covariate_list(listed: str | Sequence[str]) -> str:
    """The covariates of a model as a note says them: ``"age, age², sex"``, or ``"no covariate"``.

    Parameters
    ----------
    listed
        Covariate names, or the ``covariates`` column of a result table (names joined by ``", "``).
        ``age`` brings ``age²`` (see the module docstring), so ``age²`` is named only when age is in.
    """
    names = [n for n in (listed.split(", ") if isinstance(listed, str) else listed) if n]
    out: list[str] = []
    for name in names:
        out.append(name)
        if name == "age":
            out.append("age²")
    return ", ".join(out) if out else "no covariate"


def indicator_block(df: pd.DataFrame, name: str, *, role: str) -> dict[str, pd.Series]:
    """Code a categorical column with one 0/1 column per level except the first.

    Raises
    ------
    InputError
        If the column is entirely missing or has a single level.
    """
    col = df[name]
    present = col.dropna().astype(str)
    if present.empty:
        raise InputError(f"{role} {name!r} has no non-missing values")
    levels = sorted(present.unique())
    if len(levels) < 2:
        raise InputError(f"{role} {name!r} is constant ({levels[0]!r} in every scan with a value)")
    text = col.astype("string")
    return {f"{name}[{lev}]": (text == lev).astype(float).where(text.notna()) for lev in levels[1:]}


@dataclass(frozen=True)
class Design:
    """A model matrix on the complete rows of a table.

    Attributes
    ----------
    X
        ``(n, p)`` float matrix; column 0 is the intercept.
    names
        ``p`` column names.
    rows
        Boolean mask over the table's rows: the complete cases used.
    exclusions
        Rows left out, by reason (module docstring): :data:`MISSING_PHENOTYPE`, one
        ``"missing_covariate:<name>"`` per covariate, :data:`MISSING_GROUP`, :data:`OTHER`;
        each row is counted once, so the counts add up to the rows left out.
    dropped
        Covariate columns left out because they are constant on the complete rows (e.g.
        ``sex[M]`` in a one-sex subset): collinear with the intercept.
    """

    X: FloatArray
    names: tuple[str, ...]
    rows: npt.NDArray[np.bool_]
    exclusions: Mapping[str, int] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()

    @property
    def n(self) -> int:
        """Number of rows used."""
        return int(self.X.shape[0])

    @property
    def n_missing_phenotype(self) -> int:
        """Rows left out because a phenotype was missing."""
        return int(self.exclusions.get(MISSING_PHENOTYPE, 0))

    @property
    def missing_by_covariate(self) -> dict[str, int]:
        """Rows left out for a missing covariate, per covariate name (zeros included)."""
        k = len(MISSING_COVARIATE)
        return {r[k:]: int(v) for r, v in self.exclusions.items() if r.startswith(MISSING_COVARIATE)}

    @property
    def n_missing_other(self) -> int:
        """Rows left out for a reason other than a missing phenotype, covariate or group (e.g. the outcome)."""
        return int(self.exclusions.get(OTHER, 0))

    def index(self, name: str) -> int:
        """Column index of term ``name``."""
        return self.names.index(name)


def exclusion_columns(design: Design) -> dict[str, object]:
    """The exclusion counts of ``design`` as the columns :data:`EXCLUSION_COLUMNS` of a model row.

    ``missing_by_covariate`` is a JSON object ``{"<covariate>": n, ...}`` (text, so the
    tidy ``.csv`` keeps it); :func:`exclusions_of` reads the columns back.
    """
    by_cov = design.missing_by_covariate
    return {
        "n_missing_phenotype": design.n_missing_phenotype,
        "n_missing_covariate": int(sum(by_cov.values())),
        "n_missing_group": int(design.exclusions.get(MISSING_GROUP, 0)),
        "n_missing_other": design.n_missing_other,
        "missing_by_covariate": json.dumps(by_cov),
    }


def exclusions_of(row: pd.Series | Mapping[str, object]) -> dict[str, int]:
    """Exclusion counts by reason (keys of :attr:`Design.exclusions`) from a model row.

    Reads the columns written by :func:`exclusion_columns`; a row that has only some of
    them (e.g. only ``n_missing_phenotype``) gives the reasons it has.
    """

    def count(key: str) -> int | None:
        value = row.get(key)
        if isinstance(value, (int, float, np.integer, np.floating)) and np.isfinite(value):
            return int(value)
        return None

    out: dict[str, int] = {}
    if (n := count("n_missing_phenotype")) is not None:
        out[MISSING_PHENOTYPE] = n
    by_cov = row.get("missing_by_covariate")
    if isinstance(by_cov, str) and by_cov:
        out.update({MISSING_COVARIATE + str(k): int(v) for k, v in json.loads(by_cov).items()})
    elif (n := count("n_missing_covariate")) is not None:
        out[MISSING_COVARIATE.rstrip(":")] = n
    if (n := count("n_missing_group")) is not None:
        out[MISSING_GROUP] = n
    if (n := count("n_missing_other")) is not None:
        out[OTHER] = n
    return out


def exclusions_by(df: pd.DataFrame, key: str) -> dict[str, dict[str, int]]:
    """:func:`exclusions_of` the first row of each ``key`` value (e.g. per phenotype), in order of appearance."""
    return {str(k): exclusions_of(rows.iloc[0]) for k, rows in df.groupby(key, sort=False)}


def build_design(
    df: pd.DataFrame,
    phenotypes: Sequence[str],
    covariates: pd.DataFrame,
    *,
    fixed_group: str | None = None,
    random_group: str | None = None,
    outcome: pd.Series | None = None,
    role: str = "phenotype",
) -> Design:
    """Build ``[1, phenotypes..., covariates..., group indicators...]`` on complete rows.

    Parameters
    ----------
    df
        The scans table.
    phenotypes
        Numeric phenotype columns (checked with :func:`numeric_values`).
    covariates
        Output of :func:`covariate_block` on ``df``.
    fixed_group
        A grouping column entered as fixed effects (indicators), or ``None``.
    random_group
        A grouping column of a random intercept (not in ``X``), or ``None``: rows where it
        is missing are left out too, as a missing group.
    outcome
        If given, rows where it is missing are excluded too (counted as :data:`OTHER`).

    Raises
    ------
    InputError
        If a phenotype is invalid, or the complete rows leave a phenotype constant.
    """
    pheno = {name: numeric_values(df, name, role) for name in phenotypes}
    blocks: dict[str, pd.Series] = {"(intercept)": pd.Series(1.0, index=df.index)}
    blocks.update(pheno)
    blocks.update({c: covariates[c] for c in covariates.columns})
    if fixed_group is not None:
        blocks.update(indicator_block(df, fixed_group, role="group") if df[fixed_group].nunique() > 1 else {})
    frame = pd.DataFrame(blocks, index=df.index)
    present = frame.notna().to_numpy()
    pos = {c: j for j, c in enumerate(frame.columns)}
    left = np.ones(len(frame), dtype=bool)  # rows not yet counted under a reason
    exclusions: dict[str, int] = {}

    def exclude(reason: str, ok_rows: npt.ArrayLike) -> None:
        nonlocal left
        ok = np.asarray(ok_rows, dtype=bool)
        exclusions[reason] = exclusions.get(reason, 0) + int((left & ~ok).sum())
        left = left & ok

    exclude(MISSING_PHENOTYPE, present[:, [pos[p] for p in phenotypes]].all(axis=1))
    sources: dict[str, str] = covariates.attrs.get("sources", {})
    by_name: dict[str, list[int]] = {}
    for c in covariates.columns:
        by_name.setdefault(sources.get(c, c), []).append(pos[c])
    for name, idx in by_name.items():
        exclude(MISSING_COVARIATE + name, present[:, idx].all(axis=1))
    group_ok = np.ones(len(frame), dtype=bool)
    for g in (fixed_group, random_group):
        if g is not None:
            group_ok &= df[g].notna().to_numpy()
    exclude(MISSING_GROUP, group_ok)
    other_ok = present.all(axis=1)
    if outcome is not None:
        other_ok = other_ok & outcome.notna().to_numpy()
    exclude(OTHER, other_ok)
    rows = left
    if not rows.any():
        raise InputError(f"no scan has every value needed for {role}(s) {', '.join(phenotypes)} and the covariates")
    X = frame.to_numpy(dtype=float)[rows]
    keep = [0] + [j for j in range(1, X.shape[1]) if np.ptp(X[:, j]) > 0 or frame.columns[j] in pheno]
    for name in phenotypes:
        j = list(frame.columns).index(name)
        if np.ptp(X[:, j]) == 0:
            raise InputError(f"{role} {name!r} is constant in the {int(rows.sum())} scan(s) with complete data")
    return Design(
        X=np.ascontiguousarray(X[:, keep]),
        names=tuple(frame.columns[keep]),
        rows=rows,
        exclusions=exclusions,
        dropped=tuple(c for j, c in enumerate(frame.columns) if j not in keep),
    )
