"""The summary's region lines: each importance beside its interval over fold models and the null bands.

``summary.md`` (:mod:`analysis.report`) lists the most important regions per method. A
mean over scans with a per-scan confidence interval alone looks far more certain than it
is: the variance that dominates is the model's (a re-trained model ranks regions
differently), and an importance means "the model uses this region" only where it is
above what models that learned nothing about age give. So each line also carries what
``bodyage attribute`` wrote:

- ``attribution_stability.csv`` (:mod:`bodyage.attribute_stability`): the min–max of the
  region's importance over the fold models;
- ``attribution_nulls.csv`` (:mod:`bodyage.nulls`): the region's share of the model's total
  importance beside each null model's upper share band (the 97.5 % quantile over its
  copies; the single permuted-label model's own share), and whether the share is above
  every null's band (the recovery's ``clears_nulls``).

Either file missing, or written for another importance measure than the summary's, leaves
its part out and the header says so. Region names read as in figures
(:func:`bodyage.region_names.display_name`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bodyage.attribute_stability import STABILITY
from bodyage.floors import NULL_KINDS, NULL_NAMES
from bodyage.region_names import display_name

#: ``attribution_nulls.csv``: a mirror of :data:`bodyage.nulls.NULL_BANDS`, which analysis cannot
#: import (:mod:`bodyage.nulls` imports torch inside its functions); a test keeps them equal
NULL_BANDS_FILE = "attribution_nulls.csv"


@dataclass(frozen=True)
class RegionContext:
    """The run's interval and null tables (``None`` where the file is absent or unreadable)."""

    stability: pd.DataFrame | None
    bands: pd.DataFrame | None

    def folds(self, method: str, measure: str) -> pd.DataFrame | None:
        """The method's rows of ``attribution_stability.csv`` by region, if written for ``measure``."""
        return _rows(self.stability, method, "measure", measure)

    def nulls(self, method: str, measure: str) -> pd.DataFrame | None:
        """The method's rows of ``attribution_nulls.csv`` (all null kinds), if written for ``measure``."""
        if self.bands is None:
            return None
        sub = self.bands[(self.bands["method"].astype(str) == method)]
        if sub.empty or set(sub["importance_measure"].astype(str)) != {measure}:
            return None
        return sub


def _rows(table: pd.DataFrame | None, method: str, column: str, measure: str) -> pd.DataFrame | None:
    if table is None:
        return None
    sub = table[table["method"].astype(str) == method]
    if sub.empty or set(sub[column].astype(str)) != {measure}:
        return None
    return sub.set_index(sub["region"].astype(str))


def _read(path: Path, columns: tuple[str, ...]) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return None
    return table if all(c in table.columns for c in columns) else None


def read_context(run_root: str | os.PathLike[str]) -> RegionContext:
    """Read ``attribution_stability.csv`` and ``attribution_nulls.csv`` of a run folder."""
    root = Path(run_root)
    return RegionContext(
        stability=_read(root / STABILITY, ("method", "measure", "region", "fold_min", "fold_max", "n_folds")),
        bands=_read(
            root / NULL_BANDS_FILE,
            ("method", "region", "importance_measure", "null", "n_copies", "trained_share", "null_share_high"),
        ),
    )


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def fmt_significant(v: Any) -> str:
    """Format a number with three significant digits (importance measures have no common scale).

    Parameters
    ----------
    v : Any
        The value; anything :class:`float` accepts.

    Returns
    -------
    str
        ``v`` with three significant digits, or ``"n/a"`` if it is not a finite number.
    """
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return f"{x:.3g}" if math.isfinite(x) else "n/a"


def _pct(v: Any) -> str:
    try:
        x = float(v) * 100
    except (TypeError, ValueError):
        return "n/a"
    return f"{x:.1f} %" if math.isfinite(x) else "n/a"


def header_note(ctx: RegionContext, method: str, measure: str) -> str:
    """What each line shows beyond the mean, and which part is missing and why."""
    folds = ctx.folds(method, measure)
    nulls = ctx.nulls(method, measure)
    parts = ["each line: mean over scans [95% CI over scans] (scans)"]
    if folds is not None and int(folds["n_folds"].max()) > 1:
        parts.append(f"min–max over the {int(folds['n_folds'].max())} fold models, the larger uncertainty")
    else:
        parts.append("no interval over fold models (one fold, or no attribution_stability.csv)")
    if nulls is not None:
        parts.append(
            "the region's share of the total importance beside each null model's upper share band "
            "(97.5 % over its copies; one model: its share)"
        )
    elif ctx.bands is None:
        parts.append(f"no null model was run (no {NULL_BANDS_FILE}): not compared with a null")
    else:
        parts.append(f"{NULL_BANDS_FILE} has no {method} rows for this measure: not compared with a null")
    return "; ".join(parts) + "."


def region_line(i: int, region: str, row: pd.Series, ctx: RegionContext, method: str, measure: str) -> str:
    """One numbered line: display name, mean [CI] (n), fold min–max, share beside the null bands."""
    ci = f"[{fmt_significant(row['ci_low'])}, {fmt_significant(row['ci_high'])}]"
    text = f"{i}. {display_name(region)}: {fmt_significant(row['mean'])} {ci} (n = {int(row['n'])})"
    folds = ctx.folds(method, measure)
    if folds is not None and region in folds.index and _num(folds.at[region, "n_folds"]) > 1:
        low, high = fmt_significant(folds.at[region, "fold_min"]), fmt_significant(folds.at[region, "fold_max"])
        text += f"; fold models {low}–{high}"
    nulls = ctx.nulls(method, measure)
    if nulls is not None:
        mine = nulls[nulls["region"].astype(str) == region]
        by_kind = {str(k): r for k, r in mine.set_index(mine["null"].astype(str)).iterrows()}
        shown = []
        for kind in NULL_KINDS:
            if kind in by_kind and int(by_kind[kind]["n_copies"]) > 0:
                r = by_kind[kind]
                bound = "" if int(r["n_copies"]) == 1 else "≤ "
                shown.append(f"{NULL_NAMES[kind]} {bound}{_pct(r['null_share_high'])}")
        if shown:
            share = _pct(mine["trained_share"].iloc[0])
            clears = "above_share_band" in mine.columns and bool(
                mine.loc[mine["n_copies"] > 0, "above_share_band"].astype(bool).all()
            )
            verdict = "above every null" if clears else "not above every null"
            text += f"; share {share} ({', '.join(shown)}): {verdict}"
    return text
