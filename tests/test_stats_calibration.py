"""Calibration on planted effects: CI coverage and FDR control over seeded repeats.

Each test draws 50 independent seeded data sets from :mod:`factories` (seeds 0..49, not
chosen) and checks a frequency property of the whole procedure. With a correct method
the coverage of a 95% CI in 50 repeats is below 90% with probability ~0.04, so these
tests can fail when standard errors, degrees of freedom or the bias correction are wrong.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from factories import make_tables

from analysis.phenotypes import phenotype_models
from analysis.regionmodels import region_models
from analysis.run import RunTables

REPEATS = 50
GAP = {"diabetes": 2.0}
MASS = {("liver", "diabetes"): 0.8}
SHARE = {("liver", "diabetes"): 0.02}


def _tables(seed: int, **kwargs: object) -> RunTables:
    frames = make_tables(seed=seed, **kwargs)  # type: ignore[arg-type]
    return RunTables.from_frames(frames.cohort, frames.predictions, frames.attributions, region_order=frames.regions)


def _covers(lo: float, hi: float, truth: float) -> bool:
    return bool(lo <= truth <= hi)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:phenotype model:bodyage.errors.BodyageWarning")  # statsmodels fallbacks
@pytest.mark.parametrize("repeat_fraction", [0.0, 0.25], ids=["site-intercept", "subject-intercept"])
def test_gap_effect_ci_covers_truth(repeat_fraction: float) -> None:
    hits = 0
    for seed in range(REPEATS):
        tables = _tables(seed, n_subjects=160, repeat_fraction=repeat_fraction, gap_effects=GAP)
        res = phenotype_models(tables, phenotypes=["diabetes"], joint=False)
        row = res.iloc[0]
        assert row["random_effect"] == ("subject" if repeat_fraction else "site")
        hits += _covers(row["ci_low"], row["ci_high"], GAP["diabetes"])
    assert hits >= 0.9 * REPEATS, f"95% CI covered the planted gap effect in {hits}/{REPEATS} repeats"


@pytest.mark.slow
@pytest.mark.parametrize("repeat_fraction", [0.0, 0.25], ids=["independent", "clustered"])
def test_region_effect_ci_covers_truth(repeat_fraction: float) -> None:
    hits = {"ablation": 0, "gradcam": 0}
    truth = {"ablation": MASS[("liver", "diabetes")], "gradcam": SHARE[("liver", "diabetes")]}
    for seed in range(REPEATS):
        tables = _tables(seed, n_subjects=160, repeat_fraction=repeat_fraction, mass_effects=MASS, share_effects=SHARE)
        res = region_models(tables, phenotypes=["diabetes"])
        liver = res[res["region"] == "liver"].set_index("method")
        for method in hits:
            hits[method] += _covers(liver.at[method, "ci_low"], liver.at[method, "ci_high"], truth[method])
    for method, n in hits.items():
        assert n >= 0.9 * REPEATS, f"{method}: 95% CI covered the planted liver effect in {n}/{REPEATS} repeats"


def _mc_bound(rate: float, n: int) -> float:
    return rate + 2 * math.sqrt(rate * (1 - rate) / n)


@pytest.mark.slow
def test_no_planted_effect_few_fdr_findings() -> None:
    """Global null: the share of method families with any finding at FDR 5% is ≤ 5% + MC error."""
    families = 0
    with_finding = 0
    findings = 0
    tests = 0
    for seed in range(REPEATS):
        tables = _tables(seed, n_subjects=120, gap_effects={}, mass_effects={}, share_effects={})
        res = region_models(tables)
        for _, sub in res.groupby("method"):
            families += 1
            with_finding += bool(sub["significant"].any())
            findings += int(sub["significant"].sum())
            tests += len(sub)
    assert with_finding / families <= _mc_bound(0.05, families), (
        f"{with_finding}/{families} null families had an FDR finding"
    )
    assert findings / tests <= 0.05


@pytest.mark.slow
def test_false_discovery_proportion_controlled_with_planted_effects() -> None:
    """Some planted effects: the mean false discovery proportion is ≤ 5% + MC error."""
    planted = {("liver", "diabetes"): 0.8, ("pancreas", "bmi"): 0.08, ("spleen", "activity"): 0.3}
    fdp = []
    power = []
    for seed in range(REPEATS):
        tables = _tables(
            seed,
            n_subjects=120,
            gap_effects={},
            mass_effects=planted,
            share_effects={k: v / 40 for k, v in planted.items()},
        )
        res = region_models(tables)
        true = [(r, p) in planted for r, p in zip(res["region"], res["phenotype"], strict=True)]
        res = res.assign(true=true)
        for _, sub in res.groupby("method"):
            hits = sub[sub["significant"]]
            fdp.append((~hits["true"]).sum() / max(len(hits), 1))
            power.append(hits["true"].sum() / sub["true"].sum())
    assert np.mean(fdp) <= _mc_bound(0.05, len(fdp)), f"mean FDP {np.mean(fdp):.3f}"
    assert np.mean(power) > 0.5, f"mean power {np.mean(power):.2f}: the planted effects were mostly missed"
