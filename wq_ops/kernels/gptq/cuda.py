"""CUDA GPTQ block solve: the same contracts as `reference.solve_block` and `reference.solve_block_into_`,
on the GPU.

t, w: (out, B) float32 CUDA, rows may be strided (column blocks of the full matrices); m_unit: (B, B)
float32, rows may be strided (a block of the full Mu); m_diag: (B,) float32; scale: (out, G) float32;
zero: (out, G) uint8; group: (B,) int32 in [0, G); B <= 128. Returns new tensors (codes uint8, delta
float32, loss float32), or writes into the caller's; codes and deltas (and the deltas' bf16 parts) are
bit-identical to the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wq_ops.errors import KernelError
from wq_ops.kernels.arguments import cuda_device_of, require_bits, require_tensor
from wq_ops.kernels.build import load_extension
from wq_ops.kernels.gptq.reference import BlockSolve
from wq_ops.kernels.gptq.split_update import SplitUpdateSolver

__all__ = ["solve_block", "solve_block_into_", "solve_block_into_unchecked_", "solve_blocks_into_unchecked_",
           "CUDA_SOLVER"]

_NAME = "gptq block solve"


def solve_block(t: Tensor, w: Tensor, m_unit: Tensor, m_diag: Tensor, scale: Tensor, zero: Tensor,
                group: Tensor, *, bits: int) -> BlockSolve:
    """The block solve on the GPU (arguments as in the module docstring). group's values are not checked
    (that needs a device sync each call): quantize_gptq derives them from column positions."""
    _check(t, w, m_unit, m_diag, scale, zero, group, bits)
    ext = load_extension()
    try:
        codes, delta, loss = ext.gptq_solve_block(t, w, m_unit, m_diag, scale, zero, group, bits)
    except RuntimeError as e:
        raise KernelError(str(e).split("\n")[0]) from None
    return BlockSolve(codes=codes, delta=delta, loss=loss)


def solve_block_into_(t: Tensor, w: Tensor, m_unit: Tensor, m_diag: Tensor, scale: Tensor, zero: Tensor,
                     group: Tensor, *, bits: int, codes: Tensor, loss: Tensor, parts: Tensor | None) -> None:
    """`reference.solve_block_into_` on the GPU (it says why it writes into its arguments): one kernel
    writes the codes, adds the losses and writes the update operand (arguments as in the module docstring;
    codes (out, B) uint8 and parts (out, 3B) bfloat16 with contiguous rows, loss (out,) float32 contiguous)."""
    _check(t, w, m_unit, m_diag, scale, zero, group, bits)
    rows, n = t.shape
    device = t.device
    require_tensor(_NAME, "codes", codes, dtypes=(torch.uint8,), shape=(rows, n), device=device)
    require_tensor(_NAME, "loss", loss, dtypes=(torch.float32,), shape=(rows,), device=device)
    if codes.stride(1) != 1:
        raise KernelError(f"{_NAME}: codes must have contiguous rows (stride(1) == 1), got stride {codes.stride(1)}")
    if not loss.is_contiguous():
        raise KernelError(f"{_NAME}: loss must be contiguous, got stride {loss.stride(0)}")
    if parts is not None:
        require_tensor(_NAME, "parts", parts, dtypes=(torch.bfloat16,), shape=(rows, 3 * n), device=device)
        if parts.stride(1) != 1:
            raise KernelError(f"{_NAME}: parts must have contiguous rows (stride(1) == 1)")
    solve_block_into_unchecked_(t, w, m_unit, m_diag, scale, zero, group, bits=bits, codes=codes, loss=loss,
                               parts=parts)


def solve_block_into_unchecked_(t: Tensor, w: Tensor, m_unit: Tensor, m_diag: Tensor, scale: Tensor, zero: Tensor,
                               group: Tensor, *, bits: int, codes: Tensor, loss: Tensor, parts: Tensor | None) -> None:
    """solve_block_into_ without its Python checks, for a caller that cut every argument from tensors it made
    and checked once: quantize_gptq calls it for each of a layer's blocks of columns, where the checks cost
    as much CPU time as the launch. (The binding checks again in C++, but on the H100 machine a failed
    check there ended the process: kernels/arguments.py.)"""
    try:
        load_extension().gptq_solve_block_into(t, w, m_unit, m_diag, scale, zero, group, bits, codes, loss, parts)
    except RuntimeError as e:
        raise KernelError(f"{_NAME}: {str(e).splitlines()[0]}") from None


def solve_blocks_into_unchecked_(t: Tensor, w: Tensor, m_unit: Tensor, m_diag: Tensor, scale: Tensor, zero: Tensor,
                                group: Tensor, *, bits: int, codes: Tensor, loss: Tensor,
                                parts: Tensor | None) -> None:
    """A batch of `solve_block_into_unchecked_` solves of one size in one launch, problem b from the b-th of
    each argument: t, w, codes (batch, rows, B) and m_unit (batch, B, B) with contiguous rows; m_diag and
    group (batch, B); scale, zero (batch, rows, G), each problem's contiguous; loss (batch, rows); parts
    (batch, rows, 3B) or None. Each problem's codes, losses and parts are what the one-problem kernel
    writes, bit for bit (the same threads do the same arithmetic; only the launch covers more rows)."""
    try:
        load_extension().gptq_solve_blocks_into(t, w, m_unit, m_diag, scale, zero, group, bits, codes, loss, parts)
    except RuntimeError as e:
        raise KernelError(f"{_NAME}: {str(e).splitlines()[0]}") from None


def _check(t: Tensor, w: Tensor, m_unit: Tensor, m_diag: Tensor, scale: Tensor, zero: Tensor, group: Tensor,
           bits: int) -> None:
    require_bits(_NAME, bits)
    device = cuda_device_of(t)
    require_tensor(_NAME, "t", t, dtypes=(torch.float32,), shape=(None, None), device=device)
    rows, n = t.shape
    if not 1 <= n <= 128:
        raise KernelError(f"{_NAME}: block width {n} must be 1..128 (the kernel holds a block in registers)")
    require_tensor(_NAME, "w", w, dtypes=(torch.float32,), shape=(rows, n), device=device)
    if t.stride(1) != 1 or w.stride(1) != 1:
        raise KernelError(f"{_NAME}: t and w must have contiguous rows (stride(1) == 1)")
    require_tensor(_NAME, "m_unit", m_unit, dtypes=(torch.float32,), shape=(n, n), device=device)
    require_tensor(_NAME, "m_diag", m_diag, dtypes=(torch.float32,), shape=(n,), device=device)
    require_tensor(_NAME, "scale", scale, dtypes=(torch.float32,), shape=(rows, None), device=device)
    if scale.shape[1] < 1:
        raise KernelError(f"{_NAME}: the grid has no groups")
    require_tensor(_NAME, "zero", zero, dtypes=(torch.uint8,), shape=tuple(scale.shape), device=device)
    require_tensor(_NAME, "group", group, dtypes=(torch.int32,), shape=(n,), device=device)


# The CUDA backend's GPTQ layer loop: this kernel's in-place solve (a batch of layers per launch), updates on
# the tensor cores. quantize_gptq_many makes every argument it passes (shapes, dtypes, strides and devices by
# construction), so the solve skips the Python checks; the binding still checks them in C++.
CUDA_SOLVER = SplitUpdateSolver(solve_blocks_into_unchecked_, needs_cuda=True)
