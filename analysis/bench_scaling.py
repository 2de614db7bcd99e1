"""How the region models of ``bodyage stats`` grow with the cohort (``bodyage bench``).

:func:`bench_region_scaling` times :func:`analysis.regionmodels.region_models` (53
regions × 5 phenotypes, site fixed effects, subject-clustered standard errors) on
synthetic runs of increasing size (:func:`analysis.bench_stats.synthetic_run`), fits the
growth exponent *b* of ``seconds ≈ a · subjects^b`` by least squares on the log-log
points, and extrapolates to the target cohort. At the largest size it also estimates the
naive alternative, statsmodels OLS fitted one region × phenotype at a time
(:func:`analysis.bench_stats.naive_estimate`, a sample of fits scaled up).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

#: cohort sizes timed by default (subjects; 15% of them have a repeat visit)
DEFAULT_SIZES: tuple[int, ...] = (1_000, 4_000, 16_000)
#: the cohort the extrapolation is for
TARGET_SUBJECTS = 40_000


def bench_region_scaling(
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    n_regions: int = 53,
    n_phenotypes: int = 5,
    target: int = TARGET_SUBJECTS,
    naive: bool = True,
    repeats: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Time the region models at each size; fit the growth exponent; extrapolate to ``target``.

    Parameters
    ----------
    sizes
        Subjects per synthetic run (at least two distinct sizes).
    n_regions, n_phenotypes
        Table sizes (UK Biobank: 53 TotalSegmentator regions; 5 phenotypes).
    target
        Subjects to extrapolate to.
    naive
        Also estimate statsmodels OLS one fit at a time at the largest size.
    repeats
        Timings per size (the median is kept); one untimed warm-up fit comes first, so
        first-call imports do not count.
    seed
        Seed of the synthetic tables.

    Returns
    -------
    dict
        ``subjects`` and ``scans`` (lists), ``seconds`` (region models at each size),
        ``build_seconds`` (building the run tables), ``region_fits``, ``exponent`` (log-log
        slope), ``target_subjects``, ``target_seconds`` (extrapolated), and, with
        ``naive``, ``naive_seconds`` (statsmodels estimate at the largest size).

    Raises
    ------
    ValueError
        If fewer than two distinct sizes are given.
    """
    from analysis.bench_stats import naive_estimate, synthetic_run
    from analysis.regionmodels import region_models
    from analysis.run import RunTables

    sizes = [int(s) for s in sizes]
    if len(set(sizes)) < 2:
        raise ValueError(f"sizes must hold at least two distinct cohort sizes; {sizes} was provided")
    phenos = [f"pheno_{k}" for k in range(n_phenotypes)]
    seconds: list[float] = []
    build: list[float] = []
    scans: list[int] = []
    fits = 0
    naive_s: float | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        region_models(
            RunTables.from_frames(*synthetic_run(200, n_regions, n_phenotypes, 1, seed=seed)), phenotypes=phenos
        )
    for i, n in enumerate(sizes):
        cohort, predictions, attributions = synthetic_run(n, n_regions, n_phenotypes, 1, seed=seed + i)
        t0 = time.perf_counter()
        tables = RunTables.from_frames(cohort, predictions, attributions)
        _ = tables.scans
        build.append(time.perf_counter() - t0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            times = []
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                res = region_models(tables, phenotypes=phenos)
                times.append(time.perf_counter() - t0)
            seconds.append(float(np.median(times)))
            fits = len(res)
            if naive and n == max(sizes):
                naive_s = naive_estimate(tables, phenos, fits)
        scans.append(len(predictions))
    slope, intercept = np.polyfit(np.log(sizes), np.log(seconds), 1)
    out: dict[str, Any] = {
        "subjects": sizes,
        "scans": scans,
        "regions": n_regions,
        "phenotypes": n_phenotypes,
        "region_fits": fits,
        "seconds": seconds,
        "build_seconds": build,
        "exponent": float(slope),
        "target_subjects": int(target),
        "target_seconds": float(np.exp(intercept) * target**slope),
        "repeats": max(1, repeats),
    }
    if naive:
        out["naive_seconds"] = naive_s
        out["naive_subjects"] = max(sizes)
    return out
