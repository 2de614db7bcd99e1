"""`bodyage segment`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bodyage.errors import NotBuiltError
from cli.errors import handles_errors


@handles_errors
def segment(
    study: Annotated[Path, typer.Argument(help="Study folder.")],
) -> None:
    """Organ masks with TotalSegmentator, or import existing masks."""
    raise NotBuiltError("`bodyage segment` is not built yet (issue #4)")
