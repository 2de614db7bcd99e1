"""Timing and memory of the benchmark stages, and the side-by-side record they produce.

:func:`interleaved` times contenders in this process, one call of each per round with
the order alternating, and keeps the median: a load that comes and goes hits both
alike, so the ratio survives a busy machine better than either time.
:class:`StageMemory` measures a stage's peak resident set (and CUDA memory) and wall
time; :func:`comparison` turns two times into a :class:`Comparison` with its goal.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from bodyage.bench_ukb import process_peak_rss_mb, reset_peak_rss

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class Comparison:
    """One side-by-side measurement.

    ``ratio`` is a speed-up (``reference / ours`` seconds) when ``ratio_kind`` is
    ``speedup`` and a cost (``ours / reference``) when it is ``cost``; ``goal`` reads
    against ``ratio`` (e.g. ``>= 50``), ``met`` is ``None`` where there is no goal.
    """

    name: str
    stage: str
    ours: str
    reference: str
    ours_s: float
    reference_s: float
    ratio: float
    ratio_kind: Literal["speedup", "cost"]
    goal: str | None = None
    met: bool | None = None
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def comparison(
    name: str,
    stage: str,
    ours: str,
    reference: str,
    ours_s: float,
    reference_s: float,
    kind: Literal["speedup", "cost"],
    goal: tuple[str, float] | None = None,
    why_missed: str | None = None,
    **detail: Any,
) -> Comparison:
    """A :class:`Comparison` of ``ours_s`` against ``reference_s`` seconds, checked against ``goal``.

    ``goal`` is ``(">=", value)`` or ``("<=", value)`` on the ratio; a missed goal gets a
    ``reason`` quoting the measured ratio, the goal and ``why_missed``.
    """
    ratio = reference_s / ours_s if kind == "speedup" else ours_s / reference_s
    met: bool | None = None
    reason = None
    goal_text = None
    if goal is not None:
        op, value = goal
        goal_text = f"{op} {value:g}"
        met = bool(ratio >= value) if op == ">=" else bool(ratio <= value)
        if not met:
            reason = f"measured {ratio:.3g}, goal {goal_text}" + (f": {why_missed}" if why_missed else "")
    return Comparison(name, stage, ours, reference, ours_s, reference_s, ratio, kind, goal_text, met, reason, detail)


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a timer reads the work and not its launch."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: Mapping[str, Callable[[], object]], rounds: int, device: torch.device | None = None
) -> dict[str, float]:
    """Median seconds per call of each function, one call of each per round (after one warm-up call each).

    The order alternates between rounds, so none of them always runs on a cache (or a
    machine) the one before it left warm.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    order = list(fns.items())
    for r in range(max(1, rounds)):
        for k, fn in order if r % 2 == 0 else order[::-1]:  # alternate who goes first
            if device is not None:
                sync(device)
            t0 = time.perf_counter()
            fn()
            if device is not None:
                sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


class StageMemory:
    """Peak RSS (and CUDA memory) of one stage, and its wall-clock seconds."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> StageMemory:
        import torch

        self._t0 = time.perf_counter()
        reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        self.wall_s = time.perf_counter() - self._t0
        self.rss_mb = process_peak_rss_mb()
        self.gpu_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None

    def to_dict(self) -> dict[str, float | None]:
        """Peak resident set and peak CUDA memory (MiB, one decimal; ``None`` off CUDA)."""
        return {
            "rss_mb": round(self.rss_mb, 1),
            "gpu_mb": None if self.gpu_mb is None else round(self.gpu_mb, 1),
        }
