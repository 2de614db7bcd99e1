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


#: longest error or warning message printed (characters): a message quoting a huge user
#: value (a corrupt cell, an expanded YAML document) is cut, not printed in megabytes
MAX_MESSAGE_CHARS = 1000


def one_line(message: object) -> str:
    """``message`` on one line (whitespace runs become one space), cut to :data:`MAX_MESSAGE_CHARS`."""
    text = " ".join(str(message).split())
    if len(text) > MAX_MESSAGE_CHARS:
        text = f"{text[:MAX_MESSAGE_CHARS]}... (message cut at {MAX_MESSAGE_CHARS} of {len(text)} characters)"
    return text


def error_line(message: str) -> None:
    """Print ``error: <message>`` as one line on stderr."""
    print(f"error: {one_line(message)}", file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, BodyageWarning):
        print(f"warning: {one_line(message)}", file=sys.stderr)
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
