"""An actor's span kept resident while the calibration micro-batches stream through it, actor to actor (float
propagation with several actors whose spans fit): `open` loads the span's float weights, `forward` takes one
micro-batch through every block of the span (each accumulating its statistics) and returns it for the next
actor, and `solve` quantizes the blocks in order, each block's weights leaving the device as it is solved."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import torch
from torch import Tensor

from wq_ops.block.calibration import FloatCalibration, calibrate_float_, replay_block_
from wq_ops.cluster.actor_job import ActorJob
from wq_ops.cluster.loader import BlockLoader, Loaded
from wq_ops.cluster.protocol import ShardRecord
from wq_ops.cluster.spans import Compute, SpanRunner
from wq_ops.cluster.staging import done, in_order
from wq_ops.device.transport import HostTensor, from_host, to_host

__all__ = ["StreamedSpan"]


class StreamedSpan:
    """blocks: the span, in order; n_micro: the calibration micro-batches that will stream through it."""

    def __init__(self, job: ActorJob, loader: BlockLoader, compute: Compute, runner: SpanRunner, blocks: list[int],
                 n_micro: int) -> None:
        self.job, self.loader, self.compute, self.runner = job, loader, compute, runner
        self.expected, self.seen = n_micro, 0
        # Each block's weights, and its calibration (None for a block an earlier run staged: replayed only).
        self.span: dict[int, tuple[Loaded, FloatCalibration | None]] = {}
        with ThreadPoolExecutor(1, thread_name_prefix="wq-load") as pool:
            for index, loaded in zip(blocks, pool.map(loader.load, blocks)):
                loader.await_copy(loaded)
                self.compute(job.ensure_anatomy, index, loaded.params)
                self.span[index] = (loaded, FloatCalibration(job.clock()) if loaded.finished is None else None)

    def forward(self, m: int, x: HostTensor | None) -> HostTensor | None:
        """Micro-batch `m` through the span: from the previous actor (x), or this actor's embeddings. Each
        block accumulates its statistics from it; returns the span's output for the next actor (None on
        the last actor, whose outputs nobody needs)."""
        job = self.job
        if x is None:
            h, job.batches[m] = job.batches[m], torch.empty(0)
        else:
            h = from_host(x, job.device)
            if m == 0:
                job.inputs_at = time.time()
        h = self.compute(self._through_span, h)
        self.seen += 1
        if job.spec.layout.n_blocks - 1 in self.span:
            return None
        if m == 0:
            job.mark_handed_on()
        return to_host(h)

    def _through_span(self, h: Tensor) -> Tensor:
        """On the compute thread: one micro-batch through the resident span, accumulating each block's
        statistics."""
        for index, (loaded, calibration) in self.span.items():
            block = self.job.block(index)
            if calibration is None:                  # staged by an earlier run: its float outputs only
                (h,) = replay_block_(block, loaded.params, [h])
            else:
                h = calibrate_float_(block, loaded.params, self.job.ensure_anatomy(index, loaded.params), h,
                                     calibration, quant=self.job.spec.job.quant)
        return h

    def solve(self) -> Iterator[ShardRecord]:
        """Quantize the span's blocks from their statistics, in order, yielding each block's record once its
        shard is staged (written meanwhile by a helper thread)."""
        if self.seen != self.expected:   # statistics of part of the calibration set: never stage
            raise RuntimeError(f"actor {self.job.spec.rank}: {self.seen} of {self.expected} calibration "
                               "micro-batches reached this span (an earlier forward failed); nothing was staged")
        with ThreadPoolExecutor(1, thread_name_prefix="wq-write") as writer:
            def staged() -> Iterator[Future[ShardRecord]]:
                for index in list(self.span):
                    loaded, calibration = self.span.pop(index)
                    if calibration is None:
                        assert loaded.finished is not None
                        yield done(loaded.finished)
                        continue
                    # The block's weights leave the device as it is solved.
                    yield writer.submit(self.runner.stage, index, *self.runner.solve_block(index, loaded, calibration))

            for record in in_order(staged()):
                yield self.job.counted(record)

    def close(self) -> None:
        self.span = {}
