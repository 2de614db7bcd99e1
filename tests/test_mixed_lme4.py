"""The default mixed-model engine gives lme4's REML fit and lmerTest's Satterthwaite df.

Reference values come from R (lme4 ``lmer(REML = TRUE)`` and lmerTest) on the seeded data
sets in ``fixtures/lme4`` (``make_data.py`` writes them, ``make_reference.R`` fits them and
writes ``reference.json``); R is not needed to run these tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import stats

from analysis.mixed import DF_NOTES, LinearFit, fit_ols, fit_random_intercept

FIXTURES = Path(__file__).parent / "fixtures" / "lme4"
REFERENCE: dict[str, Any] = json.loads((FIXTURES / "reference.json").read_text())["cases"]


def _case(name: str) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    data = pd.read_csv(FIXTURES / f"{name}.csv")
    terms = [c for c in data.columns if c not in ("y", "group")]
    X = np.column_stack([np.ones(len(data)), data[terms].to_numpy(float)])
    return data["y"].to_numpy(float), X, ["(Intercept)", *terms], data["group"].to_numpy()


def _fit(name: str, engine: str = "auto") -> LinearFit:
    y, X, names, groups = _case(name)
    return fit_random_intercept(y, X, names, groups, group="site", engine=engine)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_default_engine_reproduces_lme4_and_lmertest(name: str) -> None:
    ref = REFERENCE[name]
    fit = _fit(name)
    assert fit.names == tuple(ref["terms"])
    assert fit.n_groups == ref["n_groups"]
    assert fit.engine == "reml"
    assert fit.df_method == "satterthwaite"
    se = np.asarray(ref["se"])
    np.testing.assert_allclose(fit.params, ref["estimate"], rtol=1e-5)
    np.testing.assert_allclose(fit.bse, se, rtol=1e-5)
    np.testing.assert_allclose(fit.df, ref["df"], rtol=1e-4)
    assert fit.resid_var == pytest.approx(ref["resid_var"], rel=1e-5)
    assert fit.group_var == pytest.approx(ref["group_var"], rel=1e-5, abs=1e-9 * ref["resid_var"])
    assert fit.boundary == ref["singular"]
    assert fit.llf == pytest.approx(ref["reml_loglik"], abs=1e-6)
    for j, term in enumerate(fit.names):
        row = fit.term(term)
        assert row["df"] == fit.df[j]
        assert row["stat"] == pytest.approx(ref["t"][j], rel=1e-5)
        assert row["p"] == pytest.approx(ref["p"][j], rel=1e-4)
        half = stats.t.ppf(0.975, ref["df"][j]) * ref["se"][j]
        assert row["ci_high"] - row["ci_low"] == pytest.approx(2 * half, rel=1e-5)


def test_boundary_fit_is_ols_with_residual_df_as_in_lmertest() -> None:
    """At σ²_u = 0 lme4's SEs are OLS's (σ̂² = RSS/(n-p)) and lmerTest's df are n - p."""
    ref = REFERENCE["site_boundary"]
    assert ref["singular"] and ref["group_var"] == 0.0
    y, X, _, _ = _case("site_boundary")
    ols = sm.OLS(y, X).fit()
    fit = _fit("site_boundary")
    assert fit.boundary and "boundary" in fit.warning_text
    np.testing.assert_allclose(ref["se"], ols.bse, rtol=1e-9)  # R agrees with the OLS reading
    np.testing.assert_allclose(fit.bse, ols.bse, rtol=1e-9)
    np.testing.assert_allclose(fit.df, len(y) - X.shape[1])
    np.testing.assert_allclose(ref["df"], len(y) - X.shape[1], rtol=1e-9)
    diabetes = fit.term("diabetes")
    assert diabetes["se"] == pytest.approx(0.3206, abs=1e-4)  # statsmodels MixedLM: 0.2554
    assert diabetes["p"] == pytest.approx(ref["p"][1], rel=1e-6)


def test_phenotype_between_sites_gets_few_df() -> None:
    fit = _fit("site_between")
    x = fit.term("x")
    assert x["df"] == pytest.approx(2.236, abs=1e-3)  # lmerTest: 2.2362
    assert x["p"] > 0.03  # lmerTest: 0.0397; z on the same estimate and SE: 1.3e-5
    assert 2 * stats.norm.sf(abs(x["stat"])) < 1e-3


def test_statsmodels_engine_stays_available_with_z_tests() -> None:
    fit = _fit("subjects", engine="statsmodels")
    ref = REFERENCE["subjects"]
    assert fit.engine == "statsmodels"
    assert fit.df_method == "normal"
    assert np.isinf(fit.df).all()
    np.testing.assert_allclose(fit.params, ref["estimate"], rtol=1e-4)
    row = fit.term("diabetes")
    assert row["p"] == pytest.approx(2 * stats.norm.sf(abs(row["stat"])), rel=1e-12)
    assert fit.df_note == DF_NOTES["normal"] and "normal (z)" in fit.df_note


def test_ols_keeps_n_minus_p_df_and_says_so(rng: np.random.Generator) -> None:
    X = np.column_stack([np.ones(50), rng.normal(size=50)])
    fit = fit_ols(rng.normal(size=50), X, ["c", "x"])
    assert fit.df_method == "residual"
    np.testing.assert_array_equal(fit.df, [48.0, 48.0])
    assert fit.term("x")["df"] == 48.0
    assert "n − p" in fit.df_note
    assert "Satterthwaite" in _fit("site").df_note


# ----------------------------------------------------------------------------- calibration

NULLS = 200
#: nominal 5 % plus two Monte-Carlo standard errors of a rejection rate over NULLS draws
MAX_REJECTION = 0.05 + 2 * float(np.sqrt(0.05 * 0.95 / NULLS))


def _between_site_null(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """400 scans, 4 sites with a random effect; a phenotype x that varies between sites, no effect."""
    n = 400
    site = np.repeat(np.arange(4), n // 4)
    x = rng.normal(0.0, 1.0, 4)[site] + rng.normal(0.0, 0.05, n)
    age = rng.uniform(-17.5, 17.5, n)
    sex = rng.integers(0, 2, n).astype(float)
    y = 0.08 * age + 0.4 * sex + rng.normal(0.0, 1.0, 4)[site] + rng.normal(0.0, 3.0, n)
    return y, np.column_stack([np.ones(n), x, age, age**2, sex]), site


def test_few_sites_type_one_error_is_near_nominal_with_satterthwaite_df() -> None:
    """z-tests reject a between-site null far too often with 4 sites; Satterthwaite t does not."""
    rng = np.random.default_rng(15)
    satterthwaite = normal = 0
    for _ in range(NULLS):
        y, X, site = _between_site_null(rng)
        row = fit_random_intercept(y, X, ["c", "x", "age", "age2", "sex"], site, group="site").term("x")
        satterthwaite += row["p"] < 0.05
        normal += 2 * stats.norm.sf(abs(row["stat"])) < 0.05
    assert satterthwaite / NULLS <= MAX_REJECTION, f"Satterthwaite t rejected {satterthwaite}/{NULLS} nulls"
    assert normal / NULLS > 0.10, f"z rejected only {normal}/{NULLS} nulls: the design does not test the df"
