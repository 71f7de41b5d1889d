"""Reference AWQ search primitives, plain PyTorch (any device; float32, or float64 for checks).

fake_quant: Q(W diag(s)) diag(s)^-1, the weights the scaled-and-quantized layer effectively applies
to the unscaled input (Lin et al., 2023, Sec. 3.2). clip_error: for each row, group and clip ratio,
d^T H_gg d with d = Q_clip(w) - w, the group's share of the output error (cross-group terms dropped,
as AWQ's clip search does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from wq_ops.kernels.quant_pack.reference import dequantize_codes, grid_from_range, quantize_codes

__all__ = ["fake_quant", "clip_error"]


def _fake_quant_grouped(x: Tensor, *, bits: int, group_size: int, sym: bool, scale_dtype: torch.dtype,
                        clip: Tensor | None = None) -> Tensor:
    rows, cols = x.shape
    xg = x.reshape(rows, cols // group_size, group_size)                      # (rows, g, gs)
    scale, zero = grid_from_range(xg.amin(dim=-1), xg.amax(dim=-1), bits=bits, sym=sym, scale_dtype=scale_dtype,
                                  clip=clip)
    return dequantize_codes(quantize_codes(x, scale, zero, bits=bits), scale, zero)


def fake_quant(w: Tensor, s: Tensor, *, bits: int, group_size: int, sym: bool, scale_dtype: torch.dtype) -> Tensor:
    """w: (rows, cols) any float dtype; s: (cols,) positive. Returns Q(w * s) / s in float32 (or w's dtype
    when that is float64). group_size: columns per group (cols for one group per row)."""
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    x = w.to(dtype) * s.to(dtype)
    return _fake_quant_grouped(x, bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype) / s.to(dtype)


def clip_error(w: Tensor, h: Tensor, *, group_size: int, bits: int, sym: bool, scale_dtype: torch.dtype,
               ratios: Tensor) -> Tensor:
    """w: (rows, cols) float32; h: (cols, cols) symmetric; ratios: (n,) clip factors in (0, 1].
    Returns (rows, n_groups, n) float32: d_g^T H_gg d_g for each clip ratio."""
    rows, cols = w.shape
    n_groups = cols // group_size
    blocks = torch.stack([h[g * group_size:(g + 1) * group_size, g * group_size:(g + 1) * group_size]
                          for g in range(n_groups)])                           # (g, gs, gs)
    out = torch.empty(rows, n_groups, len(ratios), dtype=w.dtype, device=w.device)
    for k, ratio in enumerate(ratios.tolist()):
        clip = torch.full((rows, n_groups), ratio, dtype=w.dtype, device=w.device)
        d = (_fake_quant_grouped(w, bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype, clip=clip)
             - w).reshape(rows, n_groups, group_size)                          # (rows, g, gs)
        out[:, :, k] = torch.einsum("ogi,gij,ogj->og", d, blocks, d)
    return out
