"""Routed experts quantized on expert actors (--expert-actors K): each routed block's experts are cut into K
contiguous ranges (`expert_ranges`), range j always on expert actor j. The block's own actor loads no routed
expert: it routes each micro-batch, puts the routed inputs in the object store once, and every expert actor
reads its range's weights from the checkpoint (the next routed block's read ahead: `ExpertReader`), quantizes
them (`quantize_experts_`, a batch at a time) and hands back its artifact tensors, its records and, per
micro-batch, its weighted outputs, which the block's actor adds in expert order. The artifact is the one the
block's actor alone would write."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, cast

import torch
from torch import Tensor

from wq_ops.block.experts import ExpertRunner, ExpertsPart, RoutedInputs, add_routed_, expert_ranges, quantize_experts_
from wq_ops.block.records import PendingReport, merged_reports
from wq_ops.block.work import BlockWork
from wq_ops.cluster.protocol import ActorSpec, Pending
from wq_ops.cluster.ray_calls import get_remote
from wq_ops.device.transport import HostTensor, from_host, to_host
from wq_ops.io.checkpoint import read_tensors
from wq_ops.io.digest import tensor_entries
from wq_ops.model.moe import ByExpert

if TYPE_CHECKING:
    from wq_ops.cluster.actor_job import ActorJob

__all__ = ["RoutedTransfer", "ExpertsResult", "ExpertReader", "Submit", "remote_experts", "quantize_expert_range"]


@dataclass(frozen=True)
class RoutedTransfer:
    """`RoutedInputs` on its way to the expert actors (one object-store copy, read by each)."""

    flats: tuple[HostTensor, ...]
    weights: tuple[HostTensor, ...]
    tokens: tuple[Tensor, ...]
    slots: tuple[Tensor, ...]
    starts: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, inputs: RoutedInputs) -> "RoutedTransfer":
        return cls(tuple(to_host(f) for f in inputs.flats), tuple(to_host(w) for w in inputs.weights),
                   tuple(b.tokens.cpu() for b in inputs.by_expert), tuple(b.slots.cpu() for b in inputs.by_expert),
                   tuple(b.starts for b in inputs.by_expert))

    def on(self, device: torch.device) -> RoutedInputs:
        return RoutedInputs(tuple(from_host(f, device) for f in self.flats),
                            tuple(from_host(w, device) for w in self.weights),
                            tuple(ByExpert(t.to(device), s.to(device), starts)
                                  for t, s, starts in zip(self.tokens, self.slots, self.starts)))


@dataclass(frozen=True)
class ExpertsResult:
    """What an expert actor hands back for its range of one block: the artifact tensors and the records'
    numbers (as NumPy arrays: float8 and bfloat16 included), the object-store refs of each micro-batch's
    weighted outputs, the digest entries of the source weights it read, and its seconds per phase."""

    experts: range
    tensors: dict[str, HostTensor]
    numbers: HostTensor
    slots: tuple[Any, ...]
    checks: tuple[str, ...]
    outputs: tuple[Any, ...]
    source_entries: dict[str, str]       # the digest entries of the weights it read (the block's record)
    seconds: dict[str, float]            # per phase: read (waiting for it), upload, forward, solve, pack, send

    def report(self) -> PendingReport:
        return PendingReport(numbers=from_host(self.numbers, "cpu"), slots=self.slots, checks=self.checks)


# submit(expert actor, spec, its rank, block, range, routed inputs' ref): its call of `quantize_experts`, made by
# the block actor (which names its own method: this module imports no actor).
Submit = Callable[[Any, ActorSpec, int, int, range, RoutedTransfer], Pending[ExpertsResult]]


def remote_experts(actors: Sequence[Any], spec: ActorSpec, device: torch.device, submit: Submit) -> ExpertRunner:
    """An ExpertRunner for the block's actor: the ranges on `actors` (Ray handles, range j on actor j), all at
    once; their outputs added into the block's in expert order as each range comes back."""

    def run(work: BlockWork, inputs: RoutedInputs, expert_params: dict[str, Tensor],
            outs: Sequence[Tensor]) -> Iterator[ExpertsPart]:
        import ray

        moe = work.task.moe
        assert moe is not None
        ranges = expert_ranges(moe.n_experts, len(actors))
        # One object-store copy for every expert actor (Ray resolves the ref to the object before each call).
        routed = cast(RoutedTransfer, ray.put(RoutedTransfer.of(inputs)))
        first_rank = spec.job.run.actors            # expert actors' ranks follow the block actors'
        pending = [submit(actor, spec, first_rank + j, work.task.block_index, experts, routed)
                   for j, (actor, experts) in enumerate(zip(actors, ranges))]
        for j, (experts, call) in enumerate(zip(ranges, pending)):
            result = get_remote(call)
            mark = work.clock.mark()
            for m, ref in enumerate(result.outputs):
                add_routed_(outs[m], inputs.by_expert[m], experts, from_host(ray.get(ref), device))
            work.clock.add("forward", mark)
            yield ExpertsPart(experts, {k: from_host(v, "cpu") for k, v in result.tensors.items()}, result.report(),
                              result.source_entries, {"rank": first_rank + j, **result.seconds})

    return run


class ExpertReader:
    """An expert actor's reads of its ranges from the checkpoint, one ahead: once a block's range is read, the
    same range of the next routed block is read on a helper thread (to the host) while this one is quantized,
    so that the disk is not on the critical path but for the first block."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="wq-expert-read")
        self._ahead: dict[tuple[str, int, int, int], Future[tuple[dict[str, Tensor], dict[str, str]]]] = {}

    def read(self, job: "ActorJob", index: int, experts: range) -> tuple[dict[str, Tensor], dict[str, str]]:
        """`experts`' weights of block `index` (block-local names, on the host) and their digest entries (full
        names, as the block's loader makes them), then the next routed block's same range read ahead."""
        key = self._key(job, index, experts)
        ahead = self._ahead.pop(key, None)
        for stale in list(self._ahead):       # a range no call will ask for (another job, another range)
            self._ahead.pop(stale)
        host = ahead.result() if ahead is not None else _read_range(job, index, experts)
        layout = job.spec.layout
        following = next((i for i in range(index + 1, layout.n_blocks) if layout.block(i).moe is not None), None)
        if following is not None:
            self._ahead[self._key(job, following, experts)] = self._pool.submit(_read_range, job, following,
                                                                               experts)
        return host

    @staticmethod
    def _key(job: "ActorJob", index: int, experts: range) -> tuple[str, int, int, int]:
        return str(job.spec.artifact.staging), index, experts.start, experts.stop

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._ahead.clear()


def _read_range(job: "ActorJob", index: int, experts: range) -> tuple[dict[str, Tensor], dict[str, str]]:
    layout = job.spec.layout
    moe = layout.block(index).moe
    assert moe is not None
    prefix = f"{layout.block_prefix}.{index}."
    names = [n for e in experts for n in moe.expert_tensors(e)]
    host = read_tensors(job.spec.checkpoint, [prefix + n for n in names])
    return {n[len(prefix):]: v for n, v in host.items()}, tensor_entries(host)


def quantize_expert_range(job: "ActorJob", reader: ExpertReader, index: int, experts: range,
                          routed: RoutedTransfer) -> ExpertsResult:
    """On an expert actor's compute thread: `experts`' weights of block `index` (`reader`), quantized, and
    each micro-batch's outputs put in the object store."""
    import ray

    device, dtype = job.device, job.spec.layout.dtype
    t = time.perf_counter()
    host, entries = reader.read(job, index, experts)
    read = time.perf_counter() - t
    t = time.perf_counter()
    params = {n: v.to(device=device, dtype=dtype) for n, v in host.items()}
    del host
    inputs = routed.on(device)
    upload = time.perf_counter() - t
    task, block, clock = job.task(index), job.block(index), job.clock()
    outputs: list[list[Tensor]] = [[] for _ in inputs.flats]

    def emit(e: int, ys: list[Tensor]) -> None:
        # To the host at once: the device holds one expert's outputs, not the range's.
        for kept, y in zip(outputs, ys):
            kept.append(y.cpu())

    part = quantize_experts_(block, params, task, experts, inputs, emit=emit, clock=clock)
    params.clear()
    seconds = {"read": read, "upload": upload, **clock.seconds()}
    t = time.perf_counter()
    tensors = {k: to_host(v) for k, v in part.tensors.items()}
    report = merged_reports([part.report], torch.device("cpu"))
    refs = tuple(ray.put(to_host(torch.cat(ys))) for ys in outputs)
    seconds["send"] = time.perf_counter() - t
    return ExpertsResult(experts, tensors, to_host(report.numbers), report.slots, report.checks, refs, entries,
                         {k: round(v, 4) for k, v in seconds.items()})
