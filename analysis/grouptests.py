"""Two-group tests and effect sizes of :mod:`analysis.compare`.

:func:`two_groups`
    Welch's t-test or Mann–Whitney U (pingouin), Hedges' g with its 95% CI, and with
    Mann–Whitney the rank-biserial correlation with its 95% CI.
:func:`age_adjusted_gap`
    The ANCOVA ``gap ~ group + age + age²`` that compares the uncorrected age gap at equal age.

Hedges' g's CI is pingouin's ``compute_esci``: g ± t(n₁ + n₂ − 2) · SE with the
large-sample SE √((n₁ + n₂)/(n₁n₂) + g²/(2(n₁ + n₂))) (Hedges & Olkin 1985), not the
noncentral t. The rank-biserial correlation r = 2U/(n₁n₂) − 1 (pingouin's RBC; positive
when the first group tends to be larger) gets a CI from DeLong's placement-value variance
of U/(n₁n₂) (no normality, ties counted half), on Fisher's z scale (atanh, delta method)
so that it stays inside (−1, 1); at |r| = 1 it is not defined (NaN). In 2,000 normal
draws per design its coverage was 95.0–95.7 % for n = 20/40, 50/150 (r 0 to 0.43) and
93.5–96.7 % near separation (r 0.71–0.92, n 10/12 and 30/30).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from analysis._typing import GroupTest

#: fewest compared subjects (both groups) the age adjustment of the uncorrected gap is fitted on
MIN_AGE_FIT = 10


@dataclass(frozen=True)
class AgeAdjustedGap:
    """The ANCOVA ``gap ~ group + age + age²`` of the uncorrected gap (:func:`age_adjusted_gap`).

    Attributes
    ----------
    adjusted
        Every scan's gap minus the fitted age curve, ``gap − b₁(age − c) − b₂(age − c)²``
        with ``c`` the compared subjects' mean age: a group's mean of it is the group's
        gap at age ``c`` (NaN where gap or age is missing), shape (n,).
    estimate, se, dof
        Group coefficient (cohort minus reference, years), its HC2 standard error and the
        residual degrees of freedom ``n − 4``.
    residual_sd
        Residual standard deviation of the fit (years).
    """

    adjusted: np.ndarray = field(repr=False)
    estimate: float
    se: float
    dof: int
    residual_sd: float

    def test_row(self, confidence: float = 0.95) -> dict[str, object]:
        """The test columns of the comparison row: t, dof, p and the standardised difference.

        The standardised difference (``hedges_g`` column) is ``estimate / residual_sd`` and its
        CI the estimate's t-interval divided by ``residual_sd``.
        """
        from scipy.stats import t

        stat = self.estimate / self.se if self.se > 0 else float("nan")
        crit = float(t.ppf(0.5 + confidence / 2, self.dof))
        sd = self.residual_sd if self.residual_sd > 0 else float("nan")
        return {
            "test": "ancova",
            "statistic": stat,
            "dof": float(self.dof),
            "p": float(2 * t.sf(abs(stat), self.dof)),
            "difference": self.estimate,
            "hedges_g": self.estimate / sd,
            "g_ci_low": (self.estimate - crit * self.se) / sd,
            "g_ci_high": (self.estimate + crit * self.se) / sd,
            "rank_biserial": float("nan"),
            "rbc_ci_low": float("nan"),
            "rbc_ci_high": float("nan"),
        }


def age_adjusted_gap(
    gap: np.ndarray, age: np.ndarray, cohort: np.ndarray, reference: np.ndarray
) -> AgeAdjustedGap | None:
    """Fit the ANCOVA ``gap ~ group + age + age²`` (OLS, HC2 standard errors) on two groups.

    Parameters
    ----------
    gap, age
        Uncorrected age gap and chronological age of every scan (years), shape (n,).
    cohort, reference
        Positions of the compared subjects of the two groups (group 1 and 0).

    Returns
    -------
    AgeAdjustedGap or None
        ``None`` when fewer than :data:`MIN_AGE_FIT` compared subjects have both values,
        or the design is singular (e.g. age determines the group and age² too).
    """
    both = np.concatenate([cohort, reference])
    group = np.concatenate([np.ones(len(cohort)), np.zeros(len(reference))])
    ok = np.isfinite(gap[both]) & np.isfinite(age[both])
    if ok.sum() < MIN_AGE_FIT:
        return None
    both, group = both[ok], group[ok]
    centre = float(age[both].mean())
    a = age[both] - centre
    x = np.column_stack([np.ones_like(a), group, a, a**2])
    y = gap[both]
    if np.linalg.matrix_rank(x) < x.shape[1]:
        return None
    bread = np.linalg.inv(x.T @ x)
    coef = bread @ x.T @ y
    resid = y - x @ coef
    leverage = np.einsum("ij,jk,ik->i", x, bread, x)
    meat = (x * (resid**2 / (1.0 - leverage))[:, None]).T @ x
    cov = bread @ meat @ bread
    dof = len(y) - x.shape[1]
    adjusted = np.asarray(gap - coef[2] * (age - centre) - coef[3] * (age - centre) ** 2, dtype=float)
    return AgeAdjustedGap(
        adjusted=adjusted,
        estimate=float(coef[1]),
        se=float(np.sqrt(cov[1, 1])),
        dof=dof,
        residual_sd=float(np.sqrt((resid**2).sum() / dof)),
    )


def rank_biserial(x: np.ndarray, y: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Rank-biserial correlation of two samples with a DeLong / Fisher-z confidence interval.

    Parameters
    ----------
    x, y
        The two samples (finite values), e.g. cohort and reference.
    confidence
        Level of the interval.

    Returns
    -------
    tuple of float
        ``(r, low, high)``: ``r = 2U/(n_x n_y) − 1`` with ``U`` the Mann–Whitney statistic of
        ``x`` (ties half), equal to pingouin's ``RBC``; the interval is
        ``tanh(atanh(r) ± z · 2·SE(A)/(1 − r²))`` with ``SE(A)`` DeLong's placement-value
        standard error of ``A = U/(n_x n_y)``. NaN bounds when ``|r| = 1`` or the SE is 0.
    """
    from scipy.stats import norm, rankdata

    nx, ny = len(x), len(y)
    pooled = rankdata(np.concatenate([x, y]))
    # placements: for each x, the share of y below it (ties half), and for each y the share of x above it
    v_x = (pooled[:nx] - rankdata(x)) / ny
    v_y = 1.0 - (pooled[nx:] - rankdata(y)) / nx
    auc = float(v_x.mean())
    r = 2.0 * auc - 1.0
    nan = float("nan")
    if nx < 2 or ny < 2 or abs(r) >= 1.0:
        return r, nan, nan
    se_auc = float(np.sqrt(v_x.var(ddof=1) / nx + v_y.var(ddof=1) / ny))
    if not se_auc > 0:
        return r, nan, nan
    z = float(norm.ppf(0.5 + confidence / 2))
    half = z * 2.0 * se_auc / (1.0 - r**2)
    return r, float(np.tanh(np.arctanh(r) - half)), float(np.tanh(np.arctanh(r) + half))


def two_groups(x: np.ndarray, y: np.ndarray, test: GroupTest) -> dict[str, float]:
    """Test two samples and give their effect sizes.

    Parameters
    ----------
    x, y
        The samples (finite values): cohort and reference.
    test
        ``welch`` or ``mannwhitney``.

    Returns
    -------
    dict
        ``statistic`` (t or U of ``x``), ``dof`` (Welch's; NaN for Mann–Whitney), ``p``,
        ``hedges_g``, ``g_ci_low``, ``g_ci_high``, ``rank_biserial``, ``rbc_ci_low``,
        ``rbc_ci_high`` (NaN with ``welch``); all NaN when a sample has fewer than 2 values
        or both are constant.
    """
    import pingouin as pg

    nan = float("nan")
    out = {"statistic": nan, "dof": nan, "p": nan, "hedges_g": nan, "g_ci_low": nan, "g_ci_high": nan}
    out.update(rank_biserial=nan, rbc_ci_low=nan, rbc_ci_high=nan)
    if len(x) < 2 or len(y) < 2 or (np.ptp(x) == 0 and np.ptp(y) == 0):
        return out
    if test == "welch":
        res = pg.ttest(x, y, correction=True)
        out.update(statistic=float(res["T"].iloc[0]), dof=float(res["dof"].iloc[0]), p=float(res["p_val"].iloc[0]))
    else:
        res = pg.mwu(x, y)
        out.update(statistic=float(res["U_val"].iloc[0]), p=float(res["p_val"].iloc[0]))
        r, lo, hi = rank_biserial(x, y)
        out.update(rank_biserial=r, rbc_ci_low=lo, rbc_ci_high=hi)
    g = float(pg.compute_effsize(x, y, eftype="hedges"))
    lo, hi = pg.compute_esci(stat=g, nx=len(x), ny=len(y), eftype="hedges", decimals=12)
    out.update(hedges_g=g, g_ci_low=float(lo), g_ci_high=float(hi))
    return out
