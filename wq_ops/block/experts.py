"""A routed MLP's experts, quantized a range at a time (`quantize_experts_`), wherever the range runs: on the
block's own actor or on another actor that holds only those experts' weights; either way a batch of experts at
a time (`experts_per_batch`), so that only one batch's Hessians are held. The block's owner routes each input
micro-batch once (`RoutedInputs`); a range returns its experts' artifact tensors and pending records, and hands on each
expert's weighted outputs, which the owner adds in expert order (`add_routed_`). These are the
operations of `wq_ops.model.moe.moe_mlp`, in its order, so neither the artifact nor the block's outputs
depend on how the experts were split.

Each expert goes as GPTQ's true-sequential order has it: gate and up from its routed tokens (every token
with --moe-calibration all), then down from act(gate) * up with gate and up already quantized."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import Tensor

from wq_ops.block.clock import PhaseClock
from wq_ops.block.processors import solve_stage
from wq_ops.block.work import BlockTask, BlockWork, ExpertsPart
from wq_ops.calib.capture import GroupCapture
from wq_ops.config import Method
from wq_ops.model.anatomy import expert_groups
from wq_ops.model.block import BlockAnatomy, DecoderBlock
from wq_ops.model.moe import ByExpert, MoeSpec, expert_hidden, expert_linears, route, sort_by_expert
from wq_ops.quant.hessian import accumulate_input_stats_, new_input_stats

__all__ = ["RoutedInputs", "ExpertsPart", "ExpertRunner", "Emit", "quantize_experts_", "add_routed_",
           "local_experts", "expert_ranges", "experts_per_batch", "expert_batch_bytes", "planned_expert_rows",
           "BATCH_BYTES"]


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


# emit(expert, outputs): one expert's weighted outputs in the model dtype, one tensor per micro-batch (its routed
# tokens' rows, in their order), handed on once its batch of experts is quantized, experts in ascending order.
Emit = Callable[[int, list[Tensor]], None]


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


def local_experts() -> ExpertRunner:
    """The block's own actor quantizes every expert, a batch at a time, adding each one's outputs as it is done."""

    def run(work: BlockWork, inputs: RoutedInputs, expert_params: dict[str, Tensor],
            outs: Sequence[Tensor]) -> Iterator[ExpertsPart]:
        moe = work.task.moe
        assert moe is not None

        def emit(e: int, ys: list[Tensor]) -> None:
            for out, by_expert, y in zip(outs, inputs.by_expert, ys):
                add_routed_(out, by_expert, range(e, e + 1), y)

        yield quantize_experts_(work.block, expert_params, work.task, range(moe.n_experts), inputs, emit=emit,
                                clock=work.clock)

    return run


def quantize_experts_(block: DecoderBlock, params: Mapping[str, Tensor], task: BlockTask, experts: range,
                      inputs: RoutedInputs, *, emit: Emit, clock: PhaseClock) -> ExpertsPart:
    """Quantize `experts` of the block's routed MLP with the job's method (params: block-local names, holding
    at least these experts' weights, which are not modified), handing each expert's outputs to `emit` once its
    batch is quantized. clock: times the phases (the block's)."""
    moe = task.moe
    assert moe is not None and block.moe is not None
    act = block.expert_act
    all_tokens = block.experts_see_all_tokens
    names = [moe.expert(e, which) for e in experts for which in ("gate", "up", "down")]
    own = {n: params[n] for e in experts for n in moe.expert_tensors(e)}
    gate_up, down = expert_groups(moe, experts)
    listed = set(names)
    part_task = dataclasses.replace(task, linears=tuple(s for s in task.linears if s.name in listed), kept=())
    work = BlockWork.start(block, BlockAnatomy(groups=gate_up + down), own, part_task, clock)
    device = inputs.flats[0].device

    # Each expert over all its routed tokens at once (one statistics update and one GEMM per linear, not one
    # per micro-batch), a batch of experts at a time: their GPTQ solves run as one, and only that batch's
    # Hessians are ever held.
    every = torch.cat(inputs.flats) if all_tokens else None
    rows_of = {e: [by_expert.of(e) for by_expert in inputs.by_expert] for e in experts}
    # The batch as the plan counted it (from the token count, not this block's routing: the same on every actor).
    per_batch = experts_per_batch(moe, tokens=sum(flat.shape[0] for flat in inputs.flats),
                                  elt=next(iter(own.values())).element_size(), gptq=task.quant.method is Method.GPTQ)
    for lo in range(0, len(experts), per_batch):
        batch = experts[lo:lo + per_batch]
        mark = work.clock.mark()
        captures = {}
        for e in batch:
            stats = new_input_stats(moe.hidden_size, device)
            accumulate_input_stats_(stats, _gather(inputs, rows_of[e]) if every is None else every)
            captures[moe.expert(e, "gate")] = GroupCapture(stats, [])
        work.clock.add("forward", mark)
        solve_stage(work, "mlp", captures, groups=gate_up[lo:lo + len(batch)], together=True)
        mark = work.clock.mark()
        captures, hidden = {}, {}
        for e in batch:
            rows = _gather(inputs, rows_of[e])                                           # (n_e, hidden)
            linear = expert_linears(work.work, moe, e)                   # gate and up now quantized
            hidden[e] = expert_hidden(moe, act, linear["gate"](rows), linear["up"](rows))
            stats = new_input_stats(moe.expert_intermediate, device)
            accumulate_input_stats_(stats, hidden[e] if every is None else
                                    expert_hidden(moe, act, linear["gate"](every), linear["up"](every)))
            captures[moe.expert(e, "down")] = GroupCapture(stats, [])
        work.clock.add("forward", mark)
        solve_stage(work, "mlp", captures, groups=down[lo:lo + len(batch)], together=True)
        del captures
        mark = work.clock.mark()
        for e in batch:
            routed = rows_of[e]
            scale = torch.cat([w[token, slot] for w, (token, slot) in zip(inputs.weights, routed)])
            y = (expert_linears(work.work, moe, e)["down"](hidden.pop(e)) * scale[:, None]).to(inputs.flats[0].dtype)
            emit(e, list(y.split([token.numel() for token, _ in routed])))
            for name in (moe.expert(e, w) for w in ("gate", "up", "down")):
                if name in work.results:    # its packed result is what the artifact takes: drop the dequantized copy
                    del work.work[name + ".weight"]
        work.clock.add("forward", mark)
    # The records expert by expert (gate, up, down), whatever order the stages solved them in.
    order = {n: i for i, n in enumerate(names)}
    cut = len(task.full_name(""))
    work.layers.sort(key=lambda layer: order[layer.name[cut:]])
    outcome = work.outcome()
    return ExpertsPart(experts, outcome.tensors, outcome.report)


def _gather(inputs: RoutedInputs, routed: list[tuple[Tensor, Tensor]]) -> Tensor:
    """One expert's routed rows from every micro-batch, in order: (n_e, hidden)."""
    return torch.cat([flat[token] for flat, (token, _) in zip(inputs.flats, routed)])


def planned_expert_rows(moe: MoeSpec, tokens: int) -> int:
    """An expert's routed rows as the plan counts them, of `tokens` calibration tokens: four times the mean
    (routing is uneven), at most every token."""
    return min(tokens, 4 * tokens * moe.top_k // moe.n_experts)


def experts_per_batch(moe: MoeSpec, *, tokens: int, elt: int, gptq: bool) -> int:
    """How many experts `quantize_experts_` takes at once: as many as keep what a batch adds (per expert,
    `expert_batch_bytes` at the planned rows) within BATCH_BYTES, at least one. One at a time for the other
    methods, which solve no batch."""
    if not gptq:
        return 1
    rows = planned_expert_rows(moe, tokens)
    return max(1, min(MAX_BATCH, BATCH_BYTES // expert_batch_bytes(moe, rows=rows, elt=elt)))


def expert_batch_bytes(moe: MoeSpec, *, rows: int, elt: int) -> int:
    """Bytes one expert adds to a batch (`experts_per_batch`), with `rows` routed rows: its gate/up and down
    Hessians (the statistics and H of each); its GPTQ solve's working set, bounded by seven copies of the
    larger Hessian (at most about five live at once: the batch's stack, the solver's copy, its permuted copy
    being made, the factor, its bf16 split) and the stacked weights in float32 twice with their codes and the
    dequantized copies the batch keeps; and act(gate) * up of its rows, held until its down is solved."""
    h, i = moe.hidden_size, moe.expert_intermediate
    widest = max(h, i)
    hessians = 2 * 4 * (h * h + i * i)
    solve = 7 * 4 * widest * widest + 2 * i * h * (4 + 4 + 1 + elt)
    return hessians + solve + rows * i * elt


# What a batch of experts may add to an actor's memory, and the most experts in one batch (past a few dozen,
# a batch saves no more launches worth having).
BATCH_BYTES = 2 << 30
MAX_BATCH = 32


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

