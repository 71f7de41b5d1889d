"""Reference GPTQ block solve, plain PyTorch (any device, float32 or float64).

For one block of B columns: quantize column i on its (static) grid, then push its error into the
columns after it, weighted by row i of the block of the upper Cholesky factor of H^-1 (Frantar et al.,
2022, Alg. 1, inner loop). The caller applies the block's error to the trailing columns with one GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BlockSolve", "solve_block"]


@dataclass(frozen=True)
class BlockSolve:
    """codes: (out, B) uint8; err: (out, B) the scaled errors (w - q) / Hinv[i, i] for the trailing
    update; loss: (out,) sum over the block of (w - q)^2 / Hinv[i, i]^2 / 2, GPTQ's proxy loss."""

    codes: Tensor
    err: Tensor
    loss: Tensor


def solve_block(w: Tensor, hinv: Tensor, scale: Tensor, zero: Tensor, *, bits: int) -> BlockSolve:
    """w: (out, B) weights of the block, already updated by earlier blocks; hinv: (B, B) the block's
    diagonal block of the upper Cholesky factor of H^-1; scale, zero: (out, B) each column's grid.
    All float tensors in one dtype (float32, or float64 for checks). Inputs are not modified."""
    maxq = 2**bits - 1
    w = w.clone()
    out_features, n_cols = w.shape
    codes = torch.empty(out_features, n_cols, dtype=torch.uint8, device=w.device)
    err = torch.empty_like(w)
    loss = torch.zeros(out_features, dtype=w.dtype, device=w.device)
    zero = zero.to(w.dtype)
    for i in range(n_cols):
        col = w[:, i]
        d = hinv[i, i]
        q = torch.clamp(torch.round(col / scale[:, i]) + zero[:, i], 0, maxq)
        dq = (q - zero[:, i]) * scale[:, i]
        e = (col - dq) / d
        w[:, i + 1:] -= e.unsqueeze(1) * hinv[i, i + 1:].unsqueeze(0)     # (out, B - i - 1)
        codes[:, i] = q.to(torch.uint8)
        err[:, i] = e
        loss += (col - dq) ** 2 / d**2 / 2
    return BlockSolve(codes=codes, err=err, loss=loss)
