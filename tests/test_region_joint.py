"""The joint region model reports a region only when it departs from the whole-body effect."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from factories import REGIONS, make_tables
from statsmodels.stats.multitest import multipletests

from analysis.regionjoint import WHOLE_BODY, joint_region_model
from analysis.run import RunTables
from analysis.tables import region_table
from bodyage.errors import BodyageWarning, InputError

#: region scales for the "proportional" whole-body shift: 0.01 to 10 (years of ablation mass)
SCALES = dict(zip(REGIONS, np.geomspace(0.01, 10.0, len(REGIONS)), strict=True))


def _tables(
    n: int,
    seed: int,
    *,
    whole_body: float,
    planted: Mapping[str, float],
    proportional: bool,
    repeat_fraction: float = 0.0,
) -> RunTables:
    """Ablation mass with a whole-body shift of every region plus planted regional effects of diabetes.

    ``additive``: every region's mass (noise SD 0.6) moves by ``whole_body`` years per
    carrier. ``proportional``: then each region's mass is multiplied by its scale
    (:data:`SCALES`), so the shift is proportional to the region's scale, as a whole-body
    effect on regions of very different sizes would be.
    """
    frames = make_tables(n, seed=seed, methods=("ablation",), mass_effects={}, repeat_fraction=repeat_fraction)
    attr = frames.attributions.copy()
    cohort = frames.cohort.set_index(frames.cohort["subject_id"] + "_" + frames.cohort["visit"].astype(str))
    carrier = (attr["subject_id"] + "_" + attr["visit"].astype(str)).map(cohort["diabetes"]).to_numpy(float)
    effect = whole_body + attr["region"].map(lambda r: planted.get(r, 0.0)).to_numpy(float)
    mass = attr["mass"].to_numpy() + effect * carrier
    if proportional:
        mass = mass * attr["region"].map(SCALES).to_numpy(float)
    attr["mass"] = mass
    return RunTables.from_frames(frames.cohort, frames.predictions, attr, region_order=frames.regions)


def _found(res: pd.DataFrame, phenotype: str = "diabetes") -> set[str]:
    rows = res[(res["phenotype"] == phenotype) & (res["region"] != WHOLE_BODY)]
    return set(rows.loc[rows["significant"], "region"])


@pytest.mark.parametrize("proportional", [False, True], ids=["additive", "proportional"])
def test_planted_region_beyond_a_whole_body_shift_is_the_only_finding(proportional: bool) -> None:
    tables = _tables(400, 1, whole_body=1.0, planted={"liver": 1.5}, proportional=proportional)
    res = joint_region_model(tables, phenotypes=["diabetes"])
    assert _found(res) == {"liver"}
    liver = res[res["region"] == "liver"].iloc[0]
    assert liver["estimate"] > 0
    assert not liver["in_reference"]
    whole = res[res["region"] == WHOLE_BODY].iloc[0]
    assert whole["significant"] and whole["estimate"] > 0  # the shift every region shares
    assert whole["n_reference"] == len(REGIONS) - 1


@pytest.mark.parametrize("proportional", [False, True], ids=["additive", "proportional"])
def test_a_whole_body_shift_alone_yields_no_region(proportional: bool) -> None:
    tables = _tables(400, 2, whole_body=1.0, planted={}, proportional=proportional)
    res = joint_region_model(tables, phenotypes=["diabetes"])
    assert _found(res) == set()
    whole = res[res["region"] == WHOLE_BODY].iloc[0]
    assert whole["significant"] and whole["n_reference"] == len(REGIONS)


def test_strong_regions_do_not_drag_the_others_into_significance() -> None:
    """Two strong regional effects and no whole-body one.

    Against the mean of all regions every other region would look shifted the opposite way
    (by ~(5 + 5)/11 of a standard deviation per carrier); against the regions that do not
    deviate it is not. The small spleen (scale 0.01) counts as much as the large liver.
    """
    tables = _tables(1500, 3, whole_body=0.0, planted={"liver": 3.0, "spleen": 3.0}, proportional=True)
    res = joint_region_model(tables, phenotypes=["diabetes"])
    assert _found(res) == {"liver", "spleen"}
    assert (res.loc[res["region"].isin(["liver", "spleen"]), "estimate"] > 0).all()


def test_contrast_fit_matches_statsmodels_ols_by_hand() -> None:
    """Standardise by hand, contrast with the reference regions, fit with statsmodels (cluster-robust)."""
    tables = _tables(120, 4, whole_body=0.5, planted={"liver": 2.0}, proportional=True, repeat_fraction=0.4)
    res = joint_region_model(tables, phenotypes=["diabetes"], covariates=[], default_covariates=False)
    assert (res["se_type"] == "cluster(subject)").all()
    scans = tables.scans
    attr = tables.attributions
    assert attr is not None
    wide = attr.pivot(index="scan_id", columns="region", values="mass").loc[scans["scan_id"], list(REGIONS)]
    site = pd.get_dummies(scans["site"], drop_first=True, dtype=float)
    base = pd.concat([pd.Series(1.0, index=scans.index, name="const"), site], axis=1)
    X = pd.concat([base, scans["diabetes"].astype(float)], axis=1).to_numpy()
    z = {}
    for r in REGIONS:
        y = wide[r].to_numpy()
        ok = np.isfinite(y)
        resid = sm.OLS(y[ok], base.to_numpy()[ok]).fit()
        z[r] = y / np.sqrt(resid.ssr / resid.df_resid)
    reference = [r for r in REGIONS if bool(res.loc[res["region"] == r, "in_reference"].iloc[0])]
    assert "liver" not in reference
    for region in ("liver", "spleen", "prostate"):
        others = np.column_stack([z[s] for s in reference if s != region])
        contrast = z[region] - np.nanmean(others, axis=1)
        ok = np.isfinite(contrast)
        fit = sm.OLS(contrast[ok], X[ok]).fit(
            cov_type="cluster", cov_kwds={"groups": pd.factorize(scans["subject_id"])[0][ok]}
        )
        row = res[res["region"] == region].iloc[0]
        assert row["estimate"] == pytest.approx(fit.params[-1], rel=1e-9)
        assert row["se"] == pytest.approx(fit.bse[-1], rel=1e-9)
        assert row["n"] == ok.sum()
        assert row["scale"] == pytest.approx(np.nanmedian(wide[region] / z[region]), rel=1e-9)
    whole = res[res["region"] == WHOLE_BODY].iloc[0]
    mean = np.nanmean(np.column_stack([z[s] for s in reference]), axis=1)
    fit = sm.OLS(mean, X).fit(cov_type="cluster", cov_kwds={"groups": pd.factorize(scans["subject_id"])[0]})
    assert whole["estimate"] == pytest.approx(fit.params[-1], rel=1e-9)
    assert whole["se"] == pytest.approx(fit.bse[-1], rel=1e-9)


@pytest.mark.parametrize("family", ["method", "phenotype", "all"])
def test_q_values_are_bh_over_the_region_models_family(family: str) -> None:
    tables = _tables(200, 5, whole_body=0.5, planted={"liver": 1.0}, proportional=False)
    res = joint_region_model(tables, phenotypes=["diabetes", "bmi", "smoking"], fdr_family=family)  # type: ignore[arg-type]
    regions = res[res["region"] != WHOLE_BODY]
    keys = {"method": ["method"], "phenotype": ["method", "phenotype"], "all": ["metric"]}[family]
    assert (regions["fdr_family"] == family).all()
    for _, block in regions.groupby(keys):
        ok = block["p"].notna()
        np.testing.assert_allclose(block.loc[ok, "q"], multipletests(block.loc[ok, "p"], method="fdr_bh")[1])
    whole = res[res["region"] == WHOLE_BODY]
    assert (whole["fdr_family"] == f"{family} (whole body)").all()
    # the reported regions are exactly those left out of the whole-body reference
    assert (regions["significant"] == ~regions["in_reference"].astype(bool)).all()


def test_more_than_half_deviating_keeps_half_in_the_reference_and_warns() -> None:
    """Eight regions shifted by different amounts, none shared by a majority: no whole body."""
    planted = dict(zip(REGIONS[:8], [3.0, -3.0, 2.5, -2.5, 3.5, -3.5, 2.0, -2.0], strict=True))
    tables = _tables(600, 6, whole_body=0.0, planted=planted, proportional=False)
    with pytest.warns(BodyageWarning, match=r"regions deviate for diabetes; the whole-body reference keeps the half"):
        res = joint_region_model(tables, phenotypes=["diabetes"])
    whole = res[res["region"] == WHOLE_BODY].iloc[0]
    assert whole["n_reference"] >= len(REGIONS) - len(REGIONS) // 2


def test_unknown_fdr_family_is_an_error_naming_the_option() -> None:
    tables = _tables(60, 7, whole_body=0.0, planted={}, proportional=False)
    with pytest.raises(InputError, match=r"--fdr-family must be one of .*'region' was provided"):
        joint_region_model(tables, fdr_family="region")  # type: ignore[arg-type]


def test_latex_notes_state_the_estimand() -> None:
    tables = _tables(300, 1, whole_body=1.0, planted={"liver": 1.5}, proportional=True)
    res = joint_region_model(tables, phenotypes=["diabetes"])
    view, spec = region_table(res, "ablation", 0.05, joint=True)
    notes = " ".join(spec.notes)
    assert "standard deviations" in notes
    assert "regions that do not deviate" in notes
    assert "sum" not in notes and "centred on the scan's mean" not in notes
    assert list(view["region"]) == [WHOLE_BODY, "liver"]
