"""Where this process sits under ``torchrun`` (rank, world size) and how work is split.

Reads the environment variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``),
so it needs no torch import. Scans are split by rank with :func:`shard`; rank 0 writes
the merged outputs, after :func:`rank_group`'s barrier (the only place that imports
``torch.distributed``, and only with several processes).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from bodyage.errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class WorldInfo:
    """Rank of this process among ``world_size`` processes (1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process writes the merged outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1


def world_info() -> WorldInfo:
    """Read rank and world size from the environment (torchrun / SLURM + torchrun)."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise InputError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({err})") from err
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"invalid torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return WorldInfo(rank=rank, world_size=world, local_rank=local)


def shard(items: Sequence[T], info: WorldInfo | None = None) -> list[T]:
    """Return this rank's share of ``items`` (round-robin: balanced and order-stable)."""
    w = info if info is not None else world_info()
    return [item for i, item in enumerate(items) if i % w.world_size == w.rank]


@contextmanager
def rank_group(world: WorldInfo) -> Iterator[Any]:
    """Join the torchrun process group (gloo) for the final barrier; no-op on one process.

    Yields a callable that blocks until every rank has called it. The group is created
    only if none exists (a caller's own group is used and left alone) and destroyed on
    exit.

    Parameters
    ----------
    world : WorldInfo
        This process's rank and world size (:func:`world_info`).

    Yields
    ------
    Callable[[], None]
        The barrier: ``torch.distributed.barrier`` with several processes, a no-op with one.

    Raises
    ------
    InputError
        With several processes, if ``MASTER_ADDR`` or ``MASTER_PORT`` is unset and no
        process group exists (the ranks were not started by torchrun), or if this torch
        build has no ``torch.distributed``.
    """
    if not world.distributed:
        yield lambda: None
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    already = sys.modules.get("torch.distributed")
    if missing and not (already is not None and already.is_initialized()):
        raise InputError(
            f"WORLD_SIZE={world.world_size} but {', '.join(missing)} is not set: start the ranks with torchrun"
        )
    import datetime

    import torch.distributed as dist

    if not dist.is_available():  # pragma: no cover - CPU builds have gloo
        raise InputError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    created = False
    if not dist.is_initialized():
        # shards finish hours apart: the barrier must wait that long
        dist.init_process_group(backend="gloo", timeout=datetime.timedelta(days=7))
        created = True
    try:
        yield dist.barrier
    finally:
        if created:
            dist.destroy_process_group()
