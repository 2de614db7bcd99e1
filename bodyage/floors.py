"""What a region ranking must beat: model-free floors and null-model bands (docs/design.md §6).

A precision@k means something only beside what needs no trained model. Two kinds of
baseline, both scored exactly like the method (the caller passes its scoring function, so
``k`` and ties are the method's own):

**Floors** (:func:`floor_scores`): rankings of the regions read from the images and masks
alone (:mod:`bodyage.region_signals`), larger = ranked higher:

``volume``
    Mean region volume over scans.
``volume_intensity``
    Mean summed signal (volume × mean water + fat signal).
``signal_spread``
    Between-scan spread of the region's mean signal, the larger of two numbers on one
    scale, a fraction of the region's total signal: the SD of its mean fat fraction
    (fat / (water + fat)) and the SD of its mean water signal divided by the cohort mean of
    its total signal (water + fat). Dividing water by its own mean instead would let the
    noisy, near-zero water of fat tissue dominate. No ages used.
``univariate_screen``
    The largest |Spearman ρ| with age of the region's mean fat fraction, mean water
    signal or volume over scans: what a one-line screen of the table finds.

**Nulls** (:func:`null_entry`): the same method's importance from models that cannot know
age: ``random_weights`` (randomised copies of the fold models) and ``permuted_labels``
(models trained on ages shuffled within fold), one ranking per copy, read from
``RUN/attributions_null.parquet`` (the columns of ``attributions.parquet`` plus ``null``
and ``copy``). A region *clears the nulls* when its trained importance is above the
97.5th percentile of its importance over the copies of each null kind (:func:`null_band`;
with one copy, that copy's value): with ``n`` copies of a kind, a region the model does not
use clears that kind by chance with probability about ``1 / (n + 1)``.

numpy and pandas only: :mod:`analysis` uses this module too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

#: the floors, in the order they are reported
FLOORS: tuple[str, ...] = ("volume", "volume_intensity", "signal_spread", "univariate_screen")
#: how the floors are named in texts
FLOOR_NAMES: dict[str, str] = {
    "volume": "volume",
    "volume_intensity": "volume × intensity",
    "signal_spread": "signal spread",
    "univariate_screen": "univariate screen",
}
#: the null models, in the order they are reported
NULL_KINDS: tuple[str, ...] = ("random_weights", "permuted_labels")
NULL_NAMES: dict[str, str] = {"random_weights": "random-weight null", "permuted_labels": "permuted-label null"}
#: null-model attributions under the run folder
NULLS_FILE = "attributions_null.parquet"
#: percentiles of the copies' precision@k reported as ``ci_low`` and ``ci_high``
NULL_INTERVAL: tuple[float, float] = (2.5, 97.5)

Scorer = Callable[[pd.Series], float]
Importance = Callable[[pd.DataFrame], pd.Series]


def _spearman_abs(x: pd.Series, y: pd.Series) -> float:
    both = pd.concat([x.rename("x"), y.rename("y")], axis=1).dropna()
    if len(both) < 3:
        return math.nan
    rx, ry = both["x"].rank().to_numpy(), both["y"].rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return abs(float(np.corrcoef(rx, ry)[0, 1]))


def floor_scores(signals: pd.DataFrame) -> dict[str, pd.Series]:
    """The model-free rankings of the regions (see the module docstring).

    Parameters
    ----------
    signals
        :func:`bodyage.region_signals.region_signals`'s table: one row per (scan, region
        present), columns ``region``, ``age``, ``volume_ml``, ``water_mean``, ``fat_mean``,
        ``fat_fraction``, ``signal_sum``.

    Returns
    -------
    dict
        ``{floor: Series region -> score}`` for each of :data:`FLOORS`; a region with too
        few scans for a spread or a correlation gets NaN (and so is never ranked).
    """
    by = signals.groupby("region")
    volume = by["volume_ml"].mean()
    total = by["water_mean"].mean() + by["fat_mean"].mean()
    spread = pd.concat(
        [by["fat_fraction"].std(ddof=1), by["water_mean"].std(ddof=1) / total.where(total != 0)],
        axis=1,
    ).max(axis=1, skipna=True)
    screen = {
        str(region): max(
            (_spearman_abs(g[col], g["age"]) for col in ("fat_fraction", "water_mean", "volume_ml")),
            key=lambda v: -math.inf if math.isnan(v) else v,
        )
        for region, g in by
    }
    return {
        "volume": volume,
        "volume_intensity": by["signal_sum"].mean(),
        "signal_spread": spread,
        "univariate_screen": pd.Series(screen, dtype=float),
    }


def floors_entry(scores: Mapping[str, pd.Series], score: Scorer) -> dict[str, Any]:
    """Precision@k of each floor ranking, and the largest.

    Returns
    -------
    dict
        ``floors`` ({floor: precision@k}), ``floor_max`` and ``floor_max_by`` (the floor
        reaching it; the first in :data:`FLOORS` order on ties).
    """
    floors = {name: float(score(scores[name].dropna())) for name in FLOORS if name in scores}
    finite = {k: v for k, v in floors.items() if math.isfinite(v)}
    top = max(finite, key=lambda k: finite[k]) if finite else None
    return {"floors": floors, "floor_max": finite[top] if top else math.nan, "floor_max_by": top}


def null_band(copies: Mapping[int, pd.Series]) -> pd.Series:
    """Upper edge of the null band per region: the 97.5th percentile of its importance over the copies.

    As ``attribution_nulls.csv``'s ``null_high`` (:mod:`bodyage.nulls`): with one copy the
    band is that copy's value; with a few it is close to their maximum.
    """
    wide = pd.concat(list(copies.values()), axis=1)
    return wide.quantile(NULL_INTERVAL[1] / 100.0, axis=1)


def as_share(importance: pd.Series) -> pd.Series:
    """Importance as a share of the model's total over regions (NaN left out of the total)."""
    total = float(importance.abs().sum())
    return importance / total if total > 0 else importance * math.nan


def clears(trained: pd.Series, band: pd.Series) -> list[str]:
    """Regions whose trained importance is strictly above the band, most important first.

    A region missing from the band (no null value) does not clear it.
    """
    both = pd.concat([trained.rename("t"), band.rename("b")], axis=1, join="inner").dropna()
    hit = both.loc[both["t"] > both["b"], "t"]
    return [str(r) for r in sorted(hit.index, key=lambda r: (-float(hit[r]), str(r)))]


def null_entry(
    nulls: pd.DataFrame | None,
    method: str,
    trained: pd.Series,
    importance: Importance,
    score: Scorer,
) -> dict[str, Any]:
    """The null-model keys of one method entry.

    Parameters
    ----------
    nulls
        ``attributions_null.parquet`` (``None``: no null models were run).
    method
        The method.
    trained
        Its importance per region on the trained models.
    importance
        Region importance of a table of this method's rows (the same measure as ``trained``).
    score
        The method's scoring (precision@k of an importance series).

    Returns
    -------
    dict
        ``nulls`` ({kind: {``precision_at_k`` (mean over copies), ``ci_low``, ``ci_high``
        (2.5th and 97.5th percentiles over copies; with one copy both equal its value),
        ``n_copies``, ``per_copy``, ``clears``}}), ``clears_nulls`` (regions whose share of
        the trained model's importance is above the band of the copies' shares, for every
        kind present) and ``beats_nulls_by`` (precision@k − the largest null
        ``precision_at_k``). All three ``None`` when there are no null rows for the
        method.
    """
    empty: dict[str, Any] = {"nulls": None, "clears_nulls": None, "beats_nulls_by": None}
    if nulls is None or nulls.empty:
        return empty
    rows = nulls[nulls["method"].astype(str) == method]
    if rows.empty:
        return empty
    out: dict[str, Any] = {}
    cleared: set[str] | None = None
    for kind in [k for k in NULL_KINDS if k in set(rows["null"].astype(str))]:
        sub = rows[rows["null"].astype(str) == kind]
        copies = {int(str(c)): importance(g) for c, g in sub.groupby("copy", sort=True)}
        precisions = [float(score(imp.dropna())) for imp in copies.values()]
        finite = [p for p in precisions if math.isfinite(p)]
        lo, hi = (float(np.percentile(finite, q)) for q in NULL_INTERVAL) if finite else (math.nan, math.nan)
        # on each model's own scale (share of its total importance): a null model's output barely moves,
        # so its raw importance is tiny everywhere and every region would clear it
        kind_clears = clears(as_share(trained), null_band({c: as_share(v) for c, v in copies.items()}))
        out[kind] = {
            "precision_at_k": float(np.mean(finite)) if finite else math.nan,
            "ci_low": lo,
            "ci_high": hi,
            "n_copies": len(copies),
            "per_copy": precisions,
            "clears": kind_clears,
        }
        cleared = set(kind_clears) if cleared is None else cleared & set(kind_clears)
    order = sorted(cleared or (), key=lambda r: (-float(trained[r]), r))
    return {"nulls": out, "clears_nulls": order, "beats_nulls_by": None}


def margins(entry: dict[str, Any]) -> dict[str, Any]:
    """Add ``beats_floors_by`` and ``beats_nulls_by`` (precision@k minus the largest floor / null) to an entry."""
    p = entry.get("precision_at_k")
    fmax = entry.get("floor_max")
    nulls = entry.get("nulls") or {}
    means = [v["precision_at_k"] for v in nulls.values() if math.isfinite(v["precision_at_k"])]
    entry["beats_floors_by"] = None
    entry["beats_nulls_by"] = None
    if isinstance(p, (int, float)) and math.isfinite(p):
        if isinstance(fmax, float) and math.isfinite(fmax):
            entry["beats_floors_by"] = float(p - fmax)
        if means:
            entry["beats_nulls_by"] = float(p - max(means))
    return entry
