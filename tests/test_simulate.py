"""`bodyage simulate`: the phantom, the planted truth, and the files it writes."""

from __future__ import annotations

import json
from dataclasses import replace
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
from bodyage.simulate.anatomy import GridSpec
from bodyage.simulate.cohort import build_cohort, render_scan
from bodyage.simulate.planted import (
    biological_ages,
    draw_subjects,
    nuisance_sd,
    planted_parameters,
    scaled_nuisance,
)
from bodyage.simulate.resolution import region_counts
from bodyage.simulate.tissue import tissue_of
from bodyage.study import load_study
from bodyage.volumes import load_volume
from cli.app import app

#: no age-independent variation
NONE = {"fat_fraction_sd": 0.0, "water_signal_sd": 0.0, "volume_sd": 0.0, "texture_sd": 0.0, "shape_sd": 0.0}
#: a noise-free cohort at the default 8 mm grid: planted rates can be read off the images
CLEAN = tiny_scenario(
    subjects=40,
    seed=5,
    grid={"shape": [64, 48, 128], "spacing_mm": [8.0, 8.0, 8.0]},
    noise_sd=0.0,
    sites={"count": 1, "intensity_scale_sd": 0.0},
    repeat_visits={"fraction": 0.3, "interval_years": 2.5},
    nuisance=NONE,
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


# ----------------------------------------------------------------------------- the harder harness (issue 16)

#: texture-only and shape-only ageing in the two gluteus maximus muscles, nothing else varying
PATTERNS = tiny_scenario(
    subjects=14,
    seed=3,
    grid={"shape": [64, 48, 128], "spacing_mm": [8.0, 8.0, 8.0]},
    noise_sd=0.0,
    sites={"count": 1, "intensity_scale_sd": 0.0},
    repeat_visits={"fraction": 0.0, "interval_years": 2.5},
    nuisance=NONE,
    ageing=[
        {"region": "gluteus_maximus_right", "effect": "texture", "per_year": 0.015},
        {"region": "gluteus_maximus_left", "effect": "shape", "per_year": 0.008, "axis": "z"},
        {"region": "liver", "effect": "fat_fraction", "per_year": 0.004},
    ],
    phenotypes={},
)


@pytest.fixture(scope="module")
def pattern_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("patterns") / "study"
    simulate_study(root, scenario=PATTERNS, workers=1, figures=False)
    return root


def _block_means(a: np.ndarray, f: int = 2) -> np.ndarray:
    s = [n // f for n in a.shape]
    return a[: s[0] * f, : s[1] * f, : s[2] * f].reshape(s[0], f, s[1], f, s[2], f).mean(axis=(1, 3, 5))


def _region_stats(study: Path, region: str) -> pd.DataFrame:
    """Per scan: mean fat fraction (eroded mask) and volume, FF SD over interior 16 mm voxels, elongation."""
    s = load_study(study)
    assert s.labels is not None
    rid = s.labels.id_of(region)
    rows = {}
    for _, row in s.cohort.iterrows():
        mask = load_volume(s.path(row["mask"])).data == rid
        w = np.asarray(load_volume(s.path(row["water"])).data, dtype=float)
        f = np.asarray(load_volume(s.path(row["fat"])).data, dtype=float)
        cw, cf, inside = _block_means(w), _block_means(f), _block_means(mask.astype(float)) == 1.0
        xs, _, zs = np.nonzero(mask)
        core = ndimage.binary_erosion(mask)  # away from the partial volume with neighbours
        rows[row["scan_id"]] = {
            "age": row["age"],
            "mean_ff": f[core].sum() / (w[core].sum() + f[core].sum()),
            "n_voxels": int(mask.sum()),
            "texture": float((cf[inside] / (cw[inside] + cf[inside])).std()),
            "elongation": float(zs.std() / xs.std()),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def test_texture_only_ageing_keeps_the_mean_and_grows_the_heterogeneity(pattern_study: Path) -> None:
    stats = _region_stats(pattern_study, "gluteus_maximus_right")
    truth = _truth(pattern_study, "gluteus_maximus_right").loc[stats.index]
    assert truth["texture_cv"].std() > 0.1 and truth["fat_fraction"].nunique() == 1
    # the region's mean fat fraction stays the planted one (within partial volume) ...
    assert np.allclose(stats["mean_ff"], truth["fat_fraction"], atol=0.006)
    # ... while its heterogeneity on the 16 mm model grid follows the planted one, and age
    assert stats["texture"].corr(truth["texture_cv"], method="spearman") > 0.7
    assert stats["texture"].corr(stats["age"], method="spearman") > 0.6
    assert (pd.read_parquet(pattern_study / "truth.parquet").query("region == 'liver'")["texture_cv"] == 0).all()


def test_texture_changes_no_mean_in_the_same_body() -> None:
    """One body rendered at low and high heterogeneity: same mean fat fraction and water, larger SD."""
    labels = combined_label_table()
    sc = parse_scenario(PATTERNS)
    grid = GridSpec(sc.grid.shape, sc.grid.spacing_mm)
    _, _, specs = build_cohort(sc, labels, grid)
    rid = labels.id_of("gluteus_maximus_right")
    out = {}
    for cv in (0.2, 0.8):
        spec = replace(specs[0], texture={"gluteus_maximus_right": cv})
        water, fat, mask = (np.asarray(a, dtype=float) for a in render_scan(spec, grid, labels, 0.0))
        sel = mask == rid
        cw, cf, inside = _block_means(water), _block_means(fat), _block_means(sel.astype(float)) == 1.0
        out[cv] = (
            fat[sel].sum() / (water[sel].sum() + fat[sel].sum()),
            water[sel].mean(),
            (cf[inside] / (cw[inside] + cf[inside])).std(),
        )
    assert out[0.8][0] == pytest.approx(out[0.2][0], abs=0.002)  # mean fat fraction
    assert out[0.8][1] == pytest.approx(out[0.2][1], rel=0.005)  # mean water signal
    assert out[0.8][2] > 1.4 * out[0.2][2]  # heterogeneity at the model grid (edges add a fixed part)


def test_shape_only_ageing_keeps_volume_and_mean(pattern_study: Path) -> None:
    stats = _region_stats(pattern_study, "gluteus_maximus_left")
    truth = _truth(pattern_study, "gluteus_maximus_left").loc[stats.index]
    assert truth["shape_stretch"].min() < 1.1 < 1.25 < truth["shape_stretch"].max()
    assert np.allclose(truth["volume_factor"], 1.0) and np.allclose(
        truth["fat_fraction"], truth["fat_fraction"].iloc[0]
    )
    log_s = np.log(truth["shape_stretch"].to_numpy())
    # elongation (z extent over x extent) ~ stretch^1.5; volume and mean fat fraction flat
    slope_elong = np.polyfit(log_s, np.log(stats["elongation"].to_numpy()), 1)[0]
    assert 1.0 < slope_elong < 2.0
    slope_vol = np.polyfit(log_s, np.log(stats["n_voxels"].to_numpy(dtype=float)), 1)[0]
    assert abs(slope_vol) < 0.25  # the organ size jitter (sd 0.08) is the only volume variation
    assert stats["mean_ff"].max() - stats["mean_ff"].min() < 0.01


def test_texture_and_shape_carry_oracle_information(pattern_study: Path) -> None:
    truth = json.loads((pattern_study / "truth.json").read_text())
    info = truth["region_information"]
    assert info["gluteus_maximus_right"] > 0 and info["gluteus_maximus_left"] > 0
    assert truth["effects"]["gluteus_maximus_right"] == ["texture"]


def test_nuisance_variance_in_every_region() -> None:
    """Every region varies between subjects by the scenario's total SD, planted or not."""
    sc = parse_scenario(tiny_scenario(nuisance={}))  # the default levels
    regions = combined_label_table().regions
    draws = draw_subjects(sc, 20_000, regions, np.random.default_rng(1))
    bio = biological_ages(sc, draws.age, draws, regions)
    sd = nuisance_sd(sc, regions)
    p = planted_parameters(sc, bio, draws.phenotypes, regions, scaled_nuisance(draws, sd))
    ff = p.fat_fraction
    logit_sd = pd.Series(np.log(ff / (1 - ff)).std(axis=0), index=regions)
    # the clipped fat-fraction limits (0.002) shrink the spread of near-zero regions a little
    unclipped = [r for j, r in enumerate(regions) if (ff[:, j] <= 0.0021).mean() < 0.01]
    assert len(unclipped) >= 30 and {"liver", "pancreas", "autochthon_left", "femur_left"} <= set(unclipped)
    assert np.allclose(logit_sd[unclipped], sc.nuisance.fat_fraction_sd, rtol=0.06)
    fat_ageing = {a.region for a in sc.ageing if a.effect == "fat_fraction"}
    plain = [j for j, r in enumerate(regions) if r not in fat_ageing]
    assert np.allclose(np.log(p.water_signal[:, plain]).std(axis=0), sc.nuisance.water_signal_sd, rtol=0.05)
    # where the fat fraction ages, the water channel (1 - ff) * water spreads as in a like tissue,
    # on the scale of the signal-spread floor: SD of mean water over the mean of water + fat
    water = (1 - ff) * p.water_signal
    channel = pd.Series(water.std(axis=0) / (water + ff).mean(axis=0), index=regions)
    assert channel[sorted(fat_ageing)].max() <= channel[["gluteus_medius_left", "skeletal_muscle"]].min() * 1.02
    assert channel[sorted(fat_ageing)].min() >= channel[["gluteus_medius_left", "skeletal_muscle"]].min() * 0.95
    assert np.allclose(np.log(p.volume_factor).std(axis=0), sc.nuisance.volume_sd, rtol=0.05)
    # planted regions get less age-independent variation: ageing fills the rest
    col = {r: j for j, r in enumerate(regions)}
    assert sd[col["liver"], 0] < sd[col["femur_left"], 0] == pytest.approx(sc.nuisance.fat_fraction_sd)
    # age explains part of the liver's spread and none of the spleen's
    assert abs(np.corrcoef(draws.age, ff[:, col["femur_left"]])[0, 1]) < 0.03
    assert np.corrcoef(draws.age, ff[:, col["liver"]])[0, 1] > 0.4


def test_nuisance_in_the_written_truth_and_images(tmp_path: Path) -> None:
    sc = tiny_scenario(subjects=10, noise_sd=0.0, sites={"count": 1, "intensity_scale_sd": 0.0}, nuisance={})
    root = simulate_study(tmp_path / "s", scenario=sc, workers=1, figures=False).study
    t = pd.read_parquet(root / "truth.parquet")
    first = t[t["visit"] == 0]
    logs = np.log(first[["water_signal", "volume_factor"]]).assign(
        logit_ff=np.log(first["fat_fraction"] / (1 - first["fat_fraction"])), region=first["region"]
    )
    spread = logs.groupby("region").std()
    # every region, every parameter; fat-free tissue (blood, fluid) sits at the 0.002 limit
    fatty = [r for r in spread.index if tissue_of(r).ff >= 0.005]
    assert len(fatty) > 30 and (spread.loc[fatty, "logit_ff"] > 0.2).all()
    assert (spread[["water_signal", "volume_factor"]] > 0.04).all().all()
    truth = json.loads((root / "truth.json").read_text())
    assert truth["nuisance_sd"]["small_bowel"]["fat_fraction"] == pytest.approx(0.7)
    # the images show it: an unplanted organ's measured fat fraction follows the truth
    water = _region_values(root, "small_bowel", "water")
    fat = _region_values(root, "small_bowel", "fat")
    bowel = _truth(root, "small_bowel").loc[water.index]
    assert np.corrcoef(fat / (water + fat), bowel["fat_fraction"])[0, 1] > 0.8  # 16 mm: partial volume


def test_resolvable_truth_at_the_model_grid(clean_study: Path) -> None:
    truth = json.loads((clean_study / "truth.json").read_text())
    res = truth["resolvable"]
    assert res["grid"] == [32, 24, 64] and res["grid_mm"] == 16.0  # auto_grid of the 8 mm cohort
    assert res["regions"]["liver"]["resolvable"] and res["regions"]["liver"]["interior_voxels"] > 100
    # thin discs between vertebrae: no 16 mm voxel lies wholly inside them
    assert not res["regions"]["intervertebral_discs"]["resolvable"]
    assert truth["below_resolution"] == res["below_resolution"]
    assert "intervertebral_discs" in truth["below_resolution"] and "liver" not in truth["below_resolution"]
    assert set(truth["below_resolution"]) <= set(truth["planted_regions"])


def test_region_counts_interior_voxels() -> None:
    mask = np.zeros((8, 8, 8), dtype=np.uint8)
    mask[2:6, 2:6, 2:6] = 1  # a 4-voxel cube aligned with 2x2x2 blocks: 8 whole blocks
    majority, interior = region_counts(mask, (4, 4, 4), 3)
    assert interior[1] == 8 and majority[1] == 8
    shifted = np.roll(mask, 1, axis=0)  # off the block grid: only 4 blocks lie wholly inside
    _, interior = region_counts(shifted, (4, 4, 4), 3)
    assert interior[1] == 4 and interior[0] == 0
    assert interior[2] == 0


def test_dev_scenario_simulates(tmp_path: Path) -> None:
    res = simulate_study(tmp_path / "dev", scenario="dev", subjects=3, workers=1, figures=False)
    truth = json.loads((res.study / "truth.json").read_text())
    assert truth["scenario_name"] == "dev"
    info = {r for r, v in truth["region_information"].items() if v > 0}
    assert {"heart", "skeletal_muscle", "vertebrae"} <= info and "liver" not in info
