"""The block actor: owns a contiguous span of decoder blocks, keeps the calibration activations on its
device between them, and writes one staged shard per block.

Setup (device, model skeleton on the meta device, rotary tables, kernels) happens once in `__init__`.
One method per block, `run_block`, returns a `ShardRecord`: the staged shard's path, tensor names,
size, checksum and the block's metrics. The actor is threaded so that the three phases of neighbouring
blocks overlap: block i + 1's tensors load (on a copy stream) while block i computes, and block i - 1's
shard is written and hashed meanwhile. Compute phases run strictly in the order the driver numbered
the calls (`step`), so results never depend on thread timing. Activations enter and leave as object
refs; no tensor ever goes back to the driver.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from contextlib import contextmanager
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

__all__ = ["ActorSpec", "ShardRecord", "BlockActor", "ACTOR_THREADS"]

# Concurrent calls per actor: one loading the next block, one computing, one writing the previous.
ACTOR_THREADS = 3


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


class _Turns:
    """Orders the compute phases of concurrent calls by their step number."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._turn = 0

    def wait_until(self, step: int) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._turn >= step)

    @contextmanager
    def hold(self, step: int) -> Iterator[None]:
        self.wait_until(step)
        try:
            yield
        finally:
            with self._cv:
                self._turn = step + 1
                self._cv.notify_all()


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
        self.turns = _Turns()
        spec.artifact.staging.mkdir(parents=True, exist_ok=True)

    # --- activations in and out -------------------------------------------------------------------
    def embed(self, step: int, ids: Tensor) -> ShardRecord:
        """Embed the calibration token ids (n_samples, seq_len) into this actor's activations, and stage the
        tensors that come before the first block (the embeddings), copied unchanged."""
        layout = self.spec.layout
        t = time.perf_counter()
        names = [n for n in layout.outer_params if n == layout.embed_name]
        host = read_tensors(self.spec.checkpoint, names)
        embedding: Any = self.model.get_input_embeddings()  # type: ignore[operator]
        from torch.func import functional_call

        mb = self.spec.job.run.micro_batch_samples
        with self.turns.hold(step), torch.no_grad():
            weight = host[layout.embed_name].to(self.device)
            self.batches = [functional_call(embedding, {"weight": weight}, (chunk.to(self.device),))
                            for chunk in ids.split(mb)]
            del weight
        path = self.spec.artifact.staged_outer("embed")
        nbytes, sha = _write_shard(path, host)
        return ShardRecord(part="embed", block=None, staged_path=str(path), tensor_names=tuple(sorted(host)),
                           nbytes=nbytes, sha256=sha, rank=self.spec.rank, seconds={"load": time.perf_counter() - t})

    def load_inputs(self, step: int, refs: list[Any]) -> int:
        """Take the previous actor's output micro-batches (object refs) onto this device."""
        import ray

        hosts: list[HostTensor] = ray.get(list(refs))
        with self.turns.hold(step):
            self.batches = [from_host(h, self.device) for h in hosts]
        return len(self.batches)

    def emit_outputs(self, step: int) -> list[Any]:
        """Hand this actor's final activations to the object store, one ref per micro-batch."""
        import ray

        with self.turns.hold(step):
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

    def run_block(self, step: int, index: int) -> ShardRecord:
        """Load block `index`, quantize it over the current activations, replace them with its outputs,
        and stage its shard. The load may start while the previous block still computes."""
        layout: ModelLayout = self.spec.layout
        job = self.spec.job
        self.turns.wait_until(step - 1)              # at most one block loads ahead of the one computing
        loaded = self._load(index)
        with self.turns.hold(step):
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
            to_host_s = time.perf_counter() - t
        t = time.perf_counter()
        path = self.spec.artifact.staged_block(index)
        nbytes, sha = _write_shard(path, host)
        record = ShardRecord(part="block", block=index, staged_path=str(path), tensor_names=tuple(sorted(host)),
                             nbytes=nbytes, sha256=sha, rank=self.spec.rank,
                             layers=tuple(_layer_dict(r) for r in outcome.layers),
                             seconds={"load": loaded.seconds, **outcome.seconds,
                                      "pack": outcome.seconds.get("pack", 0.0) + to_host_s,
                                      "write": time.perf_counter() - t})
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
