"""LaTeX of ``recovery.json`` (:func:`recovery_latex`) and the writer of both files (:func:`write_recovery`).

Every method's precision@k stands beside its floors and nulls (:mod:`analysis.floors`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from analysis.floors import baseline_text
from analysis.latex import escape, format_number, format_p
from analysis.regionmodels import ALPHA
from bodyage.region_names import display_name

RECOVERY_FILE = "recovery.json"
RECOVERY_TEX = "recovery.tex"
#: name recorded for region-level methods: the mean over scans of |mass|
ABS_MASS = "abs_mass"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any, digits: int = 2) -> str:
    return format_number(v, digits) if _finite(v) else "--"


def _regions(names: Sequence[str], clears: Sequence[str] | None = None) -> str:
    """Region names as in the figures (:func:`~bodyage.region_names.display_name`); those in ``clears`` marked †."""
    mark = set(clears or ())
    return ", ".join(escape(display_name(n)) + (r"$^\dagger$" if n in mark else "") for n in names) if names else "--"


def recovery_latex(rec: Mapping[str, Any]) -> str:
    r"""LaTeX of a recovery dictionary: three tables (methods, phenotypes, goals).

    Needs ``booktabs``, ``siunitx`` and ``array`` (for ``p{}`` columns of region lists).
    Labels: ``tab:bodyage:recovery-methods``, ``-phenotypes``, ``-goals``.
    """
    lines: list[str] = []
    k = next((m["k"] for m in rec.get("methods", {}).values()), len(rec.get("planted_regions", [])))
    lines += [
        r"\begin{table}[htbp]",
        r"\centering",
        r"\footnotesize",
        r"\setlength{\tabcolsep}{3pt}",
        r"\hyphenpenalty=10000",
        r"\caption{Recovery of the planted ageing per attribution method. MAE "
        + _fmt(rec.get("mae"))
        + r"~years vs oracle "
        + _fmt(rec.get("oracle_mae"))
        + r"~years (ratio "
        + _fmt(rec.get("mae_ratio"))
        + r").}",
        r"\label{tab:bodyage:recovery-methods}",
        r"\begin{tabular}{l l r r >{\raggedright\arraybackslash}p{0.21\linewidth} r r "
        r">{\raggedright\arraybackslash}p{0.21\linewidth}}",
        r"\toprule",
        r"Method & Importance & {k} & {Precision@k} & Beside: floors and nulls & {Spearman} & {vs ablation} & "
        r"Top-k regions \\",
        r"\midrule",
    ]
    for method, m in rec.get("methods", {}).items():
        measure = "mean |mass|" if m.get("importance_measure") == ABS_MASS else m.get("importance_measure", "")
        lines.append(
            " & ".join(
                [
                    escape(method),
                    escape(measure),
                    str(m.get("k", "")),
                    _fmt(m.get("precision_at_k")),
                    escape(baseline_text(m)),
                    _fmt(m.get("spearman")),
                    _fmt(m.get("agreement_with_ablation")),
                    _regions(m.get("top_regions", []), m.get("clears_nulls")),
                ]
            )
            + r" \\"
        )
    if not rec.get("methods"):
        lines.append(r"\multicolumn{8}{l}{(no attributions: run \texttt{bodyage attribute})} \\")
    lines += [
        r"\bottomrule",
        r"\end{tabular}",
        r"\par\smallskip",
        r"\begin{minipage}{\linewidth}\footnotesize\raggedright",
        escape(
            f"k = {k} regions with planted information (region_information > 0): "
            + ", ".join(display_name(r) for r in rec.get("planted_regions", []))
            + ". Precision@k: fraction of them among the k most important regions. Beside it, what needs no "
            "trained model: the largest precision@k of the model-free floors (mean region volume, volume x "
            "intensity, between-scan spread of the regional mean signal, a univariate screen of regional mean "
            "signal and volume against age) and the same method on null models (randomised weights; a model "
            "trained on permuted ages): mean over copies [2.5-97.5 percentiles]. Spearman: rank correlation "
            "of region information with importance over all regions; vs ablation: Spearman with ablation's "
            "importance. Region-level methods are ranked by the mean over scans of |mass|, voxel methods by the "
            "measure named."
        )
        + (
            r" Top-k regions marked $^\dagger$ "
            + escape(
                "take a larger share of the trained model's importance than the 97.5 % share band of every "
                "null model (clears_nulls); names read as in the figures."
            )
            if any(m.get("clears_nulls") is not None for m in rec.get("methods", {}).values())
            else ""
        ),
        r"\end{minipage}",
        r"\end{table}",
        "",
    ]
    methods = list(rec.get("methods", {}))
    lines += [
        r"\begin{table}[htbp]",
        r"\centering",
        r"\footnotesize",
        r"\setlength{\tabcolsep}{3pt}",
        r"\hyphenpenalty=10000",
        r"\caption{Planted phenotype effects: effect on the corrected age gap (years per unit; carriers vs "
        r"non-carriers for binary phenotypes) and the regions whose importance the phenotype shifts at FDR "
        + _fmt(rec.get("alpha", ALPHA))
        + ".}",
        r"\label{tab:bodyage:recovery-phenotypes}",
        r"\begin{tabular}{l c S[table-format=-1.2] c r >{\raggedright\arraybackslash}p{0.18\linewidth} "
        r">{\raggedright\arraybackslash}p{0.27\linewidth}}",
        r"\toprule",
        r"Phenotype & Planted & {Gap effect} & 95\% CI & q & Planted regions & Significant regions \\",
        r"\midrule",
    ]
    for name, p in rec.get("phenotypes", {}).items():
        ci = (
            rf"[\num{{{_fmt(p.get('ci_low'))}}}, \num{{{_fmt(p.get('ci_high'))}}}]"
            if _finite(p.get("ci_low")) and _finite(p.get("ci_high"))
            else "--"
        )
        found = p.get("significant_regions", {})
        sig = r" \newline ".join(
            rf"\emph{{{escape(m)}}}: " + (_regions(found[m]) if found[m] else "none") for m in methods if m in found
        )
        cells = [
            escape(name),
            "yes" if p.get("planted") else "no",
            _fmt(p.get("gap_effect")) if _finite(p.get("gap_effect")) else "{--}",
            ci,
            format_p(p.get("q")),
            _regions(p.get("planted_regions", [])),
            sig or "--",
        ]
        lines.append(" & ".join(cells) + r" \\")
    if not rec.get("phenotypes"):
        lines.append(r"\multicolumn{7}{l}{(no phenotypes of the scenario in the cohort)} \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]

    lines += [
        r"\begin{table}[htbp]",
        r"\centering",
        r"\footnotesize",
        r"\caption{Goals of the validation on planted truth (those set for the default scenario).}",
        r"\label{tab:bodyage:recovery-goals}",
        r"\begin{tabular}{>{\raggedright\arraybackslash}p{0.55\linewidth} l l}",
        r"\toprule",
        r"Goal & Value & Met \\",
        r"\midrule",
    ]
    for g in rec.get("goals", {}).values():
        met = {True: "yes", False: "\\textbf{no}", None: "n/a"}[g["met"]]
        lines.append(f"{escape(g['goal'])} & {_goal_value(g['value'])} & {met} \\\\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def _goal_value(value: Any) -> str:
    if value is None:
        return "--"
    if isinstance(value, list):
        return escape(", ".join(map(str, value))) if value else "(none)"
    if isinstance(value, dict):
        q = value.get("q")
        where = value.get("methods_with_significant_regions") or []
        return "q = " + format_p(q) + ("; regions: " + escape(", ".join(where)) if where else "")
    if _finite(value):
        return format_p(value) if abs(value) < 1e-3 else _fmt(value, 3)
    return escape(str(value))


def write_recovery(rec: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``recovery.json`` and ``recovery.tex`` into ``out_dir`` (atomically); return the paths."""
    from bodyage.atomic import write_json, write_text

    out = Path(out_dir)
    return [write_json(out / RECOVERY_FILE, dict(rec)), write_text(out / RECOVERY_TEX, recovery_latex(rec))]
