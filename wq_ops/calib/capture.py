"""Block-input capture: run a stage of a block over the calibration micro-batches and accumulate, for
each linear group, the statistics of its input (Hessian, |x| mean and max), optionally keeping the first
samples' inputs for searches that must replay the module (AWQ).

Only the first linear of a group is hooked: the others read the same tensor. `capture_group` captures
one group's input, for quantizing a block one group at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from wq_ops.model.block import DecoderBlock, LinearGroup
from wq_ops.quant.hessian import InputStats, accumulate_input_stats_, new_input_stats

__all__ = ["GroupCapture", "capture_stage", "capture_group", "capture_inputs"]


@dataclass
class GroupCapture:
    """stats: the group's input statistics over all samples; kept: its input for the first `keep_samples`
    samples, as (B, T, in) micro-batches (empty unless asked for)."""

    stats: InputStats
    kept: list[Tensor]


def capture_stage(
    block: DecoderBlock,
    groups: Sequence[LinearGroup],
    run: Callable[[Tensor], Tensor],
    batches: Sequence[Tensor],
    *,
    keep_samples: int = 0,
    into: dict[str, GroupCapture] | None = None,
) -> tuple[dict[str, GroupCapture], list[Tensor]]:
    """Run `run(x)` on every micro-batch x: (B, T, hidden), capturing the input of each group's first
    linear. Returns (group first name -> GroupCapture, the outputs of `run` per micro-batch). into: the
    captures to accumulate into (a stage calibrated one micro-batch per call); the first `keep_samples`
    samples are kept across calls."""
    captures: dict[str, GroupCapture] = {} if into is None else into

    def on_input(name: str, x: Tensor) -> None:
        cap = captures.get(name)
        if cap is None:
            cap = captures[name] = GroupCapture(new_input_stats(x.shape[-1], x.device), [])
        accumulate_input_stats_(cap.stats, x)
        room = keep_samples - sum(k.shape[0] for k in cap.kept)
        if room > 0:
            cap.kept.append(x[:room].detach().clone())

    outputs = []
    first_names = tuple(g.names[0] for g in groups)
    with torch.no_grad(), block.capturing(first_names, on_input):
        for x in batches:
            outputs.append(run(x))
    return captures, outputs


def capture_group(
    block: DecoderBlock,
    group: LinearGroup,
    run: Callable[[Tensor], object],
    batches: Sequence[Tensor],
    *,
    keep_inputs: bool = False,
) -> tuple[GroupCapture, list[Tensor]]:
    """Run `run(x)` on every micro-batch x, accumulating the statistics of the group's input (its first
    linear's). Returns the capture and, with keep_inputs, that input for every micro-batch (the tensors
    themselves, in order). The outputs of `run` are dropped: a caller that needs only the input makes
    what follows it cheap (the stage's last linear given no output rows)."""
    name = group.names[0]
    capture: GroupCapture | None = None
    inputs: list[Tensor] = []

    def on_input(_name: str, x: Tensor) -> None:
        nonlocal capture
        if capture is None:
            capture = GroupCapture(new_input_stats(x.shape[-1], x.device), [])
        accumulate_input_stats_(capture.stats, x)
        if keep_inputs:
            inputs.append(x)

    with torch.no_grad(), block.capturing((name,), on_input):
        for x in batches:
            calls = len(inputs) if keep_inputs else None
            run(x)
            if calls is not None and len(inputs) != calls + 1:
                raise RuntimeError(f"{name}: the stage's forward called it {len(inputs) - calls} times, not once")
    if capture is None:
        raise RuntimeError(f"{name}: the stage's forward never called it" if batches else
                           "capture_group: no micro-batches")
    return capture, inputs


def capture_inputs(inputs: Sequence[Tensor]) -> GroupCapture:
    """The statistics of a group whose input is given (a stage's norm output), one micro-batch each."""
    if not inputs:
        raise ValueError("capture_inputs: no micro-batches")
    capture = GroupCapture(new_input_stats(inputs[0].shape[-1], inputs[0].device), [])
    with torch.no_grad():
        for x in inputs:
            accumulate_input_stats_(capture.stats, x)
    return capture
