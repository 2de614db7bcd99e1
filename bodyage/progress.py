"""Progress reporting, passed in by the caller (the library never prints).

Library functions take ``progress: Progress | None``; :data:`NO_PROGRESS` does nothing.
The command line passes a rich-based implementation (``cli.progress``).
"""

from __future__ import annotations

from typing import Protocol


class ProgressTask(Protocol):
    """One bar: advance it, update its fields, close it."""

    def advance(self, n: int = 1, **fields: object) -> None:
        """Move the bar by ``n`` steps; ``fields`` (e.g. ``loss=0.3``) are shown beside it."""

    def close(self) -> None:
        """Finish the bar."""


class Progress(Protocol):
    """Something that can start progress bars."""

    def task(self, description: str, total: int | None) -> ProgressTask:
        """Start a bar with ``total`` steps (``None``: unknown)."""
        ...


class _NullTask:
    def advance(self, n: int = 1, **fields: object) -> None:
        return None

    def close(self) -> None:
        return None


class NullProgress:
    """A :class:`Progress` that shows nothing."""

    def task(self, description: str, total: int | None) -> ProgressTask:
        """Return a task that ignores every call."""
        return _NullTask()


NO_PROGRESS: Progress = NullProgress()
