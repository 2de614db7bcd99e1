"""Seeded factories of a run's tables (DESIGN.md §3) with planted effects.

``make_tables`` draws a cohort, out-of-fold predictions and a long attribution table with
exactly the schema ``train`` and ``attribute`` write; ``write_run`` puts them on disk as a
run folder (``run.json`` pointing at a study folder with ``cohort.csv`` and
``labels.json``). Planted effects are known, so tests can check that the statistics
recover them:

- the corrected age gap is ``Σ gap_effects[p]·p + site effect (+ subject effect) + noise``;
  the raw prediction shrinks towards the mean age (slope ``1 - shrink``), and
  ``age_gap_corrected`` is what ``train`` would write: a linear fit of the gap on age made
  on the other folds' scans (computed here with ``numpy.polyfit``, independently of
  ``analysis``);
- ``ablation``'s signed ``mass`` (years) of a region is ``base + age trend + Σ
  mass_effects[(region, p)]·p + noise``;
- ``gradcam``'s ``share`` of a region is ``base + Σ share_effects[(region, p)]·p + noise``.

``prostate`` is absent (NaN) in women's scans, as a region missing from a scan is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

REGIONS: tuple[str, ...] = (
    "spleen",
    "kidney_left",
    "kidney_right",
    "liver",
    "pancreas",
    "prostate",
    "gluteus_maximus_left",
    "gluteus_maximus_right",
    "intervertebral_discs",
    "torso_fat",
    "subcutaneous_fat",
)
METHODS: tuple[str, ...] = ("gradcam", "ablation")
PHENOTYPES: tuple[str, ...] = ("diabetes", "bmi", "activity", "smoking")
#: the effects planted by default
GAP_EFFECTS: dict[str, float] = {"diabetes": 2.0}
MASS_EFFECTS: dict[tuple[str, str], float] = {("liver", "diabetes"): 0.8}
SHARE_EFFECTS: dict[tuple[str, str], float] = {("liver", "diabetes"): 0.02}
MEAN_AGE = 63.0


@dataclass(frozen=True)
class RunFrames:
    """The three tables of a run and the region order of its labels."""

    cohort: pd.DataFrame
    predictions: pd.DataFrame
    attributions: pd.DataFrame
    regions: tuple[str, ...]


def make_tables(
    n_subjects: int = 150,
    seed: int = 0,
    *,
    n_sites: int = 3,
    n_folds: int = 3,
    repeat_fraction: float = 0.0,
    gap_effects: Mapping[str, float] | None = None,
    mass_effects: Mapping[tuple[str, str], float] | None = None,
    share_effects: Mapping[tuple[str, str], float] | None = None,
    site_sd: float = 1.0,
    subject_sd: float = 1.5,
    noise_sd: float = 3.0,
    shrink: float = 0.3,
    regions: Sequence[str] = REGIONS,
    methods: Sequence[str] = METHODS,
    missing_bmi: int = 0,
    extra_columns: Mapping[str, Sequence[object]] | None = None,
) -> RunFrames:
    """Draw the tables of a run with planted effects (see the module docstring).

    Parameters
    ----------
    n_subjects
        Subjects; each has visit 0, a ``repeat_fraction`` of them also visit 1 (2.5 years later).
    gap_effects, mass_effects, share_effects
        Planted effects (defaults :data:`GAP_EFFECTS`, ...); pass ``{}`` for none.
    missing_bmi
        Number of scans whose ``bmi`` is missing.
    extra_columns
        Extra cohort columns (one value per subject).
    """
    rng = np.random.default_rng(seed)
    gap_effects = GAP_EFFECTS if gap_effects is None else gap_effects
    mass_effects = MASS_EFFECTS if mass_effects is None else mass_effects
    share_effects = SHARE_EFFECTS if share_effects is None else share_effects

    subj = pd.DataFrame(
        {
            "subject_id": [f"S{i:05d}" for i in range(n_subjects)],
            "age0": rng.uniform(45, 82, n_subjects),
            "sex": rng.choice(["F", "M"], n_subjects),
            "site": rng.choice([f"site_{chr(97 + k)}" for k in range(n_sites)], n_subjects),
            "diabetes": (rng.random(n_subjects) < 0.3).astype(int),
            "bmi": rng.normal(27.0, 4.0, n_subjects),
            "activity": rng.normal(0.0, 1.0, n_subjects),
            "smoking": (rng.random(n_subjects) < 0.25).astype(int),
            "fold": rng.permutation(np.arange(n_subjects) % n_folds),
            "subject_effect": rng.normal(0.0, subject_sd, n_subjects),
        }
    )
    for name, values in (extra_columns or {}).items():
        subj[name] = list(values)
    repeat = rng.random(n_subjects) < repeat_fraction
    v0 = subj.assign(visit=0, age=subj["age0"])
    v1 = subj[repeat].assign(visit=1, age=subj.loc[repeat, "age0"] + 2.5)
    scans = pd.concat([v0, v1], ignore_index=True)
    n = len(scans)
    site_levels = sorted(scans["site"].unique())
    site_effect = dict(zip(site_levels, rng.normal(0.0, site_sd, len(site_levels)), strict=True))

    true_gap = scans["site"].map(site_effect).to_numpy() + rng.normal(0.0, noise_sd, n)
    if repeat_fraction > 0:
        true_gap += scans["subject_effect"].to_numpy()
    for name, effect in gap_effects.items():
        true_gap += effect * scans[name].to_numpy(float)
    age = scans["age"].to_numpy()
    predicted = age - shrink * (age - MEAN_AGE) + true_gap
    gap = predicted - age
    corrected = np.empty(n)
    folds = scans["fold"].to_numpy()
    for k in range(n_folds):
        test = folds == k
        fit = ~test if n_folds > 1 else test
        slope, intercept = np.polyfit(age[fit], gap[fit], 1)
        corrected[test] = gap[test] - (slope * age[test] + intercept)
    predictions = pd.DataFrame(
        {
            "subject_id": scans["subject_id"],
            "visit": scans["visit"].astype(int),
            "fold": scans["fold"].astype(int),
            "age": age,
            "predicted_age": predicted,
            "age_gap": gap,
            "age_gap_corrected": corrected,
        }
    )

    cohort = scans[["subject_id", "visit", "age", "sex", "site"]].copy()
    sid = scans["subject_id"] + "_" + scans["visit"].astype(str)
    cohort["water"] = "images/" + sid + "_water.nii.gz"
    cohort["fat"] = "images/" + sid + "_fat.nii.gz"
    cohort["mask"] = "masks/" + sid + ".nii.gz"
    for name in (*PHENOTYPES, *(extra_columns or {})):
        cohort[name] = scans[name]
    if missing_bmi:
        cohort["bmi"] = cohort["bmi"].astype(float)
        cohort.loc[rng.choice(n, missing_bmi, replace=False), "bmi"] = np.nan

    attributions = _attributions(rng, scans, regions, methods, mass_effects, share_effects)
    return RunFrames(cohort=cohort, predictions=predictions, attributions=attributions, regions=tuple(regions))


def _attributions(
    rng: np.random.Generator,
    scans: pd.DataFrame,
    regions: Sequence[str],
    methods: Sequence[str],
    mass_effects: Mapping[tuple[str, str], float],
    share_effects: Mapping[tuple[str, str], float],
) -> pd.DataFrame:
    n, r = len(scans), len(regions)
    male = (scans["sex"] == "M").to_numpy()
    present = np.ones((n, r), dtype=bool)
    if "prostate" in regions:
        present[:, list(regions).index("prostate")] = male
    volume = np.exp(rng.normal(np.log(rng.uniform(20, 3000, r)), 0.1, (n, r)))
    body = volume.sum(axis=1, where=present, keepdims=True) * 1.6
    n_vox = np.round(volume / 0.512)
    decade = (scans["age"].to_numpy() - MEAN_AGE) / 10.0
    frames = []
    for method in methods:
        if method in ("ablation", "shapley"):
            base = rng.normal(0.0, 0.5, r)
            trend = rng.normal(0.0, 0.4, r)
            mass = base + np.outer(decade, trend) + rng.normal(0.0, 0.6, (n, r))
            for (region, pheno), effect in mass_effects.items():
                if region in regions:
                    mass[:, list(regions).index(region)] += effect * scans[pheno].to_numpy(float)
            abs_mass = np.abs(mass)
            share = abs_mass / (abs_mass.sum(axis=1, where=present, keepdims=True) * 1.2)
        else:
            base = rng.dirichlet(np.ones(r) * 3.0) * 0.7
            for region, _ in share_effects:
                if region in regions:
                    base[list(regions).index(region)] += 0.05  # keep planted regions clear of the clip at 1e-4
            share = base + rng.normal(0.0, 0.01, (n, r))
            for (region, pheno), effect in share_effects.items():
                if region in regions:
                    share[:, list(regions).index(region)] += effect * scans[pheno].to_numpy(float)
            share = np.clip(share, 1e-4, None)
            total = rng.uniform(50.0, 150.0, (n, 1))
            abs_mass = share * total
            mass = abs_mass
        vol_share = volume / body
        values = {
            "n_voxels": n_vox,
            "volume_ml": volume,
            "mass": mass,
            "abs_mass": abs_mass,
            "share": share,
            "density": mass / n_vox,
            "enrichment": share / vol_share,
        }
        long = pd.DataFrame(
            {
                "subject_id": np.repeat(scans["subject_id"].to_numpy(), r),
                "visit": np.repeat(scans["visit"].to_numpy(), r),
                "method": method,
                "region": np.tile(np.asarray(regions), n),
                "fold": np.repeat(scans["fold"].to_numpy(), r),
            }
        )
        for col, arr in values.items():
            long[col] = np.where(present, arr, np.nan).ravel()
        frames.append(long)
    return pd.concat(frames, ignore_index=True)


def write_run(
    root: Path,
    frames: RunFrames,
    *,
    study_key: str = "study",
    relative_study: bool = False,
    attributions: bool = True,
) -> Path:
    """Write ``root/study`` (cohort.csv, labels.json) and ``root/run`` (run.json, tables).

    Parameters
    ----------
    study_key
        ``"study"`` (top-level key of run.json) or ``"arguments"`` (``arguments.study``).
    relative_study
        Record the study path relative to the run folder's parent.
    attributions
        Write ``attributions.parquet``.

    Returns
    -------
    Path
        The run folder.
    """
    study = root / "study"
    run = root / "run"
    study.mkdir(parents=True, exist_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    frames.cohort.to_csv(study / "cohort.csv", index=False)
    (study / "labels.json").write_text(json.dumps({str(i + 1): name for i, name in enumerate(frames.regions)}))
    where = "study" if relative_study else str(study)
    record = {"command": "train", "arguments": {"study": where}} if study_key == "arguments" else {"study": where}
    (run / "run.json").write_text(json.dumps(record))
    frames.predictions.to_parquet(run / "predictions.parquet", index=False)
    if attributions:
        frames.attributions.to_parquet(run / "attributions.parquet", index=False)
    return run


def make_run(root: Path, **kwargs: object) -> Path:
    """:func:`make_tables` (keyword arguments passed on) then :func:`write_run` into ``root``."""
    return write_run(root, make_tables(**kwargs))  # type: ignore[arg-type]
