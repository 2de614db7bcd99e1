"""Cross-validation folds grouped by subject and stratified by age, and the age-bias correction.

Torch-free, so the statistics layer and tests can use it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from bodyage.errors import InputError


def assign_folds(cohort: pd.DataFrame, k: int, seed: int) -> pd.Series:
    """Assign each scan a fold in ``0..k-1``: all visits of a subject share a fold.

    Subjects are sorted by their first-visit age and dealt, in blocks of ``k``, to a
    random permutation of the folds, so every fold spans the whole age range
    (stratified by age) and fold sizes differ by at most one subject.

    Raises
    ------
    InputError
        If there are fewer subjects than folds, or ``k`` < 2.
    """
    if k < 2:
        raise InputError(f"--folds must be at least 2, got {k}")
    first_age = cohort.groupby("subject_id")["age"].min().sort_values(kind="mergesort")
    n = len(first_age)
    if n < k:
        raise InputError(f"{k} folds need at least {k} subjects; the cohort has {n}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xF01D]))
    fold_of: dict[str, int] = {}
    subjects = list(first_age.index)
    for start in range(0, n, k):
        block = subjects[start : start + k]
        perm = rng.permutation(k)[: len(block)]
        for s, f in zip(block, perm, strict=True):
            fold_of[str(s)] = int(f)
    return cohort["subject_id"].map(fold_of).astype(int).rename("fold")


def inner_split(cohort: pd.DataFrame, fraction: float, seed: int) -> npt.NDArray[np.bool_]:
    """Mark an age-stratified ``fraction`` of subjects (at least one) for inner validation."""
    if not 0 < fraction < 1:
        raise InputError(f"validation fraction must be in (0, 1), got {fraction}")
    first_age = cohort.groupby("subject_id")["age"].min().sort_values(kind="mergesort")
    n = len(first_age)
    n_val = max(1, round(fraction * n))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1A1]))
    # one subject from each of n_val consecutive age strata
    edges = np.linspace(0, n, n_val + 1).astype(int)
    chosen = {str(first_age.index[rng.integers(lo, hi)]) for lo, hi in itertools.pairwise(edges) if hi > lo}
    return cohort["subject_id"].astype(str).isin(chosen).to_numpy()


@dataclass(frozen=True)
class BiasCorrection:
    """Linear age-bias correction (Beheshti et al. 2019; de Lange & Cole 2020).

    Fitted on held-out predictions: ``predicted = slope · age + intercept``; applied as
    ``corrected = predicted + (age − (slope · age + intercept))``.
    """

    slope: float = 1.0
    intercept: float = 0.0
    n: int = 0

    @classmethod
    def fit(cls, age: Sequence[float] | npt.ArrayLike, predicted: Sequence[float] | npt.ArrayLike) -> BiasCorrection:
        """Least-squares fit of predicted on chronological age; identity with < 3 scans or no age spread."""
        a = np.asarray(age, dtype=float)
        p = np.asarray(predicted, dtype=float)
        if len(a) < 3 or np.ptp(a) == 0:
            return cls(1.0, 0.0, len(a))
        slope, intercept = np.polyfit(a, p, 1)
        return cls(float(slope), float(intercept), len(a))

    def apply(self, age: npt.ArrayLike, predicted: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Corrected predictions."""
        a = np.asarray(age, dtype=float)
        return np.asarray(predicted, dtype=float) + (a - (self.slope * a + self.intercept))


def regression_metrics(age: npt.ArrayLike, predicted: npt.ArrayLike) -> dict[str, float]:
    """n, MAE, RMSE, R² and Pearson r of predictions (NaN where undefined)."""
    y = np.asarray(age, dtype=float)
    p = np.asarray(predicted, dtype=float)
    n = len(y)
    if n == 0:
        return {"n": 0, "mae": float("nan"), "rmse": float("nan"), "r2": float("nan"), "pearson_r": float("nan")}
    err = p - y
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((err**2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    r = float(np.corrcoef(y, p)[0, 1]) if n > 1 and np.std(y) > 0 and np.std(p) > 0 else float("nan")
    return {"n": n, "mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean())), "r2": r2, "pearson_r": r}
