"""Seeded factories for the segment tests: a tiny study, exported masks, fake weights.

``make_study`` writes a study folder (DESIGN.md §3) of a few scans on a 20×16×30 grid of
4 mm voxels: water and fat images with raw-looking integer intensities and a combined
label map holding a handful of ellipsoids (liver, both kidneys, spleen, prostate in men;
subcutaneous fat and skeletal muscle under them). ``export_*`` write those masks in the
layouts ``bodyage segment --from`` reads; ``fake_weights`` lays out files where
TotalSegmentator expects its models (empty networks: enough for the checks, useless for
prediction).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from bodyage.regions import combined_label_table
from bodyage.study import scan_id
from bodyage.totalseg import required_weights

SHAPE = (20, 16, 30)
SPACING = 4.0
#: ellipsoids: region -> (centre in voxels, radii in voxels)
BLOBS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "liver": ((7.0, 8.0, 18.0), (4.0, 3.0, 4.0)),
    "spleen": ((14.0, 9.0, 19.0), (2.0, 2.0, 2.5)),
    "kidney_left": ((14.0, 11.0, 14.0), (1.6, 1.6, 2.5)),
    "kidney_right": ((6.0, 11.0, 14.0), (1.6, 1.6, 2.5)),
    "prostate": ((10.0, 6.0, 5.0), (1.5, 1.5, 1.5)),
}


def affine(spacing: float = SPACING, origin: Sequence[float] = (-40.0, -30.0, -60.0)) -> np.ndarray:
    """RAS+ affine with isotropic ``spacing`` mm voxels."""
    a = np.diag([spacing, spacing, spacing, 1.0])
    a[:3, 3] = origin
    return a


def ellipsoid(shape: Sequence[int], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Boolean ellipsoid on a voxel grid."""
    idx = np.indices(tuple(shape), dtype=float)
    r2 = sum(((idx[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
    return r2 <= 1.0


def scan_labels(rng: np.random.Generator, sex: str, drop: Sequence[str] = ()) -> np.ndarray:
    """One combined label map (uint8, study ids): tissue under organs, jittered organs."""
    table = combined_label_table()
    out = np.zeros(SHAPE, dtype=np.uint8)
    body = ellipsoid(SHAPE, (9.5, 7.5, 14.5), (9.0, 7.0, 14.0))
    inner = ellipsoid(SHAPE, (9.5, 7.5, 14.5), (7.5, 5.5, 13.0))
    out[body & ~inner] = table.id_of("subcutaneous_fat")
    out[inner & ellipsoid(SHAPE, (9.5, 3.0, 14.5), (6.0, 2.0, 12.0))] = table.id_of("skeletal_muscle")
    for name, (centre, radii) in BLOBS.items():
        if name in drop or (name == "prostate" and sex != "M"):
            continue
        c = np.asarray(centre) + rng.normal(0.0, 0.3, 3)
        out[ellipsoid(SHAPE, c, radii)] = table.id_of(name)
    return out


def make_study(
    root: Path,
    n_scans: int = 4,
    seed: int = 0,
    *,
    with_masks: bool = True,
    drop: dict[int, Sequence[str]] | None = None,
    image_affine: np.ndarray | None = None,
) -> Path:
    """Write a tiny study; returns ``root``.

    Parameters
    ----------
    n_scans
        Scans (one visit each; subjects alternate F, M).
    with_masks
        Write ``masks/<scan>.nii.gz`` and the ``mask`` column (as ``simulate`` does).
    drop
        ``{scan index: regions}`` left out of a scan's mask (a missing kidney ...).
    image_affine
        Affine of the images (default: RAS+ 4 mm).
    """
    rng = np.random.default_rng(seed)
    aff = affine() if image_affine is None else image_affine
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_scans):
        subject, visit, sex = f"S{i + 1:03d}", 0, "FM"[i % 2]
        sid = scan_id(subject, visit)
        labels = scan_labels(rng, sex, (drop or {}).get(i, ()))
        water = (200 + 600 * (labels > 0) + rng.normal(0, 20, SHAPE)).astype(np.int16)
        fat = (100 + 900 * (labels == 51) + rng.normal(0, 20, SHAPE)).astype(np.int16)
        nib.save(nib.Nifti1Image(water, aff), root / "images" / f"{sid}_water.nii.gz")
        nib.save(nib.Nifti1Image(fat, aff), root / "images" / f"{sid}_fat.nii.gz")
        row = {
            "subject_id": subject,
            "visit": visit,
            "age": 50.0 + 5 * i,
            "sex": sex,
            "site": "a",
            "water": f"images/{sid}_water.nii.gz",
            "fat": f"images/{sid}_fat.nii.gz",
        }
        if with_masks:
            (root / "masks").mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(labels, aff), root / "masks" / f"{sid}.nii.gz")
            row["mask"] = f"masks/{sid}.nii.gz"
        row["bmi"] = 25.0 + i
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    combined_label_table().write(root / "labels.json")
    return root


def cohort_masks(study: Path) -> dict[str, Path]:
    """``{scan id: mask path}`` of a study's cohort."""
    cohort = pd.read_csv(study / "cohort.csv", dtype={"subject_id": str})
    return {
        scan_id(s, v): study / m for s, v, m in zip(cohort["subject_id"], cohort["visit"], cohort["mask"], strict=True)
    }


def export_region_folders(study: Path, out: Path, *, empty_files: bool = True) -> Path:
    """Write each scan's mask in TotalSegmentator's layout: ``out/<scan id>/<region>.nii.gz``.

    Like TotalSegmentator, every region of the label table gets a file (empty where
    absent) unless ``empty_files`` is ``False``.
    """
    table = json.loads((study / "labels.json").read_text())
    for sid, path in cohort_masks(study).items():
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
        folder = out / sid
        folder.mkdir(parents=True, exist_ok=True)
        for key, name in table.items():
            binary = (data == int(key)).astype(np.uint8)
            if empty_files or binary.any():
                nib.save(nib.Nifti1Image(binary, img.affine), folder / f"{name}.nii.gz")
    return out


def export_multilabel(study: Path, out: Path) -> Path:
    """Copy each scan's mask to ``out/<scan id>.nii.gz`` (the multilabel layout)."""
    out.mkdir(parents=True, exist_ok=True)
    for sid, path in cohort_masks(study).items():
        img = nib.load(str(path))
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), out / f"{sid}.nii.gz")
    return out


def fake_weights(root: Path, tasks: Sequence[str] = ("total_mr",), *, fast: bool = False) -> Path:
    """Lay out complete-looking TotalSegmentator model folders (tiny zip checkpoints)."""
    for task in tasks:
        for folder in required_weights(task, fast=fast):
            d = folder.model_dir(root)
            d.mkdir(parents=True, exist_ok=True)
            (d / "plans.json").write_text(json.dumps({"plans_name": "nnUNetPlans"}))
            (d / "dataset.json").write_text(json.dumps({"labels": {"background": 0}}))
            for k in folder.folds:
                (d / f"fold_{k}").mkdir(exist_ok=True)
                with zipfile.ZipFile(d / f"fold_{k}" / "checkpoint_final.pth", "w") as z:
                    z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    return root
