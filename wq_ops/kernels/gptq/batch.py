"""Tensors of a batch of GPTQ layers, each layer's part starting on its own 256-byte boundary.

A GEMM's result can depend on where its operands start: BLAS libraries pick vectorized paths and kernels by
pointer alignment (measured on the CPU: one float32 `addmm_` gave other bits with its output shifted by one to
three floats). A layer solved in a batch must get the bits it gets alone, whose tensors are fresh allocations,
so each layer's part of a batched tensor starts where a fresh allocation would be aligned.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["aligned_batch", "ALIGN_BYTES"]

ALIGN_BYTES = 256


def aligned_batch(batch: int, *shape: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """An uninitialised (batch, *shape) tensor, each problem's part contiguous and starting a multiple of
    ALIGN_BYTES past the first (which starts where the allocator put it, as a fresh tensor would)."""
    per = math.prod(shape)
    step = -(-per * dtype.itemsize // ALIGN_BYTES) * ALIGN_BYTES // dtype.itemsize
    storage = torch.empty(max(1, (batch - 1) * step + per), dtype=dtype, device=device)
    return storage.as_strided((batch, *shape), (step, *storage[:per].view(shape).stride()))
