"""GPTQ block solve: quantize a block of columns and propagate each column's error through the block.
The layer loop's kernel is a `GptqSolver`: `reference.FLOAT32_SOLVER` (any device) or `cuda.CUDA_SOLVER`."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

__all__ = ["GptqSolver", "GptqSweep"]


class GptqSweep(Protocol):
    """The column-block loop of a batch of layers of one shape: `solve_` quantizes columns i1:i2 of each at
    their targets (codes and row losses written into the caller's tensors: targets, w, codes (batch, out,
    in), m_diag, group (batch, in), scale, zero (batch, out, G), loss (batch, out)), `update_` adds their
    deltas times Mu's rows to the targets after them (the paper's lazy batch update), layer by layer."""

    def solve_(self, targets: Tensor, w: Tensor, i1: int, i2: int, *, m_diag: Tensor, scale: Tensor, zero: Tensor,
               group: Tensor, bits: int, codes: Tensor, loss: Tensor) -> None: ...

    def update_(self, targets: Tensor, i1: int, i2: int) -> None: ...


class GptqSolver(Protocol):
    """The kernel behind GPTQ's layer loop, handed in by the caller: `reference.FLOAT32_SOLVER` (float32
    updates, any device) or `cuda.CUDA_SOLVER` (the block-solve kernel, tensor-core updates)."""

    def start(self, m_unit: Tensor, *, block_size: int, rows: int) -> GptqSweep:
        """The loop for a batch of layers with unit factors m_unit (batch, in, in) and `rows` output rows each."""
