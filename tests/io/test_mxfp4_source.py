"""MXFP4 sources (gpt-oss's release): the config's verdict, dequantization against a float64 reference written
from the E2M1 bit fields on fresh random inputs (every byte value, scales across the whole exponent range) and
bit for bit against transformers' own converter, and the refusals: a NaN scale, a value beyond the dtype, a bad
shape."""

from __future__ import annotations

import pytest
import torch

from wq_ops.errors import CheckpointError
from wq_ops.io.mxfp4_source import dequantize_mxfp4, mxfp4_modules_to_not_convert

GPT_OSS_QUANTIZATION = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                   "model.embed_tokens", "lm_head"],
                        "quant_method": "mxfp4"}       # openai/gpt-oss-120b's config.json, verbatim

# Per dtype, the scale bytes for which no E2M1 value (at most 6) overflows: 6 * 2**125 = 1.5 * 2**127 is the
# largest float32 and bfloat16 value of this form; float16 holds 6 * 2**13 but not 6 * 2**14 (max 65504). The
# float16 range goes down to 2**-40, far below its smallest subnormal 2**-24, to check rounding to zero.
SCALE_RANGE = {torch.bfloat16: (0, 252), torch.float32: (0, 252), torch.float16: (127 - 40, 127 + 13)}
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def e2m1(code: int) -> float:
    """An FP4 E2M1 code from its bit fields (OCP MX v1.0): sign, 2 exponent bits (bias 1), 1 mantissa bit."""
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 0b1
    return sign * (mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1))


def dequantize_float64(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(experts, out, in) float64: input 2 j of a group from byte j's low nibble, 2 j + 1 from its high one, each
    times 2**(scale - 127)."""
    table = torch.tensor([e2m1(code) for code in range(16)], dtype=torch.float64)
    power = torch.tensor([2.0 ** (s - 127) for s in range(256)], dtype=torch.float64)
    experts, rows, groups, n_bytes = blocks.shape
    values = torch.empty(experts, rows, groups, 2 * n_bytes, dtype=torch.float64)
    values[..., 0::2] = table[(blocks & 0x0F).long()]
    values[..., 1::2] = table[(blocks >> 4).long()]
    return (values * power[scales.long()][..., None]).reshape(experts, rows, -1)


def random_mxfp4(gen: torch.Generator, shape: tuple[int, int, int], scale_range: tuple[int, int]):
    """blocks (experts, out, groups, 16) with every byte value present (where 256 bytes fit), and scales drawn from
    scale_range with both its ends present."""
    blocks = torch.randint(0, 256, (*shape, 16), generator=gen, dtype=torch.uint8)
    n_bytes = min(256, blocks.numel())
    blocks.view(-1)[:n_bytes] = torch.randperm(256, generator=gen)[:n_bytes].to(torch.uint8)
    low, high = scale_range
    scales = torch.randint(low, high + 1, shape, generator=gen, dtype=torch.uint8)
    scales.view(-1)[:2] = torch.tensor([low, high], dtype=torch.uint8)
    return blocks, scales


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, so -0.0 differs from 0.0."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(INT_VIEW[a.dtype]),
                                                                     b.view(INT_VIEW[b.dtype]))


def test_mxfp4_is_read_from_the_config():
    assert mxfp4_modules_to_not_convert({"quantization_config": GPT_OSS_QUANTIZATION}) == (
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head")
    assert mxfp4_modules_to_not_convert({"quantization_config": {"quant_method": "mxfp4"}}) == ()
    assert mxfp4_modules_to_not_convert({"model_type": "gpt_oss"}) is None
    assert mxfp4_modules_to_not_convert({"quantization_config": {"quant_method": "fp8"}}) is None
    with pytest.raises(CheckpointError, match="modules_to_not_convert='lm_head': expected a list"):
        mxfp4_modules_to_not_convert({"quantization_config": {"quant_method": "mxfp4",
                                                              "modules_to_not_convert": "lm_head"}})


def test_golden_bytes_pin_the_nibble_order_and_the_bias():
    blocks = torch.zeros(1, 2, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0, :2] = torch.tensor([0x21, 0xF7], dtype=torch.uint8)   # codes (lo, hi): (1, 2), (7, 15)
    scales = torch.tensor([[[128], [0]]], dtype=torch.uint8)               # 2**1; 2**-127
    blocks[0, 1, 0, 15] = 0x19                                             # codes (9, 1): -0.5, 0.5
    got = dequantize_mxfp4(blocks, scales, torch.float32)
    assert got.shape == (1, 2, 32)
    assert got[0, 0, :4].tolist() == [1.0, 2.0, 12.0, -12.0] and not got[0, 0, 4:].any()
    assert got[0, 1, 30:].tolist() == [-2.0**-128, 2.0**-128]              # float32 subnormals, exact


@pytest.mark.parametrize("shape", [(1, 1, 16), (3, 5, 2), (2, 64, 3)])      # (experts, out, in / 32)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantization_matches_float64(gen, shape, dtype):
    blocks, scales = random_mxfp4(gen, shape, SCALE_RANGE[dtype])
    want = dequantize_float64(blocks, scales)
    got = dequantize_mxfp4(blocks, scales, dtype)
    assert got.shape == (shape[0], shape[1], shape[2] * 32)
    # Bit for bit: each value is exact in float32 (two significant bits, within range), so computing in float32
    # and rounding once is the float64 value rounded once.
    assert same_bits(got, want.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_largest_scales_are_exact_while_in_range(gen, dtype):
    """Scale 254 with |code| <= 1.5 and 253 with |code| <= 3 reach 1.5 * 2**127, the largest value of the form."""
    blocks = torch.randint(0, 256, (2, 2, 4, 16), generator=gen, dtype=torch.uint8)
    scales = torch.tensor([253, 254], dtype=torch.uint8).repeat(2, 2, 2)                 # (2, 2, 4)
    limit = torch.tensor([5, 3], dtype=torch.uint8).repeat(2, 2, 2)[..., None]           # the largest magnitude code
    low, high = blocks & 0x07, (blocks >> 4) & 0x07
    blocks = (blocks & 0x88) | torch.minimum(low, limit) | (torch.minimum(high, limit) << 4)
    got = dequantize_mxfp4(blocks, scales, dtype)
    assert same_bits(got, dequantize_float64(blocks, scales).to(dtype))
    assert float(got.abs().max()) == 1.5 * 2.0**127


@pytest.mark.parametrize("shape", [(1, 2, 1), (3, 7, 5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantization_matches_transformers(gen, shape, dtype):
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    blocks, scales = random_mxfp4(gen, shape, SCALE_RANGE[dtype])
    theirs = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=dtype)   # (experts, in, out)
    assert theirs.shape == (shape[0], shape[2] * 32, shape[1])
    assert same_bits(dequantize_mxfp4(blocks, scales, dtype), theirs.transpose(1, 2).contiguous())


@pytest.mark.parametrize("dtype,scale,code", [(torch.bfloat16, 254, 4), (torch.float32, 253, 6),
                                              (torch.float16, 127 + 14, 7)])
def test_a_value_beyond_the_dtype_is_refused(dtype, scale, code):
    blocks = torch.zeros(1, 3, 2, 16, dtype=torch.uint8)
    blocks[0, 2, 1, 3] = code << 4                                         # input 32 + 2 * 3 + 1
    scales = torch.full((1, 3, 2), scale, dtype=torch.uint8)
    with pytest.raises(CheckpointError, match=rf"expert 0: 1 values exceed .* row 2, input 39 \(scale byte {scale}"):
        dequantize_mxfp4(blocks, scales, dtype)
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")            # transformers gives inf instead
    assert torch.isinf(mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=dtype)).sum() == 1


def test_a_nan_scale_is_refused():
    scales = torch.full((2, 3, 1), 127, dtype=torch.uint8)
    scales[1, 2, 0] = 0xFF
    with pytest.raises(CheckpointError, match="1 bytes are 0xFF .* expert 1, row 2, group 0"):
        dequantize_mxfp4(torch.zeros(2, 3, 1, 16, dtype=torch.uint8), scales, torch.bfloat16)


@pytest.mark.parametrize("blocks_shape,scales_shape,message", [
    ((4, 8, 2, 16), (4, 8, 3), r"need uint8 scales of shape \(4, 8, 2\); got \(4, 8, 3\)"),
    ((4, 8, 2, 16), (4, 8), r"need uint8 scales of shape \(4, 8, 2\); got \(4, 8\)"),
    ((4, 8, 32), (4, 8, 2), r"blocks of shape \(4, 8, 32\) \(torch.uint8\): expected uint8 \(experts, out"),
    ((4, 8, 2, 8), (4, 8, 2), r"blocks of shape \(4, 8, 2, 8\) .* in / 32, 16\)"),
])
def test_bad_shapes_are_refused(blocks_shape, scales_shape, message):
    blocks = torch.zeros(blocks_shape, dtype=torch.uint8)
    with pytest.raises(CheckpointError, match=message):
        dequantize_mxfp4(blocks, torch.zeros(scales_shape, dtype=torch.uint8), torch.bfloat16)


def test_bad_dtypes_are_refused():
    with pytest.raises(CheckpointError, match=r"\(torch.int8\): expected uint8"):
        dequantize_mxfp4(torch.zeros(1, 1, 1, 16, dtype=torch.int8), torch.zeros(1, 1, 1, dtype=torch.uint8),
                         torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"got \(1, 1, 1\) \(torch.float32\)"):
        dequantize_mxfp4(torch.zeros(1, 1, 1, 16, dtype=torch.uint8), torch.zeros(1, 1, 1), torch.bfloat16)
