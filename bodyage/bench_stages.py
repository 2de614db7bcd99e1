"""The stages of ``bodyage bench``, each on synthetic data sized by :class:`BenchSizes`.

:func:`bench_region_aggregation`, :func:`bench_gradcam` and :func:`bench_loader` each
return their seconds and their :class:`~bodyage.bench_timing.Comparison` records; what
each one compares is described in :mod:`bodyage.bench`, which runs them and projects
their throughputs to a cohort.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from bodyage.bench_attribute import UKB_LABELS, UKB_SHAPE
from bodyage.bench_timing import comparison, interleaved, sync
from bodyage.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class BenchSizes:
    """How big each stage's synthetic data is (full run or ``--quick``)."""

    aggregation_shape: tuple[int, int, int]
    labels: int
    image_shape: tuple[int, int, int]
    loader_scans: int
    batch: int
    repeats: int
    train_steps: int
    shapley_samples_timed: int
    export_rows: int
    export_columns: int

    @classmethod
    def full(cls) -> BenchSizes:
        """UK Biobank sizes."""
        return cls(UKB_SHAPE, UKB_LABELS, UKB_SHAPE, 4, 8, 3, 8, 2, 500_000, 2_000)

    @classmethod
    def quick(cls) -> BenchSizes:
        """A reduced run (seconds): small grids, two scans, two rounds, a small export."""
        return cls((48, 36, 80), 12, (40, 32, 64), 2, 2, 2, 2, 1, 2_000, 100)


# ----------------------------------------------------------------------------- synthetic data


def block_labels(shape: tuple[int, int, int], n_labels: int, block: int = 8, seed: int = 0) -> npt.NDArray[np.uint8]:
    """A label map of organ-like blocks (``block`` voxels a side), ids ``0..n_labels`` (0: background)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, n_labels + 1, size=tuple(-(-s // block) for s in shape), dtype=np.uint8)
    full = np.kron(coarse, np.ones((block,) * 3, dtype=np.uint8))
    return np.ascontiguousarray(full[: shape[0], : shape[1], : shape[2]])


def _phantom(shape: tuple[int, int, int], rng: np.random.Generator) -> npt.NDArray[np.int16]:
    """A smooth body-like int16 volume with noise (compresses like an MR scan, not like white noise)."""
    lab = block_labels(shape, 30, block=12, seed=int(rng.integers(1 << 30))).astype(np.float32)
    zz = np.linspace(-1, 1, shape[0])[:, None, None] ** 2 + np.linspace(-1, 1, shape[1])[None, :, None] ** 2
    body = (zz < 0.8).astype(np.float32) * np.ones(shape, np.float32)
    img = body * (200 + 20 * lab) + rng.normal(0, 15, shape).astype(np.float32)
    return np.clip(img, 0, 4000).astype(np.int16)


# ----------------------------------------------------------------------------- stages


def bench_region_aggregation(sizes: BenchSizes, device: torch.device) -> dict[str, Any]:
    """Ours vs the naive loop, TotalSegmentator's statistics and a plain sum (one map)."""
    import nibabel as nib
    import torch

    from bodyage.attribution import region_sums

    try:
        from totalsegmentator.statistics import get_basic_statistics
    except ImportError:  # the minimal install (no `segment` extra): that comparison reads NaN
        get_basic_statistics = None

    shape, n = sizes.aggregation_shape, sizes.labels
    m = block_labels(shape, n)
    a = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    labels = list(range(1, n + 1))
    at = torch.from_numpy(a)[None].to(device)
    mt = torch.from_numpy(m)[None].to(device)  # the uint8 map the naive loop reads too
    affine = np.diag([2.23, 2.23, 3.0, 1.0])

    def ours() -> object:
        return region_sums(at, mt, n + 1)

    def naive() -> object:
        return [a[m == k].sum() for k in labels]

    def totalseg() -> object:
        # a fresh image each call: nibabel caches get_fdata() on the image object
        img = nib.Nifti1Image(a, affine)
        return get_basic_statistics(m, img, quiet=True, task="total_mr", exclude_masks_at_border=False)

    def plain_sum() -> object:
        return at.sum()

    flat_a, flat_m = at.reshape(-1), mt.reshape(-1).long()

    def scatter() -> object:
        # the cheapest scattered pass: one float32 scatter_add_ of the sums alone
        return torch.zeros(n + 1, device=device).scatter_add_(0, flat_m, flat_a)

    t = interleaved(
        {
            "ours": ours,
            "naive": naive,
            **({"totalsegmentator": totalseg} if get_basic_statistics is not None else {}),
            "sum": plain_sum,
            "scatter_f32": scatter,
        },
        sizes.repeats,
        device,
    )
    common: dict[str, Any] = {
        "shape": list(shape),
        "labels": n,
        "device": str(device),
        "rounds": sizes.repeats,
        "one_scatter_f32_s": t["scatter_f32"],
    }
    comps = [
        comparison(
            "region_aggregation_vs_naive",
            "region_aggregation",
            "region_sums (sum, |sum|, count per label; one compiled pass on the CPU split over torch's "
            "threads, index_add_ on a GPU)",
            "[a[m == k].sum() for k in labels] (NumPy, sums only)",
            t["ours"],
            t["naive"],
            "speedup",
            (">=", 50.0),
            f"the naive loop over a uint8 label map is itself vectorised ({n} passes of "
            f"{t['naive'] / n * 1e3:.3g} ms); 50× would need ours in {t['naive'] / 50 * 1e3:.3g} ms, while one "
            f"float32 scatter_add_ of the sums alone takes {t['scatter_f32'] * 1e3:.3g} ms; region_sums reads each "
            "voxel once but makes three float64 read-modify-writes into a per-label table per voxel",
            **common,
        ),
        comparison(
            "region_aggregation_vs_totalsegmentator",
            "region_aggregation",
            "region_sums",
            "totalsegmentator.statistics.get_basic_statistics (volume and mean intensity per organ of the "
            f"map cast to int16, its total_mr class map: {min(n, 50)} labels)"
            + ("" if get_basic_statistics is not None else "; not installed: pip install 'bodyage[segment]'"),
            t["ours"],
            t.get("totalsegmentator", float("nan")),
            "speedup",
            **common,
        ),
        comparison(
            "region_aggregation_vs_plain_sum",
            "region_aggregation",
            "region_sums",
            "one plain sum over the map (memory-bandwidth floor)",
            t["ours"],
            t["sum"],
            "cost",
            ("<=", 4.0),
            f"a scattered add does not stream like a reduction: one float32 scatter_add_ of the sums alone "
            f"costs {t['scatter_f32'] / t['sum']:.3g}× the plain sum here; region_sums reads 5 bytes per voxel "
            "(against the sum's 4) but updates three float64 accumulators per voxel, which a vectorised sum never does",
            **common,
        ),
    ]
    return {"seconds": t, "comparisons": comps}


def _attribution_inputs(
    grid: tuple[int, int, int], batch: int, n_labels: int, device: torch.device
) -> tuple[Any, Any, Any]:
    import torch

    from bodyage.models import build_model
    from bodyage.train_config import TrainConfig

    cfg = TrainConfig()
    torch.manual_seed(0)
    model = build_model(cfg.model, len(cfg.channels), **cfg.model_kwargs).to(device).eval()
    x = torch.rand(batch, len(cfg.channels), *grid, device=device)
    lab = torch.from_numpy(block_labels(grid, n_labels, block=2).astype(np.int64))
    labels = lab[None].expand(batch, *grid).contiguous().to(device)
    return model, x, labels


class _Output:
    """grad-cam target for a scalar regressor: the output itself."""

    def __call__(self, model_output: Any) -> Any:
        return model_output


def bench_gradcam(sizes: BenchSizes, device: torch.device, grid: tuple[int, int, int]) -> dict[str, Any]:
    """GradCAM vs the ``grad-cam`` package and vs one forward pass; each method's seconds per scan.

    Raises
    ------
    InputError
        If the ``grad-cam`` package is not installed.
    """
    import torch

    from bodyage.attribute import AttributeConfig
    from bodyage.attribution import DEFAULT_METHODS, IG_STEPS, METHODS, attribute_batch, gradcam_maps, region_means
    from bodyage.models import get_layer, get_model_spec
    from bodyage.train_config import TrainConfig

    try:
        from pytorch_grad_cam import GradCAM
    except ImportError as err:
        raise InputError("the GradCAM benchmark needs the grad-cam package: pip install grad-cam") from err

    cfg = TrainConfig()
    layer_name = get_model_spec(cfg.model).default_layer
    n_labels = sizes.labels + 1
    model, x, labels = _attribution_inputs(grid, sizes.batch, sizes.labels, device)
    layer = get_layer(model, layer_name)
    cam = GradCAM(model=model, target_layers=[layer])
    targets = [_Output() for _ in range(sizes.batch)]

    def ours() -> object:
        return gradcam_maps(model, x, layer)

    def reference() -> object:
        return cam(input_tensor=x, targets=targets)

    def forward() -> object:
        with torch.no_grad():
            return model(x)

    t = interleaved({"ours": ours, "grad_cam": reference, "forward": forward}, max(3, sizes.repeats), device)
    b = sizes.batch
    common: dict[str, Any] = {
        "grid": list(grid),
        "batch": b,
        "layer": layer_name,
        "model": cfg.model,
        "device": str(device),
        "ours_scans_per_s": b / t["ours"],
        "reference_scans_per_s": b / t["grad_cam"],
    }
    comps = [
        comparison(
            "gradcam_vs_grad_cam",
            "gradcam",
            "gradcam_maps (captum LayerGradCam, backward stops at the layer, trilinear upsampling on the device)",
            "pytorch_grad_cam.GradCAM (full backward to the input, maps upsampled in NumPy)",
            t["ours"],
            t["grad_cam"],
            "speedup",
            (">=", 5.0),
            f"at the default layer ({layer_name}, full resolution) both spend their time in the same "
            f"forward and backward passes (ours costs {t['ours'] / t['forward']:.1f} forward passes); stopping "
            "the backward at the layer saves only the first convolution's input gradient, and grad-cam's "
            "NumPy upsampling is small at the model grid",
            **common,
        ),
        comparison(
            "gradcam_vs_forward",
            "gradcam",
            "one GradCAM attribution (forward + backward to the layer + upsampling)",
            "one forward pass (no gradient)",
            t["ours"],
            t["forward"],
            "cost",
            **common,
        ),
    ]
    # the other methods, once each (their cost is a multiple of forward passes)
    baseline = AttributeConfig().baseline
    acc = region_means(x.cpu(), labels.cpu(), n_labels)
    cohort_means = (acc[:, :-1] / acc[:, -1:].clamp(min=1)).float().to(device)
    per_scan: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        kwargs: dict[str, Any] = {}
        scale = 1.0
        note = ""
        if method == "shapley":
            kwargs["samples"] = sizes.shapley_samples_timed
            scale = 25 / sizes.shapley_samples_timed
            note = f"timed with {sizes.shapley_samples_timed} permutation(s), scaled to the default 25 (linear)"
        elif method == "integrated_gradients":
            note = f"{IG_STEPS} steps"
        elif method == "ablation":
            note = f"{sizes.labels} regions + background, {baseline!r} baseline"
        if method == "gradcam":
            secs = t["ours"]
        else:
            sync(device)
            t0 = time.perf_counter()
            attribute_batch(
                method,
                model,
                x,
                labels,
                n_labels=n_labels,
                age_sd=1.0,
                layer=layer,
                baseline=baseline,
                cohort_means=cohort_means,
                **kwargs,
            )
            sync(device)
            secs = (time.perf_counter() - t0) * scale
        per_scan[method] = {
            "seconds_per_scan": secs / b,
            "forward_passes": secs / t["forward"],
            "default": method in DEFAULT_METHODS,
            "note": note,
        }
    return {
        "seconds": t,
        "comparisons": comps,
        "methods": per_scan,
        "forward_s_per_scan": t["forward"] / b,
    }


def _write_study(root: Path, sizes: BenchSizes) -> None:
    import pandas as pd

    from bodyage.volumes import save_volume

    rng = np.random.default_rng(0)
    shape = sizes.image_shape
    affine = np.diag([2.23, 2.23, 3.0, 1.0])
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(sizes.loader_scans):
        sid = f"{1_000_000 + i}"
        paths = {}
        for channel in ("water", "fat"):
            rel = f"images/{sid}_0_{channel}.nii.gz"
            save_volume(root / rel, _phantom(shape, rng), affine)
            paths[channel] = rel
        rows.append({"subject_id": sid, "visit": 0, "age": 50.0 + i, "sex": "F", "site": "a", **paths})
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)


def bench_loader(
    sizes: BenchSizes, device: torch.device, grid: tuple[int, int, int] | None, workdir: Path
) -> dict[str, Any]:
    """Preprocessing, cached vs ``.nii.gz`` reads, and a training step fed from the cache vs from memory."""
    import nibabel as nib
    import torch
    from torch import nn

    from bodyage.models import build_model
    from bodyage.preprocess import PreprocessSettings, auto_grid, build_cache
    from bodyage.study import load_study
    from bodyage.train_config import TrainConfig, autocast_dtype, dtype_name
    from bodyage.train_data import ScanTensors, augment_batch

    study_dir = workdir / "study"
    _write_study(study_dir, sizes)
    study = load_study(study_dir)
    grid = grid or auto_grid(sizes.image_shape)
    cfg = TrainConfig(grid=grid)
    settings = PreprocessSettings(grid=grid, channels=cfg.channels)
    t0 = time.perf_counter()
    cache = build_cache(study, settings, cache_root=workdir / "cache")
    preprocess_s = (time.perf_counter() - t0) / sizes.loader_scans
    if not cache.scans:
        raise InputError(f"bench: no scan could be preprocessed ({cache.failures.to_dict('records')})")
    ids = sorted(cache.scans)
    files = [[study.path(r[c]) for c in cfg.channels] for _, r in study.cohort.iterrows()]
    from_cache = ScanTensors(cache, ids, preload=False)

    def decode() -> object:
        return [[np.asanyarray(nib.load(str(p)).dataobj) for p in scan] for scan in files]  # type: ignore[attr-defined]

    def cached() -> object:
        return [from_cache.get(np.array([i])) for i in range(len(ids))]

    t_read = interleaved({"cached": cached, "nibabel": decode}, sizes.repeats)
    n = len(ids)
    read = comparison(
        "loader_cached_vs_nibabel",
        "loader",
        "cached tensor (memory-mapped float16 .npy on the model grid, to float32)",
        "nibabel decoding the .nii.gz channels on the image grid",
        t_read["cached"] / n,
        t_read["nibabel"] / n,
        "speedup",
        image_shape=list(sizes.image_shape),
        model_grid=list(grid),
        ours_scans_per_s=n / t_read["cached"],
        reference_scans_per_s=n / t_read["nibabel"],
        note="files in the page cache after the first read (both sides)",
    )

    # the training step of bodyage train, fed two ways
    b = sizes.batch
    reps = -(-b // n)
    batch_ids = (ids * reps)[: max(b, n)]
    memory = ScanTensors(cache, batch_ids, preload=True)
    mapped = ScanTensors(cache, batch_ids, preload=False)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(cfg.channels), **cfg.model_kwargs).to(device)
    model.train()
    amp = autocast_dtype(cfg.precision, device)  # the precision train runs in
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    gen = torch.Generator().manual_seed(0)
    y = torch.zeros(b, device=device)
    idx = np.arange(b)

    def step(data: ScanTensors) -> None:
        x = augment_batch(data.get(idx), cfg, gen).to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None):
            loss = nn.functional.l1_loss(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    t_step = interleaved({"loader": lambda: step(mapped), "memory": lambda: step(memory)}, sizes.train_steps, device)
    t_fetch = interleaved({"loader": lambda: mapped.get(idx), "memory": lambda: memory.get(idx)}, sizes.train_steps)
    train = comparison(
        "train_step_loader_vs_memory",
        "loader",
        "training step fed from the memory-mapped cache (ScanTensors, not preloaded)",
        "the same step on tensors already in memory (ScanTensors, preloaded)",
        t_step["loader"],
        t_step["memory"],
        "cost",
        ("<=", 1.1),
        f"fetching the batch from the cache takes {t_fetch['loader'] * 1e3:.3g} ms against "
        f"{t_fetch['memory'] * 1e3:.3g} ms from memory, in a step of {t_step['memory'] * 1e3:.3g} ms; "
        "what is left is the spread between rounds on a busy machine",
        batch=b,
        fetch_loader_s=t_fetch["loader"],
        fetch_memory_s=t_fetch["memory"],
        model_grid=list(grid),
        steps=sizes.train_steps,
        device=str(device),
    )
    return {
        "comparisons": [read, train],
        "preprocess_s_per_scan": preprocess_s,
        "train_step_s": t_step["loader"],
        "train_dtype": dtype_name(amp),
        "batch": b,
        "model_grid": list(grid),
    }
