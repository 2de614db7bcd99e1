"""Options shared by the compute commands: ``--device`` and ``--threads``, spelled once.

The values and their help come from :mod:`bodyage.device` (the registry), so every
command accepts the same devices (``auto``, ``cpu``, ``cuda``; ``gpu`` for ``cuda``).
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from bodyage.device import DEVICE_HELP

#: ``--device`` of train, attribute, segment, clocks, demo and bench
DeviceOption = Annotated[str, typer.Option("--device", help=DEVICE_HELP)]
#: ``--threads`` of the same commands
ThreadsOption = Annotated[
    Optional[int],
    typer.Option(
        "--threads",
        min=1,
        help="CPU threads torch uses [default: OMP_NUM_THREADS, else SLURM_CPUS_PER_TASK, else torch's default]. "
        "On a shared machine fewer threads are often faster.",
    ),
]


def compute_options(device: str | None, threads: int | None) -> int:
    """Check ``--device`` and set torch's CPU threads, before the library call (and before any file is read).

    ``--threads`` wins; without it ``OMP_NUM_THREADS``, else ``SLURM_CPUS_PER_TASK``, else
    torch's own default (:func:`bodyage.device.resolve_threads`). Returns the number of
    threads torch will use.

    Raises
    ------
    InputError
        An unknown device, or a thread count that is not a positive integer.
    """
    import torch

    from bodyage.device import normalize_device, resolve_threads

    if device is not None:
        normalize_device(device)
    n = resolve_threads(threads)
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()
