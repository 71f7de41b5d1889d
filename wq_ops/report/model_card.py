"""The artifact's README.md: a model card saying what was quantized, how and how well, and how to run it.
Built with huggingface_hub's ModelCard and ModelCardData, so its metadata is what the Hub validates and
indexes: base_model with base_model_relation `quantized` (a Hub model), the source's license, tags once.
The table's method, grid and format lines are read back by the nightly scheduler (`schedule.hub`)."""

from __future__ import annotations

from typing import Any, Mapping

from wq_ops.config import BUNDLED_CALIB, Scheme
from wq_ops.config.schemes import SCHEMES, ActivationQuant, NumberType, SchemeSpec, WeightLayout
from wq_ops.report.verdict import ERROR_SCALE, quality_verdict, size_verdict, tensor_parallel_verdict

__all__ = ["render_model_card", "card_group"]

_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}"


def render_model_card(report: Mapping[str, Any], *, command: str) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    job, source = report["job"], report["source"]
    license_ = source.get("license") or {}
    repo_id = source.get("repo_id")
    data = ModelCardData(
        base_model=repo_id, base_model_relation="quantized" if repo_id else None,
        license=license_.get("license"), license_name=license_.get("license_name"),
        license_link=license_.get("license_link"), library_name="transformers", pipeline_tag="text-generation",
        tags=["wq", str(job.get("format")), str(job.get("method")),
              str(job["scheme"]).lower() if _activation_scheme(job) else f"w{job.get('bits')}a16"])
    card = ModelCard.from_template(data, template_str=_TEMPLATE, body=_body(report, command=command))
    return str(card)


def _body(report: Mapping[str, Any], *, command: str) -> str:
    job, source, totals = report["job"], report["source"], report["totals"]
    spec = _activation_scheme(job)
    group = card_group(job.get("scheme"), job.get("group_size"))
    worst = totals.get("worst_layer") or {}
    base = source.get("repo_id") or source.get("model")
    name = str(base).rstrip("/").split("/")[-1]
    checkpoint_format = ((report.get("compatibility") or {}).get("loader") or {}).get("checkpoint_format",
                                                                                      "pack-quantized")
    what = (f"Weight-only {job.get('bits')}-bit quantization" if spec is None else
            f"{job['scheme']} ({_number(spec.weights, spec.bits)} weights"
            + (" and activations" if spec.activations is not None else ", activations in 16 bits") + ") quantization")
    lines = [
        f"# {name} - " + (f"{str(job.get('method')).upper()} W{job.get('bits')}A16" if spec is None
                          else str(job["scheme"])),
        "",
        f"{what} of `{base}`"
        + (f" (revision `{source.get('revision')}`)" if source.get("revision") else "")
        + f", made with wq {report.get('wq_version')}.",
        "",
        "| | |",
        "| --- | --- |",
        f"| method | {job.get('method')} ({'symmetric' if job.get('sym') else 'asymmetric'}, "
        f"act-order {'on, static groups' if job.get('act_order') else 'off'}) |",
        f"| bits / group size | {job.get('bits')} / {group} |",
        *([] if spec is None or spec.activations is None else [f"| activations | {_activations(spec.activations)} |"]),
        f"| format | {job.get('format')} ({checkpoint_format}) |" if job.get("format") == "compressed-tensors"
        else f"| format | {job.get('format')} |",
        *(_model_free_rows(report) if report.get("model_free") else [
            f"| calibration | {job.get('samples')} samples x {job.get('seq_len')} tokens from "
            f"{_calibration_source(job.get('calib'))} (seed {job.get('seed')}) |",
            f"| layers | {totals['layers_quantized']} quantized, {totals['layers_kept']} kept in "
            f"{source.get('dtype')} (embeddings, norms and lm_head are never quantized) |",
            f"| mean relative output error | {totals['mean_output_error']:.3e} (geometric mean "
            f"{totals['geomean_output_error']:.3e}) |",
            f"| worst layer | `{worst.get('name')}` ({worst.get('output_error', 0.0):.3e}) |"]),
        f"| size | {size_verdict(report)} |",
        f"| wall time | {totals['wall_seconds']:.1f} s |",
        *_compatibility_rows(report.get("compatibility")),
        *_quality_rows(report.get("eval")),
        "",
        "Per-tensor errors and timings are in `wq_report.json`." if report.get("model_free") else
        ERROR_SCALE + " Per-layer errors, timings and activation-outlier statistics are in `wq_report.json`; "
        "`wq_report.html` shows them.",
        "",
        *_usage(report),
        "",
        "Made with:",
        "",
        "```",
        command or "(library call)",
        "```",
        "",
    ]
    return "\n".join(lines)


def card_group(scheme: str | None, group_size: int | None) -> str:
    """The card's group size: the number, `per-channel`, or the layout a scheme fixes (`per-tensor`,
    `128x128-block`, `16`). The nightly scheduler compares a recipe's with a card's through this."""
    spec = _activation_scheme({"scheme": scheme})
    if spec is not None and spec.layout is not WeightLayout.GROUP:
        return {WeightLayout.TENSOR: "per-tensor", WeightLayout.BLOCK: "128x128-block",
                WeightLayout.TENSOR_GROUP: "16", WeightLayout.FLAT_BLOCK: "64-flat"}[spec.layout]
    return str(group_size) if group_size else "per-channel"


def _model_free_rows(report: Mapping[str, Any]) -> list[str]:
    """A model-free artifact's rows: no calibration, and the weights' own error (there were no inputs)."""
    totals = report["totals"]
    worst = totals.get("worst_tensor") or {}
    return [
        "| calibration | none: model-free, each linear weight rounded from the checkpoint alone (no model class) |",
        f"| tensors | {totals['tensors_quantized']} quantized, {totals['tensors_kept']} kept as stored (embeddings, "
        "norms, routers and lm_head by default; each reason in wq_report.json) |",
        f"| mean relative weight error | {totals['mean_weight_error']:.3e} (\\|W - Q\\|^2 / \\|W\\|^2) |",
        f"| worst tensor | `{worst.get('name')}` ({worst.get('weight_error') or 0.0:.3e}) |",
    ]


def _activation_scheme(job: Mapping[str, Any]) -> SchemeSpec | None:
    """The job's preset where it quantizes activations or stores FP8 (the card then names it), else None."""
    try:
        spec = SCHEMES.get(Scheme(job.get("scheme")))
    except ValueError:
        return None
    return spec if spec is not None and spec.group_size_fixed else None  # (NVFP4A16 stores FP4: fixed too)


def _number(kind: NumberType, bits: int) -> str:
    if kind is NumberType.TABLE:
        return "bitsandbytes 4-bit (NF4 or FP4 table)"
    if kind is NumberType.FLOAT:
        return "FP4 E2M1" if bits == 4 else "FP8 E4M3"
    return f"INT{bits}"


def _activations(a: ActivationQuant) -> str:
    if a.bits == 4:
        return ("FP4 E2M1 per group of 16 columns, FP8 scales computed by the engine from each input times a "
                "global scale from the calibration set")
    per = {"token": "per token", "tensor": "per tensor", "group": f"per group of {a.group_size} columns"}
    how = "scales computed by the engine from each input" if a.dynamic else "static scales from the calibration set"
    return f"{_number(a.type, a.bits)} {per[a.strategy.value]}, {how}"


def _calibration_source(calib: Any) -> str:
    if calib in (None, BUNDLED_CALIB):
        return "the public-domain text bundled with wq"
    return f"`{calib}`"


def _usage(report: Mapping[str, Any]) -> list[str]:
    """How to run it: vLLM and transformers, with the repo id it will have where it is pushed."""
    job = report["job"]
    where = job.get("push_to_hub") or "PATH/TO/THIS/FOLDER"
    gptq = job.get("format") in ("gptq", "awq")             # float16 scales
    dtype = ", dtype=\"float16\"" if gptq else ""
    needs = {"gptq": "`optimum` and `gptqmodel`", "awq": "its AWQ backend",
             "bitsandbytes": "`bitsandbytes`"}.get(str(job.get("format")),
                                                                              "`compressed-tensors`")
    return [
        "## Use it",
        "",
        "vLLM:",
        "",
        "```bash",
        f"vllm serve {where}" + (" --dtype float16" if gptq else ""),
        "```",
        "",
        "```python",
        "from vllm import LLM",
        f"llm = LLM(\"{where}\"{dtype})",
        "print(llm.generate(\"The capital of France is\")[0].outputs[0].text)",
        "```",
        "",
        f"transformers (with {needs} installed):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = AutoModelForCausalLM.from_pretrained(\"{where}\", device_map=\"auto\")",
        f"tokenizer = AutoTokenizer.from_pretrained(\"{where}\")",
        "```",
    ] + (["", f"{'GPTQ v1' if job.get('format') == 'gptq' else 'AWQ'} stores float16 scales: run it in float16 "
          "for the exact reconstruction wq checked."] if gptq else [])


def _quality_rows(evaluation: Mapping[str, Any] | None) -> list[str]:
    """Perplexity, where the job evaluated the artifact (and its source)."""
    quality = quality_verdict(evaluation)
    return [f"| quality | {quality} |"] if quality else []


def _compatibility_rows(compat: Mapping[str, Any] | None) -> list[str]:
    """The vLLM tensor-parallel sizes the artifact loads with, and the padding applied for them."""
    verdict = tensor_parallel_verdict(compat)
    if verdict is None or compat is None:
        return []
    return [f"| vLLM tensor parallel | {verdict} (details: wq_report.json, compatibility) |"] + (
        [f"| Padding | {compat['padding_applied']['description']} |"] if compat.get("padding_applied") else [])
