"""`bodyage attribute`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bodyage.errors import NotBuiltError
from cli.errors import handles_errors


@handles_errors
def attribute(
    run: Annotated[Path, typer.Argument(help="Run folder (after train).")],
) -> None:
    """Organ-level attribution (GradCAM, ablation, ...) -> attributions.parquet."""
    raise NotBuiltError("`bodyage attribute` is not built yet (issue #5)")
