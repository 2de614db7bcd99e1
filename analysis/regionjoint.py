"""Joint region model: which regions a phenotype shifts beyond the whole-body effect (docs/design.md §7).

The question is "does the phenotype move region *r*'s importance more (or less) than it
moves the rest of the body?". Its estimand here, per method, phenotype and region:

1. **Standardise.** Each region's importance is divided by its residual standard
   deviation after the covariates (age, age², sex, site; the region model without the
   phenotype), so regions of very different scales (the ablation ``mass`` of the
   subcutaneous fat against that of a small gland) count alike. A *whole-body effect* is
   then one that moves every region by the same number of its own standard deviations,
   additive shifts of regions with equal noise and shifts proportional to a region's
   scale alike; on raw values a proportional shift would show up in every region.
2. **Contrast per scan.** ``c_r = z_r − mean of z_s over the reference regions s ≠ r``.
3. **Fit** ``c_r ~ phenotype + covariates + site`` by OLS (:func:`analysis.ols.ols_many`),
   cluster-robust by subject with repeat visits. The contrast is formed per scan before
   the fit, so the standard error accounts for the correlation between a region and the
   reference it is compared with by construction.
4. **Reference = the regions that do not deviate.** A contrast with the mean of all other
   regions is contaminated by the regions that truly deviate: one region with a strong
   effect ``a`` shifts every other region's contrast by ``−a/(R−1)``, which a large
   study declares significant everywhere (sum-to-zero contrasts, the importance centred
   on the scan's mean, turned 4 simulated regional effects into 48 of 52 "significant"
   regions). So the reference starts as every region and the regions found significant are removed from
   it, refitting until the set is stable (as in differential-abundance methods that
   normalise on the non-differential features). At least half of the regions always stay
   in the reference: the whole-body effect is by definition what most regions share.

Benjamini–Hochberg runs over the regions within the family the region models use
(``fdr_family``, :mod:`analysis.fdr`). The :data:`WHOLE_BODY` row of each method ×
phenotype is the phenotype's effect on the mean standardised importance of its reference
regions; these rows are families of their own, split the same way (``"method"``: BH over
the method's phenotypes).

The definition has a limit worth stating: "beyond the whole body" is in standard
deviations. A whole-body effect proportional to a region's scale whose noise is not
proportional to it moves large regions by more SDs than small ones, and they will deviate.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from analysis._typing import FdrFamily, RegionLevel, RegionMetric
from analysis.design import DEFAULT_GROUP, Design, build_design, exclusion_columns, is_binary, numeric_values
from analysis.fdr import check_family, family_q
from analysis.ols import ManyOLS, ols_many
from analysis.phenotypes import model_form, resolve_covariates, resolve_phenotypes
from analysis.regionmodels import (
    ALPHA,
    REGION_MODEL_COLUMNS,
    WHOLE_BODY,
    importance_matrix,
    resolve_methods,
    resolve_metric,
)
from analysis.run import RunTables, as_run
from bodyage.errors import BodyageWarning
from bodyage.progress import NO_PROGRESS, Progress

#: the whole-body rows are families of their own, split like the regions': their
#: ``fdr_family`` is e.g. ``"method (whole body)"`` (BH over the phenotypes of a method)
WHOLE_BODY_FAMILY = "(whole body)"
#: the columns of :func:`joint_region_model`: :data:`REGION_MODEL_COLUMNS`, the standard
#: deviation each region was divided by, whether it is in the whole-body reference, and
#: how many regions that reference has
JOINT_COLUMNS: list[str] = [*REGION_MODEL_COLUMNS, "scale", "in_reference", "n_reference"]
#: refits of the reference set before giving up (it is stable after 2-3 in practice)
MAX_ROUNDS = 20

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@dataclass
class _Fit:
    """One method × phenotype: its standardised importance and current reference set."""

    method: str
    metric: str
    phenotype: str
    binary: bool
    design: Design
    z: FloatArray  # (rows used, regions) standardised importance
    raw_mean: FloatArray  # mean raw importance per region over the rows used
    scale: FloatArray
    reference: BoolArray  # regions in the whole-body reference (next fit)
    used: BoolArray | None = None  # the reference of the last fit
    regions: pd.DataFrame | None = None  # last fit, one row per region (no q yet)
    whole: ManyOLS | None = None  # last fit of the reference mean


def joint_region_model(
    run: RunTables | str | os.PathLike[str],
    *,
    phenotypes: Sequence[str] | None = None,
    covariates: Sequence[str] | None = None,
    default_covariates: bool = True,
    group: str | None = DEFAULT_GROUP,
    metric: RegionMetric | None = None,
    methods: Sequence[str] | None = None,
    level: RegionLevel = "region",
    grouping: Callable[[str], str] | None = None,
    alpha: float = ALPHA,
    fdr_family: FdrFamily = "method",
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Which regions a phenotype shifts beyond the whole-body effect (module docstring).

    Parameters as :func:`analysis.regionmodels.region_models`.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`JOINT_COLUMNS`. Per method and phenotype, one row per region:
        ``estimate`` is the phenotype's effect on the region's standardised importance
        minus the mean standardised importance of the reference regions (in standard
        deviations of each region's importance, ``scale`` in the metric's unit), ``q`` is
        BH over the ``fdr_family``, ``significant`` is ``q < alpha`` (the regions with
        ``in_reference`` False, unless more than half deviate); and one :data:`WHOLE_BODY`
        row: the effect on the mean standardised importance of the ``n_reference``
        reference regions (``q`` within its own family, see the module docstring).
        ``mean_importance`` is the region's mean raw importance.

    Raises
    ------
    RunError
        If the run has no attributions.
    InputError
        For an invalid phenotype, covariate, group, method, metric, level or FDR family.

    Warns
    -----
    BodyageWarning
        If more than half of a phenotype's regions deviate (the reference keeps the half
        with the largest p-values) or the reference set did not settle.
    """
    check_family(fdr_family)
    tables = as_run(run)
    progress = progress or NO_PROGRESS
    meths = resolve_methods(tables, methods)
    phenos = resolve_phenotypes(tables, phenotypes)
    cov, cov_names = resolve_covariates(tables, covariates, phenos, default_covariates=default_covariates)
    form = model_form(tables, group)
    scans = tables.scans
    designs = {p: build_design(scans, [p], cov, fixed_group=group) for p in phenos}
    clusters = scans[form.cluster].to_numpy() if form.cluster else None
    task = progress.task("joint region model", total=len(meths) * len(phenos))
    fits: list[_Fit] = []
    names: dict[str, list[str]] = {}
    for method in meths:
        met = resolve_metric(method, metric)
        matrix = importance_matrix(tables, method, met, level=level, grouping=grouping)
        names[method] = [str(c) for c in matrix.columns]
        for pheno in phenos:
            d = designs[pheno]
            y = matrix.to_numpy()[d.rows]
            scale = _residual_sd(np.delete(d.X, d.index(pheno), axis=1), y)
            with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN region: stays NaN
                raw_mean = np.nanmean(y, axis=0)
                z = y / scale
            ok = np.isfinite(scale) & (scale > 0)
            binary = is_binary(numeric_values(scans, pheno, "phenotype")[d.rows])
            fits.append(_Fit(method, met, pheno, binary, d, z, raw_mean, scale, reference=ok))
            task.advance()
    task.close()

    todo = fits
    for _ in range(MAX_ROUNDS):
        for f in todo:
            cl = None if clusters is None else clusters[f.design.rows]
            f.used = f.reference.copy()
            contrast, whole = _contrasts(f.z, f.used)
            target = f.design.index(f.phenotype)
            f.regions = _region_rows(f, names[f.method], ols_many(f.design.X, contrast, target, clusters=cl))
            f.whole = ols_many(f.design.X, whole[:, None], target, clusters=cl)
        blocks = [f.regions for f in fits if f.regions is not None]
        q = family_q(pd.concat(blocks, ignore_index=True), fdr_family)
        bounds = np.cumsum([0, *(len(b) for b in blocks)])
        todo = []
        for f, start, stop in zip(fits, bounds[:-1], bounds[1:], strict=True):
            new = _reference(f, q[start:stop], alpha)
            if not np.array_equal(new, f.reference):
                f.reference = new
                todo.append(f)
        if not todo:
            break
    else:
        warnings.warn(
            f"joint region model: the whole-body reference did not settle in {MAX_ROUNDS} refits; the last is reported",
            BodyageWarning,
            stacklevel=2,
        )
    _warn_crowded(fits, q, alpha, bounds)
    return _assemble(fits, q, alpha, fdr_family, level, group, clusters is not None, cov_names)


def _residual_sd(X: FloatArray, y: FloatArray) -> FloatArray:
    """Residual standard deviation of each column of ``y`` regressed on ``X`` (its finite rows)."""
    out = np.full(y.shape[1], np.nan)
    finite = np.isfinite(y)
    for j in range(y.shape[1]):
        rows = finite[:, j]
        coef, _, rank, _ = np.linalg.lstsq(X[rows], y[rows, j], rcond=None)
        dof = int(rows.sum()) - int(rank)
        if dof >= 1:
            resid = y[rows, j] - X[rows] @ coef
            out[j] = np.sqrt(resid @ resid / dof)
    return out


def _contrasts(z: FloatArray, reference: BoolArray) -> tuple[FloatArray, FloatArray]:
    """Per scan: each region minus the mean of the other reference regions, and the reference mean.

    NaN where a scan has fewer than 2 (other) reference regions, or lacks the region.
    """
    ref = np.where(reference[None, :], z, np.nan)
    present = np.isfinite(ref)
    total = np.where(present, ref, 0.0).sum(axis=1)
    count = present.sum(axis=1)
    own = present.astype(float)
    others_total = total[:, None] - np.where(present, ref, 0.0)
    others_count = count[:, None] - own
    with np.errstate(divide="ignore", invalid="ignore"):
        contrast = np.where(others_count >= 2, z - others_total / others_count, np.nan)
        whole = np.where(count >= 2, total / count, np.nan)
    return contrast, whole


def _region_rows(f: _Fit, regions: Sequence[str], res: ManyOLS) -> pd.DataFrame:
    binary = f.binary
    return pd.DataFrame(
        {
            "method": f.method,
            "metric": f.metric,
            "region": list(regions),
            "phenotype": f.phenotype,
            "kind": "binary" if binary else "continuous",
            "per": "1 vs 0" if binary else "per unit",
            "n": res.n,
            "estimate": res.estimate,
            "se": res.se,
            "ci_low": res.ci_low,
            "ci_high": res.ci_high,
            "stat": res.stat,
            "df": res.df,
            "p": res.p,
            "partial_r": res.partial_r,
            "mean_importance": f.raw_mean,
            "scale": f.scale,
        }
    )


def _reference(f: _Fit, q: FloatArray, alpha: float) -> BoolArray:
    """The regions of the next reference: usable ones not significant, at least half of the usable."""
    usable = np.isfinite(f.scale) & (f.scale > 0)
    deviating = usable & (q < alpha)
    most = int(usable.sum()) // 2
    if deviating.sum() > most:
        assert f.regions is not None
        p = np.where(deviating, f.regions["p"].to_numpy(), np.inf)
        deviating = np.zeros_like(deviating)
        deviating[np.argsort(p, kind="stable")[:most]] = True
    return usable & ~deviating


def _warn_crowded(fits: Sequence[_Fit], q: FloatArray, alpha: float, bounds: npt.NDArray[np.int_]) -> None:
    for f, start, stop in zip(fits, bounds[:-1], bounds[1:], strict=True):
        usable = int((np.isfinite(f.scale) & (f.scale > 0)).sum())
        n_sig = int((q[start:stop] < alpha).sum())
        if n_sig > usable // 2:
            warnings.warn(
                f"joint region model: {n_sig} of {usable} {f.method} regions deviate for {f.phenotype}; the "
                "whole-body reference keeps the half with the largest p-values, so a whole-body effect is not "
                "identifiable from the regions",
                BodyageWarning,
                stacklevel=3,
            )


def _assemble(
    fits: Sequence[_Fit],
    q: FloatArray,
    alpha: float,
    fdr_family: FdrFamily,
    level: str,
    group: str | None,
    clustered: bool,
    cov_names: Sequence[str],
) -> pd.DataFrame:
    """The output rows: per method, each phenotype's whole-body row, then every region."""
    regions = pd.concat([f.regions for f in fits if f.regions is not None], ignore_index=True)
    regions["q"] = q
    regions["fdr_family"] = fdr_family
    regions["significant"] = regions["q"] < alpha
    used = [f.used for f in fits if f.used is not None]
    regions["in_reference"] = np.concatenate(used)
    regions["n_reference"] = np.concatenate([np.full(len(u), int(u.sum())) for u in used])
    whole = pd.DataFrame(
        [
            {
                "method": f.method,
                "metric": f.metric,
                "region": WHOLE_BODY,
                "phenotype": f.phenotype,
                "kind": "binary" if f.binary else "continuous",
                "per": "1 vs 0" if f.binary else "per unit",
                "n": int(f.whole.n[0]),
                "estimate": f.whole.estimate[0],
                "se": f.whole.se[0],
                "ci_low": f.whole.ci_low[0],
                "ci_high": f.whole.ci_high[0],
                "stat": f.whole.stat[0],
                "df": f.whole.df[0],
                "p": f.whole.p[0],
                "partial_r": f.whole.partial_r[0],
                "mean_importance": float(np.nanmean(f.raw_mean[f.used])) if f.used.any() else np.nan,
                "scale": np.nan,
                "in_reference": True,
                "n_reference": int(f.used.sum()),
            }
            for f in fits
            if f.whole is not None and f.used is not None
        ]
    )
    whole["q"] = family_q(whole, fdr_family)
    whole["fdr_family"] = f"{fdr_family} {WHOLE_BODY_FAMILY}"
    whole["significant"] = whole["q"] < alpha
    out = pd.concat([whole, regions], ignore_index=True)
    out["level"] = level
    exclusions = pd.DataFrame([exclusion_columns(f.design) for f in fits], index=[f.phenotype for f in fits])
    exclusions = exclusions[~exclusions.index.duplicated()]
    out = out.join(exclusions, on="phenotype")
    out["se_type"] = "cluster(subject)" if clustered else "classical"
    out["fixed_effects"] = out["phenotype"].map(
        {f.phenotype: group if group is not None and group not in f.design.dropped else "" for f in fits}
    )
    out["covariates"] = ", ".join(cov_names)
    method_order = {m: i for i, m in enumerate(dict.fromkeys(f.method for f in fits))}
    out = out.assign(_m=out["method"].map(method_order)).sort_values("_m", kind="stable")
    return out[JOINT_COLUMNS].reset_index(drop=True)
