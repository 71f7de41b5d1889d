"""The job's end: the artifact's metadata (config.json with its quantization_config, tokenizer files, the
report, the model card) written beside the staged shards, and the index last (`finalize_artifact`): an
artifact is complete if and only if its index exists. Entry point: `write_artifact`."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from wq_ops.cluster.plan import GIB, JobPlan
from wq_ops.cluster.prepare import PreparedJob, modeling_name
from wq_ops.cluster.protocol import ShardRecord
from wq_ops.formats import quantization_config, quantized_modules, side_files
from wq_ops.io.artifact import finalize_artifact
from wq_ops.io.redact import redact, redact_values
from wq_ops.io.source_license import SourceLicense, source_license
from wq_ops.report.html import render_html
from wq_ops.report.model_card import render_model_card
from wq_ops.report.summary import build_report, library_versions

__all__ = ["write_artifact", "carried_modules"]

log = logging.getLogger(__name__)


def carried_modules(carried: tuple[str, ...]) -> list[str]:
    """The modules of carried tensors a loader could take for quantized linears (every weight but norms and
    embeddings): the config's ignore lists them, so they load as the float weights they are."""
    return sorted(n.removesuffix(".weight") for n in carried if n.endswith(".weight")
                  and not any(k in n.rsplit(".", 2)[-2] for k in ("norm", "embed")))


def write_artifact(prepared: PreparedJob, plan: JobPlan, records: list[ShardRecord], *, wall_seconds: float,
                   command: str, startup: dict[str, Any], handoffs: list[dict],
                   memory: list[dict], restarts: list[dict] | None = None,
                   evaluation: dict[str, Any] | None = None) -> tuple[dict[str, Any], Path]:
    """Write the artifact from the staged shards' records; returns the report and the index's path. startup,
    handoffs, memory: the report's sections of the same names; restarts: its `actor_restarts`; evaluation:
    its `eval` (--eval's perplexities; None: not evaluated)."""
    job, layout, artifact = prepared.job, prepared.layout, prepared.artifact
    shard_of: dict[str, str] = {}
    for r in records:
        position = 0 if r.part == "embed" else layout.n_blocks + 1 if r.part == "head" else r.block + 1  # type: ignore[operator]
        shard_of[r.staged_path] = artifact.shard_name(position)
    weight_map = {name: shard_of[r.staged_path] for r in records for name in r.tensor_names}
    quantized_linears = quantized_modules(job.format, job.quant, weight_map)
    ignore = sorted({layout.block_tensor_name(i, s.name) for i in range(layout.n_blocks)
                     for s in layout.block(i).linears} - quantized_linears)
    # Modules never quantized whatever the options (routers): a loader must not expect them packed.
    ignore += sorted(layout.block_tensor_name(i, k) for i in range(layout.n_blocks) for k in layout.block(i).kept)
    ignore += carried_modules(prepared.carried)
    config = dict(prepared.source_config)
    if prepared.compatibility.padding is not None:
        config["intermediate_size"] = prepared.compatibility.padding.padded_size
    ignored = ignore + list(layout.outer_linears)
    config["quantization_config"] = quantization_config(job.format, job.quant, ignore=ignored)
    source: dict[str, Any] = {"model": job.model or "wq bundled tiny model", "repo_id": prepared.checkpoint.repo_id,
              "revision": prepared.checkpoint.revision, "architecture": layout.architecture,
              "n_blocks": layout.n_blocks, "dtype": str(layout.dtype).replace("torch.", ""),
              "modeling": modeling_name(prepared.hf_config)}
    # The source's tensors in the model's dtype (an FP8 source: as read), beside the artifact's for the ratio.
    source["tensor_bytes"] = sum(layout.block_nbytes(i) for i in range(layout.n_blocks)) + layout.outer_nbytes()
    license_ = source_license(prepared.checkpoint)
    if license_ != SourceLicense():       # the model card carries it on: a quantized model keeps its base's terms
        source["license"] = {k: v for k, v in asdict(license_).items() if v is not None}
    if prepared.checkpoint.fp8_block is not None:     # read dequantized from FP8 with these block scales
        source["fp8_block"] = list(prepared.checkpoint.fp8_block)
    if prepared.checkpoint.fused_experts is not None:  # read per expert from fused (MXFP4: dequantized) tensors
        source["experts_stored"] = prepared.checkpoint.fused_experts.describe()
    report = build_report(job=redact_values(job.to_dict()), source=source,
                          plan={"actors": [asdict(a) for a in plan.actors], "device_kind": plan.device_kind},
                          records=[r.to_json() for r in records], shard_names=shard_of, wall_seconds=wall_seconds,
                          versions=library_versions())
    report["compatibility"] = prepared.compatibility.to_dict()
    report["startup"] = startup          # seconds until the plan, and each actor's warm-start split
    report["handoff"] = handoffs         # wall clock of each actor's inputs arriving and outputs leaving
    report["memory"] = memory            # each actor's planned bytes and, on a GPU, its device peaks
    report["source_not_written"] = list(prepared.not_written)   # source tensors the model does not read
    report["source_carried"] = list(prepared.carried)           # copied unquantized: layers past the blocks
    report["actor_restarts"] = list(restarts or [])             # actors lost and replaced during the job
    report["calibration"] = asdict(prepared.calibration) if prepared.calibration else None
    report["eval"] = evaluation          # --eval: perplexity of the artifact (and of its source), else None
    files: dict[str, bytes] = {"config.json": (json.dumps(config, indent=2) + "\n").encode()}
    for name, content in side_files(job.format, job.quant, ignore=ignored).items():
        files[name] = (json.dumps(content, indent=2) + "\n").encode()
    for name, src in prepared.checkpoint.side_files().items():
        files[name] = src.read_bytes()
    files["wq_report.json"] = (json.dumps(report, indent=1) + "\n").encode()
    files["wq_report.html"] = render_html(report).encode()
    files["README.md"] = render_model_card(report, command=redact(command)).encode()
    index = finalize_artifact(artifact, shards={Path(p): n for p, n in shard_of.items()}, weight_map=weight_map,
                              total_size=sum(r.nbytes for r in records), files=files)
    log.info("wrote %s (%d shards, %.2f GiB) in %.1f s", job.out, len(shard_of),
             sum(r.nbytes for r in records) / GIB, wall_seconds)
    return report, index
