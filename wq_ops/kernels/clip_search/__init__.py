"""RTN's clipping search: each group's clip factor for the least importance-weighted squared error. The
kernel behind it is a `ClipSearch`: `reference.search_clip` (any device) or `cuda.search_clip`."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

__all__ = ["ClipSearch"]


class ClipSearch(Protocol):
    """w: (out, in) float32; importance: (in,) or None. Returns (out, n_groups) float32 factors in
    [1 - max_shrink, 1]."""

    def __call__(self, w: Tensor, *, bits: int, group_size: int | None, sym: bool, scale_dtype: torch.dtype,
                 importance: Tensor | None = None) -> Tensor: ...
