"""Result tables on disk: tidy ``.parquet`` + ``.csv``, and the LaTeX view of each.

The tidy files hold every row; the LaTeX tables are what a thesis shows, so long tables
(regions × phenotypes) show the significant rows (at most :data:`MAX_TEX_ROWS`, fewest
q first), or the few smallest p-values when nothing is significant, and say so in the
notes. No table carries participant ids.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.agegap import gap_note
from analysis.design import (
    MISSING_COVARIATE,
    MISSING_GROUP,
    MISSING_PHENOTYPE,
    OTHER,
    covariate_list,
    exclusions_by,
    exclusions_of,
)
from analysis.fdr import family_text
from analysis.latex import Column, LatexTable, write_latex
from analysis.notes import summarise_warnings
from analysis.regionmodels import WHOLE_BODY
from bodyage.region_names import display_name

#: most rows a LaTeX table shows (a page)
MAX_TEX_ROWS = 30
#: rows shown when nothing is significant
TOP_WHEN_NONE = 10
LABEL_PREFIX = "tab:bodyage:"

METRIC_UNITS: dict[str, str] = {
    "mass": "years",
    "abs_mass": "years",
    "share": "share of body attribution",
    "enrichment": "share / volume share",
    "density": "per voxel",
}


def write_frame(df: pd.DataFrame, out_dir: str | os.PathLike[str], stem: str) -> list[Path]:
    """Write ``df`` as ``<stem>.parquet`` and ``<stem>.csv`` (atomically); return the paths."""
    from bodyage.atomic import write_with

    out = Path(out_dir)
    return [
        write_with(out / f"{stem}.parquet", lambda tmp: df.to_parquet(tmp, index=False)),
        write_with(out / f"{stem}.csv", lambda tmp: df.to_csv(tmp, index=False)),
    ]


def write_tex(
    df: pd.DataFrame,
    out_dir: str | os.PathLike[str],
    stem: str,
    table: LatexTable,
    *,
    captions: Mapping[str, str] | None = None,
) -> Path:
    """Write the LaTeX view ``<stem>.tex``, with its caption from ``captions`` if it has one.

    ``captions``: from :func:`analysis.captions.load_captions` (``bodyage stats --captions``).
    """
    from analysis.captions import caption_for

    caption = caption_for(captions or {}, stem)
    return write_latex(Path(out_dir) / f"{stem}.tex", df, replace(table, caption=caption) if caption else table)


def label(stem: str) -> str:
    r"""The ``\label`` of a table: ``tab:bodyage:<stem>``."""
    return LABEL_PREFIX + stem.replace("_", "-")


def _select_rows(df: pd.DataFrame, alpha: float, what: str, csv: str) -> tuple[pd.DataFrame, str]:
    sig = df[df["q"] < alpha].sort_values(["q", "p"])
    if sig.empty:
        shown = df[df["p"].notna()].sort_values("p").head(TOP_WHEN_NONE)
        return shown, f"No {what} is significant at FDR {alpha:g}; the {len(shown)} smallest p-values are shown."
    if len(sig) > MAX_TEX_ROWS:
        return (
            sig.head(MAX_TEX_ROWS),
            f"{len(sig)} {what}s are significant at FDR {alpha:g}; the {MAX_TEX_ROWS} with the smallest q are "
            f"shown, all rows are in {csv}.",
        )
    return sig, f"The {len(sig)} {what}(s) significant at FDR {alpha:g} are shown; all rows are in {csv}."


def with_note(table: LatexTable, note: str) -> LatexTable:
    """``table`` with ``note`` as its first note (unchanged when ``note`` is empty).

    ``run_stats`` puts :func:`analysis.agegap.gap_note` on every table resting on the age gap.
    """
    return replace(table, notes=(note, *table.notes)) if note else table


_REASONS = {
    MISSING_PHENOTYPE: "missing phenotype",
    MISSING_COVARIATE.rstrip(":"): "missing covariate",
    MISSING_GROUP: "missing group",
    OTHER: "other reasons (e.g. no age gap)",
}


def _reason(key: str) -> str:
    if key.startswith(MISSING_COVARIATE):
        return f"missing {key[len(MISSING_COVARIATE) :]}"
    return _REASONS.get(key, key)


def _counted(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{int(v)} ({_reason(k)})" for k, v in counts.items() if v)


def _none_text(counts: Sequence[Mapping[str, int]]) -> str:
    if all({MISSING_PHENOTYPE, MISSING_GROUP, OTHER} <= set(c) for c in counts):
        return "No scan was excluded."
    reasons = dict.fromkeys(_reason(k).removeprefix("missing ") for c in counts for k in c)
    return f"No scan was excluded for a missing {' or '.join(reasons) or 'value'}."


def exclusion_note(counts: Mapping[str, int]) -> str:
    """Sentence counting the scans a model left out, by reason.

    Parameters
    ----------
    counts
        ``{reason: n}`` as :attr:`analysis.design.Design.exclusions` or
        :func:`analysis.design.exclusions_of` give them (keys ``missing_phenotype``,
        ``missing_covariate:<name>``, ``missing_group``, ``other``).

    Returns
    -------
    str
        e.g. ``"Scans excluded: 4 (missing phenotype), 19 (missing bmi)."``, or
        ``"No scan was excluded."`` when every count is 0 (naming the reasons counted when
        ``counts`` does not cover them all).
    """
    text = _counted(counts)
    return f"Scans excluded: {text}." if text else _none_text([counts])


def exclusions_note(by_model: Mapping[str, Mapping[str, int]]) -> str:
    """Sentence counting the scans left out of each model (e.g. per phenotype), by reason.

    Parameters
    ----------
    by_model
        ``{model name: {reason: n}}`` (reasons as for :func:`exclusion_note`).

    Returns
    -------
    str
        e.g. ``"Scans excluded: bmi 4 (missing phenotype), 19 (missing x); smoking 19
        (missing x); none from the other models."``
    """
    parts = [f"{name} {text}" for name, counts in by_model.items() if (text := _counted(counts))]
    if not parts:
        return _none_text(list(by_model.values()))
    rest = "; none from the other models" if len(parts) < len(by_model) else ""
    return "Scans excluded: " + "; ".join(parts) + rest + "."


def missing_note(n_missing: dict[str, int]) -> str:
    """Sentence counting scans excluded for a missing phenotype value, per phenotype.

    For tables that have only ``n_missing_phenotype``; prefer :func:`exclusions_note`.
    """
    return exclusions_note({k: {MISSING_PHENOTYPE: v} for k, v in n_missing.items()})


# ----------------------------------------------------------------------------- age gap

_SUBSET_TITLES = {"overall": "Overall", "site": "By site", "sex": "By sex", "age band": "By age band (years)"}


def accuracy_table(acc: pd.DataFrame, correction: str) -> tuple[pd.DataFrame, LatexTable]:
    """LaTeX view of :func:`analysis.agegap.age_accuracy`.

    The notes give the overall MAE of the mean-age baseline beside the model's and, for a
    model that did not learn age (:func:`analysis.agegap.gap_note`), say so.
    """
    overall = acc[acc["subset"] == "overall"].iloc[0]
    warning = gap_note(acc)
    view = acc.copy()
    view["block"] = view["subset"].map(_SUBSET_TITLES).fillna(view["subset"])
    table = LatexTable(
        columns=(
            Column("Level", "level", "text"),
            Column("n", "n", "int"),
            Column("MAE", "mae", digits=2, group="Prediction"),
            Column("RMSE", "rmse", digits=2, group="Prediction"),
            Column("R²", "r2", digits=2, group="Prediction"),
            Column("r", "pearson_r", digits=2, group="Prediction"),
            Column("Mean", "mean_gap", digits=2, group="Age gap"),
            Column("r(age)", "gap_age_r", digits=2, group="Age gap"),
            Column("r(age), corrected", "corrected_gap_age_r", digits=2, group="Age gap"),
        ),
        caption="Accuracy of the out-of-fold age predictions, overall and by site, sex and age band",
        label=label("age_accuracy"),
        notes=(
            *((warning,) if warning else ()),
            "MAE and RMSE (years), R² and r compare predicted with chronological age (out-of-fold predictions); "
            "within a narrow age band R² compares with that band's small age variance and can be negative. "
            "The gap is predicted minus chronological age (years); its correlation with age, r(age), is the "
            f"regression-to-the-mean bias that the correction ({correction}) removes. "
            "Baseline: predicting each scan at the mean age of the other folds gives an MAE of "
            f"{overall['baseline_mae']:.2f} years overall.",
        ),
        section="block",
    )
    return view, table


# ----------------------------------------------------------------------------- phenotypes


def phenotype_table(res: pd.DataFrame, alpha: float) -> tuple[pd.DataFrame, LatexTable]:
    """LaTeX view of :func:`analysis.phenotypes.phenotype_models`: separate models, then the joint model."""
    view = res.copy()
    view["block"] = np.where(view["model"] == "joint", "Joint model (all phenotypes)", "Separate models")
    flags = []
    for _, row in view.iterrows():
        flag = []
        if row["boundary"]:
            flag.append("boundary")
        if not row["converged"]:
            flag.append("not converged")
        flags.append(", ".join(flag) or "--")
    view["flag"] = flags
    # one warning text per fitted model (the joint model's rows share one fit), counted by kind
    warned = summarise_warnings(
        [*res.loc[res["model"] == "separate", "warning"], *res.loc[res["model"] == "joint", "warning"].head(1)],
        where="the warning column of phenotype_models.csv",
    )
    first = res.iloc[0]
    mixed = bool(first["random_effect"])
    re_text = f"random intercept for {first['random_effect']}" if mixed else "no random intercept"
    fe_text = f", {first['fixed_effects']} as fixed effects" if first["fixed_effects"] else ""
    joint = (res["model"] == "joint").any()
    cols = [
        Column("Phenotype", "phenotype", "text"),
        Column("Effect", "per", "text"),
        Column("n", "n", "int"),
        Column("Estimate", "estimate", digits=None),
        Column("95% CI", "ci_low", "ci", digits=None, high="ci_high"),
        Column("p", "p", "p"),
        Column("q", "q", "p", stars="q"),
    ]
    if "df" in view and np.isfinite(view["df"].to_numpy(float)).any():
        cols.insert(5, Column("df", "df", digits=1))
    if (view["flag"] != "--").any():
        cols.append(Column("Flag", "flag", "text"))
    df_notes = list(dict.fromkeys(str(t) for t in res.get("df_note", pd.Series(dtype=str)) if t))
    by_model = exclusions_by(res[res["model"] == "separate"], "phenotype")
    if joint:
        by_model["the joint model"] = exclusions_of(res[res["model"] == "joint"].iloc[0])
    table = LatexTable(
        columns=tuple(cols),
        caption="Phenotype effects on the bias-corrected age gap (years)",
        label=label("phenotype_models"),
        notes=(
            f"Linear {'mixed ' if mixed else ''}models of the corrected age gap ({first['correction']}) on each "
            f"phenotype alone{' and on all jointly' if joint else ''}, adjusted for "
            f"{covariate_list(str(first['covariates']))}, {re_text}{fe_text}; {'REML' if mixed else 'OLS'}. "
            "Estimates are years of gap per unit of the phenotype, or carriers vs non-carriers (1 vs 0). "
            f"q: Benjamini--Hochberg over the phenotypes of each model, significant at {alpha:g}.",
            *(f"Tests: {t.rstrip('.')}." for t in df_notes),
            exclusions_note(by_model),
            *([warned] if warned else []),
        ),
        section="block",
    )
    return view, table


# ----------------------------------------------------------------------------- regions


def _scaled(df: pd.DataFrame, metric: str, columns: Sequence[str]) -> tuple[pd.DataFrame, str]:
    """Shares are shown in percent (of the body's attribution); other metrics unchanged."""
    unit = METRIC_UNITS.get(metric, metric)
    if metric != "share":
        return df, unit
    out = df.copy()
    for c in columns:
        out[c] = out[c] * 100.0
    return out, "percentage points of the body's attribution"


def region_table(
    res: pd.DataFrame, method: str, alpha: float, *, joint: bool = False
) -> tuple[pd.DataFrame, LatexTable]:
    """LaTeX view of one method's rows of :func:`analysis.regionmodels.region_models`.

    With ``joint``, the rows of :func:`analysis.regionjoint.joint_region_model`
    (each phenotype's whole-body row first; estimates in standard deviations).
    """
    sub = res[res["method"] == method]
    metric = str(sub["metric"].iloc[0])
    stem = f"region_joint_{method}" if joint else f"region_models_{method}"
    csv = "region_joint.csv" if joint else "region_models.csv"
    whole = sub[sub["region"] == WHOLE_BODY] if joint else sub.iloc[0:0]
    regions = sub[sub["region"] != WHOLE_BODY]
    shown, selection = _select_rows(regions, alpha, "region shift" if joint else "region effect", csv)
    order = {p: i for i, p in enumerate(dict.fromkeys(sub["phenotype"]))}
    view = pd.concat([whole.assign(_w=0), shown.assign(_w=1)], ignore_index=True)
    view = view.assign(_o=view["phenotype"].map(order)).sort_values(["_o", "_w", "q", "p"], kind="mergesort")
    view["block"] = view["phenotype"] + " (" + view["per"] + ")"
    view["region"] = view["region"].map(display_name)  # readable names; the CSV keeps the raw ones
    view, unit = (view, "standard deviations") if joint else _scaled(view, metric, ["estimate", "ci_low", "ci_high"])
    first = sub.iloc[0]
    se_text = (
        "standard errors cluster-robust by subject (repeat visits)"
        if str(first["se_type"]).startswith("cluster")
        else "classical standard errors"
    )
    fe_text = f" and {first['fixed_effects']} (fixed effects)" if first["fixed_effects"] else ""
    fam = str(regions["fdr_family"].iloc[0]) if "fdr_family" in regions and len(regions) else "method"
    unfit = summarise_warnings(
        ["could not be estimated"] * int((regions["p"].isna() & (regions["n"] > 0)).sum()),
        unit="region model",
        where=f"the rows without a p-value in {csv}",
    )
    if joint:
        n_ref = sorted({int(k) for k in sub["n_reference"]}) if "n_reference" in sub else []
        n_regions = regions["region"].nunique()
        held = f"{n_ref[0]}" if len(n_ref) == 1 else f"{n_ref[0]}--{n_ref[-1]}" if n_ref else "most"
        what = (
            f"Shifts of {method} attribution ({metric}) toward a region beyond the whole body. Each region's "
            "importance is divided by its residual standard deviation given the covariates, so a whole-body "
            "effect is one that moves every region by the same number of its standard deviations; the estimate is "
            "the phenotype's effect on the region minus the mean of the "
            f"reference regions (in {unit}), by OLS adjusted for {covariate_list(str(first['covariates']))}"
            f"{fe_text}. The reference is the regions that do not deviate ({held} of {n_regions}; at least half), "
            f"found by refitting until stable; the {WHOLE_BODY} rows are the effect on the reference mean."
        )
        caption = f"Phenotype-related shifts of {method} attribution between regions"
    else:
        what = (
            f"Region models of {method} attribution ({metric}; estimates in {unit}): OLS of each region's importance "
            f"on the phenotype, adjusted for {covariate_list(str(first['covariates']))}{fe_text}."
        )
        caption = f"Phenotype effects on regional {method} attribution ({metric})"
    columns = [
        Column("Region", "region", "text"),
        Column("n", "n", "int"),
        Column("Estimate", "estimate", digits=None),
        Column("95% CI", "ci_low", "ci", digits=None, high="ci_high"),
        Column("Partial r", "partial_r", digits=2),
        Column("p", "p", "p"),
        Column("q", "q", "p", stars="q"),
    ]
    if joint:
        columns.pop(4)
    table = LatexTable(
        columns=tuple(columns),
        caption=caption,
        label=label(stem),
        notes=(
            what,
            f"Estimates per unit of the phenotype or carriers vs non-carriers (1 vs 0); {se_text}; q: "
            f"Benjamini--Hochberg over {family_text(fam)} (FDR family: {fam}), significant at {alpha:g}"
            + (f"; the {WHOLE_BODY} rows form families of their own, split the same way." if joint else "."),
            selection,
            exclusions_note(exclusions_by(regions, "phenotype")),
            *([unfit] if unfit else []),
        ),
        section="block",
    )
    return view, table


def gap_correlation_table(res: pd.DataFrame, method: str, alpha: float) -> tuple[pd.DataFrame, LatexTable]:
    """LaTeX view of one method's rows of :func:`analysis.regionmodels.region_gap_correlations`."""
    sub = res[res["method"] == method]
    shown, selection = _select_rows(sub, alpha, "region", "region_gap_correlations.csv")
    shown = shown.assign(region=shown["region"].map(display_name))
    first = sub.iloc[0]
    fam = str(first["fdr_family"]) if "fdr_family" in sub else "method"
    unfit = summarise_warnings(
        ["could not be estimated"] * int(sub["r"].isna().sum()),
        unit="correlation",
        where="the rows without a p-value in region_gap_correlations.csv",
    )
    table = LatexTable(
        columns=(
            Column("Region", "region", "text"),
            Column("n", "n", "int"),
            Column("Partial r", "r", digits=2),
            Column("95% CI", "ci_low", "ci", digits=2, high="ci_high"),
            Column("p", "p", "p"),
            Column("q", "q", "p", stars="q"),
        ),
        caption=f"Partial correlations of regional {method} attribution with the corrected age gap",
        label=label(f"region_gap_correlations_{method}"),
        notes=(
            f"Pearson partial correlation of each region's {method} importance ({first['metric']}) with the corrected "
            f"age gap ({first['correction']}), controlling for {covariate_list(str(first['covariates']))}, on each "
            f"subject's first scan; q: Benjamini--Hochberg over {family_text(fam, phenotypes=False)} "
            f"(FDR family: {fam}), significant at {alpha:g}.",
            selection,
            *([unfit] if unfit else []),
        ),
    )
    return shown, table


# ----------------------------------------------------------------------------- comparisons


def comparison_table(
    tests: pd.DataFrame, alpha: float, *, cohort: str, reference: str, test: str
) -> tuple[pd.DataFrame, LatexTable]:
    """LaTeX view of :attr:`analysis.compare.ComparisonResult.tests`: the gaps, then significant regions.

    With the Mann–Whitney test the rank-biserial correlation and its CI sit beside Hedges' g.
    """
    from analysis.compare import UNCORRECTED_GAP

    gaps = tests[tests["region"] == ""]
    regions = tests[tests["region"] != ""]
    shown, selection = _select_rows(regions, alpha, "region", "comparison_tests.csv") if len(regions) else (regions, "")
    shown = shown.sort_values(["family", "q", "p"], kind="mergesort")
    view = pd.concat([gaps, shown], ignore_index=True)
    view["what"] = np.where(view["region"] == "", view["outcome"], view["region"].map(display_name))
    view["n_both"] = view["n_cohort"].astype(int).astype(str) + "/" + view["n_reference"].astype(int).astype(str)
    share = (view["metric"] == "share").to_numpy()
    view.loc[share, "difference"] = view.loc[share, "difference"] * 100.0
    view["block"] = np.where(
        view["region"] == "",
        "Age gap (years)",
        view["method"] + " (" + np.where(share, "share, percentage points", view["metric"]) + ")",
    )
    mwu = test != "welch"
    test_text = "Mann--Whitney U test" if mwu else "Welch's t-test"
    columns = [
        Column("Outcome", "what", "text"),
        Column("n", "n_both", "text"),
        Column("Difference", "difference", digits=None),
        Column("g", "hedges_g", digits=2, group="Hedges' g"),
        Column("95% CI", "g_ci_low", "ci", digits=2, high="g_ci_high", group="Hedges' g"),
    ]
    if mwu:
        columns += [
            Column("r", "rank_biserial", digits=2, group="Rank-biserial r"),
            Column("95% CI", "rbc_ci_low", "ci", digits=2, high="rbc_ci_high", group="Rank-biserial r"),
        ]
    columns.append(Column("q", "q", "p", stars="q"))
    notes = [
        f"{test_text}; n: cohort/reference; difference of means (cohort minus reference). "
        "Hedges' g with a 95% CI from its large-sample standard error and a t quantile on n1 + n2 - 2 degrees "
        "of freedom (pingouin compute_esci; not the noncentral t)"
        + (
            "; rank-biserial r = 2U/(n1 n2) - 1 (positive: the cohort tends to be larger) with a 95% CI from "
            "DeLong's variance of U/(n1 n2) on Fisher's z scale. "
            if mwu
            else ". "
        )
        + "p-values are in comparison_tests.csv; q: Benjamini--Hochberg within the age gaps and within the regions "
        "of each method. Mass is in years.",
    ]
    if (gaps["outcome"] == UNCORRECTED_GAP).any():
        notes.append(
            f"The {UNCORRECTED_GAP} row is the ANCOVA gap ~ group + age + age squared over both groups (OLS, "
            "HC2 standard error, t on n - 4 degrees of freedom) whatever the test above: its difference is the "
            "groups' gap difference at equal age (the raw gap falls with age, so groups of different ages differ "
            "in it without any effect), its g that difference over the residual SD."
        )
    table = LatexTable(
        columns=tuple(columns),
        caption=f"Cohort comparison: {cohort} vs {reference}",
        label=label("comparison_tests"),
        notes=(*notes, *([selection] if selection else [])),
        section="block",
    )
    return view, table


def balance_latex(balance: pd.DataFrame, *, matched: Sequence[str]) -> tuple[pd.DataFrame, LatexTable]:
    """LaTeX view of :func:`analysis.matching.balance_table`.

    "Before" describes every subject the filters selected (one scan each), "after" the
    matched groups; without matching only "before" is shown.
    """
    view = balance.copy()
    view["what"] = np.where(view["level"] == "", view["variable"], view["variable"] + " = " + view["level"])
    columns = [
        Column("Variable", "what", "text"),
        Column("Cohort", "cohort_mean_before", digits=2, group="Before matching"),
        Column("Reference", "reference_mean_before", digits=2, group="Before matching"),
        Column("SMD", "smd_before", digits=2, group="Before matching"),
    ]
    if matched:
        how = f"nearest-neighbour matching on {', '.join(matched)} without replacement"
        columns += [
            Column("Cohort", "cohort_mean_after", digits=2, group="After matching"),
            Column("Reference", "reference_mean_after", digits=2, group="After matching"),
            Column("SMD", "smd_after", digits=2, group="After matching"),
        ]
        what = (
            f"Means (shares for text variables) and standardised mean differences (SMD) of the groups the filters "
            f"selected (one scan per subject) and of the groups kept by {how}; |SMD| < 0.1 is good balance."
        )
    else:
        what = (
            "Means (shares for text variables) and standardised mean differences (SMD) of the groups the filters "
            "selected (one scan per subject); no matching. |SMD| < 0.1 is good balance."
        )
    table = LatexTable(
        columns=tuple(columns),
        caption="Covariate balance of the cohort comparison",
        label=label("comparison_balance"),
        notes=(what,),
    )
    return view, table
