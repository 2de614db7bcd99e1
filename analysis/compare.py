"""Cohort comparisons: ``bodyage compare RUN --cohort EXPR --reference EXPR [--match age,sex]``.

Steps (:func:`compare`):

1. ``--cohort`` and ``--reference`` are parsed by the restricted grammar of
   :mod:`analysis.filters` and applied to the scans (cohort columns, predictions, gap).
2. One scan per subject and group: a subject's earliest matching visit (scans of one
   subject are not independent). Subjects of the cohort are removed from the reference.
3. Optional nearest-neighbour matching without replacement on ``--match`` variables
   (:mod:`analysis.matching`), with a balance table of standardised mean differences
   before (the groups of step 2) and after.
4. For the corrected age gap, the uncorrected gap adjusted for age, and every region's
   importance per attribution method: Welch's t-test (default) or Mann–Whitney U
   (pingouin), Hedges' g with its 95% CI (pingouin), with Mann–Whitney also the
   rank-biserial correlation and its 95% CI, Benjamini–Hochberg q-values within each
   family (the gaps; the regions of one method).

The uncorrected gap (predicted minus chronological age) falls with age (regression to
the mean), so two groups of different ages differ in it whatever their ageing. Its row
is the ANCOVA ``gap ~ group + age + age²``
(:func:`analysis.grouptests.age_adjusted_gap`), fitted by OLS on the compared subjects
of both groups, whatever ``test``: the difference is the group
coefficient (the groups' gap difference at equal age, assuming one age curve for both),
tested with its HC2 standard error (Welch's in the two-group case) on t(n − 4); the
means are each group's gap at the compared subjects' mean age. The model holds the group
term so that a cohort effect cannot leak into the age curve (as it would in a fit without
it, or on the whole run), and spans both groups' ages (a fit on the reference alone would
extrapolate the curve to an older cohort). A two-sample test of the gap minus a fitted
age curve would not do: when age and group are correlated it ignores the uncertainty of
the curve (on age-related nulls, 22 % of p-values fell below 0.05). With
``correction="none"`` there is no corrected gap and only this row is compared.

Tests and effect sizes: :mod:`analysis.grouptests`.

Groups smaller than ``min_scans`` are an error, as is a filter that matches nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from analysis._typing import GROUP_TESTS, GapCorrection, GroupTest, RegionLevel, RegionMetric
from analysis.agegap import correct_gap
from analysis.fdr import benjamini_hochberg
from analysis.filters import parse_filter
from analysis.grouptests import MIN_AGE_FIT, age_adjusted_gap, two_groups
from analysis.matching import balance_table, match_nearest
from analysis.regionmodels import ALPHA, importance_matrix, resolve_methods, resolve_metric
from analysis.run import RunTables, as_run
from bodyage.errors import InputError
from bodyage.progress import NO_PROGRESS, Progress

#: smallest group a comparison accepts
MIN_SCANS = 3
#: family name of the age-gap outcomes
GAP_FAMILY = "age gap"
#: outcome names of the two age-gap rows
CORRECTED_GAP = "age gap (corrected)"
UNCORRECTED_GAP = "age gap (uncorrected, age-adjusted)"

TEST_COLUMNS: list[str] = [
    "family",
    "outcome",
    "method",
    "metric",
    "region",
    "test",
    "n_cohort",
    "n_reference",
    "mean_cohort",
    "mean_reference",
    "difference",
    "statistic",
    "dof",
    "p",
    "q",
    "significant",
    "hedges_g",
    "g_ci_low",
    "g_ci_high",
    "rank_biserial",
    "rbc_ci_low",
    "rbc_ci_high",
]


@dataclass(frozen=True)
class ComparisonResult:
    """A cohort comparison: who was compared and the tidy result tables.

    Attributes
    ----------
    cohort, reference
        The filters, normalised (e.g. ``diabetes == 1``).
    match
        Matching variables (empty: no matching).
    test
        ``welch`` or ``mannwhitney``.
    correction
        Age-gap correction.
    n_cohort, n_reference_pool, n_reference
        Subjects in the cohort, in the reference before matching, and compared.
    balance
        :func:`analysis.matching.balance_table`: "before" compares every subject the
        filters selected (one scan each), "after" the matched groups.
    tests
        One row per outcome, columns :data:`TEST_COLUMNS` (``rank_biserial`` and its CI
        with ``mannwhitney`` only, NaN otherwise).
    notes
        Counts of what was excluded and why, as sentences.
    """

    cohort: str
    reference: str
    match: tuple[str, ...]
    test: GroupTest
    correction: GapCorrection
    n_cohort: int
    n_reference_pool: int
    n_reference: int
    balance: pd.DataFrame = field(repr=False)
    tests: pd.DataFrame = field(repr=False)
    notes: tuple[str, ...] = ()

    def significant(self, alpha: float = ALPHA) -> pd.DataFrame:
        """Rows of :attr:`tests` with ``q < alpha``, most significant first."""
        return self.tests[self.tests["q"] < alpha].sort_values("q").reset_index(drop=True)


def _first_scans(scans: pd.DataFrame, mask: np.ndarray) -> np.ndarray:
    sel = scans[mask].sort_values(["subject_id", "visit"])
    sel = sel[~sel["subject_id"].duplicated()]
    return np.sort(scans.index.get_indexer(sel.index))


def compare(
    run: RunTables | str | os.PathLike[str],
    cohort: str,
    reference: str,
    *,
    match: Sequence[str] | str | None = ("age", "sex"),
    methods: Sequence[str] | None = None,
    metric: RegionMetric | None = None,
    test: GroupTest = "welch",
    correction: GapCorrection = "train",
    level: RegionLevel = "region",
    grouping: Callable[[str], str] | None = None,
    ratio: int = 1,
    caliper: float | None = None,
    seed: int = 0,
    min_scans: int = MIN_SCANS,
    alpha: float = ALPHA,
    progress: Progress | None = None,
) -> ComparisonResult:
    """Compare a cohort with a (matched) reference group.

    Parameters
    ----------
    run
        Run tables or a run folder.
    cohort, reference
        Filters (:mod:`analysis.filters`), e.g. ``"diabetes == 1"`` and ``"diabetes == 0"``.
    match
        Matching variables (a sequence or ``"age,sex"``); ``None`` or empty: no matching.
    methods, metric, level, grouping
        Attribution methods and importance (as :func:`analysis.regionmodels.region_models`);
        without attributions only the age gaps are compared.
    test
        ``welch`` (Welch's t) or ``mannwhitney`` (Mann–Whitney U).
    correction
        Age-gap correction (:func:`analysis.agegap.correct_gap`).
    ratio, caliper, seed
        Matching options (:func:`analysis.matching.match_nearest`).
    min_scans
        Smallest accepted group.
    alpha
        FDR level of the ``significant`` column.
    progress
        Progress display.

    Returns
    -------
    ComparisonResult

    Raises
    ------
    InputError
        For a malformed filter, a filter column that does not exist, a filter matching
        no scan, a group smaller than ``min_scans`` (before or after matching), an
        unknown test, matching variable or method.
    """
    if test not in GROUP_TESTS:
        raise InputError(f"test {test!r} is not one of {', '.join(GROUP_TESTS)}")
    tables = as_run(run)
    progress = progress or NO_PROGRESS
    gap = correct_gap(tables, correction)
    scans = gap.scans
    f_c = parse_filter(cohort, option="--cohort")
    f_r = parse_filter(reference, option="--reference")
    m_c = f_c.mask(scans, option="--cohort")
    m_r = f_r.mask(scans, option="--reference")
    for option, flt, m in (("--cohort", f_c, m_c), ("--reference", f_r, m_r)):
        if not m.any():
            raise InputError(f"{option} {flt.text!r} matches no scans (of {len(scans)})")
    notes: list[str] = []
    c_idx = _first_scans(scans, m_c)
    r_all = _first_scans(scans, m_r)
    extra = int(m_c.sum()) - len(c_idx) + int(m_r.sum()) - len(r_all)
    if extra:
        notes.append(f"{extra} later visit(s) of subjects already selected were left out (one scan per subject).")
    cohort_subjects = set(scans["subject_id"].to_numpy()[c_idx])
    in_both = np.isin(scans["subject_id"].to_numpy()[r_all], list(cohort_subjects))
    r_idx = r_all[~in_both]
    if in_both.any():
        notes.append(f"{int(in_both.sum())} subject(s) matching both filters were kept in the cohort only.")
    for option, flt, idx in (("--cohort", f_c, c_idx), ("--reference", f_r, r_idx)):
        if len(idx) < min_scans:
            raise InputError(f"{option} {flt.text!r} selects {len(idx)} subject(s); at least {min_scans} are needed")
    match_vars = _match_variables(match)
    balance_vars = list(dict.fromkeys([*match_vars, "age", "sex"]))
    if match_vars:
        matching = match_nearest(scans, c_idx, r_idx, match_vars, ratio=ratio, caliper=caliper, seed=seed)
        if matching.n_missing:
            notes.append(f"{matching.n_missing} scan(s) with a missing matching variable were left out.")
        if matching.n_unmatched:
            notes.append(f"{matching.n_unmatched} cohort subject(s) found no match and were left out.")
        if len(matching.cohort) < min_scans:
            raise InputError(
                f"matching on {', '.join(match_vars)} kept {len(matching.cohort)} cohort subject(s) of "
                f"--cohort {f_c.text!r}; at least {min_scans} are needed"
            )
        balance = balance_table(scans, c_idx, r_idx, balance_vars, matching.cohort, matching.reference)
        c_use, r_use = matching.cohort, matching.reference
    else:
        balance = balance_table(scans, c_idx, r_idx, balance_vars)
        c_use, r_use = c_idx, r_idx

    outcomes: list[tuple[str, str, str, str, str, np.ndarray]] = []
    if gap.correction != "none":
        outcomes.append((GAP_FAMILY, CORRECTED_GAP, "", "", "", scans["gap"].to_numpy(float)))
    age = scans["age"].to_numpy(float)
    ancova = age_adjusted_gap(scans["age_gap"].to_numpy(float), age, c_use, r_use)
    if ancova is None:
        notes.append(f"The uncorrected gap was not compared: its age adjustment needs at least {MIN_AGE_FIT} subjects.")
        outcomes.append((GAP_FAMILY, UNCORRECTED_GAP, "", "", "", np.full(len(scans), np.nan)))
    else:
        if age[c_use].min() > age[r_use].max() or age[c_use].max() < age[r_use].min():
            notes.append(
                "The ages of the cohort and the reference do not overlap: the age-adjusted uncorrected gap rests "
                "on the assumed age curve."
            )
        outcomes.append((GAP_FAMILY, UNCORRECTED_GAP, "", "", "", ancova.adjusted))
    if tables.attributions is not None:
        for method in resolve_methods(tables, methods):
            met = resolve_metric(method, metric)
            matrix = importance_matrix(tables, method, met, level=level, grouping=grouping)
            for region in matrix.columns:
                outcomes.append((method, "importance", method, met, str(region), matrix[region].to_numpy(float)))
    task = progress.task("comparisons", total=len(outcomes))
    rows = []
    for family, outcome, method, metric_name, region, values in outcomes:
        x = values[c_use]
        y = values[r_use]
        x, y = x[np.isfinite(x)], y[np.isfinite(y)]
        row: dict[str, object] = {
            "family": family,
            "outcome": outcome,
            "method": method,
            "metric": metric_name,
            "region": region,
            "test": test,
            "n_cohort": len(x),
            "n_reference": len(y),
            "mean_cohort": float(x.mean()) if len(x) else np.nan,
            "mean_reference": float(y.mean()) if len(y) else np.nan,
        }
        row["difference"] = row["mean_cohort"] - row["mean_reference"]  # type: ignore[operator]
        row.update(two_groups(x, y, test))
        if outcome == UNCORRECTED_GAP and ancova is not None:
            row.update(ancova.test_row())
        rows.append(row)
        task.advance()
    task.close()
    out = pd.DataFrame(rows)
    out["q"] = np.nan
    for _, members in out.groupby("family", sort=False).groups.items():
        out.loc[members, "q"] = benjamini_hochberg(out.loc[members, "p"].to_numpy())
    out["significant"] = out["q"] < alpha
    return ComparisonResult(
        cohort=str(f_c),
        reference=str(f_r),
        match=tuple(match_vars),
        test=test,
        correction=gap.correction,
        n_cohort=len(c_use),
        n_reference_pool=len(r_idx),
        n_reference=len(r_use),
        balance=balance,
        tests=out[TEST_COLUMNS],
        notes=tuple(notes),
    )


def _match_variables(match: Sequence[str] | str | None) -> list[str]:
    if match is None:
        return []
    if isinstance(match, str):
        match = [m for m in (p.strip() for p in match.split(",")) if m]
    return list(dict.fromkeys(match))


def default_out_dir(run_root: Path, cohort: str, reference: str) -> Path:
    """``RUN/compare/<slug>``: a readable slug of the two filters plus a short hash."""
    text = f"{cohort} vs {reference}"
    slug = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "comparison"
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    return run_root / "compare" / f"{slug}_{digest}"


def write_comparison(
    result: ComparisonResult,
    out_dir: str | os.PathLike[str],
    *,
    alpha: float = ALPHA,
    figures: bool = True,
) -> list[Path]:
    """Write a comparison: tidy tables, LaTeX and a figure into ``out_dir``.

    Files: ``comparison_tests.{parquet,csv,tex}``, ``comparison_balance.{parquet,csv,tex}``,
    ``comparison_effects.{pdf,png}`` (Hedges' g of the gaps and the top regions).
    """
    from analysis import figures as figs
    from analysis import tables as tab

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = tab.write_frame(result.tests, out, "comparison_tests")
    view, spec = tab.comparison_table(
        result.tests, alpha, cohort=result.cohort, reference=result.reference, test=result.test
    )
    spec = replace(
        spec,
        notes=(
            f"{result.n_cohort} cohort and {result.n_reference} reference subject(s) "
            f"(of {result.n_reference_pool} in the reference before matching).",
            *result.notes,
            *spec.notes,
        ),
    )
    written.append(tab.write_tex(view, out, "comparison_tests", spec))
    written += tab.write_frame(result.balance, out, "comparison_balance")
    view, spec = tab.balance_latex(result.balance, matched=result.match)
    written.append(tab.write_tex(view, out, "comparison_balance", spec))
    if figures:
        written += figs.comparison_plot(result.tests, out, title=f"{result.cohort}  vs  {result.reference}")
    return written


def run_compare(
    run: RunTables | str | os.PathLike[str],
    cohort: str,
    reference: str,
    *,
    out: str | os.PathLike[str] | None = None,
    match: Sequence[str] | str | None = ("age", "sex"),
    methods: Sequence[str] | None = None,
    metric: RegionMetric | None = None,
    test: GroupTest = "welch",
    correction: GapCorrection = "train",
    level: RegionLevel = "region",
    grouping: Callable[[str], str] | None = None,
    ratio: int = 1,
    caliper: float | None = None,
    seed: int = 0,
    alpha: float = ALPHA,
    progress: Progress | None = None,
) -> tuple[ComparisonResult, Path]:
    """``bodyage compare``: :func:`compare`, then :func:`write_comparison` and a ``run.json``.

    The parameters other than ``out`` are those of :func:`compare`.

    Parameters
    ----------
    out
        Output folder; default ``RUN/compare/<slug of the filters>``.

    Returns
    -------
    tuple of (ComparisonResult, Path)
        The result and the output folder.
    """
    from bodyage.provenance import build_run_record, finish_run_record, write_record

    tables = as_run(run)
    if out is None:
        if tables.root is None:
            raise InputError("run tables built in memory need an output folder (out=...)")
        out_dir = default_out_dir(tables.root, cohort, reference)
    else:
        out_dir = Path(out)
    arguments = {
        "run": str(tables.root) if tables.root else None,
        "cohort": cohort,
        "reference": reference,
        "match": _match_variables(match),
        "methods": list(methods) if methods is not None else None,
        "metric": metric,
        "test": test,
        "correction": correction,
        "level": level,
        "ratio": ratio,
        "caliper": caliper,
        "alpha": alpha,
    }
    record = build_run_record(
        "compare", arguments, seed=seed, extra={"study": str(tables.study_root) if tables.study_root else None}
    )
    result = compare(
        tables,
        cohort,
        reference,
        match=match,
        methods=methods,
        metric=metric,
        test=test,
        correction=correction,
        level=level,
        grouping=grouping,
        ratio=ratio,
        caliper=caliper,
        seed=seed,
        alpha=alpha,
        progress=progress,
    )
    written = write_comparison(result, out_dir, alpha=alpha)
    write_record(
        out_dir / "run.json",
        finish_run_record(
            record,
            outputs=sorted(p.name for p in written),
            n_cohort=result.n_cohort,
            n_reference=result.n_reference,
            notes=list(result.notes),
        ),
    )
    return result, out_dir
