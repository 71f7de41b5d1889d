"""A model-free job's plan, from the shards' headers alone: which tensors are quantized and which are kept (and
why), the artifact's size, and each task's memory, refused with the numbers where a task cannot fit. Entry
points: `plan_model_free`, `check_memory`, `check_largest_node`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from wq_ops.cluster.shard_quant import header_entry, source_tensors
from wq_ops.config import JobConfig
from wq_ops.config.quant import spec_name
from wq_ops.config.schemes import NumberType, WeightLayout
from wq_ops.errors import CheckpointError, ResourceError
from wq_ops.formats.tensor_rules import Role, TensorRole, tensor_role
from wq_ops.io.artifact import ShardLayout
from wq_ops.io.checkpoint import Checkpoint, shard_header

__all__ = ["ShardPlan", "plan_model_free", "check_memory", "check_largest_node", "size_text", "GIB"]

GIB = 2**30
# A task's working set per element of the largest matrix it quantizes (an expert's slice): the float32 copy,
# the search's and the solver's float32 temporaries (HQQ and the clip search hold about four), the codes and the
# dequantized copy.
_WORK_BYTES_PER_ELEMENT = 4 * 7
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class ShardPlan:
    """What a model-free job will do and need, from the source's headers alone."""

    source: str
    layout: ShardLayout
    roles: dict[str, Role]               # every source tensor read as one (FP8 scales go with their weights)
    shapes: dict[str, list[int]]
    source_bytes: int
    artifact_bytes: int                  # estimated
    worker_bytes: int                    # estimated peak of the largest task
    workers: int
    scheme: str
    mxfp4: bool = False                  # the source's experts are MXFP4, read dequantized

    def counts(self) -> dict[str, int]:
        out = {r.value: 0 for r in TensorRole}
        for role in self.roles.values():
            out[role.role.value] += 1
        return out

    def describe(self) -> str:
        c = self.counts()
        kept = sorted({r.reason for r in self.roles.values() if r.role is TensorRole.KEPT and r.reason})
        return (f"model-free plan for {self.source}: {len(self.layout.source_shards)} shard(s), {c['linear']} linear "
                f"weight(s) and {c['experts']} fused expert tensor(s) quantized to {self.scheme}, {c['kept']} "
                f"tensor(s) kept as stored" + (f" (weights kept: {'; '.join(kept)})" if kept else "")
                + f"; source {size_text(self.source_bytes)}, artifact about {size_text(self.artifact_bytes)}; "
                f"{self.workers} worker(s) at once, each needing about {size_text(self.worker_bytes)}")


def size_text(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB // 10 else f"{nbytes / 2**20:.2f} MiB"


def _headers(checkpoint: Checkpoint) -> dict[str, dict[str, dict]]:
    """Each shard's safetensors header (name -> dtype, shape): read from the files where they are local, and
    through the Hub's ranged reads (no download) for a Hub checkpoint."""
    if checkpoint.repo_id is None:
        return {shard: shard_header(checkpoint.local_dir / shard) for shard in checkpoint.shards}
    from huggingface_hub import HfApi

    meta = HfApi(endpoint=checkpoint.endpoint).get_safetensors_metadata(checkpoint.repo_id,
                                                                        revision=checkpoint.revision)
    return {shard: {name: {"dtype": t.dtype, "shape": list(t.shape)} for name, t in info.tensors.items()}
            for shard, info in meta.files_metadata.items()}


def _quantized_bytes(shape: list[int], job: JobConfig) -> int:
    """Estimated artifact bytes of one quantized tensor (codes, scales, zero points)."""
    quant = job.quant
    n = math.prod(shape)
    rows = n // shape[-1]
    if quant.weight_type is NumberType.TABLE:         # two codes a byte, an 8-bit absmax per 64
        return n // 2 + n // 64
    if quant.weight_type is NumberType.FLOAT:
        scales = rows * 2 if quant.layout is WeightLayout.GROUP else n // (128 * 128) * 2 + 2
        return n + scales
    groups = n // (quant.group_size or shape[-1])
    return n * quant.bits // 8 + groups * 2 * (1 if quant.sym else 2)


def plan_model_free(job: JobConfig, checkpoint: Checkpoint, fingerprint: str, *, mxfp4: bool = False) -> ShardPlan:
    headers = _headers(checkpoint)
    shards = checkpoint.shards
    roles: dict[str, Role] = {}
    shapes: dict[str, list[int]] = {}
    artifact = source = worker = 0
    for shard in shards:
        if shard not in headers:
            raise CheckpointError(f"{checkpoint.source}: no header for {shard}, which the index names")
        out_bytes = working = 0
        for name in source_tensors(checkpoint, shard, mxfp4=mxfp4):
            try:
                shape, dtype = header_entry(checkpoint, headers, name)
            except KeyError:
                raise CheckpointError(f"{checkpoint.source}: tensor {name} is not in the shard the index names "
                                      "for it") from None
            role = tensor_role(name, shape, dtype, quant=job.quant)
            roles[name], shapes[name] = role, shape
            n = math.prod(shape)
            stored = n * _DTYPE_BYTES.get(dtype, 4)
            source += stored
            if role.role is TensorRole.KEPT:
                out_bytes += stored
            else:
                out_bytes += _quantized_bytes(shape, job)
                # The tensor as read, and the solve's working set of one matrix (an expert's slice).
                matrix = n // shape[0] if role.role is TensorRole.EXPERTS else n
                working = max(working, stored + matrix * _WORK_BYTES_PER_ELEMENT)
        artifact += out_bytes
        worker = max(worker, out_bytes + working)
    layout = ShardLayout(out_dir=Path(job.out), source_shards=shards, fingerprint=fingerprint)
    return ShardPlan(source=checkpoint.source, layout=layout, roles=roles, shapes=shapes, source_bytes=source,
                     artifact_bytes=artifact, worker_bytes=worker, workers=job.run.actors, scheme=_scheme_text(job),
                     mxfp4=mxfp4)


def _scheme_text(job: JobConfig) -> str:
    quant = job.quant
    grid = f"{quant.method.value} w{quant.bits} {'g' + str(quant.group_size) if quant.group_size else 'per channel'}" \
        + ("" if quant.sym else " asym")
    return grid if quant.scheme is None else f"{spec_name(quant)} ({grid})"


def check_memory(plan: ShardPlan, job: JobConfig) -> None:
    """Refuse, with the numbers, a task that cannot fit: in --actor-memory-gib where given, else in this machine's
    available memory shared by the workers (a cluster's nodes are checked once Ray is up: `check_largest_node`)."""
    import psutil

    if job.run.actor_memory_gib is not None:
        have, where = job.run.actor_memory_gib * GIB, "--actor-memory-gib"
    elif job.run.address is None:
        have, where = psutil.virtual_memory().available / max(job.run.actors, 1), "this machine's available memory " \
            f"shared by {job.run.actors} worker(s)"
    else:
        return
    if plan.worker_bytes > have:
        raise ResourceError(f"--model-free: the largest shard's task needs about {size_text(plan.worker_bytes)} "
                            f"and {where} gives {size_text(int(have))}; run fewer workers (--actors) or give each more "
                            "memory (--actor-memory-gib on a cluster whose nodes have it)")


def check_largest_node(plan: ShardPlan) -> None:
    """On a Ray cluster, refuse a task no node has the memory for (Ray would leave it pending forever)."""
    import ray

    nodes = [n.get("Resources", {}).get("memory", 0.0) for n in ray.nodes() if n.get("Alive")]
    if nodes and plan.worker_bytes > max(nodes):
        raise ResourceError(f"--model-free: the largest shard's task needs about {size_text(plan.worker_bytes)}; "
                            f"the cluster's largest node offers Ray {size_text(int(max(nodes)))}; use nodes with more "
                            "memory, or reshard the checkpoint into smaller files")
