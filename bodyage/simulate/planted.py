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
- ``texture``: heterogeneity s = 0.2 + per_year · (bio_age − age.min), clipped to [0, 0.8]:
  the fat fraction inside the region is ``ff · exp(s · g)`` renormalised to mean ``ff``,
  with ``g`` a smooth random field of SD 1 (patches of ~4 cm), so the region's mean is
  unchanged and its voxels' relative SD is about ``sqrt(exp(s²) − 1)``
- ``shape``: stretch 1 + per_year · (bio_age − age.min) along the entry's axis, clipped to
  [0.5, 2]; the other two axes shrink by its square root (volume unchanged)

and phenotype ``anatomy`` effects add (fat fraction) or multiply (1 + amount · Δ) on top,
where Δ is the carrier indicator or the phenotype's value minus its mean.

Age-independent variation (the scenario's ``nuisance``) comes last, a trait of the
subject shared by its visits: ``logit(ff) += e_ff``, ``water · exp(e_w)``,
``volume · exp(e_v)`` in every region, and ``cv += e_t``, ``stretch · exp(e_s)`` in the
regions with a texture or shape effect, with per-region SDs from :func:`nuisance_sd`.
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
#: range of a texture effect's heterogeneity (log-scale SD of the fat fraction inside the region)
TEXTURE_LIMITS = (0.0, 0.8)
#: range of a shape effect's stretch
SHAPE_LIMITS = (0.5, 2.0)
#: size of the fixed sample :func:`nuisance_sd` measures the planted ageing variance on
NUISANCE_SAMPLE = 20_000
#: the parameters nuisance varies, in the order of the last axis of ``SubjectDraws.nuisance``
NUISANCE_CHANNELS = ("fat_fraction", "water_signal", "volume", "texture", "shape")
#: heterogeneity of a texture region at the scenario's youngest age
TEXTURE_BASE_CV = 0.2
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
    #: standard normal draws of the age-independent deviations (n × regions × channels), float32
    nuisance: npt.NDArray[np.float32] | None = None


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
    nuis = scenario.nuisance
    z = (
        rng.standard_normal((n, len(regions), len(NUISANCE_CHANNELS)), dtype=np.float32)
        if max(nuis.fat_fraction_sd, nuis.water_signal_sd, nuis.volume_sd, nuis.texture_sd, nuis.shape_sd) > 0
        else None
    )
    return SubjectDraws(age, sex, site, phenotypes, shared, per_region, z)


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
    texture: Array | None = None
    shape: Array | None = None

    def texture_cv(self) -> Array:
        """Within-region coefficient of variation of the fat fraction (0 where no texture effect)."""
        return self.texture if self.texture is not None else np.zeros_like(self.fat_fraction)

    def shape_stretch(self) -> Array:
        """Stretch along the shape effect's axis (1 where no shape effect)."""
        return self.shape if self.shape is not None else np.ones_like(self.fat_fraction)


def planted_parameters(
    scenario: Scenario,
    bio_age: Array,
    phenotypes: dict[str, Array],
    regions: Sequence[str],
    nuisance: Array | None = None,
) -> PlantedParameters:
    """Fat fraction, water-signal factor, volume factor, texture and shape of every region (n × regions).

    Parameters
    ----------
    nuisance
        Age-independent deviations (n × regions × 3, scaled: :func:`scaled_nuisance`) in
        the order of :data:`NUISANCE_CHANNELS`; ``None``: none.
    """
    n = bio_age.shape[0]
    col = {r: j for j, r in enumerate(regions)}
    ff = np.tile(np.array([tissue_of(r).ff for r in regions], dtype=float), (n, 1))
    water = np.ones((n, len(regions)))
    volume = np.ones((n, len(regions)))
    texture = np.zeros((n, len(regions)))
    shape = np.ones((n, len(regions)))
    years = bio_age - scenario.age.min
    for a in scenario.ageing:
        j = col[a.region]
        if a.effect == "fat_fraction":
            ff[:, j] += a.per_year * years[:, j]
        elif a.effect == "water_signal":
            water[:, j] *= 1.0 + a.per_year * years[:, j]
        elif a.effect == "volume":
            volume[:, j] *= 1.0 + a.per_year * years[:, j]
        elif a.effect == "texture":
            texture[:, j] = TEXTURE_BASE_CV + a.per_year * years[:, j]
        else:
            shape[:, j] = 1.0 + a.per_year * years[:, j]
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
    ff = np.clip(ff, *FF_LIMITS)
    water = np.clip(water, *WATER_LIMITS)
    volume = np.clip(volume, *FACTOR_LIMITS)
    shape = np.clip(shape, *SHAPE_LIMITS)
    if nuisance is not None:
        logit = np.log(ff / (1.0 - ff)) + nuisance[..., 0]
        ff = 1.0 / (1.0 + np.exp(-logit))
        water = water * np.exp(nuisance[..., 1])
        volume = volume * np.exp(nuisance[..., 2])
        for a in scenario.ageing:
            j = col[a.region]
            if a.effect == "texture":
                texture[:, j] += nuisance[:, j, 3]
            elif a.effect == "shape":
                shape[:, j] *= np.exp(nuisance[:, j, 4])
    return PlantedParameters(
        fat_fraction=np.clip(ff, *FF_LIMITS),
        water_signal=np.clip(water, *WATER_LIMITS),
        volume_factor=np.clip(volume, *FACTOR_LIMITS),
        texture=np.clip(texture, *TEXTURE_LIMITS),
        shape=np.clip(shape, *SHAPE_LIMITS),
    )


def nuisance_sd(scenario: Scenario, regions: Sequence[str]) -> Array:
    """SD of each region's age-independent deviations (regions × 3, :data:`NUISANCE_CHANNELS` order).

    The scenario's ``nuisance`` values are total between-subject SDs (logit fat fraction,
    log water signal, log volume factor, texture heterogeneity, log shape stretch). What
    planted ageing and phenotype accelerations already contribute (measured on a fixed
    sample of :data:`NUISANCE_SAMPLE` subjects) is subtracted in variance, so every region
    varies by the same amount whether it ages or not. For the water signal that is the
    water channel's change, ``(1 − ff) · water``: a region whose fat fraction ages has its
    water channel moved by ageing as well. Where ageing alone exceeds the
    total, the age-independent SD is 0.
    """
    nuis = scenario.nuisance
    total = np.array(
        [nuis.fat_fraction_sd, nuis.water_signal_sd, nuis.volume_sd, nuis.texture_sd, nuis.shape_sd], dtype=float
    )
    if not total.any():
        return np.zeros((len(regions), len(NUISANCE_CHANNELS)))
    rng = np.random.default_rng(np.random.SeedSequence([scenario.seed, 0x9E15]))
    draws = draw_subjects(scenario, NUISANCE_SAMPLE, regions, rng)
    bio = biological_ages(scenario, draws.age, draws, regions)
    p = planted_parameters(scenario, bio, draws.phenotypes, regions)
    ff = p.fat_fraction
    ageing_sd = np.stack(
        [
            np.log(ff / (1.0 - ff)).std(axis=0),
            # the water channel: a planted fat-fraction change moves it too, through 1 - ff
            np.log((1.0 - ff) * p.water_signal).std(axis=0),
            np.log(p.volume_factor).std(axis=0),
            p.texture_cv().std(axis=0),
            np.log(p.shape_stretch()).std(axis=0),
        ],
        axis=1,
    )
    return np.asarray(np.sqrt(np.clip(total[None, :] ** 2 - ageing_sd**2, 0.0, None)), dtype=float)


def scaled_nuisance(
    draws: SubjectDraws,
    sd: Array,
    rows: npt.NDArray[np.int64] | None = None,
    cols: Sequence[int] | None = None,
) -> Array | None:
    """The subjects' age-independent deviations (n × regions × channels): standard draws times :func:`nuisance_sd`.

    ``rows`` selects subjects (repeat visits), ``cols`` regions (the oracle needs only the
    planted ones).
    """
    if draws.nuisance is None:
        return None
    z = draws.nuisance if rows is None else draws.nuisance[rows]
    if cols is not None:
        z, sd = z[:, list(cols)], sd[list(cols)]
    return np.asarray(z * sd[None, :, :], dtype=float)


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
            "texture": params.texture_cv(),
            "shape": params.shape_stretch(),
        }
        cols.append(source[a.effect][:, j])
        names.append(a.region)
    if not cols:
        return np.zeros((bio_len(params), 0)), []
    return np.stack(cols, axis=1), names


def bio_len(params: PlantedParameters) -> int:
    """Number of rows of a :class:`PlantedParameters`."""
    return int(params.fat_fraction.shape[0])
