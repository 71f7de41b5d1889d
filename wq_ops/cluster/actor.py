"""The block actor: owns a contiguous span of decoder blocks, keeps the calibration activations on its
device between them, and writes one staged shard per block.

`__init__` does the expensive setup once (process, CUDA context, kernels), so the driver starts the
actors before the job is planned. Every call then carries the job's `ActorSpec` (small descriptors, no
weights); the first call of a job builds its model skeleton on the meta device and rotary tables. The
actor takes one call at a time, so Ray runs its calls in the order the driver made them: `stage_head`
(last actor), `embed` (first actor), then one of two sequences, and `outer_records` (first and last: the
embeddings and head, staged by a background thread while the blocks compute). One block resident at a
time: `forward_span` (float propagation, all but the last), `run_span` (every actor), `emit_outputs`
(quantized propagation, all but the last). Streamed (float propagation, resident spans): `open_span`,
`forward_microbatch` for each micro-batch (taking the previous actor's output ref), `solve_span`.
`run_span` and `solve_span` are streaming generators that yield one `ShardRecord` per block (the staged
shard's path, tensor names, size, checksum and metrics) as soon as it is on disk. In `run_span`, two helper
threads overlap the phases of neighbouring blocks: block i + 1's tensors load (on a copy stream) while
block i computes, and block i - 1's shard is written and hashed meanwhile. With float propagation on a
GPU a third thread solves block i on a side stream while block i + 1 calibrates. Each computation runs in
block order on its own inputs, so results never depend on timing. On a GPU every computation runs on the
actor's compute thread (`ComputeThread`), which warms the device up first, while the actor's own thread
takes the first calls. Activations enter and leave as object refs; no tensor goes to the driver.
The same class also runs inside the driver's process (wq_ops/cluster/runtime.py) for a job of one actor.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar, cast

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from wq_ops.block.calibration import (
    FloatCalibration,
    calibrate_float_,
    calibrate_float_all_,
    replay_block_,
    solve_block_,
)
from wq_ops.block.clock import PhaseClock, WallClock
from wq_ops.block.quantized import quantize_block_
from wq_ops.block.records import PendingReport
from wq_ops.block.work import BlockOutcome, BlockTask
from wq_ops.config import Backend, JobConfig, Propagation, RunConfig
from wq_ops.device.compute_thread import ComputeThread
from wq_ops.device.timing import CudaEventClock
from wq_ops.device.transport import (
    HostTensor,
    Queued,
    after_queued_copies,
    from_host,
    queue_to_device,
    queue_to_host,
    to_host,
)
from wq_ops.device.warm_up import JobShapes, release_warm_up_memory, warm_up_device
from wq_ops.formats import dense_tensors
from wq_ops.io.artifact import ArtifactLayout, save_tensors_atomic, write_json_atomic
from wq_ops.io.checkpoint import Checkpoint, read_tensors
from wq_ops.model.architecture import ModelLayout, attention_window, import_transformers, instantiate_on_meta
from wq_ops.model.block import BlockAnatomy, DecoderBlock, SequenceContext, discover_anatomy, make_sequence_context

__all__ = ["ActorSpec", "ShardRecord", "BlockActor"]

_IMPORTED_AT = time.time()   # this module (torch, transformers, wq) imported in the actor's process

_T = TypeVar("_T")


@dataclass(frozen=True)
class ActorSpec:
    """Everything an actor needs, sent once: small descriptors and configs, never weights."""

    rank: int
    checkpoint: Checkpoint
    hf_config: Any                       # transformers PretrainedConfig, or a NativeLlamaConfig
    layout: ModelLayout
    job: JobConfig
    artifact: ArtifactLayout
    pad_intermediate: int = 0            # zero rows/columns added to the MLP's intermediate dim (--tp-policy pad)
    stash_tails: bool = False            # the plan's: keep each stage's last linear's inputs (quantize_block_)


@dataclass(frozen=True)
class ShardRecord:
    """What an actor reports for one staged shard. part: "embed", "block" or "head"."""

    part: str
    block: int | None
    staged_path: str
    tensor_names: tuple[str, ...]
    nbytes: int
    sha256: str
    rank: int
    layers: tuple[dict, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)
    resumed: bool = False                # staged by an earlier run of the same job, replayed, not recomputed
    finished_at: float = 0.0             # wall clock (time.time()) when it was staged: pipeline timelines

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ShardRecord":
        return cls(**{**data, "tensor_names": tuple(data["tensor_names"]), "layers": tuple(data["layers"])})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_shard(path: Path, tensors: dict[str, Tensor]) -> tuple[int, str]:
    """Stage a shard atomically; returns (tensor bytes, sha256 of the file)."""
    save_tensors_atomic(path, tensors)
    return sum(t.numel() * t.element_size() for t in tensors.values()), _sha256(path)


@dataclass
class _Loaded:
    params: dict[str, Tensor]
    ready: Any                           # a CUDA event the compute stream waits on, or None on CPU
    seconds: float
    finished: ShardRecord | None = None  # staged by an earlier run: params are what it computed with


def _on_compute_thread(method: Callable[..., _T]) -> Callable[..., _T]:
    """A BlockActor method that computes on the GPU: it runs on the actor's compute thread (`_on_compute`)."""
    @functools.wraps(method)
    def run(self: "BlockActor", *args: Any, **kwargs: Any) -> _T:
        return self._on_compute(method, self, *args, **kwargs)

    return run


class BlockActor:
    """Wrapped with `ray.remote` by the driver; plain Python, so it is also testable in-process."""

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
        # Wall-clock marks of the warm start, for the report (where start-up time goes). The warm-up's own
        # time is known once it is done: `warm_up_seconds`.
        self.startup = {"imported_at": _IMPORTED_AT, "init_at": t0, "device_s": round(t1 - t0, 3),
                        "kernels_s": round(t2 - t1, 3), "transformers_s": round(time.time() - t3, 3),
                        "ready_at": time.time()}
        self._spec: ActorSpec | None = None
        # The tensors before and after the blocks are copied unchanged: staged off the critical path.
        self._outer_writer = ThreadPoolExecutor(1, thread_name_prefix="wq-outer")
        self._outer: list[Future[ShardRecord]] = []
        # Wall-clock marks of the activation handoff (inputs_at: the previous actor's outputs resolved here;
        # handed_on_at: this actor's outputs put in the object store), for the report's pipeline timeline.
        self.handoff: dict[str, float] = {}

    def _on_compute(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """fn(*args, **kwargs) on the compute thread, waited for (here on CPU). The first waits for the
        device's warm-up and then releases the warm-up's cuBLAS workspaces, while no other thread can run
        a GEMM: this one runs none (it only moves data)."""
        if self._compute is None:
            return fn(*args, **kwargs)
        return self._compute.call(fn, *args, **kwargs)

    def warm_up_seconds(self) -> float | None:
        """How long the device's warm-up took, once it is done (None on CPU); raises its error."""
        return None if self._compute is None else round(self._compute.warm_up_seconds(), 3)

    def capacity_bytes(self, n_actors: int) -> tuple[int, dict[str, float]]:
        """Memory this actor may plan with (its GPU's, or its host's shared by the job's actors), and
        its warm start's time marks."""
        if self.device.type == "cuda":
            return int(torch.cuda.get_device_properties(self.device).total_memory), self.startup
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // n_actors, self.startup

    def _use(self, spec: ActorSpec) -> None:
        """Make `spec` the current job; a new job gets its model skeleton on the meta device, rotary
        tables and staging folder (the same job's later calls reuse them)."""
        if self._spec is not None and (self._spec.rank, self._spec.artifact) == (spec.rank, spec.artifact):
            return
        self._spec = spec
        self.handoff = {}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)     # memory_peak reports this job's
        self.model = instantiate_on_meta(spec.hf_config, trust_remote_code=spec.job.trust_remote_code)
        base = self.model.get_submodule(spec.layout.block_prefix.rsplit(".", 1)[0])
        rotary_cls: Any = type(base.get_submodule("rotary_emb"))
        with torch.device(self.device):
            self.rotary: nn.Module = rotary_cls(config=spec.hf_config)
        self.blocks = cast(nn.ModuleList, self.model.get_submodule(spec.layout.block_prefix))
        self.contexts: dict[int | None, SequenceContext] = {}
        self.anatomy: BlockAnatomy | None = None
        self.batches: list[Tensor] = []
        self._computed = 0                       # blocks this run quantized (not replayed)
        spec.artifact.staging.mkdir(parents=True, exist_ok=True)

    @property
    def spec(self) -> ActorSpec:
        if self._spec is None:
            raise RuntimeError("no job yet: every BlockActor call but capacity_bytes takes the job's ActorSpec")
        return self._spec

    # --- activations in and out -------------------------------------------------------------------
    def embed(self, spec: ActorSpec, ids: Tensor) -> None:
        """Embed the calibration token ids (n_samples, seq_len) into this actor's activations, and start
        staging the tensors that come before the first block (the embeddings), copied unchanged."""
        self._use(spec)
        layout = self.spec.layout
        t = time.perf_counter()
        names = [n for n in layout.outer_params if n == layout.embed_name]
        host = read_tensors(self.spec.checkpoint, names)
        embedding: Any = self.model.get_input_embeddings()  # type: ignore[operator]
        from torch.func import functional_call

        mb = self.spec.job.run.micro_batch_samples
        with torch.no_grad():
            weight = host[layout.embed_name].to(self.device)
            self.batches = [functional_call(embedding, {"weight": weight}, (chunk.to(self.device),))
                            for chunk in ids.split(mb)]
            del weight
        seconds = time.perf_counter() - t
        self._outer.append(self._outer_writer.submit(self._stage_outer, "embed", host, {"load": seconds}))

    def emit_outputs(self) -> list[Any]:
        """Hand this actor's final activations to the object store, one ref per micro-batch."""
        import ray

        batches, self.batches = self.batches, []
        refs = [ray.put(to_host(b)) for b in batches]
        self.handoff["handed_on_at"] = time.time()
        return refs

    # --- blocks -------------------------------------------------------------------------------------
    def _window(self, index: int) -> int | None:
        return attention_window(self.blocks[index], self.spec.hf_config, self.spec.layout.architecture)

    def _context(self, index: int) -> SequenceContext:
        window = self._window(index)
        if window not in self.contexts:
            self.contexts[window] = make_sequence_context(
                self.rotary, seq_len=self.spec.job.calib.seq_len, hidden_size=self.spec.layout.hidden_size,
                window=window, device=self.device, dtype=self.spec.layout.dtype)
        return self.contexts[window]

    def _probe_context(self, index: int) -> SequenceContext:
        """A short context for probing the block's structure (16 tokens, the same window rule)."""
        window = self._window(index)
        return make_sequence_context(self.rotary, seq_len=16, hidden_size=self.spec.layout.hidden_size,
                                     window=window if window is None else min(window, 8), device=self.device,
                                     dtype=self.spec.layout.dtype)

    def _finished(self, index: int) -> ShardRecord | None:
        """The record of block `index` if an earlier run of this job (same fingerprint) staged it and the
        shard on disk is the one it recorded; else None (the block is computed afresh)."""
        artifact = self.spec.artifact
        record_path, shard = artifact.staged_block_record(index), artifact.staged_block(index)
        if not (record_path.is_file() and shard.is_file()):
            return None
        try:
            record = ShardRecord.from_json(json.loads(record_path.read_text()))
        except (ValueError, TypeError, KeyError):
            return None
        if record.block != index or Path(record.staged_path) != shard or _sha256(shard) != record.sha256:
            return None
        return replace(record, rank=self.spec.rank, resumed=True)

    def _load(self, index: int, *, staged: bool = True) -> _Loaded:
        """Read block `index` and start its copy to the device on the copy stream: from its shards, or,
        for a block an earlier run finished, the weights it was quantized to (from its staged shard)."""
        layout, job = self.spec.layout, self.spec.job
        t = time.perf_counter()
        prefix = f"{layout.block_prefix}.{index}."
        finished = self._finished(index) if staged else None
        if finished is not None and job.run.propagation is Propagation.QUANTIZED:
            stored = load_file(str(self.spec.artifact.staged_block(index)))
            host = _unpadded(dense_tensors(job.format, stored, quant=job.quant, dtype=layout.dtype),
                             self.spec.pad_intermediate)
        else:
            host = read_tensors(self.spec.checkpoint, [prefix + local for local in layout.block_params])
        cut = len(prefix)
        ready = None
        if self.copy_stream is not None:
            with torch.cuda.stream(self.copy_stream):
                params = {n[cut:]: queue_to_device(v, layout.dtype, self.device) for n, v in host.items()}
                ready = torch.cuda.Event()
                ready.record(self.copy_stream)
        else:
            params = {n[cut:]: v.to(layout.dtype) for n, v in host.items()}
        return _Loaded(params=params, ready=ready, seconds=time.perf_counter() - t, finished=finished)

    def _take_inputs(self, inputs: list[Any] | None) -> None:
        """The previous actor's output micro-batches (object refs) become this actor's activations."""
        if inputs is not None:
            import ray

            hosts: list[HostTensor] = ray.get(list(inputs))
            self.batches = [from_host(h, self.device) for h in hosts]
            self.handoff["inputs_at"] = time.time()

    def forward_span(self, spec: ActorSpec, blocks: list[int], inputs: list[Any] | None = None) -> list[Any]:
        """Float propagation: the span's outputs with the float weights, handed to the object store first,
        so the next actor starts on its blocks while this one quantizes. The span's inputs are kept for
        `run_span`, which computes the same float outputs again, bit for bit (replay_block_ is the
        quantizer's own output path)."""
        import ray

        self._use(spec)
        self._take_inputs(inputs)
        kept = [b.clone() for b in self.batches]
        batches = self.batches
        with ThreadPoolExecutor(1, thread_name_prefix="wq-load") as loader:
            next_load: Future[_Loaded] | None = loader.submit(self._load_float, blocks[0]) if blocks else None
            for k, index in enumerate(blocks):
                assert next_load is not None
                loaded = next_load.result()
                next_load = loader.submit(self._load_float, blocks[k + 1]) if k + 1 < len(blocks) else None
                batches = self._replay(index, loaded, batches)
        refs = [ray.put(to_host(b)) for b in batches]
        self.handoff["handed_on_at"] = time.time()
        self.batches = kept
        return refs

    def run_span(self, spec: ActorSpec, blocks: list[int], inputs: list[Any] | None = None) -> Iterator[ShardRecord]:
        """Quantize `blocks` in order over the current activations (or, when given, the previous actor's
        output micro-batches, as object refs), yielding each block's record once its shard is staged."""
        self._use(spec)
        self._take_inputs(inputs)
        overlap = self.overlap_solve and self.spec.job.run.propagation is Propagation.FLOAT
        with ThreadPoolExecutor(1, thread_name_prefix="wq-load") as loader, \
                ThreadPoolExecutor(1, thread_name_prefix="wq-write") as writer, \
                ThreadPoolExecutor(1, thread_name_prefix="wq-solve") as solver:
            def staged() -> Iterator[Future[ShardRecord]]:
                next_load: Future[_Loaded] | None = loader.submit(self._load, blocks[0]) if blocks else None
                solving: Future | None = None
                for k, index in enumerate(blocks):
                    assert next_load is not None
                    loaded = next_load.result()
                    next_load = loader.submit(self._load, blocks[k + 1]) if k + 1 < len(blocks) else None
                    if loaded.finished is not None:
                        yield _done(self._replay_block(index, loaded))
                    elif overlap:
                        calibration, ready = self._calibrate_block(index, loaded)
                        if solving is not None:      # one block solving at a time: two blocks' statistics live
                            solving.result()
                        solving = solver.submit(self._solve_block, index, loaded, calibration, ready)
                        yield writer.submit(self._stage_solved, index, solving)
                    else:
                        yield writer.submit(self._stage_block, index, *self._compute_block(index, loaded))

            for record in _in_order(staged()):
                yield self._counted(record)

    # --- streaming: micro-batches through a resident span (float propagation) --------------------------
    def open_span(self, spec: ActorSpec, blocks: list[int], n_micro: int) -> None:
        """Load the span's float weights onto the device, to stay there while the `n_micro` calibration
        micro-batches stream through it, and start a calibration for each block an earlier run did not
        stage."""
        self._use(spec)
        self.span: dict[int, tuple[_Loaded, FloatCalibration | None]] = {}
        self.micro_expected, self.micro_seen = n_micro, 0
        with ThreadPoolExecutor(1, thread_name_prefix="wq-load") as loader:
            for index, loaded in zip(blocks, loader.map(self._load, blocks)):
                self._await_copy(loaded)
                self._on_compute(self._ensure_anatomy, index, loaded)
                self.span[index] = (loaded, FloatCalibration(self._clock()) if loaded.finished is None else None)

    def forward_microbatch(self, spec: ActorSpec, m: int, x: HostTensor | None) -> HostTensor | None:
        """Micro-batch `m` through the span: from the previous actor (x), or this actor's embeddings. Each
        block accumulates its statistics from it; returns the span's output for the next actor (None on
        the last actor, whose outputs nobody needs)."""
        self._use(spec)
        if x is None:
            h, self.batches[m] = self.batches[m], torch.empty(0)
        else:
            h = from_host(x, self.device)
            if m == 0:
                self.handoff["inputs_at"] = time.time()
        h = self._through_span(h)
        self.micro_seen += 1
        if self.spec.layout.n_blocks - 1 in self.span:
            return None
        if m == 0:
            self.handoff["handed_on_at"] = time.time()
        return to_host(h)

    @_on_compute_thread
    def _through_span(self, h: Tensor) -> Tensor:
        """One micro-batch through the resident span, accumulating each block's statistics."""
        for index, (loaded, calibration) in self.span.items():
            block = DecoderBlock(self.blocks[index], self._context(index))
            if calibration is None:                  # staged by an earlier run: its float outputs only
                (h,) = replay_block_(block, loaded.params, [h])
            else:
                h = calibrate_float_(block, loaded.params, self._ensure_anatomy(index, loaded), h, calibration,
                                     quant=self.spec.job.quant)
        return h

    def solve_span(self, spec: ActorSpec) -> Iterator[ShardRecord]:
        """Quantize the span's blocks from their statistics, in order, yielding each block's record once its
        shard is staged (written meanwhile by a helper thread); each block's weights leave the device as
        soon as it is solved."""
        self._use(spec)
        if self.micro_seen != self.micro_expected:   # statistics of part of the calibration set: never stage
            raise RuntimeError(f"actor {self.spec.rank}: {self.micro_seen} of {self.micro_expected} calibration "
                               "micro-batches reached this span (an earlier forward failed); nothing was staged")
        with ThreadPoolExecutor(1, thread_name_prefix="wq-write") as writer:
            def staged() -> Iterator[Future[ShardRecord]]:
                for index in list(self.span):
                    loaded, calibration = self.span.pop(index)
                    if calibration is None:
                        assert loaded.finished is not None
                        yield _done(loaded.finished)
                        continue
                    # The block's weights leave the device as it is solved.
                    yield writer.submit(self._stage_block, index, *self._solve_block(index, loaded, calibration))

            for record in _in_order(staged()):
                yield self._counted(record)

    def _ensure_anatomy(self, index: int, loaded: _Loaded) -> BlockAnatomy:
        """The blocks' structure (linear groups by stage), probed once per job on its first block."""
        if self.anatomy is None:
            self.anatomy = discover_anatomy(DecoderBlock(self.blocks[index], self._probe_context(index)),
                                            loaded.params, self.spec.layout.linears,
                                            hidden_size=self.spec.layout.hidden_size)
        return self.anatomy

    def _clock(self) -> PhaseClock:
        """A block's phase clock: CUDA events on a GPU (no wait per phase), else wall time."""
        return CudaEventClock(self.device) if self.device.type == "cuda" else WallClock()

    def _task(self, index: int) -> BlockTask:
        layout, job = self.spec.layout, self.spec.job
        return BlockTask(quant=job.quant, fmt=job.format, block_index=index, prefix=layout.block_prefix,
                         linears=layout.linears, pad_intermediate=self.spec.pad_intermediate)

    def _host_outcome(self, outcome: BlockOutcome,
                      loaded: _Loaded) -> tuple[Queued[tuple[dict[str, Tensor], Tensor]], "_StagedReport"]:
        """A solved block's artifact tensors on their way to the host, and its report (layer records and
        phase seconds), read by the writer. On a GPU the copies (into pinned memory) are queued on the
        current stream and not waited for here: the writer waits for them, and this thread goes on to queue
        the next block's work (a waited copy left the GPU idle for 37 ms a block on the H100)."""
        t = time.perf_counter()
        # The report's numbers travel with the tensors: one more copy, queued with theirs.
        host = after_queued_copies(({k: queue_to_host(v) for k, v in outcome.tensors.items()},
                                    queue_to_host(outcome.report.numbers)), cuda=self.device.type == "cuda")
        report = _StagedReport(outcome.report, outcome.clock, load_seconds=loaded.seconds,
                               copy_seconds=time.perf_counter() - t)
        return host, report

    def _counted(self, record: ShardRecord) -> ShardRecord:
        """Count the blocks this run computed. The fault-injection hook (fail_after_blocks) crashes the
        actor once that many are staged, to test resuming: the staged ones survive."""
        if not record.resumed:
            self._computed += 1
            limit = self.spec.job.fail_after_blocks
            if limit is not None and self._computed >= limit:
                raise RuntimeError(f"fail_after_blocks={limit}: injected crash of actor {self.spec.rank} "
                                   f"after {limit} block(s) computed and staged")
        return record

    def _replay_block(self, index: int, loaded: _Loaded) -> ShardRecord:
        """A block an earlier run finished: its activations only, recomputed with the weights it staged
        (bit for bit what that run fed the next block), and its record as staged."""
        assert loaded.finished is not None
        batches, self.batches = self.batches, []
        self.batches = self._replay(index, loaded, batches)
        return loaded.finished

    @_on_compute_thread
    def _replay(self, index: int, loaded: _Loaded, batches: list[Tensor]) -> list[Tensor]:
        self._await_copy(loaded)
        block = DecoderBlock(self.blocks[index], self._context(index))
        outputs = replay_block_(block, loaded.params, batches)
        del loaded.params
        return outputs

    def _await_copy(self, loaded: _Loaded) -> None:
        """Make the compute stream wait for the block's copy to the device."""
        if loaded.ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(loaded.ready)
            for tensor in loaded.params.values():
                tensor.record_stream(compute)   # made on the copy stream, used (and freed) on this one

    def _load_float(self, index: int) -> _Loaded:
        return self._load(index, staged=False)

    @_on_compute_thread
    def _compute_block(self, index: int,
                       loaded: _Loaded) -> tuple[Queued[tuple[dict[str, Tensor], Tensor]], "_StagedReport"]:
        """Quantize block `index` and replace the activations with its outputs. Returns its artifact
        tensors on their way to the host and its report, for `_stage_block`."""
        job = self.spec.job
        self._await_copy(loaded)
        block = DecoderBlock(self.blocks[index], self._context(index))
        anatomy = self._ensure_anatomy(index, loaded)
        batches, self.batches = self.batches, []
        outcome, self.batches = quantize_block_(block, loaded.params, anatomy, batches, self._task(index),
                                                propagation=job.run.propagation, stash_tails=self.spec.stash_tails,
                                                clock=self._clock())
        del loaded.params
        return self._host_outcome(outcome, loaded)

    @_on_compute_thread
    def _calibrate_block(self, index: int, loaded: _Loaded) -> tuple[FloatCalibration, Any]:
        """Float propagation: block `index`'s statistics, its float outputs becoming the activations. Also
        an event marking the statistics complete on this stream (None on CPU)."""
        self._await_copy(loaded)
        block = DecoderBlock(self.blocks[index], self._context(index))
        batches, self.batches = self.batches, []
        calibration, self.batches = calibrate_float_all_(block, loaded.params, self._ensure_anatomy(index, loaded),
                                                         batches, quant=self.spec.job.quant, clock=self._clock())
        ready = None
        if self.solve_stream is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        return calibration, ready

    def _solve_block(self, index: int, loaded: _Loaded, calibration: FloatCalibration,
                     ready: Any = None) -> tuple[Queued[tuple[dict[str, Tensor], Tensor]], "_StagedReport"]:
        """Quantize a calibrated block and drop its weights from the device. Returns what `_stage_block`
        takes. With `ready` (the overlapped path, in the solver thread) it runs on the solve stream once
        the statistics are complete, and the tensors are dropped only once that stream is drained, so no
        queued kernel still reads them when the allocator reuses them; else on the current stream."""
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
                block = DecoderBlock(self.blocks[index], self._context(index))
                outcome = solve_block_(block, loaded.params, self._ensure_anatomy(index, loaded), calibration,
                                       self._task(index))
                return self._host_outcome(outcome, loaded)
        finally:
            if side:
                self.solve_stream.synchronize()   # also after an error: nothing queued may still read them
            del loaded.params, calibration, statistics

    def _stage_solved(self, index: int, solving: Future) -> ShardRecord:
        return self._stage_block(index, *solving.result())

    def _stage_block(self, index: int, queued: Queued[tuple[dict[str, Tensor], Tensor]],
                     report: "_StagedReport") -> ShardRecord:
        host, numbers = queued.wait()
        layers, seconds = report.layers(numbers), report.seconds()
        t = time.perf_counter()                  # the write itself, not the wait for the block's GPU work
        path = self.spec.artifact.staged_block(index)
        nbytes, sha = _write_shard(path, host)
        record = ShardRecord(part="block", block=index, staged_path=str(path), tensor_names=tuple(sorted(host)),
                             nbytes=nbytes, sha256=sha, rank=self.spec.rank, layers=layers,
                             seconds={**seconds, "write": time.perf_counter() - t}, finished_at=time.time())
        write_json_atomic(self.spec.artifact.staged_block_record(index), asdict(record))
        return record

    def stage_head(self, spec: ActorSpec) -> None:
        """Start staging the tensors after the last block (final norm, untied lm_head), copied unchanged:
        nothing depends on them, so they are written while the blocks compute."""
        self._use(spec)
        layout = self.spec.layout
        names = [n for n in layout.outer_params if n != layout.embed_name]

        def read_and_stage() -> ShardRecord:
            t = time.perf_counter()
            tensors = read_tensors(self.spec.checkpoint, names, device="cpu")
            return self._stage_outer("head", tensors, {"load": time.perf_counter() - t})

        self._outer.append(self._outer_writer.submit(read_and_stage))

    def _stage_outer(self, part: str, tensors: dict[str, Tensor], seconds: dict[str, float]) -> ShardRecord:
        t = time.perf_counter()
        path = self.spec.artifact.staged_outer(part)
        nbytes, sha = _write_shard(path, tensors)
        return ShardRecord(part=part, block=None, staged_path=str(path), tensor_names=tuple(sorted(tensors)),
                           nbytes=nbytes, sha256=sha, rank=self.spec.rank,
                           seconds={**seconds, "write": time.perf_counter() - t})

    def outer_records(self) -> list[ShardRecord]:
        """The records of the embeddings and head this actor staged, once they are on disk."""
        return [f.result() for f in self._outer]

    def close(self) -> None:
        """Let the staging and compute threads finish (a warm-up still running included) and drop the
        device tensors (an in-process actor at the job's end; a Ray actor's process simply ends)."""
        self._outer_writer.shutdown(wait=True)
        if self._compute is not None:
            self._compute.close()
        self.batches, self.span = [], {}
        self._spec = None

    def handoff_times(self) -> dict[str, float]:
        """When this actor's inputs arrived and its outputs were handed on (absent: not applicable)."""
        return dict(self.handoff)

    def memory_peak(self) -> dict[str, int]:
        """The most device memory this actor's tensors took at once during the current job, and what torch's
        caching allocator held at most (bytes; what the GPU showed as used, less the CUDA context). Empty on
        CPU."""
        if self.device.type != "cuda":
            return {}
        return {"allocated_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                "reserved_bytes": int(torch.cuda.max_memory_reserved(self.device))}


@dataclass(frozen=True)
class _StagedReport:
    """A block's report as the writer stages it: the layers as dicts, and the phase seconds with the load
    and the queueing of the host copies (counted as pack)."""

    report: PendingReport
    clock: PhaseClock
    load_seconds: float
    copy_seconds: float

    def layers(self, numbers: Tensor) -> tuple[dict, ...]:
        """From the host copy of the report's numbers; raises a failed packing check first."""
        return tuple(_layer_dict(r) for r in self.report.resolve(numbers))

    def seconds(self) -> dict[str, float]:
        phases = self.clock.seconds()
        return {"load": self.load_seconds, **phases, "pack": phases.get("pack", 0.0) + self.copy_seconds}


def _in_order(staged: Iterator[Future[ShardRecord]]) -> Iterator[ShardRecord]:
    """The records of blocks being staged, in block order, each as soon as it and those before it are on
    disk; `staged` is advanced (the next block computed) in between."""
    pending: list[Future[ShardRecord]] = []
    for future in staged:
        pending.append(future)
        while pending and pending[0].done():
            yield pending.pop(0).result()
    for future in pending:
        yield future.result()


def _done(record: ShardRecord) -> Future[ShardRecord]:
    future: Future[ShardRecord] = Future()
    future.set_result(record)
    return future


def _unpadded(tensors: dict[str, Tensor], pad: int) -> dict[str, Tensor]:
    """Undo --tp-policy pad on a block's dense tensors: the computation runs at the model's own width."""
    if not pad:
        return tensors
    out = {}
    for name, value in tensors.items():
        module = name.rsplit(".", 1)[0]
        if module.endswith((".mlp.gate_proj", ".mlp.up_proj")):
            value = value[: value.shape[0] - pad]
        elif module.endswith(".mlp.down_proj") and name.endswith(".weight"):
            value = value[:, : value.shape[1] - pad]
        out[name] = value.contiguous()
    return out


def _layer_dict(record: Any) -> dict:
    d = asdict(record)
    d["outliers"] = asdict(record.outliers)
    return json.loads(json.dumps(d, default=float))
