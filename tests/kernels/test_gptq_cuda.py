"""The CUDA GPTQ block solve against kernels/gptq/reference.py: bit-identical codes and deltas."""

import pytest
import torch

from wq_ops.kernels.gptq import reference

pytestmark = pytest.mark.gpu


def _block_inputs(out_features: int, n_cols: int, bits: int, sym: bool, device: torch.device, seed: int):
    """A block's targets and original weights, the block of Mu and M's diagonal from a fresh Hessian, and
    a grid of 3 groups that the columns use out of order (as under act-order)."""
    from wq_ops.quant.gptq import hessian_factor

    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(out_features, n_cols, generator=g)
    t = w + 0.1 * torch.randn(out_features, n_cols, generator=g)
    x = torch.randn(4 * n_cols, n_cols, generator=g) * torch.rand(n_cols, generator=g).add(0.1)
    m, _ = hessian_factor(x.T @ x / x.shape[0], damp_frac=0.01)
    m_diag = torch.diagonal(m).clone()
    m_unit = m / m_diag
    n_groups = 3
    group = torch.randint(0, n_groups, (n_cols,), generator=g, dtype=torch.int32)
    scale = w.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 0.5) * torch.rand(out_features, n_groups,
                                                                                     generator=g).add(0.5)
    zero = torch.full((out_features, n_groups), 2 ** (bits - 1), dtype=torch.uint8)
    if not sym:
        zero = torch.randint(0, 2**bits, (out_features, n_groups), generator=g, dtype=torch.uint8)
    return [x.to(device) for x in (t, w, m_unit, m_diag, scale, zero, group)]


@pytest.mark.parametrize("out_features", [1, 3, 118, 4096, 9000])
@pytest.mark.parametrize("n_cols", [1, 32, 50, 64, 128])
@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (3, True), (8, True), (2, False)])
def test_solve_block_matches_reference(cuda, out_features, n_cols, bits, sym):
    from wq_ops.kernels.gptq import cuda as gptq_cuda

    args = _block_inputs(out_features, n_cols, bits, sym, cuda, seed=out_features * n_cols + bits)
    ref = reference.solve_block(*args, bits=bits)
    got = gptq_cuda.solve_block(*args, bits=bits)
    # The kernel reproduces the reference's float32 operation order for codes and deltas, so they are equal
    # bit for bit; the loss is summed in another order.
    assert torch.equal(got.codes, ref.codes)
    assert torch.equal(got.delta, ref.delta)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-7)


def test_solve_block_strided_views(cuda):
    """The solver reads column blocks of wider matrices, and a block of the full Mu, in place."""
    from wq_ops.kernels.gptq import cuda as gptq_cuda

    t, w, m_unit, m_diag, scale, zero, group = _block_inputs(256, 128, 4, True, cuda, seed=7)
    wide_t, wide_w = torch.zeros(256, 512, device=cuda), torch.zeros(256, 512, device=cuda)
    wide_t[:, 128:256], wide_w[:, 128:256] = t, w
    wide_m = torch.zeros(384, 384, device=cuda)
    wide_m[128:256, 128:256] = m_unit
    ref = reference.solve_block(t, w, m_unit, m_diag, scale, zero, group, bits=4)
    got = gptq_cuda.solve_block(wide_t[:, 128:256], wide_w[:, 128:256], wide_m[128:256, 128:256], m_diag, scale,
                                zero, group, bits=4)
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.delta, ref.delta)


def test_solve_block_names_a_bad_argument(cuda):
    from wq_ops.errors import KernelError
    from wq_ops.kernels.gptq import cuda as gptq_cuda

    t, w, m_unit, m_diag, scale, zero, group = _block_inputs(64, 32, 4, True, cuda, seed=1)
    with pytest.raises(KernelError, match=r"group must be a torch.int32 \(32,\) tensor on cuda:0; got torch.int64"):
        gptq_cuda.solve_block(t, w, m_unit, m_diag, scale, zero, group.long(), bits=4)
    with pytest.raises(KernelError, match=r"w must be a torch.float32 \(64, 32\) tensor.*got torch.float32 \(64, 16\)"):
        gptq_cuda.solve_block(t, w[:, :16], m_unit, m_diag, scale, zero, group, bits=4)
    with pytest.raises(KernelError, match="m_diag must be .* on cuda:0; got .* on cpu"):
        gptq_cuda.solve_block(t, w, m_unit, m_diag.cpu(), scale, zero, group, bits=4)
    with pytest.raises(KernelError, match="bits=9 must be 1..8"):
        gptq_cuda.solve_block(t, w, m_unit, m_diag, scale, zero, group, bits=9)


@pytest.mark.parametrize("act_order,sym", [(True, True), (False, False)])
def test_quantize_gptq_cuda_backend_matches_reference(cuda, act_order, sym):
    """Whole-layer GPTQ (groups, act-order, a dead column, a last block narrower than 128): the CUDA
    backend (its block-solve kernel, tensor-core updates) against the reference backend (float32 updates)
    on the same GPU: codes of targets near a rounding boundary may differ, the loss by far less than 0.1%."""
    from wq_ops.kernels.gptq.cuda import CUDA_SOLVER
    from wq_ops.quant.gptq import quantize_gptq

    g = torch.Generator(device="cpu").manual_seed(3)
    w = torch.randn(512, 1088, generator=g).to(cuda)
    x = torch.randn(4096, 1088, generator=g).to(cuda)
    x[:, 5] = 0
    h = x.T @ x / x.shape[0]
    kw = dict(bits=4, group_size=64, sym=sym, damp_frac=0.01, act_order=act_order, block_size=128,
              scale_dtype=torch.bfloat16)
    ref = quantize_gptq(w, h, **kw)
    got = quantize_gptq(w, h, solver=CUDA_SOLVER, **kw)
    assert (got.codes != ref.codes).float().mean().item() < 1e-3
    assert abs(got.loss / ref.loss - 1) < 1e-3


def test_split_update_is_within_its_stated_error_of_float64(cuda):
    """The tensor-core lazy update (bf16 hi/lo parts, one GEMM) against float64, on fresh inputs shaped
    like an 8B down_proj's first block: about 2^-16 of the update's size."""
    from tests.kernels.test_gptq_split_update import split_update_error

    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        assert split_update_error(gen, cuda, n=2048, rows=512) < 2**-15


@pytest.mark.parametrize("out_features,n_cols,bits,sym", [(1, 1, 4, True), (118, 50, 3, True), (4096, 128, 4, False),
                                                         (9000, 64, 2, False), (333, 128, 8, True)])
@pytest.mark.parametrize("with_parts", [True, False])
def test_solve_block_into_matches_reference(cuda, out_features, n_cols, bits, sym, with_parts):
    """The kernel's in-place entry point against reference.solve_block_into_: codes written into a column
    block of a wider matrix and nowhere else, losses added to what was there, and the deltas' bf16 parts
    [hi | hi | lo] into a strided view, all bit for bit (the loss float32-close)."""
    from wq_ops.kernels.gptq import cuda as gptq_cuda

    args = _block_inputs(out_features, n_cols, bits, sym, cuda, seed=out_features + n_cols * bits)
    outs = []
    for solve in (reference.solve_block_into_, gptq_cuda.solve_block_into_):
        codes = torch.full((out_features, 3 * n_cols), 7, dtype=torch.uint8, device=cuda)
        loss = torch.full((out_features,), 0.25, device=cuda)
        parts = torch.full((out_features, 4 * n_cols), 3.0, dtype=torch.bfloat16, device=cuda)
        solve(*args, bits=bits, codes=codes[:, n_cols:2 * n_cols], loss=loss,
              parts=parts[:, n_cols:] if with_parts else None)
        outs.append((codes, loss, parts))
    (ref_codes, ref_loss, ref_parts), (codes, loss, parts) = outs
    assert torch.equal(codes, ref_codes)
    assert torch.equal(parts, ref_parts)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)


def test_solve_block_into_names_a_bad_argument(cuda):
    from wq_ops.errors import KernelError
    from wq_ops.kernels.gptq import cuda as gptq_cuda

    args = _block_inputs(64, 32, 4, True, cuda, seed=2)
    codes = torch.empty(64, 32, dtype=torch.uint8, device=cuda)
    loss = torch.zeros(64, device=cuda)
    with pytest.raises(KernelError,
                       match=r"parts must be a torch.bfloat16 \(64, 96\) tensor on cuda:0; got torch.float32"):
        gptq_cuda.solve_block_into_(*args, bits=4, codes=codes, loss=loss, parts=torch.empty(64, 96, device=cuda))
    with pytest.raises(KernelError, match=r"parts must be .* \(64, 96\) .*; got torch.bfloat16 \(64, 64\)"):
        gptq_cuda.solve_block_into_(*args, bits=4, codes=codes, loss=loss,
                                   parts=torch.empty(64, 64, dtype=torch.bfloat16, device=cuda))
    with pytest.raises(KernelError, match=r"parts must have contiguous rows"):
        gptq_cuda.solve_block_into_(*args, bits=4, codes=codes, loss=loss,
                                   parts=torch.empty(96, 64, dtype=torch.bfloat16, device=cuda).T)
    with pytest.raises(KernelError, match=r"codes must be a torch.uint8 \(64, 32\) tensor"):
        gptq_cuda.solve_block_into_(*args, bits=4, codes=codes[:, :16], loss=loss, parts=None)
    with pytest.raises(KernelError, match=r"loss must be a torch.float32 \(64,\) tensor"):
        gptq_cuda.solve_block_into_(*args, bits=4, codes=codes, loss=loss.double(), parts=None)


def test_quantize_gptq_on_the_gpu_agrees_with_the_cpu(cuda):
    """Whole-layer GPTQ on the GPU (tensor-core lazy updates) against the CPU's float32 updates: the
    codes of a few targets near a rounding boundary may differ, the proxy loss by far less than 0.1%."""
    from wq_ops.kernels.gptq.cuda import CUDA_SOLVER
    from wq_ops.quant.gptq import quantize_gptq

    g = torch.Generator(device="cpu").manual_seed(11)
    w = torch.randn(256, 1024, generator=g) * 0.02
    x = torch.randn(4096, 1024, generator=g) * torch.rand(1024, generator=g).pow(3).mul(4).add(0.05)
    h = x.T @ x / x.shape[0]
    kw = dict(bits=4, group_size=128, sym=True, damp_frac=0.01, act_order=False, block_size=128,
              scale_dtype=torch.bfloat16)
    cpu = quantize_gptq(w, h, **kw)
    gpu = quantize_gptq(w.to(cuda), h.to(cuda), solver=CUDA_SOLVER, **kw)
    assert (gpu.codes.cpu() != cpu.codes).float().mean().item() < 1e-3
    assert abs(gpu.loss / cpu.loss - 1) < 1e-3


@pytest.mark.parametrize("n_cols,parts", [(128, True), (64, False), (40, True)])
def test_the_batched_solve_writes_what_each_problem_alone_writes(cuda, n_cols, parts):
    """One launch for a batch of problems (a routed MLP's experts) against the one-problem kernel on each:
    codes, losses and update operands bit for bit, the problems cut as the layer loop cuts them (column
    blocks of (batch, out, in) tensors, Mu's diagonal blocks, per-problem groups)."""
    from wq_ops.kernels.gptq import cuda as gptq_cuda

    batch, rows, width = 3, 80, 2 * n_cols
    probs = [_block_inputs(rows, n_cols, 4, b % 2 == 0, cuda, seed=b) for b in range(batch)]
    t, w = (torch.zeros(batch, rows, width, device=cuda) for _ in range(2))
    m_unit = torch.zeros(batch, width, width, device=cuda)
    m_diag, group = torch.zeros(batch, width, device=cuda), torch.zeros(batch, width, dtype=torch.int32, device=cuda)
    for b, (tb, wb, mb, db, _, _, gb) in enumerate(probs):
        t[b, :, :n_cols], w[b, :, :n_cols], m_unit[b, :n_cols, :n_cols] = tb, wb, mb
        m_diag[b, :n_cols], group[b, :n_cols] = db, gb
    scale = torch.stack([p[4] for p in probs]).contiguous()
    zero = torch.stack([p[5] for p in probs]).contiguous()
    codes = torch.zeros(batch, rows, width, dtype=torch.uint8, device=cuda)
    loss = torch.ones(batch, rows, device=cuda)
    part = torch.zeros(batch, rows, 3 * n_cols, dtype=torch.bfloat16, device=cuda) if parts else None
    gptq_cuda.solve_blocks_into_unchecked_(t[:, :, :n_cols], w[:, :, :n_cols], m_unit[:, :n_cols, :n_cols],
                                           m_diag[:, :n_cols], scale, zero, group[:, :n_cols], bits=4,
                                           codes=codes[:, :, :n_cols], loss=loss, parts=part)
    for b, args in enumerate(probs):
        want_codes = torch.zeros(rows, n_cols, dtype=torch.uint8, device=cuda)
        want_loss = torch.ones(rows, device=cuda)
        want_parts = torch.zeros(rows, 3 * n_cols, dtype=torch.bfloat16, device=cuda) if parts else None
        gptq_cuda.solve_block_into_(*args, bits=4, codes=want_codes, loss=want_loss, parts=want_parts)
        assert torch.equal(codes[b, :, :n_cols], want_codes)
        assert torch.equal(codes[b, :, n_cols:], torch.zeros_like(codes[b, :, n_cols:]))
        assert torch.equal(loss[b], want_loss)
        if parts:
            assert torch.equal(part[b], want_parts)


def test_a_batch_of_layers_on_the_gpu_gets_each_layer_s_own_result(cuda):
    """quantize_gptq_many with the CUDA solver against quantize_gptq of each layer alone, on the GPU: bit for
    bit (the per-layer factorizations and update GEMMs are the same calls; only the block solves share
    launches), with act-order."""
    from wq_ops.kernels.gptq.cuda import CUDA_SOLVER
    from wq_ops.quant.gptq import quantize_gptq, quantize_gptq_many

    g = torch.Generator(device="cpu").manual_seed(5)
    batch = 5
    w = (torch.randn(batch, 192, 512, generator=g) * 0.02).to(cuda)
    hs = []
    for _ in range(batch):
        x = torch.randn(2048, 512, generator=g) * torch.rand(512, generator=g).pow(3).mul(4).add(0.05)
        hs.append(x.T @ x / x.shape[0])
    h = torch.stack(hs).to(cuda)
    kw = dict(bits=4, group_size=128, sym=True, damp_frac=0.01, act_order=True, block_size=128,
              scale_dtype=torch.bfloat16, solver=CUDA_SOLVER)
    many = quantize_gptq_many(w, h, **kw)
    for b in range(batch):
        alone = quantize_gptq(w[b], h[b], **kw)
        assert torch.equal(many[b].codes, alone.codes) and torch.equal(many[b].scale, alone.scale)
        assert torch.equal(many[b].row_loss, alone.row_loss)
