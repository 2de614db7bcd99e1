"""One error path: library exceptions become one line on stderr and exit code 1."""

from __future__ import annotations

import functools
import logging
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer

from bodyage.errors import BodyageError, BodyageWarning
from cli.state import STATE

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger("bodyage")


def error_line(message: str) -> None:
    """Print ``error: <message>`` as one line on stderr."""
    one_line = " ".join(str(message).split())
    print(f"error: {one_line}", file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, BodyageWarning):
        print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)
    elif STATE.debug:
        print(
            warnings.formatwarning(message, category, filename, lineno, line),
            file=sys.stderr,
            end="",
        )


def install_warning_handler() -> None:
    """Show our warnings as one line each; third-party warnings only with ``--debug``."""
    warnings.showwarning = _show_warning
    warnings.simplefilter("default", BodyageWarning)


def handles_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Map :class:`bodyage.errors.BodyageError` to a one-line message and exit code 1.

    With ``--debug`` the traceback is printed first. Anything that is not a
    ``BodyageError`` is a bug and propagates with its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except BodyageError as err:
            if STATE.debug:
                traceback.print_exc()
            error_line(str(err))
            raise typer.Exit(1) from err
        except KeyboardInterrupt as err:
            error_line("interrupted; run the same command again to resume")
            raise typer.Exit(130) from err

    return wrapper
