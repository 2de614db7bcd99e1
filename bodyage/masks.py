"""Label maps (masks): reading, combining, checking against their image, counting, writing.

A study's mask is one integer label map per scan on the grid of its images, with the ids
of the study's ``labels.json`` (docs/design.md §3). This module knows how to

- read masks in the two layouts TotalSegmentator writes: one multilabel NIfTI
  (:func:`read_multilabel`) or a folder of one binary NIfTI per region
  (:func:`read_region_folder`), mapping names or ids onto the study's label table and
  refusing unknown labels;
- combine the organ map (``total_mr``) with the tissue map (``tissue_types_mr``), organs
  winning where both claim a voxel (:func:`combine_label_maps`);
- check a mask against its image and bring it onto the image grid
  (:func:`align_to_image`): same grid, same field of view on another grid (resampled,
  nearest neighbour), or a mismatch (:class:`MaskMismatchError`);
- count voxels per label in one pass (:func:`label_counts`);
- write a mask atomically, in the orientation of its image file, stamped with the
  configuration that made it (:func:`write_mask`, :func:`mask_stamp`).

It imports numpy, scipy and nibabel only: no torch, no TotalSegmentator.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bodyage.atomic import atomic_path
from bodyage.errors import InputError
from bodyage.regions import LabelTable
from bodyage.volumes import AFFINE_ATOL_MM, Volume, load_volume

#: prefix of the NIfTI ``descrip`` field of masks written by ``bodyage segment``
STAMP_PREFIX = "bodyage segment "
#: name suffix of the NIfTI files of masks and per-region masks
NIFTI_SUFFIX = ".nii.gz"

LabelArray = npt.NDArray[np.integer]


class MaskMismatchError(InputError):
    """A mask does not lie on its image's grid nor cover the same field of view."""


class UnknownLabelError(InputError):
    """A mask holds a label id or a region name the study's label table does not know."""


def label_dtype(max_id: int) -> np.dtype[np.unsignedinteger]:
    """Return the smallest label dtype for ids up to ``max_id`` (uint8 or uint16)."""
    if max_id < 256:
        return np.dtype(np.uint8)
    if max_id < 65536:
        return np.dtype(np.uint16)
    raise InputError(f"label id {max_id} does not fit a uint16 label map (at most 65535)")


def label_counts(labels: npt.NDArray[np.generic], n_labels: int) -> npt.NDArray[np.int64]:
    """Count the voxels of each label in one pass.

    Parameters
    ----------
    labels
        Integer label map of any shape.
    n_labels
        Length of the result (at least the largest id + 1); ids beyond it are an error.

    Returns
    -------
    numpy.ndarray
        ``counts[i]`` = number of voxels with label ``i``, shape ``(max(n_labels, max id + 1),)``.
    """
    flat = np.asarray(labels).ravel()
    if flat.size == 0:
        return np.zeros(n_labels, dtype=np.int64)
    return np.bincount(flat.astype(np.intp, copy=False), minlength=n_labels).astype(np.int64, copy=False)


def combine_label_maps(organs: LabelArray | None, tissue: LabelArray | None, dtype: npt.DTypeLike) -> LabelArray:
    """Combine an organ map and a tissue map into one label map; organs win.

    ``tissue_types_mr`` labels every voxel of fat and muscle, including the organs'
    surroundings and (for muscle) the muscles ``total_mr`` names individually; the
    individual structure is the more specific answer, so an organ label replaces a
    tissue label wherever both are non-zero (docs/design.md §3).

    Parameters
    ----------
    organs, tissue
        Label maps of the same shape, already in the study's ids; either may be ``None``.
    dtype
        dtype of the result.

    Raises
    ------
    InputError
        If both are ``None`` or their shapes differ.
    """
    if organs is None and tissue is None:
        raise InputError("combine_label_maps needs at least one label map")
    if organs is not None and tissue is not None and organs.shape != tissue.shape:
        raise InputError(f"organ map {organs.shape} and tissue map {tissue.shape} differ in shape")
    base = tissue if tissue is not None else organs
    assert base is not None  # for mypy: one of them is set (checked above)
    out = np.array(base, dtype=dtype, copy=True)
    if organs is not None and tissue is not None:
        np.copyto(out, organs.astype(dtype, copy=False), where=organs != 0)
    return out


def relabel(
    data: npt.NDArray[np.generic],
    mapping: Mapping[int, int],
    dtype: npt.DTypeLike,
    *,
    what: str,
) -> LabelArray:
    """Map the ids of a label map through ``mapping`` (a lookup table, one pass).

    Raises
    ------
    UnknownLabelError
        If a non-zero id present in ``data`` has no entry in ``mapping``; the message lists them.
    """
    arr = _integer_labels(data, what=what)
    counts = label_counts(arr, max(mapping, default=0) + 1)
    present = np.flatnonzero(counts)
    unknown = [int(i) for i in present if i != 0 and i not in mapping]
    if unknown:
        known = ", ".join(str(i) for i in sorted(mapping)) or "none"
        raise UnknownLabelError(
            f"{what}: unknown label id(s) {', '.join(map(str, unknown))} (known ids: {known}); "
            "add them to the study's labels.json or fix the mask"
        )
    lut = np.zeros(len(counts), dtype=dtype)
    for src, dst in mapping.items():
        if src < len(lut):
            lut[src] = dst
    return lut[arr]


def _integer_labels(data: npt.NDArray[np.generic], *, what: str) -> npt.NDArray[np.intp]:
    arr = np.asarray(data)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{what}: the mask holds NaN or infinite values")
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            raise InputError(f"{what}: the mask holds non-integer values; expected integer label ids")
        arr = rounded
    elif not np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
        raise InputError(f"{what}: mask dtype {arr.dtype} is not an integer type")
    if arr.size and arr.min() < 0:
        raise InputError(f"{what}: the mask holds negative label ids (min {arr.min()})")
    return arr.astype(np.intp, copy=False)


# ---------------------------------------------------------------- reading


_CARET_LABEL = re.compile(r'<Label Key="(\d+)"[^>]*><!\[CDATA\[(.*?)\]\]></Label>', re.DOTALL)


def embedded_label_map(path: str | os.PathLike[str]) -> dict[int, str] | None:
    """Return the ``{id: name}`` map TotalSegmentator stores in a multilabel NIfTI, if any.

    TotalSegmentator writes it as a Caret XML header extension
    (``totalsegmentator.nifti_ext_header.add_label_map_to_nifti``); it is read here with a
    regular expression, without TotalSegmentator or ``xmltodict``.
    """
    import nibabel as nib

    img = nib.load(str(path))
    for ext in getattr(img.header, "extensions", []):
        try:
            text = ext.get_content().decode("utf-8", errors="replace")
        except AttributeError:  # pragma: no cover - non-bytes content
            continue
        found = {int(k): v.strip() for k, v in _CARET_LABEL.findall(text)}
        if found:
            return found
    return None


def read_multilabel(path: str | os.PathLike[str], table: LabelTable, *, scan: str) -> tuple[Volume, list[str]]:
    """Read one multilabel mask and express it in the ids of ``table``.

    If the file carries TotalSegmentator's embedded label map, ids are matched by
    **name** (so a ``tissue_types_mr`` file with ids 1–3 lands on the study's tissue ids);
    otherwise the file's ids are taken to be the study's ids.

    Returns
    -------
    (Volume, notes)
        The mask reoriented to RAS+ (dtype of ``table``), and notes on what was done.

    Raises
    ------
    UnknownLabelError
        If the file holds an id (or an embedded name) ``table`` does not know.
    InputError
        If the file cannot be read, is not 3D or holds non-integer values.
    """
    p = Path(path)
    vol = load_volume(p)
    dtype = label_dtype(table.max_id)
    what = f"scan {scan}: mask {p}"
    embedded = embedded_label_map(p)
    notes: list[str] = []
    if embedded:
        unknown = sorted(name for name in embedded.values() if name not in table)
        if unknown:
            raise UnknownLabelError(
                f"{what}: unknown region name(s) {', '.join(unknown)} in its embedded label map; "
                "expected TotalSegmentator names from the study's labels.json"
            )
        mapping = {i: table.id_of(name) for i, name in embedded.items()}
        if any(i != j for i, j in mapping.items()):
            notes.append("ids mapped by the region names embedded in the file")
    else:
        mapping = {i: i for i in table.ids}
    data = relabel(vol.data, mapping, dtype, what=what)
    return Volume(data=data, affine=vol.affine, orientation=vol.orientation), notes


def region_files(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Return ``{region name: path}`` of the ``<region>.nii.gz`` files in a folder."""
    d = Path(folder)
    return {p.name[: -len(NIFTI_SUFFIX)]: p for p in sorted(d.iterdir()) if p.name.endswith(NIFTI_SUFFIX)}


def read_region_folder(
    folder: str | os.PathLike[str],
    table: LabelTable,
    *,
    scan: str,
    tissue_ids: frozenset[int] = frozenset(),
) -> tuple[Volume, list[str]]:
    """Read TotalSegmentator's per-region layout (``folder/<region>.nii.gz``) as one label map.

    Each file is a binary mask (voxels > 0.5 are in, as TotalSegmentator's own
    ``combine_masks_to_multilabel_file`` reads them). Tissue classes are laid down first
    and organs over them (:func:`combine_label_maps`); where two organ files claim a voxel
    the higher id wins (TotalSegmentator's order) and the overlap is noted.

    Parameters
    ----------
    folder
        ``DIR/<scan id>``.
    table
        The study's label table: file names must be its region names.
    scan
        Scan id, for messages.
    tissue_ids
        Ids of the tissue classes (organs win over them).

    Raises
    ------
    UnknownLabelError
        If a file is named after a region ``table`` does not know.
    MaskMismatchError
        If the files do not share one grid.
    InputError
        If the folder holds no ``.nii.gz`` file or a file cannot be read.
    """
    d = Path(folder)
    files = region_files(d)
    if not files:
        raise InputError(f"scan {scan}: {d} holds no <region>.nii.gz files")
    unknown = sorted(name for name in files if name not in table)
    if unknown:
        raise UnknownLabelError(
            f"scan {scan}: {d} has file(s) for unknown region(s) {', '.join(unknown)}; "
            "expected TotalSegmentator region names from the study's labels.json"
        )
    dtype = label_dtype(table.max_id)
    order = sorted(files, key=lambda n: (table.id_of(n) not in tissue_ids, table.id_of(n)))
    out: LabelArray | None = None
    ref: Volume | None = None
    claimed: npt.NDArray[np.bool_] | None = None
    overlap = 0
    for name in order:
        label_id = table.id_of(name)
        vol = load_volume(files[name])
        if ref is None:
            ref = vol
            out = np.zeros(vol.shape, dtype=dtype)
            claimed = np.zeros(vol.shape, dtype=bool)
        elif not _same_grid(vol, ref):
            raise MaskMismatchError(
                f"scan {scan}: {files[name].name} and {files[order[0]].name} in {d} are on different grids "
                f"(shapes {vol.shape} and {ref.shape})"
            )
        assert out is not None and claimed is not None
        inside = np.asarray(vol.data) > 0.5
        if label_id not in tissue_ids:
            overlap += int(np.count_nonzero(inside & claimed))
            claimed |= inside
        out[inside] = label_id
    assert ref is not None and out is not None
    notes = [f"{overlap} voxels claimed by two organ files (higher id kept)"] if overlap else []
    return Volume(data=out, affine=ref.affine, orientation=ref.orientation), notes


# ---------------------------------------------------------------- alignment


@dataclass(frozen=True)
class Alignment:
    """How a mask was brought onto its image's grid.

    Attributes
    ----------
    data
        The label map on the image grid (RAS+), shape of the image.
    resampled
        Whether it had to be resampled (nearest neighbour).
    note
        What was done, for the record (``None`` when the grids were the same).
    """

    data: LabelArray
    resampled: bool
    note: str | None


def _same_grid(a: Volume, b: Volume, atol: float = AFFINE_ATOL_MM) -> bool:
    return a.shape == b.shape and bool(np.allclose(a.affine, b.affine, atol=atol))


def field_of_view_corners(v: Volume) -> npt.NDArray[np.float64]:
    """Return the 8 world-space corners (mm) of the box the voxels cover, shape ``(8, 3)``.

    The box runs from the outer edge of the first voxel to the outer edge of the last
    (voxel centres ± half a voxel), so two grids of different resolution over the same
    field of view have the same corners.
    """
    lo = -0.5
    corners = np.array(
        [[i, j, k, 1.0] for i in (lo, v.shape[0] + lo) for j in (lo, v.shape[1] + lo) for k in (lo, v.shape[2] + lo)]
    )
    return (corners @ v.affine.T)[:, :3]


def align_to_image(mask: Volume, image: Volume, *, scan: str, source: str, atol: float = AFFINE_ATOL_MM) -> Alignment:
    """Check a mask against its image and return it on the image grid.

    Both volumes are expected in RAS+ (as :func:`bodyage.volumes.load_volume` returns
    them). Three outcomes:

    1. same shape and affines equal within ``atol`` mm → the mask as is;
    2. the same field of view (every corner of the two voxel boxes within one voxel of
       the coarser grid) on a different grid → resampled nearest-neighbour onto the
       image grid, with a note;
    3. otherwise → :class:`MaskMismatchError` naming the scan and the mismatch.

    Parameters
    ----------
    mask, image
        The mask (integer labels) and the image, RAS+.
    scan
        Scan id, for messages.
    source
        Where the mask came from (a path), for messages.
    atol
        Tolerance on affine entries, mm.

    Raises
    ------
    MaskMismatchError
        If the mask covers another part of space.
    """
    if _same_grid(mask, image, atol):
        return Alignment(data=np.asarray(mask.data), resampled=False, note=None)
    corner_shift = float(np.max(np.linalg.norm(field_of_view_corners(mask) - field_of_view_corners(image), axis=1)))
    tolerance = max(max(mask.spacing), max(image.spacing))
    if corner_shift > tolerance:
        raise MaskMismatchError(
            f"scan {scan}: mask {source} does not match its image: shape {mask.shape} with "
            f"{_fmt_spacing(mask.spacing)} mm voxels vs the image's {image.shape} with "
            f"{_fmt_spacing(image.spacing)} mm voxels, and their fields of view differ by up to "
            f"{corner_shift:.1f} mm (tolerance {tolerance:.1f} mm)"
        )
    from scipy import ndimage

    # image voxel -> world -> mask voxel
    m = np.linalg.inv(mask.affine) @ image.affine
    data = ndimage.affine_transform(
        np.asarray(mask.data),
        m[:3, :3],
        offset=m[:3, 3],
        output_shape=image.shape,
        order=0,
        mode="constant",
        cval=0,
        prefilter=False,
    )
    note = (
        f"resampled (nearest neighbour) from a {mask.shape} grid of {_fmt_spacing(mask.spacing)} mm voxels "
        f"onto the image grid {image.shape} of {_fmt_spacing(image.spacing)} mm"
    )
    return Alignment(data=data.astype(mask.data.dtype, copy=False), resampled=True, note=note)


def _fmt_spacing(sp: tuple[float, float, float]) -> str:
    return "×".join(f"{s:.3g}" for s in sp)


# ---------------------------------------------------------------- writing


def mask_stamp(fingerprint: str) -> str:
    """The ``descrip`` text that marks a mask as made by the configuration ``fingerprint``."""
    return f"{STAMP_PREFIX}{fingerprint}"


def read_stamp(path: str | os.PathLike[str]) -> str | None:
    """Return the fingerprint stamped into a mask's header, or ``None`` (unreadable, unstamped)."""
    import zlib

    import nibabel as nib

    try:
        header: Any = nib.load(str(path)).header
        raw = header["descrip"].item()
    except (OSError, EOFError, ValueError, KeyError, zlib.error, nib.filebasedimages.ImageFileError):
        return None
    text = raw.decode("ascii", errors="replace") if isinstance(raw, bytes) else str(raw)
    return text[len(STAMP_PREFIX) :].strip() if text.startswith(STAMP_PREFIX) else None


def from_ras(data: npt.NDArray[np.generic], orientation: tuple[str, str, str]) -> npt.NDArray[np.generic]:
    """Undo :func:`nibabel.as_closest_canonical`: put RAS+ voxels back in a file's axis order.

    Parameters
    ----------
    data
        Array in RAS+ axis order.
    orientation
        Axis codes of the file (``Volume.orientation``), e.g. ``("L", "P", "S")``.
    """
    import nibabel as nib

    ornt = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.axcodes2ornt(orientation)
    )
    return np.ascontiguousarray(nib.orientations.apply_orientation(data, ornt))


def grid_of(path: str | os.PathLike[str]) -> Volume:
    """Return the RAS+ grid of a NIfTI as a data-less :class:`Volume` (voxels are not read).

    Shape, affine and orientation equal those of ``load_volume(path)``; ``data`` is a
    read-only broadcast of zeros, so only the header is decompressed.

    Raises
    ------
    InputError
        If the file is missing, unreadable, not 3D or has a singular affine.
    """
    import nibabel as nib

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: image file not found")
    shape, affine = file_grid(p)
    full_shape = _nifti(p).shape
    if any(int(s) != 1 for s in full_shape[3:]):
        raise InputError(f"{p}: expected a 3D volume, found shape {tuple(full_shape)}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{p}: singular affine (zero voxel size)")
    codes = tuple(str(c) for c in nib.aff2axcodes(affine))
    ornt = nib.orientations.io_orientation(affine)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    ras_shape = [0, 0, 0]
    for axis, (target, _flip) in enumerate(ornt):
        ras_shape[int(target)] = shape[axis]
    data = np.broadcast_to(np.zeros((), dtype=np.uint8), tuple(ras_shape))
    return Volume(data=data, affine=ras_affine, orientation=(codes[0], codes[1], codes[2]))


def _nifti(path: str | os.PathLike[str]) -> Any:
    """Load a NIfTI header (voxels stay on disk); raise :class:`InputError` naming the file."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise InputError(f"{path}: cannot read NIfTI header ({err})") from err
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(f"{path}: not a NIfTI image ({type(img).__name__})")
    return img


def file_grid(path: str | os.PathLike[str]) -> tuple[tuple[int, int, int], npt.NDArray[np.float64]]:
    """Return the on-disk ``(shape, affine)`` of a 3D NIfTI without reading its voxels."""
    img = _nifti(path)
    if len(img.shape) < 3:
        raise InputError(f"{path}: expected a 3D volume, found shape {tuple(img.shape)}")
    shape = tuple(int(s) for s in img.shape[:3])
    return (shape[0], shape[1], shape[2]), np.asarray(img.affine, dtype=np.float64)


def write_mask(
    path: str | os.PathLike[str],
    data_ras: LabelArray,
    image: Volume,
    image_path: str | os.PathLike[str],
    *,
    fingerprint: str,
    dtype: npt.DTypeLike,
) -> Path:
    """Write a label map atomically on the on-disk grid of its image, stamped with ``fingerprint``.

    The mask gets the image file's axis order and affine (not RAS+), so it overlays the
    image in any viewer and compares equal to it header to header.

    Parameters
    ----------
    path
        Output ``.nii.gz``.
    data_ras
        Labels on the image grid in RAS+ (the image as loaded by ``load_volume``).
    image
        The image as loaded (its ``orientation`` says how to undo the reorientation).
    image_path
        The image file (its header gives the on-disk affine).
    fingerprint
        Configuration fingerprint stamped into the header ``descrip`` (resume checks it).
    dtype
        Label dtype (uint8 or uint16).

    Raises
    ------
    InputError
        If the labels do not fit the image grid.
    """
    import nibabel as nib

    if data_ras.shape != image.shape:
        raise InputError(f"{path}: labels of shape {data_ras.shape} do not fit the image grid {image.shape}")
    shape, affine = file_grid(image_path)
    disk = from_ras(np.asarray(data_ras, dtype=dtype), image.orientation)
    if disk.shape != shape:  # pragma: no cover - reorientation is a permutation
        raise InputError(f"{path}: reoriented labels {disk.shape} do not match {image_path} {shape}")
    img = nib.Nifti1Image(disk, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = mask_stamp(fingerprint).encode("ascii")[:79]
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)
