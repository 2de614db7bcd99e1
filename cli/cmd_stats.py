"""`bodyage stats`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bodyage.errors import NotBuiltError
from cli.errors import handles_errors


@handles_errors
def stats(
    run: Annotated[Path, typer.Argument(help="Run folder (after attribute).")],
) -> None:
    """Age-gap correction, mixed models, FDR, LaTeX tables and figures."""
    raise NotBuiltError("`bodyage stats` is not built yet (issue #6)")
