"""`bodyage compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bodyage.errors import NotBuiltError
from cli.errors import handles_errors


@handles_errors
def compare(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    cohort: Annotated[str, typer.Option("--cohort", help='Filter for the cohort, e.g. "diabetes == 1".')],
    reference: Annotated[str, typer.Option("--reference", help="Filter for the reference group.")],
) -> None:
    """Compare a cohort with a (matched) reference group."""
    raise NotBuiltError("`bodyage compare` is not built yet (issue #6)")
