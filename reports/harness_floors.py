"""Model-free floors of the validation harness: how far the planted regions can be found without a model.

Usage: python reports/harness_floors.py [--study DIR | --scenario NAME_OR_YAML --subjects N --out DIR]
                                        [--previous-default] [--workers 2]

Simulates a study (or reads one) and scores, against ``truth.json``'s ``region_information``
(precision@k as ``recovery.json`` does, k = regions with information > 0), the floors of
DESIGN.md §6 exactly as ``recovery.json`` computes them (:func:`bodyage.floors.floor_scores`
on :func:`bodyage.region_signals.region_signals`: volume, volume × intensity, signal spread,
univariate screen), and three more rankings under ``extra``: the SD of the mean fat
fraction alone, the coefficient of variation of the mean water signal alone, and a texture
screen (|ρ| with age of the within-region fat-fraction SD at the model grid).

It also prints, per planted region, those correlations and two statistics at the default
model grid (block means over the factor of ``auto_grid``): the within-region SD of the
voxel fat fraction over interior model voxels (texture) and the ratio of the region's
extents along z and x (shape). No model is trained. ``--previous-default`` runs the default
scenario as it was before issue 16 (eight mean-shift effects, no age-independent
variation), for the before/after comparison.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from analysis.recovery import method_recovery
from bodyage.floors import floor_scores
from bodyage.preprocess import auto_grid
from bodyage.region_signals import region_signals
from bodyage.scenario import load_scenario
from bodyage.simulate import simulate_study
from bodyage.study import load_study
from bodyage.volumes import load_volume

PREVIOUS_AGEING = [
    {"region": "liver", "effect": "fat_fraction", "per_year": 0.004},
    {"region": "pancreas", "effect": "fat_fraction", "per_year": 0.004},
    {"region": "gluteus_maximus_left", "effect": "fat_fraction", "per_year": 0.004},
    {"region": "gluteus_maximus_right", "effect": "fat_fraction", "per_year": 0.004},
    {"region": "autochthon_left", "effect": "fat_fraction", "per_year": 0.004},
    {"region": "autochthon_right", "effect": "fat_fraction", "per_year": 0.004},
    {"region": "intervertebral_discs", "effect": "water_signal", "per_year": -0.008},
    {"region": "torso_fat", "effect": "volume", "per_year": 0.010},
]


def scan_features(water: np.ndarray, fat: np.ndarray, mask: np.ndarray, n_labels: int, factor: int) -> dict[str, Any]:
    """Per label: voxel count, summed water and fat; texture and shape statistics at the model grid."""
    m = mask.astype(np.int64).ravel()
    count = np.bincount(m, minlength=n_labels)[:n_labels].astype(float)
    sw = np.bincount(m, water.ravel(), minlength=n_labels)[:n_labels]
    sf = np.bincount(m, fat.ravel(), minlength=n_labels)[:n_labels]
    s = [n // factor for n in mask.shape]
    crop = tuple(slice(0, k * factor) for k in s)
    shape6 = (s[0], factor, s[1], factor, s[2], factor)
    axes = (1, 3, 5)
    cw = water[crop].reshape(shape6).mean(axis=axes)
    cf = fat[crop].reshape(shape6).mean(axis=axes)
    blocks = mask[crop].astype(np.int64).reshape(shape6)
    lo, hi = blocks.min(axis=axes), blocks.max(axis=axes)
    pure = np.where(lo == hi, lo, 0).ravel()
    with np.errstate(divide="ignore", invalid="ignore"):
        ff_vox = (cf / (cw + cf)).ravel()
    ff_vox = np.nan_to_num(ff_vox)
    n_in = np.bincount(pure, minlength=n_labels)[:n_labels].astype(float)
    s1 = np.bincount(pure, ff_vox, minlength=n_labels)[:n_labels]
    s2 = np.bincount(pure, ff_vox**2, minlength=n_labels)[:n_labels]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_in = s1 / n_in
        tex_sd = np.sqrt(np.clip(s2 / n_in - mean_in**2, 0, None))
    tex_sd[n_in < 4] = np.nan
    # shape: sqrt(var z) / sqrt(var x) of each region's voxels (native grid)
    xs, _, zs = np.indices(mask.shape).reshape(3, -1)
    ex = np.bincount(m, xs, minlength=n_labels)[:n_labels]
    ex2 = np.bincount(m, xs.astype(float) ** 2, minlength=n_labels)[:n_labels]
    ez = np.bincount(m, zs, minlength=n_labels)[:n_labels]
    ez2 = np.bincount(m, zs.astype(float) ** 2, minlength=n_labels)[:n_labels]
    with np.errstate(divide="ignore", invalid="ignore"):
        vx = ex2 / count - (ex / count) ** 2
        vz = ez2 / count - (ez / count) ** 2
        elong = np.sqrt(vz / vx)
    feats = {"count": count, "water": sw, "fat": sf, "texture_sd": tex_sd, "texture_cv": tex_sd / mean_in}
    return feats | {"elong": elong}


def _rho(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 5 or np.nanstd(x[ok]) == 0:
        return 0.0
    return float(spearmanr(x[ok], y[ok])[0])


def floors(root: Path) -> dict[str, Any]:
    """The floors and per-region diagnostics of the study at ``root``."""
    study = load_study(root)
    assert study.labels is not None
    truth = json.loads((root / "truth.json").read_text())
    info = {str(k): float(v) for k, v in truth["region_information"].items()}
    regions = study.labels.regions
    ids = [study.labels.id_of(r) for r in regions]
    n_labels = max(study.labels.ids) + 1
    first = load_volume(study.path(study.cohort.iloc[0]["water"]))
    model_grid = auto_grid(first.shape)
    factor = round(first.shape[0] / model_grid[0])
    voxel_ml = float(np.prod(first.spacing)) / 1000.0
    rows = []
    for _, row in study.cohort.iterrows():
        w = np.asarray(load_volume(study.path(row["water"])).data, dtype=np.float64)
        f = np.asarray(load_volume(study.path(row["fat"])).data, dtype=np.float64)
        mk = np.asarray(load_volume(study.path(row["mask"])).data)
        rows.append(scan_features(w, f, mk, n_labels, factor))
    age = study.cohort["age"].to_numpy(dtype=float)
    stack = {k: np.stack([r[k] for r in rows])[:, ids] for k in rows[0]}
    count = stack["count"]
    present = (count > 0).mean(axis=0) >= 0.5
    with np.errstate(divide="ignore", invalid="ignore"):
        ff = stack["fat"] / (stack["water"] + stack["fat"])
        water = stack["water"] / count
        volume = np.where(count > 0, count * voxel_ml, np.nan)
    ff[count == 0] = np.nan
    water[count == 0] = np.nan
    spread_ff = np.nanstd(ff, axis=0)
    spread_w = np.nanstd(water, axis=0) / np.nanmean(water, axis=0)
    rho = {
        "fat_fraction": np.array([_rho(ff[:, j], age) for j in range(len(regions))]),
        "water": np.array([_rho(water[:, j], age) for j in range(len(regions))]),
        "volume": np.array([_rho(volume[:, j], age) for j in range(len(regions))]),
        "texture_sd": np.array([_rho(stack["texture_sd"][:, j], age) for j in range(len(regions))]),
        "texture_cv": np.array([_rho(stack["texture_cv"][:, j], age) for j in range(len(regions))]),
        "elongation": np.array([_rho(stack["elong"][:, j], age) for j in range(len(regions))]),
    }
    extra = {
        "spread_fat_fraction": spread_ff,
        "spread_water_cv": spread_w,
        "texture_screen": np.abs(rho["texture_sd"]),
    }
    out: dict[str, Any] = {"scenario": truth.get("scenario_name"), "n_scans": len(age), "model_grid": list(model_grid)}
    out["k"] = sum(v > 0 for v in info.values())
    out["chance"] = out["k"] / int(present.sum())
    signals, skipped = region_signals(root)
    out["scans_skipped"] = len(skipped)
    out["floors"] = {}
    for name, series in floor_scores(signals).items():
        rec = method_recovery(series.dropna(), info)
        out["floors"][name] = {"precision_at_k": rec["precision_at_k"], "top_regions": rec["top_regions"]}
    out["extra"] = {}
    for name, score in extra.items():
        rec = method_recovery(pd.Series(score, index=regions)[present], info)
        out["extra"][name] = {"precision_at_k": rec["precision_at_k"], "top_regions": rec["top_regions"]}
    effects = truth.get("effects", {})
    out["planted"] = {
        r: {"effects": effects.get(r), "information": round(info[r], 4)}
        | {f"rho_{k}": round(float(v[regions.index(r)]), 3) for k, v in rho.items()}
        for r in regions
        if info.get(r, 0) > 0
    }
    unplanted = [j for j, r in enumerate(regions) if info.get(r, 0) == 0 and present[j]]
    out["unplanted_abs_rho_max"] = {k: round(float(np.max(np.abs(v[unplanted]))), 3) for k, v in rho.items()}
    out["below_resolution"] = truth.get("below_resolution")
    out["oracle_mae"] = truth.get("oracle_mae")
    return out


def main() -> None:
    """Simulate (or read) a study and print its floors as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, help="an existing simulated study (else one is simulated)")
    parser.add_argument("--scenario", default="default")
    parser.add_argument("--subjects", type=int, default=300)
    parser.add_argument("--out", type=Path, help="where to simulate (default: a temporary folder)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--previous-default", action="store_true", help="the default scenario before issue 16")
    args = parser.parse_args()
    if args.study is not None:
        print(json.dumps(floors(args.study), indent=1))
        return
    scenario: Any = args.scenario
    if args.previous_default:
        sc = load_scenario("default").to_dict()
        sc["ageing"] = PREVIOUS_AGEING
        sc["nuisance"] = {k: 0.0 for k in sc["nuisance"]}
        scenario = sc
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out if args.out is not None else Path(tmp) / "study"
        simulate_study(root, scenario=scenario, subjects=args.subjects, workers=args.workers, figures=False)
        print(json.dumps(floors(root), indent=1))


if __name__ == "__main__":
    main()
