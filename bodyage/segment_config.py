"""What ``bodyage segment`` makes a mask with: its configuration and label table.

:class:`SegmentConfig` says how masks are made (an import folder, or TotalSegmentator
tasks with ``--fast`` and the image channel fed to each); its fingerprint, with the label
table, is stamped into every mask so a re-run knows which masks are current
(:mod:`bodyage.segment`). :func:`build_config` validates the command's options into one,
:func:`study_label_table` extends the study's ``labels.json`` with the regions of the
tasks run, and :func:`region_family` says which task a region comes from. Nothing here
imports TotalSegmentator at module level.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bodyage._typing import SEGMENT_TASKS, SegmentTask
from bodyage.errors import InputError, StudyError
from bodyage.regions import (
    ORGAN_TASK,
    TISSUE_TASK,
    LabelTable,
    combined_label_table,
    totalsegmentator_class_map,
)
from bodyage.study import LABELS_FILE, Study


@dataclass(frozen=True)
class SegmentConfig:
    """What makes a mask: an import folder, or TotalSegmentator tasks with their channels.

    Attributes
    ----------
    source
        Folder to import masks from (``None``: run TotalSegmentator).
    tasks
        TotalSegmentator tasks (empty for an import).
    fast
        TotalSegmentator's lower-resolution models.
    channels
        ``{task: image channel}`` fed to each task.
    """

    source: Path | None = None
    tasks: tuple[SegmentTask, ...] = ()
    fast: bool = False
    channels: Mapping[str, str] = field(default_factory=dict)

    @property
    def imports(self) -> bool:
        """Whether masks are imported rather than made."""
        return self.source is not None

    def describe(self) -> dict[str, Any]:
        """The configuration as recorded (and hashed into the fingerprint)."""
        if self.source is not None:
            return {"source": "import", "from": str(self.source.resolve())}
        return {
            "source": "totalsegmentator",
            "tasks": list(self.tasks),
            "fast": self.fast,
            "channels": dict(sorted(self.channels.items())),
        }

    def fingerprint(self, labels: LabelTable) -> str:
        """A short hash of :meth:`describe` and the label table: masks made alike share it."""
        blob = json.dumps({**self.describe(), "labels": labels.to_json_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def parse_channel_options(values: Sequence[str] | None) -> dict[str, str]:
    """Parse ``--channel TASK=CHANNEL`` options into ``{task: channel}``.

    Raises
    ------
    InputError
        For a malformed value, an unknown task or a task given twice.
    """
    out: dict[str, str] = {}
    for value in values or ():
        task, sep, channel = value.partition("=")
        task, channel = task.strip(), channel.strip()
        if not sep or not task or not channel:
            raise InputError(f"--channel must look like TASK=CHANNEL (e.g. total_mr=water); got {value!r}")
        if task not in SEGMENT_TASKS:
            raise InputError(f"--channel {value}: task must be one of {', '.join(SEGMENT_TASKS)}; got {task!r}")
        if task in out:
            raise InputError(f"--channel given twice for task {task}")
        out[task] = channel
    return out


def build_config(
    *,
    tasks: Sequence[str] | None,
    fast: bool,
    source: str | os.PathLike[str] | None,
    channels: Mapping[str, str] | None,
    ts_options: Mapping[str, object],
) -> SegmentConfig:
    """Validate the options of :func:`segment_study` into a :class:`SegmentConfig`.

    Parameters
    ----------
    ts_options
        Options that only make sense when running TotalSegmentator (``device``,
        ``license``, ``weights``), by name; any not ``None`` with ``source`` is an error.

    Raises
    ------
    InputError
        For unknown or repeated tasks, channels for tasks not run, a missing import
        folder, or TotalSegmentator options given with ``source``.
    """
    from bodyage.totalseg import require_totalsegmentator, task_spec

    chosen = parse_channel_options([f"{t}={c}" for t, c in (channels or {}).items()])
    if source is not None:
        given = [f"--{name}" for name, v in ts_options.items() if v is not None]
        if tasks:
            given.insert(0, "--task")
        if fast:
            given.append("--fast")
        if chosen:
            given.append("--channel")
        if given:
            raise InputError(
                f"--from imports existing masks; {', '.join(given)} only apply when running TotalSegmentator"
            )
        folder = Path(source)
        if not folder.is_dir():
            raise InputError(f"--from {folder}: folder not found")
        return SegmentConfig(source=folder)
    require_totalsegmentator()
    run = list(tasks) if tasks else ["total_mr"]
    for t in run:
        task_spec(t)
    dup = sorted({t for t in run if run.count(t) > 1})
    if dup:
        raise InputError(f"--task {dup[0]} given twice")
    ordered = tuple(t for t in SEGMENT_TASKS if t in run)  # organs first: a fixed order
    extra = sorted(set(chosen) - set(ordered))
    if extra:
        raise InputError(f"--channel {extra[0]}=...: task {extra[0]} is not run (add --task {extra[0]})")
    if fast and not any(task_spec(t).has_fast for t in ordered):
        raise InputError(f"--fast: task {', '.join(ordered)} has no fast model in TotalSegmentator")
    resolved: dict[str, str] = {t: chosen.get(t, task_spec(t).default_channel) for t in ordered}
    return SegmentConfig(tasks=ordered, fast=fast, channels=resolved)


def study_label_table(study: Study, config: SegmentConfig) -> LabelTable:
    """The label table masks are written in.

    ``labels.json`` is the authority when present; regions of the tasks to run that it
    lacks are added with their combined-map ids (docs/design.md §3) when those ids are free.

    Raises
    ------
    StudyError
        If a needed region's id is taken by another region in ``labels.json``.
    """
    from bodyage.totalseg import task_spec

    table = study.labels if study.labels is not None else combined_label_table()
    names = dict(table.names)
    for task in config.tasks:
        for ts_id, name in totalsegmentator_class_map(task).items():
            if name in table:
                continue
            want = ts_id + task_spec(task).id_offset
            if want in names:
                raise StudyError(
                    f"{study.root / LABELS_FILE}: region {name} of task {task} is missing and its id {want} "
                    f"is taken by {names[want]}; add {name} with a free id"
                )
            names[want] = name
    return LabelTable(names)


def region_family(name: str) -> str:
    """Which task a region belongs to (``total_mr``, ``tissue_types_mr`` or ``other``)."""
    for task in (ORGAN_TASK, TISSUE_TASK):
        if name in totalsegmentator_class_map(task).values():
            return task
    return "other"
