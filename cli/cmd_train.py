"""`bodyage train`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bodyage.errors import NotBuiltError
from cli.errors import handles_errors


@handles_errors
def train(
    study: Annotated[Path, typer.Argument(help="Study folder.")],
    run: Annotated[Path, typer.Option("--run", help="Run folder to write.")],
) -> None:
    """Train a k-fold 3D CNN age regressor with out-of-fold predictions."""
    raise NotBuiltError("`bodyage train` is not built yet (issue #3)")
