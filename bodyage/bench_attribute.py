"""Side-by-side benchmarks of the attribution step, run in one process (``bodyage bench``).

:func:`bench_aggregation`
    Region aggregation of one UK-Biobank-sized map (224×174×370 voxels, 53 labels):
    :func:`bodyage.attribution.region_sums` (one compiled pass on the CPU, split over
    torch's threads: sums, absolute sums and counts) against the naive loop
    ``[a[m == k].sum() for k in labels]`` (sums only).
:func:`bench_gradcam`
    GradCAM throughput (scans/s) of :func:`bodyage.attribution.gradcam_maps` (captum's
    ``LayerGradCam``, which stops the backward pass at the layer, plus a trilinear
    upsampling on the device) against the ``grad-cam`` package's ``GradCAM`` (a full
    backward pass to the input, maps moved to NumPy and upsampled with a scipy zoom),
    same model, same batch, maps on the input grid.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

UKB_SHAPE: tuple[int, int, int] = (224, 174, 370)
UKB_LABELS = 53


@dataclass(frozen=True)
class RatioBench:
    """Seconds per call of ours and of the reference, and the ratio (reference / ours)."""

    name: str
    ours_s: float
    reference_s: float
    ratio: float
    detail: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _best(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_aggregation(
    shape: tuple[int, int, int] = UKB_SHAPE, n_labels: int = UKB_LABELS, repeats: int = 3, seed: int = 0
) -> RatioBench:
    """Time region aggregation of one map against the naive per-label loop (best of ``repeats``)."""
    import torch

    from bodyage.attribution import region_sums

    rng = np.random.default_rng(seed)
    # labels in blocks like organs (not salt and pepper), background around them
    coarse = rng.integers(0, n_labels + 1, size=tuple(-(-s // 8) for s in shape), dtype=np.uint8)
    m = np.ascontiguousarray(np.kron(coarse, np.ones((8, 8, 8), dtype=np.uint8))[: shape[0], : shape[1], : shape[2]])
    a = rng.standard_normal(shape, dtype=np.float32)
    labels = list(range(1, n_labels + 1))
    # both read the same uint8 label map (as TotalSegmentator writes it and the cache keeps it)
    at, mt = torch.from_numpy(a)[None], torch.from_numpy(m)[None]
    at1, mt1 = at[0], torch.from_numpy(m)

    def ours() -> object:
        return region_sums(at, mt, n_labels + 1)

    def naive() -> object:
        return [a[m == k].sum() for k in labels]

    def naive_torch() -> object:
        return [at1[mt1 == k].sum() for k in labels]

    ours()
    t_ours = _best(ours, repeats)
    t_naive = _best(naive, repeats)
    t_naive_torch = _best(naive_torch, max(1, repeats - 1))
    return RatioBench(
        "region aggregation",
        t_ours,
        t_naive,
        t_naive / t_ours,
        {
            "shape": list(shape),
            "labels": n_labels,
            "torch_threads": torch.get_num_threads(),
            "ours_outputs": "sum, absolute sum and voxel count (float64)",
            "reference": "[a[m == k].sum() for k in labels] on NumPy arrays (sums only)",
            "naive_torch_s": t_naive_torch,
            "ratio_vs_naive_torch": t_naive_torch / t_ours,
        },
    )


class _Output:
    """grad-cam target for a scalar regressor: the output itself."""

    def __call__(self, model_output: Any) -> Any:
        return model_output


def bench_gradcam(
    grid: tuple[int, int, int] = (32, 24, 64),
    batch: int = 8,
    layer: str = "block1",
    repeats: int = 3,
    model_name: str = "sfcn",
    seed: int = 0,
) -> RatioBench:
    """GradCAM scans/s of ours against the ``grad-cam`` package (same model, batch, layer, output grid).

    Raises
    ------
    InputError
        If the ``grad-cam`` package is not installed (``pip install grad-cam``).
    """
    import torch

    from bodyage.attribution import gradcam_maps
    from bodyage.errors import InputError
    from bodyage.models import build_model, get_layer

    try:
        from pytorch_grad_cam import GradCAM
    except ImportError as err:
        raise InputError("the GradCAM benchmark needs the grad-cam package: pip install grad-cam") from err

    torch.manual_seed(seed)
    model = build_model(model_name, 2).eval()
    target = get_layer(model, layer)
    x = torch.rand(batch, 2, *grid)

    def ours() -> object:
        return gradcam_maps(model, x, target)

    cam = GradCAM(model=model, target_layers=[target])
    targets = [_Output() for _ in range(batch)]

    def reference() -> object:
        return cam(input_tensor=x, targets=targets)

    ours()
    reference()
    t_ours = _best(ours, repeats)
    t_ref = _best(reference, repeats)
    return RatioBench(
        "gradcam throughput",
        t_ours,
        t_ref,
        t_ref / t_ours,
        {
            "grid": list(grid),
            "batch": batch,
            "layer": layer,
            "model": model_name,
            "ours_scans_per_s": batch / t_ours,
            "reference_scans_per_s": batch / t_ref,
        },
    )


def bench_attribute(repeats: int = 3) -> dict[str, dict[str, Any]]:
    """Both benchmarks, as ``bodyage bench`` reports them."""
    return {
        "aggregation": bench_aggregation(repeats=repeats).to_dict(),
        "gradcam": bench_gradcam(repeats=repeats).to_dict(),
    }
