"""Staging a block's shard: its artifact tensors and report on their way to the host (queued, on a GPU), then
written atomically beside its record (path, names, size, sha256, layer records), so that a rerun of the same
job replays it instead of computing it again. Also the tensors outside the blocks (embeddings, head), copied
unchanged."""

from __future__ import annotations

import hashlib
import math
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from wq_ops.block.clock import PhaseClock
from wq_ops.block.records import PendingReport
from wq_ops.block.work import BlockOutcome
from wq_ops.cluster.protocol import ShardRecord
from wq_ops.device.transport import Queued, after_queued_copies, queue_to_host
from wq_ops.errors import ArtifactError, QuantizationError
from wq_ops.io.artifact import ArtifactLayout, save_tensors_atomic, write_json_atomic

__all__ = ["StagedReport", "HostOutcome", "to_host_queued", "stage_block", "stage_outer", "file_sha256", "in_order",
           "done"]

# A block's artifact tensors and its report's numbers, on their way to the host.
HostOutcome = Queued[tuple[dict[str, Tensor], Tensor]]


@dataclass(frozen=True)
class StagedReport:
    """A block's report as the writer stages it: the layer records (from the host copy of the numbers) and
    the phase seconds, with the load and the queueing of the host copies (counted as pack)."""

    report: PendingReport
    clock: PhaseClock
    load_seconds: float
    copy_seconds: float
    source_sha256: str = ""              # of the block's source tensors as read (`tensors_sha256`)
    expert_actors: tuple[dict[str, float | int], ...] = ()    # each expert actor's rank and seconds per phase

    def seconds(self) -> dict[str, float]:
        phases = self.clock.seconds()
        return {"load": self.load_seconds, **phases, "pack": phases.get("pack", 0.0) + self.copy_seconds}


def to_host_queued(outcome: BlockOutcome, *, load_seconds: float, cuda: bool,
                   source_sha256: str = "") -> tuple[HostOutcome, StagedReport]:
    """A solved block's artifact tensors and report numbers on their way to the host, and its report. On a
    GPU the copies (into pinned memory) are queued on the current stream and not waited for here: the
    writer waits for them, and the compute thread goes on to queue the next block's work (a waited copy
    left the GPU idle for 37 ms a block on the H100)."""
    t = time.perf_counter()
    host = after_queued_copies(({k: queue_to_host(v) for k, v in outcome.tensors.items()},
                                queue_to_host(outcome.report.numbers)), cuda=cuda)
    return host, StagedReport(outcome.report, outcome.clock, load_seconds=load_seconds,
                              copy_seconds=time.perf_counter() - t, source_sha256=source_sha256,
                              expert_actors=outcome.expert_actors)


def stage_block(artifact: ArtifactLayout, index: int, rank: int, queued: HostOutcome,
                report: StagedReport) -> ShardRecord:
    """Write block `index`'s shard and its record; raises a failed packing check before anything is written."""
    host, numbers = queued.wait()
    # Scales and unquantized tensors (small; the packed codes are integers): NaN weights give NaN scales, so FP8
    # values (which torch cannot test) need no check of their own.
    bad = next((k for k, v in sorted(host.items()) if v.is_floating_point() and v.element_size() > 1
                and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise QuantizationError(f"block {index}: {bad} holds NaN or Inf values; nothing was staged")
    layers, seconds = report.report.resolve(numbers), report.seconds()
    for layer in layers:
        if layer.quantized and not math.isfinite(layer.output_error):
            raise QuantizationError(f"block {index}: {layer.name}'s output error is not finite (its weights or "
                                    "inputs hold NaN or Inf); nothing was staged")
    t = time.perf_counter()                  # the write itself, not the wait for the block's GPU work
    path = artifact.staged_block(index)
    nbytes, sha = _write_shard(path, host)
    record = ShardRecord(part="block", block=index, staged_path=str(path), tensor_names=tuple(sorted(host)),
                         nbytes=nbytes, sha256=sha, rank=rank, layers=layers,
                         seconds={**seconds, "write": time.perf_counter() - t}, finished_at=time.time(),
                         source_sha256=report.source_sha256, expert_actors=report.expert_actors)
    write_json_atomic(artifact.staged_block_record(index), record.to_json())
    return record


def stage_outer(artifact: ArtifactLayout, part: str, rank: int, tensors: dict[str, Tensor],
                seconds: dict[str, float]) -> ShardRecord:
    """Write the tensors before the first block ("embed") or after the last ("head"), unchanged."""
    t = time.perf_counter()
    path = artifact.staged_outer(part)
    nbytes, sha = _write_shard(path, tensors)
    return ShardRecord(part=part, block=None, staged_path=str(path), tensor_names=tuple(sorted(tensors)),
                       nbytes=nbytes, sha256=sha, rank=rank, seconds={**seconds, "write": time.perf_counter() - t})


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_shard(path: Path, tensors: dict[str, Tensor]) -> tuple[int, str]:
    """Stage a shard atomically; returns (tensor bytes, sha256 of the file)."""
    try:
        save_tensors_atomic(path, tensors)
    except OSError as e:
        raise ArtifactError(f"cannot stage {path.name} in {path.parent} ({e}); free space there or choose another "
                            "--out: the blocks staged so far are kept, and a rerun resumes from them") from None
    return sum(t.numel() * t.element_size() for t in tensors.values()), file_sha256(path)


def in_order(staged: Iterator[Future[ShardRecord]]) -> Iterator[ShardRecord]:
    """The records of blocks being staged, in block order, each as soon as it and those before it are on
    disk; `staged` is advanced (the next block computed) in between."""
    pending: list[Future[ShardRecord]] = []
    for future in staged:
        pending.append(future)
        while pending and pending[0].done():
            yield pending.pop(0).result()
    for future in pending:
        yield future.result()


def done(record: ShardRecord) -> Future[ShardRecord]:
    """A record already staged, as a finished future among those being staged."""
    future: Future[ShardRecord] = Future()
    future.set_result(record)
    return future
