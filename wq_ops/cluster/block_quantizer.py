"""Quantize one decoder block, given its tensors and its input activations.

Quantized propagation (the default): statistics see the quantized layers upstream.
- GPTQ and RTN go one linear group at a time (q/k/v, o, gate/up, down for Llama): each group's input is
  captured with every earlier group quantized (GPTQ's true-sequential order),
  and the block's outputs come from the stages' last linears on their kept inputs: one forward per block.
- AWQ goes a stage at a time (a group's scale folds into an earlier linear of its stage): capture the
  stage's inputs, quantize it, recompute its outputs with the quantized weights: two passes per block.
Float propagation: one pass captures every stage's inputs with the float weights and gives the block's
float outputs. No Ray here: actors call `quantize_block_`.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from wq_ops.calib.capture import GroupCapture, capture_group, capture_inputs, capture_stage
from wq_ops.config import AwqLoss, Format, Method, Propagation, QuantConfig
from wq_ops.device.transport import Queued, after_queued_copies, queue_to_host
from wq_ops.formats import encode_linear, scale_dtype
from wq_ops.formats.checks import Checks, raise_failed
from wq_ops.formats.tp_compat import pad_input_columns, pad_output_rows
from wq_ops.model.architecture import LinearSpec
from wq_ops.model.block import STAGE_NORMS, BlockAnatomy, DecoderBlock, LinearGroup
from wq_ops.quant import awq
from wq_ops.quant.gptq import quantize_gptq
from wq_ops.quant.hessian import (
    OutlierSummary,
    hessian_of,
    outlier_channels,
    outlier_summary,
    output_error_tensor,
    quadratic_operand,
    quadratic_sum,
)
from wq_ops.quant.result import QuantResult, dequantize
from wq_ops.quant.rtn import quantize_rtn

# Layers padded by --tp-policy pad: the MLP's intermediate dim is their output (gate, up) or input (down).
_PAD_ROWS = ("mlp.gate_proj", "mlp.up_proj")
_PAD_COLUMNS = ("mlp.down_proj",)

__all__ = ["LayerRecord", "BlockOutcome", "BlockReport", "FloatCalibration", "quantize_block_", "calibrate_float_",
           "calibrate_float_all_", "solve_block_", "replay_block_", "is_ignored"]

# AWQ leaves q and k unclipped: their errors act through the softmax of q.k, where a per-group output
# error is a poor proxy (the AWQ reference implementation skips them for the same reason).
_AWQ_NO_CLIP = ("*q_proj", "*k_proj")


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


class BlockReport:
    """A block's layer records (`layers`) and time per phase (`seconds`), made from numbers queued to the
    host with the block's outcome: read, once for the block, on first use. A GPU actor reads them on its
    writer thread, so that its compute thread queues the next block meanwhile: read at once, the GPU
    stood idle while the records were built, about 10 ms of each 1B block on the H100 (torch profiler).
    It holds no device memory."""

    def __init__(self, records: Sequence[_QueuedRecord], numbers: Queued[Tensor], timer: _Timer,
                 checks: tuple[str, ...] = ()) -> None:
        self._records, self._numbers, self._timer, self._checks = tuple(records), numbers, timer, checks

    @cached_property
    def layers(self) -> tuple[LayerRecord, ...]:
        """The layer records; raises ArtifactError first if one of the packing's checks failed."""
        values = self._numbers.wait()
        raise_failed(self._checks, values[values.numel() - len(self._checks):])
        return _resolve_records(self._records, values[:values.numel() - len(self._checks)])

    @cached_property
    def seconds(self) -> dict[str, float]:
        return self._timer.seconds


@dataclass(frozen=True)
class BlockOutcome:
    """tensors: this block's artifact tensors, named as the format names them; report: its layer records
    and time per phase, read from the device on first use (also as `layers` and `seconds`)."""

    block: int
    tensors: dict[str, Tensor]
    report: BlockReport

    @property
    def layers(self) -> tuple[LayerRecord, ...]:
        return self.report.layers

    @property
    def seconds(self) -> dict[str, float]:
        return self.report.seconds


def is_ignored(full_name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(full_name, p) for p in patterns)


class _Timer:
    """Time per phase. On CUDA, an event recorded on this thread's stream at each phase end, read back
    once when the block is done (`seconds`): a phase is the GPU time since the previous mark, so it counts
    its queued kernels without draining the queue at every phase end. On CPU, wall time."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._wall: dict[str, float] = {}
        self._marks: list[tuple[str, Any]] = []
        self._origin = self._event() if device.type == "cuda" else None

    def _event(self) -> Any:
        # This thread's stream only: a block solved on a side stream must not time the next block's
        # forward on the main one.
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def add(self, phase: str, start: float) -> float:
        now = time.perf_counter()
        if self._origin is not None:
            self._marks.append((phase, self._event()))
        else:
            self._wall[phase] = self._wall.get(phase, 0.0) + now - start
        return now

    def set(self, phase: str, seconds: float) -> None:
        """A phase timed elsewhere (the float calibration's passes)."""
        self._wall[phase] = seconds

    @property
    def seconds(self) -> dict[str, float]:
        out = dict(self._wall)
        if self._marks:
            self._marks[-1][1].synchronize()     # the last mark: the earlier ones are on the same stream
        previous: Any = self._origin
        for phase, event in self._marks:
            out[phase] = out.get(phase, 0.0) + previous.elapsed_time(event) / 1000
            previous = event
        return out


@dataclass
class FloatCalibration:
    """One block's input statistics under float propagation, accumulated a micro-batch at a time (so the
    block can be calibrated while the micro-batches stream through a resident span), then solved."""

    attn: dict[str, GroupCapture] = field(default_factory=dict)
    mlp: dict[str, GroupCapture] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    gpu_passes: list[tuple[Any, Any]] = field(default_factory=list)   # CUDA (start, end) events per pass

    def forward_seconds(self) -> float:
        """Time of the calibration passes. GPU passes are timed with CUDA events, read once here, so that
        no micro-batch waits for the GPU to drain just to be timed."""
        for _, end in self.gpu_passes:
            end.synchronize()
        return self.cpu_seconds + sum(start.elapsed_time(end) for start, end in self.gpu_passes) / 1000


def calibrate_float_(block: DecoderBlock, params: Mapping[str, Tensor], anatomy: BlockAnatomy, x: Tensor,
                     calibration: FloatCalibration, *, quant: QuantConfig) -> Tensor:
    """One input micro-batch x (B, T, hidden) through the block with its float weights `params`: the pass
    that captures each stage's inputs into `calibration` also gives its outputs (one forward). Returns the
    block's output micro-batch; x is not modified."""
    keep = quant.kept_search_samples
    on_gpu = x.device.type == "cuda"
    if on_gpu:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t = time.perf_counter()
    _, (h,) = capture_stage(block, anatomy.stage_groups("self_attn"), lambda v: block.attention_stage(params, v),
                            [x], keep_samples=keep, into=calibration.attn)
    capture_stage(block, anatomy.stage_groups("mlp"), lambda v: _add_mlp_(block, params, v), [h],
                  keep_samples=keep, into=calibration.mlp)
    if on_gpu:
        end.record()
        calibration.gpu_passes.append((start, end))
    else:
        calibration.cpu_seconds += time.perf_counter() - t
    return h


def calibrate_float_all_(block: DecoderBlock, params: Mapping[str, Tensor], anatomy: BlockAnatomy,
                         batches: list[Tensor], *, quant: QuantConfig) -> tuple[FloatCalibration, list[Tensor]]:
    """Every input micro-batch through `calibrate_float_`: the block's statistics and its output
    micro-batches. Consumes `batches` (each input is dropped once used)."""
    calibration = FloatCalibration()
    outputs = []
    while batches:
        outputs.append(calibrate_float_(block, params, anatomy, batches.pop(0), calibration, quant=quant))
    return calibration, outputs


def _add_mlp_(block: DecoderBlock, params: Mapping[str, Tensor], h: Tensor) -> Tensor:
    """y = h + mlp(norm(h)), written over h (the block's second stage, as replay_block_ computes it)."""
    return h.add_(block.mlp(params, block.norm(params, "post_attention_layernorm", h)))


class _BlockSolver:
    """Quantizes a block's stages from their captured statistics, in order, and packs the artifact tensors;
    `work` (the block's tensors) takes each stage's quantized weights and AWQ's folded scales."""

    def __init__(self, block: DecoderBlock, params: Mapping[str, Tensor], anatomy: BlockAnatomy, *,
                 quant: QuantConfig, fmt: Format, block_index: int, prefix: str, linears: tuple[LinearSpec, ...],
                 pad_intermediate: int, timer: _Timer) -> None:
        self.block, self.anatomy, self.quant, self.fmt, self.timer = block, anatomy, quant, fmt, timer
        self.block_index, self.prefix, self.linears = block_index, prefix, linears
        self.pad_intermediate = pad_intermediate
        self.dtype = next(iter(params.values())).dtype
        self.scales_dtype = scale_dtype(fmt, model_dtype=self.dtype)   # the grid is rounded to the format's dtype
        self.work = dict(params)
        self.results: dict[str, QuantResult] = {}
        self.records: list[_PendingRecord] = []
        self.full = {s.name: f"{prefix}.{block_index}.{s.name}" for s in linears}

    def stage(self, stage: str, captures: dict[str, GroupCapture],
              groups: Sequence[LinearGroup] | None = None) -> None:
        """Quantize the stage's groups (or `groups` of it: GPTQ and RTN may go one group at a time)."""
        if groups is None:
            groups = self.anatomy.stage_groups(stage)
        elif self.quant.method is Method.AWQ:
            raise ValueError("AWQ searches a whole stage's scales before it quantizes any of its groups")
        t = time.perf_counter()
        if self.quant.method is Method.AWQ:
            _awq_stage(self.block, stage, groups, captures, self.work, self.results, self.records,
                       quant=self.quant, full=self.full, block_index=self.block_index, dtype=self.dtype,
                       scales_dtype=self.scales_dtype)
        else:
            _hessian_stage(groups, captures, self.work, self.results, self.records, quant=self.quant,
                           full=self.full, block_index=self.block_index, dtype=self.dtype,
                           scales_dtype=self.scales_dtype)
        self.timer.add("solve", t)

    def outcome(self) -> BlockOutcome:
        t = time.perf_counter()
        checks = Checks()
        tensors = _artifact_tensors(self.work, self.results, self.linears, quant=self.quant, fmt=self.fmt,
                                    full=self.full, prefix=f"{self.prefix}.{self.block_index}", dtype=self.dtype,
                                    scales_dtype=self.scales_dtype, pad_intermediate=self.pad_intermediate,
                                    checks=checks)
        self.timer.add("pack", t)
        numbers, records = _queue_numbers(self.records, checks.values())
        return BlockOutcome(self.block_index, tensors, BlockReport(records, numbers, self.timer, checks.messages))


def solve_block_(block: DecoderBlock, params: Mapping[str, Tensor], anatomy: BlockAnatomy,
                 calibration: FloatCalibration, *, quant: QuantConfig, fmt: Format, block_index: int, prefix: str,
                 linears: tuple[LinearSpec, ...], pad_intermediate: int = 0) -> BlockOutcome:
    """Quantize a block calibrated with `calibrate_float_` (its statistics are consumed); `params` is not
    modified. The outcome's seconds include the calibration's forward time."""
    solver = _BlockSolver(block, params, anatomy, quant=quant, fmt=fmt, block_index=block_index, prefix=prefix,
                          linears=linears, pad_intermediate=pad_intermediate, timer=_Timer(_device_of(params)))
    solver.timer.set("forward", calibration.forward_seconds())
    solver.stage("self_attn", calibration.attn)
    solver.stage("mlp", calibration.mlp)
    calibration.attn, calibration.mlp = {}, {}
    return solver.outcome()


def _device_of(params: Mapping[str, Tensor]) -> torch.device:
    return next(iter(params.values())).device


def quantize_block_(
    block: DecoderBlock,
    params: Mapping[str, Tensor],
    anatomy: BlockAnatomy,
    batches: list[Tensor],
    *,
    quant: QuantConfig,
    fmt: Format,
    block_index: int,
    prefix: str,
    linears: tuple[LinearSpec, ...],
    pad_intermediate: int = 0,
    propagation: Propagation = Propagation.QUANTIZED,
    stash_tails: bool = False,
) -> tuple[BlockOutcome, list[Tensor]]:
    """params: block-local name -> tensor (model dtype, on the compute device); batches: the block's input
    micro-batches (B, T, hidden). Returns the outcome and the block's output micro-batches, computed with
    the quantized weights (or, with Propagation.FLOAT, the float ones: the MLP is then calibrated on the
    float attention's output too, and every block sees what the unquantized model feeds it). Consumes
    `batches` (the list is emptied as the inputs are replaced); neither the input tensors nor `params` are
    modified. pad_intermediate: zero rows/columns the artifact adds to the MLP's intermediate dim (the
    computation never sees them). stash_tails: keep each stage's last linear's inputs for its outputs
    (GPTQ and RTN under quantized propagation; see `_quantize_by_group_`) rather than recompute them: the
    plan says whether they fit (ActorPlan.stash_tails)."""
    kw = dict(quant=quant, fmt=fmt, block_index=block_index, prefix=prefix, linears=linears,
              pad_intermediate=pad_intermediate)
    if propagation is Propagation.FLOAT:
        # Float outputs come from the float weights: the capture pass gives them (one forward per block).
        calibration, outputs = calibrate_float_all_(block, params, anatomy, batches, quant=quant)
        return solve_block_(block, params, anatomy, calibration, **kw), outputs  # type: ignore[arg-type]
    solver = _BlockSolver(block, params, anatomy, timer=_Timer(_device_of(params)), **kw)  # type: ignore[arg-type]
    with torch.no_grad():
        if quant.method is Method.AWQ:
            outputs = _quantize_by_stage_(block, solver, anatomy, batches, keep=quant.kept_search_samples)
        else:
            outputs = _quantize_by_group_(block, solver, anatomy, batches, stash_tails=stash_tails)
    return solver.outcome(), outputs


def _quantize_by_group_(block: DecoderBlock, solver: _BlockSolver, anatomy: BlockAnatomy, batches: list[Tensor],
                        *, stash_tails: bool) -> list[Tensor]:
    """GPTQ and RTN under quantized propagation, one linear group at a time in call order: each group's
    input is captured with every group before it already quantized (GPTQ's true-sequential order), by a
    pass that gives the stage's last linear no output rows (no capture reads that output). A stage's norm
    is computed once, its output kept for the stage's passes (quantizing the linears does not change it);
    a group that reads that output itself (anatomy.direct_heads) is captured from it with no pass. Where a
    stage's module returns its last linear's output as is (anatomy.direct_tails), that linear's inputs are
    kept from its capture pass, so the stage's output needs that linear alone: each linear then runs once
    per micro-batch. Otherwise (or without stash_tails) the stage runs again with its quantized weights."""
    work, timer = solver.work, solver.timer
    xs = batches
    for stage, norm in STAGE_NORMS.items():
        module = block.self_attn if stage == "self_attn" else block.mlp

        def run(normed: Tensor, module: Callable[[Mapping[str, Tensor], Tensor], Tensor] = module) -> Tensor:
            return module(work, normed)

        groups = anatomy.stage_groups(stage)
        tail = stash_tails and bool(groups) and stage in anatomy.direct_tails and len(groups[-1].names) == 1
        t = time.perf_counter()
        normed = [block.norm(work, norm, x) for x in xs]
        stashed: list[Tensor] = []
        for i, group in enumerate(groups):
            keep = tail and i == len(groups) - 1
            if group.names[0] in anatomy.direct_heads:      # its input is the norm's output: no pass needed
                capture, stashed = capture_inputs(normed), list(normed) if keep else []
            else:
                # The pass's weights: the groups before this one quantized, the stage's last linear free.
                trimmed = _without_last_output(work, groups)
                capture, stashed = capture_group(block, group, functools.partial(module, trimmed), normed,
                                                 keep_inputs=keep)
                del trimmed
            timer.add("forward", t)
            solver.stage(stage, {group.names[0]: capture}, groups=(group,))
            t = time.perf_counter()
        if tail:
            normed.clear()
        # The stage's outputs: x + module(norm(x)). The block's inputs are the caller's, so the first stage
        # adds out of place; the second writes over its own inputs h, as replay_block_ does.
        in_place = stage != "self_attn"
        outputs = []
        while xs:
            x = xs.pop(0)
            y = block.linear(work, groups[-1].names[0], stashed.pop(0)) if tail else run(normed.pop(0))
            outputs.append(x.add_(y) if in_place else x + y)
        timer.add("forward", t)
        xs = outputs
    return xs


def _quantize_by_stage_(block: DecoderBlock, solver: _BlockSolver, anatomy: BlockAnatomy, batches: list[Tensor],
                        *, keep: int) -> list[Tensor]:
    """AWQ under quantized propagation, a stage at a time: it searches every group's scales before it
    quantizes any (a group's scale is folded into an earlier linear of its stage, which must still be
    float), so a stage's inputs are captured in one pass, with the stage before it quantized. Its outputs
    take a second pass after its solve; the capture pass skips the stage's last linear (its output is not
    needed there)."""
    work, timer = solver.work, solver.timer
    t = time.perf_counter()
    attn_groups = anatomy.stage_groups("self_attn")
    trimmed = _without_last_output(work, attn_groups)
    captures, _ = capture_stage(block, attn_groups,
                                lambda x: block.self_attn(trimmed, block.norm(work, "input_layernorm", x)),
                                batches, keep_samples=keep)
    timer.add("forward", t)
    solver.stage("self_attn", captures)
    t = time.perf_counter()
    hs = []
    while batches:                                   # x -> h, dropping each input once it is used
        hs.append(block.attention_stage(work, batches.pop(0)))
    mlp_groups = anatomy.stage_groups("mlp")
    trimmed = _without_last_output(work, mlp_groups)
    captures, _ = capture_stage(block, mlp_groups,
                                lambda h: block.mlp(trimmed, block.norm(work, "post_attention_layernorm", h)),
                                hs, keep_samples=keep)
    trimmed.clear()                                  # drop its references to the float MLP weights
    timer.add("forward", t)
    solver.stage("mlp", captures)
    del captures
    t = time.perf_counter()
    for h in hs:
        _add_mlp_(block, work, h)
    timer.add("forward", t)
    return hs


def _without_last_output(work: Mapping[str, Tensor], groups: Sequence[LinearGroup]) -> dict[str, Tensor]:
    """The stage's tensors with its last linear given zero output rows, when that linear is alone in its
    group: a capture pass needs that layer's input but never its output, and an empty (0, in) weight
    makes its matmul free (the stage then returns a (..., 0) tensor, which the pass ignores)."""
    trimmed = dict(work)
    if groups and len(groups[-1].names) == 1:
        name = groups[-1].names[0]
        trimmed[name + ".weight"] = work[name + ".weight"][:0]
        if name + ".bias" in work:
            trimmed[name + ".bias"] = work[name + ".bias"][:0]
    return trimmed


def replay_block_(block: DecoderBlock, params: Mapping[str, Tensor], batches: list[Tensor]) -> list[Tensor]:
    """The block's outputs with `params` (the weights a finished block was quantized to), by the same
    operations quantize_block_ computes its outputs with, so they match it bit for bit. Consumes `batches`."""
    with torch.no_grad():
        hs = []
        while batches:
            hs.append(block.attention_stage(params, batches.pop(0)))
        for h in hs:
            _add_mlp_(block, params, h)
    return hs


@dataclass(frozen=True)
class _PendingRecord:
    """A LayerRecord whose numbers are still on the device. A block queues them to the host in one copy
    (`_queue_numbers`), so that its kernels queue without the GPU draining after every layer."""

    name: str
    block: int
    group: str
    quantized: bool
    error: Tensor | None                  # output_error_tensor; None for a layer left unquantized
    result: QuantResult | None
    seconds: float
    channels: Tensor                      # outlier_channels of the layer's input
    search: awq.ScaleSearch | None = None


@dataclass(frozen=True)
class _QueuedRecord:
    """A _PendingRecord with its numbers on their way to the host: what they are, in copy order (the
    channel statistics, then the output error, the proxy loss and the scale search's numbers, where the
    layer has them). It holds no device memory."""

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


def _queue_numbers(records: Sequence[_PendingRecord],
                   checks: Sequence[Tensor] = ()) -> tuple[Queued[Tensor], tuple[_QueuedRecord, ...]]:
    """The block's records' numbers (each layer's input channel statistics, output error, proxy loss and
    scale search), then the packing's `checks`, queued to the host in one copy, into pinned memory, rather
    than read a few per layer; and the records without their device tensors."""
    values: list[Tensor] = []
    queued = []
    for r in records:
        values.append(r.channels.reshape(-1))
        if r.error is not None:
            values.append(r.error.reshape(1))
        row_loss = r.result.row_loss if r.result is not None else None
        if row_loss is not None:
            values.append(row_loss.sum().reshape(1))                 # as QuantResult.loss sums it
        if r.search is not None:
            values.append(r.search.numbers())
        queued.append(_QueuedRecord(
            name=r.name, block=r.block, group=r.group, quantized=r.quantized,
            damp_frac=r.result.damp_frac if r.result is not None else None, seconds=r.seconds,
            channels_shape=tuple(r.channels.shape), has_error=r.error is not None, has_loss=row_loss is not None,
            search_grid=r.search.n_grid if r.search is not None else None))
    values.extend(checks)
    numbers = torch.cat([v.to(torch.float64) for v in values]) if values else torch.empty(0, dtype=torch.float64)
    return after_queued_copies(queue_to_host(numbers), cuda=numbers.is_cuda), tuple(queued)


def _resolve_records(records: Sequence[_QueuedRecord], numbers: Tensor) -> tuple[LayerRecord, ...]:
    """The LayerRecords, from `_queue_numbers`' records and numbers (on the host)."""
    out, at = [], 0
    for r in records:
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
        out.append(LayerRecord(name=r.name, block=r.block, group=r.group, quantized=r.quantized, output_error=error,
                               proxy_loss=proxy_loss, damp_frac=r.damp_frac, seconds=r.seconds,
                               outliers=outlier_summary(channels),
                               awq_ratio=found.ratio if found else None,
                               awq_loss_unscaled=found.loss_unscaled if found else None,
                               awq_loss=found.loss if found else None))
    assert at == numbers.numel(), (at, numbers.numel())
    return tuple(out)


def _record(name: str, block_index: int, group: LinearGroup, cap: GroupCapture, *, error: Tensor | None,
            result: QuantResult | None, seconds: float, search: awq.ScaleSearch | None = None) -> _PendingRecord:
    return _PendingRecord(name=name, block=block_index, group=group.names[0], quantized=error is not None,
                          error=error, result=result, seconds=seconds, channels=outlier_channels(cap.stats),
                          search=search)


def _hessian_stage(groups: Sequence[LinearGroup], captures: dict[str, GroupCapture], work: dict[str, Tensor],
                   results: dict[str, QuantResult], records: list[_PendingRecord], *, quant: QuantConfig,
                   full: dict[str, str], block_index: int, dtype: torch.dtype, scales_dtype: torch.dtype) -> None:
    """GPTQ or RTN per group. GPTQ rows are independent given H, so the layers that share an input are
    stacked and solved at once: one factorisation of H, larger matmuls. The Hessian also measures RTN."""
    for group in groups:
        cap = captures[group.names[0]]
        h = hessian_of(cap.stats)
        names = [n for n in group.names if not is_ignored(full[n], quant.ignore)]
        for name in group.names:
            if name not in names:
                records.append(_record(full[name], block_index, group, cap, error=None, result=None, seconds=0.0))
        if not names:
            continue
        t = time.perf_counter()
        weights = [work[n + ".weight"] for n in names]
        stacked = torch.cat(weights) if len(weights) > 1 else weights[0]
        if quant.method is Method.GPTQ:
            result = quantize_gptq(stacked, h, bits=quant.bits, group_size=quant.group_size, sym=quant.sym,
                                   damp_frac=quant.damp_frac, act_order=quant.act_order, block_size=quant.block_size,
                                   scale_dtype=scales_dtype, backend=quant.backend)
        else:
            result = quantize_rtn(stacked, bits=quant.bits, group_size=quant.group_size, sym=quant.sym,
                                  scale_dtype=scales_dtype)
        parts = result.split_rows([w.shape[0] for w in weights])
        seconds = (time.perf_counter() - t) / len(names)
        h = quadratic_operand(h)                  # converted once for every layer of the group
        for name, w, part in zip(names, weights, parts):
            w_hat = dequantize(part, dtype)
            results[name] = part
            work[name + ".weight"] = w_hat
            records.append(_record(full[name], block_index, group, cap, error=output_error_tensor(w, w_hat, h),
                                   result=part, seconds=seconds))


def _scale_producer(work: dict[str, Tensor], producer: str, s: Tensor, dtype: torch.dtype) -> None:
    """Divide the producer's output channels by s: a norm's weight (and bias), or a linear's rows (and bias)."""
    w = work[producer + ".weight"].to(torch.float32)
    work[producer + ".weight"] = (w / (s if w.dim() == 1 else s.unsqueeze(1))).to(dtype)
    if producer + ".bias" in work:
        work[producer + ".bias"] = (work[producer + ".bias"].to(torch.float32) / s).to(dtype)


def _awq_stage(block: DecoderBlock, stage: str, groups: Sequence[LinearGroup], captures: dict[str, GroupCapture],
               work: dict[str, Tensor], results: dict[str, QuantResult], records: list[_PendingRecord], *,
               quant: QuantConfig, full: dict[str, str], block_index: int, dtype: torch.dtype,
               scales_dtype: torch.dtype) -> None:
    """Search and fold every group's scales first (the weights still unquantized), then clip-search and
    quantize every layer of the stage, as AWQ does."""
    inspect: Callable[[Mapping[str, Tensor], Tensor], Tensor] = block.self_attn if stage == "self_attn" else block.mlp
    scales: dict[str, Tensor] = {}
    searches: dict[str, awq.ScaleSearch] = {}
    hessians: dict[str, Tensor] = {}      # a lone linear's H serves its scale search and then its clip search
    for group in groups:
        if group.producer is None:
            continue
        cap = captures[group.names[0]]
        x_mean = cap.stats.abs_sum / max(cap.stats.n_tokens, 1)
        weights = {n: work[n + ".weight"] for n in group.names}
        if len(group.names) == 1 or quant.awq_loss is AwqLoss.LAYER:
            h = hessian_of(cap.stats)
            if len(group.names) == 1:
                hessians[group.names[0]] = h      # its clip search reuses it; a wider group's is made again
            loss_of = _layer_loss(weights, h)
            del h
        else:
            loss_of = _module_loss(inspect, work, cap.kept, dtype)
        search = awq.search_scales(weights, x_mean, loss_of, bits=quant.bits, group_size=quant.group_size,
                                   sym=quant.sym, scale_dtype=scales_dtype, n_grid=quant.awq_grid,
                                   backend=quant.backend)
        del loss_of                               # its bf16 H or replayed outputs: not needed by the clip search
        searches[group.names[0]] = search
        # Scaled even where no scaling won (all ones, exact: the same bytes), so that nothing waits to read
        # the winner back from the GPU.
        s = search.scales.to(x_mean.device)
        scales[group.names[0]] = s
        _scale_producer(work, group.producer, s, dtype)
        for n in group.names:
            work[n + ".weight"] = (work[n + ".weight"].to(torch.float32) * s).to(dtype)
        cap.kept.clear()

    for group in groups:
        cap = captures[group.names[0]]
        held = hessians.pop(group.names[0], None)
        h = held if held is not None else hessian_of(cap.stats)
        group_scale = scales.get(group.names[0])
        if group_scale is not None:
            h = h / torch.outer(group_scale, group_scale)          # the Hessian of the scaled input x / s
        h_error = quadratic_operand(h)            # converted once for every layer of the group
        for name in group.names:
            t = time.perf_counter()
            w = work[name + ".weight"].to(torch.float32)
            if is_ignored(full[name], quant.ignore):
                records.append(_record(full[name], block_index, group, cap, error=None, result=None, seconds=0.0))
                continue
            clip = None
            if not is_ignored(name, _AWQ_NO_CLIP):
                clip = awq.search_clip(w, h, bits=quant.bits, group_size=quant.group_size, sym=quant.sym,
                                       scale_dtype=scales_dtype, n_grid=quant.awq_clip_grid,
                                       max_shrink=quant.awq_max_shrink,
                                       backend=quant.backend)
            result = quantize_rtn(w, bits=quant.bits, group_size=quant.group_size, sym=quant.sym,
                                  scale_dtype=scales_dtype, clip=clip)
            w_hat = dequantize(result, dtype)
            results[name] = result
            work[name + ".weight"] = w_hat
            records.append(_record(full[name], block_index, group, cap, error=output_error_tensor(w, w_hat, h_error),
                                   result=result, seconds=time.perf_counter() - t,
                                   search=searches.get(group.names[0])))


def _layer_loss(weights: Mapping[str, Tensor], h: Tensor) -> Callable[[Mapping[str, Tensor]], Tensor]:
    """AWQ loss of linears that share one input: their output errors tr(D H D^T), summed, over all
    calibration tokens, from that input's H (the AWQ paper's objective)."""
    w32 = {name: w.to(torch.float32) for name, w in weights.items()}
    h = quadratic_operand(h)                          # converted once for every candidate

    def loss_of(cand: Mapping[str, Tensor]) -> Tensor:
        return torch.stack([quadratic_sum(cand[name] - w, h) for name, w in w32.items()]).sum()

    return loss_of


def _module_loss(inspect: Callable[[Mapping[str, Tensor], Tensor], Tensor], work: Mapping[str, Tensor],
                 inputs: list[Tensor], dtype: torch.dtype) -> Callable[[Mapping[str, Tensor]], Tensor]:
    """AWQ loss of a group read by a whole module (attention, MLP): the MSE of that module's output on the
    kept samples, the other weights unchanged."""
    refs = [inspect(work, x) for x in inputs]
    count = sum(ref.numel() for ref in refs)

    def loss_of(cand: Mapping[str, Tensor]) -> Tensor:
        trial = dict(work)
        trial.update({n + ".weight": v.to(dtype) for n, v in cand.items()})
        total = torch.zeros((), dtype=torch.float32, device=refs[0].device)
        for x, ref in zip(inputs, refs):
            # The difference is taken in the model dtype (exact where the two outputs are within a factor
            # of 2 of each other, one rounding elsewhere); the squares and their sum are float32, in one
            # fused reduction without a float32 copy.
            total = total + torch.linalg.vector_norm(inspect(trial, x) - ref, dtype=torch.float32) ** 2
        return total / max(count, 1)

    return loss_of


def _artifact_tensors(work: Mapping[str, Tensor], results: Mapping[str, QuantResult], linears: tuple[LinearSpec, ...],
                      *, quant: QuantConfig, fmt: Format, full: dict[str, str], prefix: str,
                      dtype: torch.dtype, scales_dtype: torch.dtype, pad_intermediate: int = 0,
                      checks: Checks | None = None) -> dict[str, Tensor]:
    """Quantized linears in the format's layout; everything else (norms, biases, ignored layers, AWQ's
    rescaled norms) in the model dtype. With pad_intermediate, gate/up get that many output rows and down
    that many input columns, all exactly zero, so the padded model computes what the unpadded one does."""
    tensors: dict[str, Tensor] = {}
    quantized_weights = set()
    for spec in linears:
        result = results.get(spec.name)
        if result is not None:
            if pad_intermediate and spec.name in _PAD_ROWS:
                result = pad_output_rows(result, pad_intermediate)
            elif pad_intermediate and spec.name in _PAD_COLUMNS:
                result = pad_input_columns(result, pad_intermediate)
            tensors.update(encode_linear(fmt, full[spec.name], result, quant=quant, scale_dtype=scales_dtype,
                                         checks=checks))
            quantized_weights.add(spec.name + ".weight")
    for local, value in work.items():
        if local not in quantized_weights:
            module, leaf = local.rsplit(".", 1)
            if pad_intermediate and module in _PAD_ROWS:        # dense (ignored) gate/up: weight rows, bias
                value = torch.cat([value, value.new_zeros((pad_intermediate, *value.shape[1:]))])
            elif pad_intermediate and module in _PAD_COLUMNS and leaf == "weight":
                value = torch.cat([value, value.new_zeros((value.shape[0], pad_intermediate))], dim=1)
            tensors[f"{prefix}.{local}"] = value.to(dtype)
    return tensors
