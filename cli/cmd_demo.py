"""`bodyage demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bodyage.errors import NotBuiltError
from cli.errors import handles_errors


@handles_errors
def demo(
    directory: Annotated[Path, typer.Argument(help="Where to write the demo study and run.")] = Path("demo"),
) -> None:
    """The whole pipeline on the default synthetic cohort, on CPU, in minutes."""
    raise NotBuiltError("`bodyage demo` is not built yet (issue #7)")
