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

__all__ = ["QuantResult", "FloatResult", "Fp4Result", "WeightResult", "dequantize", "expand_groups", "expand_blocks",
           "FP4_VALUES", "fp4_values"]


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


class _RoundedToNearest:
    """What the records ask of a result no solver produced (FP8, NVFP4): no proxy loss, no damping."""

    row_loss = None
    damp_frac = None

    @property
    def loss(self) -> None:
        return None


@dataclass(frozen=True)
class FloatResult(_RoundedToNearest):
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

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.values.shape[0]), int(self.values.shape[1]))

    def expanded_scale(self) -> Tensor:
        """(out, in) float32: each weight's scale."""
        out_features, in_features = self.shape
        if self.block is not None:
            return expand_blocks(self.scale, self.block, (out_features, in_features))
        return self.scale.expand(out_features, in_features)


@dataclass(frozen=True)
class Fp4Result(_RoundedToNearest):
    """NVFP4 weights: codes (out, in) uint8 in 0..15 (sign bit 3, E2M1 magnitude index bits 0-2), scale
    (out, in / 16) float8_e4m3fn per group of 16, global_scale () float32; weight = value x scale / global.
    input_global_scale: () float32, the static global scale of the layer's input activations (NVFP4 W4A4)."""

    codes: Tensor
    scale: Tensor
    global_scale: Tensor
    input_global_scale: Tensor | None = None

    bits = 4
    group_size = 16

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))


WeightResult = QuantResult | FloatResult | Fp4Result

# FP4 E2M1's magnitudes, by the index a code holds in its low 3 bits.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def fp4_values(codes: Tensor) -> Tensor:
    """uint8 codes (sign bit 3, magnitude index bits 0-2) -> float32 E2M1 values."""
    table = torch.tensor(FP4_VALUES, dtype=torch.float32, device=codes.device)
    magnitude = table[(codes & 7).long()]
    return torch.where((codes & 8) > 0, -magnitude, magnitude)


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
    if isinstance(result, Fp4Result):
        values = fp4_values(result.codes)
        effective = result.scale.to(torch.float32) / result.global_scale.to(torch.float32)
        return (values * expand_groups(effective, values.shape[1])).to(dtype)
    return dequantize_codes(result.codes, result.scale.to(torch.float32), result.zero).to(dtype)
