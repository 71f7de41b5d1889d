"""bitsandbytes' 4-bit weights (NF4 and FP4), as `quantize_4bit` computes them on the CPU: the weight flattened in
row-major order, cut into blocks of 64, each block divided by its largest magnitude (absmax) and rounded to the
nearest of 16 values in [-1, 1]. Double quantization stores the absmax themselves in 8 bits: minus their mean,
in blocks of 256, on bitsandbytes' signed dynamic map. No calibration. Formats: `wq_ops.formats.bitsandbytes`.

Bit-exact with bitsandbytes 0.50.2 on the CPU (its torch `quantize_4bit` kernel and its C 8-bit blockwise kernel);
its CUDA kernels round differently in the last bit. References: QLoRA (arXiv:2305.14314), NF4 and double
quantization; 8-bit optimizers (arXiv:2110.02861), the dynamic map.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from wq_ops.quant.result import _RoundedToNearest

__all__ = ["Bnb4Type", "Bnb4Result", "NestedAbsmax", "BLOCKSIZE", "NESTED_BLOCKSIZE", "NF4_VALUES", "FP4_VALUES",
           "code_table", "dynamic_map", "quantize_bnb4", "dequantize_bnb4", "nested_absmax_values", "pack_bnb4",
           "unpack_bnb4"]


class Bnb4Type(str, Enum):
    NF4 = "nf4"
    FP4 = "fp4"


BLOCKSIZE = 64              # Linear4bit's and transformers' default (BitsAndBytesConfig has no option for it)
NESTED_BLOCKSIZE = 256      # double quantization's block, fixed in bitsandbytes' quantize_4bit

# NF4: quantiles of N(0, 1) scaled to [-1, 1] (QLoRA's NormalFloat), as float32, by code 0..15.
NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
# FP4 (1 sign bit 3, then 2 exponent and 1 mantissa bits with bitsandbytes' bias): magnitudes by bits 0-2,
# before dividing by the largest, 12. Not E2M1's order (NVFP4's): 0b010 is 8 here. Code 8 ("-0") is +0.0.
FP4_VALUES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)


def code_table(quant_type: Bnb4Type, device: torch.device | str = "cpu") -> Tensor:
    """(16,) float32: the value of each 4-bit code, in [-1, 1] (what the checkpoint stores as `quant_map`)."""
    if quant_type is Bnb4Type.NF4:
        return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)
    magnitudes = torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)
    # Signed zero is stored +0.0, as bitsandbytes' table (an integer -0) holds it.
    table = torch.cat([magnitudes, torch.where(magnitudes > 0, -magnitudes, magnitudes)])
    return table / torch.tensor(12.0, dtype=torch.float32, device=device)


def dynamic_map(device: torch.device | str = "cpu") -> Tensor:
    """(256,) float32, ascending: bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`). For each
    decade 10**(i-6), i = 0..6, the 2**i midpoints of a float32 linspace(0.1, 1, 2**i + 1) times it, with
    both signs; then 0 and 1. float32 throughout, as bitsandbytes computes it, so it matches to the bit."""
    values = [torch.zeros(1, dtype=torch.float32), torch.ones(1, dtype=torch.float32)]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2 ** i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        decade = means * (10.0 ** (i - 6))                # a Python scalar: torch multiplies in float32
        values += [decade, -decade]
    return torch.cat(values).sort().values.to(device)


@dataclass(frozen=True)
class NestedAbsmax:
    """Double quantization of the 4-bit absmax: codes (n_blocks,) uint8, indices into `dynamic_map()`;
    absmax (ceil(n_blocks / 256),) float32, the largest |absmax - offset| of each block of 256; offset ()
    float32, the mean of the absmax. A reader's absmax: dynamic_map[codes] x absmax[block] + offset."""

    codes: Tensor
    absmax: Tensor
    offset: Tensor


@dataclass(frozen=True)
class Bnb4Result(_RoundedToNearest):
    """codes (out, in) uint8 in 0..15, indices into `code_table(quant_type)`; absmax (n_blocks,) float32, the
    scale of each block of `blocksize` consecutive weights in row-major order (a block runs on into the next row
    when in % blocksize != 0; the last one may be short), as a reader reconstructs it (through `nested` under
    double quantization). weight = code_table[codes] x absmax[block]."""

    codes: Tensor
    absmax: Tensor
    quant_type: Bnb4Type
    blocksize: int = BLOCKSIZE
    nested: NestedAbsmax | None = None

    bits = 4

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def group_size(self) -> int:
        return self.blocksize


def _sorted_codes(table: Tensor) -> tuple[Tensor, Tensor]:
    """The midpoints between consecutive values of a table, ascending ((len - 1,) float32), and the code of each
    ascending position. FP4's two zeros sort by code (0, then 8): a value in (0, 1/384] gets code 8."""
    values, order = torch.sort(table, stable=True)
    return (values[:-1] + values[1:]) / 2, order


def _block_absmax_and_scaled(flat: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """flat (n,) float32 -> absmax (n_blocks,) float32 and flat / absmax clamped to [-1, 1] (n,) float32, with
    bitsandbytes' CPU arithmetic: whole blocks multiply by the absmax's reciprocal, the short last block divides
    by its absmax (one last-bit difference can move a value across a midpoint). A zero absmax is replaced by
    1e-38 (a float32 subnormal) as divisor; the short block also stores that, a whole block stores its 0."""
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].reshape(-1, blocksize)                                   # (full / blocksize, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = (body * torch.reciprocal(absmax.clamp(min=1e-38))[:, None]).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.reshape(1)])
        scaled = torch.cat([scaled, flat[full:] / tail_absmax])
    return absmax, scaled.clamp(-1.0, 1.0)


def _quantize_nested(absmax: Tensor) -> NestedAbsmax:
    """absmax (n_blocks,) float32 -> its 8-bit blockwise quantization, as bitsandbytes' C kernel on the CPU does
    it: each value over its block's largest magnitude, then through a 65536-entry lookup table over [-1, 1], so the
    code is the one nearest to the table's grid point, not always the nearest to the value."""
    offset = absmax.mean()
    centered = absmax - offset                                                  # (n_blocks,)
    n = centered.numel()
    n_nested = -(-n // NESTED_BLOCKSIZE)
    padded = torch.nn.functional.pad(centered, (0, n_nested * NESTED_BLOCKSIZE - n))   # zeros leave each max as is
    nested_absmax = padded.reshape(n_nested, NESTED_BLOCKSIZE).abs().amax(dim=1)        # (n_nested,)
    block_absmax = nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[:n]          # (n_blocks,)
    normalized = (centered * torch.reciprocal(block_absmax)).clamp(-1.0, 1.0)
    # The grid index trunc((v + 1) * 0.5 * 65535 + 0.5). The kernel's last step is one fused multiply-add
    # (vfmadd213ss in libbitsandbytes_cpu.so), one rounding: in float64 the product and the sum are exact (a
    # float32 times a 16-bit integer, plus 0.5, a multiple of its last bit), so one cast to float32 is it.
    half = (normalized + 1.0) * 0.5
    index = (half.to(torch.float64) * 65535.0 + 0.5).to(torch.float32).trunc()
    # A tensor divisor: torch's CUDA division by a Python scalar multiplies by its reciprocal (last-bit drift).
    grid = (2.0 * index) / torch.full_like(index, 65535.0) - 1.0                 # the table's float32 grid point
    codes = torch.bucketize(grid, _sorted_codes(dynamic_map(absmax.device))[0]).to(torch.uint8)
    codes = torch.where(block_absmax == 0, torch.zeros_like(codes), codes)     # an all-zero block stores code 0
    return NestedAbsmax(codes=codes, absmax=nested_absmax, offset=offset)


def nested_absmax_values(nested: NestedAbsmax) -> Tensor:
    """(n_blocks,) float32: the absmax a reader reconstructs, dynamic_map[codes] x absmax[block] + offset (two
    float32 roundings, as bitsandbytes dequantizes then adds)."""
    table = dynamic_map(nested.codes.device)
    scale = nested.absmax.repeat_interleave(NESTED_BLOCKSIZE)[: nested.codes.numel()]
    return table[nested.codes.long()] * scale + nested.offset


def quantize_bnb4(w: Tensor, *, quant_type: Bnb4Type, double_quant: bool, blocksize: int = BLOCKSIZE) -> Bnb4Result:
    """w: (out, in) float32, bfloat16 or float16 (math in float32). Rounds w / absmax to the nearest table value
    (a value on a midpoint goes to the lower one). double_quant: also quantize the absmax (`NestedAbsmax`)."""
    if w.dim() != 2:
        raise ValueError(f"w: expected a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"blocksize={blocksize}: bitsandbytes takes a power of two from 32 to 4096")
    flat = w.reshape(-1).to(torch.float32)                                      # (out * in,) row-major
    absmax, scaled = _block_absmax_and_scaled(flat, blocksize)
    midpoints, order = _sorted_codes(code_table(quant_type, w.device))
    codes = order[torch.bucketize(scaled, midpoints)].to(torch.uint8).reshape(w.shape)
    nested = _quantize_nested(absmax) if double_quant else None
    return Bnb4Result(codes=codes, absmax=absmax if nested is None else nested_absmax_values(nested),
                      quant_type=quant_type, blocksize=blocksize, nested=nested)


def dequantize_bnb4(result: Bnb4Result, dtype: torch.dtype = torch.float32) -> Tensor:
    """(out, in) `dtype`: code_table[codes] x absmax, in float32, cast once (as bitsandbytes dequantizes)."""
    table = code_table(result.quant_type, result.codes.device)
    values = table[result.codes.reshape(-1).long()]                             # (out * in,)
    scale = result.absmax.repeat_interleave(result.blocksize)[: values.numel()]
    return (values * scale).reshape(result.codes.shape).to(dtype)


def pack_bnb4(codes: Tensor, quant_type: Bnb4Type) -> Tensor:
    """codes (out, in) uint8 in 0..15 -> (ceil(out * in / 2), 1) uint8, bitsandbytes' layout: row-major pairs,
    the first code in the high nibble. An odd count is padded with the code bitsandbytes gives 0.0."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        zero = 7 if quant_type is Bnb4Type.NF4 else 0
        flat = torch.cat([flat, torch.full((1,), zero, dtype=torch.uint8, device=flat.device)])
    return ((flat[0::2] << 4) | flat[1::2]).reshape(-1, 1)


def unpack_bnb4(packed: Tensor, shape: tuple[int, int]) -> Tensor:
    """Inverse of `pack_bnb4`: (ceil(n / 2), 1) uint8 -> (out, in) uint8 codes."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)             # (2 * ceil(n / 2),)
    return codes[: shape[0] * shape[1]].reshape(shape)
