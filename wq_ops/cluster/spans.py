"""An actor's span of blocks, one block resident at a time. Quantized propagation: `run_span` quantizes each
block on the activations the actor holds and replaces them with its quantized outputs. Float propagation:
`forward_span` first hands the span's float outputs to the next actor, then `run_span` quantizes from the
same inputs. Two helper threads overlap the phases of neighbouring blocks: block i + 1's tensors load (on a
copy stream) while block i computes, and block i - 1's shard is written and hashed meanwhile. With float
propagation on a GPU a third thread solves block i on a side stream while block i + 1 calibrates. Each
computation runs in block order on its own inputs, so results never depend on timing."""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, ParamSpec, Protocol, TypeVar

import torch
from torch import Tensor

from wq_ops.block.calibration import FloatCalibration, calibrate_float_all_, replay_block_, solve_block_
from wq_ops.block.experts import ExpertRunner
from wq_ops.block.quantized import quantize_block_
from wq_ops.cluster.actor_job import ActorJob
from wq_ops.cluster.loader import BlockLoader, Loaded, prefetched
from wq_ops.cluster.protocol import ActivationRef, ShardRecord
from wq_ops.cluster.staging import HostOutcome, StagedReport, done, in_order, stage_block, to_host_queued
from wq_ops.config import Propagation
from wq_ops.device.transport import HostTensor, from_host, to_host
from wq_ops.io.digest import combine_entries

__all__ = ["Compute", "SpanRunner", "put_activations", "take_activations", "to_object_store", "from_object_store"]

P = ParamSpec("P")
R = TypeVar("R")


class Compute(Protocol):
    """Runs fn(*args, **kwargs) on the actor's compute thread (at once on a CPU actor) and returns its result."""

    def __call__(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R: ...


def to_object_store(batches: list[Tensor]) -> list[ActivationRef]:
    """Activation micro-batches into the object store, one ref each, for the next actor."""
    import ray

    return [ActivationRef(ray.put(to_host(b))) for b in batches]


def from_object_store(inputs: list[ActivationRef], device: torch.device) -> list[Tensor]:
    """The previous actor's output micro-batches, on `device`."""
    import ray

    refs: list[Any] = list(inputs)              # Ray object refs, typed as ActivationRefs across the protocol
    hosts: list[HostTensor] = ray.get(refs)
    return [from_host(h, device) for h in hosts]


def put_activations(job: ActorJob, batches: list[Tensor]) -> list[ActivationRef]:
    """Hand activation micro-batches to the object store for the next actor, marking when (the report's)."""
    refs = to_object_store(batches)
    job.mark_handed_on()
    return refs


def take_activations(job: ActorJob, inputs: list[ActivationRef] | None) -> None:
    """The previous actor's output micro-batches (when given) become this actor's activations."""
    if inputs is not None:
        job.batches = from_object_store(inputs, job.device)
        job.inputs_at = time.time()


class SpanRunner:
    """One job's blocks on one actor, one block resident at a time. solve_stream: the side stream of the
    overlapped float solve (None on CPU); overlap_solve: solve block i while block i + 1 calibrates; experts:
    where routed experts are quantized (the expert actors'), None: here."""

    def __init__(self, job: ActorJob, loader: BlockLoader, compute: Compute, *, solve_stream: Any,
                 overlap_solve: bool, experts: ExpertRunner | None = None) -> None:
        self.job, self.loader, self.compute = job, loader, compute
        self.solve_stream, self.overlap_solve = solve_stream, overlap_solve
        self.experts = experts

    def forward_span(self, blocks: list[int], inputs: list[ActivationRef] | None) -> list[ActivationRef]:
        """Float propagation: the span's outputs with the float weights, handed to the object store first,
        so the next actor starts on its blocks while this one quantizes. The span's inputs are kept for
        `run_span`, which computes the same float outputs again, bit for bit (replay_block_ is the
        quantizer's own output path)."""
        job = self.job
        take_activations(job, inputs)
        kept = [b.clone() for b in job.batches]
        batches = job.batches
        for index, loaded in prefetched(self.loader.load_float, blocks):
            batches = self.compute(self.replay, index, loaded, batches)
        refs = put_activations(job, batches)
        job.batches = kept
        return refs

    def run_span(self, blocks: list[int], inputs: list[ActivationRef] | None) -> Iterator[ShardRecord]:
        """Quantize `blocks` in order over the current activations (or, when given, the previous actor's
        output micro-batches), yielding each block's record once its shard is staged."""
        take_activations(self.job, inputs)
        overlap = self.overlap_solve and self.job.spec.job.run.propagation is Propagation.FLOAT
        with ThreadPoolExecutor(1, thread_name_prefix="wq-load") as loader, \
                ThreadPoolExecutor(1, thread_name_prefix="wq-write") as writer, \
                ThreadPoolExecutor(1, thread_name_prefix="wq-solve") as solver:
            def staged() -> Iterator[Future[ShardRecord]]:
                next_load: Future[Loaded] | None = loader.submit(self.loader.load, blocks[0]) if blocks else None
                solving: Future | None = None
                for k, index in enumerate(blocks):
                    assert next_load is not None
                    loaded = next_load.result()
                    next_load = loader.submit(self.loader.load, blocks[k + 1]) if k + 1 < len(blocks) else None
                    if loaded.finished is not None:
                        yield done(self.replay_finished(index, loaded))
                    elif overlap:
                        calibration, ready = self.compute(self.calibrate_block, index, loaded)
                        if solving is not None:      # one block solving at a time: two blocks' statistics live
                            solving.result()
                        solving = solver.submit(self.solve_block, index, loaded, calibration, ready)
                        yield writer.submit(self.stage_solved, index, solving)
                    else:
                        yield writer.submit(self.stage, index, *self.compute(self.compute_block, index, loaded))

            for record in in_order(staged()):
                yield self.job.counted(record)

    def replay_finished(self, index: int, loaded: Loaded) -> ShardRecord:
        """A block an earlier run finished: its activations only, recomputed with the weights it staged
        (bit for bit what that run fed the next block), and its record as staged."""
        assert loaded.finished is not None
        batches, self.job.batches = self.job.batches, []
        self.job.batches = self.compute(self.replay, index, loaded, batches)
        return loaded.finished

    def replay(self, index: int, loaded: Loaded, batches: list[Tensor]) -> list[Tensor]:
        """On the compute thread: the block's outputs with the loaded weights; consumes `batches`."""
        self.loader.await_copy(loaded)
        outputs = replay_block_(self.job.block(index), loaded.params, batches)
        del loaded.params
        return outputs

    def compute_block(self, index: int, loaded: Loaded) -> tuple[HostOutcome, StagedReport]:
        """On the compute thread: quantize block `index` and replace the activations with its outputs. Returns
        its artifact tensors on their way to the host and its report, for `stage`."""
        job, spec = self.job, self.job.spec
        self.loader.await_copy(loaded)
        anatomy = job.ensure_anatomy(index, loaded.params)
        batches, job.batches = job.batches, []
        outcome, job.batches = quantize_block_(job.block(index), loaded.params, anatomy, batches, job.task(index),
                                               propagation=spec.job.run.propagation, stash_tails=spec.stash_tails,
                                               clock=job.clock(), experts=self.experts)
        del loaded.params
        # Expert actors read the routed experts: their digest entries complete the block's source digest.
        source = combine_entries({**loaded.source_entries, **outcome.source_entries}) if outcome.source_entries \
            else loaded.source_sha256
        return to_host_queued(outcome, load_seconds=loaded.seconds, cuda=job.device.type == "cuda",
                              source_sha256=source)

    def calibrate_block(self, index: int, loaded: Loaded) -> tuple[FloatCalibration, Any]:
        """On the compute thread, float propagation: block `index`'s statistics, its float outputs becoming
        the activations. Also an event marking the statistics complete on this stream (None on CPU)."""
        job = self.job
        self.loader.await_copy(loaded)
        batches, job.batches = job.batches, []
        calibration, job.batches = calibrate_float_all_(job.block(index), loaded.params,
                                                        job.ensure_anatomy(index, loaded.params), batches,
                                                        quant=job.spec.job.quant, clock=job.clock())
        ready = None
        if self.solve_stream is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(job.device))
        return calibration, ready

    def solve_block(self, index: int, loaded: Loaded, calibration: FloatCalibration,
                    ready: Any = None) -> tuple[HostOutcome, StagedReport]:
        """Quantize a calibrated block and drop its weights from the device. Returns what `stage` takes.
        With `ready` (the overlapped path, in the solver thread) it runs on the solve stream once the
        statistics are complete, and the tensors are dropped only once that stream is drained, so no queued
        kernel still reads them when the allocator reuses them; else on the current stream."""
        job = self.job
        # solve_block_ consumes the statistics; these references keep them (allocated on the main stream)
        # from going back to its allocator while the solve stream may still read them.
        statistics = (calibration.attn, calibration.mlp)
        side = ready is not None and self.solve_stream is not None
        stream: Any = contextlib.nullcontext()
        if side:
            self.solve_stream.wait_event(ready)
            stream = torch.cuda.stream(self.solve_stream)
        try:
            with stream:
                outcome = solve_block_(job.block(index), loaded.params, job.ensure_anatomy(index, loaded.params),
                                       calibration, job.task(index))
                return to_host_queued(outcome, load_seconds=loaded.seconds, cuda=job.device.type == "cuda",
                                      source_sha256=loaded.source_sha256)
        finally:
            if side:
                self.solve_stream.synchronize()   # also after an error: nothing queued may still read them
            del loaded.params, calibration, statistics

    def stage_solved(self, index: int, solving: Future[tuple[HostOutcome, StagedReport]]) -> ShardRecord:
        return self.stage(index, *solving.result())

    def stage(self, index: int, queued: HostOutcome, report: StagedReport) -> ShardRecord:
        spec = self.job.spec
        return stage_block(spec.artifact, index, spec.rank, queued, report)
