"""Artifact formats: tensor names, dtypes and `quantization_config` metadata. Formats decide names and
layout; they do no quantization math (packing is `wq_ops.pack`). One table maps each `Format` to its
module; `encode_linear`, `quantization_config` and `scale_dtype` dispatch through it."""

from __future__ import annotations

from types import ModuleType
from typing import Any, Iterable

import torch
from torch import Tensor

from wq_ops.config import Backend, Format, QuantConfig
from wq_ops.errors import ConfigError
from wq_ops.formats import awq, compressed_tensors, gptq, naive_quantized, nvfp4_packed
from wq_ops.formats.checks import Checks
from wq_ops.quant.result import QuantResult, WeightResult, dequantize

__all__ = ["encode_linear", "quantization_config", "side_files", "format_module", "scale_dtype", "dense_tensors",
           "quantized_modules"]

_MODULES: dict[Format, ModuleType] = {
    Format.COMPRESSED_TENSORS: compressed_tensors,
    Format.GPTQ: gptq,
    Format.AWQ: awq,
}
# The tensor that marks a quantized linear in each format (every module with one is decoded).
_PACKED_LEAF: dict[Format, str] = {Format.COMPRESSED_TENSORS: "weight_packed", Format.GPTQ: "qweight",
                                   Format.AWQ: "qweight"}
# Formats whose readers fix the scale dtype; every other format stores scales in the model's dtype.
_FIXED_SCALE_DTYPES: dict[Format, torch.dtype] = {Format.GPTQ: gptq.SCALE_DTYPE, Format.AWQ: awq.SCALE_DTYPE}


def format_module(fmt: Format) -> ModuleType:
    try:
        return _MODULES[fmt]
    except KeyError:
        raise ConfigError(f"format={fmt.value}: not available yet; use {Format.COMPRESSED_TENSORS.value}") from None


def encode_linear(fmt: Format, module: str, result: WeightResult, *, quant: QuantConfig,
                  scale_dtype: torch.dtype, checks: Checks | None = None) -> dict[str, Tensor]:
    """The artifact tensors of one quantized linear (full module name) in format `fmt`, packed on the GPU
    with the CUDA backend when the codes are there. checks: where conditions on device values are queued
    rather than read back at once (the caller raises them: `wq_ops.formats.checks`)."""
    layout = _layout(fmt, quant)
    if layout == nvfp4_packed.FORMAT:
        return nvfp4_packed.encode_linear(module, result, quant=quant)
    if layout in _ONE_VALUE_EACH:
        return naive_quantized.encode_linear(module, result, quant=quant, scale_dtype=scale_dtype, checks=checks)
    if not isinstance(result, QuantResult):
        raise ConfigError(f"format={fmt.value}: stores integer codes, not {type(result).__name__}")
    backend = quant.backend if result.codes.is_cuda else Backend.REFERENCE
    return format_module(fmt).encode_linear(module, result, sym=quant.sym, scale_dtype=scale_dtype, backend=backend,
                                            checks=checks)


# compressed-tensors' layouts that store each weight as one value (W8A8's int8, FP8), not packed.
_ONE_VALUE_EACH = ("int-quantized", "float-quantized")


def _layout(fmt: Format, quant: QuantConfig) -> str:
    """The checkpoint format the scheme's weights are stored in: compressed-tensors' name for it (pack-quantized,
    int-quantized, float-quantized, nvfp4-pack-quantized), or `fmt`'s own."""
    return compressed_tensors.format_name(quant) if fmt is Format.COMPRESSED_TENSORS else fmt.value


def quantization_config(fmt: Format, quant: QuantConfig, *, ignore: list[str]) -> dict[str, Any]:
    return format_module(fmt).quantization_config(quant, ignore=ignore)


def side_files(fmt: Format, quant: QuantConfig, *, ignore: list[str]) -> dict[str, dict[str, Any]]:
    """JSON files a format's readers expect beside config.json, by file name (none for compressed-tensors)."""
    files: dict[str, dict[str, Any]] = format_module(fmt).side_files(quant, ignore=ignore)
    return files


def scale_dtype(fmt: Format, *, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the artifact stores scales in, so the quantizer rounds its grid to it: the model's own dtype
    for compressed-tensors, float16 for GPTQ v1 (its readers cast scales to float16)."""
    format_module(fmt)                       # refuses a format with no module
    return _FIXED_SCALE_DTYPES.get(fmt, model_dtype)


def _marker(fmt: Format, quant: QuantConfig) -> str:
    """The tensor every quantized linear has in its layout, and only a quantized one."""
    if _layout(fmt, quant) in (nvfp4_packed.FORMAT, *_ONE_VALUE_EACH):
        return "." + naive_quantized.MARKER
    return "." + _PACKED_LEAF[fmt]


def quantized_modules(fmt: Format, quant: QuantConfig, names: Iterable[str]) -> set[str]:
    """The modules among an artifact's tensor `names` that the format stores quantized."""
    marker = _marker(fmt, quant)
    return {n[: -len(marker)] for n in names if n.endswith(marker)}


def dense_tensors(fmt: Format, tensors: dict[str, Tensor], *, quant: QuantConfig,
                  dtype: torch.dtype) -> dict[str, Tensor]:
    """The dense tensors an artifact's tensors stand for: each quantized linear's `.weight` dequantized to
    `dtype` (exactly the weights the quantizer computed the next block's inputs with), everything else as
    stored. Used to replay a finished block when a job resumes."""
    module_of = format_module(fmt)
    layout = _layout(fmt, quant)
    quantized = quantized_modules(fmt, quant, tensors)
    out: dict[str, Tensor] = {}
    for name, value in tensors.items():
        module, leaf = name.rsplit(".", 1)
        if module not in quantized or leaf == "bias":
            out[name] = value
    for module in quantized:
        if layout == nvfp4_packed.FORMAT:
            result: WeightResult = nvfp4_packed.decode_linear(module, tensors, quant=quant)
        elif layout in _ONE_VALUE_EACH:
            result = naive_quantized.decode_linear(module, tensors, quant=quant)
        else:
            result = module_of.decode_linear(module, tensors, bits=quant.bits, group_size=quant.group_size)
        out[module + ".weight"] = dequantize(result, dtype)
    return out
