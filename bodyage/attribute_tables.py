"""Where ``bodyage attribute`` keeps its results: file names, per-scan parts, the merged tables.

Each scan × method result is a *part*, written atomically to
``RUN/attribute/parts/<method>-<fingerprint>/<scan id>.parquet`` (:func:`part_dir`; the
fingerprint, :func:`method_fingerprint`, hashes the checkpoints, the label table and the
method's settings, so a change of any of them starts a new folder). :func:`merge_parts`
reads the parts of a run into the long tables ``attributions.parquet``
(:data:`ATTRIBUTION_COLUMNS`) and ``slice_profiles.parquet`` (:data:`SLICE_COLUMNS`);
:func:`group_table` aggregates the region table to region groups; :func:`write_failures`
adds the scans that could not be explained to ``RUN/failures.csv``.

No torch here: the functions work on tables and files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from bodyage.atomic import write_with

if TYPE_CHECKING:  # pragma: no cover
    from bodyage.attribute_inputs import AttributeConfig

ATTRIBUTIONS = "attributions.parquet"
GROUP_ATTRIBUTIONS = "attributions_groups.parquet"
SLICE_PROFILES = "slice_profiles.parquet"
RECOVERY = "attribution_recovery.json"
RECORD = "attribute.json"
SANITY = "sanity.json"
FAILURES = "failures.csv"
STATE_DIR = "attribute"
ATTRIBUTION_COLUMNS: tuple[str, ...] = (
    "subject_id",
    "visit",
    "method",
    "region",
    "fold",
    "n_voxels",
    "volume_ml",
    "mass",
    "abs_mass",
    "share",
    "density",
    "enrichment",
    "abs_density",
)
SLICE_COLUMNS: tuple[str, ...] = ("subject_id", "visit", "fold", "method", "z_index", "z_mm", "mass", "abs_mass")
FAILURE_COLUMNS: tuple[str, ...] = ("scan_id", "stage", "reason")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def part_dir(run: Path, method: str, fingerprint: str) -> Path:
    """Folder of one method's per-scan results."""
    return run / STATE_DIR / "parts" / f"{method}-{fingerprint}"


def method_fingerprint(cfg: AttributeConfig, method: str, hparams: dict[int, dict[str, Any]], labels: Any) -> str:
    """Hash of what a method's results depend on: checkpoints, label table, its settings."""
    ck = {k: hp.get("config_hash") for k, hp in sorted(hparams.items())}
    return _hash({"method": method, "settings": cfg.method_settings(method), "checkpoints": ck, "labels": labels})


def write_part(path: Path, regions: pd.DataFrame, slices: pd.DataFrame | None) -> None:
    """Write one scan × method part atomically: the slice profile first, the region table last.

    The region table's file marks the scan done, so a run killed between the two writes
    explains the scan again rather than keeping a part without its slice profile.

    Parameters
    ----------
    path : Path
        The part's region table, ``<part dir>/<scan id>.parquet``; the slice profile goes
        beside it as ``<scan id>.slices.parquet``.
    regions : pandas.DataFrame
        The scan's region table (:data:`ATTRIBUTION_COLUMNS`).
    slices : pandas.DataFrame or None
        The scan's slice profile (:data:`SLICE_COLUMNS`), or None if the method makes no map.
    """
    if slices is not None:
        write_with(path.with_suffix(".slices.parquet"), partial(slices.to_parquet, index=False))
    write_with(path, partial(regions.to_parquet, index=False))  # last: marks the scan done


def write_failures(run: Path, failures: list[dict[str, str]]) -> None:
    """Add this step's failures to ``RUN/failures.csv``, keeping other steps' rows.

    Earlier rows of the ``attribute`` stage are replaced; one row per scan id.

    Parameters
    ----------
    run : Path
        The run folder.
    failures : list[dict[str, str]]
        One mapping per failed scan, with the keys of :data:`FAILURE_COLUMNS`.
    """
    path = run / FAILURES
    old = pd.read_csv(path, dtype=str) if path.is_file() and path.stat().st_size else pd.DataFrame()
    if len(old.columns) and "stage" in old.columns:
        old = old[old["stage"] != "attribute"]
    new = pd.DataFrame(failures, columns=list(FAILURE_COLUMNS)).drop_duplicates("scan_id")
    out = pd.concat([old, new], ignore_index=True) if len(old.columns) else new
    write_with(path, partial(out.to_csv, index=False))


def merge_parts(
    run: Path,
    methods: Sequence[str],
    fingerprints: dict[str, str],
    scan_ids: Sequence[str],
    failures: list[dict[str, str]],
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Read every scan × method part into the two long tables; a missing part is a failure."""
    reg: list[pd.DataFrame] = []
    sl: list[pd.DataFrame] = []
    checks: dict[str, Any] = {}
    for m in methods:
        folder = part_dir(run, m, fingerprints[m])
        for sid in scan_ids:
            p = folder / f"{sid}.parquet"
            if not p.is_file():
                failures.append(
                    {"scan_id": sid, "stage": "attribute", "reason": f"{m}: no result (a rank stopped?); run again"}
                )
                continue
            reg.append(pd.read_parquet(p))
            sp = p.with_suffix(".slices.parquet")
            if sp.is_file():
                sl.append(pd.read_parquet(sp))
    attributions = pd.concat(reg, ignore_index=True) if reg else pd.DataFrame(columns=list(ATTRIBUTION_COLUMNS))
    if "efficiency_error" in attributions.columns:
        err = attributions.groupby(["subject_id", "visit"])["efficiency_error"].first().abs()
        checks["shapley_efficiency_max_abs_error_years"] = float(err.max())
    if "abs_density" not in attributions.columns:  # parts written before the column existed
        attributions["abs_density"] = attributions["abs_mass"] / attributions["n_voxels"]
    attributions = attributions[list(ATTRIBUTION_COLUMNS)]
    attributions = attributions.sort_values(["method", "subject_id", "visit"], kind="mergesort").reset_index(drop=True)
    slices = pd.concat(sl, ignore_index=True) if sl else pd.DataFrame(columns=list(SLICE_COLUMNS))
    return attributions, slices[list(SLICE_COLUMNS)], checks


def group_table(attributions: pd.DataFrame) -> pd.DataFrame:
    """Aggregate the long table to region groups (:func:`bodyage.regions.group_of`).

    Masses, absolute masses, voxels and volumes of the members are summed (for region
    methods the sum of the members' values; ``attribute_run`` replaces ablation's by a
    joint ablation, :mod:`bodyage.attribute_groups`); share, density, enrichment and
    abs_density are recomputed. A group is NaN in a scan where all its members are absent.
    """
    from bodyage.regions import group_of

    df = attributions.copy()
    df["region"] = df["region"].map(group_of)
    keys = ["subject_id", "visit", "method", "region", "fold"]
    summed = df.groupby(keys, sort=False)[["n_voxels", "volume_ml", "mass", "abs_mass"]].sum(min_count=1).reset_index()
    scan = ["subject_id", "visit", "method"]
    body_abs = summed.groupby(scan)["abs_mass"].transform("sum")
    body_vox = summed.groupby(scan)["n_voxels"].transform("sum")
    summed["share"] = summed["abs_mass"] / body_abs
    summed["density"] = summed["mass"] / summed["n_voxels"]
    summed["enrichment"] = summed["share"] / (summed["n_voxels"] / body_vox)
    summed["abs_density"] = summed["abs_mass"] / summed["n_voxels"]
    return summed[list(ATTRIBUTION_COLUMNS)]
