"""Benjamini–Hochberg false discovery rate control, and the families it runs over.

FDR control holds within a family only: with ``fdr_family="phenotype"`` every method ×
phenotype is its own family, so under the complete null the chance that *some* family
reports a region grows with the number of families. The families of the region analyses
(:data:`analysis._typing.FDR_FAMILIES`):

``method`` (default, docs/design.md §7)
    every region × phenotype of one attribution method;
``phenotype``
    the regions of one method × phenotype: one phenotype's many discoveries cannot loosen
    another's threshold, but each of the methods × phenotypes families may add a false one;
``all``
    every region × phenotype × method together: the FDR holds over everything the region
    tables report, at the price of power when many tests are null.

The phenotype (age-gap) models are a family of their own: the phenotypes of each model.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pandas as pd

from analysis._typing import FDR_FAMILIES, FdrFamily
from bodyage.errors import InputError

#: the columns whose values split the tests into families, per ``fdr_family``
FAMILY_KEYS: dict[FdrFamily, tuple[str, ...]] = {
    "method": ("method",),
    "phenotype": ("method", "phenotype"),
    "all": (),
}

_FAMILY_WORDS: dict[FdrFamily, str] = {
    "method": "all regions and phenotypes of each method",
    "phenotype": "the regions of each method and phenotype",
    "all": "all regions, phenotypes and methods together",
}
#: the same without a phenotype dimension (partial correlations with the age gap)
_FAMILY_WORDS_NO_PHENOTYPE: dict[FdrFamily, str] = {
    "method": "the regions of each method",
    "phenotype": "the regions of each method",
    "all": "the regions of all methods together",
}


def benjamini_hochberg(p: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Return Benjamini–Hochberg adjusted p-values (q-values) of ``p``.

    ``q_i = min_{j: p_j >= p_i} min(1, m p_j / rank_j)`` over the ``m`` finite p-values;
    a missing p-value (NaN) gets a missing q-value and does not count in ``m``. Rejecting
    every hypothesis with ``q <= alpha`` controls the false discovery rate at ``alpha``
    (independent or positively dependent tests).

    Parameters
    ----------
    p
        p-values, any shape.

    Returns
    -------
    numpy.ndarray
        q-values, same shape as ``p``.
    """
    arr = np.asarray(p, dtype=float)
    flat = arr.ravel()
    out = np.full(flat.shape, np.nan)
    ok = np.isfinite(flat)
    m = int(ok.sum())
    if m == 0:
        return out.reshape(arr.shape)
    pv = flat[ok]
    order = np.argsort(pv, kind="mergesort")
    ranked = pv[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum.accumulate(ranked[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(q_sorted, 1.0)
    out[ok] = q
    return out.reshape(arr.shape)


def check_family(family: str) -> FdrFamily:
    """Return ``family`` if it is one of :data:`analysis._typing.FDR_FAMILIES`.

    Raises
    ------
    InputError
        Naming the option and the choices.
    """
    if family not in FDR_FAMILIES:
        raise InputError(f"--fdr-family must be one of {', '.join(FDR_FAMILIES)}; {family!r} was provided")
    return family


def family_q(df: pd.DataFrame, family: FdrFamily, *, p: str = "p") -> npt.NDArray[np.float64]:
    """Benjamini–Hochberg q-values of ``df[p]`` within each family.

    Parameters
    ----------
    df
        Tests, one per row, with the columns of :data:`FAMILY_KEYS` that ``family`` needs
        (``method``, ``phenotype``); a key column that is absent does not split.
    family
        ``"method"``, ``"phenotype"`` or ``"all"``.
    p
        The p-value column.

    Returns
    -------
    numpy.ndarray
        q-values aligned with the rows of ``df`` (NaN where ``p`` is missing).

    Raises
    ------
    InputError
        For an unknown family.
    """
    keys = [k for k in FAMILY_KEYS[check_family(family)] if k in df.columns]
    values = df[p].to_numpy(float)
    if not keys:
        return benjamini_hochberg(values)
    q = np.full(len(df), np.nan)
    for rows in df.groupby(keys, sort=False, observed=True).indices.values():
        q[rows] = benjamini_hochberg(values[rows])
    return q


def family_text(family: str, *, phenotypes: bool = True) -> str:
    """Words for the tests a Benjamini–Hochberg family spans, for notes and summaries.

    Parameters
    ----------
    family
        ``"method"``, ``"phenotype"`` or ``"all"``; anything else is returned as it is.
    phenotypes
        ``False`` for analyses without a phenotype dimension (partial correlations of
        regions with the age gap), where ``"phenotype"`` families equal ``"method"``.
    """
    words = _FAMILY_WORDS if phenotypes else _FAMILY_WORDS_NO_PHENOTYPE
    return words.get(family, family)  # type: ignore[call-overload]
