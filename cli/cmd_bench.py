"""`bodyage bench`."""

from __future__ import annotations

from typing import Annotated

import typer

from bodyage.errors import NotBuiltError
from cli.errors import handles_errors


@handles_errors
def bench(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Stage throughputs and side-by-side ratios vs naive and peer code."""
    raise NotBuiltError("`bodyage bench` is not built yet (issue #9)")
