"""Device selection (``--device auto|cpu|cuda``) and torch's global settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bodyage.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """Return the torch device for ``auto``, ``cpu`` or ``cuda`` (the local rank's GPU under torchrun).

    Raises
    ------
    InputError
        For an unknown name, or ``cuda`` without a CUDA device.
    """
    import torch

    if device not in ("auto", "cpu", "cuda", "gpu"):
        raise InputError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device in ("cuda", "gpu") and not torch.cuda.is_available():
        raise InputError("--device cuda was requested but torch sees no CUDA device")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
