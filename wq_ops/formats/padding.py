"""Zero padding of a quantized linear (--tp-policy pad): new output rows or input columns that dequantize to
exactly 0, so the padded model computes what the unpadded one does. Pure functions on a `QuantResult`; the
padding is made on the result's own device."""

from __future__ import annotations

import torch

from wq_ops.quant.result import QuantResult

__all__ = ["pad_output_rows", "pad_input_columns"]


def _pad_value(result: QuantResult) -> int:
    # The symmetric zero point: valid in every format (GPTQ v1 cannot store 0), and code == zero gives 0.
    return 2 ** (result.bits - 1)


def pad_output_rows(result: QuantResult, extra: int) -> QuantResult:
    """`extra` new output rows that dequantize to exactly 0 (codes = zero = 2**(bits-1), scale 1.0).
    Returns a new result of shape (out + extra, in); `result` is not modified."""
    if extra < 0:
        raise ValueError(f"extra={extra}: expected >= 0")
    out_features, in_features = result.shape
    n_groups = result.scale.shape[1]
    z = _pad_value(result)
    return QuantResult(
        codes=torch.cat([result.codes, result.codes.new_full((extra, in_features), z)]),
        scale=torch.cat([result.scale, result.scale.new_ones(extra, n_groups)]),
        zero=torch.cat([result.zero, result.zero.new_full((extra, n_groups), z)]),
        bits=result.bits, group_size=result.group_size,
        row_loss=None if result.row_loss is None else torch.cat([result.row_loss, result.row_loss.new_zeros(extra)]),
        damp_frac=result.damp_frac)


def pad_input_columns(result: QuantResult, extra: int) -> QuantResult:
    """`extra` new input columns that dequantize to exactly 0, so they add nothing to any output whatever
    the activations there. Grouped: `extra` must be whole groups (new groups with scale 1.0, zero
    2**(bits-1)); per-channel: the columns join the row's one group with codes equal to its zero point."""
    if extra < 0:
        raise ValueError(f"extra={extra}: expected >= 0")
    out_features, in_features = result.shape
    if result.group_size is None:
        codes = result.zero.to(result.codes.dtype).expand(out_features, extra)
        return QuantResult(codes=torch.cat([result.codes, codes], dim=1), scale=result.scale, zero=result.zero,
                           bits=result.bits, group_size=None, row_loss=result.row_loss, damp_frac=result.damp_frac)
    if extra % result.group_size:
        raise ValueError(f"extra={extra} is not a whole number of groups of {result.group_size}")
    z = _pad_value(result)
    new_groups = extra // result.group_size
    return QuantResult(
        codes=torch.cat([result.codes, result.codes.new_full((out_features, extra), z)], dim=1),
        scale=torch.cat([result.scale, result.scale.new_ones(out_features, new_groups)], dim=1),
        zero=torch.cat([result.zero, result.zero.new_full((out_features, new_groups), z)], dim=1),
        bits=result.bits, group_size=result.group_size, row_loss=result.row_loss, damp_frac=result.damp_frac)
