"""Atomic file writes: a killed step never leaves a half-written file that looks finished.

A temporary file is named ``.<name>.<host>-<pid>.<random>.tmp<suffixes>`` next to its
final file, so :func:`remove_stale_temps` can tell the leftovers of a killed process (its
process id no longer runs on this host) from a file another process is writing now.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bodyage.errors import OutputError

#: errors of the file system rather than of the writer: reported as :class:`OutputError`
DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM})
#: a temporary file of another host (or of a version without the host and pid) is stale after this
STALE_SECONDS = 24 * 3600
_TEMP = re.compile(r"^\..+?\.(?:(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.)?[A-Za-z0-9_]{8}\.tmp(?:\..*)?$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32] or "host"


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary file keeps the final suffixes (``.nii.gz``, ``.parquet``) so writers that
    infer the format from the name behave. On error the temporary file is removed and the
    previous ``path`` (if any) is left untouched.

    Raises
    ------
    OutputError
        If the file system refuses the write (disk full, quota, read-only, permission),
        naming ``path``.
    """
    final = Path(path)
    tmp: Path | None = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        suffix = "".join(final.suffixes)
        prefix = f".{final.name}.{_host()}-{os.getpid()}."
        fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=f".tmp{suffix}", dir=final.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        # mkstemp creates 0600; outputs on a shared cluster should follow the user's umask
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield tmp
        os.replace(tmp, final)
    except OSError as err:
        if err.errno not in DISK_ERRORS:
            if _disk_full(final.parent):
                raise OutputError(f"{final}: cannot be written ({os.strerror(errno.ENOSPC)})") from err
            raise
        raise OutputError(f"{final}: cannot be written ({os.strerror(err.errno)})") from err
    except Exception as err:
        # writers that wrap the failed write in their own error (torch.save: RuntimeError)
        if _disk_full(final.parent):
            raise OutputError(f"{final}: cannot be written ({os.strerror(errno.ENOSPC)})") from err
        raise
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def _disk_full(folder: Path) -> bool:
    """Whether the file system of ``folder`` has (almost) no space left."""
    import shutil

    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files a killed process left in ``folder`` (not recursive).

    Only names :func:`atomic_path` makes are touched: those of this host whose process no
    longer runs, and those of another host (or without host and pid) older than
    :data:`STALE_SECONDS`. Returns the files removed.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    removed = []
    host, now = _host(), time.time()
    for entry in root.iterdir():
        m = _TEMP.match(entry.name)
        if m is None or not entry.is_file():
            continue
        if m["host"] == host:
            stale = not _running(int(m["pid"]))
        else:
            try:
                stale = now - entry.stat().st_mtime > STALE_SECONDS
            except FileNotFoundError:  # renamed by its writer meanwhile
                continue
        if stale:
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8) and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically; NaN is written as ``null``."""
    return write_text(path, json.dumps(_nan_to_none(obj), indent=2, sort_keys=False) + "\n")


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj
