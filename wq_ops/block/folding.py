"""Folding per-channel input scales into a block's tensors: the producer of a group's input (a norm's weight,
or a linear's output rows) divided by s and the group's weights' columns multiplied by it, so the float
output is unchanged. AWQ's searched scales and SmoothQuant's smoothing factors both fold this way."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["fold_input_scales_", "scale_producer_"]


def scale_producer_(work: dict[str, Tensor], producer: str, s: Tensor, dtype: torch.dtype) -> None:
    """Divide the producer's output channels by s, in `work` (the block's tensors as they change): a norm's
    weight (and bias), or a linear's rows (and bias)."""
    w = work[producer + ".weight"].to(torch.float32)
    work[producer + ".weight"] = (w / (s if w.dim() == 1 else s.unsqueeze(1))).to(dtype)
    if producer + ".bias" in work:
        work[producer + ".bias"] = (work[producer + ".bias"].to(torch.float32) / s).to(dtype)


def fold_input_scales_(work: dict[str, Tensor], producer: str, names: Sequence[str], s: Tensor,
                       dtype: torch.dtype) -> None:
    """The producer divided by s (`scale_producer_`) and each named linear's columns multiplied by it, in
    `work`. s: (in,) float32."""
    scale_producer_(work, producer, s, dtype)
    for n in names:
        work[n + ".weight"] = (work[n + ".weight"].to(torch.float32) * s).to(dtype)
