"""Where this process sits under ``torchrun`` (rank, world size) and how work is split.

Reads the environment variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``),
so it needs no torch import. Scans are split by rank with :func:`shard`; rank 0 writes
the merged outputs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

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
