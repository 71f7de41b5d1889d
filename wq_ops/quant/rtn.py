"""The quantization grid per row and group, and round-to-nearest.

The grid's elementary ops (range -> scale and zero, codes, rounding of scales to the storage dtype) live
in wq_ops/kernels/quant_pack/reference.py, which the CUDA kernels mirror; this module groups a weight matrix
and returns `QuantResult`s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from wq_ops.kernels.clip_search.reference import CLIP_MAX_SHRINK, CLIP_STEPS, search_clip
from wq_ops.kernels.quant_pack.reference import grid_from_range, n_groups_of, quantize_codes
from wq_ops.quant.result import QuantResult, dequantize

__all__ = ["Grid", "compute_grid", "quantize_codes", "quantize_rtn", "fake_quantize", "n_groups_of", "search_clip",
           "CLIP_STEPS", "CLIP_MAX_SHRINK"]

@dataclass(frozen=True)
class Grid:
    """scale: (out, n_groups) float32, exact in the storage dtype; zero: (out, n_groups) uint8."""

    scale: Tensor
    zero: Tensor


def compute_grid(
    w: Tensor, *, bits: int, group_size: int | None, sym: bool, scale_dtype: torch.dtype,
    clip: Tensor | None = None, round_up: bool = False,
) -> Grid:
    """Min-max grid of w: (out, in) float32. clip: optional (out, n_groups) factor in (0, 1]: each group's
    weights are clipped to +-clip * max|w| first (AWQ's clipping search). round_up: round scales up to
    the storage dtype rather than to nearest (see round_scale). Returns (out, n_groups) tensors."""
    out_features, in_features = w.shape
    n_groups = n_groups_of(in_features, group_size)
    wg = w.reshape(out_features, n_groups, in_features // n_groups)        # (out, g, gs)
    scale, zero = grid_from_range(wg.amin(dim=-1), wg.amax(dim=-1), bits=bits, sym=sym, scale_dtype=scale_dtype,
                                  clip=clip, round_up=round_up)
    return Grid(scale=scale, zero=zero)


def quantize_rtn(
    w: Tensor, *, bits: int, group_size: int | None, sym: bool, scale_dtype: torch.dtype,
    clip: Tensor | None = None,
) -> QuantResult:
    """Round-to-nearest on the min-max grid. w: (out, in), any float dtype (math in float32)."""
    w = w.to(torch.float32)
    grid = compute_grid(w, bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype, clip=clip)
    codes = quantize_codes(w, grid.scale, grid.zero, bits=bits)
    return QuantResult(codes=codes, scale=grid.scale, zero=grid.zero, bits=bits, group_size=group_size)


def fake_quantize(
    w: Tensor, *, bits: int, group_size: int | None, sym: bool, scale_dtype: torch.dtype,
    clip: Tensor | None = None,
) -> Tensor:
    """quantize_rtn then dequantize: (out, in) float32 weights on the grid."""
    return dequantize(quantize_rtn(w, bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype, clip=clip))
