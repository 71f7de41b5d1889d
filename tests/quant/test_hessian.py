import pytest
import torch

from wq_ops.quant.hessian import (
    accumulate_input_stats_,
    add_upper_gram_,
    hessian_of,
    new_input_stats,
    output_error,
    quadratic_sum,
    summarize_outliers,
)


def test_accumulated_hessian_matches_float64(gen):
    x = torch.randn(5, 37, 48, generator=gen, dtype=torch.float64)
    stats = new_input_stats(48, "cpu")
    for chunk in x.split(2):                       # micro-batches of 2, 2, 1 samples
        accumulate_input_stats_(stats, chunk.to(torch.bfloat16))
    xb = x.to(torch.bfloat16).double().reshape(-1, 48)
    ref = xb.T @ xb / xb.shape[0]
    # bf16 inputs are exact in float32; the float32 sums over 185 tokens lose ~1e-7 relative.
    assert torch.allclose(hessian_of(stats).double(), ref, rtol=1e-5, atol=1e-6)
    assert stats.n_tokens == 185
    assert torch.allclose(stats.abs_max.double(), xb.abs().amax(0))
    assert torch.allclose((stats.abs_sum / 185).double(), xb.abs().mean(0), rtol=1e-5)


def test_output_error_is_the_relative_output_mse(gen):
    x = torch.randn(300, 32, generator=gen, dtype=torch.float64)
    w = torch.randn(8, 32, generator=gen, dtype=torch.float64)
    w_hat = w + 0.1 * torch.randn(8, 32, generator=gen, dtype=torch.float64)
    h = x.T @ x / 300
    direct = ((x @ (w - w_hat).T) ** 2).sum() / ((x @ w.T) ** 2).sum()
    assert abs(output_error(w, w_hat, h) - float(direct)) < 1e-12


def test_outlier_summary_finds_the_outlier_channel(gen):
    x = torch.randn(64, 16, generator=gen) * 0.1
    x[5, 11] = 20.0
    stats = new_input_stats(16, "cpu")
    accumulate_input_stats_(stats, x)
    s = summarize_outliers(stats, top_k=3)
    assert s.top_channels[0] == 11 and s.n_outlier_channels == 1 and s.absmax == 20.0


def _quadratic_case(gen, device, rows=96, n=256):
    x = torch.randn(4 * n, n, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3.0, n, dtype=torch.float64)
    h = x.T @ x / x.shape[0]
    d = torch.randn(rows, n, generator=gen, dtype=torch.float64) * 0.01
    exact = float((d @ h * d).sum())
    return d.to(device, torch.float32), h.to(device, torch.float32), exact


def test_quadratic_sum_matches_float64(gen):
    d, h, exact = _quadratic_case(gen, "cpu")
    assert abs(float(quadratic_sum(d, h)) / exact - 1) < 1e-5


@pytest.mark.gpu
def test_quadratic_sum_on_tensor_cores_is_within_its_stated_error(gen):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for _ in range(3):                                          # fresh random inputs each time
        d, h, exact = _quadratic_case(gen, "cuda")
        assert abs(float(quadratic_sum(d, h)) / exact - 1) < 2e-3


@pytest.mark.parametrize("n,min_block", [(100, 16), (37, 16), (64, 64), (4096, 2048), (4100, 512)])
def test_upper_gram_blocks_match_float64(gen, n, min_block):
    """Up to 8 uneven column blocks, each block row against every column from its block on."""
    x = torch.randn(50, n, generator=gen, dtype=torch.float64)
    xtx = torch.zeros(n, n, dtype=torch.float32)
    add_upper_gram_(xtx, x.to(torch.float32), min_block=min_block)
    add_upper_gram_(xtx, x.to(torch.float32), min_block=min_block)           # it accumulates
    ref = 2 * x.T @ x
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool))
    assert torch.allclose(xtx.double()[upper], ref[upper], rtol=1e-5, atol=1e-4)


def test_hessian_is_exactly_symmetric(gen):
    stats = new_input_stats(300, "cpu")
    accumulate_input_stats_(stats, torch.randn(2, 40, 300, generator=gen))
    h = hessian_of(stats)
    assert torch.equal(h, h.T)


@pytest.mark.gpu
def test_tensor_core_gram_matches_float64(gen):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for n in (1000, 2048, 5000, 8200):                              # 1, 2, 4 (uneven) and 8 (uneven) blocks
        x = torch.randn(3, 256, n, generator=gen).to(torch.bfloat16)
        stats = new_input_stats(n, "cuda")
        for chunk in x.split(1):
            accumulate_input_stats_(stats, chunk.cuda())
        xd = x.double().reshape(-1, n)
        assert torch.allclose(hessian_of(stats).double().cpu(), xd.T @ xd / xd.shape[0], rtol=1e-4, atol=1e-5)
