"""Benchmark of the statistics at UK Biobank scale (not a timed test).

``python -m analysis.bench_stats`` (or :func:`bench_stats` from ``bodyage bench``) draws a
synthetic run in memory — by default 40,000 subjects (15% with a repeat visit), 53
regions, 5 phenotypes, one attribution method — and times each stage: building and
checking the tables, the region models (53 regions × 5 phenotypes, site fixed effects,
subject-clustered standard errors), the joint long model, the partial correlations with
the gap, the phenotype models, and, for comparison, statsmodels OLS fitted one region ×
phenotype at a time on a sample, extrapolated to the full grid. Times are wall-clock
seconds on whatever machine runs it (record how many cores were free).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from analysis.run import RunTables

#: number of region × phenotype statsmodels fits timed for the naive comparison
NAIVE_SAMPLE = 20


def synthetic_run(
    n_subjects: int = 40_000,
    n_regions: int = 53,
    n_phenotypes: int = 5,
    n_methods: int = 1,
    *,
    repeat_fraction: float = 0.15,
    n_sites: int = 4,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Draw cohort, predictions and attributions tables of the docs/design.md §3 schema."""
    rng = np.random.default_rng(seed)
    subjects = np.array([f"{i:07d}" for i in range(n_subjects)])
    repeat = rng.random(n_subjects) < repeat_fraction
    sid = np.concatenate([subjects, subjects[repeat]])
    visit = np.concatenate([np.zeros(n_subjects, int), np.ones(int(repeat.sum()), int)])
    n = len(sid)
    base_age = rng.uniform(45, 82, n_subjects)
    age = np.concatenate([base_age, base_age[repeat] + 2.5])
    fold_s = rng.integers(0, 5, n_subjects)
    fold = np.concatenate([fold_s, fold_s[repeat]])
    sex_s = rng.choice(np.array(["F", "M"]), n_subjects)
    site_s = rng.choice(np.array([f"site_{k}" for k in range(n_sites)]), n_subjects)
    cohort = pd.DataFrame(
        {
            "subject_id": sid,
            "visit": visit,
            "age": age,
            "sex": np.concatenate([sex_s, sex_s[repeat]]),
            "site": np.concatenate([site_s, site_s[repeat]]),
            "water": "w.nii.gz",
            "fat": "f.nii.gz",
        }
    )
    for k in range(n_phenotypes):
        values = (rng.random(n_subjects) < 0.2).astype(float) if k % 2 == 0 else rng.normal(0, 1, n_subjects)
        cohort[f"pheno_{k}"] = np.concatenate([values, values[repeat]])
    gap = rng.normal(0, 3, n)
    predictions = pd.DataFrame(
        {
            "subject_id": sid,
            "visit": visit,
            "fold": fold,
            "age": age,
            "predicted_age": age + gap,
            "age_gap": gap,
            "age_gap_corrected": gap,
        }
    )
    regions = np.array([f"region_{r:02d}" for r in range(n_regions)])
    frames = []
    for m in range(n_methods):
        mass = rng.normal(0, 1, (n, n_regions))
        share = rng.dirichlet(np.ones(n_regions), n)
        frames.append(
            pd.DataFrame(
                {
                    "subject_id": np.repeat(sid, n_regions),
                    "visit": np.repeat(visit, n_regions),
                    "method": "ablation" if m == 0 else f"method_{m}",
                    "region": np.tile(regions, n),
                    "fold": np.repeat(fold, n_regions),
                    "n_voxels": 100.0,
                    "volume_ml": 51.2,
                    "mass": mass.ravel(),
                    "abs_mass": np.abs(mass).ravel(),
                    "share": share.ravel(),
                    "density": mass.ravel() / 100.0,
                    "enrichment": share.ravel() * n_regions,
                }
            )
        )
    return cohort, predictions, pd.concat(frames, ignore_index=True)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_stats(
    n_subjects: int = 40_000,
    n_regions: int = 53,
    n_phenotypes: int = 5,
    n_methods: int = 1,
    *,
    repeat_fraction: float = 0.15,
    seed: int = 0,
) -> dict[str, Any]:
    """Time the statistics stages on a synthetic run; return seconds per stage and the sizes.

    Returns
    -------
    dict
        ``sizes`` (scans, subjects, regions, phenotypes, methods, fits), ``seconds``
        (``build_tables``, ``region_models``, ``joint_region_model``,
        ``region_gap_correlations``, ``phenotype_models``, ``naive_statsmodels_estimate``)
        and ``speedup_vs_naive`` (region models).
    """
    import warnings

    from analysis.phenotypes import phenotype_models
    from analysis.regionjoint import joint_region_model
    from analysis.regionmodels import region_gap_correlations, region_models

    cohort, predictions, attributions = synthetic_run(
        n_subjects, n_regions, n_phenotypes, n_methods, repeat_fraction=repeat_fraction, seed=seed
    )
    seconds: dict[str, float] = {}
    seconds["build_tables"], tables = _timed(lambda: RunTables.from_frames(cohort, predictions, attributions))
    phenos = [f"pheno_{k}" for k in range(n_phenotypes)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _ = tables.scans
        seconds["region_models"], res = _timed(lambda: region_models(tables, phenotypes=phenos))
        seconds["joint_region_model"], _ = _timed(lambda: joint_region_model(tables, phenotypes=phenos))
        seconds["region_gap_correlations"], _ = _timed(lambda: region_gap_correlations(tables))
        seconds["phenotype_models"], _ = _timed(lambda: phenotype_models(tables, phenotypes=phenos))
        seconds["naive_statsmodels_estimate"] = naive_estimate(tables, phenos, len(res))
    return {
        "sizes": {
            "scans": len(predictions),
            "subjects": n_subjects,
            "regions": n_regions,
            "phenotypes": n_phenotypes,
            "methods": n_methods,
            "region_fits": len(res),
        },
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "speedup_vs_naive": round(seconds["naive_statsmodels_estimate"] / seconds["region_models"], 1),
    }


def naive_estimate(tables: RunTables, phenos: list[str], n_fits: int) -> float:
    """Seconds statsmodels OLS (cluster-robust) would take for ``n_fits`` region models, one at a time.

    Times :data:`NAIVE_SAMPLE` fits (the first phenotype, site fixed effects,
    subject-clustered standard errors, the first method's ``mass``) and scales the mean
    up to ``n_fits``.

    Parameters
    ----------
    tables : RunTables
        The run (e.g. :func:`synthetic_run`).
    phenos : list[str]
        Phenotypes; the first one is the fitted term.
    n_fits : int
        Number of region × phenotype fits to extrapolate to.

    Returns
    -------
    float
        Estimated seconds.
    """
    import statsmodels.api as sm

    from analysis.design import build_design
    from analysis.phenotypes import resolve_covariates
    from analysis.regionmodels import importance_matrix

    scans = tables.scans
    cov, _ = resolve_covariates(tables, None, phenos)
    design = build_design(scans, [phenos[0]], cov, fixed_group="site")
    matrix = importance_matrix(tables, tables.methods[0], "mass").to_numpy()[design.rows]
    groups = scans["subject_id"].to_numpy()[design.rows]
    t0 = time.perf_counter()
    for j in range(NAIVE_SAMPLE):
        sm.OLS(matrix[:, j % matrix.shape[1]], design.X).fit(cov_type="cluster", cov_kwds={"groups": groups})
    return (time.perf_counter() - t0) / NAIVE_SAMPLE * n_fits


if __name__ == "__main__":  # pragma: no cover - a script
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=40_000)
    parser.add_argument("--regions", type=int, default=53)
    parser.add_argument("--phenotypes", type=int, default=5)
    parser.add_argument("--methods", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(bench_stats(args.subjects, args.regions, args.phenotypes, args.methods), indent=2))
