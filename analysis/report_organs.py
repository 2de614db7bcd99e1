r"""``bodyage report DIR`` on a clocks folder: the organ-age report.

:func:`write_organ_report` collects what ``bodyage stats DIR`` wrote (``DIR/stats``:
the clocks' accuracy, the table "organ age gaps by phenotype", the clock × clock
correlations; ``DIR/figures/clock_correlations``) into a report folder (default
``reports/<DIR-name>/``), and on a simulated study writes ``DIR/clock_recovery.json``
(:func:`analysis.clock_recovery.clock_recovery`; the organ gap models are read from
``DIR/stats`` when current, else fitted with the defaults) and its LaTeX table. It
writes ``report.tex`` (an ``article`` with the organ-age page that compiles with
``pdflatex``; ``pdf=True`` compiles it), ``summary.md`` and ``report.json``.

Each clock is also an ordinary run folder: ``bodyage report DIR/<clock>`` reports it alone.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.clock_recovery import CLOCK_RECOVERY_FILE, GOALS, TRUTH_TABLE, clock_recovery
from analysis.latex import escape, format_number
from analysis.organ_outputs import CORRELATION_FIGURE
from analysis.organ_stats import CLOCKS_FILE, ORGAN_AGES_FILE, ClockTables, load_clocks, organ_gap_models
from analysis.recovery import TRUTH_FILE
from analysis.regionmodels import ALPHA
from analysis.report import REPORT_RECORD, REPORT_TEX, SUMMARY_MD, default_out, previous_outputs, remove_stale_outputs
from analysis.report_tex import PREAMBLE, compile_pdf
from analysis.run import FIGURES_DIR, STATS_DIR
from analysis.stats_record import read_stats_record
from bodyage.errors import InputError

CLOCK_RECOVERY_TEX = "clock_recovery.tex"
#: tables of ``DIR/stats`` on the organ-age page, in order
ORGAN_TABLES: tuple[str, ...] = ("clocks", "organ_gap_models", "clock_correlations")


@dataclass(frozen=True)
class OrganReportResult:
    """What :func:`write_organ_report` wrote."""

    out_dir: Path
    report_tex: Path
    summary_md: Path
    recovery: dict[str, Any] | None = field(repr=False)
    recovery_json: Path | None
    pdf: Path | None
    missing: tuple[str, ...] = ()
    files: tuple[Path, ...] = ()

    def summary(self) -> list[str]:
        """A few lines for the command line."""
        lines = [f"organ-age report: {self.out_dir}"]
        if self.recovery is not None:
            for clock, e in self.recovery["clocks"].items():
                lines.append(
                    f"{clock}: r planted {_f(e['r_planted'])}, specific {_f(e['r_planted_specific'])}"
                    + (" (planted)" if e["planted"] else "")
                    + ("" if e["informative"] else " [uninformative]")
                )
            for p, v in self.recovery["phenotypes"].items():
                lines.append(
                    f"{p}: significant {', '.join(v['significant_clocks']) or 'none'}; "
                    f"planted {', '.join(v['planted_clocks']) or 'none'}"
                )
        lines.extend(f"missing: {m}" for m in self.missing)
        if self.pdf is not None:
            lines.append(f"pdf: {self.pdf}")
        return lines


def _f(v: Any, digits: int = 2) -> str:
    return "n/a" if v is None else f"{float(v):.{digits}f}"


def stats_current(tab: ClockTables) -> bool:
    """Whether ``DIR/stats`` was made from the folder's present ``organ_ages.parquet`` and ``clocks.json``."""
    from bodyage.provenance import file_sha256

    if tab.root is None:
        return False
    record = read_stats_record(tab.root)
    inputs = (record or {}).get("inputs")
    if not isinstance(inputs, Mapping):
        return False
    for name, file in (("organ_ages", ORGAN_AGES_FILE), ("clocks", CLOCKS_FILE)):
        recorded = (inputs.get(name) or {}).get("sha256")
        path = tab.root / file
        if not path.is_file() or recorded != file_sha256(path):
            return False
    return True


def write_organ_report(
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    alpha: float = ALPHA,
    pdf: bool = False,
) -> OrganReportResult:
    """Write the organ-age report of a clocks folder (see the module docstring).

    Raises
    ------
    RunError, StudyError
        If the folder is not a clocks folder or its study is missing; if ``pdf`` and
        ``pdflatex`` fails.
    InputError
        If the report folder is the clocks folder.
    """
    from bodyage.atomic import write_json, write_text
    from bodyage.provenance import build_run_record, finish_run_record, write_record

    tab = load_clocks(folder)
    root = Path(folder)
    out_dir = Path(out) if out is not None else default_out(root)
    if out_dir.resolve() == root.resolve():
        raise InputError(f"{out_dir}: the report folder must not be the clocks folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    record = build_run_record(
        "report",
        {"clocks": str(root), "out": str(out_dir), "alpha": alpha, "pdf": pdf},
        inputs={"organ_ages": root / ORGAN_AGES_FILE, "clocks": root / CLOCKS_FILE},
    )
    previous = previous_outputs(out_dir)
    written: list[Path] = []
    missing: list[str] = []
    current = stats_current(tab)
    if not (root / STATS_DIR / "organ_gap_models.parquet").is_file():
        missing.append(f"no organ statistics: run `bodyage stats {root}`")
    elif not current:
        missing.append(f"DIR/stats was made from other tables or did not finish: run `bodyage stats {root}` again")
    tables: list[str] = []
    if current:
        for stem in ORGAN_TABLES:
            for suffix in (".tex", ".csv"):
                src = root / STATS_DIR / f"{stem}{suffix}"
                if src.is_file():
                    written.append(_copy(src, out_dir / STATS_DIR / src.name))
            if (root / STATS_DIR / f"{stem}.tex").is_file():
                tables.append(f"{STATS_DIR}/{stem}")
    figure = None
    for suffix in (".pdf", ".png"):
        src = root / FIGURES_DIR / f"{CORRELATION_FIGURE}{suffix}"
        if current and src.is_file():
            written.append(_copy(src, out_dir / FIGURES_DIR / src.name))
            figure = figure or f"{FIGURES_DIR}/{src.name}"

    rec = rec_json = None
    study = tab.study_root
    if study is not None and (study / TRUTH_FILE).is_file() and (study / TRUTH_TABLE).is_file():
        if current:
            models = pd.read_parquet(root / STATS_DIR / "organ_gap_models.parquet")
            args = ((read_stats_record(root) or {}).get("arguments")) or {}
            alpha_used = float(args.get("alpha", alpha))
            models = models.assign(significant=models["q"] < alpha) if alpha_used != alpha else models
        else:
            models = organ_gap_models(tab, alpha=alpha)
        rec = clock_recovery(tab, models, alpha=alpha)
        rec["source"] = "DIR/stats" if current else "fitted by report with the defaults of stats"
        rec_json = write_json(root / CLOCK_RECOVERY_FILE, rec)
        written.append(write_json(out_dir / CLOCK_RECOVERY_FILE, rec))
        written.append(write_text(out_dir / CLOCK_RECOVERY_TEX, recovery_latex(rec)))

    report_tex = write_text(out_dir / REPORT_TEX, _document(root, tables, figure, rec is not None, missing))
    written.append(report_tex)
    summary = write_text(out_dir / SUMMARY_MD, _summary(root, tab, rec, missing))
    written.append(summary)
    pdf_path = compile_pdf(report_tex) if pdf else None
    if pdf_path is not None:
        written.append(pdf_path)
    rel = sorted(str(p.relative_to(out_dir)) for p in written)
    remove_stale_outputs(out_dir, previous, set(rel) | {REPORT_RECORD})
    record_path = write_record(out_dir / REPORT_RECORD, finish_run_record(record, outputs=rel, missing=missing))
    written.append(record_path)
    return OrganReportResult(
        out_dir=out_dir,
        report_tex=report_tex,
        summary_md=summary,
        recovery=rec,
        recovery_json=rec_json,
        pdf=pdf_path,
        missing=tuple(missing),
        files=tuple(written),
    )


def _copy(src: Path, dst: Path) -> Path:
    from bodyage.atomic import write_with

    return write_with(dst, lambda tmp: shutil.copyfile(src, tmp))


def _names(values: Sequence[str]) -> str:
    return escape(", ".join(values)) if values else "none"


def recovery_latex(rec: Mapping[str, Any]) -> str:
    """Two LaTeX tables: each clock's r with the planted deviations; each phenotype's clocks."""
    lines = [
        r"\begin{table}[htbp]",
        r"\centering",
        r"\footnotesize",
        r"\caption{Organ clocks against the planted organ ageing}",
        r"\label{tab:bodyage:clock-recovery}",
        r"\begin{tabular}{l l l c c}",
        r"\toprule",
        r"Clock & Planted & Informative & $r$ planted & $r$ specific \\",
        r"\midrule",
    ]
    for clock, e in rec["clocks"].items():
        lines.append(
            f"{escape(clock)} & {'yes' if e['planted'] else 'no'} & {'yes' if e['informative'] else 'no'} & "
            f"{_r_cell(e['r_planted'], e['r_planted_ci'])} & "
            f"{_r_cell(e['r_planted_specific'], e['r_planted_specific_ci'])}"
            r" \\"
        )
    lines += [
        r"\bottomrule",
        r"\end{tabular}",
        r"\par\smallskip",
        r"\begin{minipage}{\linewidth}\footnotesize",
        escape(
            "r planted: Pearson r (95% CI) of the clock's corrected gap with the planted organ deviation (mean "
            "biological age minus age over its regions); r specific: of the conditioned gap with the organ-specific "
            f"deviation (the organ deviation minus the shared deviation, {rec['shared_source']}). Goals: a planted "
            f"clock r >= {GOALS['r_planted']:g} and specific r >= {GOALS['r_planted_specific']:g}; an unplanted clock "
            f"uninformative or r < {GOALS['r_unplanted']:g}."
        ),
        r"\end{minipage}",
        r"\end{table}",
    ]
    if rec.get("phenotypes"):
        lines += [
            r"\begin{table}[htbp]",
            r"\centering",
            r"\footnotesize",
            r"\caption{Clocks with a significant phenotype effect against the planted ones}",
            r"\label{tab:bodyage:clock-recovery-phenotypes}",
            r"\begin{tabular}{l" + r" >{\raggedright\arraybackslash}p{0.19\linewidth}" * 4 + "}",
            r"\toprule",
            r"Phenotype & Planted (accelerates) & Significant, corrected & Significant, conditioned & Anatomy \\",
            r"\midrule",
        ]
        for p, v in rec["phenotypes"].items():
            lines.append(
                f"{escape(p)} & {_names(v['planted_clocks'])} & {_names(v['significant_clocks'])} & "
                f"{_names(v['significant_clocks_conditioned'])} & {_names(v['anatomy_clocks'])}" + r" \\"
            )
        lines += [
            r"\bottomrule",
            r"\end{tabular}",
            r"\par\smallskip",
            r"\begin{minipage}{\linewidth}\footnotesize",
            escape(
                f"Significant: Benjamini-Hochberg q < {rec['alpha']:g} over clocks x phenotypes. Anatomy: clocks "
                "reading a region with a planted non-ageing (anatomy) effect of the phenotype, which moves the "
                "clock without being ageing."
            ),
            r"\end{minipage}",
            r"\end{table}",
        ]
    return "\n".join(lines) + "\n"


def _r_cell(r: Any, ci: Sequence[Any]) -> str:
    if r is None:
        return "--"
    lo, hi = ci
    bounds = f" [{format_number(lo, 2)}, {format_number(hi, 2)}]" if lo is not None and hi is not None else ""
    return f"{format_number(r, 2)}{bounds}"


def _document(root: Path, tables: Sequence[str], figure: str | None, has_recovery: bool, missing: Sequence[str]) -> str:
    name = escape(root.resolve().name)
    lines = [
        PREAMBLE,
        rf"\title{{bodyage organ age report: {name}}}",
        r"\author{bodyage}",
        r"\date{\today}",
        r"\begin{document}",
        r"\maketitle",
    ]
    if missing:
        lines += [r"\paragraph{Missing steps.}", r"\begin{itemize}"]
        lines += [rf"\item {escape(m)}" for m in missing]
        lines.append(r"\end{itemize}")
    lines += [r"\section{Organ ages}"]
    lines += [rf"\input{{{t}}}" for t in tables]
    if figure is not None:
        lines += [
            r"\begin{figure}[htbp]",
            r"\centering",
            rf"\includegraphics[width=\linewidth,height=0.6\textheight,keepaspectratio]{{{figure}}}",
            r"\caption{Correlations between the clocks' bias-corrected organ age gaps.}",
            r"\label{fig:bodyage:clock-correlations}",
            r"\end{figure}",
        ]
    if has_recovery:
        lines += [
            r"\clearpage",
            r"\section{Recovery of the planted organ ageing}",
            "The study is simulated: every region's biological age is known (truth.parquet).",
            rf"\input{{{Path(CLOCK_RECOVERY_TEX).stem}}}",
        ]
    lines += [r"\end{document}", ""]
    return "\n".join(lines)


def _summary(root: Path, tab: ClockTables, rec: Mapping[str, Any] | None, missing: Sequence[str]) -> str:
    lines = [f"# bodyage organ age report: {root.resolve().name}", "", "## Clocks", ""]
    lines += ["| clock | regions | MAE | r | informative |", "|---|---|---|---|---|"]
    for c in tab.names:
        e = tab.clocks[c]
        lines.append(
            f"| {c} | {', '.join(tab.regions(c)) or '(whole body)'} | {_f(e.get('mae'))} | {_f(e.get('pearson_r'))} "
            f"| {'yes' if tab.informative(c) else 'no'} |"
        )
    lines += [
        "",
        f"Each clock is a run folder: `bodyage report {root}/<clock>` reports one alone (e.g. whole_body).",
        "",
    ]
    if rec is not None:
        lines += ["## Recovery of the planted organ ageing", ""]
        lines += ["| clock | planted | r planted | r specific | goal met |", "|---|---|---|---|---|"]
        for c, e in rec["clocks"].items():
            met = {True: "yes", False: "**no**", None: "n/a"}[e["goal_met"]]
            lines.append(
                f"| {c} | {'yes' if e['planted'] else 'no'} | {_f(e['r_planted'])} | {_f(e['r_planted_specific'])} "
                f"| {met} |"
            )
        lines.append("")
        for p, v in rec["phenotypes"].items():
            lines.append(
                f"- {p}: significant {', '.join(v['significant_clocks']) or 'none'} (conditioned: "
                f"{', '.join(v['significant_clocks_conditioned']) or 'none'}); planted "
                f"{', '.join(v['planted_clocks']) or 'none'}; anatomy {', '.join(v['anatomy_clocks']) or 'none'}."
            )
        lines.append("")
    if missing:
        lines += ["## Missing steps", "", *(f"- {m}" for m in missing), ""]
    return "\n".join(lines)
