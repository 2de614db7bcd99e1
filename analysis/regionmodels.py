"""Region models: how phenotypes shift organ-level attribution (docs/design.md §7).

Three analyses of the importance of each region (one column of ``attributions.parquet``,
:func:`analysis._typing.default_metric`: signed ``mass`` in years for ``ablation`` and
``shapley``, ``share`` for voxel methods):

:func:`region_models`
    ``importance_r ~ phenotype + age + age² + sex + site`` for every region × phenotype,
    Benjamini–Hochberg FDR over regions × phenotypes within each method (docs/design.md §7;
    ``fdr_family="phenotype"``: over the regions of each method × phenotype; ``"all"``:
    over every method × region × phenotype, see :mod:`analysis.fdr`). Sites enter as
    fixed effects (indicators); with repeat visits the standard errors are cluster-robust
    by subject. This form is exact OLS, so one QR decomposition serves every region
    (:func:`analysis.ols.ols_many`): 40,000 subjects × 53 regions × 5 phenotypes take
    seconds (``python -m analysis.bench_stats``), where a mixed model per region would take
    hours. The partial correlation of importance and phenotype given the covariates is
    reported as an effect size (equal to pingouin's ``partial_corr``; a test checks it).
:func:`region_gap_correlations`
    Partial correlation (pingouin ``partial_corr``) of each region's importance with the
    corrected age gap given the covariates, FDR over regions, on each subject's first scan.
:func:`analysis.regionjoint.joint_region_model`
    Which regions a phenotype shifts beyond the whole-body effect (its own module).

Rows with a missing phenotype or covariate are excluded per phenotype and counted; a
region missing from a scan (NaN) drops that scan for that region only (``n``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from analysis._typing import (
    REGION_LEVELS,
    REGION_METRICS,
    FdrFamily,
    GapCorrection,
    RegionLevel,
    RegionMetric,
    default_metric,
)
from analysis.agegap import GapCorrectionResult, correct_gap
from analysis.design import (
    DEFAULT_GROUP,
    EXCLUSION_COLUMNS,
    build_design,
    exclusion_columns,
    is_binary,
    numeric_values,
)
from analysis.fdr import check_family, family_q
from analysis.ols import ols_many
from analysis.phenotypes import model_form, resolve_covariates, resolve_phenotypes
from analysis.run import ATTRIBUTIONS_FILE, RunTables, as_run
from bodyage.errors import BodyageWarning, InputError, RunError
from bodyage.progress import NO_PROGRESS, Progress

#: FDR level that sets the ``significant`` column
ALPHA = 0.05
#: the row of :func:`analysis.regionjoint.joint_region_model` holding the whole-body effect
WHOLE_BODY = "(whole body)"

REGION_MODEL_COLUMNS: list[str] = [
    "method",
    "metric",
    "level",
    "region",
    "phenotype",
    "kind",
    "per",
    "n",
    *EXCLUSION_COLUMNS,
    "estimate",
    "se",
    "ci_low",
    "ci_high",
    "stat",
    "df",
    "p",
    "q",
    "fdr_family",
    "significant",
    "partial_r",
    "mean_importance",
    "se_type",
    "fixed_effects",
    "covariates",
]


def resolve_methods(tables: RunTables, methods: Sequence[str] | None) -> list[str]:
    """Return the attribution methods to analyse (all present when ``None``).

    Raises
    ------
    RunError
        If the run has no attributions.
    InputError
        If a named method is not in ``attributions.parquet``.
    """
    if tables.attributions is None:
        raise RunError(f"{ATTRIBUTIONS_FILE}: not found (run `bodyage attribute` first)")
    present = tables.methods
    if methods is None:
        return list(present)
    for m in methods:
        if m not in present:
            raise InputError(f"method {m!r} is not in {ATTRIBUTIONS_FILE}; it has: {', '.join(present)}")
    return list(dict.fromkeys(methods))


def resolve_metric(method: str, metric: RegionMetric | None) -> RegionMetric:
    """Return ``metric``, checked, or the method's default (:func:`analysis._typing.default_metric`).

    Raises
    ------
    InputError
        If ``metric`` is not one of :data:`analysis._typing.REGION_METRICS`.
    """
    if metric is None:
        return default_metric(method)
    if metric not in REGION_METRICS:
        raise InputError(f"metric {metric!r} is not one of {', '.join(REGION_METRICS)}")
    return metric


def group_regions(attributions: pd.DataFrame, grouping: Callable[[str], str]) -> pd.DataFrame:
    """Aggregate a long attribution table from regions to region groups.

    ``mass``, ``abs_mass``, ``share``, ``n_voxels`` and ``volume_ml`` add up (a group is
    NaN only when all its members are); ``density = mass / n_voxels``, ``abs_density =
    abs_mass / n_voxels``; ``enrichment =
    share / (volume_ml / body volume)``, the body volume of a scan being recovered from
    its regions as ``volume_ml · enrichment / share``.

    Parameters
    ----------
    attributions
        Long table (docs/design.md §3).
    grouping
        Region name -> group name, e.g. :func:`bodyage.regions.group_of`.
    """
    df = attributions.copy()
    df["region"] = df["region"].astype(str).map(grouping)
    with np.errstate(divide="ignore", invalid="ignore"):
        body = df["volume_ml"] * df["enrichment"] / df["share"]
    body = body.where(np.isfinite(body) & (body > 0))
    df["_body"] = body
    keys = ["scan_id", "subject_id", "visit", "method", "region", "fold"]
    sums = df.groupby(keys, observed=True, sort=False)[["n_voxels", "volume_ml", "mass", "abs_mass", "share"]].sum(
        min_count=1
    )
    body_scan = df.groupby(["scan_id", "method"], observed=True)["_body"].median()
    out = sums.reset_index()
    b = pd.MultiIndex.from_frame(out[["scan_id", "method"]]).map(body_scan.to_dict())
    with np.errstate(divide="ignore", invalid="ignore"):
        out["density"] = out["mass"] / out["n_voxels"]
        out["abs_density"] = out["abs_mass"] / out["n_voxels"]
        out["enrichment"] = out["share"] / (out["volume_ml"] / np.asarray(b, dtype=float))
    return out


def importance_matrix(
    tables: RunTables,
    method: str,
    metric: RegionMetric,
    *,
    level: RegionLevel = "region",
    grouping: Callable[[str], str] | None = None,
) -> pd.DataFrame:
    """Return one method's importance as a ``scans × regions`` matrix (NaN where absent).

    Rows follow :attr:`RunTables.scans` (a scan without attributions is all NaN), columns
    the label order.

    Raises
    ------
    InputError
        If ``level`` is unknown, or ``"group"`` without a ``grouping``.
    """
    if level not in REGION_LEVELS:
        raise InputError(f"level {level!r} is not one of {', '.join(REGION_LEVELS)}")
    attr = tables.attributions
    if attr is None:
        raise RunError(f"{ATTRIBUTIONS_FILE}: not found (run `bodyage attribute` first)")
    sub = attr[attr["method"] == method]
    order = list(tables.regions)
    if level == "group":
        if grouping is None:
            raise InputError("level 'group' needs a grouping of regions (e.g. bodyage.regions.group_of)")
        sub = group_regions(sub, grouping)
        order = list(dict.fromkeys(grouping(r) for r in order))
    scans = tables.scans["scan_id"]
    row = pd.Index(scans).get_indexer(pd.Index(sub["scan_id"]))
    cols = pd.Index(order)
    col = cols.get_indexer(pd.Index(sub["region"].astype(str)))
    values = np.full((len(scans), len(cols)), np.nan)
    values[row, col] = sub[metric].to_numpy(float)
    present = ~np.isnan(values).all(axis=0)
    return pd.DataFrame(values[:, present], columns=cols[present], index=scans.index)


def region_models(
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
    """Fit ``importance ~ phenotype + covariates + site`` per method, region and phenotype.

    Parameters
    ----------
    run
        Run tables or a run folder.
    phenotypes, covariates, default_covariates, group
        As :func:`analysis.phenotypes.phenotype_models` (``group`` enters as fixed effects).
    metric
        Importance column; ``None``: each method's default.
    methods
        Attribution methods; ``None``: all in the table.
    level
        ``"region"`` or ``"group"`` (with ``grouping``).
    grouping
        Region -> group name, for ``level="group"``.
    alpha
        FDR level of the ``significant`` column.
    fdr_family
        The tests one Benjamini–Hochberg correction spans: ``"method"`` (default, docs/design.md
        §7), every region × phenotype of a method; ``"phenotype"``, the regions of each
        method × phenotype, so one phenotype's many discoveries (an anatomy-driven one such
        as BMI) do not loosen the threshold of another's tests (but the FDR then holds per
        phenotype only); ``"all"``, every region × phenotype × method together, so the FDR
        holds over everything reported (see :mod:`analysis.fdr`).
    progress
        Progress display (one step per method × phenotype).

    Returns
    -------
    pandas.DataFrame
        One row per (method, region, phenotype), columns :data:`REGION_MODEL_COLUMNS`:
        ``estimate`` is the change in importance per unit of the phenotype (carriers vs
        non-carriers for 0/1), ``q`` is Benjamini–Hochberg over all regions × phenotypes of
        the method (or of another family, see ``fdr_family``), ``significant`` is
        ``q < alpha``, ``partial_r`` the partial correlation.
        Select "regions significant for phenotype X and method M" with
        ``df[(df.method == M) & (df.phenotype == X) & df.significant]``.

    Raises
    ------
    RunError
        If the run has no attributions.
    InputError
        For an invalid phenotype, covariate, group, method, metric, level or FDR family
        (naming it).
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
    task = progress.task("region models", total=len(meths) * len(phenos))
    frames = []
    for method in meths:
        met = resolve_metric(method, metric)
        matrix = importance_matrix(tables, method, met, level=level, grouping=grouping)
        per_method = []
        for pheno in phenos:
            d = designs[pheno]
            values = numeric_values(scans, pheno, "phenotype")[d.rows]
            binary = is_binary(values)
            res = ols_many(
                d.X,
                matrix.to_numpy()[d.rows],
                d.index(pheno),
                clusters=None if clusters is None else clusters[d.rows],
            )
            per_method.append(
                pd.DataFrame(
                    {
                        "method": method,
                        "metric": met,
                        "level": level,
                        "region": matrix.columns.astype(str),
                        "phenotype": pheno,
                        "kind": "binary" if binary else "continuous",
                        "per": "1 vs 0" if binary else "per unit",
                        "n": res.n,
                        **exclusion_columns(d),
                        "estimate": res.estimate,
                        "se": res.se,
                        "ci_low": res.ci_low,
                        "ci_high": res.ci_high,
                        "stat": res.stat,
                        "df": res.df,
                        "p": res.p,
                        "partial_r": res.partial_r,
                        "mean_importance": res.mean,
                        "se_type": "cluster(subject)" if clusters is not None else "classical",
                        "fixed_effects": group if group is not None and group not in d.dropped else "",
                        "covariates": ", ".join(cov_names),
                    }
                )
            )
            task.advance()
        frames.append(pd.concat(per_method, ignore_index=True))
    task.close()
    out = pd.concat(frames, ignore_index=True)
    out["q"] = family_q(out, fdr_family)
    out["fdr_family"] = fdr_family
    out["significant"] = out["q"] < alpha
    unfit = out["p"].isna() & (out["n"] > 0)
    if unfit.any():
        first = out[unfit].iloc[0]
        warnings.warn(
            f"{int(unfit.sum())} region model(s) could not be estimated (too few scans or the phenotype is "
            f"collinear with the covariates on them), e.g. {first['method']}/{first['region']}/{first['phenotype']}",
            BodyageWarning,
            stacklevel=2,
        )
    return out[REGION_MODEL_COLUMNS]


def region_gap_correlations(
    run: RunTables | str | os.PathLike[str],
    *,
    covariates: Sequence[str] | None = None,
    default_covariates: bool = True,
    correction: GapCorrection = "train",
    metric: RegionMetric | None = None,
    methods: Sequence[str] | None = None,
    level: RegionLevel = "region",
    grouping: Callable[[str], str] | None = None,
    alpha: float = ALPHA,
    fdr_family: FdrFamily = "method",
    gap: GapCorrectionResult | None = None,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Partial correlation of each region's importance with the corrected age gap.

    pingouin ``partial_corr`` (Pearson) controlling for the covariates (age, age² and sex
    unless ``default_covariates`` is false, plus ``covariates``), on each subject's first
    scan (scans of one subject are not independent); Benjamini–Hochberg over the regions
    of each method (``fdr_family`` ``"method"`` or ``"phenotype"``: there is no phenotype
    here), or over the regions of all methods together (``"all"``).

    Returns
    -------
    pandas.DataFrame
        ``method``, ``metric``, ``level``, ``region``, ``n``, ``r``, ``ci_low``,
        ``ci_high`` (95%), ``p``, ``q``, ``fdr_family``, ``significant``, ``covariates``,
        ``correction``.
    """
    import pingouin as pg

    check_family(fdr_family)
    tables = as_run(run)
    progress = progress or NO_PROGRESS
    gap = gap or correct_gap(tables, correction)
    scans = gap.scans
    cov, cov_names = resolve_covariates(tables, covariates, [], default_covariates=default_covariates)
    first = _first_visits(scans)
    meths = resolve_methods(tables, methods)
    task = progress.task("gap correlations", total=len(meths))
    frames = []
    for method in meths:
        met = resolve_metric(method, metric)
        matrix = importance_matrix(tables, method, met, level=level, grouping=grouping)
        rows = []
        base = pd.DataFrame({"gap": scans["gap"].to_numpy()})
        covar = [f"c{j}" for j in range(cov.shape[1])]
        for j, name in enumerate(cov.columns):
            base[covar[j]] = cov[name].to_numpy()
        for region in matrix.columns:
            data = base.assign(importance=matrix[region].to_numpy())[first].dropna()
            n = len(data)
            if n < len(covar) + 4 or data["importance"].nunique() < 2:
                rows.append(
                    {"region": str(region), "n": n, "r": np.nan, "ci_low": np.nan, "ci_high": np.nan, "p": np.nan}
                )
                continue
            res = pg.partial_corr(data=data, x="importance", y="gap", covar=covar or None)
            r = float(res["r"].iloc[0])
            lo, hi = pg.compute_esci(stat=r, nx=n - len(covar), ny=n - len(covar), eftype="r", decimals=12)
            rows.append(
                {
                    "region": str(region),
                    "n": n,
                    "r": r,
                    "ci_low": float(lo),
                    "ci_high": float(hi),
                    "p": float(res["p_val"].iloc[0]),
                }
            )
        block = pd.DataFrame(rows)
        block.insert(0, "level", level)
        block.insert(0, "metric", met)
        block.insert(0, "method", method)
        block["covariates"] = ", ".join(cov_names)
        block["correction"] = gap.correction
        frames.append(block)
        task.advance()
    task.close()
    out = pd.concat(frames, ignore_index=True)
    family: FdrFamily = "all" if fdr_family == "all" else "method"
    out["q"] = family_q(out, family)
    out["fdr_family"] = family
    out["significant"] = out["q"] < alpha
    head = [c for c in out.columns if c not in ("q", "fdr_family", "significant", "covariates", "correction")]
    return out[[*head, "q", "fdr_family", "significant", "covariates", "correction"]]


def _first_visits(scans: pd.DataFrame) -> np.ndarray:
    order = scans.sort_values(["subject_id", "visit"]).index
    keep = pd.Series(False, index=scans.index)
    keep[order[~scans.loc[order, "subject_id"].duplicated().to_numpy()]] = True
    return keep.to_numpy()
