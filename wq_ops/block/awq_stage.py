"""AWQ on one stage of a block: search every group's input scales and fold them into their producers first
(the weights still unquantized), then clip-search and quantize every layer of the stage, as AWQ does. The
search measures the group's own linear outputs from the input Hessian (--awq-loss layer, the paper's Eq. 4)
or the stage module's output on replayed samples (--awq-loss module)."""

from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from wq_ops.block.folding import fold_input_scales_
from wq_ops.block.records import pending_layer
from wq_ops.block.work import BlockWork
from wq_ops.calib.capture import GroupCapture
from wq_ops.config import AwqLoss
from wq_ops.formats.block_tensors import is_ignored
from wq_ops.kernels.backends import kernels_for
from wq_ops.model.block import LinearGroup
from wq_ops.quant import awq
from wq_ops.quant.hessian import hessian_of, output_error_tensor, quadratic_operand, quadratic_sum
from wq_ops.quant.result import dequantize
from wq_ops.quant.rtn import quantize_rtn

__all__ = ["quantize_awq_stage"]

# AWQ leaves q and k unclipped: their errors act through the softmax of q.k, where a per-group output
# error is a poor proxy (the AWQ reference implementation skips them for the same reason).
_AWQ_NO_CLIP = ("*q_proj", "*k_proj")


def quantize_awq_stage(work: BlockWork, stage: str, groups: Sequence[LinearGroup],
                       captures: dict[str, GroupCapture]) -> None:
    """AWQ for `groups` of `stage`: scales searched and folded (the producers in `work.work` divided by
    them), then every layer clipped and quantized, its dequantized weight written back into `work.work`."""
    scales, searches, hessians = _search_and_fold(work, stage, groups, captures)
    task, quant = work.task, work.task.quant
    for group in groups:
        cap = captures[group.names[0]]
        starved = work.is_starved(group.names[0], cap.stats.n_tokens)
        held = hessians.pop(group.names[0], None)
        h = held if held is not None else hessian_of(cap.stats)
        group_scale = scales.get(group.names[0])
        if group_scale is not None:
            h = h / torch.outer(group_scale, group_scale)          # the Hessian of the scaled input x / s
        h_error = quadratic_operand(h)            # converted once for every layer of the group
        for name in group.names:
            t = time.perf_counter()
            w = work.work[name + ".weight"].to(torch.float32)
            if is_ignored(task.full_name(name), quant.ignore):
                work.layers.append(pending_layer(task.full_name(name), task.block_index, group, cap.stats,
                                                 error=None, result=None, seconds=0.0))
                continue
            clip = None
            if not starved and not is_ignored(name, _AWQ_NO_CLIP):
                clip = awq.search_clip(w, h, bits=quant.bits, group_size=quant.group_size, sym=quant.sym,
                                       scale_dtype=work.scales_dtype, n_grid=quant.awq.clip_grid,
                                       max_shrink=quant.awq.max_shrink, primitives=kernels_for(quant.backend).awq)
            result = quantize_rtn(w, bits=quant.bits, group_size=quant.group_size, sym=quant.sym,
                                  scale_dtype=work.scales_dtype, clip=clip)
            w_hat = dequantize(result, work.dtype)
            work.results[name] = result
            work.work[name + ".weight"] = w_hat
            work.layers.append(pending_layer(task.full_name(name), task.block_index, group, cap.stats,
                                             error=output_error_tensor(w, w_hat, h_error), result=result,
                                             seconds=time.perf_counter() - t, search=searches.get(group.names[0]),
                                             starved=starved))


def _search_and_fold(work: BlockWork, stage: str, groups: Sequence[LinearGroup], captures: dict[str, GroupCapture],
                     ) -> tuple[dict[str, Tensor], dict[str, awq.ScaleSearch], dict[str, Tensor]]:
    """Each group's scale search, its scales folded into its producer and multiplied into its weights.
    Returns the scales and searches by group, and the Hessians of lone linears (their clip search reuses them;
    a wider group's is made again)."""
    block, quant, dtype = work.block, work.task.quant, work.dtype
    inspect: Callable[[Mapping[str, Tensor], Tensor], Tensor] = block.self_attn if stage == "self_attn" else block.mlp
    scales: dict[str, Tensor] = {}
    searches: dict[str, awq.ScaleSearch] = {}
    hessians: dict[str, Tensor] = {}
    for group in groups:
        cap = captures[group.names[0]]
        if group.producer is None or work.is_starved(group.names[0], cap.stats.n_tokens):
            continue
        x_mean = cap.stats.abs_sum / max(cap.stats.n_tokens, 1)
        weights = {n: work.work[n + ".weight"] for n in group.names}
        if len(group.names) == 1 or quant.awq.loss is AwqLoss.LAYER:
            h = hessian_of(cap.stats)
            if len(group.names) == 1:
                hessians[group.names[0]] = h
            loss_of = _layer_loss(weights, h)
            del h
        else:
            loss_of = _module_loss(inspect, work.work, cap.kept, dtype)
        search = awq.search_scales(weights, x_mean, loss_of, bits=quant.bits, group_size=quant.group_size,
                                   sym=quant.sym, scale_dtype=work.scales_dtype, n_grid=quant.awq.grid,
                                   primitives=kernels_for(quant.backend).awq)
        del loss_of                               # its bf16 H or replayed outputs: not needed by the clip search
        searches[group.names[0]] = search
        # Scaled even where no scaling won (all ones, exact: the same bytes), so that nothing waits to read
        # the winner back from the GPU.
        s = search.scales.to(x_mean.device)
        scales[group.names[0]] = s
        fold_input_scales_(work.work, group.producer, group.names, s, dtype)
        cap.kept.clear()
    return scales, searches, hessians


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
