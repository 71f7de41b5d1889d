"""HQQ: a calibration-free grid per group by half-quadratic splitting (Badri & Shaji 2023, "Half-Quadratic
Quantization of Large Machine Learning Models", https://mobiusml.github.io/hqq_blog/).

What is optimised: each group's grid (scale s, zero z) for a small lp-norm, p < 1, of the weight error
W - s (Q - z), Q = round(W / s) + z; no data, no Hessian. Half-quadratic splitting adds an auxiliary error
W_e and alternates two easy steps: W_e = shrink_p(W - s (Q - z)) (the lp proximal operator, a generalised
soft threshold: it keeps the few large errors, the outliers, and zeroes the small ones), then the grid
fitted by least squares to W - W_e (the weights with the outliers set aside), the penalty beta growing by
kappa each step. Entry point: `quantize_hqq`. Codes are round-to-nearest on the final grid (no error
feedback: that is GPTQ's job).

Departures from the paper, all measured on SmolLM2 (numbers below):
- Integer zero points: our artifact (compressed-tensors pack-quantized) stores z as a code in
  0 .. 2**bits - 1. The paper's zero is real-valued, its scale fixed, and its zero step rounded back to an
  integer is a no-op (round-to-nearest codes already centre the error: same squared error to 5 digits). So
  the grid step fits a line through the codes (scale and zero together), rounds its zero to the nearest
  code, and refits the scale for that zero. Symmetric: z stays 2**(bits-1), the scale alone is fitted.
  The scale is rounded to `scale_dtype` each step, so every iterate is a grid the artifact can store.
- The scale never drops below what keeps the group's extremes within half a step of the end codes: like
  min-max, HQQ clips no weight. Free to clip, the fit lowers the squared error further, but the clipped
  extremes cost output error and perplexity.
- The shrinkage acts on the error in grid steps (W / s), so beta means the same for every group whatever its
  weights' magnitude (in weight units, beta = 10 sets aside no error below 0.17: none, for these weights).
- Each group keeps the iterate of least squared weight error, the min-max start first (kept on ties): never
  worse than min-max RTN by that measure. The least-lp iterate was worse for 1-5% of the groups.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wq_ops.errors import ConfigError
from wq_ops.kernels.quant_pack.reference import quantize_codes, round_scale
from wq_ops.quant.result import QuantResult
from wq_ops.quant.rtn import compute_grid, n_groups_of

__all__ = ["quantize_hqq", "HQQ_ITERATIONS", "HQQ_LP_NORM", "HQQ_BETA", "HQQ_KAPPA"]

# The paper's defaults (beta now per grid step, see above). 20 iterations: on SmolLM2's down_projs (w4g64)
# the squared error is within 0.1% of what 50 give.
HQQ_ITERATIONS = 20
HQQ_LP_NORM = 0.7
HQQ_BETA = 10.0          # lp penalty's weight: errors past beta**(-1 / (2 - p)) = 0.17 steps count as outliers
HQQ_KAPPA = 1.01         # beta's growth per iteration

# SmolLM2-135M (its bf16 weights come from a Q4_1 GGUF), 4 bits, bf16 scales. ppl: every linear of the 30
# blocks quantized at g64, WikiText-2 test, 8 windows of 2048 (bf16: 18.87). sq: squared weight error of the
# 30 down_projs at g64; out: their error weighted by the input Hessian's diagonal (16 WikiText-2 validation
# windows of 512) at g128; both relative to min-max. sym / asym:
#   grid                                           ppl g64          sq g64          out g128
#   min-max RTN                                    27.28 / 24.74    1     / 1       1    / 1
#   RTN, clip search by plain squared error        28.25 / 27.06    0.804 / 0.851   1.29 / 0.96
#   RTN, clip search under the Hessian diagonal    24.30 / 23.11    0.855 / 0.902   0.69 / 0.75
#   paper's HQQ (real zero: not storable)          27.00 / 24.75    0.993 / 0.988   -
#   HQQ free to clip, least-lp iterate             27.93 / 25.52    0.893 / 0.893   -
#   HQQ free to clip, least-squares iterate        25.99 / 25.94    0.877 / 0.880   1.35 / 1.15
#   HQQ clipping nothing, least-squares (this)     26.06 / 24.82    0.913 / 0.942   0.89 / 1.01
# ("paper's" and "least-lp" sq: 7 of the 30 down_projs.)


def _shrink(x: Tensor, beta: float, p: float) -> Tensor:
    """Proximal operator of |x|**p / beta (generalised soft threshold): sign(x) max(|x| - |x|**(p-1) / beta, 0).
    |x| is kept off zero so that 0**(p-1) stays finite."""
    magnitude = x.abs()
    # Times a Python float, not divided by one: torch's CUDA division by a scalar multiplies by its reciprocal
    # anyway, and this way the CPU computes the same product.
    return torch.sign(x) * torch.relu(magnitude - magnitude.clamp(min=1e-30).pow(p - 1) * (1.0 / beta))


def _round_to_grid(wg: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """Codes (as float32) and weight error of wg: (out, g, gs) on the grid scale, zero: (out, g, 1). The same
    float32 operations as quantize_codes, so the final codes are these."""
    codes = torch.clamp(torch.round(wg / scale) + zero, 0, maxq)
    return codes, wg - (codes - zero) * scale


def _fit_grid(codes: Tensor, target: Tensor, scale: Tensor, zero: Tensor, low: Tensor, high: Tensor, *,
              sym: bool, maxq: int, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The grid step: scale and integer zero for which s (codes - z) is nearest to target (least squares), the
    codes held fixed, then the scale raised where needed to keep the group's extremes low <= 0 <= high within
    half a step of the end codes. A group whose fit is degenerate (all codes equal, or a fitted slope <= 0)
    keeps its scale. Shapes (out, g, gs) and (out, g, 1)."""
    if not sym:
        mean_codes = codes.mean(dim=-1, keepdim=True)
        mean_target = target.mean(dim=-1, keepdim=True)
        centred = codes - mean_codes
        covariance = (centred * (target - mean_target)).sum(dim=-1, keepdim=True)
        variance = (centred * centred).sum(dim=-1, keepdim=True)
        slope = torch.where((variance > 0) & (covariance > 0), covariance / variance.clamp(min=1e-30), scale)
        # The real-valued zero of the fitted line, projected to the nearest storable code.
        zero = torch.clamp(torch.round(mean_codes - mean_target / slope), 0, maxq)
    offset = codes - zero                                                  # integers
    numerator = (offset * target).sum(dim=-1, keepdim=True)
    denominator = (offset * offset).sum(dim=-1, keepdim=True)              # an integer: >= 1 unless 0
    fitted = torch.where((denominator > 0) & (numerator > 0), numerator / denominator.clamp(min=1), scale)
    covering = torch.maximum(high / (maxq - zero + 0.5), -low / (zero + 0.5))
    return round_scale(torch.maximum(fitted, covering), scale_dtype), zero


def quantize_hqq(
    w: Tensor, *, bits: int, group_size: int | None, sym: bool, scale_dtype: torch.dtype,
    iterations: int = HQQ_ITERATIONS, lp_norm: float = HQQ_LP_NORM, beta: float = HQQ_BETA,
    kappa: float = HQQ_KAPPA,
) -> QuantResult:
    """HQQ grid, then round-to-nearest codes on it. w: (out, in), any float dtype, any device (math in float32).

    Starts from the min-max grid and runs `iterations` half-quadratic steps on the lp-norm (p = lp_norm,
    0 < p <= 1) of the error measured in grid steps, the penalty starting at `beta` and multiplied by `kappa`
    each step; each group keeps the iterate of least squared weight error (never worse than min-max by it).
    Returns codes (out, in) uint8 = quantize_codes(w, scale, zero); scale (out, n_groups) float32, exact in
    scale_dtype; zero (out, n_groups) uint8 (2**(bits-1) when sym); row_loss (out,) the squared weight error."""
    _check(w, bits=bits, group_size=group_size, iterations=iterations, lp_norm=lp_norm, beta=beta, kappa=kappa)
    w = w.to(torch.float32)
    out_features, in_features = w.shape
    n_groups = n_groups_of(in_features, group_size)
    maxq = 2**bits - 1
    start = compute_grid(w, bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype)
    wg = w.reshape(out_features, n_groups, in_features // n_groups)        # (out, g, gs)
    scale = start.scale.unsqueeze(-1)                                      # (out, g, 1)
    zero = start.zero.unsqueeze(-1).to(torch.float32)                      # (out, g, 1), integer values
    low = wg.amin(dim=-1, keepdim=True).clamp(max=0.0)                     # (out, g, 1)
    high = wg.amax(dim=-1, keepdim=True).clamp(min=0.0)                    # (out, g, 1)
    codes, error = _round_to_grid(wg, scale, zero, maxq)
    best_error = (error * error).sum(dim=-1, keepdim=True)                 # (out, g, 1)
    best_scale, best_zero = scale, zero
    penalty = beta
    for _ in range(iterations):
        outliers = _shrink(error / scale, penalty, lp_norm) * scale        # W_e, in weight units
        scale, zero = _fit_grid(codes, wg - outliers, scale, zero, low, high, sym=sym, maxq=maxq,
                                scale_dtype=scale_dtype)
        codes, error = _round_to_grid(wg, scale, zero, maxq)
        squared = (error * error).sum(dim=-1, keepdim=True)
        better = squared < best_error                                      # strict: ties keep the earlier grid
        best_error = torch.where(better, squared, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        penalty *= kappa
    scale = best_scale.squeeze(-1)                                         # (out, g)
    zero_codes = best_zero.squeeze(-1).to(torch.uint8)                     # (out, g)
    codes_out = quantize_codes(w, scale, zero_codes, bits=bits)
    return QuantResult(codes=codes_out, scale=scale, zero=zero_codes, bits=bits, group_size=group_size,
                       row_loss=best_error.sum(dim=(1, 2)))


def _check(w: Tensor, *, bits: int, group_size: int | None, iterations: int, lp_norm: float, beta: float,
           kappa: float) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ConfigError(f"HQQ quantizes a 2-D float weight (out, in); got shape {tuple(w.shape)}, dtype {w.dtype}")
    if not 2 <= bits <= 8:
        raise ConfigError(f"bits={bits}: HQQ's uint8 codes and zero points take 2..8 bits")
    if group_size is not None and group_size < 1:
        raise ConfigError(f"group_size={group_size}: expected a positive number of columns, or None (whole rows)")
    if iterations < 0:
        raise ConfigError(f"iterations={iterations}: expected >= 0 (0 keeps the min-max grid)")
    if not 0 < lp_norm <= 1:
        raise ConfigError(f"lp_norm={lp_norm}: expected 0 < p <= 1 (the paper uses 0.7)")
    if beta <= 0 or kappa < 1:
        raise ConfigError(f"beta={beta}, kappa={kappa}: expected beta > 0 and kappa >= 1 (a penalty that never "
                          "shrinks)")
