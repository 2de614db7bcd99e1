"""Write a synthetic study folder (docs/design.md §3) from a scenario.

One call, :func:`simulate_study`, draws the cohort, renders every scan (water and fat
NIfTI, label map), and writes ``cohort.csv``, ``labels.json``, ``truth.json``,
``truth.parquet``, ``study.json`` and look-at-me figures. Everything random derives from
the scenario's seed: the same seed gives a byte-identical ``cohort.csv`` and identical
voxel data, whatever the number of worker processes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from bodyage.errors import StudyError
from bodyage.progress import NO_PROGRESS, Progress
from bodyage.provenance import build_run_record, finish_run_record, write_record
from bodyage.regions import LabelTable, combined_label_table
from bodyage.scenario import Scenario, load_scenario
from bodyage.simulate.anatomy import (
    INTERNAL_TISSUES,
    SAT_MM,
    BodyParams,
    GridSpec,
    Pose,
    body_z_scale,
    cavity_profile,
    rasterise,
    subject_regions,
)
from bodyage.simulate.planted import (
    NUISANCE_CHANNELS,
    biological_ages,
    draw_subjects,
    nuisance_sd,
    planted_parameters,
    scaled_nuisance,
)
from bodyage.simulate.resolution import default_model_grid, region_counts, resolvable_summary
from bodyage.simulate.tissue import dixon_images, texture_fat_fraction, texture_field, tissue_of
from bodyage.study import COHORT_FILE, LABELS_FILE, STUDY_FILE, TRUTH_FILE, scan_id, write_cohort

TRUTH_TABLE = "truth.parquet"
#: regions whose size follows the body rather than an organ primitive
_TISSUE_CLASSES = ("subcutaneous_fat", "torso_fat", "skeletal_muscle")
#: organ size jitter (sd of log volume)
_ORGAN_VOLUME_SD = 0.08
#: torso fat volume jitter (sd of log volume): normal visceral fat variation
_TORSO_FAT_SD = 0.12
#: subcutaneous fat thickness jitter (sd of log thickness)
_SAT_SD = 0.15


@dataclass(frozen=True)
class ScanSpec:
    """Everything needed to render and write one scan (picklable, for worker processes)."""

    scan: str
    body: BodyParams
    pose: Pose
    fat_fraction: dict[str, float]
    water_signal: dict[str, float]
    proton_density: dict[str, float]
    torso_fat_factor: float
    channel_scale: tuple[float, float]
    noise_seed: tuple[int, ...]
    texture: dict[str, float] | None = None


@dataclass(frozen=True)
class SimulationResult:
    """What :func:`simulate_study` wrote."""

    study: Path
    n_subjects: int
    n_scans: int
    oracle_mae: float
    figures: tuple[Path, ...]


# ----------------------------------------------------------------------------- rendering


def _ids(labels: LabelTable) -> dict[str, int]:
    ids = {name: i for i, name in labels.names.items()}
    ids.update(INTERNAL_TISSUES)
    return ids


def render_scan(spec: ScanSpec, grid: GridSpec, labels: LabelTable, noise_sd: float) -> tuple[Any, Any, Any]:
    """Render one scan: (water int16, fat int16, mask uint8) on ``grid``.

    The torso fat volume is set by scaling the abdominal cavity until the painted
    torso fat reaches ``torso_fat_factor`` times its volume at scale 1 (two secant
    steps on the rasterised counts).
    """
    ids = _ids(labels)
    disc_min = 0.75 * grid.spacing[2] / body_z_scale(grid, spec.body)
    tf = ids["torso_fat"]
    body = replace(spec.body, cavity_scale=1.0)
    internal = rasterise(subject_regions(body, disc_min), grid, body, spec.pose, ids)
    if abs(spec.torso_fat_factor - 1.0) > 1e-6:
        v1 = int((internal == tf).sum())
        target = spec.torso_fat_factor * v1
        scale = 1.0
        for _ in range(2):
            cav = int((rasterise([("torso_fat", cavity_profile(scale))], grid, body, spec.pose, ids) == tf).sum())
            vt = int((internal == tf).sum())
            occupied = cav - vt
            if cav <= 0:
                break
            scale *= float(np.sqrt(max(target + occupied, 1.0) / cav))
            body = replace(spec.body, cavity_scale=scale)
            internal = rasterise(subject_regions(body, disc_min), grid, body, spec.pose, ids)
    pd_map, ff_map, ws_map = {}, {}, {}
    for name, i in ids.items():
        pd_map[i] = spec.proton_density.get(name, tissue_of(name).pd)
        ff_map[i] = spec.fat_fraction.get(name, tissue_of(name).ff)
        ws_map[i] = spec.water_signal.get(name, 1.0)
    texture: dict[int, npt.NDArray[np.float64]] = {}
    trng = np.random.default_rng(np.random.SeedSequence([*spec.noise_seed, 0x7E47]))
    for name, cv in sorted((spec.texture or {}).items()):
        i = ids[name]
        sel = internal == i
        if cv <= 0 or not sel.any():
            continue
        texture[i] = texture_fat_fraction(ff_map[i], cv, texture_field(sel, grid.spacing, trng))
    rng = np.random.default_rng(np.random.SeedSequence(list(spec.noise_seed)))
    water, fat = dixon_images(
        internal,
        pd_map,
        ff_map,
        ws_map,
        channel_scale=spec.channel_scale,
        noise_sd=noise_sd,
        rng=rng,
        texture=texture,
    )
    mask = np.where(internal >= min(INTERNAL_TISSUES.values()), 0, internal)
    dtype = np.uint8 if labels.max_id < 256 else np.uint16
    return water, fat, mask.astype(dtype)


def _write_scan(
    args: tuple[ScanSpec, GridSpec, LabelTable, float, str, tuple[int, int, int]],
) -> tuple[str, npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    from bodyage.volumes import save_volume

    spec, grid, labels, noise_sd, root, model_grid = args
    water, fat, mask = render_scan(spec, grid, labels, noise_sd)
    folder = Path(root)
    save_volume(folder / "images" / f"{spec.scan}_water.nii.gz", water, grid.affine)
    save_volume(folder / "images" / f"{spec.scan}_fat.nii.gz", fat, grid.affine)
    save_volume(folder / "masks" / f"{spec.scan}.nii.gz", mask, grid.affine)
    counts = np.bincount(mask.ravel().astype(np.int64), minlength=labels.max_id + 1)
    majority, interior = region_counts(mask, model_grid, labels.max_id + 1)
    return spec.scan, counts, majority, interior


# ----------------------------------------------------------------------------- the cohort


def _site_names(count: int) -> list[str]:
    return [f"site{k + 1}" for k in range(count)]


def build_cohort(
    scenario: Scenario, labels: LabelTable, grid: GridSpec
) -> tuple[pd.DataFrame, pd.DataFrame, list[ScanSpec]]:
    """Draw the cohort: the cohort table, the per-scan truth (long) and the scan specs."""
    regions = labels.regions
    root_seq = np.random.SeedSequence(scenario.seed)
    cohort_seq, anatomy_seq, scan_seq = root_seq.spawn(3)
    rng = np.random.default_rng(cohort_seq)
    n = scenario.subjects
    draws = draw_subjects(scenario, n, regions, rng)
    site_scale = np.clip(rng.normal(1.0, scenario.sites.intensity_scale_sd, size=(scenario.sites.count, 2)), 0.5, 1.5)
    repeat = rng.random(n) < scenario.repeat_visits.fraction
    sites = _site_names(scenario.sites.count)

    # visits: (subject row, visit number, age)
    rows = [(i, 0, float(draws.age[i])) for i in range(n)]
    rows += [
        (i, 1, float(np.round(draws.age[i] + scenario.repeat_visits.interval_years, 3))) for i in range(n) if repeat[i]
    ]
    rows.sort(key=lambda t: (t[0], t[1]))
    subj = np.array([r[0] for r in rows], dtype=np.int64)
    visit = np.array([r[1] for r in rows], dtype=np.int64)
    age = np.array([r[2] for r in rows], dtype=float)
    bio = biological_ages(scenario, age, draws, regions, rows=subj)
    phen_rows = {k: v[subj] for k, v in draws.phenotypes.items()}
    nuis_sd = nuisance_sd(scenario, regions)
    params = planted_parameters(scenario, bio, phen_rows, regions, scaled_nuisance(draws, nuis_sd, rows=subj))
    texture_cv, stretch = params.texture_cv(), params.shape_stretch()
    texture_regions = [a.region for a in scenario.ageing if a.effect == "texture"]
    shape_axes = {a.region: "xyz".index(a.axis) for a in scenario.ageing if a.effect == "shape"}

    # subject anatomy (same at every visit)
    arng = np.random.default_rng(anatomy_seq)
    bmi = next((p for p in scenario.phenotypes if p.name == "bmi" and p.type == "continuous"), None)
    bodies: list[BodyParams] = []
    tf_jitter = np.exp(arng.normal(0.0, _TORSO_FAT_SD, size=n))
    pd_jitter = np.clip(arng.normal(1.0, 0.03, size=(n, len(regions))), 0.8, 1.2)
    for i in range(n):
        sex = str(draws.sex[i])
        dbmi = float(draws.phenotypes[bmi.name][i] - bmi.mean) if bmi is not None else 0.0
        height = (1.0 if sex == "M" else 0.93) * float(np.exp(arng.normal(0.0, 0.035)))
        width = (1.0 if sex == "M" else 0.95) * (1.0 + 0.010 * dbmi) * float(np.exp(arng.normal(0.0, 0.03)))
        depth = (1.0 if sex == "M" else 0.95) * (1.0 + 0.015 * dbmi) * float(np.exp(arng.normal(0.0, 0.03)))
        offsets = {r: tuple(float(v) for v in arng.normal(0.0, 3.0, size=3)) for r in regions}
        offsets["spine"] = tuple(float(v) for v in arng.normal(0.0, 2.0, size=3))
        size = {r: float(np.exp(arng.normal(0.0, _ORGAN_VOLUME_SD))) for r in regions if r not in _TISSUE_CLASSES}
        sat_jitter = float(np.exp(arng.normal(0.0, _SAT_SD)))
        bodies.append(
            BodyParams(
                sex=sex,
                height_scale=float(np.clip(height, 0.8, 1.2)),
                width_scale=float(np.clip(width, 0.75, 1.35)),
                depth_scale=float(np.clip(depth, 0.7, 1.45)),
                sat_mm=SAT_MM[sex] * sat_jitter,
                region_offset=offsets,  # type: ignore[arg-type]
                region_volume=size,
            )
        )

    col = {r: j for j, r in enumerate(regions)}
    specs: list[ScanSpec] = []
    srng = np.random.default_rng(scan_seq)
    for k in range(len(rows)):
        i = int(subj[k])
        base = bodies[i]
        vol = dict(base.region_volume)
        for r in regions:
            if r not in _TISSUE_CLASSES:
                vol[r] = vol.get(r, 1.0) * float(params.volume_factor[k, col[r]])
        vol["skeletal_muscle"] = float(params.volume_factor[k, col["skeletal_muscle"]])
        body = replace(
            base,
            region_volume=vol,
            region_shape={r: (ax, float(stretch[k, col[r]])) for r, ax in shape_axes.items()},
            sat_mm=base.sat_mm * float(params.volume_factor[k, col["subcutaneous_fat"]]),
        )
        pose = Pose(*(float(v) for v in srng.normal(0.0, (5.0, 5.0, 12.0))))
        sid = scan_id(f"S{i + 1:05d}", int(visit[k]))
        specs.append(
            ScanSpec(
                scan=sid,
                body=body,
                pose=pose,
                fat_fraction={r: float(params.fat_fraction[k, col[r]]) for r in regions},
                water_signal={r: float(params.water_signal[k, col[r]]) for r in regions},
                proton_density={r: tissue_of(r).pd * float(pd_jitter[i, col[r]]) for r in regions},
                torso_fat_factor=float(params.volume_factor[k, col["torso_fat"]] * tf_jitter[i]),
                channel_scale=(float(site_scale[draws.site[i], 0]), float(site_scale[draws.site[i], 1])),
                noise_seed=(scenario.seed, 0x5CA7, i, int(visit[k])),
                texture={r: float(texture_cv[k, col[r]]) for r in texture_regions},
            )
        )

    ids = [f"S{int(i) + 1:05d}" for i in subj]
    cohort = pd.DataFrame(
        {
            "subject_id": ids,
            "visit": visit,
            "age": age,
            "sex": draws.sex[subj],
            "site": [sites[int(draws.site[i])] for i in subj],
            "water": [f"images/{s.scan}_water.nii.gz" for s in specs],
            "fat": [f"images/{s.scan}_fat.nii.gz" for s in specs],
            "mask": [f"masks/{s.scan}.nii.gz" for s in specs],
        }
    )
    for p in scenario.phenotypes:
        v = phen_rows[p.name]
        cohort[p.name] = v.astype(int) if p.type == "binary" else v

    truth = pd.DataFrame(
        {
            "subject_id": np.repeat(ids, len(regions)),
            "visit": np.repeat(visit, len(regions)),
            "region": np.tile(regions, len(rows)),
            "age": np.repeat(age, len(regions)),
            "biological_age": bio.ravel(),
            "fat_fraction": params.fat_fraction.ravel(),
            "water_signal": params.water_signal.ravel(),
            "volume_factor": params.volume_factor.ravel(),
            "texture_cv": texture_cv.ravel(),
            "shape_stretch": stretch.ravel(),
        }
    )
    truth["planted"] = truth["region"].isin(scenario.planted_regions)
    truth.attrs["nuisance_sd"] = {
        r: {c: float(nuis_sd[j, m]) for m, c in enumerate(NUISANCE_CHANNELS)} for j, r in enumerate(regions)
    }
    return cohort, truth, specs


def simulate_study(
    study: str | os.PathLike[str],
    *,
    scenario: str | os.PathLike[str] | Mapping[str, Any] | Scenario = "default",
    subjects: int | None = None,
    seed: int | None = None,
    workers: int | None = None,
    figures: bool = True,
    progress: Progress = NO_PROGRESS,
) -> SimulationResult:
    """Simulate a study folder with planted ageing.

    Parameters
    ----------
    study
        Folder to write (created; must be empty or absent).
    scenario
        Built-in name (``"default"``), a YAML path, a mapping, or a :class:`Scenario`.
    subjects, seed
        Override the scenario's ``subjects`` and ``seed``.
    workers
        Processes rendering scans (default: up to 2, fewer for small cohorts). The
        output does not depend on it.
    figures
        Write ``figures/phantom_young.png`` and ``figures/phantom_old.png``.
    progress
        Progress display (the library never prints).

    Raises
    ------
    StudyError
        If ``study`` exists and is not empty.
    ScenarioError
        If the scenario is invalid.
    """
    labels = combined_label_table()
    sc = scenario if isinstance(scenario, Scenario) else load_scenario(scenario, labels=labels)
    if subjects is not None:
        if subjects < 1:
            raise StudyError(f"--subjects must be at least 1, got {subjects}")
        sc = replace(sc, subjects=int(subjects))
    if seed is not None:
        if seed < 0:
            raise StudyError(f"--seed must be >= 0, got {seed}")
        sc = replace(sc, seed=int(seed))
    root = Path(study)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise StudyError(f"{root}: exists and is not an empty folder; choose a new study folder")
    record = build_run_record(
        "simulate",
        {"study": str(root), "scenario": sc.name, "subjects": sc.subjects, "seed": sc.seed},
        seed=sc.seed,
        extra={"scenario_sha256": sc.digest(), "scenario": sc.to_dict()},
    )
    grid = GridSpec(sc.grid.shape, sc.grid.spacing_mm)
    cohort, truth, specs = build_cohort(sc, labels, grid)

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    n_workers = workers if workers is not None else min(2, os.cpu_count() or 1, max(1, len(specs) // 20))
    task = progress.task("simulate", len(specs))
    counts: dict[str, npt.NDArray[np.int64]] = {}
    model_counts: dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]] = {}
    model_grid = default_model_grid(sc.grid.shape)
    jobs = [(s, grid, labels, sc.noise_sd, str(root), model_grid) for s in specs]
    if n_workers <= 1:
        for job in jobs:
            scan, c, maj, inner = _write_scan(job)
            counts[scan] = c
            model_counts[scan] = (maj, inner)
            task.advance()
    else:
        import multiprocessing as mp
        import sys

        # fork is cheapest; once torch (and its thread pools) is loaded, fork from a clean server
        method = "forkserver" if "torch" in sys.modules else "fork"
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=mp.get_context(method)) as pool:
            for scan, c, maj, inner in pool.map(_write_scan, jobs, chunksize=4):
                counts[scan] = c
                model_counts[scan] = (maj, inner)
                task.advance()
    task.close()

    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    n_regions = len(labels.regions)
    n_vox = np.concatenate([counts[s.scan][labels.ids] for s in specs]).astype(float)
    truth["n_voxels"] = n_vox
    truth["volume_ml"] = np.where(n_vox > 0, n_vox * voxel_ml, np.nan)
    truth["present"] = n_vox > 0
    if len(truth) != len(specs) * n_regions:  # pragma: no cover - internal consistency
        raise StudyError(f"internal error: truth table has {len(truth)} rows, expected {len(specs) * n_regions}")

    from bodyage.atomic import write_json, write_with
    from bodyage.simulate.oracle import compute_oracle

    oracle = compute_oracle(sc, labels.regions)
    resolvable = resolvable_summary(
        sc,
        {r: labels.id_of(r) for r in labels.regions},
        model_grid,
        sc.grid.shape,
        sc.grid.spacing_mm,
        np.stack([model_counts[s.scan][0] for s in specs]),
        np.stack([model_counts[s.scan][1] for s in specs]),
    )
    nuisance_by_region = truth.attrs.pop("nuisance_sd")
    write_cohort(cohort, root / COHORT_FILE)
    labels.write(root / LABELS_FILE)
    write_with(root / TRUTH_TABLE, lambda p: truth.to_parquet(p, index=False))
    write_json(
        root / TRUTH_FILE,
        {
            "scenario": sc.to_dict(),
            "scenario_name": sc.name,
            "scenario_sha256": sc.digest(),
            "labels": labels.to_json_dict(),
            "reference_age": sc.age.min,
            "oracle_mae": oracle.oracle_mae,
            "oracle": oracle.to_dict(),
            "region_information": oracle.region_information,
            "planted_regions": sc.planted_regions,
            "effects": {a.region: sorted({b.effect for b in sc.ageing if b.region == a.region}) for a in sc.ageing},
            "nuisance_sd": nuisance_by_region,
            "resolvable": resolvable,
            "below_resolution": resolvable["below_resolution"],
            "phenotype_regions": {p.name: sorted(p.accelerates) for p in sc.phenotypes},
        },
    )
    written_figures: tuple[Path, ...] = ()
    if figures:
        from bodyage.simulate.figures import phantom_figures

        written_figures = tuple(phantom_figures(root, cohort))
    write_record(
        root / STUDY_FILE,
        finish_run_record(record, n_subjects=sc.subjects, n_scans=len(specs), oracle_mae=oracle.oracle_mae),
    )
    return SimulationResult(
        study=root,
        n_subjects=sc.subjects,
        n_scans=len(specs),
        oracle_mae=oracle.oracle_mae,
        figures=written_figures,
    )
