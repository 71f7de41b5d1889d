"""GPTQ's lazy update on the tensor cores (the CUDA backend's layer loop): a block solve that writes the
codes, the row losses and the update's operand in place (`solve_into`: the CUDA kernel, or the reference's
`solve_block_into_` on the CPU, for checks), then one bf16 GEMM of split operands per block of columns
(`add_split_update_`): about 2^-16 relative error, against 2^-24 for the float32 GEMM the reference loop
uses. Entry point: `SplitUpdateSolver`."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from wq_ops.errors import KernelError
from wq_ops.kernels.gptq.batch import aligned_batch

__all__ = ["SplitUpdateSolver", "split_factor_blocks", "add_split_update_"]


class SplitUpdateSolver:
    """A GPTQ column-block solver (`wq_ops.quant.gptq.GptqSolver`) whose trailing updates run as bf16 split
    GEMMs. needs_cuda: refuse tensors that are not float32 on a CUDA device (the CUDA kernel's)."""

    def __init__(self, solve_into: Callable[..., None], *, needs_cuda: bool) -> None:
        self.solve_into = solve_into
        self.needs_cuda = needs_cuda

    def start(self, m_unit: Tensor, *, block_size: int, rows: int) -> "_SplitSweep":
        if self.needs_cuda and m_unit.device.type != "cuda":
            raise KernelError(f"backend=cuda needs the weights on a CUDA device; they are on {m_unit.device}")
        if self.needs_cuda and m_unit.dtype != torch.float32:
            raise KernelError(f"backend=cuda solves in float32; got {m_unit.dtype}")
        return _SplitSweep(self.solve_into, m_unit, block_size=block_size, rows=rows)


class _SplitSweep:
    def __init__(self, solve_into: Callable[..., None], m_unit: Tensor, *, block_size: int, rows: int) -> None:
        self.solve_into, self.m_unit, self.block_size = solve_into, m_unit, block_size
        self.factor_blocks = split_factor_blocks(m_unit, block_size)
        self.parts = aligned_batch(m_unit.shape[0], rows, 3 * block_size, dtype=torch.bfloat16, device=m_unit.device)

    def solve_(self, targets: Tensor, w: Tensor, i1: int, i2: int, *, m_diag: Tensor, scale: Tensor, zero: Tensor,
               group: Tensor, bits: int, codes: Tensor, loss: Tensor) -> None:
        # One kernel for the batch and one GEMM per layer per block of columns, with no other work queued
        # between them: the solve writes the codes, the losses and the update's operand in place.
        trailing = i2 < targets.shape[2]              # only the last block, maybe narrower, has none
        self.solve_into(targets[:, :, i1:i2], w[:, :, i1:i2], self.m_unit[:, i1:i2, i1:i2], m_diag[:, i1:i2], scale,
                        zero, group[:, i1:i2], bits=bits, codes=codes[:, :, i1:i2], loss=loss,
                        parts=self.parts if trailing else None)

    def update_(self, targets: Tensor, i1: int, i2: int) -> None:
        # A GEMM per layer, not one batched GEMM: cuBLAS may pick another algorithm for another batch count,
        # and a layer's codes must not depend on which layers it was solved with.
        block = i1 // self.block_size
        for b in range(targets.shape[0]):
            add_split_update_(targets[b, :, i2:], self.parts[b], self.factor_blocks[b, block, :, i2:])


def split_factor_blocks(m_unit: Tensor, block_size: int) -> Tensor:
    """Mu's rows in blocks of `block_size`, each as bfloat16 parts [hi; lo; hi] with hi = bf16(x) and
    lo = bf16(x - hi) (16 significant bits), the right operand of `add_split_update_`:
    (..., n_blocks, 3 * block_size, n) for m_unit (..., n, n), for the blocks that have columns after them (the
    last block updates no trailing targets; none when n <= block_size). 1.5 times the bytes of Mu."""
    *lead, n, _ = m_unit.shape
    n_blocks = (n - 1) // block_size
    rows = m_unit[..., :n_blocks * block_size, :].reshape(*lead, n_blocks, block_size, n)
    out = aligned_batch(math.prod(lead), n_blocks, 3, block_size, n, dtype=torch.bfloat16,
                        device=m_unit.device).view(*lead, n_blocks, 3, block_size, n)
    out[..., 0, :, :].copy_(rows)
    torch.sub(rows, out[..., 0, :, :], out=out[..., 1, :, :])  # in float32, rounded as stored: no float32 temporary
    out[..., 2, :, :].copy_(out[..., 0, :, :])
    return out.flatten(-3, -2)


def add_split_update_(out: Tensor, parts: Tensor, factor_block: Tensor) -> None:
    """out += delta @ Mu_block on the tensor cores, GPTQ's lazy update on CUDA: out (m, n) float32 (a view,
    updated in place); parts (m, 3k) the delta's [hi | hi | lo] as the block solve writes it; factor_block
    (3k, n) the block's rows of Mu as [hi; lo; hi] (`split_factor_blocks`).

    hi_d hi_M + hi_d lo_M + lo_d hi_M is one bf16 GEMM with K = 3k and float32 accumulation. (Two GEMMs
    over Mu's [hi; lo] alone would save its third part but read and write the trailing targets twice: 10 ms
    more for an 8B down_proj.) The relative error is about 2^-16 (the lo lo term and lo's rounding), against
    2^-24 for a float32 GEMM on the CUDA cores, which took 43 ms of an 8B block's GPU time (torch profiler,
    H100): the targets move by about 1e-5 of a quantization error, so a code changes only where a target
    sits that close to a rounding boundary. On the CPU (which has no mixed-dtype GEMM) the parts are
    multiplied in float32, where the products of bf16 numbers are exact: the same sum in another order."""
    if out.device.type == "cuda":
        torch.addmm(out, parts, factor_block, out_dtype=torch.float32, out=out)
    else:
        out.addmm_(parts.float(), factor_block.float())
