"""Provenance records (``run.json``, ``study.json``): how an output folder was made.

:func:`build_run_record` is a pure function of its arguments plus the environment
(package versions, git revision), so every command writes the same kind of record and a
table in a thesis can be traced back to its inputs, arguments and code.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bodyage import __version__
from bodyage.atomic import write_json

#: packages whose versions matter for reproducing an output
TRACKED_PACKAGES: tuple[str, ...] = (
    "numpy",
    "scipy",
    "pandas",
    "pyarrow",
    "nibabel",
    "torch",
    "captum",
    "TotalSegmentator",
    "nnunetv2",
    "statsmodels",
    "pingouin",
    "matplotlib",
    "typer",
)


def now_iso() -> str:
    """Return the current UTC time as an ISO-8601 string (seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def package_versions(names: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Return installed versions of ``names`` (``None`` where not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision(path: str | os.PathLike[str] | None = None) -> str | None:
    """Return the git revision of the source tree bodyage runs from, or ``None``.

    A ``+dirty`` suffix marks uncommitted changes.
    """
    where = Path(path) if path is not None else Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}+dirty" if dirty else rev


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Return the SHA-256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def text_sha256(text: str | bytes) -> str:
    """Return the SHA-256 hex digest of a string or bytes."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()


def build_run_record(
    command: str,
    arguments: Mapping[str, Any],
    *,
    seed: int | None = None,
    inputs: Mapping[str, str | os.PathLike[str]] | None = None,
    extra: Mapping[str, Any] | None = None,
    hash_inputs: bool = True,
) -> dict[str, Any]:
    """Build the provenance record of one step.

    Parameters
    ----------
    command
        The command (``"simulate"``, ``"train"``, ...).
    arguments
        The arguments it was called with; values are stringified where not JSON-native.
    seed
        Random seed, if the step is random.
    inputs
        Named input files; each is recorded with its path and (if ``hash_inputs``) SHA-256.
        Folders are recorded by path only.
    extra
        More keys to record (e.g. the scenario hash).
    hash_inputs
        Hash input files (cheap for tables, skip for thousands of images).

    Returns
    -------
    dict
        JSON-serialisable record; ``finished`` is ``None`` until :func:`finish_run_record`.
    """
    recorded_inputs: dict[str, dict[str, str | None]] = {}
    for name, p in (inputs or {}).items():
        path = Path(p)
        digest = file_sha256(path) if hash_inputs and path.is_file() else None
        recorded_inputs[name] = {"path": str(path), "sha256": digest}
    return {
        "command": command,
        "arguments": {k: _jsonable(v) for k, v in arguments.items()},
        "seed": seed,
        "inputs": recorded_inputs,
        "bodyage_version": __version__,
        "git_revision": git_revision(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "started": now_iso(),
        "finished": None,
        **{k: _jsonable(v) for k, v in (extra or {}).items()},
    }


def finish_run_record(record: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """Return a copy of ``record`` with the end time (and ``extra`` keys) filled in."""
    out = dict(record)
    out["finished"] = now_iso()
    out.update({k: _jsonable(v) for k, v in extra.items()})
    return out


def write_record(path: str | os.PathLike[str], record: Mapping[str, Any]) -> Path:
    """Write a provenance record as JSON, atomically."""
    return write_json(path, dict(record))


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    return str(value)
