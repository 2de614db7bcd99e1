"""``summary.md`` of ``bodyage report``: the headline numbers of a run in words.

:func:`summary_markdown` writes the age prediction (MAE beside the mean-age baseline and, on a
simulated cohort, the oracle), the failures, the most important regions per method
(:data:`TOP_IN_SUMMARY`, with the intervals of :mod:`analysis.region_summary`), the
phenotype effects with q-values and the regions they shift, the sanity checks, the
recovery of the planted ageing on a simulated study, and the missing steps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from analysis._typing import REGION_LEVEL_METHODS, baseline_label
from analysis.fdr import family_text
from analysis.floors import baseline_text
from analysis.recovery import ABS_MASS, declared_measures, importance_measure, region_importance
from analysis.region_summary import fmt_significant, header_note, read_context, region_line
from analysis.regionmodels import ALPHA
from analysis.report_gather import read_json_or_none
from analysis.run import STATS_DIR, RunTables
from analysis.stats_record import read_stats_record
from bodyage.accuracy import prediction_metrics, uninformative_note
from bodyage.region_names import display_name

SANITY_FILE = "sanity.json"
FAILURES_FILE = "failures.csv"
METRICS_FILE = "metrics.json"
#: regions listed per method in the summary
TOP_IN_SUMMARY = 8


def fmt_number(v: Any, digits: int = 2) -> str:
    """Format a number with a fixed number of decimals for the report's text.

    Parameters
    ----------
    v : Any
        The value; anything :class:`float` accepts.
    digits : int
        Decimals after the point.

    Returns
    -------
    str
        ``v`` with ``digits`` decimals, or ``"n/a"`` if it is not a finite number
        (missing, NaN, infinite or not numeric).
    """
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return f"{x:.{digits}f}" if math.isfinite(x) else "n/a"


def _q(v: Any) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.1e}" if x < 1e-3 else f"{x:.3f}"


def _ablation_baseline(run_root: Path | None) -> str | None:
    """The ``--baseline`` of the run's region-level attributions, from ``attribute.json`` (None if unknown)."""
    path = None if run_root is None else Path(run_root) / "attribute.json"
    if path is None or not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("arguments", {}).get("baseline")
    except (json.JSONDecodeError, AttributeError):
        return None
    return str(value) if value else None


def measure_text(measure: str, method: str = "ablation") -> str:
    """Words for an importance measure (|mass| is in years for region-level methods only).

    Parameters
    ----------
    measure : str
        The importance measure (a column of the attribution table, e.g. ``abs_mass``).
    method : str
        The attribution method it was measured for.

    Returns
    -------
    str
        ``"mean |mass|, years"`` (``"mean |mass|"`` for a voxel-level method), else
        ``"mean <measure>"``.
    """
    if measure != ABS_MASS:
        return f"mean {measure}"
    return "mean |mass|, years" if method in REGION_LEVEL_METHODS else "mean |mass|"


def _sanity_lines(value: Any, prefix: str = "", depth: int = 0) -> list[str]:
    """Flatten ``sanity.json`` to ``- key: value`` lines (two levels, ids never expected there)."""
    lines: list[str] = []
    if isinstance(value, Mapping):
        for k, v in value.items():
            if isinstance(v, Mapping) and v and all(_is_scalar(x) for x in v.values()) and len(v) <= 12:
                lines.append(f"- {prefix}{k}: " + ", ".join(f"{kk} {_scalar(x)}" for kk, x in v.items()))
            elif isinstance(v, Mapping) and depth < 2:
                lines += _sanity_lines(v, f"{prefix}{k} / ", depth + 1)
            elif isinstance(v, (list, tuple)):
                shown = ", ".join(_scalar(x) for x in v[:8]) + (" ..." if len(v) > 8 else "")
                lines.append(f"- {prefix}{k}: {shown}")
            else:
                lines.append(f"- {prefix}{k}: {_scalar(v)}")
    else:
        lines.append(f"- {prefix.rstrip(' /')}: {_scalar(value)}")
    return lines


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "passed" if v else "FAILED"
    if isinstance(v, float):
        return fmt_number(v, 3)
    if isinstance(v, (Mapping, list, tuple)):
        return json.dumps(v)[:80]
    return str(v)


def _failures(run_root: Path) -> tuple[int, dict[str, int]]:
    path = run_root / FAILURES_FILE
    if not path.is_file():
        return 0, {}
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return 0, {}
    by = df["stage"].astype(str).value_counts().to_dict() if "stage" in df.columns and len(df) else {}
    return len(df), {str(k): int(v) for k, v in by.items()}


def summary_markdown(
    tables: RunTables,
    run_root: Path,
    rec: Mapping[str, Any] | None,
    missing: Sequence[str],
    measures: Mapping[str, str] | None,
) -> str:
    """The text of ``summary.md``: the headline numbers of a run in words.

    Parameters
    ----------
    tables : RunTables
        The run's tables (predictions, and attributions if any).
    run_root : Path
        The run folder; ``metrics.json``, ``sanity.json``, ``failures.csv`` and
        ``RUN/stats`` are read from it when present.
    rec : Mapping[str, Any] or None
        The recovery of the planted ageing (:func:`analysis.recovery.recovery`), on a
        simulated study; None otherwise.
    missing : Sequence[str]
        The missing steps, one line each, listed at the end.
    measures : Mapping[str, str] or None
        Importance measure per method, over those the run declares.

    Returns
    -------
    str
        Markdown, newline-separated, without a trailing newline.
    """
    name = run_root.resolve().name
    lines = [f"# bodyage report: {name}", ""]
    pred = tables.predictions
    metrics = read_json_or_none(run_root / METRICS_FILE) or {}
    # accuracy from the predictions (never the bias-corrected ones: they use the true age)
    check = prediction_metrics(pred)
    mae = check["overall"]["mae"]
    warning = uninformative_note(check)
    lines += ["## Age prediction", ""]
    lines.append(
        f"- {len(pred)} scans of {pred['subject_id'].nunique()} subjects have an out-of-fold prediction "
        f"({pred['fold'].nunique()} folds). Mean absolute error {fmt_number(mae)} years, "
        f"against {fmt_number(check['baseline_mae'])} "
        f"for predicting each scan at the mean age of the other folds; correlation with age "
        f"r = {fmt_number(check['overall']['pearson_r'], 3)}."
    )
    if warning:
        lines.append(f"- **{warning}**")
    oracle = metrics.get("oracle_mae", rec.get("oracle_mae") if rec else None)
    if oracle is not None:
        lines.append(
            f"- The best possible predictor of this simulated cohort (the oracle) has MAE {fmt_number(oracle)} years: "
            f"the model's error is {fmt_number(float(mae) / float(oracle))} times the floor."
        )
    n_fail, by_stage = _failures(run_root)
    stages = ", ".join(f"{k} {v}" for k, v in sorted(by_stage.items()))
    lines.append(
        f"- Failures: {n_fail} scan(s) could not be processed" + (f" ({stages})" if stages else "") + " (failures.csv)."
    )
    lines.append("")

    lines += ["## Regions the model uses", ""]
    if tables.attributions is None:
        lines += ["No attributions yet: run `bodyage attribute RUN`.", ""]
    else:
        declared = dict(declared_measures(run_root))
        declared.update(measures or {})
        baseline = _ablation_baseline(run_root)
        context = read_context(run_root)
        for method in tables.methods:
            measure = importance_measure(method, declared)
            imp = region_importance(tables.attributions, method, measure)
            kind = "voxel-level"
            if method in REGION_LEVEL_METHODS:
                kind = f"region-level, {baseline_label(method, baseline)}" if baseline else "region-level"
            lines.append(
                f"**{method}** ({kind}; importance = {measure_text(measure, method)} over scans), "
                f"top {min(TOP_IN_SUMMARY, len(imp))} of {len(imp)} regions; {header_note(context, method, measure)}"
            )
            lines.append("")
            for i, (region, row) in enumerate(imp.head(TOP_IN_SUMMARY).iterrows(), start=1):
                lines.append(region_line(i, str(region), row, context, method, measure))
            lines.append("")

    lines += ["## Phenotypes and the age gap", ""]
    if warning:
        lines += [f"**{warning}**", ""]
    pm = run_root / STATS_DIR / "phenotype_models.parquet"
    if pm.is_file():
        res = pd.read_parquet(pm)
        sep = res[res["model"] == "separate"]
        options = (read_stats_record(run_root) or {}).get("arguments") or {}
        alpha = float(options["alpha"]) if isinstance(options.get("alpha"), (int, float)) else ALPHA
        lines += [
            "Effect of each phenotype on the bias-corrected age gap (separate models; years per unit, "
            "carriers vs non-carriers for 0/1 phenotypes; q: Benjamini-Hochberg over the phenotypes, a family of "
            "their own whatever `--fdr-family`):",
            "",
            "| phenotype | effect (years) | 95% CI | p | q | n |",
            "|---|---|---|---|---|---|",
        ]
        for _, r in sep.iterrows():
            mark = " *" if pd.notna(r["q"]) and r["q"] < alpha else ""
            lines.append(
                f"| {r['phenotype']} | {fmt_number(r['estimate'])}{mark} | "
                f"[{fmt_number(r['ci_low'])}, {fmt_number(r['ci_high'])}] | "
                f"{_q(r['p'])} | {_q(r['q'])} | {int(r['n'])} |"
            )
        lines += ["", f"\\* q < {alpha:g}.", ""]
        rm = run_root / STATS_DIR / "region_models.parquet"
        if rm.is_file():
            reg = pd.read_parquet(rm)
            sig = reg[reg["significant"]]
            family = str(reg["fdr_family"].iloc[0]) if "fdr_family" in reg and len(reg) else "method"
            lines.append(
                f"Regions whose importance a phenotype shifts (region models, significant at FDR {alpha:g}; "
                f"Benjamini-Hochberg over {family_text(family)}, FDR family `{family}`"
                + ("" if family == "all" else "; the FDR holds within each family, not across families")
                + "):"
            )
            lines.append("")
            if sig.empty:
                lines.append("- none")
            for (sig_method, pheno), sub in sig.groupby(["method", "phenotype"], sort=True, observed=True):
                hits = ", ".join(
                    f"{display_name(str(r))} ({fmt_significant(e)}, q {_q(q)})"
                    for r, e, q in zip(sub["region"], sub["estimate"], sub["q"], strict=True)
                )
                lines.append(f"- {sig_method} ({sub['metric'].iloc[0]}), {pheno}: {hits}")
            lines.append("")
    else:
        lines += ["No statistics yet: run `bodyage stats RUN`.", ""]

    lines += ["## Sanity checks", ""]
    sanity = read_json_or_none(run_root / SANITY_FILE)
    if sanity is None:
        lines += ["No sanity checks recorded (no RUN/sanity.json).", ""]
    else:
        lines += [*_sanity_lines(sanity), ""]

    if rec is not None:
        lines += ["## Recovery of the planted ageing (simulated study)", ""]
        lines.append(
            f"- {len(rec['planted_regions'])} regions carry planted age information (k): "
            f"{', '.join(display_name(r) for r in rec['planted_regions'])}."
        )
        for method, m in rec["methods"].items():
            n_hits = round(m["precision_at_k"] * m["k"]) if m["k"] else 0
            lines.append(
                f"- {method}: {n_hits} of the {m['k']} most important regions are planted "
                f"(precision@k {fmt_number(m['precision_at_k'])}; {baseline_text(m)}); "
                f"Spearman with the planted information {fmt_number(m['spearman'])}; "
                f"agreement with ablation {fmt_number(m['agreement_with_ablation'])}."
            )
            if m.get("clears_nulls") is not None:
                above = m["clears_nulls"]
                shown = ", ".join(display_name(r) for r in above[:TOP_IN_SUMMARY])
                shown += f" and {len(above) - TOP_IN_SUMMARY} more" if len(above) > TOP_IN_SUMMARY else ""
                lines.append(
                    f"  - {len(above)} region(s) above the null band of every null model"
                    + (f", most important first: {shown}." if above else ".")
                )
        for p, v in rec["phenotypes"].items():
            planted = ", ".join(display_name(r) for r in v["planted_regions"])
            found = "; ".join(
                f"{m}: {', '.join(display_name(x) for x in r) or 'none'}" for m, r in v["significant_regions"].items()
            )
            lines.append(
                f"- {p} ({'planted in ' + planted if v['planted'] else 'nothing planted'}): "
                f"gap effect {fmt_number(v['gap_effect'])} years "
                f"[{fmt_number(v['ci_low'])}, {fmt_number(v['ci_high'])}], q {_q(v['q'])}"
                + (f"; significant regions {found}" if found else "")
                + "."
            )
        lines += ["", "| goal | value | met |", "|---|---|---|"]
        for g in rec["goals"].values():
            met = {True: "yes", False: "**no**", None: "n/a"}[g["met"]]
            lines.append(f"| {g['goal']} | {_goal_text(g['value'])} | {met} |")
        lines.append("")

    if missing:
        lines += ["## Missing steps", ""]
        lines += [f"- {m}" for m in missing]
        lines.append("")
    return "\n".join(lines)


def _goal_text(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "(none)"
    if isinstance(value, Mapping):
        where = value.get("methods_with_significant_regions") or []
        return f"q {_q(value.get('q'))}" + (f"; regions in {', '.join(where)}" if where else "")
    if isinstance(value, (int, float)) and abs(value) < 1e-3:
        return _q(value)
    return fmt_number(value, 3)
