"""NVFP4 weights (NVIDIA's 4-bit float format): each group of 16 weights of a row stores FP4 E2M1 values
(0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives) times an FP8 E4M3 scale, and the tensor one float32 global
scale that puts the FP8 scales' range to use: global = 448 x 6 / max|w|, group scale = fp8(max|group| / 6 x
global), weight = value x group scale / global. Layers an engine fuses (q/k/v, gate/up) share one global scale.

Codes: 4 bits, the sign in bit 3 and the magnitude's index into the value table in bits 0-2 (how the format
packs them); rounding is to the nearest value, ties to the even index, saturating at 6.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wq_ops.config.schemes import NVFP4_GROUP
from wq_ops.quant.result import FP4_VALUES, Fp4Result, fp4_values

__all__ = ["FP4_VALUES", "FP4_MAX", "NVFP4_GROUP", "global_scale_of", "fp4_codes", "fp4_values", "quantize_nvfp4"]

FP4_MAX = 6.0
_FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
# Midpoints between consecutive magnitudes, and whether a value exactly on one rounds up (to the even index).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIES_UP = (False, True, False, True, False, True, False)


def global_scale_of(amax: Tensor) -> Tensor:
    """() float32: 448 x 6 / amax, the global scale of a tensor (or of fused tensors) whose largest magnitude is
    amax; 1 where amax is 0 or not finite. Computed as compressed-tensors does (its `generate_gparam`: a Python
    number over a tensor, which torch evaluates as the number times the tensor's reciprocal), so the stored
    scale is the one llm-compressor would write, to the bit."""
    amax = amax.to(torch.float32)
    scale = torch.reciprocal(amax) * (_FP8_MAX * FP4_MAX)
    return torch.where((amax > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))


def fp4_codes(x: Tensor) -> Tensor:
    """x float32 (already divided by its scale) -> uint8 codes in 0..15, nearest E2M1 value, ties to even."""
    a = x.abs()
    index = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for mid, up in zip(_MIDPOINTS, _TIES_UP):
        index += ((a >= mid) if up else (a > mid)).to(torch.uint8)
    return index | ((x < 0).to(torch.uint8) << 3)


def quantize_nvfp4(w: Tensor, *, global_scale: Tensor, group_size: int = NVFP4_GROUP) -> Fp4Result:
    """w: (out, in), any float dtype (math in float32), in a multiple of group_size; global_scale: () float32
    (`global_scale_of` the weights, or of every weight fused with them)."""
    w = w.to(torch.float32)
    out_features, in_features = w.shape
    groups = w.reshape(out_features, in_features // group_size, group_size)
    amax = groups.abs().amax(dim=-1)                                             # (out, in / 16)
    g = global_scale.to(torch.float32)
    limit = torch.full_like(amax, FP4_MAX)
    scale = torch.clamp(amax / limit * g, -_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    # A group whose scale underflows FP8 stores the smallest subnormal, 2**-9, so its values keep codes up to 3
    # (compressed-tensors writes 0.125 there, its FP8 epsilon, which rounds them all to 0).
    tiny = torch.tensor(2.0 ** -9, dtype=torch.float32, device=w.device).to(torch.float8_e4m3fn)
    scale = torch.where(scale.to(torch.float32) == 0, tiny, scale)
    effective = scale.to(torch.float32) / g                                       # (out, in / 16)
    codes = fp4_codes(groups / effective.unsqueeze(-1)).reshape(out_features, in_features)
    return Fp4Result(codes=codes, scale=scale, global_scale=g.reshape(()))
