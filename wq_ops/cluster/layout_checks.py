"""The job's options checked against the model's layout before any work: every --ignore pattern matches a
linear, the group size (and a scheme's own groups) divides every quantized layer's input, --eval can score the
scheme on this model, and vLLM can load the artifact at the --tp-sizes asked (or --tp-policy pad makes it).
Each refusal names the layers and the way out. Entry point: `check_options_fit_model`."""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from typing import Any

from wq_ops.config import Format, JobConfig, TpPolicy
from wq_ops.config.schemes import NVFP4_GROUP, WeightLayout
from wq_ops.errors import ConfigError
from wq_ops.formats.block_tensors import is_ignored, matches
from wq_ops.formats.tp_compat import DEFAULT_TP_SIZES, CompatReport, attention_shape, check_tp_sizes, padding_for_sizes
from wq_ops.model.architecture import ModelLayout

__all__ = ["check_options_fit_model"]

log = logging.getLogger(__name__)


def check_options_fit_model(job: JobConfig, layout: ModelLayout, hf_config: Any) -> CompatReport:
    """Every check below, in order; returns the tensor-parallel verdicts (the report's `compatibility`)."""
    _check_ignore_patterns(job, layout)
    _check_quant_fits_layout(job, layout)
    _check_scheme_fits_layout(job, layout)
    _check_expert_actors(job, layout)
    return _engine_notes(job, layout, _check_tensor_parallel(job, layout, hf_config))


# What vLLM's gpt-oss loader reads, from its code (docs/gpt_oss.md): a note, not a refusal (transformers loads it).
GPT_OSS_EXPERTS_NOTE = ("gpt-oss: vLLM's gpt-oss loader (read up to Sep 2026) takes experts only fused (bf16) or as "
                        "MXFP4 or Quark, and leaves these per-expert experts unloaded, without an error "
                        "(docs/gpt_oss.md); transformers loads them inside wq_ops.evaluate.gpt_oss_experts."
                        "per_expert_gpt_oss() (jobs.eval does so); for vLLM, keep the experts dense and fused (by our "
                        "reading of its loader) with --model-free --ignore 're:.*mlp\\.experts\\..*'")


def _engine_notes(job: JobConfig, layout: ModelLayout, report: CompatReport) -> CompatReport:
    """The report with what an engine is known not to load of this artifact (the loader's notes), also logged.
    gpt-oss's experts, written one by one (quantized or kept dense), load through transformers' per-expert
    mapping only, which needs compressed-tensors (dequantized on load to plain weights): other formats are
    refused."""
    if layout.architecture != "GptOssForCausalLM":
        return report
    if job.format is not Format.COMPRESSED_TENSORS:
        raise ConfigError(f"format={job.format.value}: gpt-oss's experts, written one by one, load in no engine in "
                          "that format (transformers rebuilds them from compressed-tensors' weights only; vLLM "
                          "reads MXFP4 or Quark experts); use --format compressed-tensors, or --model-free")
    log.warning("%s", GPT_OSS_EXPERTS_NOTE)
    return replace(report, loader=replace(report.loader, notes=report.loader.notes + (GPT_OSS_EXPERTS_NOTE,)))


def _check_expert_actors(job: JobConfig, layout: ModelLayout) -> None:
    """Expert actors need routed experts to quantize, and at least one expert each."""
    k = job.run.expert_actors
    if not k:
        return
    routed = [layout.block(i).moe for i in range(layout.n_blocks) if layout.block(i).moe is not None]
    if not routed:
        raise ConfigError(f"expert_actors={k}: {layout.architecture} has no routed experts (a dense model); leave "
                          "out --expert-actors")
    fewest = min(m.n_experts for m in routed if m is not None)
    if k > fewest:
        raise ConfigError(f"expert_actors={k}: a routed block has {fewest} experts, so at most {fewest} actors get "
                          f"any; use --expert-actors {fewest} or fewer")


def _check_quant_fits_layout(job: JobConfig, layout: ModelLayout) -> None:
    """A group size must divide the input width of every layer it applies to: otherwise stop now and
    name the layers and the ways out; never change the scheme silently."""
    gs = job.quant.group_size
    if gs is None:
        return
    bad: dict[str, int] = {}
    for i in range(layout.n_blocks):
        for spec in layout.block(i).linears:
            full = layout.block_tensor_name(i, spec.name)
            if spec.in_features % gs and not is_ignored(full, job.quant.ignore):
                bad[spec.name] = spec.in_features
    if bad:
        widths = sorted(set(bad.values()))
        divisors = [g for g in (256, 128, 64, 32) if all(w % g == 0 for w in widths)]
        listed, first = _listed(bad)
        hint = f"--group-size {divisors[0]}" if divisors else "--group-size channel"
        pattern = f"'{layout.block_prefix}.*.{first}'"
        raise ConfigError(
            f"group_size={gs} does not divide the input width of {len(bad)} linear layer(s) in every block: "
            f"{listed}. Use {hint} (divides every layer), --group-size channel, or keep those layers "
            f"unquantized with --ignore (e.g. --ignore {pattern})"
        )


def _check_scheme_fits_layout(job: JobConfig, layout: ModelLayout) -> None:
    """A scheme that scales groups of columns of its own (NVFP4's weights and activations: 16; FP8_BLOCK's
    activations: 128) needs every quantized layer's input width a multiple of the group (engines' kernels and
    compressed-tensors refuse the rest); --eval does not quantize routed experts' inputs yet, so it refuses to
    score an activation scheme on a routed model."""
    quant, served = job.quant, job.quant.activations
    name = f"scheme={quant.scheme.value if quant.scheme else None}"
    if served is not None and job.evaluation.text is not None and \
            any(layout.block(i).moe is not None for i in range(layout.n_blocks)):
        raise ConfigError(f"eval with {name}: wq's evaluation does not quantize routed experts' inputs yet; leave "
                          "out --eval, or use a weight-only scheme")
    unit = NVFP4_GROUP if quant.layout is WeightLayout.TENSOR_GROUP else (served.group_size if served else None)
    if unit is None:
        return
    bad = {spec.name: spec.in_features for i in range(layout.n_blocks) for spec in layout.block(i).linears
           if spec.in_features % unit and not is_ignored(layout.block_tensor_name(i, spec.name), quant.ignore)}
    if bad:
        listed, first = _listed(bad)
        other = "FP8_DYNAMIC" if quant.layout is WeightLayout.BLOCK else "a scheme with integer weights"
        raise ConfigError(f"{name} scales groups of {unit} columns, which do not divide the input width of {listed}; "
                          f"keep them unquantized with --ignore (e.g. --ignore "
                          f"'{layout.block_prefix}.*.{first}'), or use {other}")


def _listed(bad: dict[str, int]) -> tuple[str, str]:
    """Layers (block-local name -> input width) for an error, each routed expert linear once with how many
    experts share it (gpt-oss-120b's 2880-wide experts are 384 linears a block), and the first entry's name."""
    alike: dict[tuple[str, int], int] = {}
    for layer, width in bad.items():
        key = (re.sub(r"\.experts\.\d+\.", ".experts.*.", layer), width)
        alike[key] = alike.get(key, 0) + 1
    listed = ", ".join(f"{n} (in={w}" + (f", {k} experts)" if k > 1 else ")") for (n, w), k in alike.items())
    return listed, next(iter(alike))[0]


def _check_ignore_patterns(job: JobConfig, layout: ModelLayout) -> None:
    """Every --ignore pattern must match a linear module of the model: one that matches none is a typo that
    would quantize what the user meant to keep."""
    names = [layout.block_tensor_name(i, s.name) for i in range(layout.n_blocks) for s in layout.block(i).linears]
    names += list(layout.outer_linears)
    for pattern in job.quant.ignore:
        if not any(matches(n, pattern) for n in names):
            example = names[min(len(names) - 1, 3)]
            kind = "regular expression (re:, matched from the name's start)" if pattern.startswith("re:") \
                else "fnmatch pattern"
            raise ConfigError(f"ignore={pattern!r}: this {kind} matches no linear module of the model, so it "
                              f"would keep nothing unquantized; module names look like {example!r} (e.g. "
                              f"'{layout.block_prefix}.*.mlp.down_proj' or 're:.*down_proj$')")


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
