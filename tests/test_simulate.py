"""`bodyage simulate`: the phantom, the planted truth, and the files it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_scenario
from scipy import ndimage
from typer.testing import CliRunner

from bodyage.regions import combined_label_table
from bodyage.scenario import parse_scenario
from bodyage.simulate import simulate_study
from bodyage.simulate.planted import biological_ages, draw_subjects, planted_parameters
from bodyage.study import load_study
from bodyage.volumes import load_volume
from cli.app import app

#: a noise-free cohort at the default 8 mm grid: planted rates can be read off the images
CLEAN = tiny_scenario(
    subjects=40,
    seed=5,
    grid={"shape": [64, 48, 128], "spacing_mm": [8.0, 8.0, 8.0]},
    noise_sd=0.0,
    sites={"count": 1, "intensity_scale_sd": 0.0},
    repeat_visits={"fraction": 0.3, "interval_years": 2.5},
)


@pytest.fixture(scope="module")
def clean_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clean") / "study"
    simulate_study(root, scenario=CLEAN, workers=1, figures=True)
    return root


def _region_values(study: Path, region: str, channel: str, *, erode: int = 0) -> pd.Series:
    s = load_study(study)
    assert s.labels is not None
    rid = s.labels.id_of(region)
    out = {}
    for _, row in s.cohort.iterrows():
        mask = load_volume(s.path(row["mask"])).data == rid
        if erode:
            mask = ndimage.binary_erosion(mask, iterations=erode)
        img = np.asarray(load_volume(s.path(row[channel])).data, dtype=float)
        out[row["scan_id"]] = img[mask].mean() if mask.any() else np.nan
    return pd.Series(out)


def _truth(study: Path, region: str) -> pd.DataFrame:
    t = pd.read_parquet(study / "truth.parquet")
    t = t[t["region"] == region].copy()
    t["scan_id"] = t["subject_id"] + "_" + t["visit"].astype(str)
    return t.set_index("scan_id")


def test_study_is_valid_and_masks_align(clean_study: Path) -> None:
    s = load_study(clean_study)
    assert s.labels is not None and s.has_truth and s.has_masks
    assert set(s.cohort.columns) >= {
        "subject_id",
        "visit",
        "age",
        "sex",
        "site",
        "water",
        "fat",
        "mask",
        "diabetes",
        "bmi",
    }
    for _, row in s.cohort.head(5).iterrows():
        vols = [load_volume(s.path(row[c])) for c in ("water", "fat", "mask")]
        assert all(v.shape == (64, 48, 128) for v in vols)
        assert all(np.allclose(v.affine, vols[0].affine) for v in vols)
        assert vols[0].orientation == ("R", "A", "S")
        assert vols[0].data.dtype == np.int16 and vols[2].data.dtype == np.uint8
        # scanner-like intensities (hundreds), not [0, 1]
        assert 300 < np.percentile(vols[1].data, 99.5) < 2000
        assert 300 < np.percentile(vols[0].data, 99.5) < 2000
    truth = json.loads((clean_study / "truth.json").read_text())
    assert truth["oracle_mae"] > 0
    assert set(truth["region_information"]) == set(s.labels.regions)
    assert (clean_study / "figures" / "phantom_young.png").stat().st_size > 10_000
    assert (clean_study / "study.json").is_file()


def test_phantom_has_anatomy(clean_study: Path) -> None:
    t = pd.read_parquet(clean_study / "truth.parquet")
    present = t[t["present"]].groupby("region").size()
    # at least 20 regions present in (nearly) every scan; the brain is outside a neck-to-knee view
    n_scans = t[["subject_id", "visit"]].drop_duplicates().shape[0]
    assert (present >= n_scans - 1).sum() >= 40
    assert "brain" not in present.index
    assert t.loc[t["region"] == "brain", "volume_ml"].isna().all()  # missing is NaN, not 0
    cohort = pd.read_csv(clean_study / "cohort.csv")
    males = set(cohort.loc[cohort["sex"] == "M", "subject_id"])
    prostate = t[(t["region"] == "prostate") & t["present"]]
    assert set(prostate["subject_id"]) == males
    liver = t[t["region"] == "liver"]["volume_ml"]
    assert 1000 < liver.median() < 3000  # ml: an adult liver
    # left organs on the subject's left (negative x in RAS+)
    s = load_study(clean_study)
    assert s.labels is not None
    mask = load_volume(s.path(s.cohort["mask"].iloc[0]))
    xs = np.nonzero(mask.data == s.labels.id_of("kidney_left"))[0]
    world_x = mask.affine[0, 0] * xs + mask.affine[0, 3]
    assert world_x.mean() < 0
    liver_x = np.nonzero(mask.data == s.labels.id_of("liver"))[0]
    assert (mask.affine[0, 0] * liver_x + mask.affine[0, 3]).mean() > 0


def test_liver_fat_fraction_rises_at_the_planted_rate(clean_study: Path) -> None:
    water = _region_values(clean_study, "liver", "water", erode=1)
    fat = _region_values(clean_study, "liver", "fat", erode=1)
    measured = fat / (water + fat)
    truth = _truth(clean_study, "liver").loc[measured.index]
    # measured from the image equals the planted fat fraction
    assert np.allclose(measured, truth["fat_fraction"], atol=0.004)
    slope = np.polyfit(truth["biological_age"], measured, 1)[0]
    assert slope == pytest.approx(0.004, rel=0.1)


def test_torso_fat_volume_follows_the_planted_factor(clean_study: Path) -> None:
    t = _truth(clean_study, "torso_fat")
    cohort = load_study(clean_study).cohort.set_index("scan_id").loc[t.index]
    # the planted factor is 1 + 1%/year of biological age
    assert np.allclose(t["volume_factor"], 1 + 0.010 * (t["biological_age"] - 45), atol=1e-9)
    # and the masks' volumes scale with it (log-log slope ~ 1 after body size and sex)
    x = np.column_stack(
        [np.ones(len(t)), np.log(t["volume_factor"]), (cohort["sex"] == "M").astype(float), cohort["bmi"]]
    )
    coef, *_ = np.linalg.lstsq(x, np.log(t["volume_ml"].to_numpy()), rcond=None)
    assert coef[1] == pytest.approx(1.0, abs=0.25)


def test_disc_water_signal_falls_with_planted_factor(clean_study: Path) -> None:
    water = _region_values(clean_study, "intervertebral_discs", "water")
    t = _truth(clean_study, "intervertebral_discs").loc[water.index]
    assert np.allclose(t["water_signal"], 1 - 0.008 * (t["biological_age"] - 45), atol=1e-9)
    slope = np.polyfit(np.log(t["water_signal"]), np.log(water.to_numpy()), 1)[0]
    assert 0.6 < slope < 1.15  # diluted a little by partial volume with the vertebrae


def test_repeat_visits_share_anatomy(clean_study: Path) -> None:
    cohort = pd.read_csv(clean_study / "cohort.csv", dtype={"subject_id": str})
    repeated = cohort.groupby("subject_id").filter(lambda g: len(g) == 2)
    assert len(repeated) >= 4
    for _, g in repeated.groupby("subject_id"):
        g = g.sort_values("visit")
        assert g["age"].diff().iloc[1] == pytest.approx(2.5)
        for col in ("sex", "site", "diabetes", "bmi", "smoking"):
            assert g[col].nunique() == 1
    t = pd.read_parquet(clean_study / "truth.parquet")
    t = t[t["subject_id"].isin(repeated["subject_id"])]
    wide = t.pivot_table(index=["subject_id", "region"], columns="visit", values="biological_age")
    assert np.allclose(wide[1] - wide[0], 2.5)  # same deviations, 2.5 years older
    # the same bones at both visits: femur volume within discretisation
    vol = t[t["region"] == "femur_left"].pivot_table(index="subject_id", columns="visit", values="volume_ml")
    assert np.allclose(vol[1], vol[0], rtol=0.12)


def test_planted_phenotype_effects_on_biological_age() -> None:
    sc = parse_scenario(tiny_scenario())
    regions = combined_label_table().regions
    rng = np.random.default_rng(0)
    draws = draw_subjects(sc, 20_000, regions, rng)
    bio = biological_ages(sc, draws.age, draws, regions)
    liver = regions.index("liver")
    dev = bio[:, liver] - draws.age
    diabetic = draws.phenotypes["diabetes"] == 1
    assert dev[diabetic].mean() - dev[~diabetic].mean() == pytest.approx(5.0, abs=0.15)
    # smoking is a negative control: toggling it changes nothing
    flipped = draws.phenotypes | {"smoking": 1 - draws.phenotypes["smoking"]}
    draws2 = type(draws)(draws.age, draws.sex, draws.site, flipped, draws.shared_deviation, draws.region_deviation)
    bio2 = biological_ages(sc, draws.age, draws2, regions)
    assert np.array_equal(bio, bio2)
    p1 = planted_parameters(sc, bio, draws.phenotypes, regions)
    p2 = planted_parameters(sc, bio2, flipped, regions)
    assert np.array_equal(p1.fat_fraction, p2.fat_fraction) and np.array_equal(p1.volume_factor, p2.volume_factor)


def test_diabetes_in_the_written_truth(clean_study: Path) -> None:
    t = _truth(clean_study, "liver")
    cohort = load_study(clean_study).cohort.set_index("scan_id").loc[t.index]
    first = cohort["visit"] == 0
    dev = (t["biological_age"] - t["age"])[first]
    carriers = cohort.loc[first, "diabetes"] == 1
    diff = dev[carriers].mean() - dev[~carriers].mean()
    se = np.sqrt(dev[carriers].var() / carriers.sum() + dev[~carriers].var() / (~carriers).sum())
    assert abs(diff - 5.0) < 3 * se
    spleen = _truth(clean_study, "spleen").loc[t.index]
    sdev = (spleen["biological_age"] - spleen["age"])[first]
    assert abs(sdev[carriers].mean() - sdev[~carriers].mean()) < 3 * se + 1.0


def test_oracle_information_marks_the_planted_regions(tiny_study: Path) -> None:
    truth = json.loads((tiny_study / "truth.json").read_text())
    info = truth["region_information"]
    planted = {a["region"] for a in truth["scenario"]["ageing"]}
    assert {r for r, v in info.items() if v > 0} == planted
    assert all(v == 0 for r, v in info.items() if r not in planted)
    # oracle near the analytic floor: sd of (shared + mean of 6 regional deviations) ~ sqrt(1.5² + 9/6)
    assert 1.0 < truth["oracle_mae"] < 2.0


def test_same_seed_same_study(tmp_path: Path) -> None:
    sc = tiny_scenario(subjects=5)
    a = simulate_study(tmp_path / "a", scenario=sc, workers=1, figures=False).study
    b = simulate_study(tmp_path / "b", scenario=sc, workers=2, figures=False).study
    assert (a / "cohort.csv").read_bytes() == (b / "cohort.csv").read_bytes()
    for f in sorted((a / "images").iterdir()):
        assert np.array_equal(load_volume(f).data, load_volume(b / "images" / f.name).data)
    c = simulate_study(tmp_path / "c", scenario=sc, seed=99, workers=1, figures=False).study
    assert (a / "cohort.csv").read_bytes() != (c / "cohort.csv").read_bytes()


def test_cli_simulate(tmp_path: Path) -> None:
    runner = CliRunner()
    scen = tmp_path / "tiny.yaml"
    import yaml

    scen.write_text(yaml.safe_dump(tiny_scenario()))
    res = runner.invoke(
        app, ["simulate", str(tmp_path / "s"), "--scenario", str(scen), "--subjects", "4", "--seed", "1"]
    )
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "oracle MAE" in res.output
    assert len(load_study(tmp_path / "s").cohort) >= 4
    res = runner.invoke(app, ["simulate", str(tmp_path / "s"), "--scenario", str(scen)])
    assert res.exit_code == 1
    assert "exists and is not an empty folder" in res.output
