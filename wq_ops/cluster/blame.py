"""Name the cause when a block's numbers are not finite: a checkpoint tensor holding NaN or Inf, found by
reading the span's source tensors again, one at a time, on the host. Only on the failure path: checking every
weight as it loads would cost a pass over the model (0.4 s per 128 MiB of bfloat16 on a CPU without AVX-512)."""

from __future__ import annotations

import torch

from wq_ops.cluster.protocol import ActorSpec
from wq_ops.errors import CheckpointError, QuantizationError
from wq_ops.io.checkpoint import read_tensors

__all__ = ["nonfinite_source", "blamed"]


def nonfinite_source(spec: ActorSpec, blocks: list[int]) -> tuple[str, int, int] | None:
    """The first source tensor of `blocks` (in block order) holding NaN or Inf: (name, NaNs, Infs)."""
    layout = spec.layout
    for index in blocks:
        for local in layout.block(index).params:
            name = f"{layout.block_prefix}.{index}.{local}"
            value = read_tensors(spec.checkpoint, [name])[name]
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return name, int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
    return None


def blamed(spec: ActorSpec, blocks: list[int], error: QuantizationError) -> Exception:
    """The error to raise for a non-finite failure in `blocks`: the checkpoint's tensor where one holds NaN
    or Inf, else the failure itself."""
    found = nonfinite_source(spec, blocks)
    if found is None:
        return error
    name, nans, infs = found
    return CheckpointError(f"{spec.checkpoint.source}: tensor {name} holds {nans} NaN and {infs} Inf values: the "
                           f"checkpoint is corrupt or was saved from a diverged model; restore it ({error})")
