"""Job progress for people: what the driver tells a reporter as each block is staged (`BlockProgress`), the
time-left estimate (`TimeLeft`), and the renderings: a live bar when stderr is a terminal (`BarReporter`,
tqdm), one key=value log line per block otherwise (`LogReporter`), or a caller's function
(`CallbackReporter`, the Python API's). The driver only calls a `ProgressReporter`; showing is the reporter's.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Protocol, TextIO

__all__ = ["BlockProgress", "ProgressReporter", "LogReporter", "BarReporter", "CallbackReporter", "TimeLeft",
           "reporter_for"]

log = logging.getLogger(__name__)

GIB = 1 << 30


@dataclass(frozen=True)
class BlockProgress:
    """The job after one more block was staged. eta_s: None until there is a rate to go by; tokens_per_s:
    calibration tokens through blocks computed by this run, per second of the job so far."""

    block: int
    rank: int
    done: int                            # blocks staged, of `total`
    total: int
    actor_done: int                      # of this actor's blocks
    actor_total: int
    resumed: bool                        # staged by an earlier run of this job: replayed, not computed
    block_seconds: float                 # the block's phases (load, forward, solve, pack, write) summed
    mean_error: float | None             # mean relative output error of its quantized layers
    elapsed_s: float
    tokens_per_s: float
    eta_s: float | None
    device_peak_bytes: int | None        # the actor's most GPU memory in use so far (None on CPU)

    def log_line(self) -> str:
        """One key=value line (Ray job logs, files, anything that is not a terminal)."""
        head = (f"block={self.block} done={self.done}/{self.total} actor={self.rank} "
                f"actor_done={self.actor_done}/{self.actor_total}")
        if self.resumed:
            return f"{head} resumed (staged by an earlier run of this job)"
        parts = [head, f"seconds={self.block_seconds:.2f}"]
        if self.mean_error is not None:
            parts.append(f"mean_error={self.mean_error:.3e}")
        parts += [f"elapsed_s={self.elapsed_s:.1f}", f"tokens_per_s={self.tokens_per_s:.0f}",
                  f"eta_s={'?' if self.eta_s is None else f'{self.eta_s:.1f}'}"]
        if self.device_peak_bytes is not None:
            parts.append(f"gpu_peak_gib={self.device_peak_bytes / GIB:.2f}")
        return " ".join(parts)


class ProgressReporter(Protocol):
    """Where the driver's progress goes: `start` once the plan is made, `update` per staged block, `close` at
    the end (also after a failure)."""

    def start(self, total: int) -> None: ...

    def update(self, progress: BlockProgress) -> None: ...

    def close(self) -> None: ...


class LogReporter:
    """One log line per block (INFO, the driver's logger)."""

    def start(self, total: int) -> None:
        pass

    def update(self, progress: BlockProgress) -> None:
        log.info("%s", progress.log_line())

    def close(self) -> None:
        pass


class BarReporter:
    """A live bar on a terminal: blocks done, time left, tokens/s, the GPU memory peak. Log lines printed
    meanwhile go above the bar (tqdm's logging redirect), and each block's line still reaches the log at
    DEBUG."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.bar: Any = None
        self._redirect: Any = None

    def start(self, total: int) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.bar = tqdm(total=total, unit="block", file=self.stream, dynamic_ncols=True,
                        bar_format="{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} blocks [{elapsed}] {postfix}")
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()

    def update(self, progress: BlockProgress) -> None:
        log.debug("%s", progress.log_line())
        if self.bar is None:
            return
        self.bar.set_postfix_str(_bar_postfix(progress), refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self._redirect.__exit__(None, None, None)
            self.bar = self._redirect = None


class CallbackReporter:
    """Calls `on_block(progress)` per staged block (the Python API's `progress=` function); also logs the
    line, so a notebook that shows logs sees the same as the command line."""

    def __init__(self, on_block: Callable[[BlockProgress], None]) -> None:
        self.on_block = on_block

    def start(self, total: int) -> None:
        pass

    def update(self, progress: BlockProgress) -> None:
        log.info("%s", progress.log_line())
        self.on_block(progress)

    def close(self) -> None:
        pass


def reporter_for(stream: TextIO) -> ProgressReporter:
    """The bar when `stream` is a terminal, log lines otherwise (Ray job logs, CI, pipes)."""
    isatty = getattr(stream, "isatty", None)
    return BarReporter(stream) if callable(isatty) and isatty() else LogReporter()


def _bar_postfix(p: BlockProgress) -> str:
    parts = [f"ETA {_clock(p.eta_s)}" if p.eta_s is not None else "ETA ?"]
    if p.tokens_per_s > 0:
        parts.append(f"{p.tokens_per_s / 1000:.1f}k tok/s" if p.tokens_per_s >= 1000 else f"{p.tokens_per_s:.0f} tok/s")
    if p.device_peak_bytes is not None:
        parts.append(f"GPU {p.device_peak_bytes / GIB:.1f} GiB")
    return ", ".join(parts)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class TimeLeft:
    """The time left, from when each actor staged its blocks. An actor's first block carries its warm-up, its
    first load and, for streamed float propagation, the whole calibration forward pass: so an actor's pace
    is the interval between its later blocks (its first block's time only until a second one is done).
    Actors run their spans one after another where each needs the previous one's quantized outputs
    (`sequential`), else at once: the time left is the sum of the actors' times left, or the longest.

    actor_totals: each actor's blocks to stage; started_at: when the actors began (any clock, seconds)."""

    def __init__(self, actor_totals: list[int], *, sequential: bool, started_at: float) -> None:
        self.totals, self.sequential, self.started_at = actor_totals, sequential, started_at
        self.done = [0] * len(actor_totals)
        self.computed: list[list[float]] = [[] for _ in actor_totals]     # each actor's staging times

    def add(self, rank: int, *, at: float, resumed: bool) -> None:
        """Actor `rank` staged a block at time `at` (a resumed one costs next to nothing: no pace from it)."""
        self.done[rank] += 1
        if not resumed:
            self.computed[rank].append(at)

    def pace(self, rank: int) -> float | None:
        """Seconds per block for actor `rank`: its own interval, else the other actors' (median), else its
        first block's time, else any actor's first block's time; None before any block was computed."""
        own = self._interval(rank)
        if own is not None:
            return own
        others = [p for p in (self._interval(r) for r in range(len(self.totals))) if p is not None]
        if others:
            return statistics.median(others)
        if self.computed[rank]:
            return self.computed[rank][0] - self._start(rank)
        firsts = [times[0] - self._start(r) for r, times in enumerate(self.computed) if times]
        return max(firsts) if firsts else None

    def _interval(self, rank: int) -> float | None:
        times = self.computed[rank]
        return (times[-1] - times[0]) / (len(times) - 1) if len(times) >= 2 else None

    def overhead(self) -> float:
        """Seconds an actor's first block takes beyond its pace (warm-up, first load, a streamed job's forward
        pass), from the actors that have a pace of their own (median); 0 before any has."""
        seen = []
        for rank, times in enumerate(self.computed):
            interval = self._interval(rank)
            if interval is not None:
                seen.append(max(times[0] - self._start(rank) - interval, 0.0))
        return statistics.median(seen) if seen else 0.0

    def eta(self, now: float) -> float | None:
        """Seconds left at time `now` (0 once every block is staged; None while nothing tells the pace)."""
        left = []
        overhead = self.overhead()
        for rank, (planned, done) in enumerate(zip(self.totals, self.done)):
            remaining = planned - done
            if remaining == 0:
                continue
            pace = self.pace(rank)
            if pace is None:
                return None
            running = not self.sequential or self._running(rank)
            if self.computed[rank]:
                # The block under way has been running since the actor's last one was staged.
                under_way = min(now - self.computed[rank][-1], pace) if running else 0.0
                left.append(max(remaining * pace - under_way, 0.0))
            else:                         # its first block, with the overhead the others' first blocks had
                first = overhead + remaining * pace
                left.append(max(first - (now - self._start(rank) if running else 0.0), 0.0))
        if not left:
            return 0.0
        return sum(left) if self.sequential else max(left)

    def _start(self, rank: int) -> float:
        """When actor `rank` could begin: the job's start; in a sequential job, when the previous actors'
        last block was staged."""
        if not self.sequential or rank == 0:
            return self.started_at
        before = [t for times in self.computed[:rank] for t in times]
        return max(before, default=self.started_at)

    def _running(self, rank: int) -> bool:
        """In a sequential job: actor `rank` is the one at work (every actor before it has finished)."""
        return all(self.done[r] == self.totals[r] for r in range(rank))
