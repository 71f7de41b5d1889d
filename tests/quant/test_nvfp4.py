"""NVFP4 weights and activations against a float64 reference that rounds to E2M1 by its own table (nearest,
ties to the even index) and FP8 scales by torch's cast, and against compressed-tensors' own fake quantization."""

import pytest
import torch

from tests.quant.test_fp8 import nearest_fp8
from wq_ops.config import JobConfig
from wq_ops.quant.activations import fake_quantize_input
from wq_ops.quant.nvfp4 import fp4_codes, global_scale_of, quantize_nvfp4
from wq_ops.quant.result import dequantize, fp4_values

_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def nearest_fp4(x: torch.Tensor) -> torch.Tensor:
    """float64 -> the nearest E2M1 value (saturating at 6), ties to the even index."""
    a = x.abs().clamp(max=6.0).reshape(-1, 1)
    distance = (a - _MAGNITUDES).abs()
    best = distance.min(dim=1, keepdim=True).values
    candidates = (distance == best)
    # The lowest index among ties that is even, else the lowest.
    index = torch.arange(8).expand_as(candidates)
    even = candidates & (index % 2 == 0)
    pick = torch.where(even.any(dim=1), torch.where(even, index, 99).min(dim=1).values,
                       torch.where(candidates, index, 99).min(dim=1).values)
    return (torch.sign(x).reshape(-1) * _MAGNITUDES[pick]).reshape(x.shape)


def test_fp4_codes_round_to_nearest_ties_to_even():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.2499, 0.2501, 7.0, -0.75, -5.01, 0.0, -0.0])
    assert fp4_values(fp4_codes(x)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.0, 0.5, 6.0, -1.0, -6.0,
                                                  0.0, 0.0]
    assert torch.equal(fp4_values(fp4_codes(x)).double(), nearest_fp4(x.double()))


def test_nvfp4_weights_match_a_float64_reference(gen):
    w = torch.randn(48, 256, generator=gen) * torch.rand(48, 1, generator=gen).pow(2) * 3
    w[0, :16] = 0.0                                                       # an all-zero group
    g = global_scale_of(w.abs().max())
    r = quantize_nvfp4(w, global_scale=g)
    amax = w.reshape(48, 16, 16).abs().amax(dim=-1)
    assert float(g) == pytest.approx(448 * 6 / float(w.abs().max()), rel=1e-7)
    # Group scales: amax / 6 x g (float32, as the quantizer computes it), rounded to the nearest FP8 by the
    # reference's own table; one that rounds to 0 (a group far below the tensor's largest) stores FP8's smallest
    # subnormal, 2**-9. The rounding is what is checked: a float64 quotient could sit on the other side of a tie.
    want_scale = nearest_fp8((amax / torch.full_like(amax, 6.0) * g).double().clamp(max=448))
    want_scale = torch.where(want_scale == 0, torch.full_like(want_scale, 2.0**-9), want_scale)
    assert torch.equal(r.scale.double(), want_scale)
    effective32 = (r.scale.float() / g).repeat_interleave(16, dim=1)
    effective = effective32.double()
    assert torch.equal(fp4_values(r.codes).double(), nearest_fp4((w / effective32).double()))
    # The product rounded once to float32 (a value's 2 significant bits times a 24-bit scale may need 25).
    assert torch.equal(dequantize(r, torch.float64), (fp4_values(r.codes).double() * effective).float().double())


def test_nvfp4_equals_compressed_tensors_fake_quantization(gen):
    """The weights (NVFP4A16's args) and the activations (NVFP4's, dynamic local scales under a global one), bit
    for bit as compressed-tensors quantizes them in float32."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.quantization.utils import calculate_qparams, compute_dynamic_scales_and_zp, generate_gparam

    w = torch.randn(64, 128, generator=gen) * 0.05
    args = PRESET_SCHEMES["NVFP4A16"]["weights"]
    g = generate_gparam(w.amin(), w.amax())
    groups = w.reshape(64, 8, 16)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale=g)
    ours = quantize_nvfp4(w, global_scale=global_scale_of(w.abs().max()))
    assert torch.equal(ours.scale.view(torch.uint8), scale.to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(dequantize(ours), fake_quantize(w, scale, zero, args, global_scale=g))

    spec = JobConfig.from_dict({"out": "o", "scheme": "NVFP4"}).quant.activations
    x = torch.randn(3, 7, 128, generator=gen) * 4
    act_args = PRESET_SCHEMES["NVFP4"]["input_activations"]
    g_in = generate_gparam(x.amin(), x.amax())
    s, z = compute_dynamic_scales_and_zp(x, act_args, module=torch.nn.Linear(1, 1), global_scale=g_in)
    assert torch.equal(fake_quantize_input(x, spec, static_scale=g_in),
                       fake_quantize(x, s, z, act_args, global_scale=g_in))


@pytest.mark.gpu
def test_the_gpu_quantizes_nvfp4_as_the_cpu_does(gen):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    w = (torch.randn(256, 512, generator=gen) * 0.05).to(torch.bfloat16)
    g = global_scale_of(w.float().abs().max())
    assert torch.equal(global_scale_of(w.cuda().float().abs().max()).cpu(), g)
    cpu, gpu = quantize_nvfp4(w, global_scale=g), quantize_nvfp4(w.cuda(), global_scale=g.cuda())
    assert torch.equal(gpu.codes.cpu(), cpu.codes)
    assert torch.equal(gpu.scale.cpu().view(torch.uint8), cpu.scale.view(torch.uint8))
