"""`QuantResult`: the integer codes and grid of one quantized weight matrix; `FloatResult`: its FP8 values
and scales; and how to dequantize either (`WeightResult`).

Codes are unsigned (0 .. 2**bits - 1) in the weight's original column order; formats shift them to the
signed convention they store. Scales are float32 values that are exact in the storage dtype, so the
dequantized weights we propagate equal what an engine reconstructs from the artifact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from wq_ops.kernels.quant_pack.reference import dequantize_codes, expand_groups

__all__ = ["QuantResult", "FloatResult", "WeightResult", "dequantize", "expand_groups", "expand_blocks"]


@dataclass(frozen=True)
class QuantResult:
    """codes: (out, in) uint8; scale: (out, n_groups) float32; zero: (out, n_groups) uint8. Groups are
    always contiguous runs of `group_size` columns (static groups, also under act-order), so no g_idx.
    row_loss: (out,) the method's own proxy loss per row, on the device (None for RTN); damp_frac: the
    damping GPTQ ended up using."""

    codes: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    group_size: int | None
    row_loss: Tensor | None = None
    damp_frac: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def loss(self) -> float | None:
        """Total proxy loss (reads it back from the device)."""
        return None if self.row_loss is None else float(self.row_loss.sum())

    def split_rows(self, sizes: list[int]) -> list["QuantResult"]:
        """Cut a result over stacked layers (rows of several weights solved together) back into one
        result per layer, in order."""
        cuts = [0]
        for n in sizes:
            cuts.append(cuts[-1] + n)
        return [QuantResult(codes=self.codes[a:b], scale=self.scale[a:b], zero=self.zero[a:b], bits=self.bits,
                            group_size=self.group_size,
                            row_loss=None if self.row_loss is None else self.row_loss[a:b],
                            damp_frac=self.damp_frac) for a, b in zip(cuts, cuts[1:])]


@dataclass(frozen=True)
class FloatResult:
    """FP8 E4M3 weights: values (out, in) float8_e4m3fn, and float32 scales exact in the storage dtype, one per
    output channel (out, 1), one for the whole tensor (1, 1), or one per block (ceil(out / bh), ceil(in / bw))
    with block = (bh, bw). The weight is values x scale. input_scale: () float32, the static scale of the
    layer's input activations (FP8 with static activations), else None."""

    values: Tensor
    scale: Tensor
    block: tuple[int, int] | None = None
    input_scale: Tensor | None = None

    bits = 8
    group_size = None
    row_loss = None
    damp_frac = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.values.shape[0]), int(self.values.shape[1]))

    @property
    def loss(self) -> None:
        return None

    def expanded_scale(self) -> Tensor:
        """(out, in) float32: each weight's scale."""
        out_features, in_features = self.shape
        if self.block is not None:
            return expand_blocks(self.scale, self.block, (out_features, in_features))
        return self.scale.expand(out_features, in_features)


WeightResult = QuantResult | FloatResult


def expand_blocks(per_block: Tensor, block: tuple[int, int], shape: tuple[int, int]) -> Tensor:
    """(ceil(out / bh), ceil(in / bw)) -> (out, in): each block's value over its rows and columns (the last
    blocks may be partial)."""
    bh, bw = block
    return per_block.repeat_interleave(bh, dim=0)[: shape[0]].repeat_interleave(bw, dim=1)[:, : shape[1]]


def dequantize(result: WeightResult, dtype: torch.dtype = torch.float32) -> Tensor:
    """(codes - zero) * scale, or FP8 values * scale, as (out, in) `dtype`. Computed in float32 (exact: the
    factors have 8 and at most 8 significant bits), then cast once, so a bf16 result equals the engine's bf16
    product of the stored bf16 scale and the small integer (q - z) or the FP8 value."""
    if isinstance(result, FloatResult):
        return (result.values.to(torch.float32) * result.expanded_scale()).to(dtype)
    return dequantize_codes(result.codes, result.scale.to(torch.float32), result.zero).to(dtype)
