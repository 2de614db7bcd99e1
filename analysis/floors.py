"""Floors and nulls beside every method of ``recovery.json`` (docs/design.md §6), and their texts.

The rankings and bands are defined in :mod:`bodyage.floors` (shared with the attribution
step's ``attribution_recovery.json``); this module finds their inputs in a run folder:

- the region signals of the study (:func:`bodyage.region_signals.cached_region_signals`,
  computed once and kept in ``RUN/region_signals.parquet``);
- the null-model attributions ``RUN/attributions_null.parquet`` (:func:`read_nulls`),

and writes the one line a report shows for each method: its precision@k beside the
largest floor and each null (:func:`baseline_text`). A precision@k is never shown alone.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from bodyage.errors import InputError, StudyError
from bodyage.floors import FLOOR_NAMES, NULL_KINDS, NULL_NAMES, NULLS_FILE, floor_scores
from bodyage.region_signals import cached_region_signals

#: where ``attribute`` records the ranking's stability over fold models and runs
STABILITY_SOURCE = "attribution_recovery.json"
#: columns ``attributions_null.parquet`` must have beyond those used for importance
NULL_COLUMNS: tuple[str, ...] = ("null", "copy", "method", "region", "subject_id", "visit")


def read_nulls(run_root: str | os.PathLike[str] | None) -> pd.DataFrame | None:
    """``RUN/attributions_null.parquet``, or ``None`` when the run has no null models.

    Raises
    ------
    InputError
        If the file lacks a column of :data:`NULL_COLUMNS` or names an unknown null kind.
    """
    if run_root is None:
        return None
    path = Path(run_root) / NULLS_FILE
    if not path.is_file():
        return None
    table = pd.read_parquet(path)
    missing = [c for c in NULL_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    unknown = sorted(set(table["null"].astype(str)) - set(NULL_KINDS))
    if unknown:
        raise InputError(f"{path}: column 'null' must hold {' or '.join(NULL_KINDS)}; found {unknown[0]!r}")
    return table


def read_stability(run_root: str | os.PathLike[str] | None) -> dict[str, dict[str, Any]]:
    """Per method, the run-to-run stability ``attribute`` recorded in ``RUN/attribution_recovery.json``.

    ``stability`` (over the fold models: Kendall's W, top-k Jaccard) and, where ``--runs``
    was given, ``run_stability`` (over training runs); ``{}`` for a run attributed without
    them. ``recovery.json`` carries them beside the floors and nulls, so a precision@k is
    read with how much the ranking moves between models.
    """
    if run_root is None:
        return {}
    path = Path(run_root) / STABILITY_SOURCE
    if not path.is_file():
        return {}
    try:
        methods = json.loads(path.read_text(encoding="utf-8")).get("methods") or {}
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise InputError(f"{path}: not a readable attribution_recovery.json ({err})") from err
    out: dict[str, dict[str, Any]] = {}
    for method, entry in methods.items():
        kept = {k: entry[k] for k in ("stability", "run_stability") if isinstance(entry, dict) and k in entry}
        if kept:
            out[str(method)] = kept
    return out


def study_floor_scores(
    study_root: str | os.PathLike[str] | None, run_root: str | os.PathLike[str] | None
) -> tuple[dict[str, pd.Series] | None, int, str | None]:
    """The floor rankings of a study, from its (cached) region signals.

    Returns
    -------
    (dict or None, int, str or None)
        ``{floor: region scores}``, the number of scans they come from, and why there are
        none (a study without masks or images) when the first is ``None``.
    """
    if study_root is None:
        return None, 0, "no study folder (tables built in memory)"
    try:
        signals = cached_region_signals(study_root, run_root)
    except StudyError as err:
        return None, 0, str(err)
    n_scans = int(signals[["subject_id", "visit"]].drop_duplicates().shape[0])
    return floor_scores(signals), n_scans, None


def no_floors(reason: str | None) -> dict[str, Any]:
    """The floor keys of a method entry when the study has no images to compute them from."""
    return {"floors": None, "floor_max": None, "floor_max_by": None, "floors_note": reason}


def _f(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


def null_text(kind: str, null: Mapping[str, Any]) -> str:
    """``permuted-label null 0.50 [0.38, 0.62]`` (``, 1 copy`` when the interval is one value)."""
    one = " (1 copy)" if null.get("n_copies") == 1 else ""
    return f"{NULL_NAMES[kind]} {_f(null['precision_at_k'])} [{_f(null['ci_low'])}, {_f(null['ci_high'])}]{one}"


def baseline_text(entry: Mapping[str, Any]) -> str:
    """What a method's precision@k must be read against, in one clause.

    ``floors: max 0.62 univariate screen; permuted-label null 0.50 [0.38, 0.62]; random-weight
    null 0.62 [0.50, 0.75]``; missing parts say why (``floors: not computed``, ``nulls: not run``).
    """
    parts: list[str] = []
    if entry.get("floors"):
        by = entry.get("floor_max_by")
        parts.append(f"floors: max {_f(entry.get('floor_max'))} {FLOOR_NAMES.get(str(by), str(by))}")
    else:
        parts.append("floors: not computed")
    nulls = entry.get("nulls")
    if nulls:
        parts += [null_text(kind, nulls[kind]) for kind in reversed(NULL_KINDS) if kind in nulls]
    else:
        parts.append("nulls: not run")
    return "; ".join(parts)


def precision_text(method: str, entry: Mapping[str, Any]) -> str:
    """``ablation 0.75 (floors: max 0.62 univariate screen; permuted-label null 0.50 [0.38, 0.62])``."""
    return f"{method} {_f(entry.get('precision_at_k'))} ({baseline_text(entry)})"
