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


def _naive_clip_search(w, importance, bits, group_size, sym):
    """Group by group, in float64: each candidate factor's grid (the quantizer's own, so the same bf16 scales),
    its weighted squared error, the first factor of least error."""
    from wq_ops.quant.rtn import CLIP_MAX_SHRINK, CLIP_STEPS

    out, n = w.shape
    gs = group_size or n
    best = torch.ones(out, n // gs, dtype=torch.float64)
    for r in range(out):
        for g in range(n // gs):
            cols = slice(g * gs, (g + 1) * gs)
            errors = []
            for k in range(CLIP_STEPS + 1):
                factor = 1.0 - CLIP_MAX_SHRINK * k / CLIP_STEPS
                q = quantize_rtn(w[r:r + 1, cols], bits=bits, group_size=None, sym=sym, scale_dtype=torch.bfloat16,
                                 clip=torch.full((1, 1), factor))
                delta = dequantize(q).double() - w[r:r + 1, cols].double()
                errors.append((float((delta ** 2 * importance[cols].double()).sum()), factor))
            least = min(e for e, _ in errors)
            best[r, g] = next(f for e, f in errors if e <= least * (1 + 1e-9))
    return best


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("sym", [True, False])
def test_clip_search_matches_a_per_group_float64_search(gen, bits, sym):
    from wq_ops.quant.rtn import search_clip

    w = torch.randn(6, 128, generator=gen) ** 3                   # heavy tails: clipping pays
    importance = torch.rand(128, generator=gen) ** 2 + 0.01
    found = search_clip(w, bits=bits, group_size=32, sym=sym, scale_dtype=torch.bfloat16, importance=importance)
    expected = _naive_clip_search(w, importance, bits, 32, sym)
    assert found.shape == (6, 4) and bool(((found.double() - expected).abs() < 1e-6).all())
    assert bool((found < 1).any()) and bool((found >= 0.8 - 1e-6).all())


def test_clip_search_never_loses_to_min_max_on_its_measure(gen):
    from wq_ops.quant.rtn import search_clip

    w = torch.randn(32, 256, generator=gen) * torch.rand(1, 256, generator=gen)
    importance = torch.rand(256, generator=gen)
    clip = search_clip(w, bits=4, group_size=64, sym=True, scale_dtype=torch.bfloat16, importance=importance)

    def error(q):
        return ((dequantize(q) - w) ** 2 * importance).reshape(32, 4, 64).sum(-1)

    searched = error(quantize_rtn(w, bits=4, group_size=64, sym=True, scale_dtype=torch.bfloat16, clip=clip))
    plain = error(quantize_rtn(w, bits=4, group_size=64, sym=True, scale_dtype=torch.bfloat16))
    assert bool((searched <= plain * (1 + 1e-6)).all()) and float(searched.sum()) < float(plain.sum())
    # A group whose columns carry no weight in the measure keeps min-max (the first candidate, on a tie).
    flat = search_clip(w, bits=4, group_size=64, sym=True, scale_dtype=torch.bfloat16,
                       importance=torch.zeros(256))
    assert bool((flat == 1).all())
