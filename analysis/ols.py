"""One design, many outcomes: vectorised least squares for the region models.

The region models regress each region's importance on the same design (phenotype,
covariates, site indicators). Fitting 53 regions × 5 phenotypes × methods one
statsmodels model at a time costs a Python round trip and a full decomposition each;
here one QR decomposition of the design serves every region that shares the same
missing-value pattern (regions absent from a scan are NaN and drop that scan for that
region only), and the standard errors of the term of interest for all regions come from
a few matrix products.

Standard errors are classical (``t`` with ``n - p`` df), or cluster-robust (CR1, the
correction ``G/(G-1) · (n-1)/(n-p)`` and ``t`` with ``G - 1`` df, as statsmodels'
``cov_type="cluster"``) when clusters are given, e.g. subjects with repeat visits.
Tests compare both with statsmodels OLS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

#: relative size of the smallest kept diagonal element of R in the pivoted QR
RANK_TOL = 1e-9


@dataclass(frozen=True)
class ManyOLS:
    """Results for the term of interest, one entry per outcome column.

    Attributes
    ----------
    estimate, se, stat, p, ci_low, ci_high
        Estimate, standard error, t statistic, two-sided p-value and 95% CI.
    df
        Degrees of freedom of the t reference.
    n
        Rows used (rows where the outcome is finite).
    partial_r
        Partial correlation of the outcome with the term given the other columns
        (``t/√(t² + n - p)`` from the classical t, whatever the SE type).
    mean
        Mean of the outcome over the rows used.
    """

    estimate: FloatArray
    se: FloatArray
    stat: FloatArray
    p: FloatArray
    ci_low: FloatArray
    ci_high: FloatArray
    df: FloatArray
    n: npt.NDArray[np.int_]
    partial_r: FloatArray
    mean: FloatArray


def ols_many(
    X: FloatArray,
    Y: FloatArray,
    target: int,
    *,
    clusters: npt.ArrayLike | None = None,
) -> ManyOLS:
    """Regress every column of ``Y`` on ``X`` and report coefficient ``target``.

    Parameters
    ----------
    X
        ``(n, p)`` design with an intercept column; no missing values.
    Y
        ``(n, R)`` outcomes; NaN where missing (that row is left out for that column).
    target
        Column of ``X`` whose coefficient is reported.
    clusters
        ``(n,)`` cluster labels for cluster-robust standard errors, or ``None``.

    Returns
    -------
    ManyOLS
        NaN for a column whose rows leave the target term unidentifiable or no residual df.

    Notes
    -----
    Columns of ``X`` other than ``target`` that are collinear on a column's rows (e.g.
    ``sex[M]`` for a region present in men only) are dropped for that column (pivoted QR).
    """
    from scipy import sparse, stats

    r_cols = Y.shape[1]
    out = {k: np.full(r_cols, np.nan) for k in ("estimate", "se", "stat", "p", "ci_low", "ci_high", "df", "pr", "mean")}
    n_used = np.zeros(r_cols, dtype=int)
    finite = np.isfinite(Y)
    cl = None if clusters is None else np.unique(np.asarray(clusters), return_inverse=True)[1]
    patterns: dict[bytes, list[int]] = {}
    for j in range(r_cols):
        patterns.setdefault(np.packbits(finite[:, j]).tobytes(), []).append(j)
    for cols in patterns.values():
        rows = finite[:, cols[0]]
        n = int(rows.sum())
        n_used[cols] = n
        if n == 0:
            continue
        Xs = X[rows]
        keep, tpos = _identifiable(Xs, target)
        if tpos is None or n - len(keep) < 1:
            continue
        Xs = Xs[:, keep]
        Ys = Y[np.ix_(rows, np.asarray(cols, dtype=np.intp))]
        p = Xs.shape[1]
        q, r = np.linalg.qr(Xs)
        rinv = np.linalg.solve(r, np.eye(p))
        coef = rinv @ (q.T @ Ys)
        resid = Ys - Xs @ coef
        dof = n - p
        xtx_inv_row = rinv[tpos] @ rinv.T  # row `tpos` of (XᵀX)⁻¹
        s2 = (resid**2).sum(axis=0) / dof
        se_classic = np.sqrt(s2 * xtx_inv_row[tpos])
        b = coef[tpos]
        with np.errstate(divide="ignore", invalid="ignore"):
            t_classic = b / se_classic
            out["pr"][cols] = t_classic / np.sqrt(t_classic**2 + dof)
        if cl is None:
            se, df = se_classic, float(dof)
        else:
            codes = np.unique(cl[rows], return_inverse=True)[1]
            g = int(codes.max()) + 1
            if g < 2:
                continue
            h = Xs @ xtx_inv_row  # influence of each row on the target coefficient
            u = h[:, None] * resid
            indicator = sparse.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(g, n))
            sums = indicator @ u
            factor = g / (g - 1) * (n - 1) / (n - p)
            se = np.sqrt(factor * (sums**2).sum(axis=0))
            df = float(g - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            stat = b / se
        crit = float(stats.t.ppf(0.975, df))
        out["estimate"][cols] = b
        out["se"][cols] = se
        out["stat"][cols] = stat
        out["p"][cols] = 2 * stats.t.sf(np.abs(stat), df)
        out["ci_low"][cols] = b - crit * se
        out["ci_high"][cols] = b + crit * se
        out["df"][cols] = df
        out["mean"][cols] = Ys.mean(axis=0)
    return ManyOLS(
        estimate=out["estimate"],
        se=out["se"],
        stat=out["stat"],
        p=out["p"],
        ci_low=out["ci_low"],
        ci_high=out["ci_high"],
        df=out["df"],
        n=n_used,
        partial_r=out["pr"],
        mean=out["mean"],
    )


def _identifiable(X: FloatArray, target: int) -> tuple[list[int], int | None]:
    """Columns of ``X`` to keep and the target's position among them (``None``: not identifiable).

    Full-rank designs keep every column; otherwise a greedy maximal independent set of the
    other columns (in order, the intercept first) is kept, plus the target if it adds rank.
    """
    p = X.shape[1]
    if _rank(X) == p:
        return list(range(p)), target
    basis = _basis(X, [j for j in range(p) if j != target])
    if _rank(X[:, [*basis, target]]) == len(basis):
        return [], None
    keep = sorted([*basis, target])
    return keep, keep.index(target)


def _rank(X: FloatArray) -> int:
    if X.shape[1] == 0:
        return 0
    s = np.linalg.svd(X, compute_uv=False)
    return int((s > RANK_TOL * s[0]).sum()) if s.size and s[0] > 0 else 0


def _basis(X: FloatArray, columns: list[int]) -> list[int]:
    """A maximal independent subset of ``columns`` (greedy, in order)."""
    kept: list[int] = []
    for j in columns:
        if _rank(X[:, [*kept, j]]) > len(kept):
            kept.append(j)
    return kept
