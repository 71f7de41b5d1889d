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
with one GEMM (the paper's "lazy batch updates"), by the solver the caller hands in: float32, or the CUDA
kernel's with a bf16 GEMM of split operands (`wq_ops.kernels.gptq.split_update`). Groups are static: every
group's grid comes from the weights before any update, so act-order needs no g_idx at load time.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from wq_ops.errors import QuantizationError
from wq_ops.kernels.gptq import GptqSolver
from wq_ops.kernels.gptq.batch import aligned_batch
from wq_ops.kernels.gptq.reference import FLOAT32_SOLVER
from wq_ops.quant.result import QuantResult
from wq_ops.quant.rtn import compute_grid, n_groups_of

__all__ = ["hessian_factor", "hessian_factors", "quantize_gptq", "quantize_gptq_many"]


def hessian_factor(h: Tensor, *, damp_frac: float) -> tuple[Tensor, float]:
    """The upper triangular M with H + damp * mean(diag H) * I = M M^T (the Cholesky factorization in
    reversed order), h: (in, in) float with no zero diagonal. Starts at `damp_frac` and multiplies it by 10
    (up to 1.0) while the factorization fails, since a Hessian from few or degenerate samples can be
    singular in float32. Returns (M, damp_frac used); h is not modified."""
    factors, damps = hessian_factors(h[None], damp_frac=damp_frac)
    return factors[0], damps[0]


def hessian_factors(h: Tensor, *, damp_frac: float, names: Sequence[str] = ()) -> tuple[Tensor, list[float]]:
    """`hessian_factor` of each of a batch h: (batch, in, in), each matrix factorized on its own (the same
    bits as one at a time, whatever the batch). The first try reads the device once for the whole batch
    (whether each h was finite and its factorization succeeded), not once per matrix or per check; only
    the ones that failed are tried again, with more damping. names: each matrix's layer, for the errors."""
    batch, n = h.shape[0], h.shape[-1]
    # Each mean on its own: a batched reduction may sum in another order (another damping, other codes).
    mean_diag = [torch.diagonal(h[b]).mean() for b in range(batch)]    # stays on the device
    finite = torch.isfinite(h).flatten(1).all(1)
    factors = aligned_batch(batch, n, n, dtype=h.dtype, device=h.device)   # its Mu feeds each layer's GEMMs
    damps = [damp_frac] * batch
    todo = list(range(batch))
    first = True
    while todo:
        infos = []
        for b in todo:
            # With P the reversal permutation and P (H + dI) P = L L^T: H + dI = (P L P)(P L P)^T, and P L P
            # is upper triangular. Entries of L are bounded by sqrt(max diag), so success means finite.
            damped = torch.flip(h[b], (0, 1))                     # a copy: h is not modified
            damped.diagonal().add_(damps[b] * mean_diag[b])      # the reversal maps the diagonal onto itself
            lower, info = torch.linalg.cholesky_ex(damped)
            del damped
            factors[b].copy_(torch.flip(lower, (0, 1)))
            infos.append(info)
        read = torch.cat(([~finite] if first else []) + [torch.stack([i != 0 for i in infos])]).tolist()
        if first:
            bad = [b for b, nan in enumerate(read[:batch]) if nan]
            read = read[batch:]
            if bad:
                raise QuantizationError(
                    f"{_which(names, bad[0])}the Hessian holds NaN or Inf: the calibration activations reaching this "
                    "layer overflowed or came from weights holding NaN/Inf (this block's or an earlier one's); check "
                    "the checkpoint's weights and dtype, or calibrate in a wider dtype"
                )
        first = False
        failed = [b for b, bad in zip(todo, read) if bad]
        for b in failed:
            if damps[b] >= 1.0:
                raise QuantizationError(
                    f"{_which(names, b)}the Hessian ({n}x{n}) is not positive definite even with damping {damps[b]} "
                    "x mean(diag(H)); use more or more varied calibration samples"
                )
            damps[b] = min(damps[b] * 10.0, 1.0)
        todo = failed
    return factors, damps


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
    solver: GptqSolver = FLOAT32_SOLVER,
) -> QuantResult:
    """GPTQ-quantize w: (out, in), any float dtype, with h: (in, in) float32 from `hessian_of`.
    Math runs in float32 on w's device (float64 when w is float64, for checks, with the float32 solver).
    Inputs are not modified."""
    if h.dim() != 2 or w.dim() != 2:       # one layer; quantize_gptq_many takes a batch
        raise QuantizationError(f"GPTQ takes one weight (out, in) and its Hessian (in, in); got {tuple(w.shape)} "
                                f"and {tuple(h.shape)}")
    return quantize_gptq_many(w[None], h[None], bits=bits, group_size=group_size, sym=sym, damp_frac=damp_frac,
                              act_order=act_order, block_size=block_size, scale_dtype=scale_dtype, solver=solver)[0]


def quantize_gptq_many(
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
    solver: GptqSolver = FLOAT32_SOLVER,
    names: Sequence[str] = (),
) -> list[QuantResult]:
    """`quantize_gptq` of a batch of layers of one shape at once, w: (batch, out, in) and h: (batch, in, in)
    (the experts of a routed MLP): one launch of the block solve per block of columns for the whole batch and
    one read of the device for all their factorizations, where one layer at a time costs a launch chain and
    two device reads each. Every layer's result is the one `quantize_gptq` gives it alone, bit for bit.
    names: each layer's name, for the errors."""
    if w.dim() != 3 or h.dim() != 3:
        raise QuantizationError(f"a GPTQ batch takes weights (batch, out, in) and Hessians (batch, in, in); got "
                                f"{tuple(w.shape)} and {tuple(h.shape)}")
    batch, out_features, in_features = w.shape
    if h.shape != (batch, in_features, in_features):
        raise QuantizationError(f"Hessian shape {tuple(h.shape[-2:])} does not match weight in_features={in_features}"
                                if h.shape[0] == batch else
                                f"{h.shape[0]} Hessians for {batch} weights")
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    n_groups = n_groups_of(in_features, group_size)
    W = w.to(dtype, copy=True, memory_format=torch.contiguous_format)
    H = h.to(device=W.device, dtype=dtype, copy=True)

    _pin_dead_columns_(W, H)
    # Scales rounded up to the stored dtype: no weight is clipped, so no clipping error is spread by the
    # updates (round_scale says what nearest rounding cost GPTQ). The grid is per row: one call for the batch.
    grid = compute_grid(W.float().view(batch * out_features, in_features), bits=bits, group_size=group_size,
                        sym=sym, scale_dtype=scale_dtype, round_up=True)
    grid_scale, grid_zero = (x.view(batch, out_features, n_groups) for x in (grid.scale, grid.zero))
    group_of_col = (torch.arange(in_features, device=W.device, dtype=torch.int32) // (in_features // n_groups)
                    ).expand(batch, in_features)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H, dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)
        W = W.gather(2, perm[:, None, :].expand(batch, out_features, in_features))
        H = H.gather(1, perm[:, :, None].expand_as(H)).gather(2, perm[:, None, :].expand_as(H))
        group_of_col = group_of_col.gather(1, perm)
    group_of_col = group_of_col.contiguous()
    factor, damps = hessian_factors(H, damp_frac=damp_frac, names=names)
    del H
    m_diag = torch.diagonal(factor, dim1=-2, dim2=-1).clone()
    m_unit = factor.div_(m_diag[:, None, :])            # Mu[k, i] = M[k, i] / M[i, i], rows contiguous for the solver
    del factor
    scale = grid_scale.to(dtype)

    # Checked after the solve, which a non-finite Mu cannot break (it only makes its results garbage): a
    # check here would wait for the device before the solve's first kernel is queued.
    m_finite = torch.isfinite(m_unit).flatten(1).all(1)
    sweep = solver.start(m_unit, block_size=block_size, rows=out_features)
    targets = aligned_batch(batch, out_features, in_features, dtype=dtype, device=W.device)
    targets.copy_(W)                                     # t: the weights plus the updates so far
    codes = torch.empty(batch, out_features, in_features, dtype=torch.uint8, device=W.device)
    loss = torch.zeros(batch, out_features, dtype=dtype, device=W.device)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        sweep.solve_(targets, W, i1, i2, m_diag=m_diag, scale=scale, zero=grid_zero, group=group_of_col, bits=bits,
                     codes=codes, loss=loss)
        if i2 < in_features:
            sweep.update_(targets, i1, i2)
    bad = [b for b, ok in enumerate(m_finite.tolist()) if not ok]
    if bad:
        raise QuantizationError(f"{_which(names, bad[0])}the Hessian's factor has a pivot too small to divide by even "
                                f"with damping {damps[bad[0]]} x mean(diag(H)); use more or more varied calibration "
                                "samples, or a larger damp_frac")
    if perm is not None:
        codes = codes.gather(2, torch.argsort(perm, dim=-1)[:, None, :].expand_as(codes))
    row_loss = loss.float()
    return [QuantResult(codes=codes[b], scale=grid_scale[b], zero=grid_zero[b], bits=bits, group_size=group_size,
                        row_loss=row_loss[b], damp_frac=damps[b]) for b in range(batch)]


def _which(names: Sequence[str], b: int) -> str:
    """The error's prefix naming layer b of a batch ("" without names)."""
    return f"{names[b]}: " if names else ""


def _pin_dead_columns_(W: Tensor, H: Tensor) -> None:
    """A column whose input is always 0 cannot affect the output: pin it to 0 in W and give H a unit diagonal
    there so the factorization stays defined (and leaves the column uncoupled from the others). In place, on
    the caller's own copies (W (batch, out, in), H (batch, in, in)); masked, since boolean indexing would
    read the device for the count."""
    dead = torch.diagonal(H, dim1=-2, dim2=-1) == 0
    H.diagonal(dim1=-2, dim2=-1).masked_fill_(dead, 1.0)
    W.masked_fill_(dead[:, None, :], 0.0)
