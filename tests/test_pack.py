import pytest
import torch

from wq_ops.pack import pack_rows, packed_width, unpack_rows


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("cols", [1, 7, 31, 32, 33, 64, 96, 100, 576])
def test_pack_unpack_is_exact(gen, bits, cols):
    codes = torch.randint(0, 2**bits, (5, cols), generator=gen, dtype=torch.uint8)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, packed_width(cols, bits))
    assert torch.equal(unpack_rows(packed, bits, cols), codes)


def test_layout_is_a_little_endian_bit_stream():
    # 4 bits: element i sits at bits 4i..4i+3 of word i // 8.
    codes = torch.arange(16, dtype=torch.uint8).reshape(1, 16)
    assert pack_rows(codes, 4).tolist() == [[0x76543210, 0xFEDCBA98 - (1 << 32)]]
    # 3 bits: element 10 straddles words 0 and 1 (bits 30..32).
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 0b111
    assert pack_rows(codes, 3).tolist() == [[0xC0000000 - (1 << 32), 0b1, 0]]   # bits 30, 31 | bit 0


def test_out_of_range_codes_are_rejected():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_rows(torch.tensor([[16]], dtype=torch.uint8), 4)


def test_unpack_rejects_a_wrong_width():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_rows(torch.zeros(2, 3, dtype=torch.int32), 4, 32)
