"""`QuantResult`: the integer codes and grid of one quantized weight matrix, and how to dequantize them.

Codes are unsigned (0 .. 2**bits - 1) in the weight's original column order; formats shift them to the
signed convention they store. Scales are float32 values that are exact in the storage dtype, so the
dequantized weights we propagate equal what an engine reconstructs from the artifact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from wq_ops.kernels.quant_pack.reference import dequantize_codes, expand_groups

__all__ = ["QuantResult", "dequantize", "expand_groups"]


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


def dequantize(result: QuantResult, dtype: torch.dtype = torch.float32) -> Tensor:
    """(codes - zero) * scale, as (out, in) `dtype`. Computed in float32, then cast once, so a bf16
    result equals the engine's bf16 product of the stored bf16 scale and the small integer (q - z)."""
    return dequantize_codes(result.codes, result.scale.to(torch.float32), result.zero).to(dtype)
