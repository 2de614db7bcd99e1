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

The stages are in :mod:`bodyage.bench_stages`, the timing and the comparison records in
:mod:`bodyage.bench_timing`; this module runs them (:func:`run_bench`) and projects the
measured throughputs to a cohort (:func:`project`).
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bodyage.bench_stages import BenchSizes, bench_gradcam, bench_loader, bench_region_aggregation
from bodyage.bench_timing import Comparison, StageMemory, comparison
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

    with StageMemory(dev) as mem:
        agg = bench_region_aggregation(sizes, dev)
    memory["region_aggregation"] = mem.to_dict()
    wall["region_aggregation"] = mem.wall_s
    comps += agg["comparisons"]
    stages["region_aggregation"] = {"seconds": agg["seconds"]}
    task.advance()

    with StageMemory(dev) as mem:
        cam = bench_gradcam(sizes, dev, model_grid)
    memory["gradcam"] = mem.to_dict()
    wall["gradcam"] = mem.wall_s
    comps += cam["comparisons"]
    stages["gradcam"] = {"seconds": cam["seconds"], "methods": cam["methods"], "model_grid": list(model_grid)}
    task.advance()

    tmp = Path(tempfile.mkdtemp(prefix="bodyage-bench-", dir=workdir))
    try:
        with StageMemory(dev) as mem:
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
        with StageMemory(dev) as mem:
            st = dict(stats(quick))
        memory["stats"] = {**mem.to_dict(), "gpu_mb": None}
        wall["stats"] = mem.wall_s
        stages["stats"] = st
        stats_s = float(st["target_seconds"])
        if st.get("naive_seconds"):
            largest = int(st.get("naive_subjects") or max(st["subjects"]))
            comps.append(
                comparison(
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
