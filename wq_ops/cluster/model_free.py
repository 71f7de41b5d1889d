"""The model-free job (`--model-free`): any safetensors checkpoint, shard by shard, with no model class and no
calibration. The driver reads the shards' headers, states the plan (tensors quantized and kept, the artifact's
size, each worker's memory) and refuses what cannot fit, then runs one task per source shard: Ray tasks spread
over the cluster's nodes (`--actors` at once on a local Ray), or in this process for one worker. Each task
stages its own output shard (`shard_quant.run_shard`); a rerun of the same job skips the shards already
staged. config.json, the report and the index are written last (`finalize_artifact`). Entry point:
`run_model_free`."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from wq_ops.cluster.shard_plan import GIB, ShardPlan, check_largest_node, check_memory, plan_model_free
from wq_ops.cluster.shard_quant import (
    BNB_DOUBLE_QUANT,
    ShardDone,
    ShardTask,
    read_done,
    run_shard,
)
from wq_ops.config import Format, JobConfig, Scheme
from wq_ops.config.enums import Runtime
from wq_ops.errors import CheckpointError, ConfigError, WqError
from wq_ops.formats import bitsandbytes, quantization_config
from wq_ops.formats.compressed_tensors import format_name
from wq_ops.formats.tensor_rules import ignored_linears
from wq_ops.io.artifact import (
    check_output_apart,
    check_output_dir,
    check_room,
    finalize_artifact,
    remove_leftovers,
    restore_set_aside,
)
from wq_ops.io.checkpoint import Checkpoint, open_checkpoint, read_config, source_identity
from wq_ops.io.fp8_source import fp8_block_size
from wq_ops.io.hub_push import check_push_access, push_artifact
from wq_ops.io.lease import OutputLease
from wq_ops.io.mxfp4_source import mxfp4_modules_to_not_convert
from wq_ops.io.redact import redact, redact_values
from wq_ops.quant.bnb4 import Bnb4Type
from wq_ops.report.model_card import render_model_card
from wq_ops.report.summary import library_versions

__all__ = ["ModelFreeResult", "run_model_free"]

log = logging.getLogger(__name__)
@dataclass(frozen=True)
class ModelFreeResult:
    out_dir: Path
    plan: ShardPlan
    report: dict[str, Any] | None        # None after a dry run
    disk: str


def _open(job: JobConfig, cache_dir: Path) -> tuple[Checkpoint, dict[str, Any], bool]:
    """The checkpoint, its config.json, and whether it stores experts in MXFP4 (read dequantized)."""
    assert job.model is not None
    checkpoint = open_checkpoint(job.model, revision=job.revision, cache_dir=str(cache_dir / "hub"))
    check_output_apart(Path(job.out), checkpoint.source_root)
    checkpoint.side_files()              # refuse a side file linked from outside before any work
    config = read_config(checkpoint.local_dir / "config.json")
    try:
        if mxfp4_modules_to_not_convert(config) is not None:
            return checkpoint, config, True
        block = fp8_block_size(config)
    except CheckpointError as e:
        raise CheckpointError(f"{checkpoint.source}: {e}") from None
    if block is not None:                # read dequantized, in the dtype the model computes in
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").replace("torch.", "")
        checkpoint = replace(checkpoint, fp8_block=block, dequantized_dtype=dtype)
    return checkpoint, config, False


def _fingerprint(job: JobConfig, checkpoint: Checkpoint) -> str:
    """Same source files and options => same fingerprint; where the job runs does not enter."""
    h = hashlib.sha256()
    h.update(json.dumps(job.fingerprint_options(), sort_keys=True).encode())
    h.update(source_identity(checkpoint))
    import wq_ops

    h.update(wq_ops.__version__.encode())
    return h.hexdigest()[:16]


def run_model_free(job: JobConfig, *, cache_dir: Path, command: str = "",
                   hub_token: str | None = None) -> ModelFreeResult:
    """Quantize `job.model` shard by shard into `job.out` (module docstring), and push it to the Hub where the
    job says so (hub_token: checked for write access before any work)."""
    start = time.perf_counter()
    if job.push_to_hub and not job.dry_run:
        if hub_token is None:
            raise ConfigError("push_to_hub: no Hub token was given to the job")
        check_push_access(job.push_to_hub, token=hub_token)
    restore_set_aside(Path(job.out))
    checkpoint, config, mxfp4 = _open(job, cache_dir)
    check_output_dir(Path(job.out), overwrite=job.overwrite)
    fingerprint = _fingerprint(job, checkpoint)
    plan = plan_model_free(job, checkpoint, fingerprint, mxfp4=mxfp4)
    if job.dry_run:
        try:
            disk = check_room(plan.layout, plan.artifact_bytes)
        except WqError as e:
            disk = f"does not fit: {e}"
        return ModelFreeResult(out_dir=Path(job.out), plan=plan, report=None, disk=disk)
    log.info("%s", plan.describe())
    check_memory(plan, job)
    disk = check_room(plan.layout, plan.artifact_bytes)
    lease = OutputLease.acquire(Path(job.out))
    try:
        remove_leftovers(Path(job.out))
        plan.layout.staging.mkdir(parents=True, exist_ok=True)
        done, resumed = _run_tasks(job, checkpoint, plan, start, mxfp4=plan.mxfp4)
        lease.check()                    # another job took --out over: write nothing
        report = _finish(job, checkpoint, config, plan, done, resumed=resumed,
                         wall_seconds=time.perf_counter() - start, command=command)
    finally:
        lease.release()
    if job.push_to_hub:
        assert hub_token is not None
        message = redact(job.commit_message or f"wq: model-free {plan.scheme} of {job.model}")
        pushed = push_artifact(Path(job.out), job.push_to_hub, revision=job.push_revision, private=job.private,
                               commit_message=message, token=hub_token)
        log.info("pushed %s to %s: %s", job.out, job.push_to_hub, pushed)
    return ModelFreeResult(out_dir=Path(job.out), plan=plan, report=report, disk=disk)


def _tasks(job: JobConfig, checkpoint: Checkpoint, plan: ShardPlan, mxfp4: bool) -> list[ShardTask]:
    """One task per source shard. fail_after_blocks=N (a testing hook) makes shard N's task die once."""
    device = "cuda" if job.run.gpus_per_actor > 0 else "cpu"
    layout = plan.layout
    crash = "raise" if _in_process(job) else "exit"
    return [ShardTask(checkpoint=checkpoint, source_shard=shard, position=i, staged=str(layout.staged_shard(i)),
                      record=str(layout.staged_record(i)), quant=job.quant, fingerprint=layout.fingerprint,
                      mxfp4=mxfp4, device=device, threads=job.run.cpus_per_actor,
                      crash=crash if job.fail_after_blocks == i else None,
                      crash_marker=str(layout.staging / f".crashed-{i}"))
            for i, shard in enumerate(layout.source_shards)]


def _in_process(job: JobConfig) -> bool:
    """One worker and no cluster: the tasks run in the driver's process, one after another (no Ray start-up)."""
    return job.run.actors == 1 and job.run.address is None and job.run.runtime is not Runtime.RAY


def _run_tasks(job: JobConfig, checkpoint: Checkpoint, plan: ShardPlan, start: float, *,
               mxfp4: bool) -> tuple[list[ShardDone], int]:
    """Every shard's record, in order (those an earlier run of this job staged, and the rest computed now), and
    how many were staged before."""
    todo: list[ShardTask] = []
    done: list[ShardDone] = []
    for task in _tasks(job, checkpoint, plan, mxfp4):
        finished = read_done(Path(task.record))
        if finished is None:
            todo.append(task)
        else:
            done.append(finished)
    resumed = len(done)
    if resumed:
        log.info("resuming: %d of %d shard(s) were staged by an earlier run of this job", resumed,
                 len(plan.layout.source_shards))
    total = len(plan.layout.source_shards)
    for record in _computed(job, todo, plan):
        done.append(record)
        elapsed = time.perf_counter() - start
        computed = len(done) - resumed
        eta = elapsed / computed * (total - len(done)) if computed else None
        quantized = [t for t in record.tensors if t.weight_error is not None]
        log.info("shard=%d done=%d/%d tensors_quantized=%d seconds=%.2f host=%s elapsed_s=%.1f eta_s=%s",
                 record.position, len(done), total, len(quantized), record.seconds, record.host, elapsed,
                 "?" if eta is None else f"{eta:.1f}")
    return sorted(done, key=lambda r: r.position), resumed


def _computed(job: JobConfig, tasks: list[ShardTask], plan: ShardPlan) -> Iterator[ShardDone]:
    """Each task's record as it finishes: in this process for one worker on no cluster, else as Ray tasks."""
    if not tasks:
        return
    if _in_process(job):
        for task in tasks:
            yield run_shard(task)
        return
    import ray

    from wq_ops.cluster.ray_runtime import RayRuntime

    runtime = RayRuntime()
    runtime.start(job)
    try:
        check_largest_node(plan)
        # The memory each task asks for: Ray then runs no more of them on a node than its memory holds.
        remote: Any = ray.remote(run_shard).options(
            num_cpus=job.run.cpus_per_actor, num_gpus=job.run.gpus_per_actor, memory=plan.worker_bytes,
            max_retries=job.run.max_actor_restarts, scheduling_strategy="SPREAD")
        pending = [remote.remote(task) for task in tasks]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])
    finally:
        runtime.stop([])


def _quantization_config(job: JobConfig, source_config: dict[str, Any], ignore: list[str]) -> dict[str, Any]:
    if job.format is not Format.BITSANDBYTES:
        return quantization_config(job.format, job.quant, ignore=ignore)
    import torch

    dtype = getattr(torch, str(source_config.get("torch_dtype") or source_config.get("dtype") or "bfloat16")
                    .replace("torch.", ""))
    kind = Bnb4Type.NF4 if job.quant.scheme is Scheme.BNB_NF4 else Bnb4Type.FP4
    return bitsandbytes.quantization_config(quant_type=kind, double_quant=BNB_DOUBLE_QUANT, compute_dtype=dtype,
                                            skip_modules=ignore)


def _finish(job: JobConfig, checkpoint: Checkpoint, source_config: dict[str, Any], plan: ShardPlan,
            done: list[ShardDone], *, resumed: int, wall_seconds: float, command: str) -> dict[str, Any]:
    """config.json (the source's, its quantization_config replaced), the tokenizer files, the report, then the
    index last."""
    layout = plan.layout
    weight_map = {name: layout.shard_name(r.position) for r in done for name in r.tensor_names}
    config = dict(source_config)
    config.pop("quantization_config", None)
    config["quantization_config"] = _quantization_config(job, source_config, ignored_linears(plan.roles))
    tensors = [t for r in done for t in r.tensors]
    quantized = [t for t in tensors if t.weight_error is not None]
    errors = [t.weight_error for t in quantized if t.weight_error is not None]
    worst = max(quantized, key=lambda t: t.weight_error or 0.0, default=None)
    report: dict[str, Any] = {
        "model_free": True,
        "wq_version": library_versions().get("wq"),
        "created_at": round(time.time(), 3),
        "command": redact(command),
        "job": redact_values(job.to_dict()),
        "source": {"model": job.model, "repo_id": checkpoint.repo_id, "revision": checkpoint.revision,
                   "architectures": source_config.get("architectures"),
                   "dtype": str(source_config.get("torch_dtype") or source_config.get("dtype") or "bfloat16"),
                   "fp8_block": list(checkpoint.fp8_block) if checkpoint.fp8_block else None,
                   "mxfp4": plan.mxfp4,
                   "tensor_bytes": plan.source_bytes},
        "versions": library_versions(),
        "plan": {"workers": plan.workers, "worker_bytes_estimate": plan.worker_bytes,
                 "artifact_bytes_estimate": plan.artifact_bytes},
        "totals": {"wall_seconds": round(wall_seconds, 3), "shards": len(done),
                   "shards_resumed": resumed,
                   "tensors_quantized": len(quantized), "tensors_kept": len(tensors) - len(quantized),
                   "mean_weight_error": sum(errors) / len(errors) if errors else 0.0,
                   "worst_tensor": {"name": worst.name, "weight_error": worst.weight_error} if worst else None,
                   "artifact_tensor_bytes": sum(r.nbytes for r in done)},
        "compatibility": {"loader": {"checkpoint_format": format_name(job.quant) if job.format is
                                     Format.COMPRESSED_TENSORS else job.format.value}},
        "shards": [{"position": r.position, "source": r.source_shard, "artifact": layout.shard_name(r.position),
                    "seconds": round(r.seconds, 3), "host": r.host, "nbytes": r.nbytes,
                    "rerun_after_crash": r.rerun_after_crash} for r in done],
        "tensors": [{"name": t.name, "shape": t.shape, "role": t.role, "reason": t.reason,
                     "weight_error": t.weight_error, "seconds": round(t.seconds, 4)} for t in tensors],
    }
    files: dict[str, bytes] = {"config.json": (json.dumps(config, indent=2) + "\n").encode()}
    for name, src in checkpoint.side_files().items():
        files[name] = src.read_bytes()
    files["wq_report.json"] = (json.dumps(report, indent=1) + "\n").encode()
    files["README.md"] = render_model_card(report, command=redact(command)).encode()
    finalize_artifact(layout, shards={Path(r.staged): layout.shard_name(r.position) for r in done},
                      weight_map=weight_map, total_size=sum(r.nbytes for r in done), files=files)
    log.info("wrote %s (%d shards, %.2f GiB) in %.1f s", job.out, len(done),
             report["totals"]["artifact_tensor_bytes"] / GIB,
             wall_seconds)
    return report
