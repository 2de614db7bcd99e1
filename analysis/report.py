r"""``bodyage report RUN``: the run's tables and figures in one LaTeX report, a summary, and recovery.

:func:`write_report` is the one library call of the command. It copies what the run's
steps wrote into the report folder (default ``reports/<run-name>/``), keeping their paths
relative to the run folder, so a thesis writer can lift any table or figure out of it:

``stats/*.tex`` + ``.csv``
    the tables of ``bodyage stats`` (already LaTeX: booktabs + siunitx);
``figures/*.pdf`` (+ ``.png``)
    the figures of ``train``, ``attribute`` and ``stats``;
``compare/<name>/``
    the tables and figures of each ``bodyage compare``;
``recovery.json`` + ``recovery.tex``
    on a simulated study (``STUDY/truth.json``): the validation of docs/design.md §6
    (:func:`analysis.recovery.recovery`), also written to ``RUN/recovery.json``;
``report.tex``
    an ``article`` that ``\input``\ s every table and includes every figure with a
    caption; it compiles with ``pdflatex`` as it is (``--pdf`` compiles it to ``report.pdf``);
``summary.md``
    the headline numbers in words: MAE, the most important regions per method with 95%
    confidence intervals, phenotype effects with q-values, the sanity checks, failures;
``report.json``
    provenance and the list of files written (files of an earlier report that are no
    longer produced are removed).

A missing step is not an error: the report and the summary say which command to run
(``attribute``, ``stats``). No file of the report names a participant: figures whose file
name carries a participant or scan id (per-scan maps) are left out and counted.

A step may caption its figures by writing ``figures/captions.json`` (``{stem: caption}``);
otherwise the captions below, or the figure's name, are used.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from analysis._typing import REGION_LEVEL_METHODS, baseline_label
from analysis.fdr import family_text
from analysis.floors import baseline_text
from analysis.latex import escape
from analysis.recovery import (
    ABS_MASS,
    RECOVERY_FILE,
    RECOVERY_TEX,
    declared_measures,
    importance_measure,
    read_truth,
    recovery,
    region_importance,
    write_recovery,
)
from analysis.region_summary import _g, header_note, read_context, region_line
from analysis.regionmodels import ALPHA
from analysis.run import FIGURES_DIR, STATS_DIR, RunTables, load_run
from analysis.stats_record import ESTIMATE_OPTIONS, read_stats_record, stats_stale
from bodyage.accuracy import accuracy_text, prediction_metrics, uninformative_note
from bodyage.errors import InputError, RunError
from bodyage.region_names import display_name

REPORT_TEX = "report.tex"
SUMMARY_MD = "summary.md"
REPORT_RECORD = "report.json"
SANITY_FILE = "sanity.json"
FAILURES_FILE = "failures.csv"
METRICS_FILE = "metrics.json"
COMPARE_DIR = "compare"
CAPTIONS_FILE = "captions.json"
#: default parent of report folders (relative to the working folder)
DEFAULT_ROOT = Path("reports")
#: regions listed per method in the summary
TOP_IN_SUMMARY = 8

#: captions of the figures the steps are known to write (stem -> caption)
FIGURE_CAPTIONS: dict[str, str] = {
    "learning_curves": "Training and validation loss per epoch, one curve per fold.",
    "predicted_vs_age": "Out-of-fold predicted age against chronological age, and the bias-corrected age gap "
    "against age (years).",
    "age_scatter": "Predicted against chronological age by site, and the bias-corrected age gap against age.",
    "phenotype_forest": "Effects of the phenotypes on the corrected age gap (years, 95% CI), "
    "separate and joint models.",
    "region_heatmap": "Partial correlations of region importance with each phenotype; stars mark "
    "Benjamini-Hochberg q-values.",
    "comparison_effects": "Cohort comparison: Hedges' g with 95% CI, age gap and region importance.",
    "attribution_regions": "Each region's share of the model's total importance (mean over the fold models, "
    "whiskers the min-max over folds or training runs) beside the null models' share bands when nulls were run; "
    "regions sorted and coloured by kind, those above every null's band in bold.",
    "attribution_slices": "Mean attribution mass per axial slice along the body (95% band), young vs old "
    "tertiles, with the z-extents of the 12 most important regions.",
}
#: order of the stats tables in the report (others follow, sorted)
TABLE_ORDER: tuple[str, ...] = (
    "age_accuracy",
    "phenotype_models",
    "region_models",
    "region_joint",
    "region_gap_correlations",
)
#: figures of each section, by stem prefix; the rest of RUN/figures is "attribution"
TRAIN_FIGURES: tuple[str, ...] = ("learning_curves", "predicted_vs_age", "age_scatter")
STATS_FIGURES: tuple[str, ...] = ("phenotype_forest", "region_heatmap")

PREAMBLE = r"""\documentclass[11pt,a4paper]{article}
\usepackage[margin=2cm]{geometry}
\usepackage{booktabs}
\usepackage{siunitx}
\usepackage{array}
\usepackage{graphicx}
\usepackage[font=small,labelfont=bf]{caption}
\usepackage[hidelinks]{hyperref}
\setcounter{topnumber}{3}
\setcounter{totalnumber}{4}
\renewcommand{\topfraction}{0.9}
\renewcommand{\textfraction}{0.07}
\renewcommand{\floatpagefraction}{0.8}
"""


@dataclass(frozen=True)
class ReportResult:
    """What :func:`write_report` wrote.

    Attributes
    ----------
    out_dir
        The report folder.
    report_tex, summary_md
        ``report.tex`` and ``summary.md``.
    recovery
        The content of ``recovery.json`` (``None`` when the study is not simulated).
    recovery_json
        ``RUN/recovery.json`` (``None`` when not written).
    pdf
        ``report.pdf`` when compiled.
    tables, figures
        Tables and figures in the report (paths inside ``out_dir``).
    missing
        One line per missing or stale step, naming the command to run.
    files
        Every file written.
    """

    out_dir: Path
    report_tex: Path
    summary_md: Path
    recovery: dict[str, Any] | None = field(repr=False)
    recovery_json: Path | None
    pdf: Path | None
    tables: tuple[Path, ...] = ()
    figures: tuple[Path, ...] = ()
    missing: tuple[str, ...] = ()
    files: tuple[Path, ...] = ()

    def summary(self) -> list[str]:
        """A few lines for the command line (no participant ids)."""
        lines = [f"report: {self.out_dir} ({len(self.tables)} tables, {len(self.figures)} figures)"]
        rec = self.recovery
        if rec is not None:
            lines.append(f"MAE {rec['mae']:.2f} y vs oracle {rec['oracle_mae']:.2f} y (ratio {rec['mae_ratio']:.2f})")
            for method, m in rec["methods"].items():
                lines.append(
                    f"{method}: precision@{m['k']} {m['precision_at_k']:.2f} ({baseline_text(m)}), "
                    f"spearman {_f(m['spearman'])} ({_measure_name(m['importance_measure'], method)})"
                )
            goals = rec.get("goals", {})
            met = sum(1 for g in goals.values() if g["met"])
            unmet = [n for n, g in goals.items() if g["met"] is False]
            lines.append(
                f"goals: {met}/{len(goals)} met"
                + (f"; not met: {', '.join(unmet)}" if unmet else "")
                + f" (recovery.json in {self.recovery_json.parent if self.recovery_json else self.out_dir})"
            )
        lines.extend(f"missing: {m}" for m in self.missing)
        if self.pdf is not None:
            lines.append(f"pdf: {self.pdf}")
        return lines


def default_out(run_dir: str | os.PathLike[str]) -> Path:
    """``reports/<run-name>/`` (relative to the working folder)."""
    return DEFAULT_ROOT / Path(run_dir).resolve().name


def write_report(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    measures: Mapping[str, str] | None = None,
    alpha: float = ALPHA,
    pdf: bool = False,
) -> ReportResult:
    """Collect a run's tables and figures into a report folder (see the module docstring).

    Parameters
    ----------
    run
        The run folder (after ``train``; ``attribute`` and ``stats`` add to the report).
    out
        Report folder; default :func:`default_out` (``reports/<run-name>/``).
    measures
        ``{method: measure}``: importance of voxel methods in ``recovery.json`` and the
        summary, overriding what ``attribute`` declares (default ``enrichment``; see
        :mod:`analysis.recovery`).
    alpha
        FDR level of the recovery's significant regions.
    pdf
        Also compile ``report.pdf`` with ``pdflatex`` (twice, for references).

    Returns
    -------
    ReportResult

    Raises
    ------
    RunError
        If ``run`` is not a run folder (naming the missing file: ``run.json``,
        ``predictions.parquet``) or its tables disagree; if ``pdf`` and ``pdflatex`` fails
        or is not installed.
    StudyError
        If the run's study folder is missing or its ``truth.json`` is invalid.
    """
    from bodyage.provenance import build_run_record, finish_run_record, write_record

    tables = load_run(run)
    run_root = Path(run)
    out_dir = Path(out) if out is not None else default_out(run_root)
    if out_dir.resolve() == run_root.resolve():
        raise InputError(f"{out_dir}: the report folder must not be the run folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    record = build_run_record(
        "report",
        {"run": str(run_root), "out": str(out_dir), "measures": dict(measures or {}), "alpha": alpha, "pdf": pdf},
        inputs={"predictions": run_root / "predictions.parquet"},
    )
    previous = _previous_outputs(out_dir)
    written: list[Path] = []

    missing: list[str] = []
    has_attr = tables.attributions is not None
    has_stats = read_stats_record(run_root) is not None
    if not has_attr:
        missing.append(f"no attributions.parquet: run `bodyage attribute {run_root}` (then `bodyage stats` again)")
    if not has_stats and (run_root / STATS_DIR).is_dir():
        missing.append(
            f"RUN/stats has no record of a finished stats run (killed, or made by an older version; its tables "
            f"may be from older tables or mixed runs): run `bodyage stats {run_root}` again"
        )
    elif not has_stats:
        missing.append(f"no statistics: run `bodyage stats {run_root}`")
    elif stats_stale(run_root):
        missing.append(f"RUN/stats was made from older tables: run `bodyage stats {run_root}` again")
    elif has_attr and not (run_root / STATS_DIR / "region_models.parquet").is_file():
        missing.append(f"no region models: run `bodyage stats {run_root}` again (after attribute)")

    ids = set(tables.predictions["subject_id"].astype(str)) | set(tables.predictions["scan_id"].astype(str))
    copied_tables, copied_figures, sections, withheld = _gather(run_root, out_dir, ids)
    if withheld:  # counted, never named: the names carry the ids
        missing.append(f"{len(withheld)} per-scan figure(s) left out: their file names carry participant ids")
    written += copied_tables
    written += [f for f in copied_figures if f.suffix in (".pdf", ".png")]

    rec: dict[str, Any] | None = None
    rec_json: Path | None = None
    truth = read_truth(tables.study_root) if tables.study_root is not None else None
    if truth is not None:
        rec = recovery(tables, truth, measures=measures, alpha=alpha)
        from bodyage.atomic import write_json

        rec_json = write_json(run_root / RECOVERY_FILE, rec)
        written += write_recovery(rec, out_dir)

    tex = _document(tables, run_root, out_dir, sections, rec is not None, missing)
    from bodyage.atomic import write_text

    report_tex = write_text(out_dir / REPORT_TEX, tex)
    written.append(report_tex)
    summary = write_text(out_dir / SUMMARY_MD, _summary(tables, run_root, rec, missing, measures))
    written.append(summary)

    pdf_path = compile_pdf(report_tex) if pdf else None
    if pdf_path is not None:
        written.append(pdf_path)

    record_path = out_dir / REPORT_RECORD
    rel = sorted(str(p.relative_to(out_dir)) for p in written)
    _remove_previous(out_dir, previous, set(rel) | {REPORT_RECORD})
    write_record(record_path, finish_run_record(record, outputs=rel, missing=missing))
    written.append(record_path)
    return ReportResult(
        out_dir=out_dir,
        report_tex=report_tex,
        summary_md=summary,
        recovery=rec,
        recovery_json=rec_json,
        pdf=pdf_path,
        tables=tuple(p for p in copied_tables if p.suffix == ".tex")
        + ((out_dir / RECOVERY_TEX,) if rec is not None else ()),
        figures=tuple(f for f in copied_figures if f.suffix == ".pdf" or not f.with_suffix(".pdf").is_file()),
        missing=tuple(missing),
        files=tuple(written),
    )


# ---------------------------------------------------------------- gathering


@dataclass
class _Section:
    title: str
    tables: list[str] = field(default_factory=list)  # paths relative to the report folder, no suffix
    figures: list[tuple[str, str]] = field(default_factory=list)  # (path relative, caption)


def _copy(src: Path, dst: Path) -> Path:
    from bodyage.atomic import write_with

    return write_with(dst, lambda tmp: shutil.copyfile(src, tmp))


def _table_key(stem: str) -> tuple[int, str]:
    for i, prefix in enumerate(TABLE_ORDER):
        if stem == prefix or stem.startswith(prefix + "_"):
            return i, stem
    return len(TABLE_ORDER), stem


def _figure_files(folder: Path) -> list[Path]:
    """One file per figure: the PDF when there is one, else the PNG."""
    if not folder.is_dir():
        return []
    stems: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".pdf" or (path.suffix == ".png" and path.stem not in stems):
            if path.suffix == ".png" and path.with_suffix(".pdf").is_file():
                continue
            stems[path.stem] = path
    return [stems[s] for s in sorted(stems)]


def _captions(folder: Path) -> dict[str, str]:
    path = folder / CAPTIONS_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}
    return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def _caption(stem: str, declared: Mapping[str, str]) -> str:
    if stem in declared:
        return declared[stem]
    for prefix, text in FIGURE_CAPTIONS.items():
        if stem == prefix:
            return text
        if stem.startswith(prefix + "_"):
            return f"{text} Method: {stem[len(prefix) + 1 :].replace('_', ' ')}."
    return stem.replace("_", " ").capitalize() + "."


def _names_participant(stem: str, ids: set[str]) -> bool:
    """Whether a file name carries a participant or scan id (as a ``_``/``-``-separated token or run of tokens)."""
    tokens = stem.replace("-", "_").split("_")
    return any(
        "_".join(tokens[i:j]) in ids for i in range(len(tokens)) for j in range(i + 1, min(len(tokens), i + 3) + 1)
    )


def _gather(run_root: Path, out_dir: Path, ids: set[str]) -> tuple[list[Path], list[Path], list[_Section], list[str]]:
    """Copy tables (.tex + .csv) and figures (.pdf + .png) into the report and lay out its sections.

    Figures whose file name carries a participant or scan id (per-scan maps) are left
    out; their names are returned last.
    """
    withheld: list[str] = []
    tables: list[Path] = []
    figures: list[Path] = []
    age = _Section("Age prediction")
    attribution = _Section("Attribution")
    phenos = _Section("Phenotypes and the age gap")
    regions = _Section("Region importance and phenotypes")
    other = _Section("Other tables")

    stats_src = run_root / STATS_DIR
    if stats_src.is_dir():
        for src in sorted([*stats_src.glob("*.tex"), *stats_src.glob("*.csv")]):
            tables.append(_copy(src, out_dir / STATS_DIR / src.name))
        for tex in sorted(stats_src.glob("*.tex"), key=lambda p: _table_key(p.stem)):
            rel = f"{STATS_DIR}/{tex.stem}"
            if tex.stem == "age_accuracy":
                age.tables.append(rel)
            elif tex.stem == "phenotype_models":
                phenos.tables.append(rel)
            elif tex.stem.startswith("region_"):
                regions.tables.append(rel)
            else:
                other.tables.append(rel)

    fig_src = run_root / FIGURES_DIR
    declared = _captions(fig_src)
    for fig in _figure_files(fig_src):
        if _names_participant(fig.stem, ids):
            withheld.append(f"{FIGURES_DIR}/{fig.name}")
            continue
        for src in (fig, fig.with_suffix(".png")):
            if src.is_file():
                figures.append(_copy(src, out_dir / FIGURES_DIR / src.name))
        entry = (f"{FIGURES_DIR}/{fig.name}", _caption(fig.stem, declared))
        if fig.stem.startswith(TRAIN_FIGURES):
            age.figures.append(entry)
        elif fig.stem.startswith(STATS_FIGURES):
            (phenos if fig.stem == "phenotype_forest" else regions).figures.append(entry)
        else:
            attribution.figures.append(entry)

    comparisons: list[_Section] = []
    cmp_src = run_root / COMPARE_DIR
    if cmp_src.is_dir():
        for folder in sorted(p for p in cmp_src.iterdir() if p.is_dir()):
            sec = _Section(f"Comparison: {_comparison_title(folder)}")
            rel_dir = f"{COMPARE_DIR}/{folder.name}"
            for tex in sorted(folder.glob("*.tex")):
                for src in (tex, tex.with_suffix(".csv")):
                    if src.is_file():
                        tables.append(_copy(src, out_dir / rel_dir / src.name))
                sec.tables.append(f"{rel_dir}/{tex.stem}")
            caps = _captions(folder)
            for fig in _figure_files(folder):
                if _names_participant(fig.stem, ids):
                    withheld.append(f"{rel_dir}/{fig.name}")
                    continue
                for src in (fig, fig.with_suffix(".png")):
                    if src.is_file():
                        figures.append(_copy(src, out_dir / rel_dir / src.name))
                sec.figures.append((f"{rel_dir}/{fig.name}", _caption(fig.stem, caps)))
            if sec.tables or sec.figures:
                comparisons.append(sec)
    sections = [age, attribution, phenos, regions, *comparisons, other]
    return _dedupe(tables), _dedupe(figures), sections, withheld


def _comparison_title(folder: Path) -> str:
    """``<cohort> vs <reference>`` from the comparison's ``run.json``, else the folder name."""
    record = _read_json(folder / "run.json")
    args = record.get("arguments") if isinstance(record, Mapping) else None
    if isinstance(args, Mapping) and isinstance(args.get("cohort"), str) and isinstance(args.get("reference"), str):
        return f"{args['cohort']} vs {args['reference']}"
    return folder.name.replace("_", " ")


def _dedupe(paths: Sequence[Path]) -> list[Path]:
    return list(dict.fromkeys(paths))


def _previous_outputs(out_dir: Path) -> list[str]:
    path = out_dir / REPORT_RECORD
    try:
        outputs = json.loads(path.read_text(encoding="utf-8")).get("outputs", [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return []
    return [str(o) for o in outputs if isinstance(o, str)]


def _remove_previous(out_dir: Path, previous: Sequence[str], keep: set[str]) -> None:
    """Remove files an earlier report wrote that this one did not (never anything else)."""
    root = out_dir.resolve()
    for rel in previous:
        if rel in keep:
            continue
        path = (out_dir / rel).resolve()
        if root in path.parents and path.is_file():
            path.unlink()


# ---------------------------------------------------------------- report.tex


def _run_facts(tables: RunTables, run_root: Path) -> list[str]:
    """Facts about the run for the report's first section (no paths of scans, no ids)."""
    args = tables.record.get("arguments") if isinstance(tables.record.get("arguments"), Mapping) else {}
    facts = [f"run: {run_root.resolve().name}"]
    if tables.study_root is not None:
        facts.append(f"study: {tables.study_root.resolve().name}")
    facts.append(
        f"scans with an out-of-fold prediction: {len(tables.predictions)} "
        f"({tables.predictions['subject_id'].nunique()} subjects, {tables.predictions['fold'].nunique()} folds)"
    )
    check = prediction_metrics(tables.predictions)
    facts.append(f"age model: {accuracy_text(check)}; " + ("informative" if check["informative"] else "UNINFORMATIVE"))
    if not check["informative"]:
        facts.append(uninformative_note(check))
    for key, label in (("model", "model"), ("grid", "model grid"), ("epochs", "epochs"), ("seed", "seed")):
        if isinstance(args, Mapping) and args.get(key) is not None:
            value = args[key]
            value = "×".join(map(str, value)) if isinstance(value, list) else value
            facts.append(f"{label}: {value}")
    if tables.methods:
        facts.append(f"attribution methods: {', '.join(tables.methods)}")
    facts += _stats_facts(run_root)
    revision = tables.record.get("git_revision")
    if revision:
        facts.append(f"bodyage {tables.record.get('bodyage_version', '')} at {revision}")
    return facts


def _stats_facts(run_root: Path) -> list[str]:
    """The options the tables of ``RUN/stats`` were made with, from their record (none without one)."""
    record = read_stats_record(run_root)
    args = record.get("arguments") if record else None
    if not isinstance(args, Mapping):
        return []
    shown = []
    for key in ESTIMATE_OPTIONS:
        if key in args:
            value = args[key]
            value = ", ".join(map(str, value)) if isinstance(value, list) else value
            shown.append(f"{key.replace('_', ' ')} {'default' if value is None else value}")
    return [f"statistics made with: {'; '.join(shown)}"] if shown else []


def _aspect(png: Path) -> float | None:
    """Height / width of a figure from its PNG copy (``None`` if unknown)."""
    try:
        from PIL import Image

        with Image.open(png) as im:
            w, h = im.size
    except (ImportError, OSError):
        return None
    return h / w if w else None


def _figure_tex(path: str, caption: str, aspect: float | None = None) -> list[str]:
    rel = Path(path)
    # figures of the run by name; a comparison's figure by its folder too (labels must be unique)
    name = rel.stem if rel.parent.name == FIGURES_DIR else f"{rel.parent.name}-{rel.stem}"
    label = "fig:bodyage:" + name.replace("_", "-")
    # tall figures (a heatmap of 50 regions) get most of a page, wide ones half of it
    height = "0.8" if aspect is not None and aspect > 1.0 else "0.42"
    return [
        r"\begin{figure}[htbp]",
        r"\centering",
        rf"\includegraphics[width=\linewidth,height={height}\textheight,keepaspectratio]{{{path}}}",
        rf"\caption{{{escape(caption)}}}",
        rf"\label{{{label}}}",
        r"\end{figure}",
    ]


def _document(
    tables: RunTables,
    run_root: Path,
    out_dir: Path,
    sections: Sequence[_Section],
    has_recovery: bool,
    missing: Sequence[str],
) -> str:
    name = escape(run_root.resolve().name)
    lines = [
        PREAMBLE,
        rf"\title{{bodyage report: {name}}}",
        r"\author{bodyage}",
        r"\date{\today}",
        r"\begin{document}",
        r"\maketitle",
        r"\section*{The run}",
        r"\begin{itemize}",
    ]
    lines += [rf"\item {escape(f)}" for f in _run_facts(tables, run_root)]
    lines.append(r"\end{itemize}")
    if missing:
        lines += [r"\paragraph{Missing steps.}", r"\begin{itemize}"]
        lines += [rf"\item {_tex_command(m)}" for m in missing]
        lines.append(r"\end{itemize}")
    for sec in sections:
        if not (sec.tables or sec.figures):
            if sec.title == "Attribution" and tables.attributions is None:
                lines += [
                    r"\clearpage",
                    rf"\section{{{escape(sec.title)}}}",
                    r"No attributions yet: run \texttt{bodyage attribute RUN}, then \texttt{bodyage stats RUN}.",
                ]
            continue
        lines += [r"\clearpage", rf"\section{{{escape(sec.title)}}}"]
        for i, table in enumerate(sec.tables):
            if i and i % 3 == 0:
                lines.append(r"\clearpage")
            lines.append(rf"\input{{{table}}}")
        if sec.tables and sec.figures:
            lines.append(r"\clearpage")
        on_page = 0.0
        for path, caption in sec.figures:
            aspect = _aspect(out_dir / Path(path).with_suffix(".png"))
            size = 1.0 if aspect is not None and aspect > 1.0 else 0.5
            if on_page and on_page + size > 1.0:
                lines.append(r"\clearpage")
                on_page = 0.0
            on_page += size
            lines += _figure_tex(path, caption, aspect)
    if has_recovery:
        lines += [
            r"\clearpage",
            r"\section{Recovery of the planted ageing}",
            "The study is simulated, so the ageing the model should find is known. "
            "These tables compare the run with the study's planted truth (truth.json).",
            rf"\input{{{Path(RECOVERY_TEX).stem}}}",
        ]
    lines += [r"\end{document}", ""]
    return "\n".join(lines)


def _tex_command(text: str) -> str:
    """Escape ``text``, setting `backquoted` commands in typewriter type."""
    parts = text.split("`")
    return "".join(rf"\texttt{{{escape(p)}}}" if i % 2 else escape(p) for i, p in enumerate(parts))


def compile_pdf(tex: str | os.PathLike[str], *, timeout: float = 300.0) -> Path:
    """Compile a ``.tex`` file with ``pdflatex`` (twice) in its folder; return the PDF.

    Raises
    ------
    RunError
        If ``pdflatex`` is not installed or the compile fails (naming the log file).
    """
    path = Path(tex)
    exe = shutil.which("pdflatex")
    if exe is None:
        raise RunError("pdflatex not found: install TeX Live (Debian: texlive-latex-extra) or leave out --pdf")
    for _ in range(2):
        try:
            done = subprocess.run(
                [exe, "-interaction=nonstopmode", "-halt-on-error", path.name],
                cwd=path.parent,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise RunError(f"{path}: pdflatex took more than {timeout:.0f} s") from err
        if done.returncode != 0:
            raise RunError(f"{path}: pdflatex failed (exit {done.returncode}); see {path.with_suffix('.log')}")
    return path.with_suffix(".pdf")


# ---------------------------------------------------------------- summary.md


def _f(v: Any, digits: int = 2) -> str:
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


def _measure_name(measure: str, method: str = "ablation") -> str:
    """Words for an importance measure (|mass| is in years for region-level methods only)."""
    if measure != ABS_MASS:
        return f"mean {measure}"
    return "mean |mass|, years" if method in REGION_LEVEL_METHODS else "mean |mass|"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


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
        return _f(v, 3)
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


def _summary(
    tables: RunTables,
    run_root: Path,
    rec: Mapping[str, Any] | None,
    missing: Sequence[str],
    measures: Mapping[str, str] | None,
) -> str:
    name = run_root.resolve().name
    lines = [f"# bodyage report: {name}", ""]
    pred = tables.predictions
    metrics = _read_json(run_root / METRICS_FILE) or {}
    # accuracy from the predictions (never the bias-corrected ones: they use the true age)
    check = prediction_metrics(pred)
    mae = check["overall"]["mae"]
    warning = uninformative_note(check)
    lines += ["## Age prediction", ""]
    lines.append(
        f"- {len(pred)} scans of {pred['subject_id'].nunique()} subjects have an out-of-fold prediction "
        f"({pred['fold'].nunique()} folds). Mean absolute error {_f(mae)} years, against {_f(check['baseline_mae'])} "
        f"for predicting each scan at the mean age of the other folds; correlation with age "
        f"r = {_f(check['overall']['pearson_r'], 3)}."
    )
    if warning:
        lines.append(f"- **{warning}**")
    oracle = metrics.get("oracle_mae", rec.get("oracle_mae") if rec else None)
    if oracle is not None:
        lines.append(
            f"- The best possible predictor of this simulated cohort (the oracle) has MAE {_f(oracle)} years: "
            f"the model's error is {_f(float(mae) / float(oracle))} times the floor."
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
                f"**{method}** ({kind}; importance = {_measure_name(measure, method)} over scans), "
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
                f"| {r['phenotype']} | {_f(r['estimate'])}{mark} | [{_f(r['ci_low'])}, {_f(r['ci_high'])}] | "
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
                    f"{display_name(str(r))} ({_g(e)}, q {_q(q)})"
                    for r, e, q in zip(sub["region"], sub["estimate"], sub["q"], strict=True)
                )
                lines.append(f"- {sig_method} ({sub['metric'].iloc[0]}), {pheno}: {hits}")
            lines.append("")
    else:
        lines += ["No statistics yet: run `bodyage stats RUN`.", ""]

    lines += ["## Sanity checks", ""]
    sanity = _read_json(run_root / SANITY_FILE)
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
                f"(precision@k {_f(m['precision_at_k'])}; {baseline_text(m)}); "
                f"Spearman with the planted information {_f(m['spearman'])}; "
                f"agreement with ablation {_f(m['agreement_with_ablation'])}."
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
                f"gap effect {_f(v['gap_effect'])} years [{_f(v['ci_low'])}, {_f(v['ci_high'])}], q {_q(v['q'])}"
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
    return _f(value, 3)
