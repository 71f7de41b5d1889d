"""SmoothQuant's per-channel smoothing factors (Xiao et al. 2023): an input channel's outliers are divided
out of the activations and multiplied into the weights that read them, s_j = max|X_j|^alpha / max|W_j|^(1 -
alpha), so that per-token INT8 activations lose less. The division folds into the module that produces the
input (a norm's weight); the layer's float output is unchanged. alpha: how much of the difficulty moves to the
weights (0.5 balances the two maxima)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["smoothing_scales"]


def smoothing_scales(x_absmax: Tensor, weights: Sequence[Tensor], *, alpha: float) -> Tensor:
    """x_absmax: (in,) float32, each input channel's largest magnitude over the calibration tokens; weights:
    the (out_i, in) matrices that read that input (their column maxima are taken together). Returns (in,)
    float32 factors; 1 where a channel has no activation or no weight (nothing to balance)."""
    w_absmax = torch.stack([w.abs().amax(dim=0).to(torch.float32) for w in weights]).amax(dim=0)
    x = x_absmax.to(torch.float32)
    s = x.pow(alpha) / w_absmax.pow(1.0 - alpha)
    return torch.where((x > 0) & (w_absmax > 0) & torch.isfinite(s), s, torch.ones_like(s))
