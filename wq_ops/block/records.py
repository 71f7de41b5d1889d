"""What a quantized block reports per layer, and how its numbers leave the device: the layers' numbers
(input channel statistics, output error, proxy loss, AWQ's search) stay on the device while the block is
solved, and are gathered into one float64 vector (`PendingReport.numbers`) that the caller copies to the
host once, however it likes (queued, on a GPU); `PendingReport.resolve` turns that copy into
`LayerRecord`s. Read one number per layer instead, and the GPU drains after every layer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from wq_ops.formats.checks import raise_failed
from wq_ops.model.block import LinearGroup
from wq_ops.quant import awq
from wq_ops.quant.hessian import InputStats, OutlierSummary, outlier_channels, outlier_summary
from wq_ops.quant.result import WeightResult

__all__ = ["LayerRecord", "BlockRecord", "PendingLayer", "PendingReport", "pending_layer", "pending_report",
           "merged_reports"]


@dataclass(frozen=True)
class LayerRecord:
    """Per-layer metrics for the report. output_error: ||(W - Q) X||^2 / ||W X||^2 over this block's
    calibration inputs (0 for a layer left unquantized); proxy_loss: the method's own objective."""

    name: str
    block: int
    group: str
    quantized: bool
    output_error: float
    proxy_loss: float | None
    damp_frac: float | None
    seconds: float
    outliers: OutlierSummary
    awq_ratio: float | None = None
    awq_loss_unscaled: float | None = None
    awq_loss: float | None = None
    tokens: int | None = None             # calibration tokens its statistics came from (an expert's: routed)
    starved: bool = False                 # an expert with fewer tokens than --moe-min-tokens: quantized with RTN
    absmax_before_smoothing: float | None = None    # SmoothQuant: the input's absmax before (outliers: after)


@dataclass(frozen=True)
class BlockRecord:
    """A block's layer records and its time per phase (seconds)."""

    block: int
    layers: tuple[LayerRecord, ...]
    seconds: dict[str, float]


@dataclass(frozen=True)
class PendingLayer:
    """A LayerRecord whose numbers are still on the device (gathered by `pending_report`)."""

    name: str
    block: int
    group: str
    quantized: bool
    error: Tensor | None                  # output_error_tensor; None for a layer left unquantized
    result: WeightResult | None
    seconds: float
    channels: Tensor                      # outlier_channels of the layer's input
    search: awq.ScaleSearch | None = None
    tokens: int | None = None
    starved: bool = False
    smoothed_from: Tensor | None = None   # () the input's absmax before SmoothQuant's smoothing


def pending_layer(name: str, block_index: int, group: LinearGroup, stats: InputStats, *, error: Tensor | None,
                  result: WeightResult | None, seconds: float, search: awq.ScaleSearch | None = None,
                  starved: bool = False, smoothed_from: Tensor | None = None) -> PendingLayer:
    """A layer's record with its numbers on the device: quantized where it has an output error. stats: of its
    input as quantized (smoothed, where SmoothQuant ran: smoothed_from is then the absmax before)."""
    return PendingLayer(name=name, block=block_index, group=group.names[0], quantized=error is not None,
                        error=error, result=result, seconds=seconds, channels=outlier_channels(stats), search=search,
                        tokens=stats.n_tokens, starved=starved, smoothed_from=smoothed_from)


@dataclass(frozen=True)
class _Slot:
    """Where one layer's numbers sit in the gathered vector, in copy order (the channel statistics, then the
    output error, the proxy loss and the scale search's numbers, where the layer has them)."""

    name: str
    block: int
    group: str
    quantized: bool
    damp_frac: float | None
    seconds: float
    channels_shape: tuple[int, ...]
    has_error: bool
    has_loss: bool
    search_grid: int | None               # the scale search's n_grid; None without a search
    tokens: int | None = None
    starved: bool = False
    has_smoothing: bool = False


@dataclass(frozen=True)
class PendingReport:
    """numbers: (n,) float64 on the block's device, every layer's numbers then the packing checks' values;
    `resolve` reads a host copy of it. It holds no other device memory."""

    numbers: Tensor
    slots: tuple[_Slot, ...]
    checks: tuple[str, ...] = ()

    def resolve(self, numbers: Tensor) -> tuple[LayerRecord, ...]:
        """The layer records from a host copy of `numbers`; raises ArtifactError first if a packing check
        failed (`wq_ops.formats.checks`)."""
        n_checks = len(self.checks)
        raise_failed(self.checks, numbers[numbers.numel() - n_checks:])
        return _records(self.slots, numbers[:numbers.numel() - n_checks])


def pending_report(layers: Sequence[PendingLayer], checks: Sequence[Tensor] = (),
                   messages: Sequence[str] = ()) -> PendingReport:
    """Every layer's numbers, then the packing `checks` (one-element tensors, failing with `messages`), in
    one float64 vector on the device, and where each layer's numbers sit in it."""
    values: list[Tensor] = []
    slots = []
    for r in layers:
        values.append(r.channels.reshape(-1))
        if r.error is not None:
            values.append(r.error.reshape(1))
        row_loss = r.result.row_loss if r.result is not None else None
        if row_loss is not None:
            values.append(row_loss.sum().reshape(1))                 # as WeightResult.loss sums it
        if r.search is not None:
            values.append(r.search.numbers())
        if r.smoothed_from is not None:
            values.append(r.smoothed_from.reshape(1))
        slots.append(_Slot(
            name=r.name, block=r.block, group=r.group, quantized=r.quantized,
            damp_frac=r.result.damp_frac if r.result is not None else None, seconds=r.seconds,
            channels_shape=tuple(r.channels.shape), has_error=r.error is not None, has_loss=row_loss is not None,
            search_grid=r.search.n_grid if r.search is not None else None, tokens=r.tokens, starved=r.starved,
            has_smoothing=r.smoothed_from is not None))
    values.extend(checks)
    numbers = torch.cat([v.to(torch.float64) for v in values]) if values else torch.empty(0, dtype=torch.float64)
    return PendingReport(numbers=numbers, slots=tuple(slots), checks=tuple(messages))


def merged_reports(reports: Sequence[PendingReport], device: torch.device) -> PendingReport:
    """One report of several parts of a block (its own layers', then each expert range's, in that order), its
    numbers on `device`: every part's layer numbers, then every part's checks."""
    layers, checks = [], []
    for r in reports:
        n_checks = len(r.checks)
        numbers = r.numbers.to(device)
        layers.append(numbers[:numbers.numel() - n_checks])
        checks.append(numbers[numbers.numel() - n_checks:])
    numbers = torch.cat(layers + checks) if reports else torch.empty(0, dtype=torch.float64, device=device)
    return PendingReport(numbers=numbers, slots=tuple(s for r in reports for s in r.slots),
                         checks=tuple(c for r in reports for c in r.checks))


def _records(slots: Sequence[_Slot], numbers: Tensor) -> tuple[LayerRecord, ...]:
    out, at = [], 0
    for r in slots:
        n = math.prod(r.channels_shape)
        channels = numbers[at:at + n].to(torch.float32).reshape(r.channels_shape)
        at += n
        error = 0.0
        if r.has_error:
            error, at = float(numbers[at]), at + 1
        proxy_loss = None
        if r.has_loss:
            proxy_loss, at = float(numbers[at]), at + 1
        found = None
        if r.search_grid is not None:
            found = awq.SearchSummary.of(numbers[at:at + r.search_grid + 2].tolist(), r.search_grid)
            at += r.search_grid + 2
        before = None
        if r.has_smoothing:
            before, at = float(numbers[at]), at + 1
        out.append(LayerRecord(name=r.name, block=r.block, group=r.group, quantized=r.quantized, output_error=error,
                               proxy_loss=proxy_loss, damp_frac=r.damp_frac, seconds=r.seconds,
                               outliers=outlier_summary(channels),
                               awq_ratio=found.ratio if found else None,
                               awq_loss_unscaled=found.loss_unscaled if found else None,
                               awq_loss=found.loss if found else None, tokens=r.tokens, starved=r.starved,
                               absmax_before_smoothing=before))
    assert at == numbers.numel(), (at, numbers.numel())
    return tuple(out)
