"""Region-restricted input for organ clocks (``train --region``): the crop and the masking.

An organ clock must read its organ and nothing else. Its input is built in three steps:

1. **The crop** (:func:`plan_crop`): one box in world coordinates (mm, RAS+), the union
   over the cohort of the regions' bounding boxes plus a margin, the same for every scan,
   so a voxel of the crop is the same place in every body's frame. The box is cut from each
   scan at the scan's native resolution; only if it holds more than :data:`CROP_VOXELS`
   voxels is it averaged down by the smallest integer factor that fits. A pancreas, a few
   hundred native voxels on an 8 mm grid, stays a few hundred voxels (the whole-body grid
   halves every side and would leave it a few dozen).
2. **The mask** (:func:`preprocess_cropped`): voxels outside the regions' label mask,
   dilated by :data:`DILATE_VOXELS` native voxels (the organ's boundary and a rim of what
   touches it), are set to 0 *before* averaging, so no model voxel mixes in anything outside
   the dilated mask.
3. **The normaliser**: one scale for all channels, the 99th percentile of the channels'
   sum over the dilated mask. It removes the scanner's multiplicative effect as the
   whole-body normaliser does, keeps the ratio of the channels (a fat fraction) intact, and
   depends on nothing outside the mask: perturbing a voxel outside the dilated mask leaves
   the clock's input, and so its prediction, exactly unchanged (tested).

A scan whose mask lacks one of the regions (prostate in a woman, a failed segmentation) is
refused with the reason, and becomes a ``failures.csv`` row: never a zero input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from bodyage.errors import InputError, StudyError
from bodyage.regions import REGION_GROUPS
from bodyage.study import Study

#: margin around the cohort's bounding box of a clock's regions (mm)
MARGIN_MM = 16.0
#: dilation of the regions' mask, in native voxels, before everything outside is zeroed
DILATE_VOXELS = 1
#: largest crop grid (voxels) before the crop is averaged down by an integer factor
CROP_VOXELS = 24_576
#: smallest side of a crop grid (the default model halves it three times)
MIN_SIDE = 8


@dataclass(frozen=True)
class CropSpec:
    """Where and how a clock's input is cut from every scan (recorded in checkpoints).

    Attributes
    ----------
    regions
        Region names (groups expanded), as in the study's ``labels.json``.
    label_ids
        Their label ids.
    origin_mm
        World position (RAS+, mm) of the centre of the window's first native voxel.
    spacing_mm
        Native voxel size (mm) the window was planned on.
    window
        Window size in native voxels (a multiple of ``factor`` per axis).
    factor
        Integer averaging factor from the window to the model grid.
    dilate
        Mask dilation in native voxels.
    margin_mm
        Margin added around the cohort's bounding box.
    """

    regions: tuple[str, ...]
    label_ids: tuple[int, ...]
    origin_mm: tuple[float, float, float]
    spacing_mm: tuple[float, float, float]
    window: tuple[int, int, int]
    factor: int
    dilate: int = DILATE_VOXELS
    margin_mm: float = MARGIN_MM

    @property
    def grid(self) -> tuple[int, int, int]:
        """The model grid: the window divided by the factor."""
        g = [w // self.factor for w in self.window]
        return (g[0], g[1], g[2])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (with the model grid)."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CropSpec:
        """Inverse of :meth:`to_dict` (``grid`` is derived, so ignored)."""
        return cls(
            regions=tuple(str(r) for r in d["regions"]),
            label_ids=tuple(int(i) for i in d["label_ids"]),
            origin_mm=_triple(d["origin_mm"], float),
            spacing_mm=_triple(d["spacing_mm"], float),
            window=_triple(d["window"], int),
            factor=int(d["factor"]),
            dilate=int(d.get("dilate", DILATE_VOXELS)),
            margin_mm=float(d.get("margin_mm", MARGIN_MM)),
        )


def _triple(v: Sequence[Any], kind: type) -> Any:
    return (kind(v[0]), kind(v[1]), kind(v[2]))


def resolve_regions(names: str | Sequence[str], study: Study, *, what: str = "--region") -> tuple[str, ...]:
    """Expand region names and registry groups (``kidney``) against the study's labels.

    Parameters
    ----------
    names
        A comma list (``"liver,pancreas"``) or a sequence of names.
    study
        The study; its ``labels.json`` is the authority on region names.
    what
        How error messages name the option or file.

    Raises
    ------
    InputError
        If the study has no ``labels.json``, no name is given, or a name is neither a region
        of the study nor a registry group whose members all are.
    """
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n).strip() for n in names]
    items = [n for n in items if n]
    if not items:
        raise InputError(f"{what}: no region given")
    if study.labels is None:
        raise InputError(f"{what}: the study has no labels.json; run `bodyage segment` first")
    out: list[str] = []
    for name in items:
        if name in study.labels:
            members: tuple[str, ...] = (name,)
        elif name in REGION_GROUPS:
            members = REGION_GROUPS[name]
            absent = [m for m in members if m not in study.labels]
            if absent:
                raise InputError(
                    f"{what}: group {name!r} has regions the study's labels.json lacks: {', '.join(absent)}"
                )
        else:
            raise InputError(
                f"{what}: unknown region or group {name!r}; regions are the names in the study's labels.json, "
                f"groups are {', '.join(sorted(REGION_GROUPS))}"
            )
        out += [m for m in members if m not in out]
    return tuple(out)


def plan_crop(
    study: Study,
    cohort: pd.DataFrame,
    regions: Sequence[str],
    *,
    margin_mm: float = MARGIN_MM,
    dilate: int = DILATE_VOXELS,
    max_voxels: int = CROP_VOXELS,
) -> CropSpec:
    """The crop of a clock: the cohort's union of the regions' bounding boxes plus a margin.

    Scans whose mask is unreadable or lacks the regions are passed over here (they become
    ``failures.csv`` rows when preprocessed).

    Raises
    ------
    InputError
        If the cohort has no ``mask`` column, or the regions are absent from every scan.
    """
    from bodyage.volumes import load_labels

    if study.labels is None or "mask" not in cohort.columns:
        raise InputError("a region clock needs masks (cohort.csv column mask, labels.json); run `bodyage segment`")
    ids = [study.labels.id_of(r) for r in regions]
    lo = np.full(3, np.inf)
    hi = np.full(3, -np.inf)
    spacing: npt.NDArray[np.float64] | None = None
    for path in cohort["mask"]:
        if not isinstance(path, str) or not path:
            continue
        try:
            m = load_labels(study.path(path))
        except (InputError, StudyError, OSError):
            continue
        where = np.nonzero(np.isin(np.asarray(m.data), ids))
        if len(where[0]) == 0:
            continue
        corners = np.array([[w.min() for w in where], [w.max() for w in where]], dtype=float)
        world = corners @ m.affine[:3, :3].T + m.affine[:3, 3]
        lo = np.minimum(lo, world.min(axis=0))
        hi = np.maximum(hi, world.max(axis=0))
        if spacing is None:
            spacing = np.linalg.norm(m.affine[:3, :3], axis=0)
    if spacing is None:
        raise InputError(f"regions {', '.join(regions)} are absent from every scan's mask")
    lo -= margin_mm
    hi += margin_mm
    native = np.floor((hi - lo) / spacing + 1e-6).astype(int) + 1
    factor = 1
    while int(np.prod(np.maximum(np.ceil(native / factor), MIN_SIDE))) > max_voxels:
        factor += 1
    grid = np.maximum(np.ceil(native / factor).astype(int), MIN_SIDE)
    window = grid * factor
    origin = lo - (window - native) / 2.0 * spacing  # centre the padding
    return CropSpec(
        regions=tuple(regions),
        label_ids=tuple(int(i) for i in ids),
        origin_mm=_triple([round(float(x), 4) for x in origin], float),
        spacing_mm=_triple([round(float(x), 4) for x in spacing], float),
        window=_triple(window, int),
        factor=factor,
        dilate=dilate,
        margin_mm=float(margin_mm),
    )


def window(arr: npt.NDArray[Any], start: Sequence[int], shape: Sequence[int]) -> npt.NDArray[Any]:
    """``arr[start : start + shape]`` along the last three axes, zero where it leaves the array."""
    out = np.zeros((*arr.shape[:-3], *shape), dtype=arr.dtype)
    src: list[slice] = []
    dst: list[slice] = []
    for s, n, size in zip(start, shape, arr.shape[-3:], strict=True):
        a, b = max(s, 0), min(s + n, size)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    lead = [slice(None)] * (arr.ndim - 3)
    out[tuple(lead + dst)] = arr[tuple(lead + src)]
    return out


def preprocess_cropped(
    sid: str, vols: Sequence[Any], labels: Any, crop: CropSpec
) -> tuple[npt.NDArray[np.float16], npt.NDArray[np.integer], npt.NDArray[np.float64], tuple[float, ...]]:
    """Cut, mask, average and normalise one scan for a clock (see the module docstring).

    Parameters
    ----------
    sid
        The scan id (for messages).
    vols
        The scan's channels (:class:`bodyage.volumes.Volume`, RAS+, one grid).
    labels
        Its label map on the same grid.
    crop
        The clock's crop.

    Returns
    -------
    tuple
        ``(channels, X, Y, Z)`` float16 input, the label map on the model grid (zero
        outside the dilated mask), the model grid's affine, the scale per channel.

    Raises
    ------
    InputError
        If the mask lacks a region, or the channels are empty inside the mask.
    """
    from scipy import ndimage

    from bodyage.preprocess import grid_affine, resample_image, resample_labels

    affine = np.asarray(vols[0].affine, dtype=float)
    start_f = np.linalg.solve(affine[:3, :3], np.asarray(crop.origin_mm) - affine[:3, 3])
    start = [math.floor(x + 0.5) for x in start_f]
    m = window(np.asarray(labels.data), start, crop.window)
    missing = [r for r, i in zip(crop.regions, crop.label_ids, strict=True) if not (m == i).any()]
    if missing:
        raise InputError(f"scan {sid}: the mask has no voxel of {', '.join(missing)} inside the clock's crop")
    keep = np.isin(m, crop.label_ids)
    if crop.dilate > 0:
        keep = ndimage.binary_dilation(keep, iterations=crop.dilate)
    data = np.stack([window(np.asarray(v.data, dtype=np.float32), start, crop.window) for v in vols])
    data *= keep[None]
    total = data.sum(axis=0)[keep]
    s = float(np.percentile(total, 99.0)) if total.size else 0.0
    if not s > 0:
        raise InputError(f"scan {sid}: the image is empty inside the mask of {', '.join(crop.regions)}")
    out = np.empty((len(vols), *crop.grid), dtype=np.float16)
    for k in range(len(vols)):
        out[k] = np.clip(resample_image(data[k], crop.grid) / s, 0.0, 60000.0).astype(np.float16)
    mask = resample_labels(np.where(keep, m, 0), crop.grid)
    win_affine = affine.copy()
    win_affine[:3, 3] = affine[:3, :3] @ np.asarray(start, dtype=float) + affine[:3, 3]
    return out, mask, grid_affine(win_affine, crop.window, crop.grid), tuple(s for _ in vols)


def crop_from_settings(crop: CropSpec | dict[str, Any] | None) -> CropSpec | None:
    """A crop as stored in settings or checkpoints (a dict after JSON) as a :class:`CropSpec`."""
    if crop is None or isinstance(crop, CropSpec):
        return crop
    return CropSpec.from_dict(crop)


__all__ = [
    "CROP_VOXELS",
    "DILATE_VOXELS",
    "MARGIN_MM",
    "CropSpec",
    "crop_from_settings",
    "plan_crop",
    "preprocess_cropped",
    "resolve_regions",
]
