"""Artifact formats: tensor names, dtypes and `quantization_config` metadata. Formats decide names and
layout; they do no quantization math (packing is `wq_ops.pack`). One table maps each `Format` to its
module; `encode_linear`, `quantization_config` and `scale_dtype` dispatch through it."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from wq_ops.config import Format, QuantConfig
from wq_ops.errors import ConfigError
from wq_ops.formats import compressed_tensors, gptq
from wq_ops.quant.result import QuantResult

__all__ = ["encode_linear", "quantization_config", "format_module", "scale_dtype"]

_MODULES: dict[Format, ModuleType] = {
    Format.COMPRESSED_TENSORS: compressed_tensors,
    Format.GPTQ: gptq,
}
# Formats whose readers fix the scale dtype; every other format stores scales in the model's dtype.
_FIXED_SCALE_DTYPES: dict[Format, torch.dtype] = {Format.GPTQ: gptq.SCALE_DTYPE}


def format_module(fmt: Format) -> ModuleType:
    try:
        return _MODULES[fmt]
    except KeyError:
        raise ConfigError(f"format={fmt.value}: not available yet; use {Format.COMPRESSED_TENSORS.value}") from None


def encode_linear(fmt: Format, module: str, result: QuantResult, *, quant: QuantConfig,
                  scale_dtype: torch.dtype) -> dict[str, Tensor]:
    """The artifact tensors of one quantized linear (full module name) in format `fmt`."""
    return format_module(fmt).encode_linear(module, result, sym=quant.sym, scale_dtype=scale_dtype)


def quantization_config(fmt: Format, quant: QuantConfig, *, ignore: list[str]) -> dict[str, Any]:
    return format_module(fmt).quantization_config(quant, ignore=ignore)


def scale_dtype(fmt: Format, *, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the artifact stores scales in, so the quantizer rounds its grid to it: the model's own dtype
    for compressed-tensors, float16 for GPTQ v1 (its readers cast scales to float16)."""
    format_module(fmt)                       # refuses a format with no module
    return _FIXED_SCALE_DTYPES.get(fmt, model_dtype)
