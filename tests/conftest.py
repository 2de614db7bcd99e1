"""Shared fixtures: seeded factories of tiny synthetic data.

Study fixtures are session-scoped (written once per test run into pytest's temporary
folder) and must be treated as read-only by tests; copy them before modifying.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

#: a tiny scenario: a 16 mm grid, few subjects; the default's planted ageing and phenotypes
TINY_SCENARIO: dict[str, Any] = {
    "subjects": 24,
    "seed": 11,
    "age": {"min": 45, "max": 82},
    "grid": {"shape": [32, 24, 64], "spacing_mm": [16.0, 16.0, 16.0]},
    "noise_sd": 0.03,
    "sites": {"count": 2, "intensity_scale_sd": 0.05},
    "repeat_visits": {"fraction": 0.25, "interval_years": 2.5},
    "biological_age_sd": 1.5,
    "region_age_sd": 3.0,
    # no age-independent variation: pipeline tests see the planted ageing plainly
    "nuisance": {"fat_fraction_sd": 0.0, "water_signal_sd": 0.0, "volume_sd": 0.0, "texture_sd": 0.0, "shape_sd": 0.0},
    "ageing": [
        {"region": "liver", "effect": "fat_fraction", "per_year": 0.004},
        {"region": "pancreas", "effect": "fat_fraction", "per_year": 0.004},
        {"region": "gluteus_maximus_left", "effect": "fat_fraction", "per_year": 0.004},
        {"region": "gluteus_maximus_right", "effect": "fat_fraction", "per_year": 0.004},
        {"region": "intervertebral_discs", "effect": "water_signal", "per_year": -0.008},
        {"region": "torso_fat", "effect": "volume", "per_year": 0.010},
    ],
    "phenotypes": {
        "diabetes": {"type": "binary", "prevalence": 0.3, "accelerates": {"liver": 5.0, "pancreas": 5.0}},
        "bmi": {"type": "continuous", "mean": 27.0, "sd": 4.0, "anatomy": {"subcutaneous_fat": {"volume": 0.03}}},
        "smoking": {"type": "binary", "prevalence": 0.3},
    },
}


def tiny_scenario(**overrides: Any) -> dict[str, Any]:
    """A copy of :data:`TINY_SCENARIO` with top-level keys replaced."""
    sc = copy.deepcopy(TINY_SCENARIO)
    sc.update(overrides)
    return sc


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded random generator (the same numbers in every test run)."""
    return np.random.default_rng(20261128)


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny simulated study (24 subjects, 16 mm grid); read-only."""
    from bodyage.simulate import simulate_study

    root = tmp_path_factory.mktemp("tiny") / "study"
    simulate_study(root, scenario=tiny_scenario(), workers=1, figures=False)
    return root
