"""bitsandbytes 4-bit (NF4, FP4, with and without double quantization): against a float64 reference that picks
table values by its own nearest search, and bit for bit against bitsandbytes' own quantize_4bit on the CPU."""

import pytest
import torch

from wq_ops.quant.bnb4 import (
    Bnb4Type,
    code_table,
    dequantize_bnb4,
    dynamic_map,
    pack_bnb4,
    quantize_bnb4,
    unpack_bnb4,
)


def _bnb():
    """bitsandbytes' own functions, imported by the tests that compare with them (the GPU machine's image has
    no bitsandbytes: a module-level import would stop `pytest -m gpu` at collection)."""
    import bitsandbytes.functional as functional

    return functional


# Awkward sizes: one weight; odd counts (a padding nibble); counts that are not a multiple of 64 (a short last
# block, which bitsandbytes divides where it multiplies the others by a reciprocal) or of 64 x 256 (a short
# nested block); rows shorter than a block, and blocks that run across rows; 21 nested blocks for (1000, 333).
SHAPES = [(1, 1), (3, 5), (7, 100), (129, 257), (300, 260), (1000, 333)]
TYPES = [Bnb4Type.NF4, Bnb4Type.FP4]


def _weights(gen: torch.Generator, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Rows of very different scales, a whole zero block, and (when there is one) a zero short last block."""
    w = torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen).pow(3) * 4
    flat = w.view(-1)
    if flat.numel() >= 128:
        flat[64:128] = 0.0
    if flat.numel() % 64 and flat.numel() > 64:
        flat[-(flat.numel() % 64):] = 0.0
    return w.to(dtype)


def test_tables_are_bitsandbytes_own():
    for quant_type in TYPES:
        ours, theirs = code_table(quant_type), _bnb().get_4bit_type(quant_type.value, device="cpu")
        assert ours.dtype == theirs.dtype == torch.float32
        assert torch.equal(ours, theirs) and torch.equal(ours.signbit(), theirs.signbit())     # FP4's code 8 is +0.0
    assert torch.equal(dynamic_map(), _bnb().create_dynamic_map())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", TYPES)
def test_matches_bitsandbytes_bit_for_bit(gen, quant_type, double_quant, shape, dtype):
    w = _weights(gen, shape, dtype)
    packed, state = _bnb().quantize_4bit(w, blocksize=64, compress_statistics=double_quant,
                                                 quant_type=quant_type.value)
    result = quantize_bnb4(w, quant_type=quant_type, double_quant=double_quant)
    assert result.codes.shape == shape and result.codes.dtype == torch.uint8
    assert torch.equal(pack_bnb4(result.codes, quant_type), packed)
    if double_quant:
        assert result.nested is not None
        assert torch.equal(result.nested.codes, state.absmax)
        assert torch.equal(result.nested.absmax, state.state2.absmax)
        assert torch.equal(result.nested.offset, state.offset)
        assert torch.equal(dynamic_map(), state.state2.code)
    else:
        assert result.nested is None and torch.equal(result.absmax, state.absmax)
    if shape[1] % 2 == 0:       # bitsandbytes dequantizes odd rows through torch.compile: tens of seconds here
        assert torch.equal(dequantize_bnb4(result, dtype), _bnb().dequantize_4bit(packed, state))


def _nearest_distance(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """float64: the distance from each x to the nearest table value (its own search, no midpoints)."""
    return (x.reshape(-1, 1) - table.reshape(1, -1)).abs().min(dim=1).values


def _block_absmax(x: torch.Tensor, size: int) -> torch.Tensor:
    """(n,) float64 -> (ceil(n / size),): the largest magnitude of each block of `size` (the last one short)."""
    return torch.stack([block.abs().max() for block in x.split(size)])


def _per_weight(per_block: torch.Tensor, size: int, n: int) -> torch.Tensor:
    """(n_blocks,) -> (n,): each block's value at each of its weights."""
    return per_block.repeat_interleave(size)[:n]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", TYPES)
def test_codes_are_the_nearest_table_values(gen, quant_type, shape):
    w = _weights(gen, shape, torch.float32)
    result = quantize_bnb4(w, quant_type=quant_type, double_quant=False)
    flat, n = w.double().reshape(-1), w.numel()
    absmax = _block_absmax(flat, 64)                                     # exact: a max of float32 values
    nonzero = absmax > 0
    assert torch.equal(result.absmax.double()[nonzero], absmax[nonzero])
    scale = _per_weight(absmax, 64, n)
    scaled = torch.where(scale > 0, flat / scale, 0.0)
    table = code_table(quant_type).double()
    values = table[result.codes.reshape(-1).long()]
    # Ours rounds the float32 quotient at float32 midpoints: each a few ulp of 1 from float64's (2**-22 ~ 2.4e-7).
    assert ((values - scaled).abs() <= _nearest_distance(scaled, table) + 1e-6).all()
    # Dequantized: the table value times the block's absmax, one float32 rounding (relative 2**-24).
    ours = dequantize_bnb4(result).double().reshape(-1)
    torch.testing.assert_close(ours, values * scale, rtol=2.0 ** -23, atol=0.0)
    # Hence the error bound: half the widest gap of the table, times the absmax (plus the float32 slack above).
    half_gap = table.sort().values.diff().max() / 2
    assert ((ours - flat).abs() <= scale * (half_gap + 1e-6)).all()


@pytest.mark.parametrize("shape", [(300, 260), (1000, 333)])
@pytest.mark.parametrize("quant_type", TYPES)
def test_double_quant_absmax_is_within_one_lookup_step_of_the_nearest(gen, quant_type, shape):
    """bitsandbytes' CPU kernel picks an 8-bit code through a table over a grid of 65536 points on [-1, 1]: the
    code nearest the grid point, which lies at most half a step (1 / 65535) from the value, so the code is at
    most 2 / 65535 farther from it than the nearest one."""
    w = _weights(gen, shape, torch.bfloat16)
    result = quantize_bnb4(w, quant_type=quant_type, double_quant=True)
    assert result.nested is not None
    absmax = _block_absmax(w.double().reshape(-1), 64)
    # bitsandbytes stores a zero short last block's absmax as 1e-38 (its divisor), a float32 subnormal.
    absmax[-1] = absmax[-1].clamp(min=torch.tensor(1e-38, dtype=torch.float32).item())
    # The offset is their mean, summed in float32: within a few ulp of the float64 mean. The rest of the
    # reference takes ours, so its checks don't inherit float32 summation error.
    offset = result.nested.offset.double()
    torch.testing.assert_close(offset, absmax.mean(), rtol=1e-6, atol=0.0)
    centered = absmax - offset
    n_blocks = centered.numel()
    nested_absmax = _block_absmax(centered, 256)
    # float32 centered values: each within 2**-24 relative of float64's.
    torch.testing.assert_close(result.nested.absmax.double(), nested_absmax, rtol=2.0 ** -23, atol=0.0)
    scale = _per_weight(nested_absmax, 256, n_blocks)
    normalized = torch.where(scale > 0, centered / scale, 0.0)
    table = dynamic_map().double()
    values = table[result.nested.codes.long()]
    assert ((values - normalized).abs() <= _nearest_distance(normalized, table) + 2 / 65535 + 1e-6).all()
    # The absmax a reader reconstructs: code value x nested absmax + offset, two float32 roundings (each at most
    # 2**-24 of the larger of the terms).
    reconstructed = values * _per_weight(result.nested.absmax.double(), 256, n_blocks) + offset
    torch.testing.assert_close(result.absmax.double(), reconstructed, rtol=0.0,
                               atol=2.0 ** -23 * (absmax.max().item() + offset.item()))


def test_pack_order_and_round_trip(gen):
    codes = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    # First code in the high nibble; an odd count padded with the code of 0.0 (NF4 7, FP4 0).
    assert pack_bnb4(codes, Bnb4Type.NF4).tolist() == [[0x12], [0x37]]
    assert pack_bnb4(codes, Bnb4Type.FP4).tolist() == [[0x12], [0x30]]
    for shape in SHAPES:
        codes = torch.randint(0, 16, shape, generator=gen, dtype=torch.uint8)
        packed = pack_bnb4(codes, Bnb4Type.NF4)
        assert packed.shape == (-(-codes.numel() // 2), 1) and packed.dtype == torch.uint8
        assert torch.equal(unpack_bnb4(packed, shape), codes)
