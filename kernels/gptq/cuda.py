"""CUDA GPTQ block solve: the same contract as `reference.solve_block`, on the GPU.

t, w: (out, B) float32 CUDA, rows may be strided (column blocks of the full matrices); m_unit: (B, B)
float32, rows may be strided (a block of the full Mu); m_diag: (B,) float32; scale: (out, G) float32;
zero: (out, G) uint8; group: (B,) int32 in [0, G); B <= 128. Returns new tensors (codes uint8, delta
float32, loss float32); codes and deltas are bit-identical to the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.build import load_extension
from kernels.gptq.reference import BlockSolve
from wq_ops.errors import KernelError

__all__ = ["solve_block"]


def solve_block(t: Tensor, w: Tensor, m_unit: Tensor, m_diag: Tensor, scale: Tensor, zero: Tensor,
                group: Tensor, *, bits: int) -> BlockSolve:
    _check(t, w, m_unit, m_diag, scale, zero, group)
    ext = load_extension()
    try:
        codes, delta, loss = ext.gptq_solve_block(t, w, m_unit, m_diag, scale, zero, group, bits)
    except RuntimeError as e:
        raise KernelError(str(e).split("\n")[0]) from None
    return BlockSolve(codes=codes, delta=delta, loss=loss)


def _check(t: Tensor, w: Tensor, m_unit: Tensor, m_diag: Tensor, scale: Tensor, zero: Tensor,
           group: Tensor) -> None:
    """The binding's checks, made here first: a failed check inside the extension took the whole process
    down (a segmentation fault) on the H100 machine instead of raising, cause not found yet."""
    rows, n = t.shape if t.dim() == 2 else (-1, -1)
    n_groups = scale.shape[1] if scale.dim() == 2 else -1
    expected = {"t": (t, torch.float32, (rows, n)), "w": (w, torch.float32, (rows, n)),
                "m_unit": (m_unit, torch.float32, (n, n)), "m_diag": (m_diag, torch.float32, (n,)),
                "scale": (scale, torch.float32, (rows, n_groups)), "zero": (zero, torch.uint8, (rows, n_groups)),
                "group": (group, torch.int32, (n,))}
    for name, (x, dtype, shape) in expected.items():
        if not x.is_cuda or x.device != t.device or x.dtype != dtype or tuple(x.shape) != shape or min(shape) < 1:
            raise KernelError(f"gptq block solve: {name} must be a {dtype} {shape} tensor on {t.device} (t is "
                              f"{tuple(t.shape)}); got {x.dtype} {tuple(x.shape)} on {x.device}")
    if n > 128:
        raise KernelError(f"gptq block solve: block width {n} must be at most 128")
    if t.stride(1) != 1 or w.stride(1) != 1:
        raise KernelError("gptq block solve: t and w must have contiguous rows (stride(1) == 1)")
