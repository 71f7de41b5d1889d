import pytest
import torch

from tests.quant.naive import naive_grid
from wq_ops.errors import ConfigError
from wq_ops.quant.result import dequantize
from wq_ops.quant.rtn import compute_grid, quantize_rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, None])
@pytest.mark.parametrize("sym", [True, False])
def test_grid_matches_float64_reference(gen, bits, group_size, sym):
    w = torch.randn(16, 128, generator=gen) * torch.rand(16, 1, generator=gen) * 3
    grid = compute_grid(w, bits=bits, group_size=group_size, sym=sym, scale_dtype=torch.bfloat16)
    scale, zero = naive_grid(w.double(), bits, group_size, sym)
    # Both round the scale to bfloat16; float32 vs float64 division before that can still land on
    # neighbouring bf16 values: one ulp, 2^-7 relative.
    assert torch.allclose(grid.scale.double(), scale, rtol=2**-7, atol=0)
    assert (grid.zero.double() - zero).abs().max() <= 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_at_most_half_a_step(gen, bits, sym):
    w = torch.randn(32, 256, generator=gen)
    r = quantize_rtn(w, bits=bits, group_size=64, sym=sym, scale_dtype=torch.bfloat16)
    step = r.scale.repeat_interleave(64, dim=1)
    err = (dequantize(r) - w).abs()
    # Half a step, plus what rounding the scale to bfloat16 (half an ulp: 2**-8 relative) can leave the top
    # code short of the range: at most 2**bits - 1 steps x 2**-8 (asymmetric; half that when symmetric);
    # plus float32 slack relative to the weights.
    bound = step * (0.5 + 2**bits * 2**-8) + w.abs() * 4 * torch.finfo(torch.float32).eps
    assert bool((err <= bound).all()), f"max excess {(err - bound).max()}"
    assert r.codes.dtype == torch.uint8 and int(r.codes.max()) <= 2**bits - 1


def test_rtn_zero_group_is_exact(gen):
    w = torch.randn(4, 64, generator=gen)
    w[:, :32] = 0
    r = quantize_rtn(w, bits=4, group_size=32, sym=False, scale_dtype=torch.float16)
    assert torch.equal(dequantize(r)[:, :32], torch.zeros(4, 32))


def test_tiny_scale_never_underflows_to_zero():
    w = torch.full((2, 32), 1e-9)
    r = quantize_rtn(w, bits=4, group_size=32, sym=True, scale_dtype=torch.float16)
    assert bool((r.scale > 0).all())
    assert bool(torch.isfinite(dequantize(r)).all())


def test_group_size_must_divide_in_features(gen):
    with pytest.raises(ConfigError, match="in_features=96 is not a multiple of group_size=64"):
        quantize_rtn(torch.randn(4, 96, generator=gen), bits=4, group_size=64, sym=True, scale_dtype=torch.bfloat16)


def test_clip_shrinks_the_range(gen):
    w = torch.randn(8, 64, generator=gen)
    full = compute_grid(w, bits=4, group_size=32, sym=True, scale_dtype=torch.float32)
    half = compute_grid(w, bits=4, group_size=32, sym=True, scale_dtype=torch.float32,
                        clip=torch.full((8, 2), 0.5))
    assert torch.allclose(half.scale, full.scale * 0.5)
