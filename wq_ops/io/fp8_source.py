"""Checkpoints released in FP8 with block scales (DeepSeek-V3/R1: `quantization_config` {"quant_method": "fp8",
"weight_block_size": [128, 128]}): each such linear stores `weight` in float8_e4m3fn and `weight_scale_inv`, one
float32 factor per block of 128 x 128 weights, and the dequantized weight is their product. wq reads them
dequantized, as each block loads; the artifact does not need the FP8 source. Entry points:
`fp8_block_size` (from config.json), `dequantize_fp8_blocks`."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from wq_ops.errors import CheckpointError

__all__ = ["SCALE_SUFFIX", "fp8_block_size", "dequantize_fp8_blocks"]

SCALE_SUFFIX = "_scale_inv"          # `X.weight` -> `X.weight_scale_inv`


def fp8_block_size(config: Mapping[str, Any]) -> tuple[int, int] | None:
    """The block size of an FP8 block-scaled checkpoint's config.json; None for a checkpoint stored otherwise
    unquantized. Any other quantized source is refused: wq quantizes original weights."""
    quantization = config.get("quantization_config")
    if not quantization:
        return None
    method = quantization.get("quant_method")
    block = quantization.get("weight_block_size")
    if method != "fp8" or not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0
                                                                                   for b in block)):
        raise CheckpointError(f"config.json: already quantized ({method}"
                              + (f", weight_block_size={block}" if block is not None else "") + "); wq reads "
                              "unquantized checkpoints and FP8 ones with block scales (weight_block_size [r, c]); "
                              "give the original weights")
    return int(block[0]), int(block[1])


def dequantize_fp8_blocks(weight: Tensor, scale_inv: Tensor, block: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """weight: (out, in) float8_e4m3fn; scale_inv: (ceil(out / r), ceil(in / c)) float32, block (r, c). Returns
    weight * scale (each block's factor), computed in float32 and rounded once to `dtype`. Fused experts
    (transformers 5's FP8 experts: (experts, out, in) with (experts, ...) scales) go expert by expert."""
    if weight.dim() == 3 and scale_inv.dim() == 3 and len(weight) == len(scale_inv):
        return torch.stack([dequantize_fp8_blocks(w, s, block, dtype) for w, s in zip(weight, scale_inv)])
    if weight.dim() != 2:
        raise CheckpointError(f"an FP8 weight of shape {tuple(weight.shape)}: expected a matrix, or experts' "
                              f"matrices with a scale each (scales of shape {tuple(scale_inv.shape)})")
    rows, cols = weight.shape
    r, c = block
    want = (-(-rows // r), -(-cols // c))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(f"an FP8 weight of shape {(rows, cols)} with {r}x{c} blocks needs a {want} "
                              f"weight_scale_inv; got {tuple(scale_inv.shape)}")
    scale = scale_inv.to(torch.float32).repeat_interleave(r, dim=0)[:rows].repeat_interleave(c, dim=1)[:, :cols]
    return (weight.to(torch.float32) * scale).to(dtype)
