r"""``report.tex`` of ``bodyage report``: the LaTeX document and its compilation.

:func:`tex_document` writes an ``article`` (:data:`PREAMBLE`) that lists facts about the run
(no paths of scans, no ids) and the missing steps, ``\input``\ s every table and
includes every figure of the sections that :mod:`analysis.report_gather` laid out, and,
on a simulated study, the recovery tables; :func:`compile_pdf` compiles it with
``pdflatex``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from analysis.latex import escape
from analysis.recovery import RECOVERY_TEX
from analysis.run import FIGURES_DIR, RunTables
from analysis.stats_record import ESTIMATE_OPTIONS, read_stats_record
from bodyage.accuracy import accuracy_text, prediction_metrics, uninformative_note
from bodyage.errors import RunError

if TYPE_CHECKING:  # pragma: no cover
    from analysis.report_gather import ReportSection

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


def tex_document(
    tables: RunTables,
    run_root: Path,
    out_dir: Path,
    sections: Sequence[ReportSection],
    has_recovery: bool,
    missing: Sequence[str],
) -> str:
    """The LaTeX source of ``report.tex``.

    Parameters
    ----------
    tables : RunTables
        The run's tables (for the facts about the run).
    run_root : Path
        The run folder.
    out_dir : Path
        The report folder, where the sections' figures were copied (their aspect sets
        their height).
    sections : Sequence[ReportSection]
        The sections laid out by :func:`analysis.report_gather.gather_outputs`.
    has_recovery : bool
        Whether to include the recovery tables (:data:`analysis.recovery.RECOVERY_TEX`).
    missing : Sequence[str]
        The missing steps, listed after the facts about the run.

    Returns
    -------
    str
        A complete ``article`` document.
    """
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
