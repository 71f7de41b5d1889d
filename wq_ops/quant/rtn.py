"""The quantization grid per row and group, and round-to-nearest.

The grid's elementary ops (range -> scale and zero, codes, rounding of scales to the storage dtype) live
in wq_ops/kernels/quant_pack/reference.py, which the CUDA kernels mirror; this module groups a weight matrix
and returns `QuantResult`s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from wq_ops.errors import ConfigError
from wq_ops.kernels.quant_pack.reference import grid_from_range, quantize_codes
from wq_ops.quant.result import QuantResult, dequantize

__all__ = ["Grid", "compute_grid", "quantize_codes", "quantize_rtn", "fake_quantize", "n_groups_of", "search_clip",
           "CLIP_STEPS", "CLIP_MAX_SHRINK"]

# The clipping search's grid: 41 ranges from min-max down to 80% of it, in steps of 0.5%.
CLIP_STEPS = 40
CLIP_MAX_SHRINK = 0.2


@dataclass(frozen=True)
class Grid:
    """scale: (out, n_groups) float32, exact in the storage dtype; zero: (out, n_groups) uint8."""

    scale: Tensor
    zero: Tensor


def n_groups_of(in_features: int, group_size: int | None) -> int:
    if group_size is None:
        return 1
    if in_features % group_size:
        raise ConfigError(f"in_features={in_features} is not a multiple of group_size={group_size}")
    return in_features // group_size


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


def search_clip(w: Tensor, *, bits: int, group_size: int | None, sym: bool, scale_dtype: torch.dtype,
                importance: Tensor | None = None, steps: int = CLIP_STEPS,
                max_shrink: float = CLIP_MAX_SHRINK) -> Tensor:
    """Each group's clip factor (out, n_groups) in [1 - max_shrink, 1]: the range min-max shrunk by the
    factor on a grid of steps + 1 points, chosen for the least sum over the group of importance_j x (w - q)^2
    (importance: (in,) the input Hessian's diagonal, so the sum is the diagonal part of the layer's output
    error; None: plain squared error). Min-max (factor 1) is tried first and kept on ties, so the chosen grid
    is never worse than min-max by this measure. w: (out, in) float32."""
    out_features, in_features = w.shape
    n_groups = n_groups_of(in_features, group_size)
    wg = w.reshape(out_features, n_groups, in_features // n_groups)
    weight = None if importance is None else importance.to(w.dtype).reshape(1, n_groups, -1)
    wmin, wmax = wg.amin(dim=-1), wg.amax(dim=-1)
    best_error = torch.full_like(wmin, float("inf"))
    best = torch.ones_like(wmin)
    for k in range(steps + 1):
        factor = torch.full_like(wmin, 1.0 - max_shrink * k / steps)
        scale, zero = grid_from_range(wmin, wmax, bits=bits, sym=sym, scale_dtype=scale_dtype, clip=factor)
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1).to(w.dtype)
        delta = (torch.clamp(torch.round(wg / s) + z, 0, 2**bits - 1) - z) * s - wg
        error = (delta * delta if weight is None else delta * delta * weight).sum(dim=-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better, factor, best)
    return best


def fake_quantize(
    w: Tensor, *, bits: int, group_size: int | None, sym: bool, scale_dtype: torch.dtype,
    clip: Tensor | None = None,
) -> Tensor:
    """quantize_rtn then dequantize: (out, in) float32 weights on the grid."""
    return dequantize(quantize_rtn(w, bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype, clip=clip))
