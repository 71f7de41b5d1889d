"""A block's tensors onto the actor's device: from the checkpoint's shards, or, for a block an earlier run of
the same job staged, the weights it was quantized to (its staged shard, checked against its recorded
sha256), so that its outputs can be replayed bit for bit. On a GPU the copy is queued on a copy stream
through pinned memory (`wq_ops.device.transport`), so it overlaps the previous block's computation."""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file
from torch import Tensor

from wq_ops.cluster.actor_job import ActorJob
from wq_ops.cluster.protocol import ShardRecord
from wq_ops.cluster.staging import file_sha256
from wq_ops.config import Propagation
from wq_ops.device.transport import queue_to_device
from wq_ops.errors import ArtifactError
from wq_ops.formats import dense_tensors
from wq_ops.formats.block_tensors import PAD_COLUMNS, PAD_ROWS
from wq_ops.io.checkpoint import read_tensors
from wq_ops.io.digest import combine_entries, tensor_entries

__all__ = ["Loaded", "BlockLoader", "prefetched"]


@dataclass
class Loaded:
    params: dict[str, Tensor]            # block-local name -> tensor in the model dtype, on the device
    ready: Any                           # a CUDA event the compute stream waits on, or None on CPU
    seconds: float
    finished: ShardRecord | None = None  # staged by an earlier run: params are what it computed with
    source_sha256: str = ""              # of the source tensors read (`tensors_sha256`); "" when none were read
    source_entries: dict[str, str] = field(default_factory=dict)   # their `tensor_entries`, which make it


class BlockLoader:
    def __init__(self, job: ActorJob, copy_stream: Any) -> None:
        self.job, self.copy_stream = job, copy_stream

    def load(self, index: int, *, staged: bool = True) -> Loaded:
        """Read block `index` and start its copy to the device on the copy stream: from its shards, or, for a
        block an earlier run finished (unless staged=False), the weights it was quantized to."""
        finished = self.finished(index) if staged else None
        quantized = finished is not None and self.job.spec.job.run.propagation is Propagation.QUANTIZED
        # What the block is computed from, recorded with its staged shard so a resume can tell a changed source.
        to_quantize = finished is None and staged
        return self._read(index, finished, quantized=quantized, hash_source=to_quantize, to_quantize=to_quantize)

    def load_staged(self, index: int) -> Loaded:
        """Block `index`'s weights as the artifact holds them (its staged shard, dequantized): what --eval scores."""
        finished = self.finished(index)
        if finished is None:
            raise ArtifactError(f"block {index}: no staged shard matching its record to evaluate")
        return self._read(index, finished, quantized=True, hash_source=False)

    def _read(self, index: int, finished: ShardRecord | None, *, quantized: bool, hash_source: bool,
              to_quantize: bool = False) -> Loaded:
        spec = self.job.spec
        layout, job = spec.layout, spec.job
        t = time.perf_counter()
        prefix = f"{layout.block_prefix}.{index}."
        if quantized:
            stored = load_file(str(spec.artifact.staged_block(index)))
            host = _unpadded(dense_tensors(job.format, stored, quant=job.quant, dtype=layout.dtype),
                             spec.pad_intermediate)
        else:
            locals_ = list(layout.block(index).params)
            moe = layout.block(index).moe
            if moe is not None and spec.expert_actors and to_quantize:    # the expert actors read those
                routed = moe.prefix + ".experts."
                locals_ = [n for n in locals_ if not n.startswith(routed)]
            host = read_tensors(spec.checkpoint, [prefix + local for local in locals_])
        entries = tensor_entries(host) if hash_source else {}
        cut = len(prefix)
        device = self.job.device
        kept = tuple(k + "." for k in layout.block(index).kept)

        def dtype_of(local: str, value: Tensor) -> torch.dtype:
            # A module kept unquantized (a router) computes in its own dtype: DeepSeek-V3's is float32.
            return value.dtype if local.startswith(kept) else layout.dtype

        on_host = None if to_quantize else self.host_resident(index)

        def here(local: str, value: Tensor) -> Tensor:
            return value.to(dtype_of(local, value))

        ready = None
        if self.copy_stream is not None:
            with torch.cuda.stream(self.copy_stream):
                params = {n[cut:]: here(n[cut:], v) if on_host and n[cut:].startswith(on_host)
                          else queue_to_device(v, dtype_of(n[cut:], v), device) for n, v in host.items()}
                ready = torch.cuda.Event()
                ready.record(self.copy_stream)
        else:
            params = {n[cut:]: here(n[cut:], v) for n, v in host.items()}
        return Loaded(params=params, ready=ready, seconds=time.perf_counter() - t, finished=finished,
                      source_sha256=combine_entries(entries) if hash_source else "", source_entries=entries)

    def host_resident(self, index: int) -> str | None:
        """The prefix of block `index`'s tensors that stay on the host when it loads to be run, not quantized
        (a staged block replayed on resume or for --eval, the source's for --eval-baseline) where expert actors
        quantize the experts: this actor's memory was planned without them, so its routed experts stay there and
        go to the device one expert at a time as the pass reaches them (`moe_mlp` moves a weight to its input's
        device). None: all go to the device. (To be quantized, such a block's actor reads no routed expert.)"""
        moe = self.job.spec.layout.block(index).moe
        return moe.prefix + ".experts." if moe is not None and self.job.spec.expert_actors else None

    def load_float(self, index: int) -> Loaded:
        return self.load(index, staged=False)

    def finished(self, index: int) -> ShardRecord | None:
        """The record of block `index` if an earlier run of this job (same fingerprint) staged it and the
        shard on disk is the one it recorded; else None (the block is computed afresh)."""
        artifact = self.job.spec.artifact
        record_path, shard = artifact.staged_block_record(index), artifact.staged_block(index)
        if not (record_path.is_file() and shard.is_file()):
            return None
        try:
            record = ShardRecord.from_json(json.loads(record_path.read_text()))
        except (ValueError, TypeError, KeyError):
            return None
        if record.block != index or Path(record.staged_path) != shard or file_sha256(shard) != record.sha256:
            return None
        return replace(record, rank=self.job.spec.rank, resumed=True)

    def await_copy(self, loaded: Loaded) -> None:
        """Make the compute stream wait for the block's copy to the device."""
        if loaded.ready is not None:
            compute = torch.cuda.current_stream(self.job.device)
            compute.wait_event(loaded.ready)
            for tensor in loaded.params.values():
                if tensor.is_cuda:              # (a replayed block's routed experts may stay on the host)
                    tensor.record_stream(compute)   # made on the copy stream, used (and freed) on this one


def prefetched(load: Callable[[int], Loaded], blocks: list[int]) -> Iterator[tuple[int, Loaded]]:
    """(index, its tensors) for each block in order, the next block's `load` running on a helper thread
    while the caller computes with this one."""
    with ThreadPoolExecutor(1, thread_name_prefix="wq-load") as pool:
        upcoming: Future[Loaded] | None = pool.submit(load, blocks[0]) if blocks else None
        for k, index in enumerate(blocks):
            assert upcoming is not None
            loaded = upcoming.result()
            upcoming = pool.submit(load, blocks[k + 1]) if k + 1 < len(blocks) else None
            yield index, loaded


def _unpadded(tensors: dict[str, Tensor], pad: int) -> dict[str, Tensor]:
    """Undo --tp-policy pad on a block's dense tensors: the computation runs at the model's own width."""
    if not pad:
        return tensors
    out = {}
    for name, value in tensors.items():
        module = name.rsplit(".", 1)[0]
        if module.endswith(tuple("." + m for m in PAD_ROWS)):
            value = value[: value.shape[0] - pad]
        elif module.endswith(tuple("." + m for m in PAD_COLUMNS)) and name.endswith(".weight"):
            value = value[:, : value.shape[1] - pad]
        out[name] = value.contiguous()
    return out
