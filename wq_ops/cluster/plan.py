"""The plan: which actor owns which contiguous span of blocks, and the memory each actor will need,
stated before any work and checked against what the actor has. A plan that does not fit is refused
with the numbers.

An actor holds one block at a time (plus the next one's tensors), so its memory grows with the size of
a block and the calibration set, not with the model: weights, Hessians, activations and workspace.
"""

from __future__ import annotations

from dataclasses import dataclass

from wq_ops.cluster.estimate import estimate_seconds
from wq_ops.cluster.expert_plan import expert_actor_memory, fewest_expert_actors
from wq_ops.cluster.memory import MemoryEstimate, eval_memory, span_memory
from wq_ops.config import JobConfig, Method, Propagation, SpanMode
from wq_ops.errors import ConfigError, ResourceError
from wq_ops.io.checkpoint import Checkpoint
from wq_ops.model.architecture import ModelLayout

__all__ = ["BlockPlan", "MemoryEstimate", "ActorPlan", "JobPlan", "make_plan", "check_fits", "split_spans",
           "pipeline_spans", "pipeline_finish_times", "smallest_streaming_actors", "QUANTIZE_COST", "HEADROOM"]

GIB = 2**30
# Fraction of an actor's memory the plan may use: the allocator, CUDA context and fragmentation take the rest.
HEADROOM = 0.9


@dataclass(frozen=True)
class BlockPlan:
    index: int
    shard_files: tuple[str, ...]
    tensor_names: tuple[str, ...]
    est_bytes: int                 # the block's tensors in the checkpoint's dtype


@dataclass(frozen=True)
class ActorPlan:
    rank: int
    blocks: tuple[int, ...]
    memory: MemoryEstimate
    capacity_bytes: int
    host_staging_bytes: int        # activations it hands to the next actor, in the object store
    streamed: bool = False         # its span stays resident while the calibration micro-batches stream through
    stash_tails: bool = False      # keeps o_proj and down_proj's inputs rather than rerun the stages (GPTQ, RTN)
    evaluation: MemoryEstimate | None = None   # --eval's pass over its span, after quantizing (None: no --eval)

    @property
    def first(self) -> bool:
        return 0 in self.blocks


@dataclass(frozen=True)
class JobPlan:
    blocks: tuple[BlockPlan, ...]
    actors: tuple[ActorPlan, ...]
    device_kind: str
    artifact_bytes_estimate: int
    note: str = ""                 # why the span mode is what it is, when the job did not choose it
    hint: str = ""                 # what would make a plan that does not fit fit
    eval_windows: int = 0          # --eval: windows scored after quantizing (0: no evaluation)
    eval_seq_len: int = 0
    eval_baseline: bool = False
    expert_actors: int = 0         # --expert-actors: each quantizes a range of every routed block's experts
    experts: MemoryEstimate | None = None      # what one of them needs (the largest range)
    experts_per_actor: int = 0     # routed experts in the largest range
    estimate: dict[str, float] | None = None   # seconds by part, from measured rates (`estimate_seconds`)

    @property
    def streamed(self) -> bool:
        return any(a.streamed for a in self.actors)

    def describe(self) -> str:
        """A human-readable table of the plan."""
        mode = "micro-batches stream through resident spans" if self.streamed else "one block resident at a time"
        if any(a.stash_tails for a in self.actors):
            mode += ", each stage's last linear's inputs kept (one forward per block)"
        lines = [f"plan: {len(self.blocks)} blocks on {len(self.actors)} {self.device_kind} actor(s), {mode}; "
                 f"artifact about {_gib(self.artifact_bytes_estimate)}" + (f" ({self.note})" if self.note else "")]
        evaluated = any(a.evaluation is not None for a in self.actors)
        lines.append("actor  blocks        weights  hessians  activations  workspace  total     capacity"
                     + ("  eval" if evaluated else ""))
        for a in self.actors:
            m = a.memory
            span = f"{a.blocks[0]}-{a.blocks[-1]}" if a.blocks else "-"
            lines.append(
                f"{a.rank:<6} {span:<13} {_gib(m.weights):>7}  {_gib(m.hessians):>8}  {_gib(m.activations):>11}  "
                f"{_gib(m.workspace):>9}  {_gib(m.total):>8}  {_gib(a.capacity_bytes):>8}"
                + (f"  {_gib(a.evaluation.total):>6}" if a.evaluation is not None else "")
            )
        if self.experts is not None:
            m, cap = self.experts, self.actors[0].capacity_bytes
            name = f"x0-{self.expert_actors - 1}"
            lines.append(
                f"{name:<6} {f'{self.experts_per_actor} experts':<13} {_gib(m.weights):>7}  {_gib(m.hessians):>8}  "
                f"{_gib(m.activations):>11}  {_gib(m.workspace):>9}  {_gib(m.total):>8}  {_gib(cap):>8}")
            lines.append(f"experts: {self.expert_actors} expert actors (x0-{self.expert_actors - 1}), each quantizing "
                         f"at most {self.experts_per_actor} of every routed block's experts; the block actors "
                         "load no routed expert")
        if self.estimate is not None:
            e = self.estimate
            lines.append(f"estimate: about {e['total'] / 60:.0f} min on H100s (dense {e['dense'] / 60:.1f}, experts "
                         f"{e['experts'] / 60:.1f}, expert loads {e['expert_loads'] / 60:.1f}, transfers "
                         f"{e['transfers'] / 60:.1f}, start-up {e['startup'] / 60:.1f} min), from measured rates "
                         "(docs/scaling.md)")
        if self.eval_windows:
            lines.append(f"eval: {self.eval_windows} windows of {self.eval_seq_len} tokens after quantizing, the "
                         "artifact's blocks replayed actor to actor" + (" (and the source's)" if self.eval_baseline
                                                                         else ""))
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}G" if n >= GIB // 10 else f"{n / 2**20:.1f}M"


def split_spans(n_blocks: int, n_actors: int) -> list[tuple[int, ...]]:
    """Contiguous spans of equal size (the first ones one longer when it does not divide)."""
    if n_actors > n_blocks:
        raise ConfigError(f"actors={n_actors}: the model has only {n_blocks} decoder blocks; use at most {n_blocks}")
    base, extra = divmod(n_blocks, n_actors)
    spans, start = [], 0
    for rank in range(n_actors):
        size = base + (1 if rank < extra else 0)
        spans.append(tuple(range(start, start + size)))
        start += size
    return spans


# Seconds to quantize one block under float propagation (the pass that captures its inputs and gives its
# outputs, the statistics, solve and pack), in units of one plain float forward of the block over the
# calibration set. From the per-block phase times of the H100 runs in benchmarks/RESULTS.md: GPTQ, 8B,
# one pass ~0.38 s (half the "forward" phase, which made two), solve 0.44 s, pack 0.06 s: (0.38 + 0.44 +
# 0.06) / 0.38 = 2.3. AWQ, 1B: (0.13 + 0.64 + 0.05) / 0.13 = 6.4. RTN, not measured there: about 1.5; HQQ
# (20 elementwise passes over each weight, no calibration statistics of its own) not measured either: about 2.
QUANTIZE_COST = {Method.GPTQ: 2.3, Method.AWQ: 6.4, Method.RTN: 1.5, Method.HQQ: 2.0}


def pipeline_finish_times(spans: list[int], quantize_cost: float) -> list[float]:
    """When each actor finishes under float propagation, in units of one block's float forward, for spans
    of the given sizes. Every actor but the last first forwards its span (its inputs come from the previous
    actor's forward), hands its outputs on, then quantizes its span; the last one only quantizes."""
    times, arrived = [], 0.0
    for k, size in enumerate(spans):
        last = k == len(spans) - 1
        times.append(arrived + size * (quantize_cost if last else 1.0 + quantize_cost))
        arrived += size
    return times


def pipeline_spans(n_blocks: int, n_actors: int, quantize_cost: float) -> list[tuple[int, ...]]:
    """Contiguous spans balanced by cost, not count, for float propagation: actor k's inputs arrive after the
    float forward of all blocks before its span, so later actors get fewer blocks and all finish together.
    Exact: a dynamic programme over (actor, blocks given to the actors before it) minimises the slowest
    actor's finish time of `pipeline_finish_times` (n_actors x n_blocks^2 steps: microseconds)."""
    if n_actors > n_blocks:
        raise ConfigError(f"actors={n_actors}: the model has only {n_blocks} decoder blocks; use at most {n_blocks}")
    if quantize_cost <= 0:
        raise ValueError(f"quantize_cost must be positive, got {quantize_cost}")
    # best[a]: the least slowest-finish time of actors k.. given that a blocks went to the actors before k.
    best = [a + (n_blocks - a) * quantize_cost if a < n_blocks else float("inf") for a in range(n_blocks + 1)]
    choice: list[list[int]] = []
    for k in range(n_actors - 2, -1, -1):
        row, picks = [float("inf")] * (n_blocks + 1), [0] * (n_blocks + 1)
        for a in range(k, n_blocks - (n_actors - 1 - k)):          # leave a block for each later actor
            for size in range(1, n_blocks - a - (n_actors - 2 - k)):
                t = max(a + size * (1.0 + quantize_cost), best[a + size])
                if t < row[a] - 1e-12:
                    row[a], picks[a] = t, size
        best = row
        choice.insert(0, picks)
    spans, start = [], 0
    for picks in choice:
        spans.append(tuple(range(start, start + picks[start])))
        start += picks[start]
    spans.append(tuple(range(start, n_blocks)))
    return spans


def _actor_plans(layout: ModelLayout, job: JobConfig, spans: list[tuple[int, ...]], *, capacity_bytes: int,
                 streamed: bool, eval_windows: int = 0) -> tuple[ActorPlan, ...]:
    staging = job.calib.n_samples * job.calib.seq_len * layout.hidden_size * layout.dtype.itemsize
    last_block = layout.n_blocks - 1
    # GPTQ and RTN under quantized propagation keep the stages' tail inputs (one forward per block instead
    # of about two) where that still fits.
    may_stash = not streamed and job.run.propagation is Propagation.QUANTIZED and job.quant.method is not Method.AWQ
    plans = []
    for r, span in enumerate(spans):
        kw = dict(first=0 in span, last=last_block in span, resident=len(span) if streamed else 0)
        memory = span_memory(layout, job, span, **kw)  # type: ignore[arg-type]
        stashed = span_memory(layout, job, span, stash_tails=True, **kw) if may_stash else None  # type: ignore[arg-type]
        stash = stashed is not None and stashed.total <= int(capacity_bytes * HEADROOM)
        evaluation = eval_memory(layout, job, span, eval_windows, first=0 in span, last=last_block in span) \
            if eval_windows else None
        plans.append(ActorPlan(rank=r, blocks=span, memory=stashed if stash and stashed else memory,
                               capacity_bytes=capacity_bytes, host_staging_bytes=0 if last_block in span else staging,
                               streamed=streamed, stash_tails=stash, evaluation=evaluation))
    return tuple(plans)


def _fits(actors: tuple[ActorPlan, ...]) -> bool:
    return all(a.memory.total <= int(a.capacity_bytes * HEADROOM) for a in actors)


def smallest_streaming_actors(layout: ModelLayout, job: JobConfig, *, capacity_bytes: int) -> int | None:
    """The fewest actors whose resident spans fit their memory, or None if not even one block per actor does."""
    for n in range(1, layout.n_blocks + 1):
        if _fits(_actor_plans(layout, job, split_spans(layout.n_blocks, n), capacity_bytes=capacity_bytes,
                              streamed=True)):
            return n
    return None


def make_plan(layout: ModelLayout, checkpoint: Checkpoint, job: JobConfig, *, capacity_bytes: int,
              eval_windows: int = 0) -> JobPlan:
    """Blocks and their tensors, actor spans and per-actor memory (and, with eval_windows, --eval's pass over
    that many windows). Does not check the fit (`check_fits`)."""
    blocks = []
    for i in range(layout.n_blocks):
        names = tuple(layout.block_tensor_name(i, local) for local in layout.block(i).params)
        files = tuple(sorted(set(checkpoint.files_for(names))))
        blocks.append(BlockPlan(index=i, shard_files=files, tensor_names=names, est_bytes=layout.block_nbytes(i)))
    # Streaming keeps every actor busy at once, so equal spans balance it; float propagation one block at a
    # time pipelines the actors span by span, so spans are balanced by cost; quantized propagation runs
    # them one after another, where only the count matters.
    mode, n_actors, note = job.run.span_mode, job.run.actors, ""
    float_propagation = job.run.propagation is Propagation.FLOAT
    streamed = float_propagation and (mode is SpanMode.STREAM or (mode is SpanMode.AUTO and n_actors > 1))
    actors: tuple[ActorPlan, ...] = ()
    if streamed:
        actors = _actor_plans(layout, job, split_spans(layout.n_blocks, n_actors), capacity_bytes=capacity_bytes,
                              streamed=True, eval_windows=eval_windows)
        if mode is SpanMode.AUTO and not _fits(actors):
            streamed, note = False, "resident spans would not fit: one block at a time"
    if not streamed:
        spans = pipeline_spans(layout.n_blocks, n_actors, QUANTIZE_COST[job.quant.method]) if float_propagation \
            else split_spans(layout.n_blocks, n_actors)
        actors = _actor_plans(layout, job, spans, capacity_bytes=capacity_bytes, streamed=False,
                              eval_windows=eval_windows)
    if streamed:
        fewest = smallest_streaming_actors(layout, job, capacity_bytes=capacity_bytes)
        hint = (f"with --actors {fewest} (or more) the resident spans fit" if fewest is not None and
                fewest <= layout.n_blocks else "not even one block per actor fits resident") + \
            "; --span-mode block holds one block at a time"
    else:
        hint = "each actor holds one block at a time, so more actors do not lower this"
        if job.run.device_kind == "cpu":
            hint += "; CPU actors share the host's memory, so fewer actors get more each"
    experts, per_actor = None, 0
    routed = [b.moe for b in layout.kinds() if b.moe is not None]
    if job.run.expert_actors:
        experts = MemoryEstimate(*expert_actor_memory(layout, job, job.run.expert_actors))
        per_actor = max(-(-m.n_experts // job.run.expert_actors) for m in routed)
    if routed and not streamed:
        fewest = fewest_expert_actors(layout, job, int(capacity_bytes * HEADROOM))
        hint += ("; a routed block's experts: --expert-actors N spreads them over N more actors" +
                 (f" ({fewest} would each fit)" if fewest is not None else " (not even one expert each fits)"))
    elt = layout.dtype.itemsize
    quantized = sum(s.in_features * s.out_features for b in layout.blocks for s in b.linears)
    rest = sum(b.nbytes(layout.dtype) for b in layout.blocks) - quantized * elt
    group = job.quant.group_size or max(s.in_features for b in layout.kinds() for s in b.linears)
    artifact = int(quantized * job.quant.bits / 8 + quantized / group * (elt + (0 if job.quant.sym else 1))
                   + rest + layout.outer_nbytes())
    return JobPlan(blocks=tuple(blocks), actors=actors, device_kind=job.run.device_kind,
                   artifact_bytes_estimate=artifact, note=note, hint=hint, eval_windows=eval_windows,
                   eval_seq_len=job.evaluation.seq_len if eval_windows else 0,
                   eval_baseline=job.evaluation.baseline and eval_windows > 0, expert_actors=job.run.expert_actors,
                   experts=experts, experts_per_actor=per_actor,
                   estimate=estimate_seconds(layout, job, source_bytes_per_weight=1 if checkpoint.fp8_block else elt))


def check_fits(plan: JobPlan) -> None:
    """Refuse, with the numbers, a plan in which some actor needs more than HEADROOM of its memory."""
    for a in plan.actors:
        budget = int(a.capacity_bytes * HEADROOM)
        if a.memory.total > budget:
            m = a.memory
            raise ResourceError(
                f"actor {a.rank} (blocks {a.blocks[0]}-{a.blocks[-1]}) needs {m.total / GIB:.2f} GiB of "
                f"{plan.device_kind} memory (weights {m.weights / GIB:.2f}, Hessians {m.hessians / GIB:.2f}, "
                f"activations {m.activations / GIB:.2f}, workspace {m.workspace / GIB:.2f}) but may use "
                f"{budget / GIB:.2f} GiB ({HEADROOM:.0%} of {a.capacity_bytes / GIB:.2f}); {plan.hint}; "
                "activations grow with --samples x --seq-len: lower them, lower --micro-batch-samples, or use "
                "actors with more memory"
            )
        x = plan.experts
        if a.rank == 0 and x is not None and x.total > budget:
            raise ResourceError(
                f"each of {plan.expert_actors} expert actors needs up to {x.total / GIB:.2f} GiB of {plan.device_kind} "
                f"memory for {plan.experts_per_actor} experts of a routed block (weights {x.weights / GIB:.2f}, "
                f"Hessians {x.hessians / GIB:.2f}, activations {x.activations / GIB:.2f}, workspace "
                f"{x.workspace / GIB:.2f}) but may use {budget / GIB:.2f} GiB; {plan.hint}")
        e = a.evaluation
        if e is not None and e.total > budget:
            raise ResourceError(
                f"actor {a.rank} (blocks {a.blocks[0]}-{a.blocks[-1]}): --eval needs {e.total / GIB:.2f} GiB of "
                f"{plan.device_kind} memory (weights {e.weights / GIB:.2f}, activations {e.activations / GIB:.2f} for "
                f"{plan.eval_windows} windows of {plan.eval_seq_len} tokens, workspace {e.workspace / GIB:.2f}) but "
                f"may use {budget / GIB:.2f} GiB; lower --eval-max-windows or --eval-seq-len, or leave --eval out "
                "and run jobs.eval afterwards"
            )
