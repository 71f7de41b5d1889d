"""Calibration statistics of a linear layer's input: the Hessian proxy X^T X, per-channel |x| mean and
max (AWQ's activation profile and the LLM.int8 outlier view), and the output error they imply.

`accumulate_input_stats_` updates an `InputStats` in place (a few large matmuls per call, no per-sample loop);
everything else is pure. H = X^T X / n_tokens, so ||(W - Q) X||^2 / n = tr((W - Q) H (W - Q)^T).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "InputStats",
    "new_input_stats",
    "accumulate_input_stats_",
    "hessian_of",
    "add_upper_gram_",
    "output_error",
    "quadratic_sum",
    "quadratic_operand",
    "OutlierSummary",
    "summarize_outliers",
    "outlier_channels",
    "outlier_summary",
    "output_error_tensor",
]

# LLM.int8's outlier threshold: features with |x| >= 6 are the ones it keeps in 16 bit.
OUTLIER_THRESHOLD = 6.0


@dataclass
class InputStats:
    """Running sums over the tokens seen so far. xtx: (in, in) float32 sum of x x^T, kept on and above the
    diagonal only (read it through hessian_of); abs_sum, abs_max: (in,) float32; n_tokens: tokens
    accumulated."""

    xtx: Tensor
    abs_sum: Tensor
    abs_max: Tensor
    n_tokens: int = 0


def new_input_stats(in_features: int, device: torch.device | str) -> InputStats:
    return InputStats(
        xtx=torch.zeros(in_features, in_features, dtype=torch.float32, device=device),
        abs_sum=torch.zeros(in_features, dtype=torch.float32, device=device),
        abs_max=torch.zeros(in_features, dtype=torch.float32, device=device),
    )


def accumulate_input_stats_(stats: InputStats, x: Tensor) -> None:
    """Add the tokens of x: (..., in), any float dtype, to `stats` in place (the accumulator is the
    point: a block's calibration set passes through in micro-batches). Sums run in float32."""
    x2 = x.reshape(-1, x.shape[-1])                                       # (tokens, in)
    if x2.shape[0] == 0:          # an expert no token was routed to in this micro-batch: nothing to add
        return
    # Half-precision operands on CUDA lose nothing (they are the activations as computed); the tensor cores
    # accumulate in float32 and write float32: several times the speed of a float32 GEMM.
    add_upper_gram_(stats.xtx, x2 if x2.is_cuda and x2.dtype in (torch.bfloat16, torch.float16)
                    else x2.to(torch.float32))
    # Two reading passes, no |x| copy: that copy (the size of the activations) took as long as both.
    stats.abs_sum.add_(torch.linalg.vector_norm(x2, 1, dim=0, dtype=torch.float32))
    lo, hi = torch.aminmax(x2, dim=0)
    torch.maximum(stats.abs_max, torch.maximum(hi, -lo).to(torch.float32), out=stats.abs_max)
    stats.n_tokens += x2.shape[0]


def add_upper_gram_(xtx: Tensor, x2: Tensor, *, min_block: int = 1024, max_blocks: int = 8) -> None:
    """xtx += X^T X on and above the diagonal, for x2: (tokens, in); below it xtx is not kept (hessian_of
    mirrors the upper triangle). cuBLAS has no symmetric rank-k update for half-precision inputs, so the
    columns are cut into up to `max_blocks` blocks of at least `min_block`, and block row i multiplies its
    columns by every column from block i on, one GEMM per block row: k blocks do (k + 1) / 2k of the full
    product's work, 36 of 64 for the 14336-wide input of an 8B down_proj, 10 of 16 for a 4096-wide one.
    x2 is float32, or half precision on CUDA (torch multiplies half inputs into float32 sums only there);
    the GEMM accumulates into xtx in place either way."""
    n = x2.shape[1]
    k = max(1, min(max_blocks, n // min_block))
    edges = [n * i // k for i in range(k + 1)]
    for lo, hi in zip(edges, edges[1:]):
        rows = x2[:, lo:hi].T                                             # (hi - lo, tokens)
        block = xtx[lo:hi, lo:]
        if x2.dtype == torch.float32:
            block.addmm_(rows, x2[:, lo:])
        else:
            torch.addmm(block, rows, x2[:, lo:], out_dtype=torch.float32, out=block)


def hessian_of(stats: InputStats) -> Tensor:
    """H = X^T X / n_tokens: (in, in) float32 (a new tensor), exactly symmetric: the upper triangle of the
    accumulated sums, mirrored."""
    upper = torch.triu(stats.xtx)
    return upper.add_(torch.triu(stats.xtx, diagonal=1).T).div_(max(stats.n_tokens, 1))


def quadratic_sum(d: Tensor, h: Tensor) -> Tensor:
    """sum over the rows d_i of d: (rows, in) of d_i^T H d_i, h: (in, in); a 0-dim tensor (float64 if
    either input is, else float32). On CUDA, float32 inputs are multiplied on the tensor cores as bf16
    operands with float32 accumulation: the product is an error measure, where a relative error of about
    1e-3 does not matter, and it runs 30 times faster than in float32. Elsewhere the math is exact float32.
    A caller that uses one H many times passes `quadratic_operand(h)`, converted once."""
    if torch.float64 in (d.dtype, h.dtype):
        d, h = d.to(torch.float64), h.to(torch.float64)
        return (d @ h * d).sum()
    if d.is_cuda:
        dh = torch.mm(d.to(torch.bfloat16), quadratic_operand(h), out_dtype=torch.float32)
    else:
        dh = d.to(torch.float32) @ h.to(torch.float32)
    return (dh * d).sum(dtype=torch.float32)


def quadratic_operand(h: Tensor) -> Tensor:
    """h as `quadratic_sum` multiplies it: bf16 on CUDA (float64 and CPU tensors unchanged), so a loop over
    many d converts an (in, in) H once, not once per call."""
    return h.to(torch.bfloat16) if h.is_cuda and h.dtype != torch.float64 else h


def output_error(w: Tensor, w_hat: Tensor, h: Tensor) -> float:
    """Relative output error ||(W - W_hat) X||^2 / ||W X||^2 = tr(D H D^T) / tr(W H W^T), D = W - W_hat.
    w, w_hat: (out, in); h: (in, in). Math as `quadratic_sum` does it; 0.0 when the layer's output is
    identically 0."""
    return float(output_error_tensor(w, w_hat, h))


def output_error_tensor(w: Tensor, w_hat: Tensor, h: Tensor) -> Tensor:
    """`output_error` as a 0-dim tensor on the inputs' device: queued, not read back."""
    wide = torch.float64 if torch.float64 in (w.dtype, h.dtype) else torch.float32
    d = w.to(wide) - w_hat.to(wide)
    h = quadratic_operand(h) if wide is torch.float32 else h
    num, den = quadratic_sum(d, h), quadratic_sum(w, h)
    # NaN (weights or inputs holding NaN/Inf) stays NaN: the driver refuses it and names the tensor.
    return torch.where(den == 0, torch.zeros_like(num), num / den)


@dataclass(frozen=True)
class OutlierSummary:
    """The LLM.int8 view of one layer input: absmax over all channels and tokens, mean |x|, the ratio of the
    largest channel max to the median channel max, how many channels reach |x| >= 6, and the top channels."""

    absmax: float
    mean_abs: float
    max_over_median: float
    n_outlier_channels: int
    n_channels: int
    top_channels: tuple[int, ...]
    top_channel_max: tuple[float, ...]


def summarize_outliers(stats: InputStats, *, top_k: int = 8) -> OutlierSummary:
    return outlier_summary(outlier_channels(stats), top_k=top_k)


def outlier_channels(stats: InputStats) -> Tensor:
    """(2, in) float32 on the statistics' device: each channel's max |x| and mean |x|. A new tensor, so
    `outlier_summary` may read it after the statistics are gone."""
    return torch.stack([stats.abs_max.float(), (stats.abs_sum / max(stats.n_tokens, 1)).float()])


def outlier_summary(channels: Tensor, *, top_k: int = 8) -> OutlierSummary:
    """The summary of `outlier_channels` (read back from the device here)."""
    channel_max, channel_mean = channels.cpu()
    k = min(top_k, channel_max.numel())
    top = torch.topk(channel_max, k)
    median = float(channel_max.median())
    return OutlierSummary(
        absmax=float(channel_max.max()),
        mean_abs=float(channel_mean.mean()),
        max_over_median=float(channel_max.max()) / median if median > 0 else float("inf"),
        n_outlier_channels=int((channel_max >= OUTLIER_THRESHOLD).sum()),
        n_channels=int(channel_max.numel()),
        top_channels=tuple(int(i) for i in top.indices),
        top_channel_max=tuple(float(v) for v in top.values),
    )
