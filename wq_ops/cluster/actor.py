"""The block actor: a thin host for one job's block pipeline on one device. It owns a contiguous span of
decoder blocks, keeps the calibration activations on its device between them, and stages one shard per
block; the pipeline itself is `spans.SpanRunner` (one block resident at a time) or `streamed.StreamedSpan`
(a resident span the micro-batches stream through).

`__init__` does the expensive setup once (process, CUDA context, kernels), so the driver starts the actors
before the job is planned. Every call then carries the job's `ActorSpec`; the first call of a job builds its
state (`ActorJob`). The actor takes one call at a time, in the order the driver made them (the driver's
`_run_actors` says which): `stage_head` (last actor), `embed` (first actor); then, one block resident at a
time, `forward_span` (float propagation, all but the last), `run_span` (every actor), `emit_outputs`
(quantized propagation, all but the last); or streamed, `open_span`, `forward_microbatch` per micro-batch,
`solve_span`; then `outer_records` (first and last), `handoff_times`, `memory_peak`, `warm_up_seconds`. An
expert actor (--expert-actors) takes `quantize_experts` calls from the block actors instead.
On a GPU every computation runs on the actor's compute thread (`ComputeThread`), which warms the device up
first, while the actor's own thread takes the first calls. The same class also runs inside the driver's
process (`local_runtime`) for a job of one actor.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, ParamSpec, TypeVar

import torch
from torch import Tensor

from wq_ops.cluster.actor_job import ActorJob
from wq_ops.cluster.blame import blamed
from wq_ops.cluster.eval_span import EvalSpan
from wq_ops.cluster.expert_pool import (
    ExpertReader,
    ExpertsResult,
    RoutedTransfer,
    quantize_expert_range,
    remote_experts,
)
from wq_ops.cluster.loader import BlockLoader
from wq_ops.cluster.protocol import (
    ActivationRef,
    ActorSpec,
    Capacity,
    HandoffTimes,
    MemoryPeak,
    Pending,
    ShardRecord,
    StartupMarks,
)
from wq_ops.cluster.ray_calls import call_remote
from wq_ops.cluster.spans import SpanRunner, from_object_store, put_activations, to_object_store
from wq_ops.cluster.staging import stage_outer
from wq_ops.cluster.streamed import StreamedSpan
from wq_ops.config import Backend, RunConfig
from wq_ops.device.compute_thread import ComputeThread
from wq_ops.device.transport import HostTensor
from wq_ops.device.warm_up import JobShapes, release_warm_up_memory, warm_up_device
from wq_ops.errors import QuantizationError
from wq_ops.io.checkpoint import read_tensors
from wq_ops.model.architecture import import_transformers

__all__ = ["BlockActor"]

_IMPORTED_AT = time.time()   # this module (torch, transformers, wq) imported in the actor's process

P = ParamSpec("P")
R = TypeVar("R")


def _node_id() -> str:
    """The Ray node this process runs on; "local" where Ray is not running in it (an in-process actor)."""
    ray = sys.modules.get("ray")          # a Ray actor's process has imported it; importing it here would cost
    if ray is not None and ray.is_initialized():
        return str(ray.get_runtime_context().get_node_id())
    return "local"


class BlockActor:
    """Wrapped with `ray.remote` by the Ray runtime; plain Python, so it also runs in-process."""

    def __init__(self, run: RunConfig, backend: Backend, shapes: JobShapes | None = None, *,
                 preload_transformers: bool = True) -> None:
        """The warm start: the process, torch, the device and the kernels, and transformers where the job's
        blocks run its classes. On a GPU the device's warm-up (at the job's shapes, when known:
        `job_shapes`) starts on the compute thread and goes on after this returns: meanwhile the driver
        plans the job and this thread takes its first calls, which only move data (the embeddings, block
        0's weights). The driver creates the actors first thing, so this overlaps with reading the
        checkpoint's config and the calibration data."""
        t0 = time.time()
        torch.set_num_threads(run.cpus_per_actor)
        self._compute: ComputeThread | None = None
        if run.gpus_per_actor > 0:
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.copy_stream: Any = torch.cuda.Stream(self.device)
            self.solve_stream: Any = torch.cuda.Stream(self.device)
            torch.empty(1, device=self.device)   # the CUDA context now, not on the first block
        else:
            self.device = torch.device("cpu")
            self.copy_stream = self.solve_stream = None
        # Float propagation on a GPU: block i is solved on a side stream, in a helper thread, while block
        # i + 1 calibrates (its inputs do not depend on i's quantized weights). Each computation keeps its
        # order and its inputs, so the bytes do not depend on the overlap (tests force it on CPU too).
        self.overlap_solve = self.device.type == "cuda"
        t1 = time.time()
        if backend is Backend.CUDA:
            from wq_ops.kernels.build import load_extension

            load_extension()                     # build or load once, before the first block
        t2 = time.time()
        if self.device.type == "cuda":
            # Every block computes on one thread of its own, which warms the device up first: cuDNN keeps its
            # attention graphs per thread. Started before transformers' import, which would otherwise wait
            # for the driver's in an in-process actor.
            device = self.device
            self._compute = ComputeThread(device, lambda: warm_up_device(device, backend, shapes, release=False),
                                          settle=release_warm_up_memory)
        t3 = time.time()
        # transformers (where the job's model skeleton is its classes) is imported now, not by the first
        # call: it took 12 s on the H100 machine, on the critical path. wq's native modules need none of it.
        if preload_transformers:
            import_transformers()
        self.startup = StartupMarks(imported_at=_IMPORTED_AT, init_at=t0, device_s=round(t1 - t0, 3),
                                    kernels_s=round(t2 - t1, 3), transformers_s=round(time.time() - t3, 3),
                                    ready_at=time.time(), node=_node_id())
        self._job: ActorJob | None = None
        self._runner: SpanRunner | None = None
        self._streamed: StreamedSpan | None = None
        # The tensors before and after the blocks are copied unchanged: staged off the critical path.
        self._outer_writer = ThreadPoolExecutor(1, thread_name_prefix="wq-outer")
        self._outer: list[Future[ShardRecord]] = []
        self._expert_reader: ExpertReader | None = None     # an expert actor's reads (made by its first call)

    def _on_compute(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """fn(*args, **kwargs) on the compute thread, waited for (here on CPU). The first waits for the
        device's warm-up and then releases the warm-up's cuBLAS workspaces, while no other thread can run
        a GEMM: this one runs none (it only moves data)."""
        if self._compute is None:
            return fn(*args, **kwargs)
        return self._compute.call(fn, *args, **kwargs)

    def _use(self, spec: ActorSpec) -> tuple[ActorJob, SpanRunner]:
        """The job `spec` names, and its pipeline: made by the job's first call, reused by the later ones."""
        if self._job is None or self._runner is None or not self._job.same_job(spec):
            self._job = ActorJob(spec, self.device)
            # --expert-actors: routed experts are quantized there (their weights never load here).
            experts = remote_experts(spec.expert_actors, spec, self.device, BlockActor._submit_experts) \
                if spec.expert_actors else None
            self._runner = SpanRunner(self._job, BlockLoader(self._job, self.copy_stream), self._on_compute,
                                      solve_stream=self.solve_stream, overlap_solve=self.overlap_solve,
                                      experts=experts)
            self._streamed = None
        return self._job, self._runner

    # --- start-up and resources ---------------------------------------------------------------------
    def capacity(self, n_actors: int) -> Capacity:
        """Memory this actor may plan with (its GPU's, or its host's shared by the job's actors), and its
        warm start's time marks."""
        if self.device.type == "cuda":
            return Capacity(int(torch.cuda.get_device_properties(self.device).total_memory), self.startup)
        return Capacity(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // n_actors, self.startup)

    def warm_up_seconds(self) -> float | None:
        """How long the device's warm-up took, once it is done (None on CPU); raises its error."""
        return None if self._compute is None else round(self._compute.warm_up_seconds(), 3)

    # --- the tensors outside the blocks ---------------------------------------------------------------
    def embed(self, spec: ActorSpec, ids: Tensor) -> None:
        """Embed the calibration token ids (n_samples, seq_len) into this actor's activations, and start
        staging the tensors that come before the first block (the embeddings), copied unchanged."""
        job, _ = self._use(spec)
        layout = spec.layout
        t = time.perf_counter()
        host = read_tensors(spec.checkpoint, [n for n in layout.outer_params if n == layout.embed_name])
        embedding: Any = job.model.get_input_embeddings()  # type: ignore[operator]
        from torch.func import functional_call

        with torch.no_grad():
            weight = host[layout.embed_name].to(self.device)
            job.batches = [functional_call(embedding, {"weight": weight}, (chunk.to(self.device),))
                           for chunk in ids.split(spec.job.run.micro_batch_samples)]
            del weight
        seconds = {"load": time.perf_counter() - t}
        self._outer.append(self._outer_writer.submit(stage_outer, spec.artifact, "embed", spec.rank, host, seconds))

    def stage_head(self, spec: ActorSpec) -> None:
        """Start staging the tensors after the last block (final norm, untied lm_head, and the layers carried
        past the blocks), copied unchanged: nothing depends on them, so they are written while the blocks
        compute."""
        self._use(spec)
        names = [n for n in spec.layout.outer_params if n != spec.layout.embed_name] + list(spec.carried)

        def read_and_stage() -> ShardRecord:
            t = time.perf_counter()
            tensors = read_tensors(spec.checkpoint, names, device="cpu")
            return stage_outer(spec.artifact, "head", spec.rank, tensors, {"load": time.perf_counter() - t})

        self._outer.append(self._outer_writer.submit(read_and_stage))

    def outer_records(self) -> list[ShardRecord]:
        """The records of the embeddings and head this actor staged, once they are on disk."""
        return [f.result() for f in self._outer]

    # --- one block resident at a time ------------------------------------------------------------------
    def forward_span(self, spec: ActorSpec, blocks: list[int],
                     inputs: list[ActivationRef] | None = None) -> list[ActivationRef]:
        """Float propagation: the span's float outputs, handed on first (`SpanRunner.forward_span`)."""
        return self._use(spec)[1].forward_span(blocks, inputs)

    def run_span(self, spec: ActorSpec, blocks: list[int],
                 inputs: list[ActivationRef] | None = None) -> Iterator[ShardRecord]:
        """Quantize `blocks`, yielding each block's record once its shard is staged (`SpanRunner.run_span`).
        A generator itself: Ray streams only a generator method's items."""
        try:
            yield from self._use(spec)[1].run_span(blocks, inputs)
        except QuantizationError as e:
            raise blamed(spec, blocks, e) from None

    def emit_outputs(self, spec: ActorSpec) -> list[ActivationRef]:
        """Hand this actor's final activations to the object store, one ref per micro-batch."""
        job, _ = self._use(spec)
        batches, job.batches = job.batches, []
        return put_activations(job, batches)

    # --- an expert actor (--expert-actors): a range of a routed block's experts -------------------------
    @staticmethod
    def _submit_experts(actor: Any, spec: ActorSpec, rank: int, block: int, experts: range,
                        routed: RoutedTransfer) -> Pending[ExpertsResult]:
        """A block actor's call of an expert actor's `quantize_experts` (`expert_pool.remote_experts`)."""
        return call_remote(actor, BlockActor.quantize_experts, spec, rank, block, experts, routed)

    def quantize_experts(self, spec: ActorSpec, rank: int, block: int, experts: range,
                         routed: RoutedTransfer) -> ExpertsResult:
        """Quantize `experts` of block `block` for the block's actor, which sent its `spec` and the routed
        inputs (`expert_pool.quantize_expert_range`); this actor runs as `rank`."""
        job, _ = self._use(dataclasses.replace(spec, rank=rank, expert_actors=()))
        if self._expert_reader is None:
            self._expert_reader = ExpertReader()
        try:
            return self._on_compute(quantize_expert_range, job, self._expert_reader, block, experts, routed)
        except QuantizationError as e:
            raise blamed(spec, [block], e) from None

    # --- streamed: micro-batches through a resident span (float propagation) ---------------------------
    def open_span(self, spec: ActorSpec, blocks: list[int], n_micro: int) -> None:
        """Load the span's float weights onto the device, to stay there while the `n_micro` calibration
        micro-batches stream through it."""
        job, runner = self._use(spec)
        self._streamed = StreamedSpan(job, runner.loader, self._on_compute, runner, blocks, n_micro)

    def forward_microbatch(self, spec: ActorSpec, m: int, x: HostTensor | None) -> HostTensor | None:
        """Micro-batch `m` through the span (`StreamedSpan.forward`)."""
        span = self._streamed_span(spec)
        try:
            return span.forward(m, x)
        except QuantizationError as e:
            raise blamed(spec, list(span.span), e) from None

    def solve_span(self, spec: ActorSpec) -> Iterator[ShardRecord]:
        """Quantize the span's blocks from their statistics (`StreamedSpan.solve`); a generator, as run_span."""
        span = self._streamed_span(spec)
        blocks = list(span.span)
        try:
            yield from span.solve()
        except QuantizationError as e:
            raise blamed(spec, blocks, e) from None

    def _streamed_span(self, spec: ActorSpec) -> StreamedSpan:
        self._use(spec)
        if self._streamed is None:
            raise RuntimeError(f"actor {spec.rank}: no span is open (open_span comes first)")
        return self._streamed

    # --- --eval, once the span is quantized --------------------------------------------------------------
    def eval_forward(self, spec: ActorSpec, blocks: list[int], windows: Tensor | None,
                     inputs: list[ActivationRef] | None, quantized: bool) -> list[ActivationRef]:
        """--eval: the windows' activations through this actor's span, with the artifact's weights (quantized)
        or the source's, handed to the next actor. The first actor is given the windows and embeds them."""
        span, batches = self._eval_inputs(spec, windows, inputs, quantized)
        return to_object_store(span.forward(blocks, batches))

    def eval_score(self, spec: ActorSpec, blocks: list[int], windows: Tensor,
                   inputs: list[ActivationRef] | None, quantized: bool) -> list[float]:
        """--eval on the last actor: its span, then each window's mean next-token NLL (`EvalSpan.score`);
        inputs None: this actor is also the first, and embeds the windows."""
        span, batches = self._eval_inputs(spec, windows if inputs is None else None, inputs, quantized)
        return span.score(span.forward(blocks, batches), windows)

    def _eval_inputs(self, spec: ActorSpec, windows: Tensor | None, inputs: list[ActivationRef] | None,
                     quantized: bool) -> tuple[EvalSpan, list[Tensor]]:
        """The evaluation's pass on this actor, and its input micro-batches: the windows embedded (first
        actor) or the previous actor's outputs. The calibration's activations and resident span go first:
        the quantization is over when the driver sends these calls."""
        job, runner = self._use(spec)
        job.batches = []
        if self._streamed is not None:
            self._streamed.close()
            self._streamed = None
        span = EvalSpan(job, runner.loader, self._on_compute, quantized=quantized)
        if inputs is not None:
            return span, from_object_store(inputs, self.device)
        assert windows is not None, "the first actor embeds the windows"
        return span, span.embed(windows)

    # --- the job's end ---------------------------------------------------------------------------------
    def handoff_times(self) -> HandoffTimes:
        """When this actor's inputs arrived and its outputs were handed on."""
        return HandoffTimes() if self._job is None else self._job.handoff()

    def memory_peak(self) -> MemoryPeak:
        """The most device memory this actor's tensors took at once during the current job, and what torch's
        caching allocator held at most (what the GPU showed as used, less the CUDA context); none on CPU."""
        if self.device.type != "cuda":
            return MemoryPeak()
        return MemoryPeak(allocated_bytes=int(torch.cuda.max_memory_allocated(self.device)),
                          reserved_bytes=int(torch.cuda.max_memory_reserved(self.device)))

    def close(self) -> None:
        """Let the staging and compute threads finish (a warm-up still running included) and drop the
        device tensors (an in-process actor at the job's end; a Ray actor's process simply ends)."""
        self._outer_writer.shutdown(wait=True)
        if self._expert_reader is not None:
            self._expert_reader.close()
        if self._compute is not None:
            self._compute.close()
        if self._streamed is not None:
            self._streamed.close()
        self._job = self._runner = self._streamed = None
