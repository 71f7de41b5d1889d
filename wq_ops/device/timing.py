"""A phase clock of CUDA events (`wq_ops.block.clock.PhaseClock`): each mark is an event recorded on the
calling thread's current stream, and a phase is the GPU time between two marks, read once, when the block's
seconds are asked for. So a block's phases count their queued kernels without draining the queue at every
phase end, and a block solved on a side stream does not time the next block's forward on the main one."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["CudaEventClock"]


class CudaEventClock:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._phases: list[tuple[str, Any, Any]] = []

    def mark(self) -> object:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def add(self, phase: str, since: object) -> object:
        now = self.mark()
        self._phases.append((phase, since, now))
        return now

    def seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for phase, start, end in self._phases:
            end.synchronize()
            out[phase] = out.get(phase, 0.0) + start.elapsed_time(end) / 1000
        return out
