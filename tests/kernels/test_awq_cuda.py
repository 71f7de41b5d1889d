"""CUDA AWQ search primitives against kernels/awq/reference.py on fresh random inputs."""

import pytest
import torch

from wq_ops.kernels.awq import reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (3, False), (8, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_matches_reference(cuda, group_size, bits, sym, dtype):
    from wq_ops.kernels.awq import cuda as awq_cuda

    g = torch.Generator(device="cpu").manual_seed(group_size + bits)
    w = torch.randn(118, 1024, generator=g).to(cuda, dtype)
    s = (torch.rand(1024, generator=g) * 3 + 0.25).to(cuda)
    kw = dict(bits=bits, group_size=group_size, sym=sym, scale_dtype=torch.bfloat16)
    ref = reference.fake_quant(w, s, **kw)
    got = awq_cuda.fake_quant(w, s, **kw)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("bits,sym", [(4, True), (4, False)])
def test_clip_error_matches_reference(cuda, group_size, bits, sym):
    from wq_ops.kernels.awq import cuda as awq_cuda

    g = torch.Generator(device="cpu").manual_seed(group_size * bits)
    w = torch.randn(96, 1024, generator=g).to(cuda)
    x = torch.randn(2048, 1024, generator=g).to(cuda)
    h = x.T @ x / x.shape[0]
    ratios = torch.linspace(1.0, 0.5, 20, device=cuda)
    kw = dict(group_size=group_size, bits=bits, sym=sym, scale_dtype=torch.bfloat16, ratios=ratios)
    ref = reference.clip_error(w, h, **kw)
    got = awq_cuda.clip_error(w, h, **kw)
    torch.testing.assert_close(got, ref, rtol=2e-4, atol=1e-5)
    # what the search decides with it: the best clip ratio per group
    agree = (got.argmin(-1) == ref.argmin(-1)).float().mean().item()
    assert agree >= 0.99


def test_bad_arguments_raise_and_name_the_argument(cuda):
    """Checked in Python first: a failed check inside the extension ended the process on the H100 machine."""
    from wq_ops.errors import KernelError
    from wq_ops.kernels.awq import cuda as awq_cuda

    w = torch.randn(8, 256, device=cuda)
    kw = dict(bits=4, sym=True, scale_dtype=torch.bfloat16)
    with pytest.raises(KernelError, match=r"s must be .* \(256,\) tensor"):
        awq_cuda.fake_quant(w, torch.ones(128, device=cuda), group_size=128, **kw)
    with pytest.raises(KernelError, match="not a multiple of group_size=96"):
        awq_cuda.fake_quant(w, torch.ones(256, device=cuda), group_size=96, **kw)
    with pytest.raises(KernelError, match=r"h must be a torch.float32 \(256, 256\) tensor"):
        awq_cuda.clip_error(w, torch.eye(128, device=cuda), group_size=128, ratios=torch.ones(2, device=cuda), **kw)
    with pytest.raises(KernelError, match="group_size=96"):
        awq_cuda.clip_error(w, torch.eye(256, device=cuda), group_size=96, ratios=torch.ones(2, device=cuda), **kw)
