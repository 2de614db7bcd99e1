"""`bodyage report`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bodyage.errors import NotBuiltError
from cli.errors import handles_errors


@handles_errors
def report(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
) -> None:
    """Collect tables and figures into a LaTeX report (and recovery.json on simulated data)."""
    raise NotBuiltError("`bodyage report` is not built yet (issue #7)")
