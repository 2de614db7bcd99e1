"""The planted truth: subjects, their regions' biological ages and the planted parameters.

Shared by the cohort writer and the oracle, so the floor the models are judged against is
computed from exactly the generative model the images come from.

For subject ``i`` at a visit of age ``a`` and region ``r``::

    bio_age[i, r] = a + b[i] + d[i, r] + sum_k accelerates[k, r] * z[i, k]

with ``b ~ N(0, biological_age_sd)`` shared by all regions, ``d ~ N(0, region_age_sd)``
independent per region, and ``z`` the phenotype (carrier 0/1, or SD units for continuous
phenotypes). Planted parameters change linearly with ``bio_age − age.min``:

- ``fat_fraction``: base fat fraction + per_year · (bio_age − age.min)  (absolute)
- ``water_signal``: 1 + per_year · (bio_age − age.min)                (relative)
- ``volume``: volume factor 1 + per_year · (bio_age − age.min)         (relative)

and phenotype ``anatomy`` effects add (fat fraction) or multiply (1 + amount · Δ) on top,
where Δ is the carrier indicator or the phenotype's value minus its mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bodyage.scenario import Scenario
from bodyage.simulate.tissue import tissue_of

Array = npt.NDArray[np.float64]

FF_LIMITS = (0.002, 0.98)
FACTOR_LIMITS = (0.2, 5.0)
WATER_LIMITS = (0.05, 3.0)


@dataclass(frozen=True)
class SubjectDraws:
    """Per-subject random draws of a cohort (arrays of length n, or n × regions)."""

    age: Array
    sex: npt.NDArray[np.str_]
    site: npt.NDArray[np.int64]
    phenotypes: dict[str, Array]
    shared_deviation: Array
    region_deviation: Array


def draw_subjects(scenario: Scenario, n: int, regions: Sequence[str], rng: np.random.Generator) -> SubjectDraws:
    """Draw ages at the first visit, sex, site, phenotypes and biological-age deviations."""
    age = np.round(rng.uniform(scenario.age.min, scenario.age.max, size=n), 3)
    sex = np.where(rng.random(n) < 0.5, "F", "M")
    site = rng.integers(0, scenario.sites.count, size=n)
    phenotypes: dict[str, Array] = {}
    for p in scenario.phenotypes:
        if p.type == "binary":
            phenotypes[p.name] = (rng.random(n) < p.prevalence).astype(float)
        else:
            phenotypes[p.name] = np.round(rng.normal(p.mean, p.sd, size=n), 3)
    shared = rng.normal(0.0, scenario.biological_age_sd, size=n) if scenario.biological_age_sd > 0 else np.zeros(n)
    per_region = (
        rng.normal(0.0, scenario.region_age_sd, size=(n, len(regions)))
        if scenario.region_age_sd > 0
        else np.zeros((n, len(regions)))
    )
    return SubjectDraws(age, sex, site, phenotypes, shared, per_region)


def phenotype_z(scenario: Scenario, phenotypes: dict[str, Array]) -> dict[str, Array]:
    """Carrier indicator (binary) or SD units (continuous): what ``accelerates`` multiplies."""
    out: dict[str, Array] = {}
    for p in scenario.phenotypes:
        v = phenotypes[p.name]
        out[p.name] = v if p.type == "binary" else (v - p.mean) / p.sd
    return out


def phenotype_delta(scenario: Scenario, phenotypes: dict[str, Array]) -> dict[str, Array]:
    """Carrier indicator (binary) or value minus mean (continuous): what ``anatomy`` multiplies."""
    out: dict[str, Array] = {}
    for p in scenario.phenotypes:
        v = phenotypes[p.name]
        out[p.name] = v if p.type == "binary" else v - p.mean
    return out


def biological_ages(
    scenario: Scenario,
    age: Array,
    draws: SubjectDraws,
    regions: Sequence[str],
    rows: npt.NDArray[np.int64] | None = None,
) -> Array:
    """Biological age of every region (n × regions) at chronological ``age``.

    ``rows`` selects the subjects of ``draws`` that ``age`` refers to (repeat visits).
    """
    idx = np.arange(len(age)) if rows is None else rows
    bio = age[:, None] + draws.shared_deviation[idx][:, None] + draws.region_deviation[idx]
    z = phenotype_z(scenario, {k: v[idx] for k, v in draws.phenotypes.items()})
    col = {r: j for j, r in enumerate(regions)}
    for p in scenario.phenotypes:
        for region, years in p.accelerates.items():
            if region in col:
                bio[:, col[region]] += years * z[p.name]
    return bio


@dataclass(frozen=True)
class PlantedParameters:
    """Planted per-region parameters (n × regions)."""

    fat_fraction: Array
    water_signal: Array
    volume_factor: Array


def planted_parameters(
    scenario: Scenario,
    bio_age: Array,
    phenotypes: dict[str, Array],
    regions: Sequence[str],
) -> PlantedParameters:
    """Fat fraction, water-signal factor and volume factor of every region (n × regions)."""
    n = bio_age.shape[0]
    col = {r: j for j, r in enumerate(regions)}
    ff = np.tile(np.array([tissue_of(r).ff for r in regions], dtype=float), (n, 1))
    water = np.ones((n, len(regions)))
    volume = np.ones((n, len(regions)))
    years = bio_age - scenario.age.min
    for a in scenario.ageing:
        j = col[a.region]
        if a.effect == "fat_fraction":
            ff[:, j] += a.per_year * years[:, j]
        elif a.effect == "water_signal":
            water[:, j] *= 1.0 + a.per_year * years[:, j]
        else:
            volume[:, j] *= 1.0 + a.per_year * years[:, j]
    delta = phenotype_delta(scenario, phenotypes)
    for p in scenario.phenotypes:
        for region, effects in p.anatomy.items():
            if region not in col:
                continue
            j = col[region]
            for effect, amount in effects.items():
                if effect == "fat_fraction":
                    ff[:, j] += amount * delta[p.name]
                elif effect == "water_signal":
                    water[:, j] *= 1.0 + amount * delta[p.name]
                else:
                    volume[:, j] *= 1.0 + amount * delta[p.name]
    return PlantedParameters(
        fat_fraction=np.clip(ff, *FF_LIMITS),
        water_signal=np.clip(water, *WATER_LIMITS),
        volume_factor=np.clip(volume, *FACTOR_LIMITS),
    )


def planted_features(scenario: Scenario, params: PlantedParameters, regions: Sequence[str]) -> tuple[Array, list[str]]:
    """The planted quantities that carry age: one column per ``ageing`` entry.

    Returns
    -------
    features
        Array n × len(scenario.ageing).
    regions
        The region of each column.
    """
    col = {r: j for j, r in enumerate(regions)}
    cols = []
    names = []
    for a in scenario.ageing:
        j = col[a.region]
        source = {
            "fat_fraction": params.fat_fraction,
            "water_signal": params.water_signal,
            "volume": params.volume_factor,
        }
        cols.append(source[a.effect][:, j])
        names.append(a.region)
    if not cols:
        return np.zeros((bio_len(params), 0)), []
    return np.stack(cols, axis=1), names


def bio_len(params: PlantedParameters) -> int:
    """Number of rows of a :class:`PlantedParameters`."""
    return int(params.fat_fraction.shape[0])
