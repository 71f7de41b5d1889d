import math

import pytest
import torch

from wq_ops.kernels.awq import reference as awq_reference
from wq_ops.quant import awq
from wq_ops.quant.rtn import fake_quantize


def test_candidate_scales_are_normalised(gen):
    x = torch.rand(64, generator=gen) * 5
    w = torch.rand(64, generator=gen)
    for ratio in (0.0, 0.35, 0.95):
        s = awq.candidate_scales(x, w, ratio)
        assert abs(float(s.max() * s.min()) - 1.0) < 1e-5
        assert bool((s > 0).all())


def test_weight_profile_matches_float64(gen):
    ws = [torch.randn(8, 64, generator=gen), torch.randn(4, 64, generator=gen)]
    w = torch.cat(ws).double().abs().reshape(12, 2, 32)
    ref = (w / w.amax(-1, keepdim=True)).reshape(12, 64).mean(0)
    assert torch.allclose(awq.weight_profile(ws, 32).double(), ref, rtol=1e-6)


def outlier_problem(gen, n_tokens=512, in_features=128, out_features=32):
    """A layer whose input has a few large channels: what AWQ is for."""
    x = torch.randn(n_tokens, in_features, generator=gen)
    big = torch.randperm(in_features, generator=gen)[:4]
    x[:, big] *= 20
    w = torch.randn(out_features, in_features, generator=gen)
    return x, w


def test_scale_search_beats_plain_rtn_on_outlier_inputs(seed):
    for k in range(3):
        gen = torch.Generator().manual_seed(seed + k)
        x, w = outlier_problem(gen)

        def loss_of(cand):
            return ((x @ cand["fc"].T - x @ w.T) ** 2).mean()

        r = awq.search_scales({"fc": w}, x.abs().mean(0), loss_of, bits=3, group_size=32, sym=False,
                              scale_dtype=torch.bfloat16, n_grid=20)
        assert r.ratio is not None and r.loss < 0.9 * r.loss_unscaled, (seed + k, r.loss, r.loss_unscaled)


def test_scale_search_keeps_identity_when_nothing_helps():
    w = torch.randn(16, 64)
    r = awq.search_scales({"fc": w}, torch.ones(64), lambda cand: torch.tensor(1.0), bits=4, group_size=32, sym=True,
                          scale_dtype=torch.float32, n_grid=5)
    assert r.ratio is None and torch.equal(r.scales, torch.ones(64))


def test_scale_search_reports_the_candidate_it_picked(gen):
    """The winner is picked on the device; the report values read back agree with it: the exponent, its
    loss, plain RTN's loss, and the scales are that candidate's."""
    w = torch.randn(16, 64, generator=gen)
    x_mean = torch.rand(64, generator=gen) + 0.1
    values = iter([5.0, 4.0, 3.0, 1.0, 2.0, 1.0])                  # candidate 3 first reaches the minimum

    r = awq.search_scales({"fc": w}, x_mean, lambda cand: torch.tensor(next(values)), bits=4, group_size=32,
                          sym=True, scale_dtype=torch.float32, n_grid=5)
    assert (r.ratio, r.loss, r.loss_unscaled) == ((3 - 1) / 5, 1.0, 5.0)
    assert torch.equal(r.scales, awq.candidate_scales(x_mean, awq.weight_profile([w], 32), 2 / 5))


def test_grouped_error_is_the_per_group_quadratic_form(gen):
    d = torch.randn(6, 64, generator=gen, dtype=torch.float64)
    h = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    h = h @ h.T
    got = awq.grouped_error(d, h, 32)
    for g in range(2):
        sl = slice(32 * g, 32 * (g + 1))
        ref = torch.einsum("oi,ij,oj->o", d[:, sl], h[sl, sl], d[:, sl])
        assert torch.allclose(got[:, g], ref)


@pytest.mark.parametrize("sym", [True, False])
def test_clip_search_never_worse_than_no_clip(gen, sym):
    x, w = outlier_problem(gen)
    w[:, 0] *= 8                                    # an outlier weight that stretches its group's range
    h = x.T @ x / x.shape[0]
    clip = awq.search_clip(w, h, bits=3, group_size=32, sym=sym, scale_dtype=torch.bfloat16, n_grid=20,
                           max_shrink=0.5)
    assert clip.shape == (32, 4) and bool((clip <= 1).all()) and bool((clip > 0.5).all())
    base = awq.grouped_error(fake_quantize(w, bits=3, group_size=32, sym=sym, scale_dtype=torch.bfloat16) - w, h, 32)
    clipped = awq.grouped_error(fake_quantize(w, bits=3, group_size=32, sym=sym, scale_dtype=torch.bfloat16,
                                              clip=clip) - w, h, 32)
    assert bool((clipped <= base * (1 + 1e-6)).all())
    assert float(clipped.sum()) < float(base.sum())
    assert not math.isnan(float(clipped.sum()))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, 128])
def test_fake_quant_matches_rtn_of_scaled_weights(gen, sym, group_size):
    w = torch.randn(16, 256, generator=gen)
    s = torch.rand(256, generator=gen) + 0.5
    got = awq_reference.fake_quant(w.to(torch.bfloat16), s, bits=4, group_size=group_size, sym=sym,
                                   scale_dtype=torch.bfloat16)
    want = fake_quantize(w.to(torch.bfloat16).float() * s, bits=4, group_size=group_size, sym=sym,
                         scale_dtype=torch.bfloat16) / s
    assert torch.equal(got, want)


def test_clip_error_matches_float64(gen):
    x, w = outlier_problem(gen, in_features=64, out_features=8)
    h = x.T @ x / x.shape[0]
    ratios = torch.tensor([1.0, 0.9, 0.7])
    got = awq_reference.clip_error(w, h, group_size=32, bits=3, sym=False, scale_dtype=torch.bfloat16, ratios=ratios)
    for k, ratio in enumerate(ratios.tolist()):
        q = fake_quantize(w, bits=3, group_size=32, sym=False, scale_dtype=torch.bfloat16,
                          clip=torch.full((8, 2), ratio))
        want = awq.grouped_error((q - w).double(), h.double(), 32)
        # Same codes; only the quadratic form's float32 sums differ from float64 (~1e-6 relative).
        assert torch.allclose(got[:, :, k].double(), want, rtol=1e-4), k
