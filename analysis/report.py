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
otherwise the captions of :data:`analysis.report_gather.FIGURE_CAPTIONS`, or the
figure's name, are used.

The parts live beside this module: copying and sections in :mod:`analysis.report_gather`,
``report.tex`` in :mod:`analysis.report_tex`, ``summary.md`` in :mod:`analysis.report_summary`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.floors import baseline_text
from analysis.recovery import RECOVERY_FILE, RECOVERY_TEX, read_truth, recovery, write_recovery
from analysis.regionmodels import ALPHA
from analysis.report_gather import gather_outputs
from analysis.report_summary import fmt_number, measure_text, summary_markdown
from analysis.report_tex import compile_pdf, tex_document
from analysis.run import STATS_DIR, load_run
from analysis.stats_record import read_stats_record, stats_stale
from bodyage.errors import InputError

REPORT_TEX = "report.tex"
SUMMARY_MD = "summary.md"
REPORT_RECORD = "report.json"
#: default parent of report folders (relative to the working folder)
DEFAULT_ROOT = Path("reports")


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
                    f"spearman {fmt_number(m['spearman'])} ({measure_text(m['importance_measure'], method)})"
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
    previous = previous_outputs(out_dir)
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
    copied_tables, copied_figures, sections, withheld = gather_outputs(run_root, out_dir, ids)
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

    tex = tex_document(tables, run_root, out_dir, sections, rec is not None, missing)
    from bodyage.atomic import write_text

    report_tex = write_text(out_dir / REPORT_TEX, tex)
    written.append(report_tex)
    summary = write_text(out_dir / SUMMARY_MD, summary_markdown(tables, run_root, rec, missing, measures))
    written.append(summary)

    pdf_path = compile_pdf(report_tex) if pdf else None
    if pdf_path is not None:
        written.append(pdf_path)

    record_path = out_dir / REPORT_RECORD
    rel = sorted(str(p.relative_to(out_dir)) for p in written)
    remove_stale_outputs(out_dir, previous, set(rel) | {REPORT_RECORD})
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


def previous_outputs(out_dir: Path) -> list[str]:
    """The files an earlier report wrote into ``out_dir``, from its record.

    Parameters
    ----------
    out_dir : Path
        The report folder.

    Returns
    -------
    list[str]
        Paths relative to ``out_dir`` listed in its :data:`REPORT_RECORD`; empty if there
        is no readable record.
    """
    path = out_dir / REPORT_RECORD
    try:
        outputs = json.loads(path.read_text(encoding="utf-8")).get("outputs", [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return []
    return [str(o) for o in outputs if isinstance(o, str)]


def remove_stale_outputs(out_dir: Path, previous: Sequence[str], keep: set[str]) -> None:
    """Remove files an earlier report wrote that this one did not (never anything else).

    Parameters
    ----------
    out_dir : Path
        The report folder; nothing outside it is removed.
    previous : Sequence[str]
        What the earlier report wrote (:func:`previous_outputs`), relative to ``out_dir``.
    keep : set[str]
        What this report wrote, relative to ``out_dir``.
    """
    root = out_dir.resolve()
    for rel in previous:
        if rel in keep:
            continue
        path = (out_dir / rel).resolve()
        if root in path.parents and path.is_file():
            path.unlink()
