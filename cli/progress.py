"""Rich progress bars for the library's :class:`bodyage.progress.Progress` protocol."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from bodyage.progress import NO_PROGRESS, Progress, ProgressTask
from cli.state import STATE


class _RichTask:
    def __init__(self, progress, task_id) -> None:
        self._p = progress
        self._id = task_id

    def advance(self, n: int = 1, **fields: object) -> None:
        info = "  ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
        if info:
            self._p.update(self._id, advance=n, info=info)
        else:
            self._p.update(self._id, advance=n)

    def close(self) -> None:
        task = self._p.tasks[self._p.task_ids.index(self._id)]
        if task.total is not None:
            self._p.update(self._id, completed=task.total)
        self._p.stop_task(self._id)


class RichProgress:
    """Progress bars on stderr, one line per task."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(stderr=True),
            transient=False,
        )

    def task(self, description: str, total: int | None) -> ProgressTask:
        task_id = self._progress.add_task(description, total=total, info="")
        return _RichTask(self._progress, task_id)

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()


@contextmanager
def progress_display() -> Iterator[Progress]:
    """Yield a progress display, or a silent one when ``--quiet`` or stderr is not a TTY."""
    if STATE.quiet or not sys.stderr.isatty():
        yield NO_PROGRESS
        return
    with RichProgress() as p:
        yield p


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
