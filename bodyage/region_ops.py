"""Operations on label maps that attribution needs: sums per region and ablation baselines.

Region aggregation (:func:`region_sums`, :func:`region_measures`) is one pass over the
voxels, never a Python loop over labels: a compiled kernel on the CPU
(:mod:`bodyage.kernels`), ``index_add_`` on the flattened ``scan × label`` index on a GPU,
where the map already is. :func:`region_measures` turns the sums into the columns of
``attributions.parquet``.

The baselines of the region-level methods (:data:`BASELINES`, built by
:func:`baseline_images`; why each exists and what it cannot remove is in
:mod:`bodyage.attribution`):

``shift``
    Each region moved, per channel, by the cohort-mean intensity of that region minus the
    scan's own region mean: internal structure kept, the cohort's mean signal taken.
``mean``
    Every voxel of a region set to the cohort-mean intensity of that region, per channel.
``erase``
    Each region filled with the mean intensity of a one-voxel shell of tissue around it.
``blur`` (default, :data:`DEFAULT_BASELINE`)
    A Gaussian-blurred copy of the scan (σ = :data:`BLUR_SIGMA_VOXELS` voxels of the model grid).

``shift`` and ``mean`` need the cohort's mean intensity per region and channel
(:func:`region_means`, summed over batches). Every public name here is also importable
from :mod:`bodyage.attribution`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from bodyage.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

AblationBaseline = Literal["shift", "mean", "erase", "blur"]

#: baselines of the region-level methods (``--baseline``)
BASELINES: tuple[AblationBaseline, ...] = ("shift", "mean", "erase", "blur")
#: the default baseline, chosen on the development scenario by reports/dev_selection.py
#: (docs/results/dev_selection.json) and reported on ``default``; ``shift`` before that
DEFAULT_BASELINE: AblationBaseline = "blur"
#: baselines built from the cohort's mean intensity per region (``cohort_means``)
COHORT_MEAN_BASELINES: tuple[AblationBaseline, ...] = ("shift", "mean")
#: σ of the ``blur`` baseline, in voxels of the model grid
BLUR_SIGMA_VOXELS = 2.0


# ----------------------------------------------------------------------------- aggregation


def region_sums(
    maps: torch.Tensor, labels: torch.Tensor, n_labels: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-scan, per-label sum, absolute sum and voxel count of attribution maps.

    On the CPU one compiled pass over the voxels (:mod:`bodyage.kernels`, numba), reading
    the map and the labels in their own dtypes, a large map cut into runs summed on
    ``torch.get_num_threads()`` threads; on a GPU ``index_add_`` on the flattened
    ``scan × label`` index, on the device of ``maps``. Accumulation in float64.

    Parameters
    ----------
    maps
        ``(B, *spatial)`` attribution (float).
    labels
        ``(B, *spatial)`` integer label map, values in ``[0, n_labels)``.
    n_labels
        Number of label ids (largest id + 1; id 0 is background).

    Returns
    -------
    tuple of torch.Tensor
        ``sum``, ``abs_sum``, ``count``, each ``(B, n_labels)`` float64.

    Raises
    ------
    InputError
        If shapes differ or a label is outside ``[0, n_labels)``.
    """
    import torch

    if maps.shape != labels.shape:
        raise InputError(f"attribution map shape {tuple(maps.shape)} differs from label map {tuple(labels.shape)}")
    b = maps.shape[0]
    if maps.device.type == "cpu" and labels.device.type == "cpu" and not labels.dtype.is_floating_point:
        from bodyage.kernels import region_sums_cpu

        vals = maps.detach().reshape(b, -1)
        if vals.dtype not in (torch.float32, torch.float64):
            vals = vals.float()
        lab_np = np.ascontiguousarray(labels.reshape(b, -1).numpy())
        if lab_np.size:
            lo, hi = int(lab_np.min()), int(lab_np.max())
            if lo < 0 or hi >= n_labels:
                raise InputError(f"label ids must lie in [0, {n_labels}); found {lo}..{hi}")
        out = torch.from_numpy(region_sums_cpu(np.ascontiguousarray(vals.numpy()), lab_np, n_labels))
        return out[0], out[1], out[2]
    return _region_sums_torch(maps, labels, n_labels)


def _region_sums_torch(
    maps: torch.Tensor, labels: torch.Tensor, n_labels: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`region_sums` with ``index_add_`` on the device of ``maps`` (the GPU path)."""
    import torch

    b = maps.shape[0]
    lab = labels.reshape(b, -1).to(device=maps.device, dtype=torch.int64)
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= n_labels):
        raise InputError(f"label ids must lie in [0, {n_labels}); found {int(lab.min())}..{int(lab.max())}")
    if b == 1:
        idx = lab.reshape(-1)
    else:
        idx = (lab + torch.arange(b, device=maps.device, dtype=torch.int64)[:, None] * n_labels).reshape(-1)
    vals = maps.reshape(-1).to(torch.float64)
    size = b * n_labels
    total = torch.zeros(size, dtype=torch.float64, device=maps.device).index_add_(0, idx, vals)
    absolute = torch.zeros(size, dtype=torch.float64, device=maps.device).index_add_(0, idx, vals.abs())
    count = torch.bincount(idx, minlength=size).to(torch.float64)
    return total.view(b, n_labels), absolute.view(b, n_labels), count.view(b, n_labels)


def region_measures(
    mass: npt.NDArray[np.float64],
    abs_mass: npt.NDArray[np.float64],
    count: npt.NDArray[np.float64],
    voxel_ml: npt.NDArray[np.float64] | float,
) -> dict[str, npt.NDArray[np.float64]]:
    """The columns of ``attributions.parquet`` from per-region sums (vectorised).

    Parameters
    ----------
    mass, abs_mass, count
        ``(B, R)`` signed sum, absolute sum and voxel count per scan and region (the
        background excluded). For region-level methods ``mass`` is the region's value
        in years and ``abs_mass`` its magnitude.
    voxel_ml
        Volume of one voxel (ml), scalar or ``(B,)``.

    Returns
    -------
    dict
        ``n_voxels``, ``volume_ml``, ``mass``, ``abs_mass`` (the size-weighted total of
        ``|map|``), ``share`` (abs_mass over the sum over the scan's regions), ``density``
        (mass / n_voxels), ``enrichment`` (share / the region's share of the segmented
        body's volume), ``abs_density`` (abs_mass / n_voxels: mean ``|map|`` per voxel, an
        intensive quantity that does not grow with the region's size); every value NaN
        where the region is absent (0 voxels).
    """
    count = np.asarray(count, dtype=float)
    absent = count <= 0
    vml = np.asarray(voxel_ml, dtype=float)
    vml = vml[:, None] if vml.ndim == 1 else vml
    with np.errstate(invalid="ignore", divide="ignore"):
        body_abs = np.where(absent, 0.0, abs_mass).sum(axis=1, keepdims=True)
        body_vox = count.sum(axis=1, keepdims=True)
        share = abs_mass / body_abs
        out = {
            "n_voxels": count.copy(),
            "volume_ml": count * vml,
            "mass": np.asarray(mass, dtype=float).copy(),
            "abs_mass": np.asarray(abs_mass, dtype=float).copy(),
            "share": share,
            "density": mass / count,
            "enrichment": share / (count / body_vox),
            "abs_density": abs_mass / count,
        }
    for v in out.values():
        v[absent] = np.nan
    return out


# ----------------------------------------------------------------------------- baselines


def region_means(images: torch.Tensor, labels: torch.Tensor, n_labels: int) -> torch.Tensor:
    """Mean intensity per label and channel over a batch: ``(n_labels, C)`` sums and counts merged.

    Returns the tensor ``(n_labels, C + 1)``: per-channel sums, then the voxel count, so
    batches can be added up before dividing.
    """
    import torch

    b, c = images.shape[:2]
    lab = labels.reshape(b, -1).to(torch.int64)
    out = torch.zeros(n_labels, c + 1, dtype=torch.float64, device=images.device)
    flat = lab.reshape(-1)
    for ch in range(c):  # channels, not labels
        out[:, ch].index_add_(0, flat, images[:, ch].reshape(-1).to(torch.float64))
    out[:, c] = torch.bincount(flat, minlength=n_labels).to(torch.float64)
    return out


def baseline_images(
    kind: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    cohort_means: torch.Tensor | None = None,
) -> torch.Tensor:
    """The baseline image of each scan for region-level methods (see the module docstring).

    Parameters
    ----------
    kind
        ``shift``, ``mean``, ``erase`` or ``blur``.
    images
        ``(B, C, X, Y, Z)`` model input.
    labels
        ``(B, X, Y, Z)`` label map.
    cohort_means
        ``(n_labels, C)`` mean intensity per label and channel (``shift`` and ``mean``).

    Raises
    ------
    InputError
        For an unknown baseline, or ``shift``/``mean`` without cohort means.
    """
    import torch

    if kind in COHORT_MEAN_BASELINES:
        if cohort_means is None:
            raise InputError(f"the {kind!r} baseline needs the cohort means per region")
        if kind == "shift":
            return _shift_baseline(images, labels, cohort_means)
        lab = labels.to(torch.int64).clamp(max=cohort_means.shape[0] - 1)
        return cohort_means.to(images.dtype)[lab].permute(0, 4, 1, 2, 3).contiguous()
    if kind == "blur":
        from scipy import ndimage

        arr = images.detach().cpu().numpy()
        sig = (0.0, 0.0, BLUR_SIGMA_VOXELS, BLUR_SIGMA_VOXELS, BLUR_SIGMA_VOXELS)
        return torch.from_numpy(ndimage.gaussian_filter(arr, sig, mode="nearest")).to(images)
    if kind == "erase":
        return _erase_baseline(images, labels)
    raise InputError(f"--baseline must be one of {', '.join(BASELINES)}; {kind!r} was provided")


def _shift_baseline(images: torch.Tensor, labels: torch.Tensor, cohort_means: torch.Tensor) -> torch.Tensor:
    """Each region moved by (cohort mean − the scan's own region mean), per channel; texture kept."""
    import torch

    b, c = images.shape[:2]
    n = cohort_means.shape[0]
    lab = labels.to(torch.int64).clamp(max=n - 1)
    per_scan = lab + n * torch.arange(b, device=lab.device).view(b, *([1] * (lab.dim() - 1)))  # scan × label ids
    acc = region_means(images, per_scan, b * n)
    own = acc[:, :c] / acc[:, c:].clamp(min=1)
    delta = (cohort_means.to(torch.float64).repeat(b, 1) - own).to(images.dtype)  # (b·n, C)
    return images + delta[per_scan].movedim(-1, 1)


def _erase_baseline(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each region filled with the mean of a one-voxel shell of tissue around it, per channel."""
    import torch
    from scipy import ndimage

    arr = images.detach().cpu().numpy()
    lab = labels.detach().cpu().numpy()
    out = arr.copy()
    struct = ndimage.generate_binary_structure(3, 1)
    for i in range(arr.shape[0]):
        for k in np.unique(lab[i]):  # building an ablation baseline, not aggregating
            region = lab[i] == k
            shell = ndimage.binary_dilation(region, struct) & ~region
            if not shell.any():
                continue
            fill = arr[i][:, shell].mean(axis=1)
            out[i][:, region] = fill[:, None]
    return torch.from_numpy(out).to(images)
