"""Variability of region importance across training runs: the fold models.

Each fold model explains its own test scans, so the folds are independent training runs
of the same recipe on different subjects. The importance of a region is computed per
fold (mean over that fold's scans of the method's ranking measure) and summarised over
folds: the mean, the min–max and a t-interval (:func:`fold_stability`). The per-scan
standard error that figures used before ignores the variance that dominates, that of the
model (different training draws rank the regions differently), and so looks far more
certain than a re-run would be.

The ``share`` columns put the same numbers on the scale of the null bands
(``attribution_nulls.csv``'s ``*_share`` columns, :mod:`bodyage.nulls`): a region's part of
the total importance over the regions. ``share`` is ``importance`` divided by its sum over
the regions; ``share_min``/``share_max`` the min–max over folds of each fold's own share
(its importance divided by that fold's total). A ratio of sums lies between the smallest
and the largest of the ratios, so ``share`` lies within ``[share_min, share_max]`` when
every region is present in every fold.

Rank stability over folds:

- Kendall's W (coefficient of concordance, with the tie correction) of the folds'
  rankings of the regions present in every fold: 1 when every fold ranks the regions the
  same, near 0 when the rankings are unrelated;
- top-k Jaccard: for each pair of folds, |top_k(a) ∩ top_k(b)| / |top_k(a) ∪ top_k(b)|,
  its mean and minimum over pairs.

No torch here: the functions work on ``attributions.parquet``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: file of the per-region over-folds intervals, in the run folder
STABILITY = "attribution_stability.csv"
#: regions compared by the top-k Jaccard when the study plants no truth
DEFAULT_TOP_K = 8
STABILITY_COLUMNS: tuple[str, ...] = (
    "method",
    "measure",
    "region",
    "importance",
    "fold_min",
    "fold_max",
    "ci_low",
    "ci_high",
    "n_folds",
    "share",
    "share_min",
    "share_max",
)


def ranking_column(sub: pd.DataFrame, measure: str) -> pd.Series:
    """Per row the value a ranking measure averages: ``|mass|`` for ``abs_mass``, ``|density|`` for ``density``."""
    if measure == "abs_mass":
        return sub["mass"].abs()
    if measure == "density":
        return sub["density"].abs()
    return sub[measure]


def fold_importance(attributions: pd.DataFrame, method: str, measure: str) -> pd.DataFrame:
    """Region × fold table of importance: mean over each fold's scans (NaN where absent)."""
    sub = attributions[attributions["method"] == method]
    vals = ranking_column(sub, measure)
    return vals.groupby([sub["region"], sub["fold"]]).mean().unstack("fold")


def kendall_w(ranks_by_rater: pd.DataFrame) -> float:
    """Kendall's W of a regions × raters table of values (ranked per rater, ties averaged).

    NaN with fewer than 2 raters or 2 items.
    """
    table = ranks_by_rater.dropna()
    n, m = table.shape
    if m < 2 or n < 2:
        return math.nan
    ranks = table.rank(axis=0)
    total = ranks.sum(axis=1).to_numpy()
    s = float(((total - total.mean()) ** 2).sum())
    ties = 0.0
    for col in ranks.columns:
        counts = ranks[col].value_counts().to_numpy(dtype=float)
        ties += float((counts**3 - counts).sum())
    den = m**2 * (n**3 - n) - m * ties
    return float(12.0 * s / den) if den > 0 else math.nan


def top_k(values: pd.Series, k: int) -> set[str]:
    """The ``k`` largest (ties by name), as a set."""
    v = values.dropna()
    return set(sorted(v.index, key=lambda r: (-float(v[r]), str(r)))[:k])


def fold_stability(
    attributions: pd.DataFrame, method: str, measure: str, k: int = DEFAULT_TOP_K
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-region importance over fold models with intervals, and rank stability.

    Parameters
    ----------
    attributions
        ``attributions.parquet`` (needs ``fold``).
    method
        The method.
    measure
        Its ranking measure (``abs_mass``: ``|mass|``).
    k
        Regions in the top-k Jaccard.

    Returns
    -------
    tuple
        The table (:data:`STABILITY_COLUMNS`, largest importance first; ``ci_low``/``ci_high``
        a 95% t-interval over folds, NaN with one fold; ``share``, ``share_min``,
        ``share_max``: the same as parts of the total over regions) and a summary:
        ``n_folds``, ``k``, ``kendall_w``, ``top_k_jaccard_mean``, ``top_k_jaccard_min``, ``top_k_jaccard_values``.
    """
    from scipy import stats

    per_fold = fold_importance(attributions, method, measure)
    n = per_fold.notna().sum(axis=1)
    mean = per_fold.mean(axis=1)
    sd = per_fold.std(axis=1, ddof=1)
    tq = np.array([stats.t.ppf(0.975, df) if df >= 1 else np.nan for df in (n - 1)], dtype=float)
    half = tq * sd.to_numpy() / np.sqrt(n.to_numpy().clip(min=1))
    fold_shares = per_fold / per_fold.sum(axis=0)
    table = pd.DataFrame(
        {
            "method": method,
            "measure": measure,
            "region": per_fold.index.astype(str),
            "importance": mean.to_numpy(),
            "fold_min": per_fold.min(axis=1).to_numpy(),
            "fold_max": per_fold.max(axis=1).to_numpy(),
            "ci_low": mean.to_numpy() - half,
            "ci_high": mean.to_numpy() + half,
            "n_folds": n.to_numpy(),
            "share": (mean / mean.sum()).to_numpy(),
            "share_min": fold_shares.min(axis=1).to_numpy(),
            "share_max": fold_shares.max(axis=1).to_numpy(),
        }
    )
    table = table.dropna(subset=["importance"]).sort_values("importance", ascending=False, kind="mergesort")
    jac = []
    for a, b in combinations(per_fold.columns, 2):
        ta, tb = top_k(per_fold[a], k), top_k(per_fold[b], k)
        union = ta | tb
        jac.append(len(ta & tb) / len(union) if union else math.nan)
    summary: dict[str, Any] = {
        "n_folds": int(per_fold.shape[1]),
        "k": int(k),
        "kendall_w": kendall_w(per_fold),
        "top_k_jaccard_mean": float(np.mean(jac)) if jac else math.nan,
        "top_k_jaccard_min": float(np.min(jac)) if jac else math.nan,
        "top_k_jaccard_values": [float(j) for j in jac],
    }
    return table.reset_index(drop=True)[list(STABILITY_COLUMNS)], summary


def stability_tables(
    attributions: pd.DataFrame, measures: dict[str, str], ks: dict[str, int] | None = None
) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """:func:`fold_stability` of every method in ``measures``: one long table and the summaries."""
    tables, summaries = [], {}
    for method, measure in measures.items():
        if not (attributions["method"] == method).any():
            continue
        table, summary = fold_stability(attributions, method, measure, (ks or {}).get(method, DEFAULT_TOP_K))
        tables.append(table)
        summaries[method] = summary
    out = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=list(STABILITY_COLUMNS))
    return out, summaries


#: file of the per-region intervals over several training runs (``attribute --runs``)
RUN_STABILITY = "attribution_stability_runs.csv"


def runs_stability(
    attributions: pd.DataFrame,
    others: Sequence[str | os.PathLike[str]],
    measures: dict[str, str],
    ks: dict[str, int] | None = None,
) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """Importance over several training runs (other seeds) of the same study, with rank stability.

    Each run's cohort importance is the mean over all its scans (every scan by its own
    fold model); the table and summary are those of :func:`fold_stability` with runs in
    place of folds (``n_folds``, ``fold_min``, ``fold_max`` renamed ``n_runs``,
    ``run_min``, ``run_max``; ``share_min``/``share_max`` are over runs). This run is run 0, ``others`` follow.

    Parameters
    ----------
    attributions
        This run's ``attributions.parquet``.
    others
        Other run folders, each already explained by ``bodyage attribute``.
    measures
        Method -> ranking measure.
    ks
        Method -> k of the top-k Jaccard.

    Raises
    ------
    InputError
        An other run without ``attributions.parquet``, or without a method of this run.
    """
    from bodyage.errors import InputError

    tables = [attributions.assign(fold=0)]
    for i, other in enumerate(others, start=1):
        path = Path(other) / "attributions.parquet"
        if not path.is_file():
            raise InputError(f"--runs: {path} not found; run `bodyage attribute` on {other} first")
        df = pd.read_parquet(path)
        missing = sorted(set(measures) - set(df["method"]))
        if missing:
            raise InputError(f"--runs: {path} has no {', '.join(missing)} rows; attribute it with the same --method")
        tables.append(df.assign(fold=i))
    table, summaries = stability_tables(pd.concat(tables, ignore_index=True), measures, ks)
    table = table.rename(columns={"n_folds": "n_runs", "fold_min": "run_min", "fold_max": "run_max"})
    for s in summaries.values():
        s["n_runs"] = s.pop("n_folds")
        s["runs"] = [Path(r).name for r in others]
    return table, summaries
