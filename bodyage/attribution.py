"""Attribution methods (one registry) and their aggregation over labelled regions.

Every method explains the scalar output of an age regressor (standardised age) for a
batch of scans and returns values in **years** (the output scaled by the fold's age SD):

``gradcam``
    :class:`captum.attr.LayerGradCam` on one stage of the model (``--layer``), target
    ``None`` for the scalar output, **signed**: no ReLU, because for a regressor negative
    evidence pulls the predicted age down and matters as much as positive evidence. The
    layer map is upsampled to the model grid with
    :meth:`captum.attr.LayerAttribution.interpolate` (trilinear).
``integrated_gradients``
    :class:`captum.attr.IntegratedGradients` from an all-zero baseline (an empty field of
    view: air in every channel), summed over channels; by completeness the map sums to
    f(x) − f(air) in years.
``ablation``
    :class:`captum.attr.FeatureAblation` with the scan's label map as ``feature_mask``: the
    value of a region is f(x) − f(x with the region replaced by a baseline), in years ("the
    liver adds 1.8 years to this prediction"). Baselines (:data:`BASELINES`):

    ``shift`` (*mean-signal ablation*; the default before the development-scenario choice)
        The region's intensities are moved, per channel, by the cohort-mean intensity of
        that region minus the scan's own region mean: the region keeps its internal
        structure (partial-volume edges, texture) and takes the cohort's mean signal.
        Removes what the region's *mean signal* says about this scan (its fat fraction or
        water signal against the cohort's) and nothing else, so the image stays as close
        to a real scan as an intensity ablation can. It was the default, chosen on the default
        synthetic study (docs/history.md, "Attribution"), the scenario its precision was then
        reported on; the choice made on the development scenario replaced it. It cannot remove
        what a region's **size or shape** says: the mask stays, so the model still sees where the boundary is
        (a volume effect shows up only through the partial-volume voxels at the edge).
    ``mean``
        Every voxel of the region takes the cohort-mean intensity of that region, per
        channel: the region's mean signal *and* its internal structure go. A big
        heterogeneous region (skeletal muscle, subcutaneous fat) flattened to one value
        moves the prediction whatever its ageing, which inflates its ``|mass|``. Like
        ``shift``, it cannot remove information carried by the region's size or shape.
    ``erase``
        The region is filled with the mean intensity of the tissue around it (a one-voxel
        shell outside the region), per channel: the region disappears, which also removes
        size and shape. Erasing a large region (torso fat, subcutaneous fat) makes an
        image unlike any training image, so its value mixes the region's information with
        the model's reaction to an out-of-distribution input.
    ``blur`` (default, :data:`DEFAULT_BASELINE`)
        The region is replaced by a Gaussian-blurred copy of the scan (σ = 2 voxels of the
        model grid): fine texture, small structures and sharp edges go, coarse intensity
        stays. Least out of distribution, but keeps most of what a big region's mean
        intensity says. The default because ``reports/dev_selection.py`` chose it on the
        development scenario (``--scenario dev``: the best precision@k of the four baselines;
        docs/results/dev_selection.json); its precision is reported on ``default``, which it
        was not chosen on. A question about a region's mean signal (fat fraction) is asked
        with ``--baseline shift``.
``shapley``
    :class:`captum.attr.ShapleyValueSampling` over the same regions and baselines, with a
    sampling budget (``samples`` permutations). Region values of a scan (background
    included) sum to f(x) − f(every region at its baseline): checked and recorded.

Region aggregation (:func:`region_sums`, :func:`region_measures`) and the baseline
images (:func:`baseline_images`) live in :mod:`bodyage.region_ops`, the operations on
label maps, and are importable from here too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from bodyage._typing import AttributionMethod, ImportanceMeasure
from bodyage.errors import InputError
from bodyage.region_ops import BASELINES as BASELINES
from bodyage.region_ops import BLUR_SIGMA_VOXELS as BLUR_SIGMA_VOXELS
from bodyage.region_ops import COHORT_MEAN_BASELINES as COHORT_MEAN_BASELINES
from bodyage.region_ops import DEFAULT_BASELINE as DEFAULT_BASELINE
from bodyage.region_ops import AblationBaseline as AblationBaseline
from bodyage.region_ops import _region_sums_torch as _region_sums_torch
from bodyage.region_ops import baseline_images as baseline_images
from bodyage.region_ops import region_means as region_means
from bodyage.region_ops import region_measures as region_measures
from bodyage.region_ops import region_sums as region_sums

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

MethodLevel = Literal["voxel", "region"]
#: integration steps of integrated gradients
IG_STEPS = 32
#: perturbed copies of a batch evaluated in one forward pass (ablation, Shapley)
PERTURBATIONS_PER_EVAL = 8


@dataclass(frozen=True)
class MethodSpec:
    """A registered attribution method.

    Attributes
    ----------
    name
        The ``--method`` choice.
    level
        ``voxel`` (a map over the grid) or ``region`` (one value per region).
    importance_measure
        Column of ``attributions.parquet`` ranking regions by importance (docs/design.md §6);
        ``abs_mass`` (mean of ``|mass|``) for region-level methods.
    default
        Run when no ``--method`` is given.
    description
        One line for ``--help`` and the docs.
    """

    name: AttributionMethod
    level: MethodLevel
    importance_measure: ImportanceMeasure
    default: bool
    description: str


#: the registry: ``--method`` choices, their level and how their regions are ranked.
#: Voxel methods rank regions by the mean over scans of ``|mass|`` (the absolute value of
#: the region's signed sum), chosen on the default study (docs/history.md, "Attribution"): at the
#: default layer it found 5 of the 8 planted regions against 3 by ``share`` (which sums
#: |map| and so rewards big regions whose signs cancel), 4 by ``density`` and 3 by
#: ``enrichment`` (both dominated by small regions catching their neighbours' values).
METHODS: dict[str, MethodSpec] = {
    "gradcam": MethodSpec("gradcam", "voxel", "abs_mass", True, "signed LayerGradCam on --layer, trilinear upsampling"),
    "integrated_gradients": MethodSpec(
        "integrated_gradients", "voxel", "abs_mass", False, "integrated gradients from an all-air baseline"
    ),
    "ablation": MethodSpec(
        "ablation", "region", "abs_mass", True, "change in predicted age when a region is set to --baseline"
    ),
    "shapley": MethodSpec("shapley", "region", "abs_mass", False, "Shapley value sampling over regions, --samples"),
}
DEFAULT_METHODS: tuple[str, ...] = tuple(m for m, s in METHODS.items() if s.default)


def check_methods(methods: Sequence[str] | None) -> list[str]:
    """Validate ``--method`` values (default: :data:`DEFAULT_METHODS`); keep order, drop repeats.

    Raises
    ------
    InputError
        Naming an unknown method and the choices.
    """
    chosen = list(dict.fromkeys(methods or DEFAULT_METHODS))
    for m in chosen:
        if m not in METHODS:
            raise InputError(f"--method must be one of {', '.join(METHODS)}; {m!r} was provided")
    return chosen


# ----------------------------------------------------------------------------- methods


@dataclass
class BatchAttribution:
    """What one method returned for a batch.

    Attributes
    ----------
    maps
        ``(B, X, Y, Z)`` voxel maps in years (voxel methods), else ``None``.
    region_values
        ``(B, n_labels)`` region values in years (region methods; NaN where absent), else ``None``.
    check
        Method-specific checks, e.g. Shapley's efficiency error per scan (years).
    """

    maps: torch.Tensor | None
    region_values: npt.NDArray[np.float64] | None
    check: dict[str, npt.NDArray[np.float64]]


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model on ``x``; channels-last on CPU, where 3D convolutions run about 1.5x faster."""
    import torch

    if x.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return model(x)


def gradcam_maps(model: nn.Module, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Signed GradCAM of a scalar regressor upsampled to the input grid, ``(B, X, Y, Z)``.

    GradCAM = Σ_c mean_xyz(∂y/∂A_c) · A_c on the layer output A (captum's
    ``LayerGradCam`` with ``relu_attributions=False``), then trilinear upsampling. The
    ReLU of the original GradCAM is left out: for a regressor, negative evidence (a region
    that makes the scan look younger) is as much an explanation as positive. Weight
    gradients are switched off for the call (and restored), and the input is made
    channels-last on CPU: only the gradient w.r.t. the layer is needed.
    """
    import torch
    from captum.attr import LayerAttribution, LayerGradCam

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:  # gradients w.r.t. the layer only: no weight gradients
            p.requires_grad_(False)
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        cam = LayerGradCam(model, layer).attribute(x, target=None, relu_attributions=False)
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    up = LayerAttribution.interpolate(cam, tuple(x.shape[2:]), "trilinear")
    return up[:, 0].detach().contiguous()


def attribute_batch(
    method: str,
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_labels: int,
    age_sd: float,
    layer: nn.Module | None = None,
    baseline: str = DEFAULT_BASELINE,
    cohort_means: torch.Tensor | None = None,
    samples: int = 25,
    ig_steps: int = IG_STEPS,
) -> BatchAttribution:
    """Explain a batch of scans with one method; values in years.

    Parameters
    ----------
    method
        A key of :data:`METHODS`.
    model
        The fold model, in ``eval()`` mode (checked: in train mode BatchNorm would make
        each scan's explanation depend on the rest of the batch).
    x
        ``(B, C, X, Y, Z)`` model input (float32, on the model's device).
    labels
        ``(B, X, Y, Z)`` integer label map on the model grid.
    n_labels
        Largest label id + 1.
    age_sd
        The fold's age SD: the model's output unit in years.
    layer
        The GradCAM layer (``gradcam`` only).
    baseline
        ``mean``, ``erase`` or ``blur`` (region methods).
    cohort_means
        ``(n_labels, C)`` cohort mean intensity per region (``shift`` and ``mean`` baselines).
    samples
        Permutations of Shapley value sampling.
    ig_steps
        Integration steps of integrated gradients.

    Raises
    ------
    InputError
        Unknown method, a model in training mode, or a missing layer.
    """
    import torch

    if method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}; {method!r} was provided")
    if model.training:
        raise InputError("attribution needs the model in eval() mode (BatchNorm statistics would mix the batch)")
    scale = float(age_sd)
    if method == "gradcam":
        if layer is None:
            raise InputError("gradcam needs a layer")
        return BatchAttribution(gradcam_maps(model, x, layer) * scale, None, {})
    if method == "integrated_gradients":
        from captum.attr import IntegratedGradients

        ig = IntegratedGradients(model).attribute(
            x, baselines=torch.zeros_like(x), target=None, n_steps=ig_steps, internal_batch_size=max(1, len(x)) * 4
        )
        return BatchAttribution(ig.sum(dim=1).detach() * scale, None, {})

    from captum.attr import FeatureAblation, ShapleyValueSampling

    base = baseline_images(baseline, x, labels, cohort_means)
    forward = partial(_forward, model)
    # contiguous feature ids over the batch: captum evaluates every id up to the maximum
    _, inverse = torch.unique(labels, return_inverse=True)
    mask = inverse.unsqueeze(1).to(x.device)  # (B, 1, X, Y, Z), broadcast over channels
    with torch.no_grad():
        if method == "ablation":
            attr = FeatureAblation(forward).attribute(
                x, baselines=base, target=None, feature_mask=mask, perturbations_per_eval=PERTURBATIONS_PER_EVAL
            )
        else:
            attr = ShapleyValueSampling(forward).attribute(
                x,
                baselines=base,
                target=None,
                feature_mask=mask,
                n_samples=samples,
                perturbations_per_eval=PERTURBATIONS_PER_EVAL,
            )
    values_sum, _, count = region_sums(attr[:, 0], labels, n_labels)
    with np.errstate(invalid="ignore"):
        values = (values_sum / count).cpu().numpy() * scale
    check: dict[str, npt.NDArray[np.float64]] = {}
    if method == "shapley":
        with torch.no_grad():
            full = forward(x).double().cpu().numpy()
            all_base = forward(base).double().cpu().numpy()
        total = np.nansum(values, axis=1)
        check["efficiency_error"] = total - (full - all_base) * scale
    return BatchAttribution(None, values, check)


def group_ablation(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    groups: Sequence[Sequence[int]],
    *,
    age_sd: float,
    baseline: str = DEFAULT_BASELINE,
    cohort_means: torch.Tensor | None = None,
) -> npt.NDArray[np.float64]:
    """Joint ablation of region groups: f(x) − f(x with every member at its baseline), years.

    All member regions of a group are replaced by the baseline at once, so a redundant
    pair (the model reads either side: f = max(left, right)) gets the effect that single
    ablations, each leaving the other side in place, miss. Baselines as
    :func:`attribute_batch`'s.

    Parameters
    ----------
    model
        The fold model, in ``eval()`` mode.
    x
        ``(B, C, X, Y, Z)`` model input.
    labels
        ``(B, X, Y, Z)`` integer label map.
    groups
        Per group the label ids of its members.
    age_sd
        The fold's age SD (the output unit in years).
    baseline, cohort_means
        As for ``ablation``.

    Returns
    -------
    numpy.ndarray
        ``(B, G)``; NaN where no member of the group is in the scan.

    Raises
    ------
    InputError
        A model in training mode, or a baseline error.
    """
    import torch

    if model.training:
        raise InputError("attribution needs the model in eval() mode (BatchNorm statistics would mix the batch)")
    b = x.shape[0]
    out = np.full((b, len(groups)), np.nan)
    if not len(groups):
        return out
    base = baseline_images(baseline, x, labels, cohort_means)
    with torch.no_grad():
        full = _forward(model, x).double().reshape(b).cpu().numpy()
        for start in range(0, len(groups), PERTURBATIONS_PER_EVAL):
            chunk = list(range(start, min(start + PERTURBATIONS_PER_EVAL, len(groups))))
            masks = [torch.isin(labels, torch.as_tensor(list(groups[g]), device=labels.device)) for g in chunk]
            xs = torch.cat([torch.where(mk[:, None], base, x) for mk in masks])
            ablated = _forward(model, xs).double().reshape(len(chunk), b).cpu().numpy()
            for i, g in enumerate(chunk):
                present = masks[i].reshape(b, -1).any(dim=1).cpu().numpy()
                out[:, g] = np.where(present, (full - ablated[i]) * float(age_sd), np.nan)
    return out


def scan_values(result: BatchAttribution, labels: torch.Tensor, n_labels: int) -> dict[str, Any]:
    """Per-region sums of a batch result: ``mass``, ``abs_mass``, ``count`` as ``(B, n_labels)`` arrays."""
    if result.maps is not None:
        s, a, c = region_sums(result.maps, labels, n_labels)
        return {"mass": s.cpu().numpy(), "abs_mass": a.cpu().numpy(), "count": c.cpu().numpy()}
    import torch

    b = labels.shape[0]
    count = torch.bincount(
        (labels.reshape(b, -1).to(torch.int64) + torch.arange(b, device=labels.device)[:, None] * n_labels).reshape(-1),
        minlength=b * n_labels,
    )
    vals = np.asarray(result.region_values, dtype=float)
    return {"mass": vals, "abs_mass": np.abs(vals), "count": count.view(b, n_labels).cpu().numpy().astype(float)}


def ranking_values(
    values: Mapping[str, Any], label_ids: npt.NDArray[np.int64], measure: str
) -> npt.NDArray[np.float64]:
    """Per scan and region the value a ranking measure averages over scans, ``(B, R)``.

    ``abs_mass`` ranks by ``|mass|`` (the magnitude of the signed sum), ``density`` by
    ``|density|`` (a strongly negative region matters as much as a positive one); the
    other measures are the column of :func:`region_measures` itself. NaN where absent.

    Parameters
    ----------
    values
        :func:`scan_values` of a batch (``mass``, ``abs_mass``, ``count``, ``(B, n_labels)``).
    label_ids
        The label ids of the regions (columns), background excluded.
    measure
        A column of ``attributions.parquet`` used for ranking.
    """
    cols = region_measures(
        np.asarray(values["mass"])[:, label_ids],
        np.asarray(values["abs_mass"])[:, label_ids],
        np.asarray(values["count"])[:, label_ids],
        1.0,
    )
    if measure == "abs_mass":
        return np.abs(cols["mass"])
    if measure == "density":
        return np.abs(cols["density"])
    if measure not in cols:
        raise InputError(f"unknown importance measure {measure!r}; choose one of {', '.join(cols)}")
    return cols[measure]


def slice_mass(maps: torch.Tensor) -> npt.NDArray[np.float64]:
    """Attribution mass per axial slice (last axis), ``(B, Z)``."""
    return maps.double().sum(dim=(1, 2)).cpu().numpy()


def label_lookup(names: Mapping[int, str]) -> tuple[npt.NDArray[np.int64], list[str], int]:
    """Label ids (sorted), their names and ``n_labels`` (largest id + 1)."""
    ids = np.array(sorted(names), dtype=np.int64)
    return ids, [names[int(i)] for i in ids], int(ids.max()) + 1 if len(ids) else 1
