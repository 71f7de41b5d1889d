"""The artifact's README.md: a short model card saying what was quantized, how, and how well."""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["render_model_card"]


def render_model_card(report: Mapping[str, Any], *, command: str) -> str:
    job, source, totals = report["job"], report["source"], report["totals"]
    group = job.get("group_size") or "per-channel"
    worst = totals.get("worst_layer") or {}
    base = source.get("repo_id") or source.get("model")
    lines = [
        "---",
        f"base_model: {base}" if source.get("repo_id") else "tags: [wq]",
        "library_name: transformers",
        f"tags: [wq, {job.get('format')}, {job.get('method')}, w{job.get('bits')}a16]",
        "---",
        "",
        f"# {source.get('model')} - {str(job.get('method')).upper()} W{job.get('bits')}A16",
        "",
        f"Weight-only {job.get('bits')}-bit quantization of `{base}`"
        + (f" (revision `{source.get('revision')}`)" if source.get("revision") else "")
        + f", made with wq {report.get('wq_version')}.",
        "",
        "| | |",
        "| --- | --- |",
        f"| method | {job.get('method')} ({'symmetric' if job.get('sym') else 'asymmetric'}, "
        f"act-order {'on, static groups' if job.get('act_order') else 'off'}) |",
        f"| bits / group size | {job.get('bits')} / {group} |",
        f"| format | {job.get('format')} (pack-quantized) |" if job.get("format") == "compressed-tensors"
        else f"| format | {job.get('format')} |",
        f"| calibration | {job.get('samples')} samples x {job.get('seq_len')} tokens from "
        f"{job.get('calib') or 'the public-domain text bundled with wq'} (seed {job.get('seed')}) |",
        f"| layers | {totals['layers_quantized']} quantized, {totals['layers_kept']} kept in "
        f"{source.get('dtype')} (embeddings, norms and lm_head are never quantized) |",
        f"| mean relative output error | {totals['mean_output_error']:.3e} (geometric mean "
        f"{totals['geomean_output_error']:.3e}) |",
        f"| worst layer | `{worst.get('name')}` ({worst.get('output_error', 0.0):.3e}) |",
        f"| wall time | {totals['wall_seconds']:.1f} s |",
        *_compatibility_rows(report.get("compatibility")),
        "",
        "Per-layer errors, timings and activation-outlier statistics are in `wq_report.json`;",
        "`wq_report.html` shows them as heatmaps.",
        "",
        "Made with:",
        "",
        "```",
        command or "(library call)",
        "```",
        "",
        "Load with `transformers` (with `compressed-tensors` installed) or serve with vLLM."
        if job.get("format") == "compressed-tensors" else
        "Serve with vLLM (`--dtype float16`), or load with `transformers` plus `optimum` and `gptqmodel`.",
        "",
    ]
    return "\n".join(lines)


def _compatibility_rows(compat: Mapping[str, Any] | None) -> list[str]:
    """The vLLM tensor-parallel sizes the artifact loads with, from the report's compatibility section."""
    if not compat:
        return []
    checks = compat.get("tensor_parallel", [])
    ok = [str(c["tp"]) for c in checks if c.get("ok")]
    fallback = [str(c["tp"]) for c in checks if c.get("loadable") and not c.get("ok")]
    no = [str(c["tp"]) for c in checks if not c.get("loadable")]
    return [f"| vLLM tensor parallel | loads at {', '.join(ok) or 'none'} with the default kernels"
            + (f"; at {', '.join(fallback)} with a fallback kernel" if fallback else "")
            + (f"; not at {', '.join(no)}" if no else "") + " (details: wq_report.json, compatibility) |"] + (
        [f"| Padding | {compat['padding_applied']['description']} |"] if compat.get("padding_applied") else [])
