"""What one block actor holds at its peak, by kind (`MemoryEstimate`): for a span of blocks quantized one at a
time or resident (`span_memory`), and for --eval's pass over it afterwards (`eval_memory`). The plan
(`wq_ops.cluster.plan`) places the spans and checks these against each actor's memory."""

from __future__ import annotations

import math
from dataclasses import dataclass

from wq_ops.block.processors import processor_for
from wq_ops.cluster.expert_plan import (
    expert_batch_workspace,
    expert_temporaries,
    solve_working_set,
    without_routed_experts,
)
from wq_ops.config import JobConfig, Method, MoeCalibration, Propagation
from wq_ops.model.architecture import BlockLayout, ModelLayout
from wq_ops.model.moe import MoeSpec

__all__ = ["MemoryEstimate", "span_memory", "eval_memory"]


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes on the actor's compute device, by kind."""

    weights: int
    hessians: int
    activations: int
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.hessians + self.activations + self.workspace



def span_memory(layout: ModelLayout, job: JobConfig, span: tuple[int, ...], *, first: bool, last: bool,
            resident: int = 0, stash_tails: bool = False) -> MemoryEstimate:
    """The most a block of `span` needs (blocks may differ): `_block_memory` of each kind of block in it."""
    kinds = list({id(layout.block(i)): layout.block(i) for i in span}.values())
    if job.run.expert_actors:           # the routed experts are the expert actors' (`expert_plan`)
        kinds = [without_routed_experts(block) for block in kinds]
    return max((_block_memory(block, layout, job, first=first, last=last, resident=resident, stash_tails=stash_tails)
                for block in kinds), key=lambda m: m.total)


def _block_memory(block: BlockLayout, layout: ModelLayout, job: JobConfig, *, first: bool, last: bool,
                  resident: int = 0, stash_tails: bool = False) -> MemoryEstimate:
    """resident: 0 for one block at a time; else the span's block count, all of whose weights and
    statistics stay on the device while the micro-batches stream through (then solved one by one).
    stash_tails: quantized propagation keeps each stage's last linear's inputs for every sample."""
    elt = {2: 2, 4: 4}.get(layout.dtype.itemsize, 2)
    n, t = job.calib.n_samples, job.calib.seq_len
    mb = min(job.run.micro_batch_samples, n)
    linears = block.linears
    max_in = max(s.in_features for s in linears)
    gptq = job.quant.method is Method.GPTQ
    # What the largest solve holds besides the block's tensors (`solve_working_set`). GPTQ, RTN and HQQ stack
    # the linears that share an input (those of one stage with one input width bound such a group from above:
    # o_proj is counted with q, k and v).
    # A routed MLP's experts are groups of their own: one expert's gate and up are stacked, never all experts'.
    moe = block.moe
    experts = _expert_linears(moe) if moe is not None else {}
    stacked: dict[tuple[str, int] | tuple[str, int, int], int] = {}
    for s in linears:
        key = (s.stage, s.in_features) if s.name not in experts else (s.stage, s.in_features, experts[s.name])
        stacked[key] = stacked.get(key, 0) + s.in_features * s.out_features
    # Quantized propagation a group at a time takes a routed MLP expert by expert (`_routed_stage_`).
    routed_by_group = moe is not None and job.run.propagation is Propagation.QUANTIZED \
        and not processor_for(job.quant).by_stage
    per_weight, stacks = solve_working_set(job, elt)
    solving = per_weight * (max(stacked.values()) if stacks else max(s.in_features * s.out_features for s in linears))
    # Tensors of this block and the next (prefetch), or of the resident span, plus the solve's.
    # On a GPU, float propagation solves one block while the next calibrates (and a third is prefetched).
    overlapped = not resident and job.run.propagation is Propagation.FLOAT and job.run.gpus_per_actor > 0
    weights = (resident or (3 if overlapped else 2)) * block.nbytes(layout.dtype) + solving
    if first:      # the embedding table runs on the device; the head tensors are only copied, through the host
        weights += layout.outer_params[layout.embed_name][0] * layout.hidden_size * elt
    # Float32 statistics (at most one Hessian per linear, fewer where inputs are shared): of one stage at a
    # time (quantized propagation), of every stage of one block, or of two blocks (float propagation,
    # overlapped), or of every resident block.
    # An expert's up shares its gate's Hessian (its routed tokens).
    hessian_linears = [s for s in linears if not (moe is not None and s.name.endswith("." + moe.up_name)
                                                  and s.name in experts)]
    every_stage = sum(4 * s.in_features * s.in_features for s in hessian_linears)
    if resident:
        stats = resident * every_stage
    elif job.run.propagation is Propagation.FLOAT:   # one pass captures every stage of the block
        stats = (2 if overlapped else 1) * every_stage
    else:
        # A group at a time, a routed MLP's experts go a batch at a time (`quantize_experts_`): one expert's
        # Hessians here, and the whole batch's again in the workspace (`expert_batch_workspace`: an overestimate
        # by one expert's).
        share = 1 / moe.n_experts if moe is not None and routed_by_group else 1.0
        per_stage_bytes: dict[str, float] = {}
        for s in hessian_linears:
            held = share if s.name in experts else 1.0
            per_stage_bytes[s.stage] = per_stage_bytes.get(s.stage, 0) + held * 4 * s.in_features * s.in_features
        stats = math.ceil(max(per_stage_bytes.values()))
    # hessian_of's mirrored copy of the largest Hessian; for GPTQ also three more of its size at once: its
    # working copy, the damped reversed copy and the Cholesky factor, or later the factor Mu and its bf16
    # parts [hi; lo; hi] (1.5 of its size).
    hessians = stats + 4 * max_in * max_in * (4 if gptq else 1)
    activation = t * layout.hidden_size * elt
    if resident:   # the micro-batches in flight; the first actor holds the embedded set until it streams out
        activations = 3 * mb * activation + (n * activation if first else 0)
    else:
        # Three of the block's width: its inputs, attention-stage outputs h and outputs (by stage), or its
        # inputs (then h), a stage's norm outputs and a spare (by group); with float propagation every actor
        # but the last also keeps its span's inputs while its float outputs go ahead to the next actor.
        # Kept tail inputs (o_proj's, then down_proj's: at most the widest input) come on top.
        copies = 4 if job.run.propagation is Propagation.FLOAT and not last else 3
        # A routed MLP a group at a time adds its experts' outputs into one more copy (`_routed_stage_`).
        copies += routed_by_group
        activations = copies * n * activation + (n * t * max_in * elt if stash_tails else 0)
    workspace = 2 * mb * t * _widest(block, layout, job, capture=True) * elt
    # Eager attention (gpt-oss) holds a micro-batch's scores at once: the scores, with the sinks' column, less
    # their max, the softmax and the probabilities cast for the values: five (heads, T, T + 1) copies.
    workspace += 5 * mb * layout.eager_attention_heads * t * (t + 1) * elt
    if routed_by_group and moe is not None and any(s.name in experts for s in linears):   # not on expert actors
        workspace = max(workspace, expert_temporaries(moe, job, elt) + expert_batch_workspace(moe, job, elt))
    kept = min(n, job.quant.kept_search_samples)
    if kept:                                   # AWQ's replayed search samples' inputs, kept by every resident block
        workspace += (resident or (2 if overlapped else 1)) * 3 * kept * t * max_in * elt
    return MemoryEstimate(weights=weights, hessians=hessians, activations=activations, workspace=workspace)


def _widest(block: BlockLayout, layout: ModelLayout, job: JobConfig, *, capture: bool) -> int:
    """Values per token of one micro-batch through the block's widest stage: every linear's output at once, plus
    norms and residuals. A routed MLP runs one expert at a time, each on its routed tokens: top-k experts'
    outputs per token, and while capturing with --moe-calibration all one expert's on every token besides."""
    moe = block.moe
    experts = _expert_linears(moe) if moe is not None else {}
    widest = sum(s.out_features for s in block.linears if s.name not in experts) + 4 * layout.hidden_size
    if moe is not None:
        per_expert = 2 * moe.expert_intermediate + moe.hidden_size
        widest += per_expert * (moe.top_k + (capture and job.quant.moe.calibration is MoeCalibration.ALL))
    return widest


def eval_memory(layout: ModelLayout, job: JobConfig, span: tuple[int, ...], n_windows: int, *, first: bool,
                 last: bool) -> MemoryEstimate:
    """--eval's pass over the span once the blocks are quantized (their statistics are gone by then): a block
    and the next one's dense weights, the windows' activations (a block's outputs replace its inputs as they
    are made: one copy and a micro-batch), a micro-batch through the widest stage; the first actor runs the
    embedding table, the last the final norm and lm_head, one window's logits at a time in float32."""
    elt = layout.dtype.itemsize
    t, mb = job.evaluation.seq_len, min(job.run.micro_batch_samples, n_windows)
    kinds = {id(layout.block(i)): layout.block(i) for i in span}.values()
    weights = 2 * max(b.nbytes(layout.dtype) for b in kinds)
    table = layout.vocab_size * layout.hidden_size * elt
    workspace = 2 * mb * t * max(_widest(b, layout, job, capture=False) for b in kinds) * elt
    workspace += 5 * mb * layout.eager_attention_heads * t * (t + 1) * elt      # eager attention's scores
    if first:
        weights += table
    if last:
        weights += table                                     # lm_head (tied: the embedding table again)
        workspace = max(workspace, t * layout.vocab_size * (elt + 4 + 4))   # logits, float32 copy, log-softmax
    activations = (n_windows + mb) * t * layout.hidden_size * elt
    return MemoryEstimate(weights=weights, hessians=0, activations=activations, workspace=workspace)


def _expert_linears(moe: MoeSpec) -> dict[str, int]:
    """Block-local name of every routed expert's linear -> its expert."""
    return {moe.expert(e, which): e for e in range(moe.n_experts) for which in ("gate", "up", "down")}
