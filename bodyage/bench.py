"""``bodyage bench``: stage throughputs, side-by-side ratios and a 40,000-scan projection.

Every comparison is timed in this process, the contenders interleaved (one call of each
per round, the median over rounds kept), so a load that comes and goes hits both alike
and the ratio survives a busy machine better than either time.

Stages
------
``region_aggregation``
    One UK-Biobank-sized attribution map (224×174×370, 53 labels in organ-sized blocks):
    :func:`bodyage.attribution.region_sums` against the naive loop
    ``[a[m == k].sum() for k in labels]``, TotalSegmentator's own per-organ statistics
    (``totalsegmentator.statistics.get_basic_statistics`` on the same map and mask, an
    in-memory NIfTI) and one plain ``sum`` over the map (the memory-bandwidth floor).
``gradcam``
    :func:`bodyage.attribution.gradcam_maps` against the ``grad-cam`` package's
    ``GradCAM`` (same model, batch and layer, maps on the input grid), and one attribution
    against one forward pass; the other attribution methods are timed once each for the
    projection.
``loader``
    Synthetic ``.nii.gz`` scans on the UK Biobank grid (2 channels) are preprocessed into
    the cache (:func:`bodyage.preprocess.build_cache`); reading a cached tensor against
    decoding the ``.nii.gz`` with nibabel; and a training step (as in ``bodyage train``:
    augmentation, AdamW, L1 loss) fed from the memory-mapped cache against the same step
    on tensors already in memory.
``export_reader``
    :func:`bodyage.bench_ukb.bench_export_reader`: a generated UK Biobank export (500,000
    rows × 2,000 columns) read by ``cohort ukb``'s reader in a fresh process, time and
    peak RSS, against ``pandas.read_csv`` of every column.
``stats``
    Passed in by the caller (the statistics live in ``analysis``, which this package may
    not import): a callable returning the scaling of the region models, see
    :func:`analysis.bench_scaling.bench_region_scaling`.

Peak memory is the resident set (``VmHWM``, reset before each stage; it includes what
the process already held) and, on CUDA, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from bodyage.bench_attribute import UKB_LABELS, UKB_SHAPE
from bodyage.bench_ukb import _peak_rss_mb, _reset_peak
from bodyage.errors import InputError
from bodyage.progress import NO_PROGRESS, Progress

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: version of the JSON layout (bump when a key changes meaning or disappears)
BENCH_SCHEMA = 1
#: scans the projection is for
PROJECT_SCANS = 40_000
#: cohort-level stats goal: region models for 40k subjects within this many seconds
STATS_GOAL_S = 600.0

StatsBench = Callable[[bool], Mapping[str, Any]]


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


@dataclass(frozen=True)
class Comparison:
    """One side-by-side measurement.

    ``ratio`` is a speed-up (``reference / ours`` seconds) when ``ratio_kind`` is
    ``speedup`` and a cost (``ours / reference``) when it is ``cost``; ``goal`` reads
    against ``ratio`` (e.g. ``>= 50``), ``met`` is ``None`` where there is no goal.
    """

    name: str
    stage: str
    ours: str
    reference: str
    ours_s: float
    reference_s: float
    ratio: float
    ratio_kind: Literal["speedup", "cost"]
    goal: str | None = None
    met: bool | None = None
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _comparison(
    name: str,
    stage: str,
    ours: str,
    reference: str,
    ours_s: float,
    reference_s: float,
    kind: Literal["speedup", "cost"],
    goal: tuple[str, float] | None = None,
    why_missed: str | None = None,
    **detail: Any,
) -> Comparison:
    ratio = reference_s / ours_s if kind == "speedup" else ours_s / reference_s
    met: bool | None = None
    reason = None
    goal_text = None
    if goal is not None:
        op, value = goal
        goal_text = f"{op} {value:g}"
        met = bool(ratio >= value) if op == ">=" else bool(ratio <= value)
        if not met:
            reason = f"measured {ratio:.3g}, goal {goal_text}" + (f": {why_missed}" if why_missed else "")
    return Comparison(name, stage, ours, reference, ours_s, reference_s, ratio, kind, goal_text, met, reason, detail)


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: Mapping[str, Callable[[], object]], rounds: int, device: torch.device | None = None
) -> dict[str, float]:
    """Median seconds per call of each function, one call of each per round (after one warm-up call each).

    The order alternates between rounds, so none of them always runs on a cache (or a
    machine) the one before it left warm.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    order = list(fns.items())
    for r in range(max(1, rounds)):
        for k, fn in order if r % 2 == 0 else order[::-1]:  # alternate who goes first
            if device is not None:
                _sync(device)
            t0 = time.perf_counter()
            fn()
            if device is not None:
                _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


class _Memory:
    """Peak RSS (and CUDA memory) of one stage, and its wall-clock seconds."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> _Memory:
        import torch

        self._t0 = time.perf_counter()
        _reset_peak()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        self.wall_s = time.perf_counter() - self._t0
        self.rss_mb = _peak_rss_mb()
        self.gpu_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None

    def to_dict(self) -> dict[str, float | None]:
        return {
            "rss_mb": round(self.rss_mb, 1),
            "gpu_mb": None if self.gpu_mb is None else round(self.gpu_mb, 1),
        }


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
        _comparison(
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
        _comparison(
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
        _comparison(
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
        _comparison(
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
        _comparison(
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
            _sync(device)
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
            _sync(device)
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
    read = _comparison(
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
    train = _comparison(
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


# ----------------------------------------------------------------------------- projection


def project(
    scans: int,
    *,
    preprocess_s_per_scan: float,
    train_step_s: float,
    batch: int,
    forward_s_per_scan: float,
    methods: Mapping[str, Mapping[str, Any]],
    stats_s: float | None,
    folds: int,
    epochs: int,
    val_fraction: float,
) -> dict[str, Any]:
    """Hours per stage for ``scans`` scans on this machine, from the measured throughputs."""
    train_scans = scans * (folds - 1) / folds
    n_val = train_scans * val_fraction
    n_fit = train_scans - n_val
    per_fold = epochs * (math.ceil(n_fit / batch) * train_step_s + n_val * forward_s_per_scan)
    train_s = folds * per_fold + scans * forward_s_per_scan
    hours: dict[str, Any] = {
        "preprocess": scans * preprocess_s_per_scan / 3600,
        "train": train_s / 3600,
        "attribute": {m: scans * float(v["seconds_per_scan"]) / 3600 for m, v in methods.items()},
        "stats": None if stats_s is None else stats_s / 3600,
    }
    default_attr = sum(h for m, h in hours["attribute"].items() if methods[m].get("default"))
    total = hours["preprocess"] + hours["train"] + default_attr + (hours["stats"] or 0.0)
    return {
        "scans": scans,
        "hours": hours,
        "total_hours_default_methods": total,
        "assumptions": [
            f"one process on this machine's device; {folds} folds × {epochs} epochs (the train defaults, no "
            f"early stopping), batch {batch}, {val_fraction:.0%} of each fold's training scans for validation "
            "predicted every epoch",
            "a training step costs what the loader-fed step cost here; predictions cost one forward pass per scan",
            "preprocessing runs once (the cache is reused by train and attribute); TotalSegmentator is not included",
            "attribution: each scan once by its fold model, at the measured seconds per scan of each method "
            "(loading and region aggregation on the model grid are small beside it)",
            "stats: the region models only, extrapolated from the fitted growth exponent",
            "throughputs scale linearly in scans; torchrun over N devices divides train and attribute by about N",
        ],
    }


# ----------------------------------------------------------------------------- the run


def _machine(device: torch.device) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        info["load_average"] = None
    return info


def run_bench(
    *,
    quick: bool = False,
    device: str = "auto",
    stats: StatsBench | None = None,
    workdir: str | os.PathLike[str] | None = None,
    progress: Progress = NO_PROGRESS,
) -> dict[str, Any]:
    """Run every stage and return the report ``bodyage bench`` prints (see docs/guide/bench.md for the keys).

    Parameters
    ----------
    quick
        A reduced run (small grids, few rounds; seconds) with the same keys.
    device
        ``auto``, ``cpu`` or ``cuda``.
    stats
        ``stats(quick)`` returning the region-model scaling (keys of
        :func:`analysis.bench_scaling.bench_region_scaling`); ``None`` leaves the stage out.
    workdir
        Where the synthetic scans are written (default: the system's temporary folder); deleted.
    progress
        Progress display (one step per stage).

    Raises
    ------
    InputError
        Unknown device, or ``grad-cam`` missing.
    """
    from bodyage.device import resolve_device
    from bodyage.preprocess import auto_grid
    from bodyage.train_config import TrainConfig

    t_start = time.perf_counter()
    dev = resolve_device(device)
    sizes = BenchSizes.quick() if quick else BenchSizes.full()
    cfg = TrainConfig()
    model_grid = cfg.grid or auto_grid(sizes.image_shape)
    task = progress.task("bench", 5 if stats is not None else 4)
    memory: dict[str, Any] = {}
    wall: dict[str, float] = {}
    stages: dict[str, Any] = {}
    comps: list[Comparison] = []

    with _Memory(dev) as mem:
        agg = bench_region_aggregation(sizes, dev)
    memory["region_aggregation"] = mem.to_dict()
    wall["region_aggregation"] = mem.wall_s
    comps += agg["comparisons"]
    stages["region_aggregation"] = {"seconds": agg["seconds"]}
    task.advance()

    with _Memory(dev) as mem:
        cam = bench_gradcam(sizes, dev, model_grid)
    memory["gradcam"] = mem.to_dict()
    wall["gradcam"] = mem.wall_s
    comps += cam["comparisons"]
    stages["gradcam"] = {"seconds": cam["seconds"], "methods": cam["methods"], "model_grid": list(model_grid)}
    task.advance()

    tmp = Path(tempfile.mkdtemp(prefix="bodyage-bench-", dir=workdir))
    try:
        with _Memory(dev) as mem:
            loader = bench_loader(sizes, dev, model_grid, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    memory["loader"] = mem.to_dict()
    wall["loader"] = mem.wall_s
    comps += loader["comparisons"]
    stages["loader"] = {
        k: loader[k] for k in ("preprocess_s_per_scan", "train_step_s", "train_dtype", "batch", "model_grid")
    }
    task.advance()

    # the UK Biobank export reader: its own fresh processes, so its peak RSS is its own
    from bodyage.bench_ukb import bench_export_reader

    t0 = time.perf_counter()
    export = bench_export_reader(
        sizes.export_rows,
        sizes.export_columns,
        subset=min(40_000, sizes.export_rows // 10),
        naive_rows=min(20_000, sizes.export_rows // 10),
        workdir=workdir,
    )
    wall["export_reader"] = time.perf_counter() - t0
    memory["export_reader"] = {"rss_mb": round(export.peak_rss_mb, 1), "gpu_mb": None}
    stages["export_reader"] = export.to_dict()
    task.advance()

    goals: list[dict[str, Any]] = [
        {"name": c.name, "goal": c.goal, "value": c.ratio, "met": c.met, "reason": c.reason}
        for c in comps
        if c.goal is not None
    ]
    stats_s: float | None = None
    if stats is not None:
        with _Memory(dev) as mem:
            st = dict(stats(quick))
        memory["stats"] = {**mem.to_dict(), "gpu_mb": None}
        wall["stats"] = mem.wall_s
        stages["stats"] = st
        stats_s = float(st["target_seconds"])
        if st.get("naive_seconds"):
            largest = int(st.get("naive_subjects") or max(st["subjects"]))
            comps.append(
                _comparison(
                    "stats_region_models_vs_statsmodels",
                    "stats",
                    "region_models (all regions × phenotypes at once, cluster-robust SEs)",
                    "statsmodels OLS with cluster-robust SEs, one region × phenotype at a time (a sample, scaled)",
                    float(st["seconds"][st["subjects"].index(largest)]),
                    float(st["naive_seconds"]),
                    "speedup",
                    subjects=largest,
                    region_fits=st["region_fits"],
                )
            )
        met = stats_s <= STATS_GOAL_S
        goals.append(
            {
                "name": "stats_region_models_40k",
                "goal": f"<= {STATS_GOAL_S:g} s",
                "value": stats_s,
                "met": met,
                "reason": None
                if met
                else f"extrapolated {stats_s:.0f} s for {st['target_subjects']} subjects "
                f"(growth exponent {st['exponent']:.2f}), goal {STATS_GOAL_S:g} s",
            }
        )
        task.advance()
    task.close()

    projection = project(
        PROJECT_SCANS,
        preprocess_s_per_scan=loader["preprocess_s_per_scan"],
        train_step_s=loader["train_step_s"],
        batch=loader["batch"],
        forward_s_per_scan=cam["forward_s_per_scan"],
        methods=cam["methods"],
        stats_s=stats_s,
        folds=cfg.folds,
        epochs=cfg.epochs,
        val_fraction=cfg.val_fraction,
    )
    if quick:
        projection["assumptions"].insert(0, "--quick: measured on small grids; not a projection for real scans")
    return {
        "schema": BENCH_SCHEMA,
        "quick": quick,
        "machine": _machine(dev),
        "sizes": {**asdict(sizes), "model_grid": list(model_grid), "model": cfg.model},
        "comparisons": [c.to_dict() for c in comps],
        "goals": goals,
        "stages": stages,
        "peak_memory": memory,
        "stage_seconds": wall,
        "projection": projection,
        "seconds": time.perf_counter() - t_start,
    }
