"""The sentences a user reads first, from the report: can vLLM load it at my tensor-parallel size, how big is
it, what reads it, how good is it, and what the error numbers mean. Shared by the HTML report and the model
card, so both say the same."""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["tensor_parallel_verdict", "size_verdict", "loader_verdict", "quality_verdict", "ERROR_SCALE"]

GIB = 1 << 30

ERROR_SCALE = ("A layer's relative output error is the share of its output that quantization changed, on the "
               "calibration inputs: ||(W - Q) X||^2 / ||W X||^2, 0 when exact, 1e-3 for a change of 0.1% of the "
               "output's energy. Compare layers with each other and with other runs of the same model: a layer far "
               "above its neighbours is worth a look (more calibration data, a larger group, or --ignore it).")


def tensor_parallel_verdict(compat: Mapping[str, Any] | None) -> str | None:
    """The vLLM tensor-parallel sizes the artifact loads with (None where the report has no check)."""
    if not compat or not compat.get("tensor_parallel"):
        return None
    checks = compat["tensor_parallel"]
    ok = [str(c["tp"]) for c in checks if c.get("ok")]
    fallback = [str(c["tp"]) for c in checks if c.get("loadable") and not c.get("ok")]
    no = [str(c["tp"]) for c in checks if not c.get("loadable")]
    return (f"loads at {', '.join(ok) or 'none'} with the default kernels"
            + (f"; at {', '.join(fallback)} with a fallback kernel" if fallback else "")
            + (f"; not at {', '.join(no)}" if no else ""))


def size_verdict(report: Mapping[str, Any]) -> str:
    """The artifact's tensor bytes, and how much smaller than the source in its own dtype."""
    artifact = report["totals"].get("artifact_tensor_bytes") or 0
    source = report["source"].get("tensor_bytes")
    text = f"{artifact / GIB:.2f} GiB of tensors"
    if source and artifact:
        text += f", {source / artifact:.2f}x smaller than the source's {source / GIB:.2f} GiB in " \
                f"{report['source'].get('dtype')}"
    return text


def loader_verdict(compat: Mapping[str, Any] | None) -> str | None:
    """The packages that read the artifact, with the first release that can."""
    loader = (compat or {}).get("loader")
    if not loader:
        return None
    return ", ".join(f"{v['package']} >= {v['minimum']}" if v.get("minimum") else v["package"]
                     for v in loader.get("versions", []))


def quality_verdict(evaluation: Mapping[str, Any] | None) -> str | None:
    """Perplexity of the artifact (and of its source) where the job evaluated them."""
    if not evaluation:
        return None
    text = (f"perplexity {evaluation['perplexity']:.4f} on {evaluation.get('text')} "
            f"({evaluation.get('windows')} windows of {evaluation.get('seq_len')} tokens)")
    if evaluation.get("baseline_perplexity") is not None:
        text += f"; the source: {evaluation['baseline_perplexity']:.4f}"
    return text
