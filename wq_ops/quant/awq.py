"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration"): scale up the input channels that carry large activations before quantizing, folding
the inverse scale into the operation that produces the input, then clip each group's range.

Scale search (Sec. 3.2): s = x_mean^a / w_mean^(1-a), normalised to geometric mean 1, for a on a grid;
the caller measures each candidate's output error (the layers' own outputs from their input's Hessian,
as the paper's Eq. 4 does, or the output of the module that consumes them) and the best one wins; s = 1
(plain RTN) is always a candidate, so AWQ never does worse than RTN on the measured loss. Clip search:
per row and group, the clip ratio that minimises that group's share of the output error, d_g^T H_gg d_g,
using the diagonal blocks of the layer's Hessian (all calibration tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from wq_ops.kernels.awq import AwqPrimitives
from wq_ops.kernels.awq import reference as awq_reference
from wq_ops.quant.rtn import n_groups_of

__all__ = ["ScaleSearch", "weight_profile", "candidate_scales", "search_scales", "search_clip", "grouped_error"]


@dataclass(frozen=True)
class ScaleSearch:
    """scales: (in,) float32, on the device: multiply the layers' input columns by it, divide the producer's
    outputs by it (all ones where no scaling won). losses: (n_grid + 1,) each candidate's measured loss,
    no scaling first, on the device. The properties read the losses back: the winning grid exponent
    (`ratio`, None when no scaling won), its loss, and the loss of plain RTN, for the report."""

    scales: Tensor
    losses: Tensor
    best: Tensor                              # (1,) int64: the winner's index in losses
    n_grid: int

    def numbers(self) -> Tensor:
        """The losses, then the winner's index, as one float64 vector on the device (for one read-back)."""
        return torch.cat([self.losses.to(torch.float64), self.best.to(torch.float64)])

    @cached_property
    def _on_host(self) -> SearchSummary:
        return SearchSummary.of(self.numbers().tolist(), self.n_grid)

    @property
    def ratio(self) -> float | None:
        return self._on_host.ratio

    @property
    def loss(self) -> float:
        return self._on_host.loss

    @property
    def loss_unscaled(self) -> float:
        return self._on_host.loss_unscaled


@dataclass(frozen=True)
class SearchSummary:
    """A scale search's outcome for the report: the winning grid exponent (None when no scaling won), its
    loss, and the loss of plain RTN."""

    ratio: float | None
    loss: float
    loss_unscaled: float

    @classmethod
    def of(cls, numbers: Sequence[float], n_grid: int) -> "SearchSummary":
        """From `ScaleSearch.numbers()` read back: n_grid + 1 losses, then the winner's index."""
        losses, best = numbers[:n_grid + 1], int(numbers[n_grid + 1])
        return cls(ratio=None if best == 0 else (best - 1) / n_grid, loss=losses[best], loss_unscaled=losses[0])


def weight_profile(weights: Sequence[Tensor], group_size: int | None) -> Tensor:
    """Mean over output rows of |w| normalised by its group's max: (in,) float32.
    weights: the (out_i, in) matrices that share one input."""
    w = torch.cat([x.to(torch.float32) for x in weights], dim=0).abs()     # (rows, in)
    rows, in_features = w.shape
    n_groups = n_groups_of(in_features, group_size)
    wg = w.reshape(rows, n_groups, in_features // n_groups)                # (rows, g, gs)
    wg = wg / wg.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return wg.reshape(rows, in_features).mean(dim=0)


def candidate_scales(x_mean: Tensor, w_mean: Tensor, ratio: float, *, duo: bool = True) -> Tensor:
    """s = x_mean^a / w_mean^(1-a) (or x_mean^a without the weight term), floored at 1e-4 so that
    dead channels keep a finite scale, normalised so that max(s) * min(s) = 1. (in,) float32."""
    x_mean = x_mean.to(torch.float32).clamp(min=1e-4)
    s = x_mean.pow(ratio)
    if duo:
        s = s / w_mean.to(torch.float32).clamp(min=1e-4).pow(1.0 - ratio)
    s = s.clamp(min=1e-4)
    return s / torch.sqrt(s.max() * s.min())


def search_scales(
    weights: Mapping[str, Tensor],
    x_mean: Tensor,
    loss_of: Callable[[Mapping[str, Tensor]], Tensor],
    *,
    bits: int,
    group_size: int | None,
    sym: bool,
    scale_dtype: torch.dtype,
    n_grid: int,
    duo: bool = True,
    primitives: AwqPrimitives = awq_reference,
) -> ScaleSearch:
    """weights: name -> (out_i, in) layers that share one input; x_mean: (in,) mean |x| of that input.
    loss_of(candidate): the output error (a 0-dim tensor) when each layer's weight is replaced by
    candidate[name] ((out_i, in) float32); the caller decides what output it measures. Nothing is read
    back from the device (the winner is picked there), so the search queues its work without waiting on
    the GPU; the result's report values read it back when asked."""
    fake_quant = primitives.fake_quant
    w_mean = weight_profile(list(weights.values()), group_size)

    def quantized_with(s: Tensor) -> dict[str, Tensor]:
        return {name: fake_quant(w, s, bits=bits, group_size=group_size or w.shape[1], sym=sym,
                                 scale_dtype=scale_dtype) for name, w in weights.items()}

    ones = torch.ones_like(x_mean, dtype=torch.float32)
    candidates = [ones] + [candidate_scales(x_mean, w_mean, i / n_grid, duo=duo) for i in range(n_grid)]
    losses = torch.stack([loss_of(quantized_with(s)).to(torch.float32) for s in candidates])
    # argmin keeps the first of equal losses: no scaling, then small exponents. index_select, unlike
    # indexing with a 0-dim tensor, does not read the index back.
    best = torch.argmin(losses).reshape(1)
    return ScaleSearch(scales=torch.index_select(torch.stack(candidates), 0, best)[0], losses=losses, best=best,
                       n_grid=n_grid)


def grouped_error(d: Tensor, h: Tensor, group_size: int | None) -> Tensor:
    """Each group's share of the output error: d_g^T H_gg d_g for d: (out, in), h: (in, in).
    Returns (out, n_groups) float32 (cross-group terms of H are left out, as AWQ does)."""
    out_features, in_features = d.shape
    n_groups = n_groups_of(in_features, group_size)
    gs = in_features // n_groups
    blocks = torch.stack([h[g * gs:(g + 1) * gs, g * gs:(g + 1) * gs] for g in range(n_groups)])   # (g, gs, gs)
    dg = d.reshape(out_features, n_groups, gs)                              # (out, g, gs)
    return torch.einsum("ogi,gij,ogj->og", dg, blocks, dg)


def search_clip(
    w: Tensor,
    h: Tensor,
    *,
    bits: int,
    group_size: int | None,
    sym: bool,
    scale_dtype: torch.dtype,
    n_grid: int,
    max_shrink: float,
    primitives: AwqPrimitives = awq_reference,
) -> Tensor:
    """Per (row, group) clip ratio in (1 - max_shrink, 1] that minimises d_g^T H_gg d_g.
    w: (out, in) weights (already scaled); h: (in, in) Hessian of the (scaled) input. Returns (out, n_groups)."""
    w = w.to(torch.float32)
    out_features, in_features = w.shape
    gs = in_features // n_groups_of(in_features, group_size)
    # 1 - k / n_grid, made on the device (no host copy to wait for): float64 gives the same roundings as
    # Python's floats, then one rounding to float32.
    steps = torch.arange(max(1, int(max_shrink * n_grid)), dtype=torch.float64, device=w.device)
    ratios = (1.0 - steps / n_grid).to(torch.float32)
    errors = primitives.clip_error(w, h.to(torch.float32), group_size=gs, bits=bits, sym=sym,
                                   scale_dtype=scale_dtype, ratios=ratios)              # (out, g, n_ratios)
    return ratios[torch.argmin(errors, dim=-1)]                                # ties keep the mildest clip
