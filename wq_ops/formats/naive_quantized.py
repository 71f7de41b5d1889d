"""compressed-tensors' `int-quantized` (INT8 weights with quantized activations: W8A8) and `float-quantized`
(FP8 weights) formats: one value per weight in its storage dtype, written by its NaiveQuantizationCompressor.

Per quantized linear `L`:
- `L.weight`        int8 (the signed code q - 2**(bits-1)) or float8_e4m3fn, (out, in);
- `L.weight_scale`  model dtype: (out, 1) per channel, (1,) per tensor, (ceil(out/128), ceil(in/128)) per block;
- `L.input_scale`   model dtype (1,): static activation scales only (FP8).
Dequantization: weight * scale (the channel's, the tensor's or the block's).
"""

from __future__ import annotations

import torch
from torch import Tensor

from wq_ops.config import QuantConfig
from wq_ops.config.schemes import FP8_BLOCK_SHAPE, NumberType, WeightLayout
from wq_ops.errors import ArtifactError
from wq_ops.formats.checks import Checks, require
from wq_ops.quant.result import FloatResult, QuantResult, WeightResult

__all__ = ["encode_linear", "decode_linear", "tensor_names", "MARKER"]

# The tensor every quantized linear has, and only a quantized one (`weight` is every linear's).
MARKER = "weight_scale"


def tensor_names(module: str, *, quant: QuantConfig) -> tuple[str, ...]:
    static = quant.activations is not None and not quant.activations.dynamic
    return (f"{module}.weight", f"{module}.weight_scale") + ((f"{module}.input_scale",) if static else ())


def encode_linear(module: str, result: WeightResult, *, quant: QuantConfig, scale_dtype: torch.dtype,
                  checks: Checks | None = None) -> dict[str, Tensor]:
    """The artifact tensors of one quantized linear (module: its full name). checks: where conditions on device
    values are queued rather than read back at once (`wq_ops.formats.checks`)."""
    float_weights = quant.weight_type is NumberType.FLOAT
    if isinstance(result, FloatResult) and float_weights:
        scale = result.scale.reshape(1) if quant.layout is WeightLayout.TENSOR else result.scale
        tensors = {f"{module}.weight": result.values, f"{module}.weight_scale": scale.to(scale_dtype)}
        if result.input_scale is not None:
            tensors[f"{module}.input_scale"] = result.input_scale.reshape(1).to(scale_dtype)
        return tensors
    if isinstance(result, QuantResult) and not float_weights:
        half = 2 ** (result.bits - 1)
        require((result.zero == half).all(), f"{module}: a symmetric scheme needs every zero point at {half}", checks)
        signed = (result.codes.to(torch.int16) - half).to(torch.int8)
        return {f"{module}.weight": signed, f"{module}.weight_scale": result.scale.to(scale_dtype)}
    raise ArtifactError(f"{module}: a {type(result).__name__} is not the scheme's {quant.weight_type.value} weights")


def decode_linear(module: str, tensors: dict[str, Tensor], *, quant: QuantConfig) -> WeightResult:
    """Inverse of `encode_linear` (replaying a staged block; format checks)."""
    weight = tensors[f"{module}.weight"]
    scale = tensors[f"{module}.weight_scale"].to(torch.float32)
    if weight.dtype == torch.float8_e4m3fn:
        input_scale = tensors.get(f"{module}.input_scale")
        return FloatResult(values=weight, scale=scale.reshape(1, 1) if scale.dim() == 1 else scale,
                           block=FP8_BLOCK_SHAPE if quant.layout is WeightLayout.BLOCK else None,
                           input_scale=None if input_scale is None else input_scale.to(torch.float32).reshape(()))
    if weight.dtype != torch.int8:
        raise ArtifactError(f"{module}.weight: {weight.dtype} is neither int8 nor float8_e4m3fn")
    half = 2 ** (quant.bits - 1)
    return QuantResult(codes=(weight.to(torch.int16) + half).to(torch.uint8), scale=scale,
                       zero=torch.full(scale.shape, half, dtype=torch.uint8), bits=quant.bits, group_size=None)
