"""The tensor-core lazy update's operands and error, on the CPU (the GPU test: tests/kernels/test_gptq_cuda.py)."""

import torch

from wq_ops.kernels.gptq.split_update import add_split_update_, split_factor_blocks


def test_split_factor_blocks_hold_each_block_as_bf16_parts(gen):
    """Block j is Mu's rows j*B..(j+1)*B as [hi; lo; hi]: hi the nearest bf16, lo the nearest bf16 of what
    is left; hi + lo is within 2^-16 of Mu; the last block (no trailing columns) is left out."""
    n, b = 300, 64
    m_unit = torch.triu(torch.randn(n, n, generator=gen), diagonal=1) + torch.eye(n)
    blocks = split_factor_blocks(m_unit, b)
    assert blocks.shape == (4, 3 * b, n) and blocks.dtype == torch.bfloat16      # 4 of the 5 blocks
    for j in range(4):
        rows = m_unit[j * b:(j + 1) * b]
        hi, lo = blocks[j, :b], blocks[j, b:2 * b]
        assert torch.equal(hi, rows.to(torch.bfloat16)) and torch.equal(blocks[j, 2 * b:], hi)
        assert torch.equal(lo, (rows - hi.float()).to(torch.bfloat16))
        assert float(((hi.double() + lo.double()) - rows.double()).abs().max()) <= 2**-16 * float(rows.abs().max())
    assert split_factor_blocks(m_unit[:64, :64], 64).shape == (0, 192, 64)


def split_update_error(gen: torch.Generator, device: torch.device | str, *, n: int, rows: int, b: int = 128) -> float:
    """The lazy update from the solve's [hi | hi | lo] parts and Mu's [hi; lo; hi] block on fresh inputs,
    against float64: the largest error as a fraction of the largest update. (Shared with the GPU test.)"""
    m_unit = torch.triu(torch.randn(n, n, generator=gen) / 8, diagonal=1) + torch.eye(n)
    delta = torch.randn(rows, b, generator=gen) * 1e-3
    targets = torch.randn(rows, n, generator=gen) * 0.02
    expected = targets.double()
    expected[:, b:] += delta.double() @ m_unit[:b, b:].double()
    update = (delta.double() @ m_unit[:b, b:].double()).abs().max()
    m_unit, delta, targets = m_unit.to(device), delta.to(device), targets.to(device)
    hi = delta.to(torch.bfloat16)
    parts = torch.cat([hi, hi, (delta - hi.float()).to(torch.bfloat16)], dim=1)
    add_split_update_(targets[:, b:], parts, split_factor_blocks(m_unit, b)[0, :, b:])
    return float((targets.double().cpu() - expected).abs().max() / update)


def test_split_update_is_within_its_stated_error_of_float64(gen):
    """About 2^-16 of the update's size, on inputs shaped like a down_proj's first block. (On the CPU the
    bf16 products are taken in float32, where they are exact: the CUDA GEMM sums the same terms.)"""
    for _ in range(3):
        assert split_update_error(gen, "cpu", n=1024, rows=256) < 2**-15
