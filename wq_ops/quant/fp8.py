"""FP8 E4M3 weights: each output channel, the whole tensor or each block scaled so its largest magnitude maps
to 448 (E4M3's largest finite value), then rounded to the nearest FP8 value. No calibration: FP8 keeps 3
mantissa bits at every magnitude, so rounding to nearest is what compressed-tensors' presets do too.

Scales are rounded to the storage dtype first (nearest), so the values are chosen on the grid an engine
multiplies back; a weight that a rounded-down scale pushes past 448 is clipped to it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wq_ops.config.schemes import FP8_BLOCK_SHAPE, WeightLayout
from wq_ops.kernels.quant_pack.reference import round_scale
from wq_ops.quant.result import FloatResult, expand_blocks

__all__ = ["FP8_MAX", "quantize_fp8", "fp8_scale_of"]

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)      # 448


def fp8_scale_of(amax: Tensor, *, scale_dtype: torch.dtype) -> Tensor:
    """The scale that maps magnitude `amax` (float32, any shape) to FP8_MAX, rounded to `scale_dtype`; 1 where
    amax is 0 (any scale stores zeros exactly)."""
    # A tensor divisor: torch's CUDA division by a Python scalar multiplies by its reciprocal (last-bit drift).
    limit = torch.full_like(amax, FP8_MAX)
    return round_scale(torch.where(amax > 0, amax / limit, torch.ones_like(amax)), scale_dtype)


def quantize_fp8(w: Tensor, *, layout: WeightLayout, scale_dtype: torch.dtype,
                 block: tuple[int, int] = FP8_BLOCK_SHAPE) -> FloatResult:
    """w: (out, in), any float dtype (math in float32). layout: GROUP is one scale per output channel ((out, 1)),
    TENSOR one for all ((1, 1)), BLOCK one per block ((ceil(out / bh), ceil(in / bw)), partial at the ends)."""
    if layout is WeightLayout.TENSOR_GROUP:
        raise ValueError("layout=tensor_group is NVFP4's (wq_ops.quant.nvfp4), not FP8's")
    w = w.to(torch.float32)
    out_features, in_features = w.shape
    if layout is WeightLayout.GROUP:
        amax = w.abs().amax(dim=1, keepdim=True)
    elif layout is WeightLayout.TENSOR:
        amax = w.abs().amax().reshape(1, 1)
    else:
        bh, bw = block
        rows, cols = -(-out_features // bh), -(-in_features // bw)
        padded = torch.nn.functional.pad(w.abs(), (0, cols * bw - in_features, 0, rows * bh - out_features))
        amax = padded.reshape(rows, bh, cols, bw).amax(dim=(1, 3))
    scale = fp8_scale_of(amax, scale_dtype=scale_dtype)
    blocks = block if layout is WeightLayout.BLOCK else None
    full = expand_blocks(scale, block, (out_features, in_features)) if blocks else scale.expand(w.shape)
    values = torch.clamp(w / full, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return FloatResult(values=values, scale=scale, block=blocks)
