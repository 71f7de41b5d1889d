"""RTN's clipping search, plain PyTorch (any device; float32 as the kernel computes): each group's clip factor
among steps + 1 candidates from min-max down, for the least importance-weighted squared error. The CUDA kernel
(kernels/clip_search/clip_search.cu) computes the same grids, operation for operation; only its error sums run
in another order (see `cuda.py`)."""

from __future__ import annotations

import torch
from torch import Tensor

from wq_ops.kernels.quant_pack.reference import grid_from_range, n_groups_of

__all__ = ["search_clip", "CLIP_STEPS", "CLIP_MAX_SHRINK"]

# The clipping search's grid: 41 ranges from min-max down to 80% of it, in steps of 0.5%.
CLIP_STEPS = 40
CLIP_MAX_SHRINK = 0.2


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
