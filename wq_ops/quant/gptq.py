"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): quantize W column by column, compensating each column's error on the columns not yet
quantized, weighted by the layer's calibration Hessian.

Symbols: W (out, in) weights, H (in, in) = X^T X / n, M the upper triangular factor with
H + damp I = M M^T, and Mu = M diag(M)^-1 (unit diagonal). The paper updates the weights with rows of
the upper Cholesky factor U of H^-1 (Alg. 1). Since U = M^-1, the same updates can be written with M
itself (GPTQ as Babai's nearest-plane algorithm; Chen et al., 2025): column i is quantized at its target
t_i = w_i + sum_{k<i} (w_k - q_k) Mu[k, i], where w are the original weights, q the dequantized codes and
t_i equals the paper's updated weight exactly. That needs one Cholesky factorization and no inverse, and
its proxy loss sum_i M[i, i]^2 (t_i - q_i)^2 / 2 is the paper's sum_i (w~_i - q_i)^2 / U[i, i]^2 / 2.
Columns are solved in blocks of `block_size`; a block's deltas (w - q) are applied to the trailing targets
with one GEMM (the paper's "lazy batch updates"; float32, or with the CUDA backend a bf16 GEMM of split
operands, `add_split_update_`). Groups are static: every group's grid comes from the weights before any
update, so act-order needs no g_idx at load time.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from wq_ops.config import Backend
from wq_ops.errors import KernelError, QuantizationError
from wq_ops.kernels.gptq import reference as gptq_reference
from wq_ops.quant.result import QuantResult
from wq_ops.quant.rtn import compute_grid, n_groups_of

__all__ = ["add_split_update_", "hessian_factor", "quantize_gptq", "split_factor_blocks"]


def hessian_factor(h: Tensor, *, damp_frac: float) -> tuple[Tensor, float]:
    """The upper triangular M with H + damp * mean(diag H) * I = M M^T (the Cholesky factorization in
    reversed order), h: (in, in) float with no zero diagonal. Starts at `damp_frac` and multiplies it by 10
    (up to 1.0) while the factorization fails, since a Hessian from few or degenerate samples can be
    singular in float32. Returns (M, damp_frac used); h is not modified. The first try reads the device
    once (whether h was finite and the factorization succeeded), not once per check."""
    n = h.shape[0]
    mean_diag = torch.diagonal(h).mean()                          # stays on the device
    finite = torch.isfinite(h).all()
    damp = damp_frac
    while True:
        # With P the reversal permutation and P (H + dI) P = L L^T: H + dI = (P L P)(P L P)^T, and P L P
        # is upper triangular. Entries of L are bounded by sqrt(max diag), so success means finite.
        damped = torch.flip(h, (0, 1))                            # a copy: h is not modified
        damped.diagonal().add_(damp * mean_diag)                   # the reversal maps the diagonal onto itself
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        h_finite, failed = torch.stack([finite, info != 0]).tolist()
        if not h_finite:
            raise QuantizationError(
                "the Hessian holds NaN or Inf: the calibration activations overflowed; check the checkpoint's "
                "weights and dtype, or calibrate in a wider dtype"
            )
        if not failed:
            return torch.flip(lower, (0, 1)), damp
        if damp >= 1.0:
            raise QuantizationError(
                f"the Hessian ({n}x{n}) is not positive definite even with damping {damp} x mean(diag(H)); "
                "use more or more varied calibration samples"
            )
        damp = min(damp * 10.0, 1.0)


def _split_solver(backend: Backend) -> Callable[..., None] | None:
    """The block solve that feeds the tensor-core lazy update (`solve_block_into_`), or None where the
    updates stay float32 GEMMs (the reference backend). quantize_gptq makes and checks every argument it
    passes, so the CUDA solve skips its Python checks."""
    if backend is Backend.REFERENCE:
        return None
    from wq_ops.kernels.gptq import cuda  # lazy: the extension is built on first use, only where CUDA exists

    return cuda.solve_block_into_unchecked_


def quantize_gptq(
    w: Tensor,
    h: Tensor,
    *,
    bits: int,
    group_size: int | None,
    sym: bool,
    damp_frac: float,
    act_order: bool,
    block_size: int,
    scale_dtype: torch.dtype,
    backend: Backend = Backend.REFERENCE,
) -> QuantResult:
    """GPTQ-quantize w: (out, in), any float dtype, with h: (in, in) float32 from `hessian_of`.
    Math runs in float32 on w's device (float64 when w is float64, for checks; reference backend only).
    Inputs are not modified."""
    out_features, in_features = w.shape
    if h.shape != (in_features, in_features):
        raise QuantizationError(f"Hessian shape {tuple(h.shape)} does not match weight in_features={in_features}")
    if backend is Backend.CUDA and w.device.type != "cuda":
        raise KernelError(f"backend=cuda needs the weights on a CUDA device; they are on {w.device}")
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    if backend is Backend.CUDA and dtype != torch.float32:
        raise KernelError(f"backend=cuda solves in float32; got {w.dtype} weights")
    n_groups = n_groups_of(in_features, group_size)
    W = w.to(dtype, copy=True)
    H = h.to(device=W.device, dtype=dtype, copy=True)

    # A column whose input is always 0 cannot affect the output: pin it to 0 and give H a unit diagonal
    # there so the factorization stays defined (and leaves the column uncoupled from the others).
    # (Masked in place: boolean indexing would read the device for the count of dead columns.)
    dead = torch.diagonal(H) == 0
    H.diagonal().masked_fill_(dead, 1.0)
    W.masked_fill_(dead, 0.0)

    # Scales rounded up to the stored dtype: no weight is clipped, so no clipping error is spread by the
    # updates (round_scale says what nearest rounding cost GPTQ).
    grid = compute_grid(W.float(), bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype,
                        round_up=True)
    group_of_col = torch.arange(in_features, device=W.device, dtype=torch.int32) // (in_features // n_groups)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H, group_of_col = W[:, perm], H[perm][:, perm], group_of_col[perm]
    factor, damp_used = hessian_factor(H, damp_frac=damp_frac)
    del H
    m_diag = torch.diagonal(factor).clone()
    m_unit = factor.div_(m_diag).contiguous()           # Mu[k, i] = M[k, i] / M[i, i], row-major for the solver
    del factor
    scale, zero = grid.scale.to(dtype), grid.zero

    # Checked after the solve, which a non-finite Mu cannot break (it only makes its results garbage): a
    # check here would wait for the device before the solve's first kernel is queued.
    m_finite = torch.isfinite(m_unit).all()
    # The CUDA backend updates on the tensor cores; the reference backend keeps float32 GEMMs everywhere.
    solve_into = _split_solver(backend)
    targets = W.clone()                                  # t: the weights plus the updates so far
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=W.device)
    loss = torch.zeros(out_features, dtype=dtype, device=W.device)
    if solve_into is not None:
        # One kernel and one GEMM per block of columns, with no other work queued between them:
        # the solve writes the codes, the losses and the update's operand in place.
        factor_blocks = split_factor_blocks(m_unit, block_size)
        parts = torch.empty(out_features, 3 * block_size, dtype=torch.bfloat16, device=W.device)
        for j, i1 in enumerate(range(0, in_features, block_size)):
            i2 = min(i1 + block_size, in_features)
            trailing = i2 < in_features                  # only the last block, maybe narrower, has none
            solve_into(targets[:, i1:i2], W[:, i1:i2], m_unit[i1:i2, i1:i2], m_diag[i1:i2], scale, zero,
                       group_of_col[i1:i2], bits=bits, codes=codes[:, i1:i2], loss=loss,
                       parts=parts if trailing else None)
            if trailing:
                add_split_update_(targets[:, i2:], parts, factor_blocks[j, :, i2:])
    else:
        for i1 in range(0, in_features, block_size):
            i2 = min(i1 + block_size, in_features)
            block = gptq_reference.solve_block(targets[:, i1:i2], W[:, i1:i2], m_unit[i1:i2, i1:i2], m_diag[i1:i2],
                                               scale, zero, group_of_col[i1:i2], bits=bits)
            codes[:, i1:i2] = block.codes
            loss += block.loss
            if i2 < in_features:                         # the lazy update of the trailing targets
                targets[:, i2:].addmm_(block.delta, m_unit[i1:i2, i2:])
    if not bool(m_finite):
        raise QuantizationError(
            f"the Hessian's factor has a pivot too small to divide by even with damping {damp_used} x "
            "mean(diag(H)); use more or more varied calibration samples, or a larger damp_frac")
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return QuantResult(codes=codes, scale=grid.scale, zero=grid.zero, bits=bits, group_size=group_size,
                       row_loss=loss.float(), damp_frac=damp_used)


def split_factor_blocks(m_unit: Tensor, block_size: int) -> Tensor:
    """Mu's rows in blocks of `block_size`, each as bfloat16 parts [hi; lo; hi] with hi = bf16(x) and
    lo = bf16(x - hi) (16 significant bits), the right operand of `add_split_update_`:
    (n_blocks, 3 * block_size, n), for the blocks that have columns after them (the last block updates no
    trailing targets; none when n <= block_size). 1.5 times the bytes of Mu."""
    n = m_unit.shape[0]
    n_blocks = (n - 1) // block_size
    rows = m_unit[:n_blocks * block_size].reshape(n_blocks, block_size, n)
    out = torch.empty(n_blocks, 3, block_size, n, dtype=torch.bfloat16, device=m_unit.device)
    out[:, 0].copy_(rows)
    torch.sub(rows, out[:, 0], out=out[:, 1])      # in float32, rounded as it is stored: no float32 temporary
    out[:, 2].copy_(out[:, 0])
    return out.view(n_blocks, 3 * block_size, n)


def add_split_update_(out: Tensor, parts: Tensor, factor_block: Tensor) -> None:
    """out += delta @ Mu_block on the tensor cores, GPTQ's lazy update on CUDA: out (m, n) float32 (a view,
    updated in place); parts (m, 3k) the delta's [hi | hi | lo] as the block solve writes it; factor_block
    (3k, n) the block's rows of Mu as [hi; lo; hi] (`split_factor_blocks`).

    hi_d hi_M + hi_d lo_M + lo_d hi_M is one bf16 GEMM with K = 3k and float32 accumulation. (Two GEMMs
    over Mu's [hi; lo] alone would save its third part but read and write the trailing targets twice: 10 ms
    more for an 8B down_proj.) The relative error is about 2^-16 (the lo lo term and lo's rounding), against
    2^-24 for a float32 GEMM on the CUDA cores, which took 43 ms of an 8B block's GPU time (torch profiler,
    H100): the targets move by about 1e-5 of a quantization error, so a code changes only where a target
    sits that close to a rounding boundary. On the CPU (which has no mixed-dtype GEMM) the parts are
    multiplied in float32, where the products of bf16 numbers are exact: the same sum in another order."""
    if out.device.type == "cuda":
        torch.addmm(out, parts, factor_block, out_dtype=torch.float32, out=out)
    else:
        out.addmm_(parts.float(), factor_block.float())
