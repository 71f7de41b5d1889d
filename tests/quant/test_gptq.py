import pytest
import torch

from tests.quant.naive import naive_gptq
from wq_ops.errors import QuantizationError
from wq_ops.kernels.gptq import reference as gptq_reference
from wq_ops.kernels.gptq.split_update import SplitUpdateSolver
from wq_ops.quant.gptq import hessian_factor, quantize_gptq
from wq_ops.quant.hessian import output_error
from wq_ops.quant.result import dequantize
from wq_ops.quant.rtn import quantize_rtn


def correlated_hessian(gen: torch.Generator, n_tokens: int, in_features: int, dtype=torch.float64) -> torch.Tensor:
    """X^T X / n of inputs with correlated channels of unequal scale, like a real layer input."""
    mix = torch.randn(in_features, in_features, generator=gen, dtype=dtype) / 8 + torch.eye(in_features, dtype=dtype)
    x = torch.randn(n_tokens, in_features, generator=gen, dtype=dtype) @ mix
    x = x * (torch.rand(in_features, generator=gen, dtype=dtype) * 3 + 0.1)
    return x.T @ x / n_tokens


CASES = [  # bits, group_size, sym, act_order, block_size
    (4, 64, True, False, 32),
    (4, 64, False, True, 128),
    (3, None, True, True, 64),
    (2, 32, False, False, 32),
    (8, 128, True, False, 128),
    (4, 32, True, True, 48),     # block size not a multiple of the group size
]


@pytest.mark.parametrize("bits,group_size,sym,act_order,block_size", CASES)
def test_gptq_matches_float64_obq_reference(gen, bits, group_size, sym, act_order, block_size):
    h = correlated_hessian(gen, 1024, 256)
    h[7, :] = 0
    h[:, 7] = 0   # a dead input channel
    w = torch.randn(40, 256, generator=gen)
    r = quantize_gptq(w, h.float(), bits=bits, group_size=group_size, sym=sym, damp_frac=0.01,
                      act_order=act_order, block_size=block_size, scale_dtype=torch.bfloat16)
    ours = dequantize(r).double()
    ref = naive_gptq(w, h, bits=bits, group_size=group_size, sym=sym, damp_frac=0.01, act_order=act_order)
    # The reference runs in float64 without blocking or Cholesky. Float32 rounding can flip a code whose
    # value sits on a rounding boundary, and GPTQ's compensation then moves the rest of that row: rare
    # (rows are independent), and the objective barely moves. So: almost every weight identical, and
    # the output error within 2% of the reference's.
    same = float((ours == ref).double().mean())
    assert same > 0.95, same
    w0 = w.double().clone()
    w0[:, 7] = 0
    e_ours, e_ref = output_error(w0, ours, h), output_error(w0, ref, h)
    assert abs(e_ours - e_ref) <= 0.02 * e_ref, (e_ours, e_ref)
    assert bool((ours[:, 7] == 0).all()), "a dead column must quantize to 0"
    assert r.damp_frac == 0.01


@pytest.mark.parametrize("bits,group_size,sym", [(4, 64, True), (3, 64, False), (4, None, True), (2, 32, True)])
def test_gptq_loss_below_rtn_on_same_hessian(seed, bits, group_size, sym):
    # Not a theorem for every input, so: several fresh seeds, each with a margin.
    for k in range(5):
        gen = torch.Generator().manual_seed(seed + k)
        h = correlated_hessian(gen, 2048, 256)
        w = torch.randn(64, 256, generator=gen)
        g = quantize_gptq(w, h.float(), bits=bits, group_size=group_size, sym=sym, damp_frac=0.01,
                          act_order=False, block_size=128, scale_dtype=torch.bfloat16)
        r = quantize_rtn(w, bits=bits, group_size=group_size, sym=sym, scale_dtype=torch.bfloat16)
        e_gptq = output_error(w.double(), dequantize(g).double(), h)
        e_rtn = output_error(w.double(), dequantize(r).double(), h)
        assert e_gptq < 0.85 * e_rtn, (seed + k, e_gptq, e_rtn)


def test_act_order_does_not_need_g_idx(gen):
    h = correlated_hessian(gen, 1024, 128)
    w = torch.randn(16, 128, generator=gen)
    r = quantize_gptq(w, h.float(), bits=4, group_size=32, sym=True, damp_frac=0.01, act_order=True,
                      block_size=32, scale_dtype=torch.bfloat16)
    # Static groups: column j uses group j // 32 in the original order, so the stored grid alone
    # reproduces every weight.
    assert r.scale.shape == (16, 4)
    assert torch.equal(dequantize(r), ((r.codes.float() - r.zero.float().repeat_interleave(32, 1))
                                       * r.scale.repeat_interleave(32, 1)))


def test_damping_escalates_for_a_singular_hessian(gen):
    x = torch.randn(8, 64, generator=gen, dtype=torch.float64)     # rank 8 < 64
    h = (x.T @ x).float()
    h -= 1e-3 * torch.eye(64)            # slightly indefinite: a tiny damping cannot rescue it
    factor, damp = hessian_factor(h, damp_frac=1e-6)
    assert damp > 1e-6
    assert bool(torch.isfinite(factor).all())


def test_nan_hessian_is_a_clear_error(gen):
    h = torch.eye(32)
    h[3, 3] = float("nan")
    with pytest.raises(QuantizationError, match="NaN or Inf"):
        quantize_gptq(torch.randn(4, 32, generator=gen), h, bits=4, group_size=32, sym=True, damp_frac=0.01,
                      act_order=False, block_size=32, scale_dtype=torch.bfloat16)


def test_negative_definite_hessian_cannot_be_rescued():
    with pytest.raises(QuantizationError, match="not positive definite"):
        hessian_factor(-torch.eye(16) * 100 + torch.ones(16, 16), damp_frac=0.01)


def test_a_factor_too_small_to_divide_by_is_a_clear_error(gen, monkeypatch):
    """A factor whose pivot underflows gives a non-finite Mu; the solve must not return its garbage."""
    from wq_ops.quant import gptq

    def underflowing(h, *, damp_frac, names=()):
        m = torch.eye(h.shape[-1], dtype=h.dtype).repeat(h.shape[0], 1, 1)
        m[:, 0, 1], m[:, 1, 1] = 1.0, 0.0
        return m, [damp_frac] * h.shape[0]

    monkeypatch.setattr(gptq, "hessian_factors", underflowing)
    with pytest.raises(QuantizationError, match="pivot too small"):
        quantize_gptq(torch.randn(4, 32, generator=gen), torch.eye(32), bits=4, group_size=32, sym=True,
                      damp_frac=0.01, act_order=False, block_size=32, scale_dtype=torch.bfloat16)


def test_dead_columns_are_pinned_to_zero(gen):
    """A column whose input is always 0 gets code of value 0 and does not stop the factorization."""
    h = correlated_hessian(gen, 256, 64).float()
    h[5, :] = h[:, 5] = 0
    w = torch.randn(8, 64, generator=gen)
    r = quantize_gptq(w, h, bits=4, group_size=32, sym=True, damp_frac=0.01, act_order=True, block_size=16,
                      scale_dtype=torch.bfloat16)
    assert torch.equal(dequantize(r)[:, 5], torch.zeros(8))
    assert bool(torch.isfinite(r.row_loss).all())


def test_inputs_are_not_modified(gen):
    h = correlated_hessian(gen, 256, 64).float()
    h[0, :] = 0
    h[:, 0] = 0
    w = torch.randn(8, 64, generator=gen)
    w0, h0 = w.clone(), h.clone()
    quantize_gptq(w, h, bits=4, group_size=32, sym=False, damp_frac=0.01, act_order=True, block_size=32,
                  scale_dtype=torch.bfloat16)
    assert torch.equal(w, w0) and torch.equal(h, h0)


@pytest.mark.parametrize("n", [1, 7, 64, 257])
def test_hessian_factor_is_upper_with_m_mt_equal_to_the_damped_hessian(n):
    """M M^T = H + damp I with M upper triangular, and M^-1 is the paper's factor (the upper Cholesky
    factor of the damped H^-1), against the explicit float64 route; float32 within rounding."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2 * n + 3, n, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, n, dtype=torch.float64)
    h = x.T @ x / x.shape[0]
    m, damp = hessian_factor(h, damp_frac=0.01)
    damped = h + damp * torch.diagonal(h).mean() * torch.eye(n, dtype=torch.float64)
    assert torch.equal(m, torch.triu(m)) and bool((torch.diagonal(m) > 0).all())
    torch.testing.assert_close(m @ m.T, damped, rtol=1e-10, atol=1e-12)
    paper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    torch.testing.assert_close(torch.linalg.inv(m), paper, rtol=1e-8, atol=1e-10)
    m32, _ = hessian_factor(h.float(), damp_frac=0.01)
    err = float((m32.double() - m).norm() / m.norm())
    assert err < 1e-5, err


@pytest.mark.parametrize("bits,group_size,sym,act_order,block_size", CASES)
def test_gptq_in_float64_gives_the_paper_algorithms_codes(gen, bits, group_size, sym, act_order, block_size):
    """In float64 the blocked solve without an inverse makes exactly the choices of the paper's
    column-by-column algorithm with the inverse Hessian (tests/quant/naive.py): every code the same."""
    h = correlated_hessian(gen, 1024, 256)
    h[11, :] = 0
    h[:, 11] = 0
    w = torch.randn(24, 256, generator=gen, dtype=torch.float64)
    w = w.float().double()                              # on float32 values, so both grids agree exactly
    r = quantize_gptq(w, h, bits=bits, group_size=group_size, sym=sym, damp_frac=0.01, act_order=act_order,
                      block_size=block_size, scale_dtype=torch.bfloat16)
    ref = naive_gptq(w, h, bits=bits, group_size=group_size, sym=sym, damp_frac=0.01, act_order=act_order)
    assert torch.equal(dequantize(r).double(), ref)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_scales_cover_every_group_after_storage_rounding(bits):
    """GPTQ rounds scales up to their storage dtype, so no weight of a group falls outside its grid (a
    clipped extreme would be an error its updates spread); RTN rounds to nearest and does clip some."""
    from wq_ops.quant.rtn import quantize_rtn

    g = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 256, generator=g)
    x = torch.randn(512, 256, generator=g)
    h = x.T @ x / 512
    maxq = 2**bits - 1
    exact = 2 * w.reshape(64, 4, 64).abs().amax(dim=-1) / maxq               # (out, groups) float32
    kw = dict(bits=bits, group_size=64, sym=True, scale_dtype=torch.bfloat16)
    gptq = quantize_gptq(w, h, damp_frac=0.01, act_order=False, block_size=32, **kw)
    assert bool((gptq.scale >= exact).all())
    assert bool((gptq.scale.to(torch.bfloat16).float() == gptq.scale).all())      # still stored exactly
    rtn = quantize_rtn(w, **kw)
    assert bool((rtn.scale < exact).any()) and bool((rtn.scale <= exact * (1 + 2**-8)).all())


def test_solve_block_into_writes_what_solve_block_returns(gen):
    """The in-place form of the reference block solve (the CUDA kernel's second contract): the codes into
    a column block of the layer's codes, the losses added, the deltas as [hi | hi | lo]."""
    out_features, b = 24, 32
    h = correlated_hessian(gen, 256, b).float()
    m, _ = hessian_factor(h, damp_frac=0.01)
    m_diag = torch.diagonal(m).clone()
    w = torch.randn(out_features, b, generator=gen)
    t = w + 0.05 * torch.randn(out_features, b, generator=gen)
    scale = torch.rand(out_features, 2, generator=gen) * 0.3 + 0.1
    zero = torch.randint(0, 16, (out_features, 2), generator=gen, dtype=torch.uint8)
    group = torch.arange(b, dtype=torch.int32) % 2
    args = (t, w, m / m_diag, m_diag, scale, zero, group)
    ref = gptq_reference.solve_block(*args, bits=4)
    codes = torch.zeros(out_features, 3 * b, dtype=torch.uint8)
    loss = torch.full((out_features,), 0.5)
    parts = torch.empty(out_features, 3 * b, dtype=torch.bfloat16)
    gptq_reference.solve_block_into_(*args, bits=4, codes=codes[:, b:2 * b], loss=loss, parts=parts)
    assert torch.equal(codes[:, b:2 * b], ref.codes) and not codes[:, :b].any() and not codes[:, 2 * b:].any()
    torch.testing.assert_close(loss, ref.loss + 0.5)
    hi = ref.delta.to(torch.bfloat16)
    assert torch.equal(parts, torch.cat([hi, hi, (ref.delta - hi.float()).to(torch.bfloat16)], dim=1))


@pytest.mark.parametrize("in_features,block_size,act_order", [(544, 128, False), (512, 64, True), (96, 128, False)])
def test_the_split_update_loop_agrees_with_float32_updates(gen, in_features, block_size, act_order):
    """The CUDA backend's layer loop (the solve writing codes, losses and the update's bf16 parts in place,
    one GEMM per block) run on the CPU with the reference in-place solve, against the float32 loop: a
    code may flip where a target sits within about 2^-16 of an update from a rounding boundary (about
    0.1% of them at most), and the proxy loss moves by far less than 0.1%. Covers a narrower last block
    and a layer of one block."""
    h = correlated_hessian(gen, 2048, in_features).float()
    w = torch.randn(192, in_features, generator=gen) * 0.02
    kw = dict(bits=4, group_size=32, sym=False, damp_frac=0.01, act_order=act_order, block_size=block_size,
              scale_dtype=torch.bfloat16)
    plain = quantize_gptq(w, h, **kw)
    split = quantize_gptq(w, h, solver=SplitUpdateSolver(gptq_reference.solve_blocks_into_, needs_cuda=False), **kw)
    # A flipped code feeds its own error forward, so flips cascade along a row: over 151 seeds (544 x 128)
    # at most 0.11% of codes flipped (seed 1803550528) and the loss moved by at most 0.041%.
    assert (split.codes != plain.codes).float().mean().item() < 2e-3
    assert abs(split.loss / plain.loss - 1) < 1e-3
    if in_features <= block_size:                  # no update at all: the same solve, bit for bit
        assert torch.equal(split.codes, plain.codes)


def _same_result(a, b) -> bool:
    return (torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
            and torch.equal(a.row_loss, b.row_loss) and a.damp_frac == b.damp_frac)


@pytest.mark.parametrize("solver", ["float32", "split"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("out_features,in_features,group_size", [(48, 192, 32), (3, 131, None), (1, 70, None)])
def test_a_batch_of_layers_gets_each_layer_s_own_result_bit_for_bit(gen, solver, act_order, out_features,
                                                                    in_features, group_size):
    """quantize_gptq_many (a routed MLP's experts in one batch) against quantize_gptq of each layer alone:
    the same codes, grid, row losses and damping, for the float32 loop and the split-update loop, with
    act-order (each layer its own permutation), a dead input channel in one layer and, in another, a
    Hessian that needs ten times the damping (its retry must not disturb the others). Odd sizes too: a GEMM
    whose operands start at another alignment can sum in another order (each layer's part of the batch's
    tensors is aligned as a fresh tensor would be: `wq_ops.kernels.gptq.batch`)."""
    from wq_ops.quant.gptq import quantize_gptq_many

    batch = 4
    hs = [correlated_hessian(gen, 1024, in_features).float() for _ in range(batch)]
    hs[1][5, :] = 0
    hs[1][:, 5] = 0
    low = torch.randn(in_features, 3, generator=gen)              # rank 3: singular at the first damping
    hs[2] = (low @ low.T).float() - 1e-4 * torch.eye(in_features)
    ws = torch.randn(batch, out_features, in_features, generator=gen) * 0.02
    kw = dict(bits=4, group_size=group_size, sym=False, damp_frac=1e-6, act_order=act_order, block_size=64,
              scale_dtype=torch.bfloat16,
              solver=gptq_reference.FLOAT32_SOLVER if solver == "float32" else
              SplitUpdateSolver(gptq_reference.solve_blocks_into_, needs_cuda=False))
    many = quantize_gptq_many(ws, torch.stack(hs), **kw)
    alone = [quantize_gptq(ws[b], hs[b], **kw) for b in range(batch)]
    assert [r.damp_frac for r in many][2] > 1e-6 and many[0].damp_frac == 1e-6
    for got, want in zip(many, alone):
        assert _same_result(got, want)


def test_a_batch_refuses_mismatched_hessians_with_one_line(gen):
    from wq_ops.quant.gptq import quantize_gptq_many

    kw = dict(bits=4, group_size=32, sym=True, damp_frac=0.01, act_order=False, block_size=32,
              scale_dtype=torch.bfloat16)
    w = torch.randn(2, 8, 64, generator=gen)
    with pytest.raises(QuantizationError, match="3 Hessians for 2 weights"):
        quantize_gptq_many(w, torch.eye(64).expand(3, 64, 64), **kw)
    with pytest.raises(QuantizationError, match="a GPTQ batch takes weights"):
        quantize_gptq_many(w[0], torch.eye(64), **kw)
    h = torch.eye(64).repeat(2, 1, 1)
    h[1, 3, 3] = float("nan")
    with pytest.raises(QuantizationError, match="^experts.1.down_proj: the Hessian holds NaN or Inf"):
        quantize_gptq_many(w, h, names=["experts.0.down_proj", "experts.1.down_proj"], **kw)
