"""`bodyage report`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bodyage.errors import InputError
from cli.errors import handles_errors


def _measures(values: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values or []:
        method, sep, measure = value.partition("=")
        if not sep or not method.strip() or not measure.strip():
            raise InputError(
                f"--importance must look like METHOD=MEASURE (e.g. gradcam=enrichment); {value!r} was given"
            )
        out[method.strip()] = measure.strip()
    return out


@handles_errors
def report(
    run: Annotated[
        Path,
        typer.Argument(help="Run folder (after train; attribute and stats add to the report), or a clocks folder."),
    ],
    out: Annotated[Optional[Path], typer.Option("--out", help="Report folder. Default: reports/<run-name>/.")] = None,
    importance: Annotated[
        Optional[list[str]],
        typer.Option(
            "--importance",
            help="METHOD=MEASURE (repeatable): ranking measure of a voxel method in recovery.json and the summary "
            "(share, enrichment, density, abs_mass). Default: what attribute declares, else enrichment.",
        ),
    ] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="FDR level of the recovery.", min=0.0, max=1.0)] = 0.05,
    pdf: Annotated[bool, typer.Option("--pdf", help="Also compile report.pdf with pdflatex.")] = False,
) -> None:
    """Collect tables and figures into a LaTeX report (and recovery.json on simulated data).

    On a clocks folder (with clocks.json): the organ-age report (and DIR/clock_recovery.json on simulated data).
    """
    from analysis.organ_stats import is_clocks_folder

    if is_clocks_folder(run):
        from analysis.report_organs import write_organ_report

        if importance:
            raise InputError(f"{run} is a clocks folder: --importance applies to a run folder only")
        organ = write_organ_report(run, out, alpha=alpha, pdf=pdf)
        for line in organ.summary():
            typer.echo(line)
        return
    from analysis.report import write_report

    result = write_report(run, out, measures=_measures(importance), alpha=alpha, pdf=pdf)
    for line in result.summary():
        typer.echo(line)
