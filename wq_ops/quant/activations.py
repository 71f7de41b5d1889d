"""Activation quantization as an engine applies it at run time to a linear layer's input: per token, per group
of columns or per tensor, to FP8 E4M3 or INT8, with scales from the input itself (dynamic) or a stored one
(static). Used to measure a W8A8 or FP8 artifact's quality as it is served, not with float activations.

The arithmetic is vLLM's kernels': float32 scales, FP8 over +-448, INT8 rounded half to even and saturated to
[-128, 127] with the scale absmax / 127; NVFP4 (4 bits) as its weights are (`wq_ops.quant.nvfp4`): FP8 scales per
16 columns of each token, from the input, times the stored global scale. The result is the dequantized input,
in the input's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wq_ops.config.schemes import ActivationQuant, ActivationStrategy, NumberType
from wq_ops.quant import nvfp4
from wq_ops.quant.result import dequantize

__all__ = ["fake_quantize_input", "INT8_LIMIT"]

INT8_LIMIT = 127.0
_FP8_LIMIT = float(torch.finfo(torch.float8_e4m3fn).max)


def _over(amax: Tensor, limit: float) -> Tensor:
    """amax / limit, divided on every device (torch's CUDA division by a Python number multiplies by its
    reciprocal, a last-bit difference from the CPU)."""
    return amax / torch.full_like(amax, limit)


def fake_quantize_input(x: Tensor, spec: ActivationQuant, *, static_scale: Tensor | None = None) -> Tensor:
    """x: (..., in) any float dtype -> the same shape and dtype, each value quantized and dequantized as `spec`
    says. static_scale: () float32, the stored scale of a static spec (required then, unused otherwise): NVFP4's
    global scale."""
    if spec.bits == 4:
        if static_scale is None or x.shape[-1] % nvfp4.NVFP4_GROUP:
            raise ValueError(f"NVFP4 activations need the layer's input global scale and a width of whole groups of "
                             f"{nvfp4.NVFP4_GROUP} (got {x.shape[-1]})")
        rows = x.reshape(-1, x.shape[-1])
        fp4 = nvfp4.quantize_nvfp4(rows, global_scale=static_scale.to(device=x.device, dtype=torch.float32))
        return dequantize(fp4, x.dtype).reshape(x.shape)
    limit = _FP8_LIMIT if spec.type is NumberType.FLOAT else INT8_LIMIT
    xf = x.to(torch.float32)
    if not spec.dynamic:
        if static_scale is None:
            raise ValueError("a static activation scheme needs the layer's stored input scale")
        scale = static_scale.to(torch.float32)
    elif spec.strategy is ActivationStrategy.TOKEN:
        scale = _over(xf.abs().amax(dim=-1, keepdim=True), limit)                    # (..., 1)
    elif spec.strategy is ActivationStrategy.GROUP:
        if spec.group_size is None or x.shape[-1] % spec.group_size:
            raise ValueError(f"input width {x.shape[-1]} is not a multiple of the group size {spec.group_size}")
        xf = xf.unflatten(-1, (-1, spec.group_size))                                 # (..., groups, group_size)
        scale = _over(xf.abs().amax(dim=-1, keepdim=True), limit)
    else:
        scale = _over(xf.abs().amax(), limit)
    # An all-zero token keeps scale 1: its values stay 0 whatever the scale.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if spec.type is NumberType.FLOAT:
        q = torch.clamp(xf / scale, -limit, limit).to(torch.float8_e4m3fn).to(torch.float32)
    else:
        q = torch.clamp(torch.round(xf / scale), -limit - 1, limit)
    return (q * scale).reshape(x.shape).to(x.dtype)
