"""How well can age be read from region means given the true masks? A yardstick for `train`.

Usage: python reports/region_probe.py STUDY [--factor 2]

For every scan of a simulated (or segmented) study: per region, the mean water and fat
signal (scaled by the scan's body mean), the fat fraction of those means and the log voxel
count, read with the study's own masks at the native grid and at a grid coarsened by
``--factor`` (block means; the label of each block's first voxel). A ridge regression
(penalty chosen by internal cross-validation) predicts age from them under 5-fold
cross-validation grouped by subject, as `train` does. It has what no image model has (the
exact masks) and lacks what a CNN can learn (non-linear read-outs), so it is a yardstick,
not a bound: if it cannot reach a MAE at the model's grid with this many subjects, a CNN
trained on that grid and cohort should not be expected to either.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import GroupKFold, cross_val_predict

from bodyage.study import load_study
from bodyage.volumes import load_volume


def region_features(water: np.ndarray, fat: np.ndarray, mask: np.ndarray, n_labels: int) -> np.ndarray:
    """Per region: mean water, mean fat (both over the body mean), fat fraction, log voxel count."""
    body = mask > 0
    scale = float(water[body].mean() + fat[body].mean())
    count = np.bincount(mask.ravel(), minlength=n_labels)[:n_labels]
    sw = np.bincount(mask.ravel(), water.ravel(), minlength=n_labels)[:n_labels]
    sf = np.bincount(mask.ravel(), fat.ravel(), minlength=n_labels)[:n_labels]
    with np.errstate(divide="ignore", invalid="ignore"):
        feats = np.concatenate([sw / count / scale, sf / count / scale, sf / (sw + sf), np.log1p(count)])
    return np.nan_to_num(feats)


def coarsen(a: np.ndarray, f: int) -> np.ndarray:
    """Block means over ``f``×``f``×``f`` blocks (edges that do not fill a block are cut)."""
    s = [n // f for n in a.shape]
    a = a[: s[0] * f, : s[1] * f, : s[2] * f]
    return a.reshape(s[0], f, s[1], f, s[2], f).mean(axis=(1, 3, 5))


def probe(root: Path, factor: int = 2) -> dict[int, float]:
    """The ridge's cross-validated MAE (years) per grid: ``{1: native, factor: coarsened}``."""
    study = load_study(root)
    cohort = study.cohort
    if study.labels is None:
        raise ValueError(f"{root / 'labels.json'} not found: the probe needs the study's label table")
    n_labels = max(study.labels.ids) + 1
    rows: dict[int, list[np.ndarray]] = {1: [], factor: []}
    f = factor
    for r in cohort.itertuples():
        water = np.asarray(load_volume(study.path(str(r.water)), dtype=np.float32).data)
        fat = np.asarray(load_volume(study.path(str(r.fat)), dtype=np.float32).data)
        mask = np.asarray(load_volume(study.path(str(r.mask))).data).astype(np.int64)
        rows[1].append(region_features(water, fat, mask, n_labels))
        coarse_mask = mask[: mask.shape[0] // f * f : f, : mask.shape[1] // f * f : f, : mask.shape[2] // f * f : f]
        rows[f].append(region_features(coarsen(water, f), coarsen(fat, f), coarse_mask, n_labels))
    age = cohort["age"].to_numpy(dtype=float)
    groups = cohort["subject_id"].to_numpy()
    out: dict[int, float] = {}
    for grid_factor, feats in rows.items():
        x = np.asarray(feats)
        x = x[:, x.std(axis=0) > 0]
        x = (x - x.mean(axis=0)) / x.std(axis=0)
        model = RidgeCV(alphas=np.logspace(-2, 4, 30))
        pred = cross_val_predict(model, x, age, cv=GroupKFold(5), groups=groups)
        out[grid_factor] = float(np.mean(np.abs(pred - age)))
    return out


def main() -> None:
    """Print the probe's MAE at the native and the coarsened grid."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--factor", type=int, default=2, help="coarsening factor of the model grid (default 2)")
    args = parser.parse_args()
    root: Path = args.study
    try:
        maes = probe(root, args.factor)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    truth = root / "truth.json"
    oracle = json.loads(truth.read_text())["oracle_mae"] if truth.is_file() else None
    for factor, mae in maes.items():
        ratio = f", {mae / oracle:.2f}× the oracle's {oracle:.2f}" if oracle else ""
        print(f"grid / {factor}: ridge on region features: MAE {mae:.2f} years{ratio}")


if __name__ == "__main__":
    main()
