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
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from wq_ops.bundled.tiny_model import ensure_tiny_checkpoint
from wq_ops.calib.data import calibration_tokens
from wq_ops.config import JobConfig
from wq_ops.dist.actor import ActorSpec, BlockActor, ShardRecord
from wq_ops.dist.block_quantizer import is_ignored
from wq_ops.dist.plan import GIB, JobPlan, check_fits, make_plan
from wq_ops.errors import CheckpointError, ConfigError, ResourceError, WqError
from wq_ops.formats import format_module, quantization_config
from wq_ops.io.artifact import ArtifactLayout, check_output_dir, finalize_artifact
from wq_ops.io.checkpoint import TOKENIZER_FILES, Checkpoint, open_checkpoint
from wq_ops.model.architecture import SUPPORTED_ARCHITECTURES, ModelLayout, describe_model
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


def _fingerprint(job: JobConfig, checkpoint: Checkpoint, token_ids: torch.Tensor) -> str:
    """Names the staging folder: same model revision, quantization settings and calibration tokens =>
    same fingerprint. Where the job runs (actors, address) does not enter: results do not depend on it."""
    h = hashlib.sha256()
    quant = {k: v for k, v in job.to_dict().items()
             if k not in ("out", "overwrite", "dry_run", "actors", "address", "fail_after_blocks", "cpus_per_actor",
                          "gpus_per_actor", "actor_memory_gib", "micro_batch_samples", "calib", "samples", "seq_len",
                          "seed", "text_column")}
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
    from transformers import AutoConfig, AutoTokenizer

    format_module(job.format)
    model = job.model or str(ensure_tiny_checkpoint(cache_dir / "models"))
    checkpoint = open_checkpoint(model, revision=job.revision, cache_dir=str(cache_dir / "hub") if job.model else None)
    source_config = json.loads((checkpoint.local_dir / "config.json").read_text())
    if source_config.get("quantization_config"):
        raise CheckpointError(f"{checkpoint.source}: already quantized "
                              f"({source_config['quantization_config'].get('quant_method')}); give the original weights")
    architectures = source_config.get("architectures") or [f"<none; model_type={source_config.get('model_type')}>"]
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"unsupported architecture {architectures[0]}: wq quantizes dense "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)} checkpoints")
    try:
        hf_config = AutoConfig.from_pretrained(checkpoint.local_dir, trust_remote_code=job.trust_remote_code)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{checkpoint.local_dir / 'config.json'}: transformers cannot read it ({e})") from None
    layout = describe_model(hf_config, trust_remote_code=job.trust_remote_code)
    missing = [layout.block_tensor_name(i, n) for i in range(layout.n_blocks) for n in layout.block_params
               if layout.block_tensor_name(i, n) not in checkpoint.weight_map]
    missing += [n for n in layout.outer_params if n not in checkpoint.weight_map]
    if missing:
        raise CheckpointError(f"{checkpoint.source}: the index lacks {len(missing)} tensor(s) the model needs, "
                              f"e.g. {missing[0]}")
    _check_quant_fits_layout(job, layout)
    if job.calib.seq_len > int(getattr(hf_config, "max_position_embeddings", job.calib.seq_len)):
        raise ConfigError(f"seq_len={job.calib.seq_len}: longer than the model's max_position_embeddings="
                          f"{hf_config.max_position_embeddings}")
    check_output_dir(Path(job.out), overwrite=job.overwrite)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.local_dir, trust_remote_code=job.trust_remote_code)
    ids = calibration_tokens(job.calib.source, tokenizer, n_samples=job.calib.n_samples, seq_len=job.calib.seq_len,
                             seed=job.calib.seed, text_column=job.calib.text_column)
    if int(ids.max()) >= layout.vocab_size:
        raise ConfigError(f"the tokenizer produced id {int(ids.max())} but the model's vocabulary has {layout.vocab_size}")
    artifact = ArtifactLayout(out_dir=Path(job.out), n_blocks=layout.n_blocks,
                              fingerprint=_fingerprint(job, checkpoint, ids))
    return PreparedJob(job=job, checkpoint=checkpoint, hf_config=hf_config, layout=layout, token_ids=ids,
                       artifact=artifact, source_config=source_config)


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gpu_memory_bytes() -> int:
    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


def _ensure_ray(job: JobConfig) -> bool:
    """Connect to the cluster at `address`, or start a local Ray. Returns whether we started it."""
    import ray

    if ray.is_initialized():
        return False
    run = job.run
    if run.address:
        ray.init(address=run.address, logging_level=logging.WARNING)
    else:
        # Enough logical CPUs for every actor: a local job's actors take turns in the sequential scheme.
        cpus = max(os.cpu_count() or 1, run.actors * run.cpus_per_actor)
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    return True


def _actor_capacity(job: JobConfig) -> int:
    """Bytes each actor may plan with: --actor-memory-gib, else the GPU's memory, else host RAM / actors."""
    import ray

    run = job.run
    if run.actor_memory_gib is not None:
        return int(run.actor_memory_gib * GIB)
    resources = ray.cluster_resources()
    if run.gpus_per_actor > 0:
        need = run.actors * run.gpus_per_actor
        if resources.get("GPU", 0) < need:
            raise ResourceError(f"{run.actors} actors x {run.gpus_per_actor} GPU need {need:g} GPUs; the Ray "
                                f"cluster has {resources.get('GPU', 0):g}")
        probe = ray.remote(num_gpus=run.gpus_per_actor, num_cpus=0)(_gpu_memory_bytes)
        return int(ray.get(probe.remote(), timeout=300))
    need_cpus = run.actors * run.cpus_per_actor
    if resources.get("CPU", 0) < need_cpus:
        raise ResourceError(f"{run.actors} actors x {run.cpus_per_actor} CPUs need {need_cpus}; the Ray cluster "
                            f"has {resources.get('CPU', 0):g}")
    if run.address:
        host = int(ray.get(ray.remote(num_cpus=0)(_host_memory_bytes).remote(), timeout=300))
    else:
        host = _host_memory_bytes()
    return host // run.actors


def _unwrap(error: Exception) -> Exception:
    """Ray wraps an actor's exception; give back our own error where it is one."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, WqError) else error


def _run_actors(prepared: PreparedJob, plan: JobPlan) -> list[ShardRecord]:
    import ray

    job, layout = prepared.job, prepared.layout
    remote_actor: Any = ray.remote(BlockActor)
    actors: list[Any] = [
        remote_actor.options(num_cpus=job.run.cpus_per_actor, num_gpus=job.run.gpus_per_actor, max_restarts=0).remote(
            ActorSpec(rank=a.rank, checkpoint=prepared.checkpoint, hf_config=prepared.hf_config, layout=layout,
                      job=job, artifact=prepared.artifact))
        for a in plan.actors
    ]
    # Actors are single-threaded, so each runs its calls in the order made here; activations pass from
    # one actor to the next as object refs, resolved by the receiving actor, never by the driver.
    outer = [actors[0].embed.remote(ray.put(prepared.token_ids))]
    spans = []
    handoff = None
    for actor, a in zip(actors, plan.actors):
        spans.append(actor.run_span.options(num_returns="streaming").remote(list(a.blocks), handoff))
        if a is not plan.actors[-1]:
            handoff = actor.emit_outputs.remote()
    outer.append(actors[-1].write_head.remote())

    records: list[ShardRecord] = []
    events: queue.Queue = queue.Queue()

    def follow(span: Any) -> None:
        try:
            for ref in span:
                events.put(ray.get(ref))
            events.put(None)
        except Exception as e:  # a task error or a dead actor: the main thread stops the job
            events.put(e)

    followers = [threading.Thread(target=follow, args=(span,), daemon=True) for span in spans]
    for f in followers:
        f.start()
    start = time.perf_counter()
    n_blocks, done, running = layout.n_blocks, 0, len(spans)
    try:
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
            log.info("block=%d done=%d/%d actor=%d seconds=%.2f mean_error=%.3e elapsed_s=%.1f eta_s=%.1f",
                     record.block, done, n_blocks, record.rank, sum(record.seconds.values()),
                     sum(errors) / max(len(errors), 1), elapsed, elapsed / done * (n_blocks - done))
        try:
            records.extend(ray.get(outer))
        except Exception as e:
            raise _unwrap(e) from None
    finally:
        for actor in actors:
            ray.kill(actor)
    return records


def run_job(job: JobConfig, *, cache_dir: Path, command: str = "") -> JobResult:
    """Quantize `job.model` into `job.out`. Raises a WqError subclass, naming the problem, for anything
    that can be checked before the work starts; writes nothing in `job.out` but staging until the end."""
    start = time.perf_counter()
    prepared = prepare_job(job, cache_dir=cache_dir)
    import ray

    started = _ensure_ray(job)
    try:
        plan = make_plan(prepared.layout, prepared.checkpoint, job, capacity_bytes=_actor_capacity(job))
        if job.dry_run:
            return JobResult(out_dir=Path(job.out), plan=plan, report=None, index_path=None)
        log.info("%s", plan.describe())
        check_fits(plan)
        records = _run_actors(prepared, plan)
    finally:
        if started:
            ray.shutdown()
    return _write_artifact(prepared, plan, records, wall_seconds=time.perf_counter() - start, command=command)


def _write_artifact(prepared: PreparedJob, plan: JobPlan, records: list[ShardRecord], *, wall_seconds: float,
                    command: str) -> JobResult:
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
    config["quantization_config"] = quantization_config(job.format, job.quant,
                                                        ignore=ignore + list(layout.outer_linears))
    source = {"model": job.model or "wq bundled tiny model", "repo_id": prepared.checkpoint.repo_id,
              "revision": prepared.checkpoint.revision, "architecture": layout.architecture,
              "n_blocks": layout.n_blocks, "dtype": str(layout.dtype).replace("torch.", "")}
    report = build_report(job=job.to_dict(), source=source, plan={"actors": [asdict(a) for a in plan.actors],
                                                                 "device_kind": plan.device_kind},
                          records=[asdict(r) for r in records], shard_names=shard_of, wall_seconds=wall_seconds,
                          versions=library_versions())
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

