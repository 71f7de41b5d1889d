"""Deliberately naive float64 references for the quantization algorithms, written from the papers'
equations rather than from our implementations: no blocking, no lazy updates, no Cholesky trick."""

from __future__ import annotations

import torch
from torch import Tensor


def _round_bf16(x: float, *, up: bool = False) -> float:
    # Through float32 first, as the implementation computes it: a float64 quotient can round to the
    # neighbouring bf16 value, and one group's different scale would move all its codes.
    x32 = torch.tensor(x, dtype=torch.float32)
    stored = x32.to(torch.bfloat16)
    if up and float(stored) < float(x32):       # the next bf16 value above: the grid covers the range
        stored = torch.nextafter(stored, torch.tensor(float("inf"), dtype=torch.bfloat16))
    return float(stored)


def naive_grid(w: Tensor, bits: int, group_size: int | None, sym: bool, *,
               round_up: bool = False) -> tuple[Tensor, Tensor]:
    """Per (row, group) scale and zero in float64; scales rounded to bfloat16 like the artifact's (to
    nearest, or up: GPTQ's grid)."""
    out_features, in_features = w.shape
    gs = group_size or in_features
    maxq = 2**bits - 1
    scale = torch.empty(out_features, in_features // gs, dtype=torch.float64)
    zero = torch.empty_like(scale)
    for r in range(out_features):
        for g in range(in_features // gs):
            seg = w[r, g * gs:(g + 1) * gs]
            lo, hi = min(float(seg.min()), 0.0), max(float(seg.max()), 0.0)
            if sym:
                amax = max(-lo, hi)
                s = 2 * amax / maxq if amax > 0 else 1.0
                s = _round_bf16(s, up=round_up)
                z = 2 ** (bits - 1)
            else:
                s = (hi - lo) / maxq if hi > lo else 1.0
                s = _round_bf16(s, up=round_up)
                z = min(max(round(-lo / s), 0), maxq)
            scale[r, g], zero[r, g] = s, z
    return scale, zero


def naive_gptq(w: Tensor, h: Tensor, *, bits: int, group_size: int | None, sym: bool, damp_frac: float,
               act_order: bool) -> Tensor:
    """OBQ-style GPTQ in float64 (Frantar et al., eqs. 2-4): quantize one column, spread its error over the
    remaining columns with the current inverse Hessian, then eliminate that column from the inverse.
    Static groups from the original weights. Returns the dequantized (out, in) weights, original order."""
    w = w.to(torch.float64).clone()
    h = h.to(torch.float64).clone()
    n = h.shape[0]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    scale, zero = naive_grid(w, bits, group_size, sym, round_up=True)
    gs = group_size or n
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(n)
    h = h + damp_frac * torch.diagonal(h).mean() * torch.eye(n, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    remaining = list(order.tolist())
    maxq = 2**bits - 1
    for j in order.tolist():
        remaining.remove(j)
        s, z = scale[:, j // gs], zero[:, j // gs]
        qj = (torch.clamp(torch.round(w[:, j] / s) + z, 0, maxq) - z) * s
        q[:, j] = qj
        err = (w[:, j] - qj) / hinv[j, j]
        if remaining:
            idx = torch.tensor(remaining)
            w[:, idx] -= err.unsqueeze(1) * hinv[j, idx].unsqueeze(0)
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]   # eliminate column j
    return q
