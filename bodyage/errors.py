"""Exceptions and warnings raised by the library.

The library never prints and never exits: it raises one of these with a message that
names the thing at fault, what was expected and what was found. Only :mod:`cli` turns
them into a one-line message and an exit code.
"""

from __future__ import annotations

#: longest user value quoted in an error message (characters, before the ellipsis)
QUOTE_LIMIT = 80


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters with an ellipsis and the full length.

    Error messages quote what the user gave; a value of megabytes (a YAML alias bomb, a
    corrupt cell) must not become a megabyte-long error line.
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class BodyageError(Exception):
    """Base class of every error the command line reports as a one-line message."""


class InputError(BodyageError):
    """A user-supplied file, column, option or value is missing or invalid."""


class ScenarioError(InputError):
    """A simulation scenario (YAML) has an unknown key, a wrong type or an impossible value."""


class StudyError(InputError):
    """A study folder (cohort.csv, labels.json, images, masks) is missing or inconsistent."""


class RunError(InputError):
    """A run folder is missing outputs of an earlier step, or they are inconsistent."""


class OutputError(BodyageError):
    """An output file cannot be written (disk full, quota, read-only folder, permission)."""


class CheckpointError(BodyageError):
    """A model checkpoint does not match the run (grid, channels, hyper-parameters)."""


class WeightsMissingError(BodyageError):
    """TotalSegmentator weights for a task are missing or incomplete."""


class SegmentationError(BodyageError):
    """Scans could not be segmented or their masks imported (the reasons are in failures.csv)."""


class NotBuiltError(BodyageError):
    """A command or option that is registered but not implemented yet."""


class BodyageWarning(UserWarning):
    """Something the user should know about that does not stop the step."""
