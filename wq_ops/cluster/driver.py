"""The driver: check everything that can be checked, plan, start the actors, follow their progress,
and write the artifact's metadata and index last.

It reads only config.json, the safetensors index and shard headers, and the tokenizer; it sends actors
descriptors and object refs, never weights, and receives shard records, never tensors.
Entry point: `run_job(job, cache_dir=..., command=...)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from wq_ops.bundled.tiny_model import ensure_tiny_checkpoint
from wq_ops.calib.data import calibration_tokens
from wq_ops.cluster.actor import ActorSpec, ShardRecord
from wq_ops.cluster.plan import GIB, JobPlan, check_fits, make_plan
from wq_ops.cluster.runtime import ActorRuntime, choose_runtime
from wq_ops.config import JobConfig, Modeling, Propagation, TpPolicy
from wq_ops.errors import CheckpointError, ConfigError, WqError
from wq_ops.formats import format_module, quantization_config
from wq_ops.formats.block_tensors import is_ignored
from wq_ops.formats.tp_compat import DEFAULT_TP_SIZES, CompatReport, attention_shape, check_tp_sizes, padding_for_sizes
from wq_ops.io.artifact import ArtifactLayout, check_output_dir, finalize_artifact
from wq_ops.io.checkpoint import TOKENIZER_FILES, Checkpoint, open_checkpoint
from wq_ops.io.hub_push import check_push_access, push_artifact
from wq_ops.model.architecture import (
    SUPPORTED_ARCHITECTURES,
    ModelLayout,
    describe_model,
    import_transformers,
    transformers_import_lock,
)
from wq_ops.model.native_llama import NATIVE_ARCHITECTURES, NativeLlamaConfig, read_native_config
from wq_ops.report.html import render_html
from wq_ops.report.model_card import render_model_card
from wq_ops.report.summary import build_report, library_versions

__all__ = ["JobResult", "run_job", "prepare_job"]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class JobResult:
    out_dir: Path
    plan: JobPlan
    report: dict[str, Any] | None        # None after a dry run
    index_path: Path | None


@dataclass(frozen=True)
class PreparedJob:
    """Everything decided before any actor starts."""

    job: JobConfig
    checkpoint: Checkpoint
    hf_config: Any
    layout: ModelLayout
    token_ids: torch.Tensor
    artifact: ArtifactLayout
    source_config: dict[str, Any]
    compatibility: CompatReport


def _check_quant_fits_layout(job: JobConfig, layout: ModelLayout) -> None:
    """A group size must divide the input width of every layer it applies to: otherwise stop now and
    name the layers and the ways out; never change the scheme silently."""
    gs = job.quant.group_size
    if gs is None:
        return
    bad: dict[str, int] = {}
    for i in range(layout.n_blocks):
        for spec in layout.linears:
            full = layout.block_tensor_name(i, spec.name)
            if spec.in_features % gs and not is_ignored(full, job.quant.ignore):
                bad[spec.name] = spec.in_features
    if bad:
        widths = sorted(set(bad.values()))
        divisors = [g for g in (256, 128, 64, 32) if all(w % g == 0 for w in widths)]
        listed = ", ".join(f"{n} (in={w})" for n, w in bad.items())
        hint = f"--group-size {divisors[0]}" if divisors else "--group-size channel"
        pattern = f"'{layout.block_prefix}.*.{next(iter(bad))}'"
        raise ConfigError(
            f"group_size={gs} does not divide the input width of {len(bad)} linear layer(s) in every block: "
            f"{listed}. Use {hint} (divides every layer), --group-size channel, or keep those layers "
            f"unquantized with --ignore (e.g. --ignore {pattern})"
        )


def _fingerprint(job: JobConfig, checkpoint: Checkpoint, token_ids: torch.Tensor, *, padded_size: int | None,
                 modeling: str) -> str:
    """Names the staging folder: same model revision, quantization settings and calibration tokens =>
    same fingerprint. Where the job runs (actors, address) does not enter: results do not depend on it."""
    h = hashlib.sha256()
    quant = {k: v for k, v in job.to_dict().items()
             if k not in ("out", "overwrite", "dry_run", "actors", "address", "fail_after_blocks", "cpus_per_actor",
                          "gpus_per_actor", "actor_memory_gib", "micro_batch_samples", "calib", "samples", "seq_len",
                          "span_mode", "runtime",
                          "seed", "text_column", "tp_sizes", "push_to_hub", "push_revision", "private",
                          "commit_message", "tp_policy", "modeling")}
    quant["padded_intermediate_size"] = padded_size      # the only effect --tp-sizes/--tp-policy have on bytes
    quant["modeling"] = modeling                         # the classes that ran, not the option that chose them
    h.update(json.dumps(quant, sort_keys=True).encode())
    h.update(checkpoint.source.encode())
    if checkpoint.repo_id is None:
        for shard in checkpoint.shards:
            st = (checkpoint.local_dir / shard).stat()
            h.update(f"{shard}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps(sorted(checkpoint.weight_map.items())).encode())
    h.update(token_ids.numpy().tobytes())
    import wq_ops

    h.update(wq_ops.__version__.encode())
    return h.hexdigest()[:16]


def prepare_job(job: JobConfig, *, cache_dir: Path) -> PreparedJob:
    """Resolve the checkpoint, read its config, check the options against the model, tokenize the
    calibration data and check the output directory: every refusal that needs no cluster happens here."""
    format_module(job.format)
    if job.model:
        model = job.model
    else:
        with transformers_import_lock():     # its writer imports transformers, maybe beside the actor's import
            model = str(ensure_tiny_checkpoint(cache_dir / "models"))
    checkpoint = open_checkpoint(model, revision=job.revision, cache_dir=str(cache_dir / "hub") if job.model else None)
    source_config = json.loads((checkpoint.local_dir / "config.json").read_text())
    if source_config.get("quantization_config"):
        method = source_config["quantization_config"].get("quant_method")
        raise CheckpointError(f"{checkpoint.source}: already quantized ({method}); give the original weights")
    architectures = source_config.get("architectures") or [f"<none; model_type={source_config.get('model_type')}>"]
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"unsupported architecture {architectures[0]}: wq quantizes dense "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)} checkpoints")
    hf_config = _model_config(job, checkpoint.local_dir, source_config)
    layout = describe_model(hf_config, trust_remote_code=job.trust_remote_code)
    missing = [layout.block_tensor_name(i, n) for i in range(layout.n_blocks) for n in layout.block_params
               if layout.block_tensor_name(i, n) not in checkpoint.weight_map]
    missing += [n for n in layout.outer_params if n not in checkpoint.weight_map]
    if missing:
        raise CheckpointError(f"{checkpoint.source}: the index lacks {len(missing)} tensor(s) the model needs, "
                              f"e.g. {missing[0]}")
    _check_quant_fits_layout(job, layout)
    compatibility = _check_tensor_parallel(job, layout, hf_config)
    if job.calib.seq_len > int(getattr(hf_config, "max_position_embeddings", job.calib.seq_len)):
        raise ConfigError(f"seq_len={job.calib.seq_len}: longer than the model's max_position_embeddings="
                          f"{hf_config.max_position_embeddings}")
    check_output_dir(Path(job.out), overwrite=job.overwrite)

    def load_tokenizer() -> Any:
        with transformers_import_lock():     # from_pretrained imports the tokenizer's class lazily
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(checkpoint.local_dir, trust_remote_code=job.trust_remote_code)

    ids = calibration_tokens(job.calib.source, load_tokenizer, n_samples=job.calib.n_samples,
                             seq_len=job.calib.seq_len, seed=job.calib.seed, text_column=job.calib.text_column)
    if int(ids.max()) >= layout.vocab_size:
        raise ConfigError(f"the tokenizer produced id {int(ids.max())} but the model's vocabulary has "
                          f"{layout.vocab_size}")
    padded_size = None if compatibility.padding is None else compatibility.padding.padded_size
    artifact = ArtifactLayout(out_dir=Path(job.out), n_blocks=layout.n_blocks,
                              fingerprint=_fingerprint(job, checkpoint, ids, padded_size=padded_size,
                                                       modeling=_modeling_name(hf_config)))
    return PreparedJob(job=job, checkpoint=checkpoint, hf_config=hf_config, layout=layout, token_ids=ids,
                       artifact=artifact, source_config=source_config, compatibility=compatibility)


def _modeling_name(hf_config: Any) -> str:
    return "native" if isinstance(hf_config, NativeLlamaConfig) else "transformers"


def _model_config(job: JobConfig, local_dir: Path, source_config: dict[str, Any]) -> Any:
    """The config the job's model classes take: a NativeLlamaConfig where --modeling allows it and the
    native modules read the config, else transformers' (imported here)."""
    native, why = read_native_config(source_config)
    if job.modeling is Modeling.NATIVE and native is None:
        raise ConfigError(f"modeling=native: {why}; wq's native modules run {', '.join(NATIVE_ARCHITECTURES)} "
                          "only. Use --modeling auto or transformers")
    if native is not None and job.modeling is not Modeling.TRANSFORMERS:
        log.info("modeling: wq's native modules (%s)", native.architectures[0])
        return native
    log.info("modeling: transformers' classes (%s)", "--modeling transformers" if native is not None else why)
    import_transformers()
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(local_dir, trust_remote_code=job.trust_remote_code)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{local_dir / 'config.json'}: transformers cannot read it ({e})") from None


def _check_tensor_parallel(job: JobConfig, layout: ModelLayout, hf_config: Any) -> CompatReport:
    """Which vLLM tensor-parallel sizes can load the artifact. With --tp-sizes, a size that cannot is
    refused before any work (naming the layers and the padding that would fix it), or with
    --tp-policy pad, the MLP's intermediate size is zero-padded so that every requested size loads."""
    attention = attention_shape(hf_config)
    report = check_tp_sizes(layout, attention, job.quant, job.format, tp_sizes=job.tp_sizes or DEFAULT_TP_SIZES)
    if job.tp_sizes is None:
        return report
    bad = [c for c in report.checks if not c.loadable]
    if not bad and all(c.ok for c in report.checks):
        return report
    padding = padding_for_sizes(layout, attention, job.quant, job.format, tp_sizes=job.tp_sizes)
    if job.tp_policy is TpPolicy.PAD and padding is not None:
        log.info("tp_policy=pad: %s", padding.describe())
        report = check_tp_sizes(layout, attention, job.quant, job.format, tp_sizes=job.tp_sizes, padding=padding)
        bad = [c for c in report.checks if not c.loadable]
    if bad:
        lines = [f"tp={c.tp}: {'; '.join(c.layout_reasons)}" for c in bad]
        if job.tp_policy is TpPolicy.PAD or padding is None:
            fix = "Drop those sizes, or change --group-size / --bits."
        else:
            fix = f"Drop those sizes, change --group-size / --bits, or --tp-policy pad to {padding.describe()}."
        raise ConfigError("tp_sizes: vLLM cannot load this artifact at " + ", ".join(str(c.tp) for c in bad)
                          + ":\n  " + "\n  ".join(lines) + "\n" + fix)
    return report


def _actor_capacity(job: JobConfig, runtime: ActorRuntime, actors: list[Any], *,
                    created_at: float) -> tuple[int, list[dict[str, float | None]]]:
    """Bytes each actor may plan with: --actor-memory-gib, else the smallest the actors report (their
    GPU's memory, or their host's RAM / actors). Also each actor's start-up split, in seconds: process
    spawn and imports, CUDA context, kernels, transformers (logged, and kept for the report; a GPU actor's
    warm-up goes on after it is ready, and its time is added at the job's end)."""
    try:
        answers = runtime.get([a.capacity_bytes.remote(job.run.actors) for a in actors], timeout=600)
    except Exception as e:
        raise _unwrap(e) from None
    startup = [{"spawn_and_imports_s": round(marks["init_at"] - created_at, 3), "device_s": marks["device_s"],
                "kernels_s": marks["kernels_s"], "transformers_s": marks["transformers_s"],
                "ready_s": round(marks["ready_at"] - created_at, 3)}
               for _, marks in answers]
    for rank, split in enumerate(startup):
        log.info("actor=%d started: %s", rank, " ".join(f"{k}={v}" for k, v in split.items()))
    if job.run.actor_memory_gib is not None:
        return int(job.run.actor_memory_gib * GIB), startup
    return min(capacity for capacity, _ in answers), startup


def _unwrap(error: Exception) -> Exception:
    """Ray wraps an actor's exception; give back our own error where it is one."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, WqError) else error


def _run_spans(job: JobConfig, plan: JobPlan, actors: list[Any], specs: list[Any], spans: list[Any]) -> None:
    """One block resident at a time. Quantized propagation chains the actors: the next one needs this one's
    quantized outputs. Float propagation pipelines them span by span: each actor first pushes its span's
    float outputs on, then quantizes while the next actor already works."""
    handoff = None
    pipelined = job.run.propagation is Propagation.FLOAT
    for actor, spec, a in zip(actors, specs, plan.actors):
        last = a is plan.actors[-1]
        if pipelined and not last:
            forwarded = actor.forward_span.remote(spec, list(a.blocks), handoff)
            spans.append(actor.run_span.options(num_returns="streaming").remote(spec, list(a.blocks), None))
            handoff = forwarded
            continue
        spans.append(actor.run_span.options(num_returns="streaming").remote(spec, list(a.blocks), handoff))
        if not last:
            handoff = actor.emit_outputs.remote()


def _run_actors(prepared: PreparedJob, plan: JobPlan, runtime: ActorRuntime,
                actors: list[Any]) -> tuple[list[ShardRecord], list[dict], list[dict], list[float | None]]:
    """Run the plan; the staged shards' records, each actor's activation handoff times, each actor's
    planned and (on a GPU) measured peak memory, and its GPU warm-up's seconds (None on CPU)."""
    job, layout = prepared.job, prepared.layout
    pad = prepared.compatibility.padding.extra if prepared.compatibility.padding else 0
    specs = [runtime.put(ActorSpec(rank=a.rank, checkpoint=prepared.checkpoint, hf_config=prepared.hf_config,
                               layout=layout, job=job, artifact=prepared.artifact, pad_intermediate=pad,
                               stash_tails=a.stash_tails))
             for a in plan.actors]
    # Actors are single-threaded, so each runs its calls in the order made here; activations pass from
    # one actor to the next as object refs, resolved by the receiving actor, never by the driver.
    actors[-1].stage_head.remote(specs[-1])
    actors[0].embed.remote(specs[0], runtime.put(prepared.token_ids))
    spans: list[Any] = []
    forwards: list[Any] = []
    if plan.streamed:
        # Each micro-batch goes actor to actor through the resident spans (refs only: the receiving actor
        # resolves them), so actor k + 1 works on micro-batch m while actor k works on m + 1; then every
        # actor solves its span.
        n_micro = -(-len(prepared.token_ids) // job.run.micro_batch_samples)
        for actor, spec, a in zip(actors, specs, plan.actors):
            actor.open_span.remote(spec, list(a.blocks), n_micro)
        for m in range(n_micro):
            passed = None
            for actor, spec in zip(actors, specs):
                passed = actor.forward_microbatch.remote(spec, m, passed)
            # Only the last actor's results (None) are kept: a failure anywhere reaches them through the
            # chain, and the driver holds no ref to an activation, so none is pinned or fetched here.
            forwards.append(passed)
        spans = [actor.solve_span.options(num_returns="streaming").remote(spec) for actor, spec in zip(actors, specs)]
    else:
        _run_spans(job, plan, actors, specs, spans)
    outer = list({id(x): x for x in (actors[0], actors[-1])}.values())

    records: list[ShardRecord] = []
    events: queue.Queue = queue.Queue()

    def follow(span: Any) -> None:
        try:
            for ref in span:
                events.put(runtime.get(ref))
            events.put(None)
        except Exception as e:  # a task error or a dead actor: the main thread stops the job
            events.put(e)

    def watch(refs: list[Any]) -> None:
        """The streamed forwards carry no records, but a failure in one must stop the job with its cause."""
        try:
            runtime.get(refs)
            events.put(None)
        except Exception as e:
            events.put(e)

    followers = [threading.Thread(target=follow, args=(span,), daemon=True) for span in spans]
    if forwards:
        followers.append(threading.Thread(target=watch, args=(forwards,), daemon=True))
    for f in followers:
        f.start()
    start = time.perf_counter()
    n_blocks, done, resumed, running = layout.n_blocks, 0, 0, len(followers)
    per_actor = [0] * len(plan.actors)
    while running:
        event = events.get()
        if event is None:
            running -= 1
            continue
        if isinstance(event, Exception):
            raise _unwrap(event) from None
        record: ShardRecord = event
        records.append(record)
        done += 1
        elapsed = time.perf_counter() - start
        errors = [x["output_error"] for x in record.layers if x["quantized"]]
        per_actor[record.rank] += 1
        actor_progress = f"{per_actor[record.rank]}/{len(plan.actors[record.rank].blocks)}"
        if record.resumed:
            resumed += 1
            log.info("block=%d done=%d/%d actor=%d actor_done=%s resumed (staged by an earlier run of this job)",
                     record.block, done, n_blocks, record.rank, actor_progress)
            continue
        rate = (done - resumed) / elapsed if elapsed > 0 else 0.0
        log.info("block=%d done=%d/%d actor=%d actor_done=%s seconds=%.2f mean_error=%.3e elapsed_s=%.1f "
                 "blocks_per_min=%.1f eta_s=%.1f", record.block, done, n_blocks, record.rank, actor_progress,
                 sum(record.seconds.values()), sum(errors) / max(len(errors), 1), elapsed, 60 * rate,
                 (n_blocks - done) / rate if rate > 0 else 0.0)
    try:
        for staged in runtime.get([actor.outer_records.remote() for actor in outer]):
            records.extend(staged)
        handoffs = [{"rank": a.rank, **times} for a, times in
                    zip(plan.actors, runtime.get([actor.handoff_times.remote() for actor in actors]))]
        # What each actor's device really held at most, beside what the plan said it would need.
        peaks = runtime.get([actor.memory_peak.remote() for actor in actors])
        memory = [{"rank": a.rank, "planned_bytes": a.memory.total, **peak} for a, peak in zip(plan.actors, peaks)]
        warm_ups = runtime.get([actor.warm_up_seconds.remote() for actor in actors])
    except Exception as e:
        raise _unwrap(e) from None
    return records, handoffs, memory, warm_ups


def run_job(job: JobConfig, *, cache_dir: Path, command: str = "", hub_token: str | None = None) -> JobResult:
    """Quantize `job.model` into `job.out`. Raises a WqError subclass, naming the problem, for anything
    that can be checked before the work starts; writes nothing in `job.out` but staging until the end.

    Start-up runs in parallel: this thread starts the runtime (Ray, or none in-process) and the warm actors
    (process, CUDA context, kernels, library warm-up) while a helper thread reads the checkpoint's config and
    index and the calibration data."""
    start = time.perf_counter()
    if job.push_to_hub and not job.dry_run and hub_token is None:
        raise ConfigError("push_to_hub: no Hub token was given to the job")
    runtime = choose_runtime(job.run)

    def timed_prepare() -> tuple[PreparedJob, float]:
        t = time.perf_counter()
        return prepare_job(job, cache_dir=cache_dir), time.perf_counter() - t

    with ThreadPoolExecutor(1, thread_name_prefix="wq-prepare") as pool:
        preparing = pool.submit(timed_prepare)
        actors: list[Any] = []
        try:
            runtime.start(job)
            runtime_s = time.perf_counter() - start
            created_at = time.time()
            actors = runtime.start_actors(job)
            prepared, prepare_s = preparing.result()
            if job.push_to_hub and not job.dry_run:
                assert hub_token is not None
                check_push_access(job.push_to_hub, token=hub_token)   # 401/403 now, not after hours of work
            capacity, startup = _actor_capacity(job, runtime, actors, created_at=created_at)
            plan = make_plan(prepared.layout, prepared.checkpoint, job, capacity_bytes=capacity)
            ready_s = time.perf_counter() - start
            log.info("ready to start in %.1f s (%s runtime %.1f s; checkpoint, options and calibration data "
                     "%.1f s, meanwhile)", ready_s, runtime.name, runtime_s, prepare_s)
            if job.dry_run:
                return JobResult(out_dir=Path(job.out), plan=plan, report=None, index_path=None)
            log.info("%s", plan.describe())
            check_fits(plan)
            records, handoffs, memory, warm_ups = _run_actors(prepared, plan, runtime, actors)
            for split, seconds in zip(startup, warm_ups):
                split["warmup_s"] = seconds
        finally:
            runtime.stop(actors)
    result = _write_artifact(prepared, plan, records, wall_seconds=time.perf_counter() - start, command=command,
                             startup={"runtime": runtime.name, "ready_s": round(ready_s, 3),
                                      "runtime_start_s": round(runtime_s, 3),
                                      "prepare_s": round(prepare_s, 3), "actors": startup},
                             handoffs=handoffs, memory=memory)
    if job.push_to_hub:
        assert hub_token is not None
        pushed = push_artifact(result.out_dir, job.push_to_hub, revision=job.push_revision, private=job.private,
                               commit_message=job.commit_message or f"wq: {job.quant.method.value} "
                               f"w{job.quant.bits}a16 of {job.model or 'the bundled tiny model'}", token=hub_token)
        log.info("pushed %s to %s: %s", result.out_dir, job.push_to_hub, pushed)
    return result


def _write_artifact(prepared: PreparedJob, plan: JobPlan, records: list[ShardRecord], *, wall_seconds: float,
                    command: str, startup: dict[str, Any], handoffs: list[dict], memory: list[dict]) -> JobResult:
    job, layout, artifact = prepared.job, prepared.layout, prepared.artifact
    shard_of: dict[str, str] = {}
    for r in records:
        position = 0 if r.part == "embed" else layout.n_blocks + 1 if r.part == "head" else r.block + 1  # type: ignore[operator]
        shard_of[r.staged_path] = artifact.shard_name(position)
    weight_map = {name: shard_of[r.staged_path] for r in records for name in r.tensor_names}
    quantized_linears = {name.rsplit(".", 1)[0] for name in weight_map if name.endswith((".weight_packed", ".qweight"))}
    ignore = sorted({layout.block_tensor_name(i, s.name) for i in range(layout.n_blocks) for s in layout.linears}
                    - quantized_linears)
    config = dict(prepared.source_config)
    if prepared.compatibility.padding is not None:
        config["intermediate_size"] = prepared.compatibility.padding.padded_size
    config["quantization_config"] = quantization_config(job.format, job.quant,
                                                        ignore=ignore + list(layout.outer_linears))
    source = {"model": job.model or "wq bundled tiny model", "repo_id": prepared.checkpoint.repo_id,
              "revision": prepared.checkpoint.revision, "architecture": layout.architecture,
              "n_blocks": layout.n_blocks, "dtype": str(layout.dtype).replace("torch.", ""),
              "modeling": _modeling_name(prepared.hf_config)}
    report = build_report(job=job.to_dict(), source=source, plan={"actors": [asdict(a) for a in plan.actors],
                                                                 "device_kind": plan.device_kind},
                          records=[asdict(r) for r in records], shard_names=shard_of, wall_seconds=wall_seconds,
                          versions=library_versions())
    report["compatibility"] = prepared.compatibility.to_dict()
    report["startup"] = startup          # seconds until the plan, and each actor's warm-start split
    report["handoff"] = handoffs         # wall clock of each actor's inputs arriving and outputs leaving
    report["memory"] = memory            # each actor's planned bytes and, on a GPU, its device peaks
    files: dict[str, bytes] = {"config.json": (json.dumps(config, indent=2) + "\n").encode()}
    for name in TOKENIZER_FILES:
        src = prepared.checkpoint.local_dir / name
        if src.is_file():
            files[name] = src.read_bytes()
    files["wq_report.json"] = (json.dumps(report, indent=1) + "\n").encode()
    files["wq_report.html"] = render_html(report).encode()
    files["README.md"] = render_model_card(report, command=command).encode()
    index = finalize_artifact(artifact, shards={Path(p): n for p, n in shard_of.items()}, weight_map=weight_map,
                              total_size=sum(r.nbytes for r in records), files=files)
    log.info("wrote %s (%d shards, %.2f GiB) in %.1f s", job.out, len(shard_of),
             sum(r.nbytes for r in records) / GIB, wall_seconds)
    return JobResult(out_dir=Path(job.out), plan=plan, report=report, index_path=index)

