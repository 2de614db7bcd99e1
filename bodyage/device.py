"""Device and thread selection: one registry for ``--device`` and ``--threads`` on every command.

``--device`` takes ``auto``, ``cpu`` or ``cuda`` on every command (:data:`bodyage._typing.DEVICES`),
with ``gpu`` accepted as an alias of ``cuda`` (TotalSegmentator's spelling, see
:data:`DEVICE_ALIASES`). ``--threads`` defaults to ``OMP_NUM_THREADS``, else SLURM's
``SLURM_CPUS_PER_TASK``, else torch's own default (:func:`resolve_threads`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from bodyage._typing import DEVICES, Device
from bodyage.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: other spellings accepted for a device (alias -> the one name used everywhere)
DEVICE_ALIASES: dict[str, Device] = {"gpu": "cuda"}
#: what ``--help`` says about ``--device`` on every command
DEVICE_HELP = "auto (a GPU if one is visible), cpu or cuda; gpu is accepted for cuda."
#: environment variables that set the default number of CPU threads, in order of precedence
THREAD_VARIABLES: tuple[str, ...] = ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")


def normalize_device(device: str) -> Device:
    """Return the registry's name of ``device`` (``gpu`` -> ``cuda``).

    Raises
    ------
    InputError
        For a value that is neither in :data:`bodyage._typing.DEVICES` nor an alias.
    """
    name = DEVICE_ALIASES.get(device, device)
    for known in DEVICES:
        if name == known:
            return known
    raise InputError(f"--device must be auto, cpu or cuda, got {device!r} (gpu is accepted for cuda)")


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """Return the torch device for ``auto``, ``cpu`` or ``cuda`` (the local rank's GPU under torchrun).

    Raises
    ------
    InputError
        For an unknown name, or ``cuda`` without a CUDA device.
    """
    import torch

    name = normalize_device(device)
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was requested but torch sees no CUDA device")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))


def resolve_threads(threads: int | None, environ: Mapping[str, str] | None = None) -> int | None:
    """The number of CPU threads torch should use, or ``None`` for torch's own default.

    Parameters
    ----------
    threads
        ``--threads``; when given it wins.
    environ
        The environment (default ``os.environ``): ``OMP_NUM_THREADS``, else
        ``SLURM_CPUS_PER_TASK`` (the CPUs SLURM gave the task) set the default.

    Returns
    -------
    int or None
        At least 1; ``None`` when neither the option nor a variable is set.

    Raises
    ------
    InputError
        If ``threads`` is below 1, or a variable is set to something other than a
        positive integer (named in the message).
    """
    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads must be at least 1, got {threads}")
        return int(threads)
    env = os.environ if environ is None else environ
    for name in THREAD_VARIABLES:
        raw = env.get(name, "").strip()
        if not raw:
            continue
        if not raw.isdigit() or int(raw) < 1:
            raise InputError(f"{name}={raw!r} is not a positive integer; set it to a number of threads or unset it")
        return int(raw)
    return None
