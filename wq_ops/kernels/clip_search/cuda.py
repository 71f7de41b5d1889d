"""RTN's clipping search on the GPU: `reference.search_clip`'s contract, one thread block per group reading its
columns once per candidate from L1 rather than the whole matrix from memory per candidate.

w: (out, in) float32 CUDA; importance: (in,) float32 on the same device, or None. Returns a new (out, n_groups)
float32 tensor. The grids are the reference's bit for bit; the error sums run in another order, so where two
candidates' errors lie within float32 rounding of each other either may be chosen (the test bounds how often).
"""

from __future__ import annotations

import torch
from torch import Tensor

from wq_ops.errors import KernelError
from wq_ops.kernels.arguments import cuda_device_of, require_bits, require_tensor
from wq_ops.kernels.build import load_extension
from wq_ops.kernels.clip_search.reference import CLIP_MAX_SHRINK, CLIP_STEPS

__all__ = ["search_clip"]

# The storage dtypes the kernels round scales to (wq_grid.cuh's ScaleDtype).
_SCALE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def search_clip(w: Tensor, *, bits: int, group_size: int | None, sym: bool, scale_dtype: torch.dtype,
                importance: Tensor | None = None, steps: int = CLIP_STEPS,
                max_shrink: float = CLIP_MAX_SHRINK) -> Tensor:
    kernel = "clip search"
    require_bits(kernel, bits)
    device = cuda_device_of(w)
    require_tensor(kernel, "w", w, dtypes=(torch.float32,), shape=(None, None), device=device)
    cols = w.shape[1]
    width = cols if group_size is None else group_size
    if width < 1 or cols % width:
        raise KernelError(f"{kernel}: {cols} columns are not a multiple of group_size={group_size}")
    if importance is not None:
        require_tensor(kernel, "importance", importance, dtypes=(torch.float32,), shape=(cols,), device=device)
    if scale_dtype not in _SCALE_DTYPES:
        raise KernelError(f"{kernel}: scale_dtype={scale_dtype}: expected float32, bfloat16 or float16")
    if steps < 1:
        raise KernelError(f"{kernel}: steps={steps} must be at least 1")
    none = torch.empty(0, dtype=torch.float32, device=device)
    try:
        return load_extension().clip_search(w, none if importance is None else importance, bits, width, sym,
                                            _SCALE_DTYPES[scale_dtype], steps, float(max_shrink))
    except RuntimeError as e:
        raise KernelError(str(e).split("\n")[0]) from None
