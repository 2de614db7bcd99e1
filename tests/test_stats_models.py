"""The models agree with independent computations; bad input gives errors naming the thing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pingouin as pg
import pytest
import statsmodels.api as sm
from factories import make_tables
from statsmodels.regression.mixed_linear_model import MixedLM
from statsmodels.stats.multitest import multipletests

from analysis.agegap import age_accuracy, correct_gap
from analysis.design import DEFAULT_COVARIATES, build_design, covariate_block
from analysis.fdr import benjamini_hochberg
from analysis.mixed import fit_ols, fit_random_intercept
from analysis.ols import ols_many
from analysis.phenotypes import phenotype_models
from analysis.regionmodels import region_gap_correlations, region_models
from analysis.run import RunTables
from bodyage.errors import BodyageWarning, InputError, RunError


def _tables(frames) -> RunTables:  # type: ignore[no-untyped-def]
    return RunTables.from_frames(frames.cohort, frames.predictions, frames.attributions, region_order=frames.regions)


@pytest.fixture(scope="module")
def tables() -> RunTables:
    return _tables(make_tables(160, seed=7, missing_bmi=6))


# ----------------------------------------------------------------------------- FDR


def test_bh_matches_statsmodels(rng: np.random.Generator) -> None:
    p = np.concatenate([rng.uniform(size=200), rng.uniform(0, 1e-3, size=20)])
    rng.shuffle(p)
    expected = multipletests(p, method="fdr_bh")[1]
    np.testing.assert_allclose(benjamini_hochberg(p), expected, rtol=1e-12)


def test_bh_ignores_missing_p_values(rng: np.random.Generator) -> None:
    p = rng.uniform(size=30)
    with_nan = np.concatenate([p, [np.nan, np.nan]])
    q = benjamini_hochberg(with_nan)
    assert np.isnan(q[-2:]).all()
    np.testing.assert_allclose(q[:-2], multipletests(p, method="fdr_bh")[1], rtol=1e-12)


@pytest.mark.parametrize("family", ["method", "phenotype"])
def test_region_model_q_values_are_statsmodels_bh_over_their_family(tables: RunTables, family: str) -> None:
    res = region_models(tables, fdr_family=family)  # type: ignore[arg-type]
    keys = ["method"] if family == "method" else ["method", "phenotype"]
    assert res.groupby(keys).ngroups > 1
    for _, block in res.groupby(keys):
        ok = block["p"].notna()
        expected = multipletests(block.loc[ok, "p"], method="fdr_bh")[1]
        np.testing.assert_allclose(block.loc[ok, "q"], expected, rtol=1e-12)
        assert (block["significant"] == (block["q"] < 0.05)).all()


def test_per_phenotype_families_keep_one_phenotypes_discoveries_from_loosening_anothers(tables: RunTables) -> None:
    pooled = region_models(tables, methods=["ablation"]).set_index(["phenotype", "region"])
    split = region_models(tables, methods=["ablation"], fdr_family="phenotype").set_index(["phenotype", "region"])
    np.testing.assert_allclose(split["p"], pooled["p"].reindex(split.index))  # same fits, other families
    assert not np.allclose(split["q"], pooled["q"].reindex(split.index))
    with pytest.raises(InputError, match="--fdr-family must be one of method, phenotype, all; 'study' was provided"):
        region_models(tables, fdr_family="study")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- mixed models


def _grouped(rng: np.random.Generator, n: int, n_groups: int, group_sd: float) -> tuple[np.ndarray, ...]:
    g = rng.integers(0, n_groups, n)
    x = rng.normal(size=n)
    d = (rng.random(n) < 0.3).astype(float)
    y = 1.0 + 2.0 * d + 0.5 * x + rng.normal(0, group_sd, n_groups)[g] + rng.normal(0, 3.0, n)
    X = np.column_stack([np.ones(n), d, x])
    return y, X, g


@pytest.mark.parametrize(("n_groups", "group_sd"), [(6, 1.5), (150, 2.0)])
def test_reml_solver_matches_statsmodels(rng: np.random.Generator, n_groups: int, group_sd: float) -> None:
    y, X, g = _grouped(rng, 600, n_groups, group_sd)
    names = ["const", "d", "x"]
    ours = fit_random_intercept(y, X, names, g, group="g", engine="reml")
    ref = MixedLM(y, X, groups=g).fit(reml=True)
    np.testing.assert_allclose(ours.params, ref.fe_params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.bse, ref.bse_fe, rtol=1e-3)
    assert ours.group_var == pytest.approx(float(np.asarray(ref.cov_re)[0, 0]), rel=1e-3)
    assert ours.resid_var == pytest.approx(ref.scale, rel=1e-4)
    assert ours.llf == pytest.approx(ref.llf, abs=1e-4)
    assert not ours.boundary


def test_zero_group_variance_gives_the_ols_fit_and_a_boundary_flag(rng: np.random.Generator) -> None:
    n, n_groups = 400, 5
    g = rng.integers(0, n_groups, n)
    x = rng.normal(size=n)
    d = (rng.random(n) < 0.4).astype(float)
    noise = rng.normal(0, 2.0, n)
    noise -= pd.Series(noise).groupby(g).transform("mean").to_numpy()  # no between-group variation at all
    y = 1.0 + 1.5 * d + 0.3 * x + noise
    X = np.column_stack([np.ones(n), d, x])
    names = ["const", "d", "x"]
    ols = sm.OLS(y, X).fit()
    for engine in ("statsmodels", "reml"):
        fit = fit_random_intercept(y, X, names, g, group="site", engine=engine)
        assert fit.boundary, engine
        assert "boundary" in fit.warning_text
        np.testing.assert_allclose(fit.params, ols.params, rtol=1e-4, atol=1e-4 * float(np.max(ols.bse)))
    plain = fit_ols(y, X, names)
    np.testing.assert_allclose(plain.params, ols.params, rtol=1e-10)
    np.testing.assert_allclose(plain.bse, ols.bse, rtol=1e-10)
    assert plain.term("d")["p"] == pytest.approx(ols.pvalues[1], rel=1e-8)


def test_single_group_is_fitted_without_random_intercept_and_says_so(rng: np.random.Generator) -> None:
    y, X, _ = _grouped(rng, 100, 3, 1.0)
    fit = fit_random_intercept(y, X, ["c", "d", "x"], np.zeros(100), group="site")
    assert fit.engine == "ols"
    assert "single level" in fit.warning_text


def test_collinear_design_is_an_input_error(rng: np.random.Generator) -> None:
    x = rng.normal(size=50)
    X = np.column_stack([np.ones(50), x, 2 * x])
    with pytest.raises(InputError, match="collinear"):
        fit_ols(rng.normal(size=50), X, ["c", "x", "x2"])


# ----------------------------------------------------------------------------- vectorised OLS


def test_ols_many_matches_statsmodels_classical_and_clustered(rng: np.random.Generator) -> None:
    n = 240
    subject = np.concatenate([np.arange(200), rng.choice(200, 40, replace=False)])
    sex = rng.integers(0, 2, n).astype(float)
    X = np.column_stack([np.ones(n), rng.random(n) < 0.3, rng.normal(size=n), sex]).astype(float)
    Y = rng.normal(size=(n, 4))
    Y[:, 1] += 0.5 * X[:, 1]
    Y[rng.random(n) < 0.15, 2] = np.nan  # a region missing in some scans
    Y[sex == 0, 3] = np.nan  # a region present in men only: sex is collinear with the intercept there
    classical = ols_many(X, Y, 1)
    clustered = ols_many(X, Y, 1, clusters=subject)
    for j in range(4):
        ok = np.isfinite(Y[:, j])
        Xj = X[ok][:, :3] if j == 3 else X[ok]
        ref = sm.OLS(Y[ok, j], Xj).fit()
        refc = sm.OLS(Y[ok, j], Xj).fit(cov_type="cluster", cov_kwds={"groups": subject[ok]}, use_t=True)
        assert classical.n[j] == ok.sum()
        np.testing.assert_allclose(classical.estimate[j], ref.params[1], rtol=1e-9)
        np.testing.assert_allclose(classical.se[j], ref.bse[1], rtol=1e-9)
        np.testing.assert_allclose(classical.p[j], ref.pvalues[1], rtol=1e-7)
        np.testing.assert_allclose(clustered.se[j], refc.bse[1], rtol=1e-9)
        np.testing.assert_allclose(clustered.p[j], refc.pvalues[1], rtol=1e-7)
        np.testing.assert_allclose([clustered.ci_low[j], clustered.ci_high[j]], refc.conf_int()[1], rtol=1e-9)


def test_partial_r_matches_pingouin(tables: RunTables) -> None:
    res = region_models(tables, phenotypes=["bmi"], methods=["ablation"])
    row = res[res["region"] == "liver"].iloc[0]
    scans = tables.scans
    cov = covariate_block(scans, DEFAULT_COVARIATES)
    design = build_design(scans, ["bmi"], cov, fixed_group="site")
    liver = tables.attributions
    assert liver is not None
    liver = liver[(liver["method"] == "ablation") & (liver["region"] == "liver")].set_index("scan_id")["mass"]
    data = pd.DataFrame(design.X[:, 1:], columns=[f"c{j}" for j in range(design.X.shape[1] - 1)])
    data["y"] = scans["scan_id"][design.rows].map(liver).to_numpy()
    ref = pg.partial_corr(data=data, x="y", y="c0", covar=[c for c in data.columns if c not in ("y", "c0")])
    assert row["partial_r"] == pytest.approx(float(ref["r"].iloc[0]), rel=1e-8)


def test_gap_correlations_use_first_scans_and_pingouin() -> None:
    tables = _tables(make_tables(80, seed=5, repeat_fraction=0.3, methods=("ablation",)))
    res = region_gap_correlations(tables, correction="none")
    liver = res[res["region"] == "liver"].iloc[0]
    assert liver["n"] == 80  # one scan per subject
    assert -1 < liver["r"] < 1
    assert liver["ci_low"] < liver["r"] < liver["ci_high"]


# ----------------------------------------------------------------------------- age gap


def test_linear_correction_is_fitted_on_the_other_folds(tables: RunTables) -> None:
    base = correct_gap(tables, "linear")
    scans = tables.scans
    fold0 = (scans["fold"] == 0).to_numpy()
    # the correction of fold 0 is fitted on folds 1, 2: it must not move when fold 0's gaps change
    preds = tables.predictions.copy()
    preds.loc[fold0, "age_gap"] += 50.0
    preds.loc[fold0, "predicted_age"] += 50.0
    moved = correct_gap(RunTables.from_frames(tables.cohort, preds), "linear")
    np.testing.assert_allclose(moved.scans["gap"][fold0], base.scans["gap"][fold0] + 50.0, rtol=1e-9)
    coefs = base.coefficients.set_index("fold")
    assert coefs.loc[0, "n_fit"] == int((~fold0).sum())
    assert bool(coefs["out_of_sample"].all())


@pytest.mark.parametrize("correction", ["linear", "quadratic", "train"])
def test_corrections_remove_the_age_bias(tables: RunTables, correction: str) -> None:
    acc = age_accuracy(correct_gap(tables, correction)).iloc[0]
    assert acc["gap_age_r"] < -0.3  # the factory shrinks predictions toward the mean age
    assert abs(acc["corrected_gap_age_r"]) < 0.15


def test_accuracy_table_matches_hand_computation(tables: RunTables) -> None:
    acc = age_accuracy(correct_gap(tables, "none"))
    scans = tables.scans
    overall = acc.iloc[0]
    err = scans["predicted_age"] - scans["age"]
    assert overall["mae"] == pytest.approx(err.abs().mean())
    assert overall["rmse"] == pytest.approx(np.sqrt((err**2).mean()))
    women = acc[(acc["subset"] == "sex") & (acc["level"] == "F")].iloc[0]
    assert women["n"] == (scans["sex"] == "F").sum()
    assert set(acc["subset"]) == {"overall", "site", "sex", "age band"}


def test_train_correction_needs_age_gap_corrected(tables: RunTables) -> None:
    preds = tables.predictions.copy()
    preds.loc[3, "age_gap_corrected"] = np.nan
    broken = RunTables.from_frames(tables.cohort, preds)
    with pytest.raises(RunError, match=r"'age_gap_corrected' has 1 missing value.*--correction linear"):
        correct_gap(broken, "train")


def test_single_fold_correction_warns() -> None:
    frames = make_tables(40, seed=2, n_folds=1)
    with pytest.warns(BodyageWarning, match="single fold"):
        res = correct_gap(_tables(frames), "linear")
    assert not bool(res.coefficients["out_of_sample"].iloc[0])


# ----------------------------------------------------------------------------- phenotype models and bad input


def test_phenotype_models_count_missing_rows(tables: RunTables) -> None:
    res = phenotype_models(tables, phenotypes=["diabetes", "bmi"])
    sep = res[res["model"] == "separate"].set_index("phenotype")
    assert sep.at["bmi", "n_missing_phenotype"] == 6
    assert sep.at["bmi", "n"] == len(tables.scans) - 6
    assert sep.at["diabetes", "n_missing_phenotype"] == 0
    joint = res[res["model"] == "joint"]
    assert (joint["n"] == len(tables.scans) - 6).all()
    np.testing.assert_allclose(sep["q"], benjamini_hochberg(sep["p"].to_numpy()))


def test_default_phenotypes_are_the_non_reserved_columns(tables: RunTables) -> None:
    res = phenotype_models(tables, joint=False)
    assert list(res["phenotype"]) == ["diabetes", "bmi", "activity", "smoking"]


def test_default_phenotypes_skip_text_columns_with_a_warning() -> None:
    frames = make_tables(40, seed=1, extra_columns={"ethnicity": ["a", "b"] * 20})
    with pytest.warns(BodyageWarning, match=r"skipped default phenotype.*'ethnicity' is not numeric"):
        res = phenotype_models(_tables(frames), joint=False)
    assert "ethnicity" not in set(res["phenotype"])


def _with_column(tables: RunTables, name: str, values: object) -> RunTables:
    return RunTables.from_frames(tables.cohort.assign(**{name: values}), tables.predictions, tables.attributions)


@pytest.mark.parametrize(
    ("kwargs", "column", "values", "message"),
    [
        ({"phenotypes": ["diabets"]}, None, None, r"phenotype 'diabets' is not a column"),
        ({"covariates": ["age", "hieght"]}, None, None, r"covariate 'hieght' is not a column"),
        ({"group": "centre"}, None, None, r"group 'centre' is not a column"),
        ({"phenotypes": ["const"]}, "const", 1.0, r"phenotype 'const' is constant"),
        ({"phenotypes": ["empty"]}, "empty", np.nan, r"phenotype 'empty' has no non-missing values"),
        ({"phenotypes": ["smoker"]}, "smoker", "yes", r"phenotype 'smoker' is not numeric \(values like 'yes'\)"),
        ({"phenotypes": ["bmi"], "covariates": ["age", "const"]}, "const", 3.0, r"covariate 'const' is constant"),
        ({"phenotypes": ["bmi"], "covariates": ["bmi"]}, None, None, r"covariate 'bmi' is also a phenotype"),
        ({"phenotypes": ["age"]}, None, None, r"phenotype 'age' is a covariate or the outcome"),
    ],
)
def test_bad_phenotype_or_covariate(
    tables: RunTables, kwargs: dict[str, object], column: str | None, values: object, message: str
) -> None:
    t = _with_column(tables, column, values) if column else tables
    with pytest.raises(InputError, match=message):
        phenotype_models(t, **kwargs)  # type: ignore[arg-type]
    if "group" not in kwargs:
        with pytest.raises(InputError, match=message):
            region_models(t, **kwargs)  # type: ignore[arg-type]


def test_unknown_method_and_metric(tables: RunTables) -> None:
    with pytest.raises(InputError, match=r"method 'occlusion' is not in attributions.parquet; it has: ablation"):
        region_models(tables, methods=["occlusion"])
    with pytest.raises(InputError, match=r"metric 'volume' is not one of mass, share"):
        region_models(tables, metric="volume")  # type: ignore[arg-type]


def test_region_models_need_attributions(tables: RunTables) -> None:
    bare = RunTables.from_frames(tables.cohort, tables.predictions)
    with pytest.raises(RunError, match=r"attributions.parquet: not found \(run `bodyage attribute` first\)"):
        region_models(bare)


def test_region_groups_add_up(tables: RunTables) -> None:
    def grouping(name: str) -> str:
        return "kidney" if name.startswith("kidney") else name

    grouped = region_models(tables, phenotypes=["diabetes"], methods=["ablation"], level="group", grouping=grouping)
    assert "kidney" in set(grouped["region"]) and "kidney_left" not in set(grouped["region"])
    with pytest.raises(InputError, match="level 'group' needs a grouping"):
        region_models(tables, level="group")
