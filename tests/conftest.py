"""Shared fixtures: seeded factories of tiny synthetic data."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded random generator (the same numbers in every test run)."""
    return np.random.default_rng(20261128)
