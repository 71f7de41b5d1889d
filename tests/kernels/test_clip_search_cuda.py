"""CUDA clip search against kernels/clip_search/reference.py: the same factor per group, but where two
candidates' errors lie within float32 rounding of each other (the kernel sums in another order)."""

import pytest
import torch

from wq_ops.errors import KernelError
from wq_ops.kernels.clip_search.reference import CLIP_MAX_SHRINK, CLIP_STEPS, search_clip
from wq_ops.kernels.quant_pack.reference import grid_from_range

pytestmark = pytest.mark.gpu


def _error64(w, importance, factor, *, bits, group_size, sym, scale_dtype):
    """Each group's weighted squared error in float64 on the grid of `factor` (rows, n_groups)."""
    rows, cols = w.shape
    width = group_size or cols
    wg = w.reshape(rows, cols // width, width)
    scale, zero = grid_from_range(wg.amin(-1), wg.amax(-1), bits=bits, sym=sym, scale_dtype=scale_dtype, clip=factor)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1).to(w.dtype)
    q = torch.clamp(torch.round(wg / s) + z, 0, 2**bits - 1)
    d = ((q - z) * s - wg).double()
    weight = 1.0 if importance is None else importance.double().reshape(1, cols // width, width)
    return (d * d * weight).sum(-1)


@pytest.mark.parametrize("bits,sym", [(2, False), (3, True), (4, True), (4, False), (8, True)])
@pytest.mark.parametrize("rows,cols,group_size", [(1, 32, 32), (37, 256, 64), (512, 4096, 128), (64, 3072, None)])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("weighted", [True, False])
def test_the_kernel_chooses_the_references_factor(cuda, seed, bits, sym, rows, cols, group_size, scale_dtype,
                                                  weighted):
    from wq_ops.kernels.clip_search import cuda as clip_cuda

    g = torch.Generator().manual_seed(seed)
    # Heavy tails: groups whose best clip is well inside min-max, and some all-zero groups.
    w = (torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) ** 3).to(cuda)
    w[: max(rows // 8, 1), : group_size or cols] = 0
    importance = (torch.rand(cols, generator=g) * 10).to(cuda) if weighted else None
    args = dict(bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype, importance=importance)
    got = clip_cuda.search_clip(w, **args)
    want = search_clip(w, **args)
    assert got.shape == want.shape and got.dtype == torch.float32
    candidates = {round(1.0 - CLIP_MAX_SHRINK * k / CLIP_STEPS, 6) for k in range(CLIP_STEPS + 1)}
    assert {round(v, 6) for v in got.unique().tolist()} <= candidates
    differ = got != want
    if differ.any():            # a near-tie: both factors' errors equal to float32 rounding of the sums
        e_got = _error64(w, importance, got, bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype)
        e_want = _error64(w, importance, want, bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype)
        gap = (e_got - e_want).abs()[differ] / e_want[differ].clamp(min=1e-30)
        assert float(gap.max()) < 1e-5, f"max relative gap {float(gap.max()):.2e}"
    assert int(differ.sum()) <= max(1, differ.numel() // 200), f"{int(differ.sum())} of {differ.numel()} differ"


def test_bad_arguments_are_refused_by_name(cuda):
    from wq_ops.kernels.clip_search import cuda as clip_cuda

    w = torch.randn(4, 96, device=cuda)
    with pytest.raises(KernelError, match="96 columns are not a multiple of group_size=64"):
        clip_cuda.search_clip(w, bits=4, group_size=64, sym=True, scale_dtype=torch.bfloat16)
    with pytest.raises(KernelError, match="importance must be a torch.float32"):
        clip_cuda.search_clip(w, bits=4, group_size=32, sym=True, scale_dtype=torch.bfloat16,
                              importance=torch.ones(95, device=cuda))
    with pytest.raises(KernelError, match="w must be a torch.float32"):
        clip_cuda.search_clip(w.bfloat16(), bits=4, group_size=32, sym=True, scale_dtype=torch.bfloat16)
