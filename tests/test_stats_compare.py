"""Cohort comparisons: tests agree with scipy, matching is without replacement and balances."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from factories import make_tables, write_run
from scipy import stats

from analysis.compare import compare
from analysis.fdr import benjamini_hochberg
from analysis.matching import match_nearest, standardised_mean_difference
from analysis.run import RunTables
from bodyage.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tables() -> RunTables:
    f = make_tables(200, seed=11)
    return RunTables.from_frames(f.cohort, f.predictions, f.attributions, region_order=f.regions)


@pytest.mark.parametrize("test", ["welch", "mannwhitney"])
def test_tests_agree_with_scipy(tables: RunTables, test: str) -> None:
    res = compare(tables, "diabetes == 1", "diabetes == 0", match=None, test=test)  # type: ignore[arg-type]
    scans = tables.scans
    carriers = scans.loc[scans["diabetes"] == 1, "age_gap_corrected"].to_numpy()
    others = scans.loc[scans["diabetes"] == 0, "age_gap_corrected"].to_numpy()
    row = res.tests[res.tests["outcome"] == "age gap (corrected)"].iloc[0]
    assert (row["n_cohort"], row["n_reference"]) == (len(carriers), len(others))
    if test == "welch":
        ref = stats.ttest_ind(carriers, others, equal_var=False)
        assert row["statistic"] == pytest.approx(ref.statistic, rel=1e-9)
    else:
        ref = stats.mannwhitneyu(carriers, others, alternative="two-sided")
        assert row["statistic"] == pytest.approx(ref.statistic, rel=1e-9)
    assert row["p"] == pytest.approx(ref.pvalue, rel=1e-6)
    n1, n2 = len(carriers), len(others)
    pooled = np.sqrt(((n1 - 1) * carriers.var(ddof=1) + (n2 - 1) * others.var(ddof=1)) / (n1 + n2 - 2))
    g = (carriers.mean() - others.mean()) / pooled * (1 - 3 / (4 * (n1 + n2) - 9))
    assert row["hedges_g"] == pytest.approx(g, rel=1e-6)
    assert row["g_ci_low"] < row["hedges_g"] < row["g_ci_high"]
    for family, sub in res.tests.groupby("family"):
        np.testing.assert_allclose(sub["q"], benjamini_hochberg(sub["p"].to_numpy()), err_msg=str(family))


def test_planted_liver_difference_is_found(tables: RunTables) -> None:
    res = compare(tables, "diabetes == 1", "diabetes == 0")
    hits = res.significant()
    assert {("ablation", "liver"), ("gradcam", "liver")} <= set(zip(hits["method"], hits["region"], strict=True))
    assert res.match == ("age", "sex")


def test_matching_is_without_replacement_and_balances(rng: np.random.Generator) -> None:
    import pandas as pd

    n = 400
    data = pd.DataFrame({"age": rng.uniform(45, 80, n), "sex": rng.choice(["F", "M"], n)})
    cohort = np.arange(60)
    data.loc[cohort, "age"] = rng.uniform(58, 78, len(cohort))  # an older cohort, inside the reference's range
    reference = np.arange(60, n)
    pairs = match_nearest(data, cohort, reference, ["age", "sex"], ratio=2, seed=1)
    assert len(pairs.reference) == len(set(pairs.reference.tolist())) == 2 * len(pairs.cohort)
    assert set(pairs.reference) <= set(reference)
    assert sorted(data.loc[pairs.cohort, "sex"].value_counts().items()) == sorted(
        (s, c // 2) for s, c in data.loc[pairs.reference, "sex"].value_counts().items()
    )
    m = match_nearest(data, cohort, reference, ["age", "sex"], seed=1)
    before = standardised_mean_difference(data.loc[cohort, "age"], data.loc[reference, "age"])
    after = standardised_mean_difference(data.loc[m.cohort, "age"], data.loc[m.reference, "age"])
    assert abs(after) < 0.1 < abs(before)


def test_smd_by_hand() -> None:
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 3.0, 5.0])
    expected = (a.mean() - b.mean()) / np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    assert standardised_mean_difference(a, b) == pytest.approx(expected)
    assert standardised_mean_difference([1, 1, 0, 0], [1, 0, 0, 0], binary=True) == pytest.approx(
        (0.5 - 0.25) / np.sqrt((0.25 + 0.1875) / 2)
    )


def test_balance_table_reports_before_and_after(tables: RunTables) -> None:
    res = compare(tables, "diabetes == 1 and age > 65", "diabetes == 0")
    age = res.balance[res.balance["variable"] == "age"].iloc[0]
    assert abs(age["smd_after"]) < abs(age["smd_before"])
    assert res.n_reference == res.n_cohort
    assert set(res.balance["variable"]) == {"age", "sex"}


def test_one_scan_per_subject_and_no_subject_in_both_groups() -> None:
    f = make_tables(60, seed=2, repeat_fraction=0.5)
    tables = RunTables.from_frames(f.cohort, f.predictions, f.attributions)
    res = compare(tables, "age > 60", "age <= 70", match=None)
    n_sub = tables.scans["subject_id"].nunique()
    assert res.n_cohort + res.n_reference <= n_sub
    assert any("one scan per subject" in n for n in res.notes)
    assert any("kept in the cohort only" in n for n in res.notes)


@pytest.mark.parametrize(
    ("cohort", "reference", "kwargs", "message"),
    [
        ("diabetes == 7", "diabetes == 0", {}, r"--cohort 'diabetes == 7' matches no scans \(of 200\)"),
        ("diabetes == 1", "bmi > 1000", {}, r"--reference 'bmi > 1000' matches no scans"),
        ("bmi > 36.5", "diabetes == 0", {}, r"--cohort 'bmi > 36.5' selects 2 subject\(s\); at least 3 are needed"),
        ("diabetes == 1", "diabetes == 0", {"match": "age,waist"}, r"matching variable 'waist' is not a column"),
        ("diabetes == 1", "diabetes == 0", {"test": "ttest"}, r"test 'ttest' is not one of welch, mannwhitney"),
        ("diabetes == 1", "diabetes == 1", {}, r"--reference 'diabetes == 1' selects 0 subject\(s\)"),
        ("diabetes === 1", "diabetes == 0", {}, r"--cohort 'diabetes === 1': unexpected '='"),
    ],
)
def test_bad_comparisons(
    tables: RunTables, cohort: str, reference: str, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InputError, match=message):
        compare(tables, cohort, reference, **kwargs)  # type: ignore[arg-type]


def test_caliper_that_matches_nobody(tables: RunTables) -> None:
    with pytest.raises(InputError, match=r"matching on age, sex kept 0 cohort subject\(s\)"):
        compare(tables, "diabetes == 1", "diabetes == 0", caliper=0.0 - 1e-9)


def test_example_script(tmp_path: Path) -> None:
    run = write_run(tmp_path, make_tables(120, seed=8))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, str(ROOT / "analysis" / "examples" / "compare_cohorts.py"), str(run)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "diabetes == 1 vs diabetes == 0" in res.stdout
    assert "liver" in res.stdout
    assert "S000" not in res.stdout  # no participant ids
