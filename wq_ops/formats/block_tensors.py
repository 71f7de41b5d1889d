"""A quantized block's artifact tensors: which modules are packed, padded or kept dense, and their names.
Formats decide names and layout here; the values come from the quantizer (`wq_ops.block`). Entry point:
`block_tensors`."""

from __future__ import annotations

import fnmatch
import re
from typing import Mapping, Sequence

import torch
from torch import Tensor

from wq_ops.config import Format, QuantConfig
from wq_ops.errors import ConfigError
from wq_ops.formats import encode_linear
from wq_ops.formats.checks import Checks
from wq_ops.formats.padding import pad_input_columns, pad_output_rows
from wq_ops.quant.result import QuantResult, WeightResult

__all__ = ["block_tensors", "is_ignored", "matches", "PAD_ROWS", "PAD_COLUMNS"]

# Layers padded by --tp-policy pad: the MLP's intermediate dim is their output (gate, up) or input (down).
PAD_ROWS = ("mlp.gate_proj", "mlp.up_proj")
PAD_COLUMNS = ("mlp.down_proj",)


def is_ignored(full_name: str, patterns: Sequence[str]) -> bool:
    """Whether a module (its full name) matches one of the `patterns` that keep it unquantized: fnmatch, or a
    regular expression after `re:` matched from the name's start (llm-compressor's and compressed-tensors'
    convention: `re:.*gate_proj$`)."""
    return any(matches(full_name, p) for p in patterns)


def matches(full_name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], full_name) is not None
    return fnmatch.fnmatchcase(full_name, pattern)


def block_tensors(work: Mapping[str, Tensor], results: Mapping[str, WeightResult], linears: Sequence[str], *,
                  quant: QuantConfig, fmt: Format, full: Mapping[str, str], prefix: str, dtype: torch.dtype,
                  scales_dtype: torch.dtype, pad_intermediate: int = 0,
                  checks: Checks | None = None, kept: Sequence[str] = ()) -> dict[str, Tensor]:
    """Quantized linears (`results`, by block-local name; `linears`: every linear's name, in order) in the
    format's layout, under their full names (`full`); every other tensor of the block (`work`: norms,
    biases, ignored layers, AWQ's rescaled norms) in the model dtype, named `{prefix}.{local}`. With
    pad_intermediate, gate/up get that many output rows and down that many input columns, all exactly zero,
    so the padded model computes what the unpadded one does. kept: modules (block-local) stored in their own
    dtype (a router, which a loader computes in that dtype)."""
    tensors: dict[str, Tensor] = {}
    quantized_weights = set()
    for name in linears:
        result = results.get(name)
        if result is not None:
            if pad_intermediate and name in PAD_ROWS + PAD_COLUMNS:
                if not isinstance(result, QuantResult):            # the config refuses it before work
                    raise ConfigError(f"{full[name]}: --tp-policy pad pads integer codes, not FP8 values")
                result = pad_output_rows(result, pad_intermediate) if name in PAD_ROWS \
                    else pad_input_columns(result, pad_intermediate)
            tensors.update(encode_linear(fmt, full[name], result, quant=quant, scale_dtype=scales_dtype,
                                         checks=checks))
            quantized_weights.add(name + ".weight")
    for local, value in work.items():
        if local not in quantized_weights:
            module, leaf = local.rsplit(".", 1)
            if pad_intermediate and module in PAD_ROWS:        # dense (ignored) gate/up: weight rows, bias
                value = torch.cat([value, value.new_zeros((pad_intermediate, *value.shape[1:]))])
            elif pad_intermediate and module in PAD_COLUMNS and leaf == "weight":
                value = torch.cat([value, value.new_zeros((value.shape[0], pad_intermediate))], dim=1)
            tensors[f"{prefix}.{local}"] = value if module in kept else value.to(dtype)
    return tensors
