"""Scenario YAML contract (DESIGN.md §5): every key works, every bad value is one clear error."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from bodyage.errors import BodyageWarning, ScenarioError
from bodyage.scenario import load_scenario, parse_scenario

FULL = {
    "subjects": 12,
    "seed": 7,
    "age": {"min": 40, "max": 70},
    "grid": {"shape": [32, 24, 64], "spacing_mm": [16.0, 16.0, 16.0]},
    "noise_sd": 0.02,
    "sites": {"count": 3, "intensity_scale_sd": 0.1},
    "repeat_visits": {"fraction": 0.5, "interval_years": 3.0},
    "biological_age_sd": 2.0,
    "region_age_sd": 1.0,
    "ageing": [
        {"region": "liver", "effect": "fat_fraction", "per_year": 0.005},
        {"region": "intervertebral_discs", "effect": "water_signal", "per_year": -0.01},
        {"region": "kidney_left", "effect": "volume", "per_year": -0.004},
    ],
    "phenotypes": {
        "diabetes": {"type": "binary", "prevalence": 0.3, "accelerates": {"liver": 4.0}},
        "bmi": {"type": "continuous", "mean": 26.0, "sd": 3.0, "anatomy": {"subcutaneous_fat": {"volume": 0.02}}},
        "grip": {"type": "continuous", "mean": 30.0, "sd": 5.0, "anatomy": {"liver": {"fat_fraction": 0.001}}},
    },
}


def test_default_scenario_is_the_design_default() -> None:
    sc = load_scenario("default")
    assert sc.subjects == 300 and sc.seed == 0
    assert (sc.age.min, sc.age.max) == (45.0, 82.0)
    assert sc.grid.shape == (64, 48, 128) and sc.grid.spacing_mm == (8.0, 8.0, 8.0)
    assert sc.noise_sd == 0.03 and sc.sites.count == 4 and sc.sites.intensity_scale_sd == 0.05
    assert sc.repeat_visits.fraction == 0.15 and sc.repeat_visits.interval_years == 2.5
    assert sc.biological_age_sd == 1.5 and sc.region_age_sd == 3.0
    assert len(sc.ageing) == 8
    assert {p.name for p in sc.phenotypes} == {"diabetes", "activity", "bmi", "smoking"}
    assert sc.planted_regions[0] == "liver"


def test_every_key_is_honoured(tmp_path: Path) -> None:
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(FULL))
    sc = load_scenario(path)
    assert sc.name == "full"
    assert sc.subjects == 12 and sc.seed == 7
    assert sc.age.min == 40 and sc.age.max == 70
    assert sc.grid.shape == (32, 24, 64) and sc.grid.spacing_mm == (16.0, 16.0, 16.0)
    assert sc.noise_sd == 0.02
    assert sc.sites.count == 3 and sc.sites.intensity_scale_sd == 0.1
    assert sc.repeat_visits.fraction == 0.5 and sc.repeat_visits.interval_years == 3.0
    assert sc.biological_age_sd == 2.0 and sc.region_age_sd == 1.0
    assert [(a.region, a.effect, a.per_year) for a in sc.ageing] == [
        ("liver", "fat_fraction", 0.005),
        ("intervertebral_discs", "water_signal", -0.01),
        ("kidney_left", "volume", -0.004),
    ]
    phen = {p.name: p for p in sc.phenotypes}
    assert phen["diabetes"].prevalence == 0.3 and phen["diabetes"].accelerates == {"liver": 4.0}
    assert phen["bmi"].mean == 26.0 and phen["bmi"].sd == 3.0
    assert phen["bmi"].anatomy == {"subcutaneous_fat": {"volume": 0.02}}
    # the canonical form round-trips
    assert parse_scenario(sc.to_dict()).to_dict() == sc.to_dict()
    assert parse_scenario(sc.to_dict()).digest() == sc.digest()


def _with(path: str, value: object) -> dict:
    raw = copy.deepcopy(FULL)
    node: dict = raw
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return raw


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        # unknown keys
        ({**FULL, "subject": 3}, r"subject is not a known key"),
        (_with("sites.cnt", 2), r"sites\.cnt is not a known key"),
        (_with("phenotypes.diabetes.prevalance", 0.1), r"phenotypes\.diabetes\.prevalance is not a known key"),
        # unknown regions
        (_with("ageing.0.region", "livr"), r"ageing\[0\]\.region names unknown region 'livr'"),
        (
            _with("phenotypes.diabetes.accelerates", {"appendix": 2.0}),
            r"phenotypes\.diabetes\.accelerates\.appendix names unknown region 'appendix'",
        ),
        # wrong types
        ({**FULL, "subjects": "many"}, r"subjects must be an integer, got 'many'"),
        ({**FULL, "noise_sd": "0.1"}, r"noise_sd must be a number, got '0\.1'"),
        (_with("grid.shape", [32, 24]), r"grid\.shape must be a list of 3 numbers"),
        (
            _with("ageing.0.effect", "stiffness"),
            r"ageing\[0\]\.effect must be one of volume, fat_fraction, water_signal, texture, shape, got 'stiffness'",
        ),
        (_with("phenotypes.diabetes.type", "ordinal"), r"phenotypes\.diabetes\.type must be one of binary, continuous"),
        ({**FULL, "ageing": {"region": "liver"}}, r"ageing must be a list"),
        # impossible values
        ({**FULL, "biological_age_sd": -1.0}, r"biological_age_sd must be >= 0, got -1\.0"),
        ({**FULL, "region_age_sd": -0.5}, r"region_age_sd must be >= 0, got -0\.5"),
        (_with("phenotypes.diabetes.prevalence", 1.5), r"phenotypes\.diabetes\.prevalence must be <= 1, got 1\.5"),
        (_with("phenotypes.bmi.sd", 0), r"phenotypes\.bmi\.sd must be > 0, got 0"),
        (_with("sites.intensity_scale_sd", -0.1), r"sites\.intensity_scale_sd must be >= 0, got -0\.1"),
        (_with("repeat_visits.fraction", 1.2), r"repeat_visits\.fraction must be <= 1, got 1\.2"),
        (_with("age.max", 30), r"age\.max must be greater than age\.min \(40\), got 30"),
        (_with("grid.spacing_mm", [16.0, 0.0, 16.0]), r"grid\.spacing_mm\[1\] must be > 0, got 0\.0"),
        ({**FULL, "subjects": 0}, r"subjects must be >= 1, got 0"),
        (_with("phenotypes.diabetes.mean", 1.0), r"phenotypes\.diabetes\.mean applies to continuous phenotypes only"),
        (_with("phenotypes.smoking", {"type": "binary"}), r"phenotypes\.smoking\.prevalence is missing"),
        (
            {**FULL, "phenotypes": {"age": {"type": "binary", "prevalence": 0.1}}},
            r"phenotypes\.age uses a reserved cohort column name",
        ),
        # the harder harness's keys (issue 16)
        ({**FULL, "nuisance": {"fat_fraction_sd": -0.1}}, r"nuisance\.fat_fraction_sd must be >= 0, got -0\.1"),
        ({**FULL, "nuisance": {"texture": 0.1}}, r"nuisance\.texture is not a known key"),
        ({**FULL, "nuisance": {"volume_sd": "big"}}, r"nuisance\.volume_sd must be a number, got 'big'"),
        ({**FULL, "nuisance": [0.1]}, r"nuisance must be a mapping"),
        (
            _with("ageing.0", {"region": "liver", "effect": "shape", "per_year": 0.01, "axis": "w"}),
            r"ageing\[0\]\.axis must be one of x, y, z, got 'w'",
        ),
        (
            _with("ageing.0", {"region": "liver", "effect": "fat_fraction", "per_year": 0.01, "axis": "z"}),
            r"ageing\[0\]\.axis applies to effect shape only, not 'fat_fraction'",
        ),
        (
            _with("ageing.0", {"region": "liver", "effect": "texture", "per_year": -0.01}),
            r"ageing\[0\]\.per_year must be > 0 for effect texture",
        ),
        (
            _with("phenotypes.bmi.anatomy", {"liver": {"texture": 0.1}}),
            r"phenotypes\.bmi\.anatomy\.liver\.texture is not a known key",
        ),
    ],
)
def test_bad_scenarios_name_key_and_value(raw: dict, message: str) -> None:
    with pytest.raises(ScenarioError, match=r"^scenario <dict>: " + message):
        parse_scenario(raw)


def test_accelerating_an_unplanted_region_warns() -> None:
    raw = _with("phenotypes.diabetes.accelerates", {"liver": 4.0, "spleen": 2.0})
    with pytest.warns(BodyageWarning, match=r"accelerates\.spleen accelerates a region without an ageing entry"):
        parse_scenario(raw)


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("subjects: [1, 2\n")
    with pytest.raises(ScenarioError, match=r"scenario bad\.yaml: not valid YAML"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match=r"scenario 'nope' is neither a built-in scenario"):
        load_scenario("nope")


def test_an_empty_scenario_is_a_cohort_without_ageing() -> None:
    sc = parse_scenario({})
    assert sc.ageing == () and sc.phenotypes == ()


def test_nuisance_texture_and_shape_keys(tmp_path: Path) -> None:
    raw = {
        **FULL,
        "nuisance": {
            "fat_fraction_sd": 0.5,
            "water_signal_sd": 0.1,
            "volume_sd": 0.2,
            "texture_sd": 0.3,
            "shape_sd": 0.05,
        },
        "ageing": [
            {"region": "liver", "effect": "texture", "per_year": 0.01},
            {"region": "spleen", "effect": "shape", "per_year": -0.01, "axis": "x"},
            {"region": "kidney_left", "effect": "shape", "per_year": 0.01},
        ],
    }
    path = tmp_path / "harder.yaml"
    path.write_text(yaml.safe_dump(raw))
    sc = load_scenario(path)
    n = sc.nuisance
    assert (n.fat_fraction_sd, n.water_signal_sd, n.volume_sd, n.texture_sd, n.shape_sd) == (0.5, 0.1, 0.2, 0.3, 0.05)
    assert [(a.effect, a.axis) for a in sc.ageing] == [("texture", "z"), ("shape", "x"), ("shape", "z")]
    assert parse_scenario(sc.to_dict()).to_dict() == sc.to_dict()
    assert "axis" not in sc.to_dict()["ageing"][0] and sc.to_dict()["ageing"][2]["axis"] == "z"
    # a missing nuisance key gets the default's realistic levels; zero turns it off
    assert parse_scenario({}).nuisance == load_scenario("default").nuisance
    assert parse_scenario({"nuisance": {"fat_fraction_sd": 0}}).nuisance.fat_fraction_sd == 0


def test_dev_scenario_differs_from_default() -> None:
    default, dev = load_scenario("default"), load_scenario("dev")
    assert dev.name == "dev" and dev.seed != default.seed
    assert not set(dev.planted_regions) & set(default.planted_regions)
    for sc in (default, dev):
        effects = {a.effect for a in sc.ageing}
        assert {"texture", "shape", "fat_fraction", "volume"} <= effects
        assert sc.nuisance.fat_fraction_sd > 0 and sc.nuisance.water_signal_sd > 0 and sc.nuisance.volume_sd > 0
    assert dev.grid == default.grid and dev.age == default.age
