"""Quantized propagation (the default): a block's statistics see the quantized layers upstream.
- A processor that goes a group at a time (GPTQ, RTN): each group's input is captured with every earlier
  group quantized (GPTQ's true-sequential order), and the block's outputs come from the stages' last
  linears on their kept inputs: one forward per block.
- A processor that goes a stage at a time (AWQ: a group's scale folds into an earlier linear of its stage):
  capture the stage's inputs, quantize it, recompute its outputs with the quantized weights.
Entry point: `quantize_block_`.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from wq_ops.block.calibration import calibrate_float_all_, solve_block_
from wq_ops.block.clock import PhaseClock, WallClock
from wq_ops.block.experts import ExpertRunner, RoutedInputs, local_experts
from wq_ops.block.processors import processor_for, solve_stage
from wq_ops.block.work import BlockOutcome, BlockTask, BlockWork
from wq_ops.calib.capture import capture_group, capture_inputs, capture_stage
from wq_ops.config import Propagation
from wq_ops.model.anatomy import shared_expert_groups
from wq_ops.model.block import STAGE_NORMS, BlockAnatomy, DecoderBlock, LinearGroup

__all__ = ["quantize_block_"]


def quantize_block_(block: DecoderBlock, params: Mapping[str, Tensor], anatomy: BlockAnatomy, batches: list[Tensor],
                    task: BlockTask, *, propagation: Propagation = Propagation.QUANTIZED, stash_tails: bool = False,
                    clock: PhaseClock | None = None,
                    experts: ExpertRunner | None = None) -> tuple[BlockOutcome, list[Tensor]]:
    """params: block-local name -> tensor (model dtype, on the compute device); batches: the block's input
    micro-batches (B, T, hidden). Returns the outcome and the block's output micro-batches, computed with
    the quantized weights (or, with Propagation.FLOAT, the float ones: the MLP is then calibrated on the
    float attention's output too, and every block sees what the unquantized model feeds it). Consumes
    `batches` (the list is emptied as the inputs are replaced); neither the input tensors nor `params` are
    modified. stash_tails: keep each stage's last linear's inputs for its outputs (a processor that goes a
    group at a time; see `_by_group_`) rather than recompute them: the plan says whether they fit
    (ActorPlan.stash_tails). clock: times the phases (host wall time unless given). experts: where a routed
    MLP's experts are quantized (a processor that goes a group at a time; `wq_ops.block.experts`): by default
    here."""
    clock = clock if clock is not None else WallClock()
    if propagation is Propagation.FLOAT:
        # Float outputs come from the float weights: the capture pass gives them (one forward per block).
        calibration, outputs = calibrate_float_all_(block, params, anatomy, batches, quant=task.quant, clock=clock)
        return solve_block_(block, params, anatomy, calibration, task), outputs
    work = BlockWork.start(block, anatomy, params, task, clock)
    with torch.no_grad():
        if processor_for(task.quant).by_stage:
            outputs = _by_stage_(work, batches, keep=task.quant.kept_search_samples)
        else:
            runner = experts if experts is not None else local_experts()
            outputs = _by_group_(work, batches, stash_tails=stash_tails, experts=runner)
    return work.outcome(), outputs


def _by_group_(work: BlockWork, batches: list[Tensor], *, stash_tails: bool, experts: ExpertRunner) -> list[Tensor]:
    """One linear group at a time in call order: each group's input is captured with every group before it
    already quantized, by a pass that gives the stage's last linear no output rows (no capture reads that
    output). A stage's norm is computed once, its output kept for the stage's passes (quantizing the linears
    does not change it); a group that reads that output itself (anatomy.direct_heads) is captured from it
    with no pass. Where a stage's module returns its last linear's output as is (anatomy.direct_tails), that
    linear's inputs are kept from its capture pass, so the stage's output needs that linear alone: each
    linear then runs once per micro-batch. Otherwise (or without stash_tails) the stage runs again with its
    quantized weights. SmoothQuant changes the norm itself: its output is then computed again. A routed MLP
    goes through `_routed_stage_`."""
    block, anatomy, params, clock = work.block, work.block_anatomy, work.work, work.clock
    xs = batches
    for stage, norm in STAGE_NORMS.items():
        module = block.self_attn if stage == "self_attn" else block.mlp

        def run(normed: Tensor, module: Callable[[Mapping[str, Tensor], Tensor], Tensor] = module) -> Tensor:
            return module(params, normed)

        groups = anatomy.stage_groups(stage)
        tail = stash_tails and bool(groups) and stage in anatomy.direct_tails and len(groups[-1].names) == 1
        mark = clock.mark()
        normed = [block.norm(params, norm, x) for x in xs]
        if stage == "mlp" and work.task.moe is not None:
            clock.add("forward", mark)
            xs = _routed_stage_(work, xs, normed, experts)
            continue
        stashed: list[Tensor] = []
        for i, group in enumerate(groups):
            keep = tail and i == len(groups) - 1
            if group.names[0] in anatomy.direct_heads:      # its input is the norm's output: no pass needed
                capture, stashed = capture_inputs(normed), list(normed) if keep else []
            else:
                # The pass's weights: the groups before this one quantized, the stage's last linear free.
                trimmed = _without_last_output(params, groups)
                capture, stashed = capture_group(block, group, functools.partial(module, trimmed), normed,
                                                 keep_inputs=keep)
                del trimmed
            clock.add("forward", mark)
            norm_weight = params[norm + ".weight"]
            solve_stage(work, stage, {group.names[0]: capture}, groups=(group,))
            mark = clock.mark()
            if params[norm + ".weight"] is not norm_weight:
                # SmoothQuant folded its factors into the norm: the kept norm output is stale.
                normed = [block.norm(params, norm, x) for x in xs]
                if stashed and group.names[0] in anatomy.direct_heads:
                    stashed = list(normed)
        if tail:
            normed.clear()
        # The stage's outputs: x + module(norm(x)). The block's inputs are the caller's, so the first stage
        # adds out of place; the second writes over its own inputs h, as replay_block_ does.
        in_place = stage != "self_attn"
        outputs = []
        while xs:
            x = xs.pop(0)
            y = block.linear(params, groups[-1].names[0], stashed.pop(0)) if tail else run(normed.pop(0))
            outputs.append(x.add_(y) if in_place else x + y)
        clock.add("forward", mark)
        xs = outputs
    return xs


def _routed_stage_(work: BlockWork, xs: list[Tensor], normed: list[Tensor], experts: ExpertRunner) -> list[Tensor]:
    """A routed MLP, a group at a time: each input micro-batch routed once; the experts quantized by `experts`,
    range by range, their outputs added in expert order; then the shared expert (DeepSeek-V3's), its gate/up
    then its down, each captured through the shared expert alone. Returns x + mlp(norm(x)) per micro-batch,
    written over the inputs, as `moe_mlp` and `DecoderBlock.mlp` compute it."""
    block, params, clock, moe = work.block, work.work, work.clock, work.task.moe
    assert moe is not None
    mark = clock.mark()
    inputs = RoutedInputs.of(params, normed, moe)
    outs = [torch.zeros_like(flat) for flat in inputs.flats]
    # The float experts leave the block's own tensors: each range returns its own artifact tensors.
    routed = moe.prefix + ".experts."
    expert_params = {k: params.pop(k) for k in [k for k in params if k.startswith(routed)]}
    clock.add("forward", mark)
    for part in experts(work, inputs, expert_params, outs):
        work.parts.append(part)
    expert_params.clear()
    for group in shared_expert_groups(moe):
        mark = clock.mark()
        capture, _ = capture_group(block, group, functools.partial(block.shared_mlp, params), normed)
        clock.add("forward", mark)
        solve_stage(work, "mlp", {group.names[0]: capture}, groups=(group,))
    mark = clock.mark()
    outputs = []
    for x, n, out in zip(xs, normed, outs):
        y = out.reshape(n.shape)
        outputs.append(x.add_(y + block.shared_mlp(params, n) if moe.shared is not None else y))
    xs.clear()
    clock.add("forward", mark)
    return outputs


def _by_stage_(work: BlockWork, batches: list[Tensor], *, keep: int) -> list[Tensor]:
    """A stage at a time: every group's scales are searched before any is quantized, so a stage's inputs are
    captured in one pass, with the stage before it quantized. Its outputs take a second pass after its
    solve; the capture pass skips the stage's last linear (its output is not needed there)."""
    block, anatomy, params, clock = work.block, work.block_anatomy, work.work, work.clock
    mark = clock.mark()
    attn_groups = anatomy.stage_groups("self_attn")
    trimmed = _without_last_output(params, attn_groups)
    captures, _ = capture_stage(block, attn_groups,
                                lambda x: block.self_attn(trimmed, block.norm(params, "input_layernorm", x)),
                                batches, keep_samples=keep)
    clock.add("forward", mark)
    solve_stage(work, "self_attn", captures)
    mark = clock.mark()
    hs = []
    while batches:                                   # x -> h, dropping each input once it is used
        hs.append(block.attention_stage(params, batches.pop(0)))
    mlp_groups = anatomy.stage_groups("mlp")
    trimmed = _without_last_output(params, mlp_groups)
    captures, _ = capture_stage(block, mlp_groups,
                                lambda h: block.mlp(trimmed, block.norm(params, "post_attention_layernorm", h)),
                                hs, keep_samples=keep)
    trimmed.clear()                                  # drop its references to the float MLP weights
    clock.add("forward", mark)
    solve_stage(work, "mlp", captures)
    del captures
    mark = clock.mark()
    for h in hs:
        block.add_mlp_(params, h)
    clock.add("forward", mark)
    return hs


def _without_last_output(params: Mapping[str, Tensor], groups: Sequence[LinearGroup]) -> dict[str, Tensor]:
    """The stage's tensors with its last linear given zero output rows, when that linear is alone in its
    group: a capture pass needs that layer's input but never its output, and an empty (0, in) weight
    makes its matmul free (the stage then returns a (..., 0) tensor, which the pass ignores). Not an expert's:
    a routed MLP adds its experts' outputs, which must keep their width."""
    trimmed = dict(params)
    if groups and len(groups[-1].names) == 1 and ".experts." not in groups[-1].names[0]:
        name = groups[-1].names[0]
        trimmed[name + ".weight"] = params[name + ".weight"][:0]
        if name + ".bias" in params:
            trimmed[name + ".bias"] = params[name + ".bias"][:0]
    return trimmed
