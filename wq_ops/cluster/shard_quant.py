"""One source shard of a model-free job, from its tensors to a staged artifact shard: each tensor read alone
(dequantized where the source is FP8 with block scales), quantized where the name rules say so
(`wq_ops.formats.tensor_rules`), encoded in the scheme's compressed-tensors layout, and the shard written
atomically, then its record. No Ray here: `run_shard` is what a Ray task (or the driver itself, for one
worker) calls. Entry point: `run_shard`."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from wq_ops.config import Format, Method, QuantConfig, Scheme
from wq_ops.config.schemes import NumberType
from wq_ops.formats import bitsandbytes, encode_linear
from wq_ops.formats.tensor_rules import Role, TensorRole, tensor_role
from wq_ops.io.artifact import save_tensors_atomic, write_json_atomic
from wq_ops.io.checkpoint import Checkpoint, read_tensors, shard_header
from wq_ops.io.fp8_source import SCALE_SUFFIX
from wq_ops.io.mxfp4_source import dequantize_mxfp4
from wq_ops.quant.bnb4 import Bnb4Result, Bnb4Type, dequantize_bnb4, quantize_bnb4
from wq_ops.quant.fp8 import quantize_fp8
from wq_ops.quant.hqq import quantize_hqq
from wq_ops.quant.result import WeightResult, dequantize
from wq_ops.quant.rtn import quantize_rtn, search_clip

__all__ = ["ShardTask", "TensorRecord", "ShardDone", "run_shard", "read_done", "quantize_weight", "source_tensors",
           "header_entry", "read_source", "is_mxfp4_pair"]

@dataclass(frozen=True)
class ShardTask:
    """What one task needs: the checkpoint (pinned revision for the Hub), the source shard's file name and its
    position, where to stage, the quantization, the job's fingerprint, the device and torch threads."""

    checkpoint: Checkpoint
    source_shard: str
    position: int
    staged: str
    record: str
    quant: QuantConfig
    fingerprint: str
    mxfp4: bool = False                 # the source stores fused experts as MXFP4 `X_blocks` / `X_scales`
    device: str = "cpu"
    threads: int = 1
    # Testing hook (the job's fail_after_blocks): this task dies once before staging its shard, leaving the marker
    # file: "exit" ends its process as a lost node does (a Ray worker: Ray runs the task again), "raise" fails.
    crash: str | None = None
    crash_marker: str | None = None


@dataclass(frozen=True)
class TensorRecord:
    """One source tensor: its role, and for a quantized one the relative squared weight error
    ||W - Q||^2 / ||W||^2 (over every expert of a fused tensor); reason: why a weight-like tensor was kept."""

    name: str
    shape: list[int]
    role: str
    module: str | None
    reason: str | None
    weight_error: float | None
    seconds: float


@dataclass(frozen=True)
class ShardDone:
    position: int
    source_shard: str
    staged: str
    tensor_names: list[str]          # the artifact tensors the staged shard holds
    nbytes: int
    tensors: list[TensorRecord]
    seconds: float
    host: str
    rerun_after_crash: bool = False     # the testing hook's task, run again after its injected crash

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ShardDone":
        return cls(**{**data, "tensors": [TensorRecord(**t) for t in data["tensors"]]})


_BLOCKS, _SCALES = "_blocks", "_scales"


def source_tensors(checkpoint: Checkpoint, shard: str, *, mxfp4: bool = False) -> list[str]:
    """The tensors of `shard` a job reads as tensors of their own: an FP8 source's `_scale_inv` companions are
    read with their weights, and an MXFP4 source's `X_scales` with `X_blocks` (wherever either is stored); such
    a pair is read as one tensor, `X` (`is_mxfp4_pair`, `read_source`)."""
    names = [n for n, f in checkpoint.weight_map.items() if f == shard]
    if checkpoint.fp8_block is not None:
        names = [n for n in names
                 if not (n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in checkpoint.weight_map)]
    if mxfp4:       # a pair is read with the shard of its blocks (the bulk of it), never twice
        def stem(n: str, suffix: str) -> str | None:
            return n[: -len(suffix)] if n.endswith(suffix) else None

        pairs = {s for n in checkpoint.weight_map if (s := stem(n, _BLOCKS)) and s + _SCALES in checkpoint.weight_map}
        names = [s if (s := stem(n, _BLOCKS)) in pairs else n for n in names if stem(n, _SCALES) not in pairs]
    return sorted(names)


def is_mxfp4_pair(checkpoint: Checkpoint, name: str) -> bool:
    """Whether `name` stands for an MXFP4 pair `name_blocks` / `name_scales` rather than a stored tensor."""
    return name not in checkpoint.weight_map and name + _BLOCKS in checkpoint.weight_map


def header_entry(checkpoint: Checkpoint, headers: dict[str, dict], name: str) -> tuple[list[int], str]:
    """(shape, dtype) of what `name` is read as: an MXFP4 pair as (experts, out, in) bfloat16 values, an FP8
    block-scaled weight in the dtype it is dequantized to. headers: file name -> safetensors header."""
    if is_mxfp4_pair(checkpoint, name):
        entry = headers[checkpoint.weight_map[name + _BLOCKS]][name + _BLOCKS]
        *lead, n_blocks, width = entry["shape"]
        return [*lead, n_blocks * width * 2], "BF16"
    entry = headers[checkpoint.weight_map[name]][name]
    fp8 = entry["dtype"] == "F8_E4M3" and checkpoint.fp8_block is not None
    return [int(s) for s in entry["shape"]], "BF16" if fp8 else entry["dtype"]


def read_source(checkpoint: Checkpoint, name: str, device: str) -> Tensor:
    """One tensor as the job quantizes it: dequantized from FP8 blocks or MXFP4 where the source stores it so."""
    if is_mxfp4_pair(checkpoint, name):
        pair = read_tensors(checkpoint, [name + _BLOCKS, name + _SCALES])
        return dequantize_mxfp4(pair[name + _BLOCKS], pair[name + _SCALES], torch.bfloat16).to(device)
    return read_tensors(checkpoint, [name], device=device)[name]


# Double quantization on: what QLoRA's recipe and the "-bnb-4bit" repos people download use (an 8-bit absmax
# per 64 weights, and a float32 one per 256 of those, in place of a float32 per 64: 0.37 bits a weight less).
BNB_DOUBLE_QUANT = True


def quantize_weight(w: Tensor, quant: QuantConfig, *, scale_dtype: torch.dtype) -> WeightResult | Bnb4Result:
    """w: (out, in) any float dtype. FP8 and bitsandbytes schemes round to nearest; integer ones take HQQ's grid,
    or RTN's (min-max, or the clip range of least squared error with --rtn-clip-search: no calibration, no
    Hessian)."""
    if quant.weight_type is NumberType.TABLE:
        kind = Bnb4Type.NF4 if quant.scheme is Scheme.BNB_NF4 else Bnb4Type.FP4
        return quantize_bnb4(w.to(scale_dtype), quant_type=kind, double_quant=BNB_DOUBLE_QUANT)
    if quant.weight_type is NumberType.FLOAT:
        return quantize_fp8(w, layout=quant.layout, scale_dtype=scale_dtype)
    if quant.method is Method.HQQ:
        return quantize_hqq(w, bits=quant.bits, group_size=quant.group_size, sym=quant.sym, scale_dtype=scale_dtype)
    w = w.to(torch.float32)
    clip = search_clip(w, bits=quant.bits, group_size=quant.group_size, sym=quant.sym, scale_dtype=scale_dtype) \
        if quant.rtn_clip_search else None
    return quantize_rtn(w, bits=quant.bits, group_size=quant.group_size, sym=quant.sym, scale_dtype=scale_dtype,
                        clip=clip)


def _squared_error(w: Tensor, w_hat: Tensor) -> Tensor:
    """(||W - Q||^2, ||W||^2) as a float64 pair, on w's device (read back once per tensor, not per expert)."""
    w64 = w.to(torch.float64)
    return torch.stack([(w64 - w_hat.to(torch.float64)).square().sum(), w64.square().sum()])


def _quantize(name: str, value: Tensor, role: Role, quant: QuantConfig) -> tuple[dict[str, Tensor], float]:
    """The artifact tensors of one quantized source tensor, and its relative squared error."""
    assert role.module is not None
    scale_dtype = value.dtype if value.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
    slices = [value] if role.role is TensorRole.LINEAR else list(value.unbind(0))
    parts: list[dict[str, Tensor]] = []
    sums = []
    for w in slices:
        result = quantize_weight(w, quant, scale_dtype=scale_dtype)
        if isinstance(result, Bnb4Result):
            sums.append(_squared_error(w, dequantize_bnb4(result)))
            parts.append(bitsandbytes.encode_linear(role.module, result, dtype=value.dtype))
        else:
            sums.append(_squared_error(w, dequantize(result)))
            parts.append(encode_linear(Format.COMPRESSED_TENSORS, role.module, result, quant=quant,
                                       scale_dtype=scale_dtype))
    error, norm = 0.0, 0.0
    for e, n in torch.stack(sums).tolist():          # summed in slice order, in float64, as before
        error, norm = error + e, norm + n
    tensors = parts[0] if role.role is TensorRole.LINEAR else \
        {key: torch.stack([p[key].cpu() for p in parts]) for key in parts[0]}   # (experts, ...) each
    return {k: v.cpu() for k, v in tensors.items()}, (error / norm if norm > 0 else 0.0)


def run_shard(task: ShardTask) -> ShardDone:
    """Quantize one source shard into its staged artifact shard, then write its record: a task that dies before
    the record is rerun from the start (the shard is written atomically, so a half-written one never exists)."""
    start = time.perf_counter()
    torch.set_num_threads(task.threads)
    rerun = task.crash is not None and task.crash_marker is not None and Path(task.crash_marker).exists()
    if task.crash is not None and task.crash_marker is not None and not rerun:
        Path(task.crash_marker).parent.mkdir(parents=True, exist_ok=True)
        Path(task.crash_marker).touch()
        if task.crash == "exit":
            os._exit(1)
        raise RuntimeError(f"fail_after_blocks: injected crash of the task of shard {task.position}")
    checkpoint = task.checkpoint
    names = source_tensors(checkpoint, task.source_shard, mxfp4=task.mxfp4)
    files = {checkpoint.weight_map.get(n) or checkpoint.weight_map[n + _BLOCKS] for n in names}
    headers = {f: shard_header(checkpoint.shard_path(f)) for f in files | {task.source_shard}}
    out: dict[str, Tensor] = {}
    records = []
    for name in names:
        t = time.perf_counter()
        shape, dtype = header_entry(checkpoint, headers, name)
        role = tensor_role(name, shape, dtype, quant=task.quant)
        value = read_source(checkpoint, name, task.device)
        error = None
        if role.role is TensorRole.KEPT:
            out[name] = value.cpu()
        else:
            tensors, error = _quantize(name, value, role, task.quant)
            out.update(tensors)
        records.append(TensorRecord(name=name, shape=shape, role=role.role.value,
                                    module=role.module, reason=role.reason, weight_error=error,
                                    seconds=time.perf_counter() - t))
        del value
    staged = Path(task.staged)
    staged.parent.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(staged, out)         # the staging folder's name is the job's fingerprint
    done = ShardDone(position=task.position, source_shard=task.source_shard, staged=task.staged,
                     tensor_names=sorted(out), nbytes=staged.stat().st_size, tensors=records,
                     seconds=time.perf_counter() - start, host=socket.gethostname(), rerun_after_crash=rerun)
    write_json_atomic(Path(task.record), done.to_json())
    return done


def read_done(record: Path) -> ShardDone | None:
    """The record of a shard an earlier run of the same job finished (None: not finished)."""
    if not record.is_file():
        return None
    try:
        done = ShardDone.from_json(json.loads(record.read_text()))
    except (ValueError, TypeError, KeyError):
        return None                     # unreadable: the shard is done again
    return done if Path(done.staged).is_file() else None
