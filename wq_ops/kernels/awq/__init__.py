"""AWQ's searches: one fake-quantization of scaled weights per candidate (no copy per candidate), and
the per-group clip error for every clip ratio (no clipped weights at all).
The kernels behind them are `AwqPrimitives`: the `reference` module (any device) or the `cuda` module."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

__all__ = ["AwqPrimitives"]


class AwqPrimitives(Protocol):
    """The kernels behind AWQ's searches, handed in by the caller: the `reference` module (any
    device) or the `cuda` module."""

    def fake_quant(self, w: Tensor, s: Tensor, *, bits: int, group_size: int, sym: bool,
                   scale_dtype: torch.dtype) -> Tensor: ...

    def clip_error(self, w: Tensor, h: Tensor, *, group_size: int, bits: int, sym: bool, scale_dtype: torch.dtype,
                   ratios: Tensor) -> Tensor: ...
