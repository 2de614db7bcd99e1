"""`bodyage simulate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bodyage.errors import NotBuiltError
from cli.errors import handles_errors


@handles_errors
def simulate(
    study: Annotated[Path, typer.Argument(help="Study folder to write.")],
) -> None:
    """Write a synthetic cohort with planted ageing (the validation harness)."""
    raise NotBuiltError("`bodyage simulate` is not built yet (issue #2)")
