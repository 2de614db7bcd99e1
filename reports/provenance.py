"""What the scripts of ``reports/`` record beside their numbers: revision, machine, load, time, command.

The scripts run as ``python reports/NAME.py`` and tests load them by path
(``tests/report_scripts.py``); both put ``reports/`` on ``sys.path``, so a script imports
this module as ``from provenance import ...``, as ``learning_curve`` imports ``region_probe``.
The library's own records (``run.json``) come from :mod:`bodyage.provenance`; its clock
(:func:`bodyage.provenance.now_iso`) is the one the ``generated`` stamps here use. Its
:func:`bodyage.provenance.git_revision` records the full hash; the results JSON files
record the short one, so :func:`git` stays here.

No value these functions return for a record names a path of the machine (``ROOT`` and
``RESULTS`` are where the scripts read and write, not what they record); a command a JSON
file records goes through :func:`neutral_command`.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bodyage.provenance import now_iso

__all__ = [
    "RESULTS",
    "ROOT",
    "cpu_model",
    "git",
    "load_average",
    "machine",
    "neutral_command",
    "now_iso",
    "revision",
    "short_revision",
    "uncommitted_changes",
    "uptime_loads",
    "utc_minute",
    "write_json",
]

#: the repository (the scripts run from its root)
ROOT = Path(__file__).resolve().parents[1]
#: where the JSON files the documentation renders go (``{{ results.<file>... }}``)
RESULTS = ROOT / "docs" / "results"

_UPTIME_LOAD = re.compile(r"load average:\s*([0-9.]+)")


def git(*args: str) -> str:
    """``git ARGS`` run in the repository: its output, stripped; ``""`` where git fails (no git, no checkout)."""
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def short_revision() -> str:
    """The short git revision of ``HEAD`` (the ``git_revision``/``revision`` most files record); ``""`` without git."""
    return git("rev-parse", "--short", "HEAD")


def revision() -> str | None:
    """The short git revision, with ``+dirty`` when tracked files have changes; ``None`` where git fails."""
    rev = short_revision()
    if not rev:
        return None
    return rev + ("+dirty" if uncommitted_changes() else "")


def uncommitted_changes() -> bool:
    """Whether tracked files differ from the revision (the ``uncommitted_changes`` the JSON files record)."""
    return bool(git("status", "--porcelain", "--untracked-files=no"))


def load_average(digits: int = 1) -> list[float]:
    """The 1-, 5- and 15-minute load averages, rounded to ``digits`` decimals."""
    return [round(x, digits) for x in os.getloadavg()]


def utc_minute() -> str:
    """The time now to the minute, as ``2026-01-31 14:05 UTC`` (the ``started``/``generated`` of some files)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _lscpu() -> tuple[str | None, frozenset[str]]:
    """``lscpu``'s model name and flags; ``platform.processor()`` and no flags where it cannot run."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or None, frozenset()
    model, flags = None, ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
        if line.startswith("Flags:"):
            flags = line.split(":", 1)[1]
    return model, frozenset(flags.split())


def cpu_model() -> str | None:
    """The CPU model name from ``lscpu`` (Linux), else ``platform.processor()``; ``None`` if neither says."""
    return _lscpu()[0]


def cpu_flags(names: Sequence[str]) -> dict[str, bool]:
    """Which of ``names`` the CPU's ``lscpu`` flags list (``{}`` where ``lscpu`` cannot run)."""
    flags = _lscpu()[1]
    return {name: name in flags for name in names} if flags else {}


def machine(*, bf16: bool = False) -> dict[str, Any]:
    """The machine a measurement ran on: CPU model and count, platform.

    Parameters
    ----------
    bf16
        Also say whether the CPU has bfloat16 matrix kernels (``amx_bf16``, ``avx512_bf16``):
        what decides how fast ``--dtype bf16`` training is.

    Returns
    -------
    dict
        ``cpu_model``, ``cpu_count``, (``amx_bf16``, ``avx512_bf16``,) ``platform``, in that order.
    """
    model, flags = _lscpu()
    out: dict[str, Any] = {"cpu_model": model, "cpu_count": os.cpu_count()}
    if bf16:
        out |= {"amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags}
    out["platform"] = platform.platform()
    return out


def uptime_loads(text: str, digits: int) -> dict[str, Any] | None:
    """Summarise the 1-minute load averages of ``uptime`` lines: ``n``, ``min``, ``mean``, ``max``.

    Parameters
    ----------
    text
        Lines of ``uptime`` output (e.g. one a minute while a measurement ran).
    digits
        Decimals the summary is rounded to.

    Returns
    -------
    dict or None
        ``None`` when no line has a ``load average:``.
    """
    loads = [float(m.group(1)) for m in _UPTIME_LOAD.finditer(text)]
    if not loads:
        return None
    return {
        "n": len(loads),
        "min": round(min(loads), digits),
        "mean": round(sum(loads) / len(loads), digits),
        "max": round(max(loads), digits),
    }


def neutral_command(command: str | Sequence[str], names: Mapping[str, str]) -> str:
    """A command as a JSON file records it: no path of the machine it ran on.

    Parameters
    ----------
    command
        The command line, or its argv (whose program, e.g. a virtual environment's
        ``bodyage``, is kept by its name only).
    names
        Machine paths -> the neutral names the record uses instead (e.g. a work folder ->
        ``"dev"``); each occurrence is replaced, longest path first, so a path inside another
        is never half-replaced.

    Returns
    -------
    str
        The command line with the paths replaced.
    """
    if not isinstance(command, str):
        command = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(command))
    for old in sorted(names, key=len, reverse=True):
        command = command.replace(old, names[old])
    return command


def write_json(path: Path, data: Any, *, indent: int = 2, **dumps: Any) -> None:
    """Write ``data`` as JSON (UTF-8, a trailing newline), making the folder first.

    ``dumps`` goes on to :func:`json.dumps` (``allow_nan=False``, ``ensure_ascii=False``, ...).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, **dumps) + "\n", encoding="utf-8")
