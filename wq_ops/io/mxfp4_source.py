"""Checkpoints released with MXFP4 experts (gpt-oss: `quantization_config` {"quant_method": "mxfp4",
"modules_to_not_convert": [...]}): each layer's fused experts store `X_blocks` (FP4 E2M1 codes, two a byte) and
`X_scales` (one E8M0 exponent per 32 inputs) in place of `X`; every module named in `modules_to_not_convert` is
stored in bf16. wq reads the experts dequantized, as each block loads; the artifact does not need the MXFP4 source.
Entry points: `mxfp4_modules_to_not_convert` (from config.json), `dequantize_mxfp4`."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from wq_ops.errors import CheckpointError

__all__ = ["MXFP4_SUFFIXES", "MXFP4_GROUP_SIZE", "mxfp4_modules_to_not_convert", "dequantize_mxfp4"]

MXFP4_SUFFIXES = ("_blocks", "_scales")   # `...experts.gate_up_proj` -> `..._blocks`, `..._scales`
MXFP4_GROUP_SIZE = 32                     # inputs sharing one E8M0 scale: 16 bytes of blocks

# E2M1 (OCP MX v1.0, section 5.3.3): bit 3 the sign, bits 2-1 the exponent (bias 1), bit 0 the mantissa; exponent
# 0 is subnormal (0 or 0.5). The same table as transformers' and gpt-oss's FP4_VALUES.
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_E8M0_NAN = 0xFF                          # OCP MX v1.0: the one E8M0 encoding that is not a power of two


def mxfp4_modules_to_not_convert(config: Mapping[str, Any]) -> tuple[str, ...] | None:
    """For an MXFP4 checkpoint's config.json, the modules stored unquantized (`modules_to_not_convert`, patterns
    such as "model.layers.*.self_attn"; empty if the key is absent); None for a checkpoint not in MXFP4
    (unquantized, or quantized otherwise: `fp8_block_size` decides about those, and refuses "mxfp4" itself)."""
    quantization = config.get("quantization_config")
    if not quantization or quantization.get("quant_method") != "mxfp4":
        return None
    modules = quantization.get("modules_to_not_convert") or []
    if not (isinstance(modules, list) and all(isinstance(m, str) for m in modules)):
        raise CheckpointError(f"config.json: quantization_config.modules_to_not_convert={modules!r}: expected a "
                              "list of module names; fix the checkpoint's config.json")
    return tuple(modules)


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """blocks: (experts, out, in / 32, 16) uint8; scales: (experts, out, in / 32) uint8. Returns (experts, out, in)
    `dtype`: the weight as `nn.Linear` stores it (out x in), each value computed exactly in float32 and rounded
    once to `dtype` (to nearest; to a subnormal or a signed zero below its range).

    Layout, as transformers (integrations/mxfp4.py, `_convert_moe_packed_tensors`) and gpt-oss
    (gpt_oss/torch/weights.py, `Checkpoint._get_mxfp4_tensor`) read it:
    - byte j of group g in row r holds input 32 g + 2 j in its low nibble and input 32 g + 2 j + 1 in its high one;
    - a nibble is an E2M1 code (`_E2M1_VALUES`), a scale byte s the factor 2**(s - 127) of its 32 inputs.
    transformers returns the transpose, (experts, in, out), the layout of `GptOssExperts.gate_up_proj` (experts,
    hidden, 2 * intermediate) and `down_proj`; gpt-oss keeps (experts, out, in), as here. Of gate_up_proj's
    2 * intermediate rows, the even ones are the gate and the odd ones the up projection (interleaved, not halves:
    `GptOssExperts._apply_gate`).

    Scale 0xFF (NaN in E8M0) is refused before any work, and so is a value beyond the range of `dtype`. An E2M1
    value has at most two significant bits, so its product with 2**(s - 127) is exact in float32 from 2**-128 (a
    subnormal of float32 and bfloat16 alike) up to 1.5 * 2**127; from 2**128 on (s = 254 with |code| >= 2, s = 253
    with |code| >= 4) no float32 or bfloat16 holds it, and float16 tops out at 65504."""
    if blocks.dtype != torch.uint8 or blocks.dim() != 4 or blocks.shape[-1] != MXFP4_GROUP_SIZE // 2:
        raise CheckpointError(f"MXFP4 blocks of shape {tuple(blocks.shape)} ({blocks.dtype}): expected uint8 "
                              f"(experts, out, in / {MXFP4_GROUP_SIZE}, {MXFP4_GROUP_SIZE // 2})")
    experts, rows, groups, _ = blocks.shape
    if scales.dtype != torch.uint8 or tuple(scales.shape) != (experts, rows, groups):
        raise CheckpointError(f"MXFP4 blocks of shape {tuple(blocks.shape)} need uint8 scales of shape "
                              f"{(experts, rows, groups)}; got {tuple(scales.shape)} ({scales.dtype})")
    nan = scales == _E8M0_NAN
    if bool(nan.any()):
        e, r, g = (int(i) for i in nan.nonzero()[0])
        raise CheckpointError(f"MXFP4 scales: {int(nan.sum())} bytes are 0xFF (NaN in E8M0), the first at expert "
                              f"{e}, row {r}, group {g}; the checkpoint is corrupt: download it again")
    table = torch.tensor(_E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    out = torch.empty(experts, rows, groups * MXFP4_GROUP_SIZE, dtype=dtype, device=blocks.device)
    for e in range(experts):             # one expert in float32 at a time: memory grows with one expert
        codes = torch.stack((blocks[e] & 0x0F, blocks[e] >> 4), dim=-1)            # (out, groups, 16, 2)
        values = table[codes.long()].reshape(rows, groups, MXFP4_GROUP_SIZE)       # (out, groups, 32)
        # An E8M0 byte s is float32's biased exponent field (bias 127 in both), so s << 23 is the bit pattern of
        # 2**(s - 127), exactly, with no libm call. s = 0 would read as +0.0 there: 2**-127 is float32's
        # subnormal 1 << 22.
        exponent = scales[e].to(torch.int32)                                       # (out, groups)
        factor = torch.where(exponent == 0, 1 << 22, exponent << 23).view(torch.float32)
        out[e] = (values * factor[..., None]).reshape(rows, -1).to(dtype)          # (out, in)
        overflow = torch.isinf(out[e])
        if bool(overflow.any()):
            r, c = (int(i) for i in overflow.nonzero()[0])
            s = int(scales[e, r, c // MXFP4_GROUP_SIZE])
            raise CheckpointError(f"MXFP4 expert {e}: {int(overflow.sum())} values exceed {dtype}'s largest "
                                  f"{torch.finfo(dtype).max:.4g}, the first at row {r}, input {c} (scale byte "
                                  f"{s}: 2**{s - 127}); expected weights within range: the scales are corrupt, "
                                  "or dequantize to a wider dtype")
    return out
