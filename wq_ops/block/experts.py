"""A routed MLP's experts, quantized a range at a time (`quantize_experts_`), wherever the range runs: on the
block's own actor, a few experts per pass so that only their Hessians are held at once, or on another actor
that holds only those experts' weights. The block's owner routes each input micro-batch once
(`RoutedInputs`); a range returns its experts' artifact tensors and pending records, and hands on each
micro-batch's weighted expert outputs, which the owner adds in expert order (`add_routed_`). These are the
operations of `wq_ops.model.moe.moe_mlp`, in its order, so neither the artifact nor the block's outputs
depend on how the experts were split.

Each expert goes as GPTQ's true-sequential order has it: gate and up from its routed tokens (every token
with --moe-calibration all), then down from act(gate) * up with gate and up already quantized."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from wq_ops.block.clock import PhaseClock
from wq_ops.block.processors import solve_stage
from wq_ops.block.records import PendingReport
from wq_ops.block.work import BlockTask, BlockWork
from wq_ops.calib.capture import GroupCapture
from wq_ops.model.anatomy import expert_groups
from wq_ops.model.block import BlockAnatomy, DecoderBlock
from wq_ops.model.moe import ByExpert, MoeSpec, route, sort_by_expert
from wq_ops.quant.hessian import accumulate_input_stats_, new_input_stats

__all__ = ["RoutedInputs", "ExpertsPart", "ExpertRunner", "Emit", "quantize_experts_", "add_routed_",
           "local_experts", "expert_ranges"]


@dataclass(frozen=True)
class RoutedInputs:
    """The routed MLP's input, per micro-batch: its normed states (tokens, hidden), each token's top-k
    experts and weights (`route`), and the (token, slot) pairs sorted by expert."""

    flats: tuple[Tensor, ...]
    weights: tuple[Tensor, ...]
    by_expert: tuple[ByExpert, ...]

    @classmethod
    def of(cls, params: Mapping[str, Tensor], normed: Sequence[Tensor], spec: MoeSpec) -> "RoutedInputs":
        flats, weights, sorts = [], [], []
        for n in normed:
            flat = n.reshape(-1, n.shape[-1])
            experts, w = route(params, flat, spec)
            flats.append(flat)
            weights.append(w)
            sorts.append(sort_by_expert(experts, spec.n_experts))
        return cls(tuple(flats), tuple(weights), tuple(sorts))


@dataclass
class ExpertsPart:
    """One range of experts, quantized: their artifact tensors (the format's names) and their records (numbers
    still where they were computed)."""

    experts: range
    tensors: dict[str, Tensor]
    report: PendingReport


# emit(micro-batch, outputs): a range's weighted expert outputs of one micro-batch, in the model dtype: expert
# by expert in order, each expert's rows in its routed tokens' order (what `add_routed_` adds).
Emit = Callable[[int, Tensor], None]


class ExpertRunner(Protocol):
    """Quantizes the routed MLP's experts of a block being quantized by `work`, range by range, adding their
    outputs into `outs` (per micro-batch, (tokens, hidden)) in expert order and yielding each range once its
    outputs are in. expert_params: the experts' float weights the block's actor loaded (empty where the
    ranges run on other actors, which load their own)."""

    def __call__(self, work: BlockWork, inputs: RoutedInputs, expert_params: dict[str, Tensor],
                 outs: Sequence[Tensor]) -> Iterator[ExpertsPart]: ...


def expert_ranges(n_experts: int, parts: int) -> list[range]:
    """`parts` contiguous ranges covering the experts, sizes differing by at most one."""
    parts = max(1, min(parts, n_experts))
    edges = [n_experts * i // parts for i in range(parts + 1)]
    return [range(lo, hi) for lo, hi in zip(edges, edges[1:])]


def local_experts(experts_per_pass: int = 0) -> ExpertRunner:
    """The block's own actor quantizes every expert, `experts_per_pass` at a time (0: all in one pass)."""

    def run(work: BlockWork, inputs: RoutedInputs, expert_params: dict[str, Tensor],
            outs: Sequence[Tensor]) -> Iterator[ExpertsPart]:
        moe = work.task.moe
        assert moe is not None
        per_pass = experts_per_pass or moe.n_experts
        for experts in expert_ranges(moe.n_experts, -(-moe.n_experts // per_pass)):
            def emit(m: int, ys: Tensor, experts: range = experts) -> None:
                add_routed_(outs[m], inputs.by_expert[m], experts, ys)

            yield quantize_experts_(work.block, expert_params, work.task, experts, inputs, emit=emit,
                                    clock=work.clock)

    return run


def quantize_experts_(block: DecoderBlock, params: Mapping[str, Tensor], task: BlockTask, experts: range,
                      inputs: RoutedInputs, *, emit: Emit, clock: PhaseClock) -> ExpertsPart:
    """Quantize `experts` of the block's routed MLP with the job's method (params: block-local names, holding
    at least these experts' weights, which are not modified), handing each micro-batch's outputs to `emit` as
    they are made. clock: times the phases (the block's)."""
    moe = task.moe
    assert moe is not None and block.moe is not None
    act = block.expert_act
    all_tokens = block.experts_see_all_tokens
    names = [moe.expert(e, which) for e in experts for which in ("gate", "up", "down")]
    own = {n + ".weight": params[n + ".weight"] for n in names}
    gate_up, down = expert_groups(moe, experts)
    listed = set(names)
    part_task = dataclasses.replace(task, linears=tuple(s for s in task.linears if s.name in listed), kept=())
    work = BlockWork.start(block, BlockAnatomy(groups=gate_up + down), own, part_task, clock)
    device = inputs.flats[0].device

    def weight(e: int, which: str) -> Tensor:
        return work.work[moe.expert(e, which) + ".weight"]

    mark = work.clock.mark()
    captures = {}
    for e in experts:
        stats = new_input_stats(moe.hidden_size, device)
        for flat, by_expert in zip(inputs.flats, inputs.by_expert):
            accumulate_input_stats_(stats, flat if all_tokens else flat[by_expert.of(e)[0]])
        captures[moe.expert(e, "gate")] = GroupCapture(stats, [])
    work.clock.add("forward", mark)
    solve_stage(work, "mlp", captures, groups=gate_up)
    captures.clear()

    mark = work.clock.mark()
    downs = {e: new_input_stats(moe.expert_intermediate, device) for e in experts}
    for flat, by_expert in zip(inputs.flats, inputs.by_expert):
        for e in experts:
            source = flat if all_tokens else flat[by_expert.of(e)[0]]
            hidden = act(F.linear(source, weight(e, "gate"))) * F.linear(source, weight(e, "up"))
            accumulate_input_stats_(downs[e], hidden)
    work.clock.add("forward", mark)
    solve_stage(work, "mlp", {moe.expert(e, "down"): GroupCapture(downs.pop(e), []) for e in experts}, groups=down)

    mark = work.clock.mark()
    for m, (flat, weights, by_expert) in enumerate(zip(inputs.flats, inputs.weights, inputs.by_expert)):
        ys = []
        for e in experts:
            token, slot = by_expert.of(e)
            state = flat[token]
            hidden = act(F.linear(state, weight(e, "gate"))) * F.linear(state, weight(e, "up"))
            ys.append((F.linear(hidden, weight(e, "down")) * weights[token, slot, None]).to(flat.dtype))
        emit(m, torch.cat(ys))
    work.clock.add("forward", mark)
    # The records expert by expert (gate, up, down), whatever order the stages solved them in.
    order = {n: i for i, n in enumerate(names)}
    cut = len(task.full_name(""))
    work.layers.sort(key=lambda layer: order[layer.name[cut:]])
    outcome = work.outcome()
    return ExpertsPart(experts, outcome.tensors, outcome.report)


def add_routed_(out: Tensor, by_expert: ByExpert, experts: range, ys: Tensor) -> None:
    """Add one micro-batch's weighted outputs of a range of experts (as `emit` gets them) into the routed MLP's
    output (tokens, hidden), expert by expert: ranges taken in expert order add what `moe_mlp`'s loop adds,
    in its order."""
    at = 0
    for e in experts:
        token, _ = by_expert.of(e)
        n = token.numel()
        if n:
            out.index_add_(0, token, ys[at:at + n])
        at += n

