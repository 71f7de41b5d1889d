"""SmoothQuant's smoothing factors against a float64 reference, and what they promise: the layer's output is
unchanged, and with alpha = 0.5 each channel's activation and weight maxima meet at their geometric mean."""

import pytest
import torch

from wq_ops.quant.smoothquant import smoothing_scales


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_smoothing_scales_match_float64(gen, alpha):
    x_absmax = torch.rand(64, generator=gen) * 20
    x_absmax[3] = 0.0                                                     # a channel no token uses
    weights = [torch.randn(32, 64, generator=gen), torch.randn(16, 64, generator=gen) * 3]
    weights[0][:, 5] = 0.0
    weights[1][:, 5] = 0.0                                                # a column no weight reads
    s = smoothing_scales(x_absmax, weights, alpha=alpha)
    w_absmax = torch.cat([w.double() for w in weights]).abs().amax(dim=0)
    want = x_absmax.double() ** alpha / w_absmax ** (1 - alpha)
    want[3] = want[5] = 1.0
    assert s.dtype == torch.float32
    assert torch.allclose(s.double(), want, rtol=1e-6, atol=0)


def test_smoothing_keeps_the_output_and_balances_the_maxima(gen):
    x = torch.randn(200, 64, generator=gen, dtype=torch.float64) * torch.logspace(-1, 2, 64, dtype=torch.float64)
    w = torch.randn(48, 64, generator=gen, dtype=torch.float64) * 0.05
    s = smoothing_scales(x.abs().amax(dim=0).float(), [w.float()], alpha=0.5).double()
    assert torch.allclose((x / s) @ (w * s).T, x @ w.T, rtol=1e-12, atol=1e-12)
    x_after, w_after = (x / s).abs().amax(dim=0), (w * s).abs().amax(dim=0)
    assert torch.allclose(x_after, w_after, rtol=1e-6)                    # both sqrt(max|x| max|w|)
    assert float(x_after.max()) < float(x.abs().max()) / 10               # the outlier channels tamed
