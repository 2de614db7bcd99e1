"""Cohort comparisons: the age-adjusted uncorrected gap, the balance before matching, the
rank-biserial correlation, and the fold offsets of the out-of-fold corrected gap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from factories import make_tables
from scipy import stats

from analysis.compare import CORRECTED_GAP, UNCORRECTED_GAP, compare
from analysis.grouptests import age_adjusted_gap, rank_biserial
from analysis.matching import standardised_mean_difference
from analysis.run import RunTables
from analysis.tables import balance_latex, comparison_table


def _age_related_null(seed: int, n: int = 200) -> RunTables:
    """No planted gap effect; ``exposed`` is far more common in the old (a null phenotype tied to age)."""
    f = make_tables(n, seed=seed, gap_effects={}, methods=("gradcam",), regions=("liver",))
    rng = np.random.default_rng(10_000 + seed)
    age = f.cohort["age"].to_numpy()
    f.cohort["exposed"] = (rng.random(len(age)) < 1 / (1 + np.exp(-(age - 63) / 4))).astype(int)
    return RunTables.from_frames(f.cohort, f.predictions, f.attributions, region_order=f.regions)


def _gap_row(res: object, outcome: str) -> pd.Series:
    tests = res.tests  # type: ignore[attr-defined]
    return tests[tests["outcome"] == outcome].iloc[0]


@pytest.mark.slow
def test_uncorrected_gap_is_not_significant_under_an_age_related_null() -> None:
    # before: the raw gap of the older group was ~5 years lower, p < 1e-20 in every draw
    p = []
    for seed in range(20):
        tables = _age_related_null(seed)
        res = compare(tables, "exposed == 1", "exposed == 0", match=None)
        row = _gap_row(res, UNCORRECTED_GAP)
        assert row["test"] == "ancova"
        p.append(row["p"])
    assert sum(v < 0.05 for v in p) <= 3, p  # 1 expected of 20
    assert min(p) > 1e-3, p


def test_uncorrected_gap_row_is_the_ancova_group_effect() -> None:
    import statsmodels.formula.api as smf

    tables = _age_related_null(3)
    res = compare(tables, "exposed == 1", "exposed == 0", match=None, test="mannwhitney")
    row = _gap_row(res, UNCORRECTED_GAP)
    scans = tables.scans
    fit = smf.ols("age_gap ~ exposed + age + I(age ** 2)", scans).fit(cov_type="HC2")
    assert row["difference"] == pytest.approx(fit.params["exposed"], rel=1e-8)
    assert row["statistic"] == pytest.approx(fit.tvalues["exposed"], rel=1e-6)
    assert row["p"] == pytest.approx(2 * stats.t.sf(abs(fit.tvalues["exposed"]), len(scans) - 4), rel=1e-6)
    assert row["mean_cohort"] - row["mean_reference"] == pytest.approx(row["difference"], abs=1e-9)
    assert row["dof"] == len(scans) - 4
    assert np.isnan(row["rank_biserial"])
    assert row["g_ci_low"] < row["hedges_g"] < row["g_ci_high"]
    _, table = comparison_table(res.tests, 0.05, cohort=res.cohort, reference=res.reference, test=res.test)
    assert any("ANCOVA gap ~ group + age + age squared" in n for n in table.notes)


def test_planted_gap_effect_is_kept_by_the_age_adjustment() -> None:
    # diabetes adds 2 years; the cohort is older than the reference, so the raw gap alone would hide it
    tables = RunTables.from_frames(*(lambda f: (f.cohort, f.predictions, None))(make_tables(600, seed=5)))
    res = compare(tables, "diabetes == 1 and age > 60", "diabetes == 0 and age < 70", match=None)
    row = _gap_row(res, UNCORRECTED_GAP)
    assert row["difference"] == pytest.approx(2.0, abs=0.8)
    assert row["q"] < 0.01


def test_no_correction_leaves_only_the_adjusted_row() -> None:
    tables = _age_related_null(1)
    res = compare(tables, "exposed == 1", "exposed == 0", match=None, correction="none")
    gaps = res.tests[res.tests["region"] == ""]
    assert list(gaps["outcome"]) == [UNCORRECTED_GAP]
    res = compare(tables, "exposed == 1", "exposed == 0", match=None)
    assert list(res.tests[res.tests["region"] == ""]["outcome"]) == [CORRECTED_GAP, UNCORRECTED_GAP]


def test_age_adjustment_needs_enough_subjects() -> None:
    gap, age = np.arange(12.0), np.linspace(50, 70, 12)
    assert age_adjusted_gap(gap, age, np.arange(4), np.arange(4, 9)) is None  # 9 < 10
    assert age_adjusted_gap(gap, age, np.arange(4), np.arange(4, 12)) is not None


def test_non_overlapping_ages_are_noted() -> None:
    tables = _age_related_null(2)
    res = compare(tables, "age > 65", "age <= 65", match=None)
    assert any("do not overlap" in n for n in res.notes)


def test_balance_before_describes_the_selected_groups() -> None:
    f = make_tables(200, seed=11)
    tables = RunTables.from_frames(f.cohort, f.predictions, f.attributions, region_order=f.regions)
    res = compare(tables, "diabetes == 1 and age > 60", "diabetes == 0 and age < 66", caliper=0.05)
    scans = tables.scans
    cohort = scans[(scans["diabetes"] == 1) & (scans["age"] > 60)]
    reference = scans[(scans["diabetes"] == 0) & (scans["age"] < 66)]
    assert res.n_cohort < len(cohort)  # the caliper left cohort subjects out
    age = res.balance[res.balance["variable"] == "age"].iloc[0]
    assert age["cohort_mean_before"] == pytest.approx(cohort["age"].mean())
    assert age["reference_mean_before"] == pytest.approx(reference["age"].mean())
    assert age["smd_before"] == pytest.approx(standardised_mean_difference(cohort["age"], reference["age"]))
    assert age["cohort_mean_after"] != pytest.approx(age["cohort_mean_before"])
    assert abs(age["smd_after"]) < 0.1 < abs(age["smd_before"])
    male = res.balance[res.balance["variable"] == "sex"].iloc[0]
    assert male["cohort_mean_before"] == pytest.approx((cohort["sex"] == "M").mean())
    _, table = balance_latex(res.balance, matched=res.match)
    assert [c.key for c in table.columns][1:] == [
        "cohort_mean_before",
        "reference_mean_before",
        "smd_before",
        "cohort_mean_after",
        "reference_mean_after",
        "smd_after",
    ]
    unmatched = compare(tables, "diabetes == 1 and age > 60", "diabetes == 0 and age < 66", match=None)
    _, table = balance_latex(unmatched.balance, matched=())
    assert "cohort_mean_after" not in [c.key for c in table.columns]
    assert unmatched.balance["smd_after"].isna().all()
    np.testing.assert_allclose(unmatched.balance["smd_before"], res.balance["smd_before"])


def test_rank_biserial_agrees_with_pingouin_and_a_bootstrap(rng: np.random.Generator) -> None:
    import pingouin as pg

    x = np.round(rng.normal(0.6, 1.0, 40), 1)  # rounded: ties count half
    y = np.round(rng.normal(0.0, 1.0, 70), 1)
    r, lo, hi = rank_biserial(x, y)
    assert r == pytest.approx(float(pg.mwu(x, y)["RBC"].iloc[0]), rel=1e-12)
    # DeLong's variance from the pairwise kernel, by hand
    psi = np.where(x[:, None] > y, 1.0, np.where(x[:, None] == y, 0.5, 0.0))
    auc = psi.mean()
    var = psi.mean(axis=1).var(ddof=1) / len(x) + psi.mean(axis=0).var(ddof=1) / len(y)
    half = stats.norm.ppf(0.975) * 2 * np.sqrt(var) / (1 - r**2)
    assert r == pytest.approx(2 * auc - 1)
    assert (lo, hi) == pytest.approx((np.tanh(np.arctanh(r) - half), np.tanh(np.arctanh(r) + half)), rel=1e-10)
    boot = np.empty(2000)
    for i in range(len(boot)):
        bx, by = rng.choice(x, len(x)), rng.choice(y, len(y))
        boot[i] = 2 * np.where(bx[:, None] > by, 1.0, np.where(bx[:, None] == by, 0.5, 0.0)).mean() - 1
    assert (lo, hi) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])), abs=0.03)
    assert np.isnan(rank_biserial(np.array([3.0, 4.0]), np.array([1.0, 2.0]))[1])  # |r| = 1: no interval


def test_mann_whitney_reports_rank_biserial_beside_hedges_g() -> None:
    f = make_tables(200, seed=11)
    tables = RunTables.from_frames(f.cohort, f.predictions, f.attributions, region_order=f.regions)
    mwu = compare(tables, "diabetes == 1", "diabetes == 0", test="mannwhitney")
    row = _gap_row(mwu, CORRECTED_GAP)
    assert row["rbc_ci_low"] < row["rank_biserial"] < row["rbc_ci_high"]
    assert row["rank_biserial"] > 0  # the planted +2 years
    regions = mwu.tests[mwu.tests["region"] != ""]
    assert regions["rank_biserial"].notna().all()
    _, table = comparison_table(mwu.tests, 0.05, cohort=mwu.cohort, reference=mwu.reference, test=mwu.test)
    keys = [c.key for c in table.columns]
    assert {"hedges_g", "rank_biserial", "rbc_ci_low"} <= set(keys)
    assert any("DeLong" in n and "compute_esci" in n for n in table.notes)
    welch = compare(tables, "diabetes == 1", "diabetes == 0")
    assert welch.tests["rank_biserial"].isna().all()
    _, table = comparison_table(welch.tests, 0.05, cohort=welch.cohort, reference=welch.reference, test="welch")
    assert "rank_biserial" not in [c.key for c in table.columns]
    assert any("compute_esci" in n for n in table.notes)


# ----------------------------------------------------------------------------- fold offsets


def _train_like_gap(seed: int, effect: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A demo-sized run as ``train`` makes it: 300 subjects, 5 age-stratified folds, each fold's
    model with its own offset (SD 1 year) and shrinkage, its bias correction fitted on an inner
    validation set of 15% of the training subjects (36) and applied to the test fold."""
    from bodyage.folds import BiasCorrection, assign_folds

    n, k = 300, 5
    rng = np.random.default_rng(seed)
    age = rng.uniform(45, 82, n)
    fold = assign_folds(pd.DataFrame({"subject_id": [f"S{i}" for i in range(n)], "age": age}), k, seed).to_numpy()
    pheno = (rng.random(n) < 0.3).astype(float)
    offset, shrink = rng.normal(0.0, 1.0, k), rng.normal(0.3, 0.05, k)
    gap = np.empty(n)
    for f in range(k):

        def model(idx: np.ndarray, f: int = f) -> np.ndarray:
            a = age[idx]
            return a - shrink[f] * (a - 63) + offset[f] + effect * pheno[idx] + rng.normal(0.0, 3.0, len(idx))

        test = np.flatnonzero(fold == f)
        val = rng.choice(np.flatnonzero(fold != f), 36, replace=False)
        bias = BiasCorrection.fit(age[val], model(val))
        gap[test] = bias.apply(age[test], model(test)) - age[test]
    return age, fold, pheno, gap


def _phenotype_p(gap: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    b, *_ = np.linalg.lstsq(x, gap, rcond=None)
    resid = gap - x @ b
    dof = len(gap) - x.shape[1]
    se = float(np.sqrt(np.linalg.inv(x.T @ x)[1, 1] * (resid @ resid) / dof))
    return se, float(2 * stats.t.sf(abs(b[1] / se), dof))


@pytest.mark.slow
def test_fold_offsets_exist_but_a_fold_term_changes_nothing() -> None:
    """The measurement behind the README's "no fold term" (there with 1,000 draws)."""
    anova_p, rejections, se_ratio = [], [0, 0], []
    draws = 200
    for seed in range(draws):
        age, fold, pheno, gap = _train_like_gap(seed, effect=0.0)
        anova_p.append(stats.f_oneway(*(gap[fold == f] for f in range(5))).pvalue)
        a = (age - age.mean()) / 10
        x = np.column_stack([np.ones_like(a), pheno, a, a**2])
        with_fold = np.column_stack([x, (fold[:, None] == np.arange(1, 5)).astype(float)])
        (se0, p0), (se1, p1) = _phenotype_p(gap, x), _phenotype_p(gap, with_fold)
        rejections[0] += p0 < 0.05
        rejections[1] += p1 < 0.05
        se_ratio.append(se1 / se0)
    # offsets are there: fold explains the corrected gap more often than chance (5%)
    assert np.mean(np.array(anova_p) < 0.05) > 0.3
    # but the phenotype test is valid without a fold term and no more precise with one
    assert rejections[0] / draws < 0.08
    assert rejections[1] / draws < 0.08
    assert np.mean(se_ratio) == pytest.approx(1.0, abs=0.01)
