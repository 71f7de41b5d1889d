"""CUDA GPTQ block solve: the same contract as `reference.solve_block`, on the GPU.

w: (out, B) float32 CUDA, rows may be strided (a column block of the full matrix); hinv: (B, B) float32,
the block of the upper Cholesky factor of H^-1; scale: (out, B) float32; zero: (out, B) uint8; B <= 128.
Returns new tensors (codes uint8, err float32, loss float32), bit-identical to the reference.
"""

from __future__ import annotations

from torch import Tensor

from kernels.build import load_extension
from kernels.gptq.reference import BlockSolve
from wq_ops.errors import KernelError

__all__ = ["solve_block"]


def solve_block(w: Tensor, hinv: Tensor, scale: Tensor, zero: Tensor, *, bits: int) -> BlockSolve:
    ext = load_extension()
    try:
        # hinv is tiny (B x B); a column-major factor (torch.linalg.cholesky(upper=True)) is made row-major.
        codes, err, loss = ext.gptq_solve_block(w, hinv.contiguous(), scale, zero, bits)
    except RuntimeError as e:
        raise KernelError(str(e).split("\n")[0]) from None
    return BlockSolve(codes=codes, err=err, loss=loss)
