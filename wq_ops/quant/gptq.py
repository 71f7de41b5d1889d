"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): quantize W column by column, compensating each column's error on the columns not yet
quantized, weighted by the inverse Hessian H^-1 of the layer's calibration inputs.

Symbols: W (out, in) weights, H (in, in) = X^T X / n, Hinv the upper Cholesky factor of (H + damp I)^-1
(Alg. 1 in the paper). Columns are solved in blocks of `block_size`; the block's accumulated error is
applied to the trailing columns with one GEMM (the paper's "lazy batch updates"). Groups are static:
every group's grid comes from the weights before any update, so act-order needs no g_idx at load time.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from kernels.gptq import reference as gptq_reference
from wq_ops.config import Backend
from wq_ops.errors import KernelError, QuantizationError
from wq_ops.quant.result import QuantResult
from wq_ops.quant.rtn import compute_grid, n_groups_of

__all__ = ["inverse_hessian_factor", "lower_triangular_inverse", "quantize_gptq"]


def inverse_hessian_factor(h: Tensor, *, damp_frac: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, h: (in, in) float32 with no zero diagonal.
    Starts at `damp_frac` and multiplies it by 10 (up to 1.0) while the factorization fails, since a
    Hessian from few or degenerate samples can be singular in float32. Returns (factor, damp_frac used)."""
    if not bool(torch.isfinite(h).all()):
        raise QuantizationError(
            "the Hessian holds NaN or Inf: the calibration activations overflowed; check the checkpoint's "
            "weights and dtype, or calibrate in a wider dtype"
        )
    n = h.shape[0]
    mean_diag = float(torch.diagonal(h).mean())
    damp = damp_frac
    while True:
        # With P the reversal permutation and P (H + dI) P = L L^T, (H + dI)^-1 = U^T U for the upper
        # triangular U = P L^-1 P: one Cholesky and one triangular inverse, where factoring the explicit
        # inverse would take two Cholesky factorizations and an inversion.
        damped = torch.flip(h, (0, 1))                            # a copy: h is not modified
        damped.diagonal().add_(damp * mean_diag)                   # the reversal maps the diagonal onto itself
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            upper = torch.flip(lower_triangular_inverse(lower), (0, 1))
            if bool(torch.isfinite(upper).all()) and bool((torch.diagonal(upper) > 0).all()):
                return upper, damp
        if damp >= 1.0:
            raise QuantizationError(
                f"the Hessian ({n}x{n}) is not positive definite even with damping {damp} x mean(diag(H)); "
                "use more or more varied calibration samples"
            )
        damp = min(damp * 10.0, 1.0)


def lower_triangular_inverse(lower: Tensor, *, leaf: int = 1024) -> Tensor:
    """L^-1 for a lower triangular, invertible L: (n, n) float. Blockwise, [[A, 0], [C, D]]^-1 =
    [[A^-1, 0], [-D^-1 C A^-1, D^-1]]: halves are inverted recursively down to `leaf` columns (a
    triangular solve against I there) and joined by two GEMMs. Solving L X = I at full size takes about
    n^3 / 2 multiply-adds in cuBLAS's slower TRSM; this takes about n^3 / 3, as GEMMs (47 against 79 ms
    for n = 14336 in float32 on an H100), with the same rounding error. Returns a new lower triangular tensor."""
    out = torch.zeros_like(lower)
    _invert_into(lower, out, leaf)
    return out


def _invert_into(lower: Tensor, out: Tensor, leaf: int) -> None:
    n = lower.shape[0]
    if n <= leaf:
        out.copy_(torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype, device=lower.device),
                                                upper=False))
        return
    half = n // 2
    _invert_into(lower[:half, :half], out[:half, :half], leaf)
    _invert_into(lower[half:, half:], out[half:, half:], leaf)
    out[half:, :half] = -(out[half:, half:] @ (lower[half:, :half] @ out[:half, :half]))


def _solver(backend: Backend) -> Callable[..., gptq_reference.BlockSolve]:
    if backend is Backend.REFERENCE:
        return gptq_reference.solve_block
    from kernels.gptq import cuda  # lazy: the extension is built on first use, only where CUDA exists

    return cuda.solve_block


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
    Math runs in float32 on w's device. Inputs are not modified."""
    out_features, in_features = w.shape
    if h.shape != (in_features, in_features):
        raise QuantizationError(f"Hessian shape {tuple(h.shape)} does not match weight in_features={in_features}")
    if backend is Backend.CUDA and w.device.type != "cuda":
        raise KernelError(f"backend=cuda needs the weights on a CUDA device; they are on {w.device}")
    n_groups = n_groups_of(in_features, group_size)
    W = w.to(torch.float32).clone()
    H = h.to(device=W.device, dtype=torch.float32).clone()

    # A column whose input is always 0 cannot affect the output: pin it to 0 and give H a unit diagonal
    # there so the factorization stays defined.
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    # Scales rounded up to the stored dtype: no weight is clipped, so no clipping error is spread by the
    # updates (round_scale says what nearest rounding cost GPTQ).
    grid = compute_grid(W, bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype, round_up=True)
    group_of_col = torch.arange(in_features, device=W.device) // (in_features // n_groups)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H, group_of_col = W[:, perm], H[perm][:, perm], group_of_col[perm]
    hinv, damp_used = inverse_hessian_factor(H, damp_frac=damp_frac)
    del H

    solve = _solver(backend)
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=W.device)
    loss = torch.zeros(out_features, dtype=torch.float32, device=W.device)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        cols = group_of_col[i1:i2]
        block = solve(W[:, i1:i2], hinv[i1:i2, i1:i2], grid.scale[:, cols], grid.zero[:, cols], bits=bits)
        codes[:, i1:i2] = block.codes
        loss += block.loss
        if i2 < in_features:
            W[:, i2:].sub_(block.err @ hinv[i1:i2, i2:])                    # lazy update of the trailing columns
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return QuantResult(codes=codes, scale=grid.scale, zero=grid.zero, bits=bits, group_size=group_size,
                       row_loss=loss, damp_frac=damp_used)
