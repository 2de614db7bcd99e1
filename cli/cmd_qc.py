"""`bodyage qc`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bodyage.errors import NotBuiltError
from cli.errors import handles_errors


@handles_errors
def qc(
    study: Annotated[Path, typer.Argument(help="Study folder.")],
) -> None:
    """Image-quality flags (fat-water swaps, coverage, NaNs) -> STUDY/qc.csv."""
    raise NotBuiltError("`bodyage qc` is not built yet (issue #8)")
