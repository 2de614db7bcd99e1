"""`bodyage simulate`: a synthetic cohort with planted ageing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.errors import handles_errors
from cli.progress import progress_display


@handles_errors
def simulate(
    study: Annotated[Path, typer.Argument(help="Study folder to write (new or empty).")],
    scenario: Annotated[
        str, typer.Option("--scenario", help="Built-in scenario name (default, dev) or a scenario YAML file.")
    ] = "default",
    subjects: Annotated[
        Optional[int], typer.Option("--subjects", help="Override the scenario's number of subjects.")
    ] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Override the scenario's seed.")] = None,
    workers: Annotated[
        Optional[int], typer.Option("--workers", help="Processes rendering scans (default: up to 2).")
    ] = None,
) -> None:
    """Write a synthetic cohort with planted ageing (the validation harness)."""
    from bodyage.simulate import simulate_study

    with progress_display() as progress:
        result = simulate_study(
            study, scenario=scenario, subjects=subjects, seed=seed, workers=workers, progress=progress
        )
    typer.echo(
        f"wrote {result.n_scans} scans of {result.n_subjects} subjects to {result.study} "
        f"(oracle MAE {result.oracle_mae:.2f} years; figures in {result.study / 'figures'})"
    )
