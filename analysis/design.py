"""Design matrices built column by column from checked names: no formula sees user text.

DESIGN.md §4 asks that phenotype and covariate names be checked against the cohort
before they reach a model. This module goes one step further: the models of this
package take numeric matrices built here, so no user-supplied name is ever parsed by
patsy/formulaic. A name only ever selects a column after :func:`check_columns` found it.

Coding:

- ``age`` becomes two columns, ``age`` (years, centred on the cohort mean) and
  ``age^2`` (the square of the centred age): DESIGN.md §7 keeps age and age² as
  covariates of every downstream model.
- ``sex`` becomes ``sex[M]`` (1 for men, 0 for women).
- numeric and boolean columns are used as they are; other columns are categorical,
  coded with one indicator per level except the first (sorted) level.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from bodyage.errors import InputError

FloatArray = npt.NDArray[np.float64]

#: covariates used when the caller gives none (DESIGN.md §4)
DEFAULT_COVARIATES: tuple[str, ...] = ("age", "sex")
#: the grouping column used when the caller gives none (DESIGN.md §4)
DEFAULT_GROUP = "site"


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
    for name in covariates:
        col = df[name]
        if name == "age":
            age = numeric_values(df, name, role)
            centred = age - age.mean()
            cols["age"] = centred
            cols["age^2"] = centred**2
        elif name == "sex" and set(col.dropna().astype(str)) <= {"F", "M"}:
            sex = col.astype("string")
            if sex.dropna().nunique() < 2:
                raise InputError(f"{role} 'sex' is constant ({sex.dropna().iloc[0]} in every scan)")
            cols["sex[M]"] = (sex == "M").astype(float).where(sex.notna())
        elif pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
            cols[name] = numeric_values(df, name, role)
        else:
            cols.update(indicator_block(df, name, role=role))
    return pd.DataFrame(cols, index=df.index)


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
    n_missing_phenotype
        Rows excluded because the phenotype(s) were missing.
    n_missing_other
        Rows (with the phenotypes present) excluded because a covariate or the group was missing.
    dropped
        Covariate columns left out because they are constant on the complete rows (e.g.
        ``sex[M]`` in a one-sex subset): collinear with the intercept.
    """

    X: FloatArray
    names: tuple[str, ...]
    rows: npt.NDArray[np.bool_]
    n_missing_phenotype: int
    n_missing_other: int
    dropped: tuple[str, ...] = ()

    @property
    def n(self) -> int:
        """Number of rows used."""
        return int(self.X.shape[0])

    def index(self, name: str) -> int:
        """Column index of term ``name``."""
        return self.names.index(name)


def build_design(
    df: pd.DataFrame,
    phenotypes: Sequence[str],
    covariates: pd.DataFrame,
    *,
    fixed_group: str | None = None,
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
    outcome
        If given, rows where it is missing are excluded too (not counted as missing phenotype).

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
    pheno_ok = frame[list(phenotypes)].notna().all(axis=1).to_numpy()
    other_ok = frame.notna().all(axis=1).to_numpy()
    if fixed_group is not None:
        other_ok = other_ok & df[fixed_group].notna().to_numpy()
    rows = pheno_ok & other_ok
    if outcome is not None:
        rows = rows & outcome.notna().to_numpy()
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
        n_missing_phenotype=int((~pheno_ok).sum()),
        n_missing_other=int((pheno_ok & ~other_ok).sum()),
        dropped=tuple(c for j, c in enumerate(frame.columns) if j not in keep),
    )
