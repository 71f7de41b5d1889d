"""FP8 E4M3 weights (`quantize_fp8`) and engines' activation quantization (`fake_quantize_input`) against float64
references that round to FP8 by their own table (nearest, ties to even), not by torch's cast."""

import pytest
import torch

from wq_ops.config.schemes import ActivationQuant, ActivationStrategy, NumberType, WeightLayout
from wq_ops.quant.activations import fake_quantize_input
from wq_ops.quant.fp8 import FP8_MAX, quantize_fp8
from wq_ops.quant.result import dequantize

FP8_LAYOUTS = [WeightLayout.GROUP, WeightLayout.TENSOR, WeightLayout.BLOCK]
# Every finite non-negative E4M3 value, ascending (bit patterns 0x00..0x7E): the reference's grid.
_POSITIVE = torch.arange(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float64)


def nearest_fp8(x: torch.Tensor) -> torch.Tensor:
    """x (float64, |x| <= 448) to the nearest E4M3 value, ties to the even bit pattern (even mantissa)."""
    a = x.abs().reshape(-1)
    hi = torch.searchsorted(_POSITIVE, a).clamp(max=len(_POSITIVE) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - _POSITIVE[lo], _POSITIVE[hi] - a
    pick = torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, torch.where(lo % 2 == 0, lo, hi)))
    return (torch.sign(x.reshape(-1)) * _POSITIVE[pick]).reshape(x.shape)


def reference_amax(w: torch.Tensor, layout: WeightLayout, block=(128, 128)) -> torch.Tensor:
    out_features, in_features = w.shape
    if layout is WeightLayout.GROUP:
        return w.abs().amax(dim=1, keepdim=True)
    if layout is WeightLayout.TENSOR:
        return w.abs().amax().reshape(1, 1)
    bh, bw = block
    rows, cols = -(-out_features // bh), -(-in_features // bw)
    amax = torch.zeros(rows, cols, dtype=w.dtype)
    for r in range(rows):
        for c in range(cols):
            amax[r, c] = w[r * bh:(r + 1) * bh, c * bw:(c + 1) * bw].abs().max()
    return amax


@pytest.mark.parametrize("layout", FP8_LAYOUTS)
@pytest.mark.parametrize("shape", [(96, 256), (200, 300), (1, 128)])
def test_fp8_weights_match_a_float64_reference(gen, layout, shape):
    w = torch.randn(*shape, generator=gen) * torch.rand(shape[0], 1, generator=gen).pow(3) * 4
    w[0, :] = 0.0                                               # an all-zero row (and block, at the top left)
    r = quantize_fp8(w, layout=layout, scale_dtype=torch.bfloat16)
    amax = reference_amax(w.double(), layout)
    want_scale = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    assert r.scale.shape == want_scale.shape
    assert torch.equal(r.scale.to(torch.bfloat16).float(), r.scale)           # exact in the storage dtype
    assert torch.allclose(r.scale.double(), want_scale, rtol=2**-8, atol=0)   # nearest bf16 of amax / 448
    full = r.expanded_scale().double()
    want = nearest_fp8(torch.clamp((w / r.expanded_scale()).double(), -FP8_MAX, FP8_MAX))
    assert r.values.dtype == torch.float8_e4m3fn
    assert torch.equal(r.values.double(), want)
    # Dequantized: each weight within half an FP8 step of its scaled value (3 mantissa bits: 2**-4 relative),
    # or the clip where a rounded-down scale put it past 448.
    back = dequantize(r, torch.float64)
    assert torch.equal(back, r.values.double() * full)
    bound = torch.maximum(w.double().abs() * 2**-4, full * 2**-9) + (w.double().abs() - 448 * full).clamp(min=0)
    assert ((back - w.double()).abs() <= bound + 1e-12).all()


def test_fp8_block_scales_cover_partial_blocks(gen):
    w = torch.randn(130, 260, generator=gen)
    r = quantize_fp8(w, layout=WeightLayout.BLOCK, scale_dtype=torch.float32)
    assert r.scale.shape == (2, 3) and r.block == (128, 128)
    assert torch.equal(r.scale[1, 2], (w[128:, 256:].abs().max() / 448))


def _reference_input(x: torch.Tensor, spec: ActivationQuant, scale=None) -> torch.Tensor:
    """Per-token / per-group / per-tensor absmax scales in float32 (the engine's), the quotient in float64, FP8
    levels by the table, INT8 rounded half to even; the product rounded once to float32."""
    limit = 448.0 if spec.type is NumberType.FLOAT else 127.0
    xd = x.double()
    if spec.strategy is ActivationStrategy.GROUP:
        xd = xd.unflatten(-1, (-1, spec.group_size))
    if scale is None:
        amax = xd.abs().amax() if spec.strategy is ActivationStrategy.TENSOR else xd.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(amax > 0, (amax.float() / limit).double(), torch.ones_like(amax))
    q = xd / scale
    q = nearest_fp8(q.clamp(-448, 448)) if spec.type is NumberType.FLOAT else torch.round(q).clamp(-128, 127)
    return (q * scale).float().reshape(x.shape)


SPECS = [ActivationQuant(NumberType.FLOAT, ActivationStrategy.TOKEN, True),
         ActivationQuant(NumberType.INT, ActivationStrategy.TOKEN, True),
         ActivationQuant(NumberType.FLOAT, ActivationStrategy.GROUP, True, 128),
         ActivationQuant(NumberType.FLOAT, ActivationStrategy.TENSOR, True)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.type.value}-{s.strategy.value}")
def test_activations_quantize_as_the_engine_does(gen, spec):
    x = torch.randn(3, 7, 256, generator=gen) * torch.rand(3, 7, 1, generator=gen) * 5
    x[0, 0] = 0.0                                                             # an all-zero token
    got = fake_quantize_input(x, spec)
    want = _reference_input(x, spec)
    # A float32 quotient against float64: equal but where it sat within an ulp of a rounding tie.
    assert got.dtype == x.dtype and got.shape == x.shape
    assert int((got != want).sum()) <= x.numel() // 1000
    assert torch.equal(got[0, 0], torch.zeros(256))


def test_static_activations_use_the_stored_scale_and_clip(gen):
    spec = ActivationQuant(NumberType.FLOAT, ActivationStrategy.TENSOR, False)
    x = torch.randn(4, 64, generator=gen)
    scale = torch.tensor(1.0 / 448)                                           # clips every |x| > 1
    got = fake_quantize_input(x, spec, static_scale=scale)
    assert torch.equal(got, _reference_input(x, spec, scale=scale.double()))
    assert float(got.abs().max()) <= 1.0
    with pytest.raises(ValueError, match="needs the layer's stored input scale"):
        fake_quantize_input(x, spec)


def test_fp8_activations_equal_compressed_tensors_own_fake_quantization_in_float32(gen):
    """compressed-tensors (what transformers runs for a quantized checkpoint) computes FP8 activation scales and
    values in the input's dtype: for float32 inputs that is our arithmetic, bit for bit. (Its INT8 scale is
    absmax / 127.5; vLLM's kernels, which wq follows, use absmax / 127.)"""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    x = torch.randn(2, 5, 256, generator=gen) * 3
    for spec in (SPECS[0], SPECS[2]):
        args = QuantizationArgs(**spec.to_args())
        scale, zero = compute_dynamic_scales_and_zp(x, args, module=torch.nn.Linear(1, 1))
        theirs = fake_quantize(x, scale, zero, args)
        assert torch.equal(fake_quantize_input(x, spec), theirs)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", FP8_LAYOUTS)
def test_the_gpu_quantizes_weights_and_activations_as_the_cpu_does(gen, layout):
    """The same FP8 values and scales, and the same quantized activations, bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    w = (torch.randn(300, 384, generator=gen) * 0.05).to(torch.bfloat16)
    cpu = quantize_fp8(w, layout=layout, scale_dtype=torch.bfloat16)
    gpu = quantize_fp8(w.cuda(), layout=layout, scale_dtype=torch.bfloat16)
    assert torch.equal(gpu.scale.cpu(), cpu.scale)
    assert torch.equal(gpu.values.cpu().view(torch.uint8), cpu.values.view(torch.uint8))
    x = (torch.randn(4, 33, 384, generator=gen) * 3).to(torch.bfloat16)
    for spec in SPECS:
        assert torch.equal(fake_quantize_input(x.cuda(), spec).cpu(), fake_quantize_input(x, spec)), spec
