"""`bodyage qc`: image-quality flags of a study -> STUDY/qc.csv."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.errors import handles_errors
from cli.progress import progress_display


@handles_errors
def qc(
    study: Annotated[Path, typer.Argument(help="Study folder.")],
    workers: Annotated[
        Optional[int], typer.Option("--workers", help="Processes measuring scans [default: up to 4].")
    ] = None,
    figures: Annotated[bool, typer.Option("--figures/--no-figures", help="Write figures/qc_*.png.")] = True,
    swap_ff: Annotated[
        Optional[float],
        typer.Option(
            "--swap-ff", help="Fat fraction of subcutaneous fat below which a slice counts as swapped [default: 0.5]."
        ),
    ] = None,
    swap_run_mm: Annotated[
        Optional[float],
        typer.Option("--swap-run-mm", help="Shortest run of swapped slices that flags a scan, mm [default: 40]."),
    ] = None,
    coverage_fraction: Annotated[
        Optional[float],
        typer.Option(
            "--coverage-fraction",
            help="Body extent below this fraction of the cohort median flags a scan [default: 0.9].",
        ),
    ] = None,
) -> None:
    """Image-quality flags (fat-water swaps, coverage, NaNs, extreme intensities) -> STUDY/qc.csv."""
    from bodyage.qc import QcThresholds, run_qc

    overrides = {
        k: v
        for k, v in {"swap_ff": swap_ff, "swap_run_mm": swap_run_mm, "coverage_fraction": coverage_fraction}.items()
        if v is not None
    }
    thresholds = QcThresholds(**overrides)
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    with progress_display() as progress:
        s = run_qc(study, thresholds=thresholds, workers=n_workers, figures=figures, progress=progress)
    flags = ", ".join(f"{flag} {n}" for flag, n in s.flagged.items())
    figs = f" and {len(s.figures)} figures in {s.study / 'figures'}" if s.figures else ""
    typer.echo(f"qc: {s.n_scans} scans, {s.n_flagged} flagged ({flags}); wrote {s.table}{figs}")
