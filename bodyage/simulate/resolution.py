"""Which regions the model's grid can resolve: the ``resolvable`` entry of ``truth.json``.

A model trained on the default (automatic) grid sees each scan shrunk by an integer factor
(16 mm voxels for the 8 mm default cohort; :func:`bodyage.preprocess.auto_grid`). A region
none of whose model voxels lies wholly inside it only ever appears mixed with its
neighbours, so "the model uses this region" cannot be told apart from "the model uses
its neighbours": a planted effect there is below what the grid resolves.

Rule (documented in docs/guide/simulate.md): a model voxel is *interior* to a
region when every image voxel it averages belongs to that region (integer factors; for
other factors, when it and its six neighbours carry the region's label after majority
resampling). ``interior_voxels`` is the median over scans; a region is resolvable when
it has at least :data:`MIN_INTERIOR_VOXELS` interior voxels, or
:data:`MIN_INTERIOR_VOXELS_PATTERN` for texture and shape effects, which need a pattern
inside the region rather than one value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from bodyage.scenario import Scenario

#: interior model voxels a region needs for a change of its mean signal or volume
MIN_INTERIOR_VOXELS = 4
#: interior model voxels a region needs for a texture or shape effect
MIN_INTERIOR_VOXELS_PATTERN = 8

RULE = (
    "a model voxel is interior to a region when every image voxel it averages belongs to the region; "
    f"a region is resolvable when the median scan has >= {MIN_INTERIOR_VOXELS} interior voxel(s) "
    f"(>= {MIN_INTERIOR_VOXELS_PATTERN} for texture and shape effects)"
)


def default_model_grid(shape: Sequence[int]) -> tuple[int, int, int]:
    """The grid ``bodyage train`` uses by default for images of ``shape`` (``--grid auto``)."""
    from bodyage.preprocess import auto_grid

    return auto_grid(shape)


def region_counts(
    mask: npt.NDArray[np.integer], model_grid: Sequence[int], n_labels: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Model voxels per label on ``model_grid``: (volume in model voxels, interior voxels).

    Both arrays have length ``n_labels`` (indexed by label id). For integer factors the
    volume is the image voxel count over the factors' product; otherwise the count of
    majority-vote voxels.
    """
    from scipy import ndimage

    from bodyage.preprocess import resample_labels

    arr = np.asarray(mask)
    f = [s / g for s, g in zip(arr.shape, model_grid, strict=True)]
    if all(abs(x - round(x)) < 1e-9 for x in f):
        fx, fy, fz = (round(x) for x in f)
        gx, gy, gz = (int(g) for g in model_grid)
        cut = arr[: gx * fx, : gy * fy, : gz * fz]
        first = cut[::fx, ::fy, ::fz]
        same = np.ones(first.shape, dtype=bool)
        for i, j, k in np.ndindex(fx, fy, fz):
            same &= cut[i::fx, j::fy, k::fz] == first
        pure = np.where(same, first, 0).astype(np.int64)
        # the region's volume in model voxels (a majority vote costs 20x more and differs little)
        maj = np.bincount(arr.ravel().astype(np.int64), minlength=n_labels)[:n_labels] / float(fx * fy * fz)
    else:
        majority = np.asarray(resample_labels(arr.astype(np.int64), model_grid)).astype(np.int64)
        maj = np.bincount(majority.ravel(), minlength=n_labels)[:n_labels].astype(float)
        pure = np.zeros_like(majority)
        for lab in np.unique(majority):
            if lab == 0:
                continue
            sel = majority == lab
            pure[ndimage.binary_erosion(sel, border_value=0) & sel] = lab
    inner = np.bincount(pure.ravel(), minlength=n_labels)[:n_labels]
    inner[0] = 0
    return np.asarray(maj, dtype=float), inner.astype(np.int64)


def resolvable_summary(
    scenario: Scenario,
    regions: Mapping[str, int],
    model_grid: Sequence[int],
    image_grid: Sequence[int],
    spacing_mm: Sequence[float],
    majority: npt.NDArray[np.float64],
    interior: npt.NDArray[np.int64],
) -> dict[str, Any]:
    """``truth.json["resolvable"]`` and the planted regions below resolution.

    Parameters
    ----------
    regions
        Region name -> label id.
    majority, interior
        Per scan (rows) and label id (columns): volume in model voxels, interior model
        voxels (:func:`region_counts`).

    Returns
    -------
    dict
        ``{"grid": [...], "grid_mm": float, "spacing_mm": [...], "rule": str, "regions":
        {region: {"model_voxels", "interior_voxels", "resolvable"}}, "below_resolution":
        [planted regions that are not resolvable]}``.
    """
    factors = [s / g for s, g in zip(image_grid, model_grid, strict=True)]
    spacing = [float(sp * f) for sp, f in zip(spacing_mm, factors, strict=True)]
    effects: dict[str, set[str]] = {}
    for a in scenario.ageing:
        effects.setdefault(a.region, set()).add(a.effect)
    out: dict[str, dict[str, Any]] = {}
    for name, rid in regions.items():
        n_in = float(np.median(interior[:, rid])) if interior.shape[0] else 0.0
        n_maj = float(np.median(majority[:, rid])) if majority.shape[0] else 0.0
        need = MIN_INTERIOR_VOXELS_PATTERN if effects.get(name, set()) & {"texture", "shape"} else MIN_INTERIOR_VOXELS
        out[name] = {"model_voxels": n_maj, "interior_voxels": n_in, "resolvable": bool(n_in >= need)}
    below = [r for r in scenario.planted_regions if r in out and not out[r]["resolvable"]]
    return {
        "grid": [int(g) for g in model_grid],
        "grid_mm": max(spacing),
        "spacing_mm": spacing,
        "rule": RULE,
        "regions": out,
        "below_resolution": below,
    }
