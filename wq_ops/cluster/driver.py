"""The driver: prepare (check everything that can be checked), plan, start the actors, follow their
progress, and write the artifact's metadata and index last.

It reads only config.json, the safetensors index and shard headers, and the tokenizer; it sends actors
descriptors and refs, never weights, and receives shard records, never tensors. Every actor call goes
through the runtime's typed `call`/`stream`, naming the `BlockActor` method itself (`protocol`).
Entry point: `run_job(job, cache_dir=..., command=...)`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from wq_ops.calib.data import CalibrationSummary
from wq_ops.cluster.actor import BlockActor
from wq_ops.cluster.evaluation import evaluate_on_actors
from wq_ops.cluster.finish import write_artifact
from wq_ops.cluster.plan import GIB, JobPlan, check_fits, make_plan, split_spans
from wq_ops.cluster.prepare import PreparedJob, prepare_job
from wq_ops.cluster.protocol import ActorSpec, ShardRecord
from wq_ops.cluster.runtime import ActorHandle, ActorRuntime, Pending
from wq_ops.cluster.runtime_choice import choose_runtime
from wq_ops.cluster.span_calls import start_spans, start_streams
from wq_ops.config import JobConfig, Propagation
from wq_ops.errors import ActorLostError, ConfigError, WqError
from wq_ops.io.artifact import check_room
from wq_ops.io.checkpoint import read_config
from wq_ops.io.hub_push import check_push_access, push_artifact
from wq_ops.io.redact import redact
from wq_ops.report.progress import BlockProgress, LogReporter, ProgressReporter, TimeLeft

__all__ = ["JobResult", "run_job", "prepare_job"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobResult:
    out_dir: Path
    plan: JobPlan
    report: dict[str, Any] | None        # None after a dry run
    index_path: Path | None
    calibration: CalibrationSummary | None = None   # source, shape, distinct windows
    disk: str = ""                       # the room the artifact needs at --out, and what is free there


@dataclass(frozen=True)
class _ActorsDone:
    """What the actors gave back besides the shards, for the report."""

    records: list[ShardRecord]
    handoffs: list[dict[str, Any]]       # each actor's inputs arriving and outputs leaving (wall clock)
    memory: list[dict[str, Any]]         # each actor's planned bytes and, on a GPU, its device peaks
    warm_ups: list[float | None]         # each actor's GPU warm-up seconds (None on CPU)
    evaluation: dict[str, Any] | None    # --eval's perplexities (None: not asked)


def _actor_capacity(job: JobConfig, runtime: ActorRuntime, actors: list[ActorHandle], *,
                    created_at: float) -> tuple[int, list[dict[str, float | str | None]]]:
    """Bytes each actor may plan with: --actor-memory-gib, else the smallest the actors report (their
    GPU's memory, or their host's RAM / actors). Also each actor's start-up split, in seconds: process
    spawn and imports, CUDA context, kernels, transformers (logged, and kept for the report; a GPU actor's
    warm-up goes on after it is ready, and its time is added at the job's end)."""
    try:
        answers = runtime.get_all([runtime.call(a, BlockActor.capacity, job.run.all_actors) for a in actors],
                                  timeout=600)
    except Exception as e:
        raise _unwrap(e) from None
    startup: list[dict[str, float | str | None]] = [
        {"spawn_and_imports_s": round(c.startup.init_at - created_at, 3), "device_s": c.startup.device_s,
         "kernels_s": c.startup.kernels_s, "transformers_s": c.startup.transformers_s,
         "ready_s": round(c.startup.ready_at - created_at, 3), "node": c.startup.node} for c in answers]
    for rank, split in enumerate(startup):
        log.info("actor=%d started: %s", rank, " ".join(f"{k}={v}" for k, v in split.items()))
    if job.run.actor_memory_gib is not None:
        return int(job.run.actor_memory_gib * GIB), startup
    return min(c.nbytes for c in answers), startup


def _unwrap(error: Exception) -> Exception:
    """Ray wraps an actor's exception; give back our own error where it is one."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, WqError) else error


def _follow(runtime: ActorRuntime, spans: list[Iterator[Pending[ShardRecord]]], forwards: list[Pending[Any]],
            progress: _Progress) -> list[ShardRecord]:
    """The blocks' records as the actors stage them, each told to the progress reporter; the first failure
    anywhere stops the job with its cause."""
    events: queue.Queue = queue.Queue()

    def follow(span: Iterator[Pending[ShardRecord]]) -> None:
        try:
            for pending in span:
                events.put(runtime.get(pending))
            events.put(None)
        except Exception as e:  # a task error or a dead actor: the main thread stops the job
            events.put(e)

    def watch(pendings: list[Pending[Any]]) -> None:
        """The streamed forwards carry no records, but a failure in one must stop the job with its cause."""
        try:
            runtime.get_all(pendings)
            events.put(None)
        except Exception as e:
            events.put(e)

    followers = [threading.Thread(target=follow, args=(span,), daemon=True) for span in spans]
    if forwards:
        followers.append(threading.Thread(target=watch, args=(forwards,), daemon=True))
    for f in followers:
        f.start()
    records: list[ShardRecord] = []
    running = len(followers)
    while running:
        event = events.get()
        if event is None:
            running -= 1
        elif isinstance(event, Exception):
            raise _unwrap(event) from None
        else:
            records.append(event)
            progress.block_done(event)
    return records


class _Progress:
    """What the driver tells the reporter as blocks are staged: counts, the block's seconds and mean output
    error, tokens/s, the time left (`TimeLeft`) and the actor's GPU memory peak."""

    def __init__(self, plan: JobPlan, n_blocks: int, n_tokens: int, reporter: ProgressReporter, *,
                 sequential: bool) -> None:
        self.plan, self.n_blocks, self.n_tokens, self.reporter = plan, n_blocks, n_tokens, reporter
        self.start = time.time()          # wall clock: the records say when the actors staged them
        self.done = self.computed = 0
        self.per_actor = [0] * len(plan.actors)
        self.time_left = TimeLeft([len(a.blocks) for a in plan.actors], sequential=sequential, started_at=self.start)

    def block_done(self, record: ShardRecord) -> None:
        now = time.time()
        self.done += 1
        self.computed += not record.resumed
        self.per_actor[record.rank] += 1
        # When the actor staged it, not when its record arrived: an actor hands a block's record on once the
        # next block is computed (its shard is written meanwhile), so arrivals lag a block.
        self.time_left.add(record.rank, at=min(record.finished_at or now, now), resumed=record.resumed)
        errors = [layer.output_error for layer in record.layers if layer.quantized]
        elapsed = now - self.start
        self.reporter.update(BlockProgress(
            block=record.block if record.block is not None else -1, rank=record.rank, done=self.done,
            total=self.n_blocks, actor_done=self.per_actor[record.rank],
            actor_total=len(self.plan.actors[record.rank].blocks), resumed=record.resumed,
            block_seconds=sum(record.seconds.values()), mean_error=sum(errors) / len(errors) if errors else None,
            elapsed_s=elapsed, tokens_per_s=self.n_tokens * self.computed / elapsed if elapsed > 0 else 0.0,
            eta_s=self.time_left.eta(now), device_peak_bytes=record.device_peak_bytes))


def _run_actors(prepared: PreparedJob, plan: JobPlan, runtime: ActorRuntime, actors: list[ActorHandle],
                reporter: ProgressReporter) -> _ActorsDone:
    """Run the plan: the staged shards' records, and what the report says of each actor."""
    job, layout = prepared.job, prepared.layout
    pad = prepared.compatibility.padding.extra if prepared.compatibility.padding else 0
    # The runtime started the block actors, then the expert actors (--expert-actors), which only block actors call.
    actors, experts = actors[:job.run.actors], tuple(actors[job.run.actors:])
    specs = [runtime.put(ActorSpec(rank=a.rank, checkpoint=prepared.checkpoint, hf_config=prepared.hf_config,
                                   layout=layout, job=job, artifact=prepared.artifact, pad_intermediate=pad,
                                   stash_tails=a.stash_tails, carried=prepared.carried, expert_actors=experts))
             for a in plan.actors]
    # Each actor runs its calls in the order made here; activations pass from one actor to the next as
    # refs, resolved by the receiving actor, never by the driver.
    runtime.call(actors[-1], BlockActor.stage_head, specs[-1])
    runtime.call(actors[0], BlockActor.embed, specs[0], runtime.put(prepared.token_ids))
    forwards: list[Pending[Any]] = []
    if plan.streamed:
        spans, forwards = start_streams(runtime, prepared, plan, actors, specs)
    else:
        spans = start_spans(runtime, job, plan, actors, specs)
    # Quantized propagation chains the actors (each needs the previous one's quantized outputs): one at a time.
    sequential = job.run.propagation is Propagation.QUANTIZED and not plan.streamed
    progress = _Progress(plan, layout.n_blocks, prepared.token_ids.numel(), reporter, sequential=sequential)
    reporter.start(layout.n_blocks)
    try:
        records = _follow(runtime, spans, forwards, progress)
    finally:
        reporter.close()
    outer = list({id(x): x for x in (actors[0], actors[-1])}.values())
    try:
        for staged in runtime.get_all([runtime.call(actor, BlockActor.outer_records) for actor in outer]):
            records.extend(staged)
        handoffs = runtime.get_all([runtime.call(actor, BlockActor.handoff_times) for actor in actors])
        peaks = runtime.get_all([runtime.call(actor, BlockActor.memory_peak) for actor in actors])
        expert_peaks = runtime.get_all([runtime.call(actor, BlockActor.memory_peak) for actor in experts])
        warm_ups = runtime.get_all([runtime.call(actor, BlockActor.warm_up_seconds) for actor in actors])
        evaluation = None if prepared.eval_ids is None else evaluate_on_actors(runtime, prepared, plan, actors, specs)
    except Exception as e:
        raise _unwrap(e) from None
    return _ActorsDone(
        records=records,
        handoffs=[{"rank": a.rank, **_present(vars(h))} for a, h in zip(plan.actors, handoffs)],
        # What each actor's device really held at most, beside what the plan said it would need.
        memory=[{"rank": a.rank, "planned_bytes": a.memory.total, **_present(vars(p))}
                for a, p in zip(plan.actors, peaks)]
        + [{"rank": len(actors) + j, "expert_actor": True, "planned_bytes": plan.experts.total if plan.experts else 0,
            **_present(vars(p))} for j, p in enumerate(expert_peaks)],
        warm_ups=warm_ups, evaluation=evaluation)


def _present(fields: dict[str, Any]) -> dict[str, Any]:
    """A message's fields that apply (None: not applicable), for the report."""
    return {k: v for k, v in fields.items() if v is not None}


def _check_actor_count(job: JobConfig) -> bool:
    """More actors than decoder blocks, refused before any actor starts where config.json is at hand (a local
    checkpoint, the bundled model); returns whether it could check (otherwise the preparation checks it, and
    the driver waits for that before starting several actors). Expert actors are checked against the routed
    experts by the preparation: the driver waits for it."""
    if job.run.expert_actors and job.model:
        return False
    if job.run.actors == 1 or not job.model:
        return True
    if not Path(job.model, "config.json").is_file():
        return False
    try:
        config = read_config(Path(job.model, "config.json"))
    except WqError:
        return False                 # the preparation reports it, with its context
    text = config.get("text_config")
    blocks = (text if isinstance(text, dict) else config).get("num_hidden_layers")
    if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1:
        return False
    split_spans(blocks, job.run.actors)       # raises the plan's own message
    return True


def run_job(job: JobConfig, *, cache_dir: Path, command: str = "", hub_token: str | None = None,
            progress: ProgressReporter | None = None) -> JobResult:
    """Quantize `job.model` into `job.out`. Raises a WqError subclass, naming the problem, for anything
    that can be checked before the work starts; writes nothing in `job.out` but staging until the end.
    progress: where each staged block is told (default: one log line per block).

    Start-up runs in parallel: this thread starts the runtime (Ray, or none in-process) and the warm actors
    (process, CUDA context, kernels, library warm-up) while a helper thread reads the checkpoint's config and
    index and the calibration data."""
    start = time.perf_counter()
    if job.push_to_hub and not job.dry_run and hub_token is None:
        raise ConfigError("push_to_hub: no Hub token was given to the job")
    if job.dry_run and job.run.actor_memory_gib is not None:
        return _dry_run_without_actors(job, cache_dir=cache_dir)
    runtime = choose_runtime(job.run)
    counted = _check_actor_count(job)

    def timed_prepare() -> tuple[PreparedJob, float]:
        t = time.perf_counter()
        return prepare_job(job, cache_dir=cache_dir), time.perf_counter() - t

    pool = ThreadPoolExecutor(1, thread_name_prefix="wq-prepare")
    preparing = pool.submit(timed_prepare)
    try:
        return _run_prepared(job, runtime, preparing, start=start, command=command, hub_token=hub_token,
                             wait_for_prepare=not counted, reporter=progress or LogReporter())
    finally:
        pool.shutdown(wait=True)
        if not preparing.cancelled() and preparing.exception() is None:
            lease = preparing.result()[0].lease
            if lease is not None:
                lease.release()


def _dry_run_result(prepared: PreparedJob, plan: JobPlan) -> JobResult:
    try:
        disk = check_room(prepared.artifact, plan.artifact_bytes_estimate)
    except WqError as e:
        disk = f"does not fit: {e}"
    return JobResult(out_dir=Path(prepared.job.out), plan=plan, report=None, index_path=None,
                     calibration=prepared.calibration, disk=disk)


def _dry_run_without_actors(job: JobConfig, *, cache_dir: Path) -> JobResult:
    """--dry-run with --actor-memory-gib: the plan for the machines the flags name (--actors, --expert-actors,
    --gpus-per-actor, --actor-memory-gib) with no runtime and no actor started, as nothing need be measured:
    a job planned for a cluster that is not at hand (with a checkpoint's config.json and index alone)."""
    prepared = prepare_job(job, cache_dir=cache_dir)
    assert job.run.actor_memory_gib is not None
    return _dry_run_result(prepared, _plan(prepared, int(job.run.actor_memory_gib * GIB)))


def _plan(prepared: PreparedJob, capacity: int) -> JobPlan:
    return make_plan(prepared.layout, prepared.checkpoint, prepared.job, capacity_bytes=capacity,
                     eval_windows=0 if prepared.eval_ids is None else len(prepared.eval_ids))


def _run_with_restarts_(prepared: PreparedJob, plan: JobPlan, runtime: ActorRuntime, actors: list[ActorHandle],
                        reporter: ProgressReporter) -> tuple[_ActorsDone, list[dict[str, Any]]]:
    """Run the plan; where an actor is lost, end the actors, start a new set (anywhere with room), plan for
    them and run again: they resume from the staged blocks. `actors` is updated in place, so that the caller
    stops the live set whatever happens. Returns what the actors gave back and the restarts, for the report."""
    job = prepared.job
    restarts: list[dict[str, Any]] = []
    while True:
        try:
            return _run_actors(prepared, plan, runtime, actors, reporter), restarts
        except Exception as e:
            if not runtime.actor_lost(e):
                raise
            cause = " ".join(str(e).split())[:300]
            if len(restarts) >= job.run.max_actor_restarts:
                raise ActorLostError(
                    f"an actor was lost ({cause}) after {len(restarts)} restart(s), the most "
                    f"--max-actor-restarts allows; the staged blocks are kept: rerun the job to resume") from None
            restarts.append({"restart": len(restarts) + 1, "restarted_at": round(time.time(), 3), "cause": cause})
            log.warning("an actor was lost (%s); restart %d of at most %d: new actors resume from the staged "
                        "blocks", cause, len(restarts), job.run.max_actor_restarts)
            runtime.stop_actors(actors)
            actors.clear()
            actors.extend(runtime.start_actors(job))
            capacity, _ = _actor_capacity(job, runtime, actors, created_at=time.time())
            plan = _plan(prepared, capacity)
            check_fits(plan)       # the new actors may have landed on other nodes


def _run_prepared(job: JobConfig, runtime: ActorRuntime, preparing: Future[tuple[PreparedJob, float]], *,
                  start: float, command: str, hub_token: str | None, wait_for_prepare: bool,
                  reporter: ProgressReporter) -> JobResult:
    """run_job once the preparation is under way: the runtime and actors, the plan, the actors' work, the
    artifact and its push. wait_for_prepare: start the actors only once the preparation has checked the job
    (the block count was not at hand: no actor spawned for a job that cannot use it)."""
    actors: list[ActorHandle] = []
    try:
        runtime.start(job)
        runtime_s = time.perf_counter() - start
        if wait_for_prepare:
            preparing.result()
        created_at = time.time()
        actors = runtime.start_actors(job)
        prepared, prepare_s = preparing.result()
        if job.push_to_hub and not job.dry_run:
            assert hub_token is not None
            check_push_access(job.push_to_hub, token=hub_token)   # 401/403 now, not after hours of work
        capacity, startup = _actor_capacity(job, runtime, actors, created_at=created_at)
        plan = _plan(prepared, capacity)
        ready_s = time.perf_counter() - start
        log.info("ready to start in %.1f s (%s runtime %.1f s; checkpoint, options and calibration data "
                 "%.1f s, meanwhile)", ready_s, runtime.name, runtime_s, prepare_s)
        if job.dry_run:
            return _dry_run_result(prepared, plan)
        log.info("%s", plan.describe())
        check_fits(plan)
        log.info("%s", check_room(prepared.artifact, plan.artifact_bytes_estimate))
        finished, restarts = _run_with_restarts_(prepared, plan, runtime, actors, reporter)
        for split, seconds in zip(startup, finished.warm_ups):
            split["warmup_s"] = seconds
    finally:
        runtime.stop(actors)
    assert prepared.lease is not None
    prepared.lease.check()               # another job took --out over: write nothing
    report, index = write_artifact(prepared, plan, finished.records, wall_seconds=time.perf_counter() - start,
                                   command=command,
                                   startup={"runtime": runtime.name, "ready_s": round(ready_s, 3),
                                            "runtime_start_s": round(runtime_s, 3),
                                            "prepare_s": round(prepare_s, 3), "actors": startup},
                                   handoffs=finished.handoffs, memory=finished.memory, restarts=restarts,
                                   evaluation=finished.evaluation)
    result = JobResult(out_dir=Path(job.out), plan=plan, report=report, index_path=index,
                       calibration=prepared.calibration)
    if job.push_to_hub:
        assert hub_token is not None
        spec = job.quant.spec
        what = job.quant.scheme.value if spec is not None and spec.group_size_fixed and job.quant.scheme else \
            f"w{job.quant.bits}a16"
        message = redact(job.commit_message or f"wq: {job.quant.method.value} {what} of "
                                               f"{job.model or 'the bundled tiny model'}")
        pushed = push_artifact(result.out_dir, job.push_to_hub, revision=job.push_revision, private=job.private,
                               commit_message=message, token=hub_token)
        log.info("pushed %s to %s: %s", result.out_dir, job.push_to_hub, pushed)
    return result
