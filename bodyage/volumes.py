"""NIfTI volumes in and out (nibabel): RAS+ reorientation, grid checks, atomic writes."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bodyage.atomic import atomic_path
from bodyage.errors import InputError
from bodyage.regions import MAX_LABEL_ID

#: affines equal within this tolerance (mm) are the same grid
AFFINE_ATOL_MM = 1e-3


@dataclass(frozen=True)
class Volume:
    """A 3D image on a grid.

    Attributes
    ----------
    data
        Array of shape ``(X, Y, Z)``.
    affine
        4×4 voxel-to-world (mm) matrix.
    orientation
        Axis codes of the file as read (e.g. ``("L", "P", "S")``), before any reorientation.
    """

    data: npt.NDArray[np.generic] = field(repr=False)
    affine: npt.NDArray[np.float64] = field(repr=False)
    orientation: tuple[str, str, str] = ("R", "A", "S")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape."""
        s = self.data.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each axis."""
        sp = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return (float(sp[0]), float(sp[1]), float(sp[2]))


def load_volume(path: str | os.PathLike[str], *, ras: bool = True, dtype: npt.DTypeLike | None = None) -> Volume:
    """Load a 3D NIfTI, optionally reoriented to RAS+.

    Parameters
    ----------
    path
        ``.nii`` or ``.nii.gz`` file.
    ras
        Reorient to the closest canonical (RAS+) orientation (a permutation/flip, no
        resampling).
    dtype
        Cast the data to this dtype (default: keep the on-disk dtype after scaling).

    Raises
    ------
    InputError
        If the file is missing, unreadable, not 3D or has a singular affine.
    """
    import nibabel as nib

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: image file not found")
    try:
        img = nib.load(str(p))
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise InputError(f"{p}: not a NIfTI image ({type(img).__name__})")
        affine = np.asarray(img.affine, dtype=np.float64)
        # before reorienting: nibabel cannot reorient a singular affine (OrientationError)
        check_affine(affine, what=str(p))
        orientation = tuple(str(c) for c in nib.aff2axcodes(affine))
        if ras:
            img = nib.as_closest_canonical(img)
            affine = np.asarray(img.affine, dtype=np.float64)
        data = np.asanyarray(img.dataobj) if dtype is None else np.asarray(img.dataobj, dtype=dtype)
    except (
        OSError,
        EOFError,
        ValueError,
        zlib.error,
        nib.filebasedimages.ImageFileError,
        nib.orientations.OrientationError,
    ) as err:
        # zlib.error: a corrupt .nii.gz stream (not an OSError)
        raise InputError(f"{p}: cannot read NIfTI ({err})") from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{p}: expected a 3D volume, found shape {data.shape}")
    return Volume(data=data, affine=affine, orientation=(orientation[0], orientation[1], orientation[2]))


def check_affine(affine: npt.NDArray[np.float64], *, what: str) -> None:
    """Raise :class:`InputError` if ``affine`` has non-finite entries or is singular.

    Raises
    ------
    InputError
        ``<what>: singular affine (...)``: a zero voxel size or two axes pointing the same
        way, which no reorientation or resampling can use.
    """
    if not np.isfinite(affine).all():
        raise InputError(f"{what}: singular affine (it holds NaN or infinite values)")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{what}: singular affine (zero voxel size or axes not independent)")


def load_labels(path: str | os.PathLike[str], *, ras: bool = True) -> Volume:
    """Load a label map (mask): :func:`load_volume`, then check the values are label ids.

    Float files are accepted when every value is a whole number (NIfTI writers often
    store labels as float); the data are returned as ``uint8`` or ``uint16``.

    Raises
    ------
    InputError
        As :func:`load_volume`, or if a value is NaN, infinite, not a whole number,
        negative or above :data:`bodyage.regions.MAX_LABEL_ID`.
    """
    vol = load_volume(path, ras=ras)
    arr = np.asarray(vol.data)
    what = f"{Path(path)}: mask"
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        if bad.any():
            raise InputError(f"{what} holds {int(bad.sum())} NaN or infinite voxels; expected integer label ids")
        frac = arr != np.floor(arr)
        if frac.any():
            raise InputError(
                f"{what} holds non-integer values (e.g. {float(arr[frac][0]):g} in {int(frac.sum())} voxels); "
                "expected integer label ids"
            )
    elif not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{what} has dtype {arr.dtype}; expected integer label ids")
    if arr.size:
        lo, hi = arr.min(), arr.max()
        if lo < 0:
            raise InputError(f"{what} holds negative label ids (min {lo:g})")
        if hi > MAX_LABEL_ID:
            raise InputError(f"{what} holds label id {hi:g}, above the largest allowed ({MAX_LABEL_ID})")
    dtype = np.uint8 if not arr.size or arr.max() <= 255 else np.uint16
    return Volume(data=arr.astype(dtype, copy=False), affine=vol.affine, orientation=vol.orientation)


def save_volume(
    path: str | os.PathLike[str],
    data: npt.ArrayLike,
    affine: npt.ArrayLike,
    *,
    dtype: npt.DTypeLike | None = None,
) -> Path:
    """Write a NIfTI atomically (temp file + rename); qform and sform set to ``affine``."""
    import nibabel as nib

    arr = np.asarray(data)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def same_grid(a: Volume, b: Volume, atol: float = AFFINE_ATOL_MM) -> bool:
    """Whether two volumes share shape and affine (within ``atol`` mm)."""
    return a.shape == b.shape and bool(np.allclose(a.affine, b.affine, atol=atol))


def world_extent(v: Volume) -> npt.NDArray[np.float64]:
    """Return the world-space bounding box ``[[min x, y, z], [max x, y, z]]`` of voxel centres."""
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, v.shape[0] - 1) for j in (0, v.shape[1] - 1) for k in (0, v.shape[2] - 1)]
    )
    world = corners @ v.affine.T
    return np.stack([world[:, :3].min(axis=0), world[:, :3].max(axis=0)])
