"""The ``bodyage`` Typer application: one module per verb (``cli/cmd_<verb>.py``).

Heavy libraries are imported inside the commands, so ``bodyage --help`` is instant.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from bodyage import __version__
from cli import (
    cmd_attribute,
    cmd_bench,
    cmd_clocks,
    cmd_cohort,
    cmd_compare,
    cmd_demo,
    cmd_qc,
    cmd_report,
    cmd_segment,
    cmd_simulate,
    cmd_stats,
    cmd_train,
)
from cli.errors import install_warning_handler
from cli.state import STATE

app = typer.Typer(
    name="bodyage",
    help="Which parts of the body does a deep age regressor use on whole-body MRI?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bodyage {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logging.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, only results and errors.")] = False,
) -> None:
    """Organ-level attribution and age-gap statistics for whole-body MRI."""
    STATE.debug = debug
    STATE.quiet = quiet
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    install_warning_handler()


app.command("simulate")(cmd_simulate.simulate)
app.add_typer(cmd_cohort.app, name="cohort")
app.command("qc")(cmd_qc.qc)
app.command("segment")(cmd_segment.segment)
app.command("train")(cmd_train.train)
app.command("clocks")(cmd_clocks.clocks)
app.command("attribute")(cmd_attribute.attribute)
app.command("stats")(cmd_stats.stats)
app.command("compare")(cmd_compare.compare)
app.command("report")(cmd_report.report)
app.command("demo")(cmd_demo.demo)
app.command("bench")(cmd_bench.bench)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
