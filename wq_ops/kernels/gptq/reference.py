"""Reference GPTQ block solve, plain PyTorch (any device, float32 or float64).

For one block of B columns, in the form without an inverse (wq_ops/quant/gptq.py): quantize column i
at its target t_i on its (static) grid, then add its delta (w_i - q_i, from the original weight w_i)
times row i of the block of Mu to the targets after it. The caller applies the block's deltas to the
trailing targets with one GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BlockSolve", "solve_block", "solve_block_into_", "solve_blocks_into_", "Float32Solver",
           "FLOAT32_SOLVER"]


@dataclass(frozen=True)
class BlockSolve:
    """codes: (out, B) uint8; delta: (out, B) w - q (original weights minus dequantized codes) for the
    trailing update; loss: (out,) sum over the block of M[i, i]^2 (t_i - q_i)^2 / 2, GPTQ's proxy loss."""

    codes: Tensor
    delta: Tensor
    loss: Tensor


def solve_block(t: Tensor, w: Tensor, m_unit: Tensor, m_diag: Tensor, scale: Tensor, zero: Tensor,
                group: Tensor, *, bits: int) -> BlockSolve:
    """t: (out, B) targets of the block (the weights plus the earlier blocks' updates); w: (out, B) the
    original weights; m_unit: (B, B) the block's diagonal block of Mu (unit upper triangular); m_diag: (B,)
    M's diagonal there; scale: (out, G) and zero: (out, G) uint8, every group's grid; group: (B,) integer,
    each column's group. Float tensors in one dtype (float32, or float64 for checks). Inputs are not
    modified."""
    maxq = 2**bits - 1
    t = t.clone()
    out_features, n_cols = t.shape
    codes = torch.empty(out_features, n_cols, dtype=torch.uint8, device=t.device)
    delta = torch.empty_like(t)
    residual = torch.empty_like(t)                                         # t_i - q_i, for the loss
    group = group.long()
    col_scale = scale[:, group].to(t.dtype)                                # (out, B)
    col_zero = zero[:, group].to(t.dtype)
    for i in range(n_cols):
        col = t[:, i]
        q = torch.clamp(torch.round(col / col_scale[:, i]) + col_zero[:, i], 0, maxq)
        dq = (q - col_zero[:, i]) * col_scale[:, i]
        d = w[:, i] - dq
        t[:, i + 1:] += d.unsqueeze(1) * m_unit[i, i + 1:].unsqueeze(0)    # (out, B - i - 1)
        codes[:, i] = q.to(torch.uint8)
        delta[:, i] = d
        residual[:, i] = col - dq
    loss = (residual.square() * m_diag.square()).sum(dim=1) / 2
    return BlockSolve(codes=codes, delta=delta, loss=loss)


def solve_block_into_(t: Tensor, w: Tensor, m_unit: Tensor, m_diag: Tensor, scale: Tensor, zero: Tensor,
                     group: Tensor, *, bits: int, codes: Tensor, loss: Tensor, parts: Tensor | None) -> None:
    """The same solve, written where the layer loop wants it (the CUDA kernel's second entry point): the
    codes into `codes` ((out, B) uint8, a column block of the layer's codes), the row losses added to
    `loss` ((out,)), and where `parts` ((out, 3B) bfloat16) is given, the deltas as the tensor-core lazy
    update's operand [hi | hi | lo], hi = bf16(delta) and lo = bf16(delta - hi). It writes into its
    arguments, against the rule that kernel wrappers return new tensors, because the layer loop that calls
    it for every 128 columns was bound by kernel launches: returning them cost a copy, a sum, a split and
    a concatenation each time."""
    block = solve_block(t, w, m_unit, m_diag, scale, zero, group, bits=bits)
    codes.copy_(block.codes)
    loss += block.loss
    if parts is not None:
        n = block.delta.shape[1]
        hi = block.delta.to(torch.bfloat16)
        parts[:, :n] = hi
        parts[:, n:2 * n] = hi
        parts[:, 2 * n:] = torch.sub(block.delta, hi)


def solve_blocks_into_(t: Tensor, w: Tensor, m_unit: Tensor, m_diag: Tensor, scale: Tensor, zero: Tensor,
                       group: Tensor, *, bits: int, codes: Tensor, loss: Tensor, parts: Tensor | None) -> None:
    """`solve_block_into_` for a batch of problems of one size (the CUDA kernel's batched entry point): problem
    b from the b-th of each argument (t, w, codes, parts: (batch, out, *); m_unit (batch, B, B); m_diag,
    group (batch, B); scale, zero (batch, out, G); loss (batch, out))."""
    for b in range(t.shape[0]):
        solve_block_into_(t[b], w[b], m_unit[b], m_diag[b], scale[b], zero[b], group[b], bits=bits, codes=codes[b],
                          loss=loss[b], parts=None if parts is None else parts[b])


class Float32Solver:
    """The reference layer loop (`wq_ops.kernels.gptq.GptqSolver`): `solve_block` per block of columns, the
    trailing targets updated with one float32 (or float64) GEMM of the block's deltas and rows of Mu, for each
    layer of the batch in turn."""

    def start(self, m_unit: Tensor, *, block_size: int, rows: int) -> "_Float32Sweep":
        return _Float32Sweep(m_unit)


class _Float32Sweep:
    def __init__(self, m_unit: Tensor) -> None:
        self.m_unit = m_unit                            # (batch, in, in)
        self.deltas: list[Tensor] = []

    def solve_(self, targets: Tensor, w: Tensor, i1: int, i2: int, *, m_diag: Tensor, scale: Tensor, zero: Tensor,
               group: Tensor, bits: int, codes: Tensor, loss: Tensor) -> None:
        self.deltas = []
        for b in range(targets.shape[0]):
            block = solve_block(targets[b, :, i1:i2], w[b, :, i1:i2], self.m_unit[b, i1:i2, i1:i2], m_diag[b, i1:i2],
                                scale[b], zero[b], group[b, i1:i2], bits=bits)
            codes[b, :, i1:i2] = block.codes
            loss[b] += block.loss
            self.deltas.append(block.delta)

    def update_(self, targets: Tensor, i1: int, i2: int) -> None:
        assert self.deltas, "update_ before solve_"
        for b, delta in enumerate(self.deltas):      # the lazy update of each layer's trailing targets
            targets[b, :, i2:].addmm_(delta, self.m_unit[b, i1:i2, i2:])


FLOAT32_SOLVER = Float32Solver()
