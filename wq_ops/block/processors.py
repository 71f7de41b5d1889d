"""One `Processor` per method: how a stage's groups of linears are quantized from their captured input
statistics (GPTQ and RTN after SmoothQuant's smoothing, where the job asks for it), and whether a stage goes
a group at a time (GPTQ and RTN: each group's inputs are captured with the groups before it quantized, GPTQ's
true-sequential order) or whole (AWQ: a group's scale folds into an earlier linear of its stage, which must
still be float). Chosen in one table: `PROCESSORS`; FP8 weights (rounded to nearest, whatever the method
table says) by `processor_for`."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from wq_ops.block.awq_stage import quantize_awq_stage
from wq_ops.block.folding import fold_input_scales_
from wq_ops.block.records import pending_layer
from wq_ops.block.work import BlockWork
from wq_ops.calib.capture import GroupCapture
from wq_ops.config import Method, QuantConfig
from wq_ops.config.schemes import NumberType, WeightLayout
from wq_ops.formats.block_tensors import is_ignored
from wq_ops.kernels.backends import kernels_for
from wq_ops.model.block import LinearGroup
from wq_ops.quant import nvfp4, smoothquant
from wq_ops.quant.fp8 import fp8_scale_of, quantize_fp8
from wq_ops.quant.gptq import quantize_gptq, quantize_gptq_many
from wq_ops.quant.hessian import InputStats, hessian_of, output_error_tensor, quadratic_operand
from wq_ops.quant.hqq import quantize_hqq
from wq_ops.quant.result import QuantResult, WeightResult, dequantize
from wq_ops.quant.rtn import quantize_rtn

__all__ = ["Processor", "PROCESSORS", "processor_for"]


class Processor(Protocol):
    by_stage: bool      # quantize a whole stage at once (its inputs captured in one pass), not a group at a time

    def quantize(self, work: BlockWork, stage: str, groups: Sequence[LinearGroup],
                 captures: dict[str, GroupCapture], *, together: bool = False) -> None:
        """Quantize `groups` of `stage` from `captures` (by each group's first linear): the results and
        pending records go into `work`, and each quantized weight's dequantized values replace it there.
        together: the groups may be solved in one batch where the method can (the same results)."""


@dataclass
class _Prepared:
    """One group of a stage, ready to solve: its Hessian and statistics (smoothed where SmoothQuant ran), the
    linears it quantizes (not ignored) and their weights stacked (rows of layers sharing an input)."""

    group: LinearGroup
    h: torch.Tensor
    stats: InputStats
    starved: bool
    smoothed_from: torch.Tensor | None
    names: list[str]
    weights: list[torch.Tensor]

    @property
    def stacked(self) -> torch.Tensor:
        return torch.cat(self.weights) if len(self.weights) > 1 else self.weights[0]


class _HessianProcessor:
    """GPTQ or RTN, a group of linears at a time. Rows are independent given H, so the layers that share an
    input are stacked and solved at once: one factorisation of H, larger matmuls. With `together`, GPTQ
    solves the groups of one shape (a routed MLP's experts) in one batch, each as it would be alone. The
    Hessian also measures RTN's output error."""

    by_stage = False

    def __init__(self, method: Method) -> None:
        self.method = method

    def quantize(self, work: BlockWork, stage: str, groups: Sequence[LinearGroup],
                 captures: dict[str, GroupCapture], *, together: bool = False) -> None:
        if not (together and self.method is Method.GPTQ):
            for group in groups:
                p = self._prepare(work, group, captures[group.names[0]])
                if p is not None:
                    t = time.perf_counter()
                    result = self._solve(work, p.stacked, p.h, rtn=p.starved)
                    self._record(work, p, result, (time.perf_counter() - t) / len(p.names))
            return
        ready = [p for p in (self._prepare(work, group, captures[group.names[0]]) for group in groups) if p is not None]
        while ready:
            # A batch: the first group left and every other one of its shape (none if it is starved: RTN).
            first = ready[0]
            batch = [first] if first.starved else [p for p in ready if not p.starved and _shape(p) == _shape(first)]
            t = time.perf_counter()
            if first.starved:
                results = [self._solve(work, first.stacked, first.h, rtn=True)]
            else:
                results = quantize_gptq_many(torch.stack([p.stacked for p in batch]), torch.stack([p.h for p in batch]),
                                             names=[work.task.full_name(p.names[0]) for p in batch],
                                             **self._gptq_args(work))
            seconds = (time.perf_counter() - t) / sum(len(p.names) for p in batch)
            for p, result in zip(batch, results):
                self._record(work, p, result, seconds)
            ready = [p for p in ready if all(p is not b for b in batch)]

    def _prepare(self, work: BlockWork, group: LinearGroup, cap: GroupCapture) -> _Prepared | None:
        task, quant = work.task, work.task.quant
        h = hessian_of(cap.stats)
        stats, smoothed_from = cap.stats, None
        starved = work.is_starved(group.names[0], cap.stats.n_tokens)
        norm = _norm_producer(work, group)
        if quant.smoothquant is not None and norm is not None and not starved:
            h, stats, smoothed_from = _smooth_(work, group, norm, cap.stats, h, alpha=quant.smoothquant)
        names = [n for n in group.names if not is_ignored(task.full_name(n), quant.ignore)]
        for name in group.names:
            if name not in names:
                work.layers.append(pending_layer(task.full_name(name), task.block_index, group, stats,
                                                 error=None, result=None, seconds=0.0,
                                                 smoothed_from=smoothed_from))
        if not names:
            return None
        return _Prepared(group, h, stats, starved, smoothed_from, names, [work.work[n + ".weight"] for n in names])

    def _record(self, work: BlockWork, p: _Prepared, result: QuantResult, seconds: float) -> None:
        task = work.task
        parts = result.split_rows([w.shape[0] for w in p.weights])
        h = quadratic_operand(p.h)                  # converted once for every layer of the group
        for name, w, part in zip(p.names, p.weights, parts):
            w_hat = dequantize(part, work.dtype)
            work.results[name] = part
            work.work[name + ".weight"] = w_hat
            work.layers.append(pending_layer(task.full_name(name), task.block_index, p.group, p.stats,
                                             error=output_error_tensor(w, w_hat, h), result=part,
                                             seconds=seconds, starved=p.starved, smoothed_from=p.smoothed_from))

    def _gptq_args(self, work: BlockWork) -> dict:
        quant = work.task.quant
        return dict(bits=quant.bits, group_size=quant.group_size, sym=quant.sym, damp_frac=quant.gptq.damp_frac,
                    act_order=quant.act_order, block_size=quant.gptq.block_size, scale_dtype=work.scales_dtype,
                    solver=kernels_for(quant.backend).gptq)

    def _solve(self, work: BlockWork, w: torch.Tensor, h: torch.Tensor, *, rtn: bool) -> QuantResult:
        quant = work.task.quant
        if self.method is Method.GPTQ and not rtn:
            return quantize_gptq(w, h, **self._gptq_args(work))
        if self.method is Method.HQQ and not rtn:
            return quantize_hqq(w, bits=quant.bits, group_size=quant.group_size, sym=quant.sym,
                                scale_dtype=work.scales_dtype)
        clip = None
        if quant.rtn_clip_search and self.method is Method.RTN:
            search = kernels_for(quant.backend).clip_search
            clip = search(w.to(torch.float32), bits=quant.bits, group_size=quant.group_size, sym=quant.sym,
                          scale_dtype=work.scales_dtype, importance=h.diagonal().to(torch.float32).contiguous())
        return quantize_rtn(w, bits=quant.bits, group_size=quant.group_size, sym=quant.sym,
                            scale_dtype=work.scales_dtype, clip=clip)


def _shape(p: _Prepared) -> tuple[int, int]:
    return sum(w.shape[0] for w in p.weights), p.weights[0].shape[1]


def _norm_producer(work: BlockWork, group: LinearGroup) -> str | None:
    """The norm the group's input comes from, where it can absorb a per-channel scale (SmoothQuant's mapping:
    q/k/v from the attention's norm, gate/up from the MLP's; a routed MLP's norm also feeds its router, so its
    experts have no producer); None otherwise."""
    if group.producer is None or work.work[group.producer + ".weight"].dim() != 1:
        return None
    return group.producer


def _smooth_(work: BlockWork, group: LinearGroup, norm: str, stats: InputStats, h: torch.Tensor, *,
             alpha: float) -> tuple[torch.Tensor, InputStats, torch.Tensor]:
    """SmoothQuant on one group: its factors folded into `norm` and its weights (in `work`, hence the `_`).
    Returns the Hessian and statistics of the smoothed input x / s, and the input's absmax before."""
    s = smoothquant.smoothing_scales(stats.abs_max, [work.work[n + ".weight"] for n in group.names], alpha=alpha)
    fold_input_scales_(work.work, norm, group.names, s, work.dtype)
    smoothed = InputStats(xtx=stats.xtx, abs_sum=stats.abs_sum / s, abs_max=stats.abs_max / s,
                          n_tokens=stats.n_tokens)
    return h / torch.outer(s, s), smoothed, stats.abs_max.max()


class _FloatProcessor:
    """FP8 or NVFP4 weights, rounded to nearest a layer at a time, the output error measured under the group's
    input Hessian. FP8: each layer on its own scales (one per channel, tensor or block: stacking layers would
    share a tensor's or a block's scale). NVFP4: the group's layers (q/k/v, gate/up: what an engine fuses)
    share one global scale. Static activation scales come from the calibration inputs' largest magnitude."""

    by_stage = False

    def quantize(self, work: BlockWork, stage: str, groups: Sequence[LinearGroup],
                 captures: dict[str, GroupCapture], *, together: bool = False) -> None:
        task, quant = work.task, work.task.quant
        fp4 = quant.layout is WeightLayout.TENSOR_GROUP
        static = quant.activations is not None and not quant.activations.dynamic
        for group in groups:
            cap = captures[group.names[0]]
            h = quadratic_operand(hessian_of(cap.stats))
            names = [n for n in group.names if not is_ignored(task.full_name(n), quant.ignore)]
            for name in group.names:
                if name not in names:
                    work.layers.append(pending_layer(task.full_name(name), task.block_index, group, cap.stats,
                                                     error=None, result=None, seconds=0.0))
            if not names:
                continue
            global_scale = nvfp4.global_scale_of(torch.stack([work.work[n + ".weight"].abs().max() for n in names])
                                                 .max()) if fp4 else None
            # The group's one input: its static scale (FP8's per tensor; NVFP4's global, local ones at run time).
            input_amax = cap.stats.abs_max.max()
            input_scale = None if not static else nvfp4.global_scale_of(input_amax) if fp4 \
                else fp8_scale_of(input_amax, scale_dtype=work.scales_dtype)
            for name in names:
                t = time.perf_counter()
                w = work.work[name + ".weight"]
                result: WeightResult
                if global_scale is not None:
                    result = nvfp4.quantize_nvfp4(w, global_scale=global_scale)
                    if input_scale is not None:
                        result = dataclasses.replace(result, input_global_scale=input_scale)
                else:
                    result = quantize_fp8(w, layout=quant.layout, scale_dtype=work.scales_dtype)
                    if input_scale is not None:
                        result = dataclasses.replace(result, input_scale=input_scale)
                w_hat = dequantize(result, work.dtype)
                work.results[name] = result
                work.work[name + ".weight"] = w_hat
                work.layers.append(pending_layer(task.full_name(name), task.block_index, group, cap.stats,
                                                 error=output_error_tensor(w, w_hat, h), result=result,
                                                 seconds=time.perf_counter() - t))


class _AwqProcessor:
    """AWQ, a stage at a time: every group's scales searched and folded first, then each layer clipped and
    quantized (`quantize_awq_stage`)."""

    by_stage = True

    def quantize(self, work: BlockWork, stage: str, groups: Sequence[LinearGroup],
                 captures: dict[str, GroupCapture], *, together: bool = False) -> None:
        quantize_awq_stage(work, stage, groups, captures)


PROCESSORS: dict[Method, Processor] = {
    Method.GPTQ: _HessianProcessor(Method.GPTQ),
    Method.RTN: _HessianProcessor(Method.RTN),
    Method.HQQ: _HessianProcessor(Method.HQQ),     # calibration-free; the Hessian measures its output error
    Method.AWQ: _AwqProcessor(),
}


_FLOAT = _FloatProcessor()


def processor_for(quant: QuantConfig) -> Processor:
    return _FLOAT if quant.weight_type is NumberType.FLOAT else PROCESSORS[quant.method]


def solve_stage(work: BlockWork, stage: str, captures: dict[str, GroupCapture],
                groups: Sequence[LinearGroup] | None = None, *, together: bool = False) -> None:
    """Quantize the stage's groups (or `groups` of it, for a processor that goes a group at a time) with the
    job's method, timed as the "solve" phase. together: groups of one shape may be solved in one batch."""
    processor = processor_for(work.task.quant)
    if groups is None:
        groups = work.block_anatomy.stage_groups(stage)
    elif processor.by_stage:
        raise ValueError(f"{work.task.quant.method.value} quantizes a whole stage at once, not a group at a time")
    mark = work.clock.mark()
    processor.quantize(work, stage, groups, captures, together=together)
    work.clock.add("solve", mark)
