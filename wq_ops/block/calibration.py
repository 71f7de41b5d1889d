"""Float propagation: a block's statistics from its float weights, one input micro-batch at a time (so a
block can be calibrated while micro-batches stream through a resident span), then solved; and the replay of
a finished block's outputs from the weights it was quantized to. Entry points: `calibrate_float_`,
`calibrate_float_all_`, `solve_block_`, `replay_block_`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor

from wq_ops.block.clock import PhaseClock, WallClock
from wq_ops.block.processors import solve_stage
from wq_ops.block.work import BlockOutcome, BlockTask, BlockWork
from wq_ops.calib.capture import GroupCapture, capture_stage
from wq_ops.config import QuantConfig
from wq_ops.model.block import BlockAnatomy, DecoderBlock

__all__ = ["FloatCalibration", "calibrate_float_", "calibrate_float_all_", "solve_block_", "replay_block_"]


@dataclass
class FloatCalibration:
    """One block's input statistics under float propagation, by stage and group, accumulated a micro-batch
    at a time; `clock` times the passes ("forward") and, later, the block's solve."""

    clock: PhaseClock = field(default_factory=WallClock)
    attn: dict[str, GroupCapture] = field(default_factory=dict)
    mlp: dict[str, GroupCapture] = field(default_factory=dict)


def calibrate_float_(block: DecoderBlock, params: Mapping[str, Tensor], anatomy: BlockAnatomy, x: Tensor,
                     calibration: FloatCalibration, *, quant: QuantConfig) -> Tensor:
    """One input micro-batch x (B, T, hidden) through the block with its float weights `params`: the pass
    that captures each stage's inputs into `calibration` also gives its outputs (one forward). Returns the
    block's output micro-batch; x is not modified."""
    keep = quant.kept_search_samples
    mark = calibration.clock.mark()
    _, (h,) = capture_stage(block, anatomy.stage_groups("self_attn"), lambda v: block.attention_stage(params, v),
                            [x], keep_samples=keep, into=calibration.attn)
    capture_stage(block, anatomy.stage_groups("mlp"), lambda v: block.add_mlp_(params, v), [h],
                  keep_samples=keep, into=calibration.mlp)
    calibration.clock.add("forward", mark)
    return h


def calibrate_float_all_(block: DecoderBlock, params: Mapping[str, Tensor], anatomy: BlockAnatomy,
                         batches: list[Tensor], *, quant: QuantConfig,
                         clock: PhaseClock | None = None) -> tuple[FloatCalibration, list[Tensor]]:
    """Every input micro-batch through `calibrate_float_`: the block's statistics and its output
    micro-batches. Consumes `batches` (each input is dropped once used)."""
    calibration = FloatCalibration(clock if clock is not None else WallClock())
    outputs = []
    while batches:
        outputs.append(calibrate_float_(block, params, anatomy, batches.pop(0), calibration, quant=quant))
    return calibration, outputs


def solve_block_(block: DecoderBlock, params: Mapping[str, Tensor], anatomy: BlockAnatomy,
                 calibration: FloatCalibration, task: BlockTask) -> BlockOutcome:
    """Quantize a block calibrated with `calibrate_float_` (its statistics are consumed); `params` is not
    modified. The outcome's clock holds the calibration's forward time too."""
    work = BlockWork.start(block, anatomy, params, task, calibration.clock)
    solve_stage(work, "self_attn", calibration.attn)
    solve_stage(work, "mlp", calibration.mlp)
    calibration.attn, calibration.mlp = {}, {}
    return work.outcome()


def replay_block_(block: DecoderBlock, params: Mapping[str, Tensor], batches: list[Tensor]) -> list[Tensor]:
    """The block's outputs with `params` (the weights a finished block was quantized to), by the same
    operations quantize_block_ computes its outputs with, so they match it bit for bit. Consumes `batches`."""
    with torch.no_grad():
        hs = []
        while batches:
            hs.append(block.attention_stage(params, batches.pop(0)))
        for h in hs:
            block.add_mlp_(params, h)
    return hs
