"""The driver's calls that set the block actors' spans going, in the order each actor must run them: one
block resident at a time (`start_spans`), or micro-batches streamed through resident spans (`start_streams`).
Each returns the streams of staged records the driver then follows."""

from __future__ import annotations

from typing import Any, Iterator

from wq_ops.cluster.actor import BlockActor
from wq_ops.cluster.plan import JobPlan
from wq_ops.cluster.prepare import PreparedJob
from wq_ops.cluster.protocol import ActivationRef, ActorSpec, ShardRecord
from wq_ops.cluster.runtime import ActorHandle, ActorRuntime, Pending
from wq_ops.config import JobConfig, Propagation

__all__ = ["start_spans", "start_streams"]


def start_spans(runtime: ActorRuntime, job: JobConfig, plan: JobPlan, actors: list[ActorHandle],
                 specs: list[ActorSpec]) -> list[Iterator[Pending[ShardRecord]]]:
    """One block resident at a time. Quantized propagation chains the actors: the next one needs this one's
    quantized outputs. Float propagation pipelines them span by span: each actor first pushes its span's
    float outputs on, then quantizes while the next actor already works."""
    spans = []
    handoff: list[ActivationRef] | None = None
    pipelined = job.run.propagation is Propagation.FLOAT
    for actor, spec, a in zip(actors, specs, plan.actors):
        last = a is plan.actors[-1]
        blocks = list(a.blocks)
        if pipelined and not last:
            forwarded = runtime.passed(runtime.call(actor, BlockActor.forward_span, spec, blocks, handoff))
            spans.append(runtime.stream(actor, BlockActor.run_span, spec, blocks, None))
            handoff = forwarded
            continue
        spans.append(runtime.stream(actor, BlockActor.run_span, spec, blocks, handoff))
        if not last:
            handoff = runtime.passed(runtime.call(actor, BlockActor.emit_outputs, spec))
    return spans


def start_streams(runtime: ActorRuntime, prepared: PreparedJob, plan: JobPlan, actors: list[ActorHandle],
                   specs: list[ActorSpec]) -> tuple[list[Iterator[Pending[ShardRecord]]], list[Pending[Any]]]:
    """Each micro-batch goes actor to actor through the resident spans (refs only: the receiving actor
    resolves them), so actor k + 1 works on micro-batch m while actor k works on m + 1; then every actor
    solves its span. Only the last actor's forward results (None) are kept: a failure anywhere reaches them
    through the chain, and the driver holds no ref to an activation, so none is pinned or fetched here."""
    n_micro = -(-len(prepared.token_ids) // prepared.job.run.micro_batch_samples)
    for actor, spec, a in zip(actors, specs, plan.actors):
        runtime.call(actor, BlockActor.open_span, spec, list(a.blocks), n_micro)
    forwards: list[Pending[Any]] = []
    for m in range(n_micro):
        passed = None
        for actor, spec in zip(actors, specs):
            done = runtime.call(actor, BlockActor.forward_microbatch, spec, m, passed)
            passed = runtime.passed(done)
        forwards.append(done)
    spans = [runtime.stream(actor, BlockActor.solve_span, spec) for actor, spec in zip(actors, specs)]
    return spans, forwards
