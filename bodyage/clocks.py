"""Organ age clocks: one age model per organ or compartment (``bodyage clocks``).

:func:`run_clocks` is the one call behind ``bodyage clocks STUDY --out DIR``. It trains the
whole-body model (``DIR/whole_body/``) and one region-restricted model per entry of a clock
set (``DIR/<clock>/``, :mod:`bodyage.crop`), each an ordinary run folder with the study's
folds, then writes the tables of docs/design.md §8:

``organ_ages.parquet``
    One row per scan × clock (``whole_body`` included): ``subject_id, visit, fold, clock,
    age, predicted_age, age_gap, age_gap_corrected, age_gap_conditioned``.
``overall_gap.parquet``
    ``subject_id, visit, overall_gap``: the unweighted mean of the **informative organ
    clocks'** corrected gaps of the scan (``whole_body`` is not an organ and is left out;
    a scan missing a clock, e.g. a failures row, averages the clocks it has; NaN when no
    informative organ clock predicted it).
``clocks.json``
    The set as run and, per clock, its regions, crop, grid, n, MAE, Pearson r, the mean-age
    baseline's MAE and the informative flag with its reason (:func:`bodyage.accuracy.informative`,
    the rule of ``metrics.json``).

The conditioned gap of a clock is the residual of its corrected gap on the **overall gap
without that clock** (the mean of the *other* informative organ clocks): the full overall
gap contains the clock's own gap, and regressing on it would correlate the residual with
the gap mechanically, all the more the fewer clocks there are. The regression (ordinary
least squares with an intercept) is fitted out of fold: for the scans of fold *k*, on the
scans of the other folds. A clock with no other informative organ clock to condition on
gets NaN. ``whole_body`` and uninformative clocks are conditioned on the full overall gap
(they are not part of it).

Every step resumes: a killed ``bodyage clocks`` run started again with the same arguments
reuses the finished folds of every run and ends with the same tables.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bodyage.accuracy import informative
from bodyage.atomic import write_json, write_with
from bodyage.errors import InputError
from bodyage.progress import NO_PROGRESS, Progress

if TYPE_CHECKING:  # pragma: no cover
    from bodyage.crop import CropSpec
    from bodyage.train_config import TrainConfig

#: the whole-body run's name among the clocks (reserved: no set entry may use it)
WHOLE_BODY = "whole_body"
CLOCKS_FILE = "clocks.json"
ORGAN_AGES = "organ_ages.parquet"
OVERALL_GAP = "overall_gap.parquet"
ORGAN_AGE_COLUMNS = (
    "subject_id",
    "visit",
    "fold",
    "clock",
    "age",
    "predicted_age",
    "age_gap",
    "age_gap_corrected",
    "age_gap_conditioned",
)
#: the clock sets shipped with the package (``--set NAME``)
SHIPPED_SETS = ("default", "quick")
#: keys an entry of a set file may have when written as a mapping
ENTRY_KEYS = ("regions",)
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


# ----------------------------------------------------------------------------- the set file


def read_clock_set(source: str | os.PathLike[str] | None = None) -> dict[str, tuple[str, ...]]:
    """Read a clock set: a shipped one by name (``default``, ``quick``) or a YAML file.

    The file is ``{clock name: [region or registry group, ...]}``; an entry may also be
    written ``{regions: [...]}``. Names are folder names (a letter, then letters, digits
    and ``_``); ``whole_body`` is reserved. Read with the scenario reader's limits (size,
    depth, no anchors or aliases).

    Raises
    ------
    InputError
        Naming the file: not found, not valid YAML, not a mapping, empty, a duplicate or
        invalid clock name, an unknown key, or an entry without regions.
    """
    from bodyage.scenario import parse_yaml, read_yaml

    name = "default" if source is None else str(source)
    if name in SHIPPED_SETS and not Path(name).exists():
        path = Path(__file__).parent / "clocksets" / f"{name}.yaml"
        what = f"clock set {name}"
    else:
        path = Path(name)
        what = f"clock set {path.name}"
        if not path.is_file():
            raise InputError(f"--set {name}: no such file, and not a shipped set ({', '.join(SHIPPED_SETS)})")
    raw = read_yaml(path, what=what)
    text = path.read_bytes().decode("utf-8-sig")
    parse_yaml(text, what=what)  # checked again: the text composed below is the one checked
    _check_duplicate_names(text, what)
    if raw is None or (isinstance(raw, dict) and not raw):
        raise InputError(f"{what}: the clock set is empty; give at least one clock: [regions]")
    if not isinstance(raw, dict):
        raise InputError(f"{what}: expected a mapping {{clock name: [regions]}}, found a {type(raw).__name__}")
    out: dict[str, tuple[str, ...]] = {}
    for key, entry in raw.items():
        clock = str(key)
        if not isinstance(key, str) or not _NAME.match(clock):
            raise InputError(
                f"{what}: clock name {clock!r} must start with a letter and hold only letters, digits and _"
            )
        if clock == WHOLE_BODY:
            raise InputError(f"{what}: {WHOLE_BODY!r} is reserved for the whole-body run; rename the clock")
        if isinstance(entry, dict):
            unknown = sorted(str(k) for k in entry if k not in ENTRY_KEYS)
            if unknown:
                raise InputError(
                    f"{what}: clock {clock!r}: unknown key(s) {', '.join(unknown)}; known: {', '.join(ENTRY_KEYS)}"
                )
            entry = entry.get("regions")
        if isinstance(entry, str):
            entry = [entry]
        if not isinstance(entry, list) or not entry or not all(isinstance(r, str) and r.strip() for r in entry):
            raise InputError(f"{what}: clock {clock!r}: expected a non-empty list of region names, found {entry!r}")
        out[clock] = tuple(r.strip() for r in entry)
    return out


def _check_duplicate_names(text: str, what: str) -> None:
    """Refuse a clock name given twice (YAML loaders keep the last silently)."""
    import yaml

    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: set[str] = set()
    for key, _ in node.value:
        if key.value in seen:
            raise InputError(f"{what}: line {key.start_mark.line + 1}: clock {key.value!r} is given twice")
        seen.add(key.value)


# ----------------------------------------------------------------------------- the tables


def organ_age_tables(
    preds: Mapping[str, pd.DataFrame], informative_clocks: Sequence[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``organ_ages`` and ``overall_gap`` from each clock's out-of-fold predictions.

    Parameters
    ----------
    preds
        ``{clock: predictions}`` (the run folders' ``predictions.parquet``); may hold
        :data:`WHOLE_BODY`.
    informative_clocks
        The clocks whose corrected gaps make the overall gap (``whole_body`` is ignored).

    Returns
    -------
    tuple of DataFrame
        ``organ_ages`` (:data:`ORGAN_AGE_COLUMNS`) and ``overall_gap`` (``subject_id,
        visit, overall_gap``), both sorted by scan (and clock).
    """
    key = ["subject_id", "visit"]
    parts = [p.assign(clock=c)[[*ORGAN_AGE_COLUMNS[:-1]]] for c, p in preds.items()]
    long = pd.concat(parts, ignore_index=True)
    wide = long.set_index([*key, "clock"])["age_gap_corrected"].unstack("clock").reindex(columns=list(preds))
    fold = long.groupby(key)["fold"].first().reindex(wide.index)
    members = [c for c in preds if c != WHOLE_BODY and c in set(informative_clocks)]
    overall = wide[members].mean(axis=1) if members else pd.Series(np.nan, index=wide.index)
    conditioned = []
    for c in preds:
        others = [m for m in members if m != c]
        x = wide[others].mean(axis=1) if others else pd.Series(np.nan, index=wide.index)
        if c not in members:
            x = overall
        resid = out_of_fold_residuals(wide[c].to_numpy(float), x.to_numpy(float), fold.to_numpy())
        conditioned.append(pd.DataFrame({"clock": c, "age_gap_conditioned": resid}, index=wide.index))
    cond = pd.concat(conditioned).reset_index()
    organ = long.merge(cond, on=[*key, "clock"], how="left")[list(ORGAN_AGE_COLUMNS)]
    organ["visit"] = organ["visit"].astype(int)
    organ = organ.sort_values([*key, "clock"]).reset_index(drop=True)
    overall_df = overall.rename("overall_gap").reset_index().sort_values(key).reset_index(drop=True)
    return organ, overall_df


def out_of_fold_residuals(y: Any, x: Any, fold: Any) -> Any:
    """Residuals of ``y`` on ``a + b·x``, fitted for each fold on the other folds' scans.

    Scans with a missing ``y`` or ``x`` get NaN and are not fitted on; with fewer than three
    fitting scans or no spread in ``x``, the fit is the fitting scans' mean of ``y``.
    """
    y = np.asarray(y, dtype=float)
    x = np.asarray(x, dtype=float)
    fold = np.asarray(fold)
    out = np.full(len(y), np.nan)
    ok = np.isfinite(y) & np.isfinite(x)
    for k in np.unique(fold):
        fit = ok & (fold != k)
        target = ok & (fold == k)
        if not target.any() or not fit.any():
            continue
        if fit.sum() >= 3 and np.ptp(x[fit]) > 0:
            b, a = np.polyfit(x[fit], y[fit], 1)
        else:
            b, a = 0.0, float(y[fit].mean())
        out[target] = y[target] - (a + b * x[target])
    return out


# ----------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class ClocksResult:
    """What :func:`run_clocks` produced: the clocks' summaries as in ``clocks.json``."""

    out: Path
    clocks: dict[str, dict[str, Any]]
    overall_members: list[str]
    minutes: float


def plan_clocks(
    study_dir: str | os.PathLike[str], clock_set: Mapping[str, Sequence[str]], config: TrainConfig
) -> dict[str, CropSpec]:
    """Check a clock set against the study before anything is trained; return each clock's crop.

    Raises
    ------
    InputError
        Naming the clock: an empty set, an unknown region or group, regions absent from
        every scan's mask, or too few subjects for the folds.
    """
    from bodyage.crop import plan_crop, resolve_regions
    from bodyage.folds import assign_folds
    from bodyage.study import load_study

    if not clock_set:
        raise InputError("the clock set is empty; give at least one clock")
    study = load_study(study_dir, channels=config.channels)
    assign_folds(study.cohort, config.folds, config.seed)
    crops: dict[str, CropSpec] = {}
    for name, regions in clock_set.items():
        try:
            resolved = resolve_regions(regions, study, what=f"clock {name!r}")
            crops[name] = plan_crop(study, study.cohort, resolved, margin_mm=config.crop_margin_mm)
        except InputError as err:
            text = str(err)
            raise InputError(text if text.startswith("clock ") else f"clock {name!r}: {text}") from err
    return crops


def run_clocks(
    study_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    clock_set: Mapping[str, Sequence[str]],
    config: TrainConfig | None = None,
    *,
    device: str = "auto",
    threads: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Progress = NO_PROGRESS,
    figures: bool = True,
) -> ClocksResult:
    """Train the whole-body model and one clock per set entry; write the organ-age tables.

    Parameters
    ----------
    study_dir
        Study folder (with masks and ``labels.json``).
    out_dir
        Clocks folder to write (or resume).
    clock_set
        ``{clock name: [region or group, ...]}`` (:func:`read_clock_set`).
    config
        Training settings shared by every run (``regions`` and ``grid`` are set per clock).
    device, threads, cache_dir, progress, figures
        As for :func:`bodyage.train.train_run`.

    Raises
    ------
    InputError
        For a bad set (see :func:`plan_clocks`), before anything is trained.
    """
    from bodyage.train import train_run
    from bodyage.train_config import TrainConfig

    started = time.perf_counter()
    cfg = config or TrainConfig()
    if cfg.regions:
        raise InputError("the clocks' training settings must not restrict regions; the set file does")
    plan_clocks(study_dir, clock_set, cfg)  # every clock checked before the first is trained
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the organ clocks first, the whole body last: a run cut short has its clocks' accuracy
    runs = {**{n: replace(cfg, regions=tuple(r), grid=None) for n, r in clock_set.items()}, WHOLE_BODY: cfg}
    summaries: dict[str, dict[str, Any]] = {}
    preds: dict[str, pd.DataFrame] = {}
    for name, run_cfg in runs.items():
        train_run(
            study_dir,
            out / name,
            run_cfg,
            device=device,
            cache_dir=cache_dir,
            progress=progress,
            figures=figures,
            threads=threads,
        )
        summaries[name] = clock_summary(out / name, clock_set.get(name, ()))
        preds[name] = pd.read_parquet(out / name / "predictions.parquet")
    members = [n for n in clock_set if summaries[n]["informative"]]
    preds = {WHOLE_BODY: preds[WHOLE_BODY], **{n: preds[n] for n in clock_set}}
    summaries = {WHOLE_BODY: summaries[WHOLE_BODY], **{n: summaries[n] for n in clock_set}}
    organ, overall = organ_age_tables(preds, members)
    write_with(out / ORGAN_AGES, partial(organ.to_parquet, index=False))
    write_with(out / OVERALL_GAP, partial(overall.to_parquet, index=False))
    doc = {
        "study": str(Path(study_dir).resolve()),
        "set": {n: list(r) for n, r in clock_set.items()},
        "overall_gap": {
            "clocks": members,
            "definition": "mean of the informative organ clocks' corrected gaps (whole_body left out)",
        },
        "conditioning": "residual of a clock's corrected gap on the mean of the other informative organ "
        "clocks' corrected gaps (the overall gap without the clock), OLS fitted out of fold",
        "clocks": summaries,
    }
    write_json(out / CLOCKS_FILE, doc)
    return ClocksResult(out, summaries, members, (time.perf_counter() - started) / 60.0)


def clock_summary(run: Path, given: Sequence[str]) -> dict[str, Any]:
    """A clock's entry in ``clocks.json`` from its run folder.

    Parameters
    ----------
    run : Path
        The clock's training run (``metrics.json``, ``run.json``, ``failures.csv`` if any).
    given : Sequence[str]
        The regions the clock set named for it.

    Returns
    -------
    dict[str, Any]
        Its accuracy beside the mean-age baseline, whether it is informative (and why
        not), its crop and grid as trained, and how many scans failed.
    """
    metrics = json.loads((run / "metrics.json").read_text())
    record = json.loads((run / "run.json").read_text())
    ok, reason = informative(metrics)
    overall = metrics["overall"]
    failures = run / "failures.csv"
    n_failed = len(pd.read_csv(failures)) if failures.is_file() else 0
    crop = record.get("crop")  # as trained (train's run.json)
    grid = crop["grid"] if crop is not None else record.get("arguments", {}).get("grid")
    return {
        "run": run.name,
        "given": list(given),
        "regions": list(crop["regions"]) if crop is not None else [],
        "crop": crop,
        "grid": list(grid) if grid is not None else None,
        "n": int(overall["n"]),
        "n_failed": n_failed,
        "mae": overall["mae"],
        "pearson_r": overall["pearson_r"],
        "baseline_mae": metrics["baseline_mae"],
        "informative": bool(ok),
        "informative_reason": reason,
    }
