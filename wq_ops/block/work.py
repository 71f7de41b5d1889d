"""A block's tensors while it is quantized, and its outcome: `BlockWork` holds the block's tensors as the
stages replace them (quantized weights, AWQ's folded scales), each quantized layer's result and its pending
record; `BlockWork.outcome` packs the artifact tensors (named by `wq_ops.formats`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor

from wq_ops.block.clock import PhaseClock
from wq_ops.block.records import LayerRecord, PendingLayer, PendingReport, merged_reports, pending_report
from wq_ops.config import Format, QuantConfig
from wq_ops.formats import scale_dtype
from wq_ops.formats.block_tensors import block_tensors
from wq_ops.formats.checks import Checks
from wq_ops.model.architecture import LinearSpec
from wq_ops.model.block import BlockAnatomy, DecoderBlock
from wq_ops.model.moe import MoeSpec
from wq_ops.quant.result import WeightResult

__all__ = ["BlockTask", "BlockWork", "BlockOutcome", "ExpertsPart"]


@dataclass(frozen=True)
class BlockTask:
    """What to do to one block, besides its tensors and inputs: the method and grid, the artifact format,
    where the block sits (its index, the checkpoint's block prefix, its linears, its routed MLP), and
    --tp-policy pad's zero rows/columns for the MLP's intermediate dim (the artifact's; the computation never
    sees them)."""

    quant: QuantConfig
    fmt: Format
    block_index: int
    prefix: str                            # "model.layers"
    linears: tuple[LinearSpec, ...]
    pad_intermediate: int = 0
    moe: MoeSpec | None = None             # the block's routed MLP, if it has one
    kept: tuple[str, ...] = ()             # modules never quantized, stored in their own dtype (a router)

    def full_name(self, local: str) -> str:
        return f"{self.prefix}.{self.block_index}.{local}"

    def is_expert(self, local: str) -> bool:
        """Whether a linear (block-local name) is one of the routed MLP's experts'."""
        return self.moe is not None and local.startswith(self.moe.prefix + ".experts.")


@dataclass(frozen=True)
class BlockOutcome:
    """tensors: this block's artifact tensors, named as the format names them; report: its layer records,
    numbers still on the device (`PendingReport.resolve`); clock: its time per phase; source_entries: the
    digest entries (`tensor_entries`) of source tensors its actor did not read (expert actors' ranges)."""

    block: int
    tensors: dict[str, Tensor]
    report: PendingReport
    clock: PhaseClock
    source_entries: dict[str, str] = field(default_factory=dict)   # of source tensors read elsewhere (experts')
    expert_actors: tuple[dict[str, float | int], ...] = ()          # each expert actor's timing (`ExpertsPart`)

    @property
    def layers(self) -> tuple[LayerRecord, ...]:
        """The layer records, read from the device now (an actor reads a copy it queued instead)."""
        return self.report.resolve(self.report.numbers.cpu())

    @property
    def seconds(self) -> dict[str, float]:
        return self.clock.seconds()


@dataclass
class ExpertsPart:
    """One range of experts, quantized: their artifact tensors (the format's names), their records (numbers
    still where they were computed) and, where the range ran on an expert actor, the digest entries of the
    weights it read for the block's record (`wq_ops.io.digest`) and its timing: {"rank", then seconds per
    phase: "read" (waiting for its weights), "upload" (its weights and the routed inputs onto its device),
    "forward", "solve", "pack", "send" (its results to the host)}."""

    experts: range
    tensors: dict[str, Tensor]
    report: PendingReport
    source_entries: dict[str, str] = field(default_factory=dict)   # digest entries of the weights it read itself
    timing: dict[str, float | int] = field(default_factory=dict)   # an expert actor's: its rank, seconds per phase


@dataclass
class BlockWork:
    """The block's tensors as the stages go (`work`, block-local names: the stages write each quantized
    weight's dequantized values and AWQ's scaled producers into it), each quantized layer's result, and
    the pending records. `params` is never modified."""

    block: DecoderBlock
    block_anatomy: BlockAnatomy
    task: BlockTask
    clock: PhaseClock
    work: dict[str, Tensor]
    dtype: torch.dtype
    scales_dtype: torch.dtype              # the grid is rounded to the dtype the format stores scales in
    results: dict[str, WeightResult] = field(default_factory=dict)
    layers: list[PendingLayer] = field(default_factory=list)
    # Expert ranges quantized apart: their packed tensors, records and source tensors' digest entries.
    parts: list[ExpertsPart] = field(default_factory=list)

    @classmethod
    def start(cls, block: DecoderBlock, anatomy: BlockAnatomy, params: Mapping[str, Tensor], task: BlockTask,
              clock: PhaseClock) -> "BlockWork":
        dtype = next(iter(params.values())).dtype
        return cls(block=block, block_anatomy=anatomy, task=task, clock=clock, work=dict(params), dtype=dtype,
                   scales_dtype=scale_dtype(task.fmt, model_dtype=dtype))

    def is_starved(self, name: str, n_tokens: int) -> bool:
        """An expert's linear whose statistics come from fewer tokens than --moe-min-tokens: its Hessian (rank at
        most the tokens) would mislead GPTQ and AWQ, so it is quantized with RTN, and the report counts it."""
        return self.task.is_expert(name) and n_tokens < self.task.quant.moe.min_tokens

    def outcome(self) -> BlockOutcome:
        """The artifact tensors, packed (checks queued, not read), and the report's numbers gathered."""
        mark = self.clock.mark()
        checks = Checks()
        task = self.task
        tensors = block_tensors(self.work, self.results, [s.name for s in task.linears], quant=task.quant,
                                fmt=task.fmt, full={s.name: task.full_name(s.name) for s in task.linears},
                                prefix=f"{task.prefix}.{task.block_index}", dtype=self.dtype,
                                scales_dtype=self.scales_dtype, pad_intermediate=task.pad_intermediate, checks=checks,
                                kept=task.kept)
        report = pending_report(self.layers, checks.values(), checks.messages)
        entries: dict[str, str] = {}
        if self.parts:               # a routed MLP's experts, quantized and packed a range at a time
            for part in self.parts:
                tensors.update(part.tensors)
                entries.update(part.source_entries)
            report = merged_reports([report] + [part.report for part in self.parts], report.numbers.device)
        self.clock.add("pack", mark)
        return BlockOutcome(task.block_index, tensors, report, self.clock, entries,
                            tuple(part.timing for part in self.parts if part.timing))
