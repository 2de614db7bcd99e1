"""Simulation scenarios (docs/design.md §5): parse and validate the YAML contract.

A scenario is a YAML mapping; every key of docs/design.md §5 is supported and nothing else is
accepted. Each problem is one :class:`~bodyage.errors.ScenarioError` whose message names
the key (as a dotted path) and the offending value, e.g.
``scenario my.yaml: sites.intensity_scale_sd must be >= 0, got -0.1``.

Region names are checked against the combined TotalSegmentator label table
(:func:`bodyage.regions.combined_label_table`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, cast

from bodyage._typing import AGEING_EFFECTS, ANATOMY_EFFECTS, PHENOTYPE_TYPES, AgeingEffect, PhenotypeType
from bodyage.errors import BodyageWarning, ScenarioError, quoted
from bodyage.regions import LabelTable, combined_label_table

#: names of the scenarios shipped with the package (``bodyage/scenarios/<name>.yaml``)
BUILTIN_SCENARIOS: tuple[str, ...] = ("default", "dev", "quick")
#: axes a ``shape`` ageing effect may stretch (body frame: x right, y anterior, z superior)
SHAPE_AXES: tuple[str, ...] = ("x", "y", "z")

_TOP_KEYS = (
    "subjects",
    "seed",
    "age",
    "grid",
    "noise_sd",
    "sites",
    "repeat_visits",
    "biological_age_sd",
    "region_age_sd",
    "nuisance",
    "ageing",
    "phenotypes",
)
_RESERVED_PHENOTYPE_NAMES = ("subject_id", "visit", "age", "sex", "site", "water", "fat", "mask", "scan_id")


@dataclass(frozen=True)
class AgeRange:
    """Uniform age distribution at the first visit, in years."""

    min: float = 45.0
    max: float = 82.0


@dataclass(frozen=True)
class Grid:
    """The image grid of the simulated scans (voxels and mm)."""

    shape: tuple[int, int, int] = (64, 48, 128)
    spacing_mm: tuple[float, float, float] = (8.0, 8.0, 8.0)


@dataclass(frozen=True)
class Sites:
    """Scanner sites: each scales both channels by its own factor ~ N(1, sd)."""

    count: int = 4
    intensity_scale_sd: float = 0.05


@dataclass(frozen=True)
class RepeatVisits:
    """A fraction of subjects is scanned again ``interval_years`` later."""

    fraction: float = 0.15
    interval_years: float = 2.5


@dataclass(frozen=True)
class Nuisance:
    """Age-independent between-subject variation of every region (a trait: the same at every visit).

    Each value is the *total* between-subject SD of a region's parameter across the cohort,
    on the scale named; where planted ageing already moves that parameter, the
    age-independent part is ``sqrt(sd² − ageing variance)`` (0 if ageing alone exceeds
    ``sd``), so how much a region varies between subjects does not reveal that it ages.

    Attributes
    ----------
    fat_fraction_sd
        SD of the region's mean fat fraction on the logit scale.
    water_signal_sd
        SD of the log water-signal factor.
    volume_sd
        SD of the log volume factor (on top of the phantom's anatomical size jitter).
    texture_sd
        SD of the heterogeneity (log-scale SD of the fat fraction inside the region) of
        regions with a ``texture`` effect.
    shape_sd
        SD of the log stretch of regions with a ``shape`` effect.
    """

    fat_fraction_sd: float = 0.7
    water_signal_sd: float = 0.15
    volume_sd: float = 0.15
    texture_sd: float = 0.22
    shape_sd: float = 0.15


#: no age-independent variation (the phantom's size jitter remains)
NO_NUISANCE = Nuisance(0.0, 0.0, 0.0, 0.0, 0.0)
_NUISANCE_KEYS = ("fat_fraction_sd", "water_signal_sd", "volume_sd", "texture_sd", "shape_sd")


@dataclass(frozen=True)
class Ageing:
    """One planted ageing effect: ``per_year`` change of ``effect`` per year of the region's biological age.

    ``volume`` and ``water_signal`` are relative changes, ``fat_fraction`` an absolute one,
    ``texture`` the heterogeneity of the fat fraction inside the region (log-scale SD;
    mean unchanged), ``shape`` the relative stretch along ``axis`` at constant volume (the other
    two axes shrink by its square root).
    """

    region: str
    effect: AgeingEffect
    per_year: float
    axis: str = "z"


@dataclass(frozen=True)
class Phenotype:
    """A phenotype column of the cohort and what it does to the body.

    Attributes
    ----------
    accelerates
        Years added to a region's biological age for carriers (binary) or per SD
        (continuous).
    anatomy
        Non-ageing effects per unit of the phenotype (carrier: 1; continuous: per unit of
        the value above its mean): ``{region: {effect: amount}}`` with the effects of
        :data:`bodyage._typing.ANATOMY_EFFECTS`.
    """

    name: str
    type: PhenotypeType
    prevalence: float = 0.0
    mean: float = 0.0
    sd: float = 1.0
    accelerates: Mapping[str, float] = field(default_factory=dict)
    anatomy: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    """A validated simulation scenario (see docs/design.md §5 and ``bodyage/scenarios/default.yaml``)."""

    subjects: int = 300
    seed: int = 0
    age: AgeRange = AgeRange()
    grid: Grid = Grid()
    noise_sd: float = 0.03
    sites: Sites = Sites()
    repeat_visits: RepeatVisits = RepeatVisits()
    biological_age_sd: float = 1.5
    region_age_sd: float = 3.0
    nuisance: Nuisance = Nuisance()
    ageing: tuple[Ageing, ...] = ()
    phenotypes: tuple[Phenotype, ...] = ()
    name: str = "custom"

    @property
    def planted_regions(self) -> list[str]:
        """Regions with at least one ageing effect, in first-mention order."""
        seen: dict[str, None] = {}
        for a in self.ageing:
            seen.setdefault(a.region, None)
        return list(seen)

    def to_dict(self) -> dict[str, Any]:
        """The scenario as a plain mapping in the YAML layout (round-trips through :func:`parse_scenario`)."""
        d = asdict(self)
        d.pop("name")
        d["grid"] = {"shape": list(self.grid.shape), "spacing_mm": list(self.grid.spacing_mm)}
        d["ageing"] = [
            {"region": a.region, "effect": a.effect, "per_year": a.per_year}
            | ({"axis": a.axis} if a.effect == "shape" else {})
            for a in self.ageing
        ]
        phen: dict[str, Any] = {}
        for p in self.phenotypes:
            entry: dict[str, Any] = {"type": p.type}
            if p.type == "binary":
                entry["prevalence"] = p.prevalence
            else:
                entry["mean"] = p.mean
                entry["sd"] = p.sd
            if p.accelerates:
                entry["accelerates"] = dict(p.accelerates)
            if p.anatomy:
                entry["anatomy"] = {r: dict(e) for r, e in p.anatomy.items()}
            phen[p.name] = entry
        d["phenotypes"] = phen
        return d

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the scenario (for provenance)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- parsing


class _Ctx:
    """Error context: the scenario's source name."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> ScenarioError:
        return ScenarioError(f"scenario {self.source}: {key} {message}")


def _mapping(ctx: _Ctx, key: str, value: Any, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ctx.fail(key, f"must be a mapping, got {value!r}")
    for k in value:
        if k not in allowed:
            raise ctx.fail(
                f"{key}.{k}" if key else str(k), f"is not a known key (expected one of: {', '.join(allowed)})"
            )
    return value


def _number(
    ctx: _Ctx, key: str, value: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ctx.fail(key, f"must be a number, got {value!r}")
    v = float(value)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ctx.fail(key, f"must be {'>' if lo_open else '>='} {lo:g}, got {value!r}")
    if hi is not None and v > hi:
        raise ctx.fail(key, f"must be <= {hi:g}, got {value!r}")
    return v


def _integer(ctx: _Ctx, key: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ctx.fail(key, f"must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise ctx.fail(key, f"must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ctx.fail(key, f"must be <= {hi}, got {value!r}")
    return int(value)


def _triple(ctx: _Ctx, key: str, value: Any) -> list[Any]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ctx.fail(key, f"must be a list of 3 numbers, got {value!r}")
    return list(value)


def _region(ctx: _Ctx, key: str, value: Any, labels: LabelTable) -> str:
    if not isinstance(value, str):
        raise ctx.fail(key, f"must be a region name, got {value!r}")
    if value not in labels:
        raise ctx.fail(key, f"names unknown region {value!r} (not in the TotalSegmentator label table)")
    return value


def parse_scenario(raw: Any, *, source: str = "<dict>", labels: LabelTable | None = None) -> Scenario:
    """Validate a scenario mapping and return a :class:`Scenario`.

    Missing keys take the defaults of the ``default`` scenario's layout (an empty
    mapping is a cohort with no planted ageing).

    Raises
    ------
    ScenarioError
        For an unknown key, an unknown region, a wrong type or an impossible value;
        the message names the key and the value.
    """
    ctx = _Ctx(source)
    table = labels if labels is not None else combined_label_table()
    top = _mapping(ctx, "", raw if raw is not None else {}, _TOP_KEYS)
    base = Scenario()

    subjects = _integer(ctx, "subjects", top.get("subjects", base.subjects), lo=1)
    seed = _integer(ctx, "seed", top.get("seed", base.seed), lo=0)

    age_raw = _mapping(ctx, "age", top.get("age", {}), ("min", "max"))
    age_min = _number(ctx, "age.min", age_raw.get("min", base.age.min), lo=0, hi=120)
    age_max = _number(ctx, "age.max", age_raw.get("max", base.age.max), lo=0, hi=120)
    if age_max <= age_min:
        raise ctx.fail("age.max", f"must be greater than age.min ({age_min:g}), got {age_raw.get('max', age_max)!r}")

    grid_raw = _mapping(ctx, "grid", top.get("grid", {}), ("shape", "spacing_mm"))
    shape = tuple(
        _integer(ctx, f"grid.shape[{i}]", v, lo=8, hi=1024)
        for i, v in enumerate(_triple(ctx, "grid.shape", grid_raw.get("shape", list(base.grid.shape))))
    )
    spacing = tuple(
        _number(ctx, f"grid.spacing_mm[{i}]", v, lo=0.0, lo_open=True, hi=100.0)
        for i, v in enumerate(_triple(ctx, "grid.spacing_mm", grid_raw.get("spacing_mm", list(base.grid.spacing_mm))))
    )

    noise_sd = _number(ctx, "noise_sd", top.get("noise_sd", base.noise_sd), lo=0, hi=1)

    sites_raw = _mapping(ctx, "sites", top.get("sites", {}), ("count", "intensity_scale_sd"))
    sites = Sites(
        count=_integer(ctx, "sites.count", sites_raw.get("count", base.sites.count), lo=1, hi=1000),
        intensity_scale_sd=_number(
            ctx,
            "sites.intensity_scale_sd",
            sites_raw.get("intensity_scale_sd", base.sites.intensity_scale_sd),
            lo=0,
            hi=0.5,
        ),
    )

    rep_raw = _mapping(ctx, "repeat_visits", top.get("repeat_visits", {}), ("fraction", "interval_years"))
    repeat = RepeatVisits(
        fraction=_number(
            ctx, "repeat_visits.fraction", rep_raw.get("fraction", base.repeat_visits.fraction), lo=0, hi=1
        ),
        interval_years=_number(
            ctx,
            "repeat_visits.interval_years",
            rep_raw.get("interval_years", base.repeat_visits.interval_years),
            lo=0,
            lo_open=True,
            hi=50,
        ),
    )

    bio_sd = _number(ctx, "biological_age_sd", top.get("biological_age_sd", base.biological_age_sd), lo=0, hi=50)
    reg_sd = _number(ctx, "region_age_sd", top.get("region_age_sd", base.region_age_sd), lo=0, hi=50)

    nuis_raw = _mapping(ctx, "nuisance", top.get("nuisance", {}), _NUISANCE_KEYS)
    nuisance = Nuisance(
        **{
            k: _number(ctx, f"nuisance.{k}", nuis_raw.get(k, getattr(base.nuisance, k)), lo=0, hi=3)
            for k in _NUISANCE_KEYS
        }
    )

    ageing_raw = top.get("ageing", [])
    if ageing_raw is None:
        ageing_raw = []
    if not isinstance(ageing_raw, list):
        raise ctx.fail("ageing", f"must be a list of {{region, effect, per_year}} entries, got {ageing_raw!r}")
    ageing: list[Ageing] = []
    seen_effects: set[tuple[str, str]] = set()
    for i, entry in enumerate(ageing_raw):
        key = f"ageing[{i}]"
        e = _mapping(ctx, key, entry, ("region", "effect", "per_year", "axis"))
        for required in ("region", "effect", "per_year"):
            if required not in e:
                raise ctx.fail(f"{key}.{required}", "is missing")
        region = _region(ctx, f"{key}.region", e["region"], table)
        effect = e["effect"]
        if effect not in AGEING_EFFECTS:
            raise ctx.fail(f"{key}.effect", f"must be one of {', '.join(AGEING_EFFECTS)}, got {effect!r}")
        per_year = _number(ctx, f"{key}.per_year", e["per_year"], lo=-0.5, hi=0.5)
        if effect == "texture" and per_year <= 0:
            raise ctx.fail(
                f"{key}.per_year",
                f"must be > 0 for effect texture (heterogeneity grows with age), got {e['per_year']!r}",
            )
        axis = e.get("axis", "z")
        if "axis" in e and effect != "shape":
            raise ctx.fail(f"{key}.axis", f"applies to effect shape only, not {effect!r}")
        if axis not in SHAPE_AXES:
            raise ctx.fail(f"{key}.axis", f"must be one of {', '.join(SHAPE_AXES)}, got {axis!r}")
        if (region, effect) in seen_effects:
            raise ctx.fail(f"{key}", f"repeats effect {effect!r} for region {region!r}")
        seen_effects.add((region, effect))
        ageing.append(Ageing(region=region, effect=cast(AgeingEffect, effect), per_year=per_year, axis=str(axis)))

    phen_raw = top.get("phenotypes", {})
    if phen_raw is None:
        phen_raw = {}
    if not isinstance(phen_raw, Mapping):
        raise ctx.fail("phenotypes", f"must be a mapping of name -> definition, got {phen_raw!r}")
    planted = {a.region for a in ageing}
    phenotypes: list[Phenotype] = []
    for name, spec in phen_raw.items():
        key = f"phenotypes.{name}"
        if not isinstance(name, str) or not name.isidentifier():
            raise ctx.fail(key, "must be named by an identifier (letters, digits, underscores)")
        if name in _RESERVED_PHENOTYPE_NAMES:
            raise ctx.fail(key, f"uses a reserved cohort column name {name!r}")
        s = _mapping(ctx, key, spec, ("type", "prevalence", "mean", "sd", "accelerates", "anatomy"))
        ptype = s.get("type")
        if ptype not in PHENOTYPE_TYPES:
            raise ctx.fail(f"{key}.type", f"must be one of {', '.join(PHENOTYPE_TYPES)}, got {ptype!r}")
        if ptype == "binary":
            for k in ("mean", "sd"):
                if k in s:
                    raise ctx.fail(f"{key}.{k}", "applies to continuous phenotypes only (binary ones take prevalence)")
            if "prevalence" not in s:
                raise ctx.fail(f"{key}.prevalence", "is missing (required for a binary phenotype)")
            prevalence = _number(ctx, f"{key}.prevalence", s["prevalence"], lo=0, hi=1)
            mean, sd = 0.0, 1.0
        else:
            if "prevalence" in s:
                raise ctx.fail(
                    f"{key}.prevalence", "applies to binary phenotypes only (continuous ones take mean and sd)"
                )
            prevalence = 0.0
            mean = _number(ctx, f"{key}.mean", s.get("mean", 0.0))
            sd = _number(ctx, f"{key}.sd", s.get("sd", 1.0), lo=0, lo_open=True)
        acc_raw = s.get("accelerates", {}) or {}
        if not isinstance(acc_raw, Mapping):
            raise ctx.fail(f"{key}.accelerates", f"must be a mapping region -> years, got {acc_raw!r}")
        accelerates: dict[str, float] = {}
        for region, years in acc_raw.items():
            r = _region(ctx, f"{key}.accelerates.{region}", region, table)
            accelerates[r] = _number(ctx, f"{key}.accelerates.{region}", years, lo=-100, hi=100)
            if r not in planted:
                warnings.warn(
                    f"scenario {source}: {key}.accelerates.{r} accelerates a region without an ageing entry; "
                    "it changes nothing visible",
                    BodyageWarning,
                    stacklevel=2,
                )
        an_raw = s.get("anatomy", {}) or {}
        if not isinstance(an_raw, Mapping):
            raise ctx.fail(f"{key}.anatomy", f"must be a mapping region -> {{effect: amount}}, got {an_raw!r}")
        anatomy: dict[str, dict[str, float]] = {}
        for region, effects in an_raw.items():
            r = _region(ctx, f"{key}.anatomy.{region}", region, table)
            eff = _mapping(ctx, f"{key}.anatomy.{region}", effects, ANATOMY_EFFECTS)
            anatomy[r] = {str(k): _number(ctx, f"{key}.anatomy.{region}.{k}", v, lo=-1, hi=1) for k, v in eff.items()}
        phenotypes.append(
            Phenotype(
                name=name,
                type=cast(PhenotypeType, ptype),
                prevalence=prevalence,
                mean=mean,
                sd=sd,
                accelerates=accelerates,
                anatomy=anatomy,
            )
        )

    return Scenario(
        subjects=subjects,
        seed=seed,
        age=AgeRange(min=age_min, max=age_max),
        grid=Grid(shape=cast(tuple[int, int, int], shape), spacing_mm=cast(tuple[float, float, float], spacing)),
        noise_sd=noise_sd,
        sites=sites,
        repeat_visits=repeat,
        biological_age_sd=bio_sd,
        region_age_sd=reg_sd,
        nuisance=nuisance,
        ageing=tuple(ageing),
        phenotypes=tuple(phenotypes),
        name=Path(source).stem if source != "<dict>" else "custom",
    )


def load_scenario(
    scenario: str | os.PathLike[str] | Mapping[str, Any] = "default",
    *,
    labels: LabelTable | None = None,
) -> Scenario:
    """Load a scenario by built-in name, from a YAML file, or from a mapping.

    Raises
    ------
    ScenarioError
        If the name is neither built in nor an existing file, the YAML does not parse,
        or :func:`parse_scenario` rejects it.
    """
    if isinstance(scenario, Mapping):
        return parse_scenario(scenario, labels=labels)
    name = str(scenario)
    if name in BUILTIN_SCENARIOS:
        text = resources.files("bodyage.scenarios").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
        raw = parse_yaml(text, what=f"scenario {name}.yaml")
        return parse_scenario(raw, source=f"{name}.yaml", labels=labels)
    path = Path(name)
    if not path.is_file():
        raise ScenarioError(
            f"scenario {quoted(name)} is neither a built-in scenario ({', '.join(BUILTIN_SCENARIOS)}) nor a file"
        )
    raw = read_yaml(path, what=f"scenario {path.name}")
    return parse_scenario(raw, source=path.name, labels=labels)


# ----------------------------------------------------------------------------- YAML

#: largest YAML file read (bytes): a scenario or region set is a few kilobytes
MAX_YAML_BYTES = 1_000_000
#: deepest nesting of mappings and lists in a YAML file
MAX_YAML_DEPTH = 32


def read_yaml(path: str | os.PathLike[str], *, what: str) -> Any:
    """Read a small YAML file safely: size-capped, UTF-8, no anchors or aliases.

    Parameters
    ----------
    path
        The file.
    what
        How error messages name it, e.g. ``"scenario my.yaml"``.

    Raises
    ------
    ScenarioError
        If the file is larger than :data:`MAX_YAML_BYTES`, not UTF-8, or
        :func:`parse_yaml` refuses it.
    """
    p = Path(path)
    size = p.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ScenarioError(f"{what}: {size:,} bytes, larger than the {MAX_YAML_BYTES:,} a YAML file may have")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ScenarioError(f"{what}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from err
    return parse_yaml(text, what=what)


def parse_yaml(text: str, *, what: str) -> Any:
    """Parse YAML with the safe loader, refusing anchors and aliases.

    Aliases let a few hundred bytes expand to gigabytes ("billion laughs"); nothing in
    a scenario needs them, so a document holding one is refused before it is built.

    Raises
    ------
    ScenarioError
        If the text is longer than :data:`MAX_YAML_BYTES`, holds an anchor (``&name``) or
        alias (``*name``), nests deeper than :data:`MAX_YAML_DEPTH`, or is not valid YAML.
    """
    import yaml

    if len(text) > MAX_YAML_BYTES:
        raise ScenarioError(f"{what}: {len(text):,} characters, more than the {MAX_YAML_BYTES:,} YAML may have")
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # events only: nothing is built yet
            line = event.start_mark.line + 1 if event.start_mark is not None else "?"
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise ScenarioError(f"{what}: line {line}: YAML anchors and aliases (&name, *name) are not allowed")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_YAML_DEPTH:  # PyYAML's time grows with the square of the depth
                    raise ScenarioError(f"{what}: line {line}: nested more than {MAX_YAML_DEPTH} levels deep")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ScenarioError(f"{what}: not valid YAML ({str(err).splitlines()[0]})") from err
    except RecursionError as err:
        raise ScenarioError(f"{what}: nested too deeply to be read") from err
