"""Reference grid and packing ops, plain PyTorch (any device; float32 as the kernels compute, or
float64 for checks). The CUDA kernels (quant_pack.cu, and the shared include/wq_grid.cuh) mirror each
function here operation for operation, so their outputs are bit-identical.

Grid: asymmetric maps [min(w, 0), max(w, 0)] onto 0 .. 2**bits - 1; symmetric uses scale =
2 max|w| / (2**bits - 1) with the zero point at 2**(bits-1) (GPTQ's and compressed-tensors'
convention). Scales are rounded to the storage dtype before any code is computed.
Packing: each row is a little-endian bit stream of codes; element i occupies bits [i*bits, (i+1)*bits)
of the row's 32-bit words, so 32 codes fill exactly `bits` words and a 3-bit code may straddle two.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from wq_ops.errors import ConfigError

__all__ = ["n_groups_of", "round_scale", "grid_from_range", "quantize_codes", "dequantize_codes", "expand_groups",
           "pack_rows", "unpack_rows", "pack_columns", "unpack_columns", "packed_width", "quantize_pack",
           "unpack_dequantize"]

_MASK32 = (1 << 32) - 1


def n_groups_of(in_features: int, group_size: int | None) -> int:
    """Groups of `group_size` columns in a row of `in_features` (None: one group, the whole row)."""
    if group_size is None:
        return 1
    if in_features % group_size:
        raise ConfigError(f"in_features={in_features} is not a multiple of group_size={group_size}")
    return in_features // group_size


def round_scale(scale: Tensor, scale_dtype: torch.dtype, *, up: bool = False) -> Tensor:
    """Round to a value the artifact stores, so codes are chosen on the grid the engine uses. Never zero:
    a scale that underflows the storage dtype becomes its smallest normal value.

    Nearest by default: an upward bias widens every step (on SmolLM2 w4g64, rounding up cost RTN 2.7%
    and AWQ 3% in perplexity), at the price that an extreme weight may sit up to (2**bits - 1) x half an
    ulp of the scale beyond the last code and be clipped. `up`: the smallest stored value >= scale, so
    the grid covers the whole range. GPTQ wants that: a clipped extreme becomes an error that its update
    spreads over the columns after it (rounding to nearest cost GPTQ 5% at w4g64 and 53% at w3g64)."""
    stored = scale.clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype)
    if up:
        below = stored.to(scale.dtype) < scale
        stored = torch.where(below, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)
    return stored.to(scale.dtype)


def grid_from_range(wmin: Tensor, wmax: Tensor, *, bits: int, sym: bool, scale_dtype: torch.dtype,
                    clip: Tensor | None = None, round_up: bool = False) -> tuple[Tensor, Tensor]:
    """Scale and zero of groups with minimum wmin and maximum wmax (any matching shapes). clip: optional
    factor in (0, 1]: weights are first clipped to +-clip * max|w| (AWQ's clipping). Returns (scale in
    wmin's dtype, zero uint8)."""
    wmin = wmin.clamp(max=0.0)
    wmax = wmax.clamp(min=0.0)
    if clip is not None:
        limit = torch.maximum(-wmin, wmax) * clip
        wmin, wmax = torch.maximum(wmin, -limit), torch.minimum(wmax, limit)
    maxq = 2**bits - 1
    # A tensor divisor, not the Python int: torch's CUDA division by a scalar multiplies by its reciprocal,
    # which differs from IEEE division in the last bit; the kernels (and torch on CPU) divide.
    levels = torch.full_like(wmax, maxq)
    if sym:
        amax = torch.maximum(-wmin, wmax)
        scale = round_scale(torch.where(amax > 0, 2.0 * amax / levels, torch.ones_like(amax)), scale_dtype,
                            up=round_up)
        return scale, torch.full_like(scale, 2 ** (bits - 1), dtype=torch.uint8)
    span = wmax - wmin
    scale = round_scale(torch.where(span > 0, span / levels, torch.ones_like(span)), scale_dtype, up=round_up)
    return scale, torch.clamp(torch.round(-wmin / scale), 0, maxq).to(torch.uint8)


def expand_groups(per_group: Tensor, in_features: int) -> Tensor:
    """(out, n_groups) -> (out, in_features): each group's value repeated over its columns."""
    return per_group.repeat_interleave(in_features // per_group.shape[1], dim=1)


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, *, bits: int) -> Tensor:
    """clamp(round(w / s) + z, 0, 2**bits - 1) as uint8. w: (out, in); scale, zero: (out, n_groups) or
    (out, in). torch.round rounds half to even, like CUDA's rintf."""
    in_features = w.shape[1]
    s = scale if scale.shape[1] == in_features else expand_groups(scale, in_features)
    z = zero if zero.shape[1] == in_features else expand_groups(zero, in_features)
    return torch.clamp(torch.round(w / s) + z.to(w.dtype), 0, 2**bits - 1).to(torch.uint8)


def dequantize_codes(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """(codes - zero) * scale in scale's dtype. codes: (out, in); scale, zero: (out, n_groups)."""
    in_features = codes.shape[1]
    zeros = expand_groups(zero, in_features).to(scale.dtype)
    return (codes.to(scale.dtype) - zeros) * expand_groups(scale, in_features)


def packed_width(cols: int, bits: int) -> int:
    """Words per packed row."""
    return math.ceil(cols * bits / 32)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}: expected 1..8")


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """codes: (rows, cols) integers in [0, 2**bits - 1] -> (rows, packed_width) int32 (bit patterns; the
    sign bit is just bit 31)."""
    _check_bits(bits)
    rows, cols = codes.shape
    v = codes.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] to pack at {bits} bits")
    n_chunks = math.ceil(cols / 32)
    v = torch.nn.functional.pad(v, (0, n_chunks * 32 - cols)).reshape(rows, n_chunks, 32)
    words = torch.zeros(rows, n_chunks, bits, dtype=torch.int64, device=codes.device)   # 32 codes -> `bits` words
    for p in range(32):
        word, offset = divmod(p * bits, 32)
        words[:, :, word] |= (v[:, :, p] << offset) & _MASK32
        if offset + bits > 32:                      # straddles into the next word
            words[:, :, word + 1] |= v[:, :, p] >> (32 - offset)
    words = words.reshape(rows, n_chunks * bits)[:, :packed_width(cols, bits)]
    # Reinterpret the unsigned 32-bit patterns as int32 (two's complement).
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_rows(packed: Tensor, bits: int, cols: int) -> Tensor:
    """Inverse of `pack_rows`: packed (rows, words) int32 -> (rows, cols) uint8."""
    _check_bits(bits)
    rows, n_words = packed.shape
    if n_words != packed_width(cols, bits):
        raise ValueError(f"{n_words} words per row cannot hold {cols} values of {bits} bits "
                         f"(expected {packed_width(cols, bits)})")
    n_chunks = math.ceil(cols / 32)
    words = packed.to(torch.int64) & _MASK32
    words = torch.nn.functional.pad(words, (0, n_chunks * bits - n_words)).reshape(rows, n_chunks, bits)
    out = torch.empty(rows, n_chunks, 32, dtype=torch.int64, device=packed.device)
    low_mask = (1 << bits) - 1
    for p in range(32):
        word, offset = divmod(p * bits, 32)
        value = words[:, :, word] >> offset
        if offset + bits > 32:
            value = value | (words[:, :, word + 1] << (32 - offset))
        out[:, :, p] = value & low_mask
    return out.reshape(rows, n_chunks * 32)[:, :cols].to(torch.uint8)


def pack_columns(codes: Tensor, bits: int) -> Tensor:
    """Pack along dim 0 (GPTQ's qweight packs each output column's input codes this way): each column is a
    little-endian bit stream, element i at bits [i*bits, (i+1)*bits) of the column's 32-bit words.
    codes: (rows, cols) integers in [0, 2**bits - 1] -> (packed_width(rows), cols) int32."""
    return pack_rows(codes.T, bits).T.contiguous()


def unpack_columns(packed: Tensor, bits: int, rows: int) -> Tensor:
    """Inverse of `pack_columns`: packed (words, cols) int32 -> (rows, cols) uint8."""
    return unpack_rows(packed.T.contiguous(), bits, rows).T.contiguous()


def quantize_pack(w: Tensor, scale: Tensor, zero: Tensor, *, bits: int) -> Tensor:
    """Codes of w: (rows, cols) on the grid (scale float32, zero uint8: (rows, n_groups)), packed."""
    return pack_rows(quantize_codes(w.to(torch.float32), scale, zero, bits=bits), bits)


def unpack_dequantize(packed: Tensor, scale: Tensor, zero: Tensor, *, bits: int, cols: int) -> Tensor:
    """Packed codes back to (rows, cols) bfloat16 weights: (q - z) * s in float32, then rounded once."""
    return dequantize_codes(unpack_rows(packed, bits, cols), scale.to(torch.float32), zero).to(torch.bfloat16)
