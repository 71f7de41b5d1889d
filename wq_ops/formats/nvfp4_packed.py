"""compressed-tensors' `nvfp4-pack-quantized` format (NVFP4 and NVFP4A16), as vLLM and transformers read it.

Per quantized linear `L`:
- `L.weight_packed`       uint8 (out, in / 2): two 4-bit codes a byte, the even column in the low nibble; a code
  is the sign in bit 3 and the E2M1 magnitude's index (0, 0.5, 1, 1.5, 2, 3, 4, 6) in bits 0-2;
- `L.weight_scale`        float8_e4m3fn (out, in / 16): each group of 16's scale, times the global one;
- `L.weight_global_scale` float32 (1,): the global scale (shared by layers an engine fuses);
- `L.input_global_scale`  float32 (1,): NVFP4 (W4A4) only, the activations' global scale from calibration.
Dequantization: value x weight_scale / weight_global_scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wq_ops.config import QuantConfig
from wq_ops.errors import ArtifactError
from wq_ops.quant.result import Fp4Result, WeightResult

__all__ = ["encode_linear", "decode_linear", "tensor_names", "FORMAT"]

FORMAT = "nvfp4-pack-quantized"


def tensor_names(module: str, *, quant: QuantConfig) -> tuple[str, ...]:
    names = (f"{module}.weight_packed", f"{module}.weight_scale", f"{module}.weight_global_scale")
    return names + ((f"{module}.input_global_scale",) if quant.activations is not None else ())


def encode_linear(module: str, result: WeightResult, *, quant: QuantConfig) -> dict[str, Tensor]:
    """The artifact tensors of one quantized linear (module: its full name)."""
    if not isinstance(result, Fp4Result):
        raise ArtifactError(f"{module}: a {type(result).__name__} is not NVFP4 weights")
    if result.codes.shape[1] % 2:
        raise ArtifactError(f"{module}: {result.codes.shape[1]} input columns do not pack two codes a byte")
    codes = result.codes
    tensors = {f"{module}.weight_packed": (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous(),
               f"{module}.weight_scale": result.scale,
               # Fused layers share the value; each tensor is its own (safetensors refuses shared memory).
               f"{module}.weight_global_scale": result.global_scale.reshape(1).to(torch.float32).clone()}
    if quant.activations is not None:
        if result.input_global_scale is None:
            raise ArtifactError(f"{module}: NVFP4 activations need the layer's input global scale")
        tensors[f"{module}.input_global_scale"] = result.input_global_scale.reshape(1).to(torch.float32).clone()
    return tensors


def decode_linear(module: str, tensors: dict[str, Tensor], *, quant: QuantConfig) -> Fp4Result:
    """Inverse of `encode_linear` (replaying a staged block; format checks)."""
    packed = tensors[f"{module}.weight_packed"]
    if packed.dtype != torch.uint8:
        raise ArtifactError(f"{module}.weight_packed: {packed.dtype}, expected uint8")
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)
    input_global = tensors.get(f"{module}.input_global_scale")
    return Fp4Result(codes=codes, scale=tensors[f"{module}.weight_scale"],
                     global_scale=tensors[f"{module}.weight_global_scale"].to(torch.float32).reshape(()),
                     input_global_scale=None if input_global is None else input_global.to(torch.float32).reshape(()))
