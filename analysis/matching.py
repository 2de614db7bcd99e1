"""Nearest-neighbour matching without replacement, and covariate balance (SMD).

Matching variables that are text (e.g. ``sex``, ``site``) are matched exactly; numeric
ones (e.g. ``age``) by the smallest distance, each scaled by its standard deviation in
the pooled cohort and reference. Cohort members are taken in a seeded random order
(greedy matching depends on the order; a fixed seed makes it reproducible), each picks
its nearest still-unused reference member; with ``ratio = k`` this is repeated ``k``
rounds. An optional caliper (in standard deviations) leaves a cohort member unmatched
when no reference member is that close; unmatched members are dropped and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from bodyage.errors import InputError

IntArray = npt.NDArray[np.intp]


@dataclass(frozen=True)
class Matching:
    """Positions (into the table given to :func:`match_nearest`) of the matched groups.

    Attributes
    ----------
    cohort
        Cohort members kept (those with at least one match).
    reference
        Matched reference members (``ratio`` per kept cohort member at most).
    n_unmatched
        Cohort members left without a match (caliper, or no reference member left in their stratum).
    n_missing
        Cohort and reference members left out because a matching variable was missing.
    """

    cohort: IntArray
    reference: IntArray
    n_unmatched: int
    n_missing: int


def _is_exact(col: pd.Series) -> bool:
    return not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col))


def match_nearest(
    data: pd.DataFrame,
    cohort: IntArray,
    reference: IntArray,
    on: Sequence[str],
    *,
    ratio: int = 1,
    caliper: float | None = None,
    seed: int = 0,
) -> Matching:
    """Match reference members to cohort members (see the module docstring).

    Parameters
    ----------
    data
        Table holding the matching variables.
    cohort, reference
        Positions of the two groups in ``data`` (disjoint).
    on
        Matching variables (columns of ``data``).
    ratio
        Reference members per cohort member.
    caliper
        Largest allowed distance, in pooled standard deviations; ``None``: no limit.
    seed
        Seed of the order in which cohort members choose.

    Raises
    ------
    InputError
        If a matching variable is not a column, or ``ratio`` < 1.
    """
    for name in on:
        if name not in data.columns:
            raise InputError(
                f"matching variable {name!r} is not a column; columns: {', '.join(map(str, data.columns))}"
            )
    if ratio < 1:
        raise InputError(f"matching ratio must be at least 1, got {ratio}")
    exact = [c for c in on if _is_exact(data[c])]
    numeric = [c for c in on if c not in exact]
    complete = data[list(on)].notna().all(axis=1).to_numpy()
    c_ok = cohort[complete[cohort]]
    r_ok = reference[complete[reference]]
    n_missing = len(cohort) - len(c_ok) + len(reference) - len(r_ok)
    pooled = np.concatenate([c_ok, r_ok])
    if numeric:
        values = data[numeric].to_numpy(float)
        sd = values[pooled].std(axis=0, ddof=1) if len(pooled) > 1 else np.ones(len(numeric))
        sd[~(sd > 0)] = 1.0
        scaled = values / sd
    else:
        scaled = np.zeros((len(data), 0))
    strata = data[exact].astype(str).agg("\x1f".join, axis=1).to_numpy() if exact else np.zeros(len(data), dtype=object)
    rng = np.random.default_rng(seed)
    order = c_ok[rng.permutation(len(c_ok))]
    used = np.zeros(len(data), dtype=bool)
    by_stratum: dict[object, IntArray] = {}
    for s in pd.unique(strata[r_ok]):
        by_stratum[s] = r_ok[strata[r_ok] == s]
    picks: dict[int, list[int]] = {int(i): [] for i in order}
    for _ in range(ratio):
        for i in order:
            pool = by_stratum.get(strata[i])
            if pool is None:
                continue
            free = pool[~used[pool]]
            if free.size == 0:
                continue
            dist = np.sqrt(((scaled[free] - scaled[i]) ** 2).sum(axis=1)) if numeric else np.zeros(free.size)
            j = int(np.argmin(dist))
            if caliper is not None and dist[j] > caliper:
                continue
            used[free[j]] = True
            picks[int(i)].append(int(free[j]))
    kept = np.array(sorted(i for i, p in picks.items() if p), dtype=np.intp)
    matched = np.array(sorted(j for p in picks.values() for j in p), dtype=np.intp)
    return Matching(cohort=kept, reference=matched, n_unmatched=len(c_ok) - len(kept), n_missing=n_missing)


def standardised_mean_difference(a: npt.ArrayLike, b: npt.ArrayLike, *, binary: bool = False) -> float:
    """Standardised mean difference ``(mean_a - mean_b) / √((var_a + var_b) / 2)``.

    For a 0/1 variable (``binary``) the variances are ``p(1 - p)``. NaN when undefined.
    """
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    if x.size == 0 or y.size == 0:
        return float("nan")
    if binary:
        va, vb = x.mean() * (1 - x.mean()), y.mean() * (1 - y.mean())
    else:
        va = x.var(ddof=1) if x.size > 1 else 0.0
        vb = y.var(ddof=1) if y.size > 1 else 0.0
    denom = np.sqrt((va + vb) / 2)
    diff = x.mean() - y.mean()
    if denom == 0:
        return 0.0 if diff == 0 else float("nan")
    return float(diff / denom)


def balance_table(
    data: pd.DataFrame,
    cohort_before: IntArray,
    reference_before: IntArray,
    variables: Sequence[str],
    cohort_after: IntArray | None = None,
    reference_after: IntArray | None = None,
) -> pd.DataFrame:
    """Covariate balance of the groups before and after matching.

    Parameters
    ----------
    data
        Table holding the variables.
    cohort_before, reference_before
        Positions of the groups as selected, before matching (members with a missing
        matching variable included: each variable's mean skips its own missing values).
    variables
        Columns to describe.
    cohort_after, reference_after
        Positions of the matched groups; ``None``: no matching.

    Returns
    -------
    pandas.DataFrame
        One row per numeric variable, and per level of a text variable (its share; for
        two levels only the second): ``variable``, ``level``, ``cohort_mean_before``,
        ``reference_mean_before``, ``smd_before``, ``cohort_mean_after``,
        ``reference_mean_after``, ``smd_after`` (NaN ``*_after`` without matching).
        ``|SMD| < 0.1`` is the usual threshold of good balance.
    """
    empty = np.array([], dtype=np.intp)
    c_after = cohort_after if cohort_after is not None else empty
    r_after = reference_after if reference_after is not None else empty

    def mean(values: np.ndarray, idx: IntArray) -> float:
        part = values[idx]
        return float(np.nanmean(part)) if np.isfinite(part).any() else float("nan")

    def smd(values: np.ndarray, a: IntArray, b: IntArray, binary: bool) -> float:
        if not (len(a) and len(b)):
            return float("nan")
        return standardised_mean_difference(values[a], values[b], binary=binary)

    rows = []
    for var in dict.fromkeys(variables):
        col = data[var]
        if _is_exact(col):
            text = col.astype("string")
            levels = sorted(text.dropna().unique())
            shown = levels[1:] if len(levels) == 2 else levels
            series = [(str(lev), (text == lev).astype(float).where(text.notna()).to_numpy(), True) for lev in shown]
        else:
            series = [("", col.astype(float).to_numpy(), False)]
        for level, values, binary in series:
            rows.append(
                {
                    "variable": var,
                    "level": level,
                    "cohort_mean_before": mean(values, cohort_before),
                    "reference_mean_before": mean(values, reference_before),
                    "smd_before": smd(values, cohort_before, reference_before, binary),
                    "cohort_mean_after": mean(values, c_after),
                    "reference_mean_after": mean(values, r_after),
                    "smd_after": smd(values, c_after, r_after, binary),
                }
            )
    return pd.DataFrame(rows)
