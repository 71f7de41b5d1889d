"""One job's state on a block actor: the model skeleton on the meta device, rotary tables and attention
contexts, the blocks' probed anatomy, the activations the actor holds, and the marks the report wants.
Made by the actor's first call of a job (`ActorJob.start`); the job's later calls reuse it."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, cast

import torch
from torch import Tensor, nn

from wq_ops.block.clock import PhaseClock, WallClock
from wq_ops.block.work import BlockTask
from wq_ops.cluster.protocol import ActorSpec, HandoffTimes, ShardRecord
from wq_ops.config import MoeCalibration
from wq_ops.device.timing import CudaEventClock
from wq_ops.model.anatomy import discover_anatomy
from wq_ops.model.architecture import EAGER_ATTENTION_ARCHITECTURES, attention_window, instantiate_on_meta
from wq_ops.model.block import BlockAnatomy, DecoderBlock, SequenceContext, make_sequence_context
from wq_ops.model.moe import MoeSpec

__all__ = ["ActorJob"]


class ActorJob:
    """spec: the job's descriptors for this actor; device: where its blocks compute. `batches`: the
    activation micro-batches the actor holds between its blocks (B, T, hidden)."""

    def __init__(self, spec: ActorSpec, device: torch.device) -> None:
        self.spec, self.device = spec, device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)     # the actor's memory peak reports this job's
        self.model = instantiate_on_meta(spec.hf_config, trust_remote_code=spec.job.trust_remote_code)
        base = self.model.get_submodule(spec.layout.block_prefix.rsplit(".", 1)[0])
        rotary_cls: Any = type(base.get_submodule("rotary_emb"))
        with torch.device(device):
            self.rotary: nn.Module = rotary_cls(config=spec.hf_config)
        self.blocks = cast(nn.ModuleList, self.model.get_submodule(spec.layout.block_prefix))
        self.contexts: dict[tuple[int, int | None], SequenceContext] = {}    # by (sequence length, window)
        self.anatomies: dict[int, BlockAnatomy] = {}    # by block kind (id of its BlockLayout)
        self.batches: list[Tensor] = []
        self.inputs_at: float | None = None         # the previous actor's outputs resolved here
        self.handed_on_at: float | None = None      # this actor's outputs put in the object store
        self.computed = 0                           # blocks this run quantized (not replayed)
        spec.artifact.staging.mkdir(parents=True, exist_ok=True)

    def same_job(self, spec: ActorSpec) -> bool:
        return (self.spec.rank, self.spec.artifact) == (spec.rank, spec.artifact)

    def handoff(self) -> HandoffTimes:
        return HandoffTimes(inputs_at=self.inputs_at, handed_on_at=self.handed_on_at)

    def mark_handed_on(self) -> None:
        self.handed_on_at = time.time()

    def task(self, index: int) -> BlockTask:
        layout, job = self.spec.layout, self.spec.job
        return BlockTask(quant=job.quant, fmt=job.format, block_index=index, prefix=layout.block_prefix,
                         linears=layout.block(index).linears, pad_intermediate=self.spec.pad_intermediate,
                         moe=layout.block(index).moe, kept=layout.block(index).kept)

    def clock(self) -> PhaseClock:
        """A block's phase clock: CUDA events on a GPU (no wait per phase), else wall time."""
        return CudaEventClock(self.device) if self.device.type == "cuda" else WallClock()

    def block(self, index: int, *, seq_len: int | None = None) -> DecoderBlock:
        """Block `index`'s module (meta device) with the context of its attention window, for sequences of
        seq_len tokens (None: the calibration's)."""
        kind = self.spec.layout.block(index)
        all_tokens = self.spec.job.quant.moe.calibration is MoeCalibration.ALL
        return DecoderBlock(self.blocks[index], self._context(index, seq_len or self.spec.job.calib.seq_len),
                            moe=kind.moe, experts_see_all_tokens=all_tokens)

    def ensure_anatomy(self, index: int, params: Mapping[str, Tensor]) -> BlockAnatomy:
        """A block's structure (linear groups by stage), probed once per kind of block, on the first block of
        that kind the job meets (blocks alike share it). A routed MLP is probed with stand-in experts, whether its
        own are here or on expert actors: the probe copies every weight it takes to float32, and a block's real
        experts would add that much again (DeepSeek-V3's: 45 GB) to memory the plan does not count. (A NaN in an
        expert is still found: the staged block's outputs are checked, and `blame` names the tensor.)"""
        kind = self.spec.layout.block(index)
        if id(kind) not in self.anatomies:
            probe = DecoderBlock(self.blocks[index], self._probe_context(index), moe=kind.moe)
            if kind.moe is not None:
                routed = kind.moe.prefix + ".experts."
                params = {**{k: v for k, v in params.items() if not k.startswith(routed)},
                          **_stand_in_experts(kind.moe, next(iter(params.values())))}
            self.anatomies[id(kind)] = discover_anatomy(probe, params, kind.linears,
                                                        hidden_size=self.spec.layout.hidden_size)
        return self.anatomies[id(kind)]

    def counted(self, record: ShardRecord) -> ShardRecord:
        """Count the blocks this run computed, and add the actor's GPU memory peak to its record (the progress
        bar shows it). The fault-injection hook (fail_after_blocks) crashes the
        actor once that many are staged, to test resuming: the staged ones survive."""
        if not record.resumed:
            if self.device.type == "cuda":
                peak = int(torch.cuda.max_memory_allocated(self.device))
                record = dataclasses.replace(record, device_peak_bytes=peak)
            self.computed += 1
            limit = self.spec.job.fail_after_blocks
            if limit is not None and self.computed >= limit:
                raise RuntimeError(f"fail_after_blocks={limit}: injected crash of actor {self.spec.rank} "
                                   f"after {limit} block(s) computed and staged")
        return record

    def _window(self, index: int) -> int | None:
        return attention_window(self.blocks[index], self.spec.hf_config, self.spec.layout.architecture)

    def _context(self, index: int, seq_len: int) -> SequenceContext:
        key = (seq_len, self._window(index))
        if key not in self.contexts:
            self.contexts[key] = self._make_context(seq_len=seq_len, window=key[1])
        return self.contexts[key]

    def _probe_context(self, index: int) -> SequenceContext:
        """A short context for probing the block's structure (16 tokens, the same window rule)."""
        window = self._window(index)
        return self._make_context(seq_len=16, window=window if window is None else min(window, 8))

    def _make_context(self, *, seq_len: int, window: int | None) -> SequenceContext:
        layout = self.spec.layout
        return make_sequence_context(self.rotary, seq_len=seq_len, hidden_size=layout.hidden_size, window=window,
                                     device=self.device, dtype=layout.dtype,
                                     additive=layout.architecture in EAGER_ATTENTION_ARCHITECTURES)


def _stand_in_experts(moe: MoeSpec, like: Tensor) -> dict[str, Tensor]:
    """Routed experts for probing a block (`ActorJob.ensure_anatomy`): random, with an intermediate width of 8
    (the least whose rows transformers' grouped GEMM accepts: 16 bytes), not the model's (the probe checks the
    block's stages against the layer's own forward, experts included, and groups the attention's linears; the
    experts' groups come from the spec, not from their values)."""
    gen = torch.Generator().manual_seed(0)
    out, width = {}, 8
    for e in range(moe.n_experts):
        for which, shape in (("gate", (width, moe.hidden_size)), ("up", (width, moe.hidden_size)),
                             ("down", (moe.hidden_size, width))):
            out[moe.expert(e, which) + ".weight"] = torch.randn(shape, generator=gen).mul_(0.02).to(like)
            if moe.expert_bias:
                out[moe.expert(e, which) + ".bias"] = torch.randn(shape[0], generator=gen).mul_(0.02).to(like)
    return out
