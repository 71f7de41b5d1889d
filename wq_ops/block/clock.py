"""Time per phase of a block's work, behind a small interface: the block marks phase boundaries, the caller
chooses the clock. `WallClock` (host wall time) is the default; a GPU actor hands in a clock of CUDA
events (`wq_ops.device.timing.CudaEventClock`), which times the queued kernels without draining the queue."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["PhaseClock", "WallClock"]


class PhaseClock(Protocol):
    def mark(self) -> object:
        """A point in time, now (on the calling thread's stream, for a device clock)."""

    def add(self, phase: str, since: object) -> object:
        """Count the time from the mark `since` to now in `phase`; returns a mark now."""

    def seconds(self) -> dict[str, float]:
        """Seconds per phase so far (a device clock waits for its last mark here)."""


class WallClock:
    """Host wall time: a phase is what passed on this machine's clock between two marks."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    def mark(self) -> object:
        return time.perf_counter()

    def add(self, phase: str, since: object) -> object:
        now = time.perf_counter()
        assert isinstance(since, float)
        self._seconds[phase] = self._seconds.get(phase, 0.0) + now - since
        return now

    def seconds(self) -> dict[str, float]:
        return dict(self._seconds)
