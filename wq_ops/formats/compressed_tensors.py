"""compressed-tensors' `quantization_config` for every scheme, and its `pack-quantized` format (integer
weight-only schemes), as vLLM, transformers and llm-compressor read them. The formats of W8A8 and FP8
(`int-quantized`, `float-quantized`) are `naive_quantized`'s.

Per quantized linear `L` (spec: compressed-tensors' PackedQuantizationCompressor):
- `L.weight_packed`  int32 (out, ceil(in * bits / 32)): each row a little-endian bit stream of codes
  q_s + 2**(bits-1), q_s the signed code in [-2**(bits-1), 2**(bits-1) - 1];
- `L.weight_scale`   model dtype (out, n_groups);
- `L.weight_zero_point` (asymmetric only) int32 (ceil(out * bits / 32), n_groups): signed zero points,
  offset and packed the same way but along the output dim;
- `L.weight_shape`   int64 [out, in].
Dequantization: (q_s - z_s) * scale, which equals our (q - z) * scale since both are offset by 2**(bits-1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from wq_ops.config import Backend, QuantConfig
from wq_ops.config.schemes import FP8_BLOCK_SHAPE, NVFP4_GROUP, NumberType, WeightLayout
from wq_ops.formats.checks import Checks, require
from wq_ops.pack import pack_rows, unpack_rows
from wq_ops.quant.result import QuantResult

__all__ = ["encode_linear", "decode_linear", "quantization_config", "side_files", "tensor_names", "format_name"]

FORMAT = "pack-quantized"
# The compressed-tensors release whose writer (ModelCompressor.update_config) emits the fields below; it
# writes its own version as `version`. tests/formats checks ours against the installed writer's, field by field.
WRITER_VERSION = "0.20.1"


def format_name(quant: QuantConfig) -> str:
    """config.json's `format` for the job's scheme (what compressed-tensors' writer infers for it)."""
    if quant.layout is WeightLayout.TENSOR_GROUP:
        return "nvfp4-pack-quantized"
    if quant.weight_type is NumberType.FLOAT:
        return "float-quantized"
    return "int-quantized" if quant.activations is not None else FORMAT


def tensor_names(module: str, *, sym: bool) -> tuple[str, ...]:
    names = (f"{module}.weight_packed", f"{module}.weight_scale", f"{module}.weight_shape")
    return names if sym else names + (f"{module}.weight_zero_point",)


def encode_linear(module: str, result: QuantResult, *, sym: bool, scale_dtype: torch.dtype,
                  backend: Backend = Backend.REFERENCE, checks: Checks | None = None) -> dict[str, Tensor]:
    """The pack-quantized tensors of one quantized linear. module: its full name ("model.layers.0.mlp.up_proj").
    backend: what packs the codes (the same bytes either way; CUDA needs them on the GPU). checks: where
    the conditions on the result are queued rather than read back at once (see `checks`)."""
    out_features, in_features = result.shape
    tensors = {
        f"{module}.weight_packed": pack_rows(result.codes, result.bits, backend=backend),
        f"{module}.weight_scale": result.scale.to(scale_dtype),
        f"{module}.weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if not sym:
        # Packed along the output dim, each group a bit stream (on the GPU too: the reference packer's
        # range check and 32 small kernels made the GPU wait 17 ms per 1B AWQ block).
        tensors[f"{module}.weight_zero_point"] = pack_rows(result.zero.T.contiguous(), result.bits,
                                                           backend=backend).T.contiguous()
    else:
        require((result.zero == 2 ** (result.bits - 1)).all(),
                f"{module}: a symmetric scheme needs every zero point at {2 ** (result.bits - 1)}", checks)
    return tensors


def decode_linear(module: str, tensors: dict[str, Tensor], *, bits: int, group_size: int | None) -> QuantResult:
    """Inverse of `encode_linear` (for tests and format checks)."""
    out_features, in_features = (int(x) for x in tensors[f"{module}.weight_shape"])
    codes = unpack_rows(tensors[f"{module}.weight_packed"], bits, in_features)
    scale = tensors[f"{module}.weight_scale"].to(torch.float32)
    zp = tensors.get(f"{module}.weight_zero_point")
    if zp is None:
        zero = torch.full(scale.shape, 2 ** (bits - 1), dtype=torch.uint8)
    else:
        zero = unpack_rows(zp.T.contiguous(), bits, out_features).T.contiguous()
    return QuantResult(codes=codes, scale=scale, zero=zero, bits=bits, group_size=group_size)


def quantization_config(quant: QuantConfig, *, ignore: list[str]) -> dict[str, Any]:
    """config.json's `quantization_config`. ignore: full names of every Linear left unquantized (lm_head
    included even when tied: engines apply the scheme to every Linear not listed here)."""
    weights: dict[str, Any] = {
        "num_bits": quant.bits,
        "type": quant.weight_type.value,
        "symmetric": quant.sym,
        "group_size": quant.group_size,
        "strategy": "group" if quant.group_size is not None else "channel",
        "dynamic": False,
    }
    if quant.layout is WeightLayout.TENSOR:
        weights["strategy"] = "tensor"
    elif quant.layout is WeightLayout.TENSOR_GROUP:
        weights.update(strategy="tensor_group", group_size=NVFP4_GROUP, scale_dtype="torch.float8_e4m3fn")
    elif quant.layout is WeightLayout.BLOCK:
        weights.update(strategy="block", block_structure=list(FP8_BLOCK_SHAPE))
    if quant.act_order or format_name(quant) == FORMAT:
        # Static groups: act-order changes the solve, not the layout, so no g_idx is stored. (pack-quantized
        # artifacts have always said null when off; the writer leaves it out, as the newer formats do.)
        weights["actorder"] = "weight" if quant.act_order else None
    activations = None if quant.activations is None else quant.activations.to_args()
    return {
        "version": WRITER_VERSION,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations,
                                      "output_activations": None, "format": None}},
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": None,
        "format": format_name(quant),
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": sorted(ignore),
        # Empty as the writer leaves them: no sparsity, no transforms (rotations), no per-expert sparsity.
        "sparsity_config": {},
        "transform_config": {},
        "moe_sparsity_config": None,
    }


def side_files(quant: QuantConfig, *, ignore: list[str]) -> dict[str, dict[str, Any]]:
    """Files beside config.json: none (its readers take everything from config.json's quantization_config)."""
    return {}
