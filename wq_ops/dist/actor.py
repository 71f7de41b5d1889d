"""The block actor: owns a contiguous span of decoder blocks, keeps the calibration activations on its
device between them, and writes one staged shard per block.

Setup (device, model skeleton on the meta device, rotary tables, kernels) happens once in `__init__`.
The actor is single-threaded, so Ray runs its calls in the order the driver made them: `embed` (first
actor), `run_span` (every actor), `emit_outputs` (all but the last), `write_head` (last). `run_span` is a
streaming generator that yields one `ShardRecord` per block (the staged shard's path, tensor names, size,
checksum and metrics) as soon as it is on disk. Inside it, two helper threads overlap the phases of
neighbouring blocks: block i + 1's tensors load (on a copy stream) while block i computes, and block
i - 1's shard is written and hashed meanwhile; compute itself stays in one thread, in block order, so
results never depend on timing. Activations enter and leave as object refs; no tensor goes to the driver.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, cast

import torch
from torch import Tensor, nn

from wq_ops.config import Backend, JobConfig
from wq_ops.dist.block_quantizer import quantize_block_
from wq_ops.dist.transport import HostTensor, from_host, to_host
from wq_ops.io.artifact import ArtifactLayout, save_tensors_atomic, write_json_atomic
from wq_ops.io.checkpoint import Checkpoint, read_tensors
from wq_ops.model.architecture import ModelLayout, instantiate_on_meta
from wq_ops.model.block import BlockAnatomy, DecoderBlock, SequenceContext, discover_anatomy, make_sequence_context

__all__ = ["ActorSpec", "ShardRecord", "BlockActor"]


@dataclass(frozen=True)
class ActorSpec:
    """Everything an actor needs, sent once: small descriptors and configs, never weights."""

    rank: int
    checkpoint: Checkpoint
    hf_config: Any                       # transformers PretrainedConfig
    layout: ModelLayout
    job: JobConfig
    artifact: ArtifactLayout


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


class BlockActor:
    """Wrapped with `ray.remote` by the driver; plain Python, so it is also testable in-process."""

    def __init__(self, spec: ActorSpec) -> None:
        self.spec = spec
        run = spec.job.run
        torch.set_num_threads(run.cpus_per_actor)
        if run.gpus_per_actor > 0:
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.copy_stream: Any = torch.cuda.Stream(self.device)
        else:
            self.device = torch.device("cpu")
            self.copy_stream = None
        if spec.job.quant.backend is Backend.CUDA:
            from kernels.build import load_extension

            load_extension()                     # build or load once, before the first block
        self.model = instantiate_on_meta(spec.hf_config, trust_remote_code=spec.job.trust_remote_code)
        base = self.model.get_submodule(spec.layout.block_prefix.rsplit(".", 1)[0])
        rotary_cls: Any = type(base.get_submodule("rotary_emb"))
        with torch.device(self.device):
            self.rotary: nn.Module = rotary_cls(config=spec.hf_config)
        self.blocks = cast(nn.ModuleList, self.model.get_submodule(spec.layout.block_prefix))
        self.contexts: dict[int | None, SequenceContext] = {}
        self.anatomy: BlockAnatomy | None = None
        self.batches: list[Tensor] = []
        spec.artifact.staging.mkdir(parents=True, exist_ok=True)

    # --- activations in and out -------------------------------------------------------------------
    def embed(self, ids: Tensor) -> ShardRecord:
        """Embed the calibration token ids (n_samples, seq_len) into this actor's activations, and stage the
        tensors that come before the first block (the embeddings), copied unchanged."""
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
        path = self.spec.artifact.staged_outer("embed")
        nbytes, sha = _write_shard(path, host)
        return ShardRecord(part="embed", block=None, staged_path=str(path), tensor_names=tuple(sorted(host)),
                           nbytes=nbytes, sha256=sha, rank=self.spec.rank, seconds={"load": time.perf_counter() - t})

    def emit_outputs(self) -> list[Any]:
        """Hand this actor's final activations to the object store, one ref per micro-batch."""
        import ray

        batches, self.batches = self.batches, []
        return [ray.put(to_host(b)) for b in batches]

    # --- blocks -------------------------------------------------------------------------------------
    def _window(self, index: int) -> int | None:
        layer = self.blocks[index]
        return getattr(layer.self_attn, "sliding_window", getattr(self.spec.hf_config, "sliding_window", None))

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

    def _load(self, index: int) -> _Loaded:
        """Read block `index` from its shards and start its copy to the device on the copy stream."""
        layout = self.spec.layout
        t = time.perf_counter()
        names = [layout.block_tensor_name(index, local) for local in layout.block_params]
        host = read_tensors(self.spec.checkpoint, names)
        cut = len(f"{layout.block_prefix}.{index}.")
        ready = None
        if self.copy_stream is not None:
            with torch.cuda.stream(self.copy_stream):
                params = {n[cut:]: v.to(layout.dtype).to(self.device, non_blocking=True) for n, v in host.items()}
                ready = torch.cuda.Event()
                ready.record(self.copy_stream)
        else:
            params = {n[cut:]: v.to(layout.dtype) for n, v in host.items()}
        return _Loaded(params=params, ready=ready, seconds=time.perf_counter() - t)

    def run_span(self, blocks: list[int], inputs: list[Any] | None = None) -> Iterator[ShardRecord]:
        """Quantize `blocks` in order over the current activations (or, when given, the previous actor's
        output micro-batches, as object refs), yielding each block's record once its shard is staged."""
        if inputs is not None:
            import ray

            hosts: list[HostTensor] = ray.get(list(inputs))
            self.batches = [from_host(h, self.device) for h in hosts]
        with ThreadPoolExecutor(1, thread_name_prefix="wq-load") as loader, \
                ThreadPoolExecutor(1, thread_name_prefix="wq-write") as writer:
            next_load: Future[_Loaded] | None = loader.submit(self._load, blocks[0]) if blocks else None
            writes: list[Future[ShardRecord]] = []
            for k, index in enumerate(blocks):
                assert next_load is not None
                loaded = next_load.result()
                next_load = loader.submit(self._load, blocks[k + 1]) if k + 1 < len(blocks) else None
                record_parts = self._compute_block(index, loaded)
                writes.append(writer.submit(self._stage_block, index, *record_parts))
                while writes and writes[0].done():
                    yield writes.pop(0).result()
            for pending in writes:
                yield pending.result()

    def _compute_block(self, index: int, loaded: _Loaded) -> tuple[dict[str, Tensor], tuple, dict[str, float]]:
        """Quantize block `index` and replace the activations with its outputs. Returns its artifact
        tensors on the host, its layer records and its phase seconds."""
        layout: ModelLayout = self.spec.layout
        job = self.spec.job
        if loaded.ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(loaded.ready)
            for tensor in loaded.params.values():
                tensor.record_stream(compute)   # made on the copy stream, used (and freed) on this one
        block = DecoderBlock(self.blocks[index], self._context(index))
        if self.anatomy is None:
            self.anatomy = discover_anatomy(DecoderBlock(self.blocks[index], self._probe_context(index)),
                                            loaded.params, layout.linears, hidden_size=layout.hidden_size)
        batches, self.batches = self.batches, []
        outcome, self.batches = quantize_block_(
            block, loaded.params, self.anatomy, batches, quant=job.quant, fmt=job.format, block_index=index,
            prefix=layout.block_prefix, linears=layout.linears)
        del loaded.params
        t = time.perf_counter()
        host = {k: v.to("cpu") for k, v in outcome.tensors.items()}
        seconds = {"load": loaded.seconds, **outcome.seconds,
                   "pack": outcome.seconds.get("pack", 0.0) + time.perf_counter() - t}
        return host, tuple(_layer_dict(r) for r in outcome.layers), seconds

    def _stage_block(self, index: int, host: dict[str, Tensor], layers: tuple,
                     seconds: dict[str, float]) -> ShardRecord:
        t = time.perf_counter()
        path = self.spec.artifact.staged_block(index)
        nbytes, sha = _write_shard(path, host)
        record = ShardRecord(part="block", block=index, staged_path=str(path), tensor_names=tuple(sorted(host)),
                             nbytes=nbytes, sha256=sha, rank=self.spec.rank, layers=layers,
                             seconds={**seconds, "write": time.perf_counter() - t})
        write_json_atomic(self.spec.artifact.staged_block_record(index), asdict(record))
        return record

    def write_head(self) -> ShardRecord:
        """Stage the tensors after the last block (final norm, untied lm_head), copied unchanged."""
        layout = self.spec.layout
        names = [n for n in layout.outer_params if n != layout.embed_name]
        tensors = read_tensors(self.spec.checkpoint, names, device="cpu")
        path = self.spec.artifact.staged_outer("head")
        nbytes, sha = _write_shard(path, tensors)
        return ShardRecord(part="head", block=None, staged_path=str(path), tensor_names=tuple(sorted(tensors)),
                           nbytes=nbytes, sha256=sha, rank=self.spec.rank)


def _layer_dict(record: Any) -> dict:
    d = asdict(record)
    d["outliers"] = asdict(record.outliers)
    return json.loads(json.dumps(d, default=float))
