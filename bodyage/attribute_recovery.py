"""Region importance of ``bodyage attribute`` and its recovery of the planted ageing.

:func:`region_importance` ranks the regions of one method (mean importance over scans,
docs/design.md §6); :func:`recovery_summary` writes, per method, the measure and the
ranking and, on a simulated study (``STUDY/truth.json``), precision@k of the planted
regions (:func:`precision_at_k`), Spearman with the planted information
(:func:`spearman`), agreement with ``ablation`` and the floors and nulls that precision
must beat (:mod:`bodyage.floors`).

No torch here: the functions work on ``attributions.parquet``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bodyage.attribution import METHODS


def region_importance(attributions: pd.DataFrame, method: str, measure: str | None = None) -> pd.Series:
    """Mean importance per region over scans (docs/design.md §6), sorted descending.

    ``abs_mass`` means the mean of ``|mass|`` and ``density`` the mean of ``|density|`` (a
    strongly negative region matters as much as a positive one); regions absent from a scan
    are left out of that region's mean.
    """
    measure = measure or METHODS[method].importance_measure
    sub = attributions[attributions["method"] == method]
    vals = sub["mass"].abs() if measure == "abs_mass" else sub[measure]
    if measure == "density":
        vals = vals.abs()
    imp = vals.groupby(sub["region"]).mean().dropna()
    return imp.sort_values(ascending=False, kind="mergesort")


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman rank correlation over the common index (NaN when undefined)."""
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    if len(both) < 3:
        return math.nan
    ra, rb = both["a"].rank().to_numpy(), both["b"].rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def precision_at_k(importance: pd.Series, information: dict[str, float]) -> dict[str, Any]:
    """precision@k of the planted regions (k = regions with information > 0) and Spearman."""
    info = pd.Series({str(k): float(v) for k, v in information.items()}, dtype=float)
    planted = set(info.index[info > 0])
    k = len(planted)
    order = sorted(importance.index, key=lambda r: (-float(importance[r]), str(r)))
    top = order[:k]
    return {
        "k": k,
        "precision_at_k": len(planted.intersection(top)) / k if k else math.nan,
        "spearman": spearman(info.reindex(importance.index).fillna(0.0), importance),
        "top_regions": top,
    }


def _importance_of(method: str, measure: str, table: pd.DataFrame) -> pd.Series:
    """:func:`region_importance` with the arguments in the order :func:`functools.partial` needs."""
    return region_importance(table, method, measure)


def recovery_summary(
    attributions: pd.DataFrame,
    study_root: Path,
    methods: Sequence[str],
    measures: dict[str, str] | None = None,
    *,
    run: Path | None = None,
) -> dict[str, Any]:
    """Per method: importance measure, ranking, and on simulated studies precision@k (docs/design.md §6).

    On simulated studies each method also carries what its precision@k must beat
    (:mod:`bodyage.floors`): ``floors``, ``floor_max``, ``floor_max_by``,
    ``beats_floors_by`` and, when ``run`` holds ``attributions_null.parquet``, ``nulls``,
    ``clears_nulls`` and ``beats_nulls_by``. The region signals behind the floors are
    cached in ``run`` (:func:`bodyage.region_signals.cached_region_signals`).
    """
    from bodyage.errors import StudyError
    from bodyage.floors import NULLS_FILE, floor_scores, floors_entry, margins, null_entry
    from bodyage.region_signals import cached_region_signals

    truth_path = Path(study_root) / "truth.json"
    info = None
    if truth_path.is_file():
        truth = json.loads(truth_path.read_text(encoding="utf-8"))
        info = truth.get("region_information")
    out: dict[str, Any] = {"importance_measure": {}, "methods": {}}
    imps: dict[str, pd.Series] = {}
    for m in methods:
        measure = (measures or {}).get(m, METHODS[m].importance_measure)
        imps[m] = region_importance(attributions, m, measure)
        out["importance_measure"][m] = measure
    scores = None
    nulls = None
    floors_note = None
    if info:
        try:
            scores = floor_scores(cached_region_signals(study_root, run))
        except StudyError as err:  # recorded in the entry: floors_note
            floors_note = str(err)
        if run is not None and (Path(run) / NULLS_FILE).is_file():
            nulls = pd.read_parquet(Path(run) / NULLS_FILE)

    def score(imp: pd.Series) -> float:
        return float(precision_at_k(imp, info or {})["precision_at_k"])

    for m in methods:
        entry: dict[str, Any] = {"importance_measure": out["importance_measure"][m]}
        if info:
            entry.update(precision_at_k(imps[m], info))
            if scores is not None:
                entry.update(floors_entry(scores, score))
            else:
                entry.update({"floors": None, "floor_max": None, "floor_max_by": None, "floors_note": floors_note})
            entry.update(null_entry(nulls, m, imps[m], partial(_importance_of, m, out["importance_measure"][m]), score))
            margins(entry)
        else:
            entry["top_regions"] = list(imps[m].index[:10])
        entry["agreement_with_ablation"] = spearman(imps[m], imps["ablation"]) if "ablation" in imps else math.nan
        out["methods"][m] = entry
    return out
