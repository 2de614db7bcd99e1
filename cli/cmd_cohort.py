"""`bodyage cohort ukb`: build a study from a UK Biobank export and a folder of NIfTIs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bodyage.errors import NotBuiltError
from cli.errors import handles_errors

app = typer.Typer(help="Build a study folder from real data.", no_args_is_help=True)


@app.command("ukb")
@handles_errors
def ukb(
    phenotypes: Annotated[Path, typer.Option("--phenotypes", help="UK Biobank export (CSV).")],
    images: Annotated[Path, typer.Option("--images", help="Folder of NIfTI volumes.")],
    out: Annotated[Path, typer.Option("--out", help="Study folder to write.")],
) -> None:
    """From a UK Biobank export and NIfTIs to a checked study folder."""
    raise NotBuiltError("`bodyage cohort ukb` is not built yet (issue #8)")
