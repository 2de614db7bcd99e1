"""The record of a ``bodyage stats`` run (``RUN/stats/run.json``): what it read, with which options, what it wrote.

``stats`` writes one complete, consistent set of tables and figures per run: files of an
earlier run that this run did not write again are removed (:func:`remove_previous`), and
the record is removed first, so a run killed half-way leaves no record and its folder
counts as stale. ``report`` and ``recovery`` use those tables only when they are current
(:func:`stats_stale`: made from the run's present predictions and attributions) and made
with the options they claim (:func:`option_differences`); otherwise they refit or say so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from analysis.run import FIGURES_DIR, STATS_DIR

#: the record's file name inside ``RUN/stats``
STATS_RECORD = "run.json"
#: figures ``stats`` draws (stem prefixes): with ``--no-figures`` an earlier run's are removed
STATS_FIGURE_PREFIXES: tuple[str, ...] = ("age_scatter", "phenotype_forest", "region_heatmap_")
#: options of the record that change the numbers of the phenotype and region tables
ESTIMATE_OPTIONS: tuple[str, ...] = (
    "covariates",
    "default_covariates",
    "group",
    "correction",
    "engine",
    "metric",
    "level",
    "alpha",
    "fdr_family",
)


def record_path(base: str | os.PathLike[str]) -> Path:
    """``<base>/stats/run.json``."""
    return Path(base) / STATS_DIR / STATS_RECORD


def read_stats_record(base: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """The stats record under ``base`` (``None`` when absent or unreadable)."""
    if base is None:
        return None
    try:
        value = json.loads(record_path(base).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def stats_stale(run_root: str | os.PathLike[str] | None) -> bool:
    """Whether ``RUN/stats`` was made from other tables than the run's current ones.

    Compares the SHA-256 of ``predictions.parquet`` and ``attributions.parquet`` recorded
    in ``RUN/stats/run.json`` with the files now. A ``stats/`` folder without a readable
    record (an older version, or a run killed before it finished) counts as stale; a run
    without ``stats/`` is not stale, it has no statistics.
    """
    from bodyage.provenance import file_sha256

    if run_root is None:
        return False
    root = Path(run_root)
    if not (root / STATS_DIR).is_dir():
        return False
    record = read_stats_record(root)
    if record is None:
        return True
    inputs = record.get("inputs", {})
    for name, file in (("predictions", "predictions.parquet"), ("attributions", "attributions.parquet")):
        path = root / file
        recorded = (inputs.get(name) or {}).get("sha256") if isinstance(inputs, dict) else None
        if path.is_file() != (recorded is not None):
            return True
        if path.is_file() and recorded != file_sha256(path):
            return True
    return False


def option_differences(record: Mapping[str, Any] | None, expected: Mapping[str, Any]) -> list[str]:
    """The options in ``expected`` that the stats run did not use, as ``"name: recorded (expected)"``.

    Only the keys of ``expected`` are compared; a key the record lacks is read as the value
    an older version used by default (``default_covariates`` true), else as a difference.
    A missing record differs in everything.
    """
    if record is None:
        return ["no stats record"]
    arguments = record.get("arguments")
    if not isinstance(arguments, Mapping):
        return ["no arguments in the stats record"]
    out = []
    for name, want in expected.items():
        if name in arguments:
            got = arguments[name]
        elif name == "default_covariates":
            got = True
        else:
            out.append(f"{name}: not recorded ({want!r})")
            continue
        if _normal(got) != _normal(want):
            out.append(f"{name}: {got!r} ({want!r})")
    return out


def current_table(run_root: str | os.PathLike[str] | None, stem: str, expected: Mapping[str, Any]) -> Path | None:
    """``RUN/stats/<stem>.parquet`` when it is current (:func:`stats_stale`) and made with ``expected`` options.

    ``None`` otherwise: the caller fits its own instead of using tables made with other options.
    """
    if run_root is None:
        return None
    path = Path(run_root) / STATS_DIR / f"{stem}.parquet"
    if not path.is_file() or stats_stale(run_root):
        return None
    if option_differences(read_stats_record(run_root), expected):
        return None
    return path


def _normal(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    return value


def begin(base: str | os.PathLike[str]) -> list[str]:
    """Remove the previous record (a killed run must not look current) and return its outputs.

    Returns
    -------
    list of str
        The earlier run's outputs, relative to ``base`` (empty without a record).
    """
    record = read_stats_record(base)
    outputs = record.get("outputs") if record else None
    record_path(base).unlink(missing_ok=True)
    if not isinstance(outputs, list):
        return []
    return [str(p) for p in outputs if isinstance(p, str)]


def remove_previous(
    base: str | os.PathLike[str], previous: Iterable[str], written: Sequence[Path], *, figures: bool
) -> list[str]:
    """Remove what an earlier stats run wrote and this one did not; return the removed paths.

    Only files inside ``stats/`` and ``figures/`` are touched. Besides the earlier record's
    outputs, figures that only ``stats`` draws (:data:`STATS_FIGURE_PREFIXES`) are removed
    when this run drew none (``figures=False``), so ``report`` never mixes them with new
    tables; ``train``'s and ``attribute``'s figures stay.
    """
    base = Path(base)
    keep = {p.resolve() for p in written}
    allowed = {(base / STATS_DIR).resolve(), (base / FIGURES_DIR).resolve()}
    candidates = [base / p for p in previous]
    fig_dir = base / FIGURES_DIR
    if not figures and fig_dir.is_dir():
        candidates += [p for p in fig_dir.iterdir() if p.name.startswith(STATS_FIGURE_PREFIXES)]
    removed = []
    for path in candidates:
        resolved = path.resolve()
        if resolved in keep or resolved.parent not in allowed or not resolved.is_file():
            continue
        resolved.unlink()
        removed.append(str(path.relative_to(base)))
    return sorted(set(removed))
