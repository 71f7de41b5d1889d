"""The GPTQ v1 checkpoint layout (`quant_method: gptq`, `checkpoint_format: gptq`), as AutoGPTQ wrote it and
vLLM (`gptq`, `gptq_marlin`), transformers (through optimum and GPTQModel), TGI and exllama read it.

Per quantized linear `L`, with in = in_features, out = out_features, G = number of groups:
- `L.qweight` int32 (in * bits / 32, out): each output column's codes, packed along the input dim as a
  little-endian bit stream (code i at bits [i*bits, (i+1)*bits) of the column's words; at 3 bits a code
  may straddle two words: AutoGPTQ's "10-1-10-1-10" layout is exactly this stream);
- `L.qzeros`  int32 (G, out * bits / 32): zero points, packed the same way along the output dim, stored
  as (zero - 1): the v1 convention, whose readers add 1 back (https://garden.danieldk.eu/GPTQ-Checkpoint-Format);
- `L.scales`  float16 (G, out);
- `L.g_idx`   int32 (in,): the group of each input column, here always j // group_size.
Dequantization: W[o, j] = scales[g_idx[j], o] * (code[j, o] - (stored_zero[g_idx[j], o] + 1)).
Bias, when a layer has one, keeps its own name (`L.bias`); this module writes only the quantized weight.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from wq_ops.config import Backend, QuantConfig
from wq_ops.errors import ArtifactError
from wq_ops.formats.checks import Checks
from wq_ops.pack import pack_columns, pack_rows, unpack_columns, unpack_rows
from wq_ops.quant.result import QuantResult

__all__ = ["encode_linear", "decode_linear", "quantization_config", "side_files", "tensor_names", "SCALE_DTYPE"]

CHECKPOINT_FORMAT = "gptq"
# v1 readers cast scales to float16 (AutoGPTQ and GPTQModel register them as float16 buffers), so the grid
# must be chosen on float16 scales for the engine to rebuild the weights we propagated.
SCALE_DTYPE = torch.float16


def tensor_names(module: str, *, sym: bool) -> tuple[str, ...]:
    """Every tensor `encode_linear` writes for `module`. v1 stores qzeros even for symmetric schemes."""
    return (f"{module}.qweight", f"{module}.qzeros", f"{module}.scales", f"{module}.g_idx")


def _group_index(in_features: int, group_size: int | None) -> Tensor:
    """(in,) int32: group of each input column. Static groups: column j is in group j // group_size of the
    original column order, also under act-order (the solve visits columns in another order, the layout not)."""
    if group_size is None:
        return torch.zeros(in_features, dtype=torch.int32)
    return torch.arange(in_features, dtype=torch.int32) // group_size


def _check_shape(module: str, out_features: int, in_features: int, bits: int) -> None:
    # v1 readers size qweight as in // 32 * bits rows and qzeros as out // 32 * bits columns (3 bits) or
    # out // (32 / bits) (2, 4, 8 bits): a partly filled last word has no place in that layout.
    if in_features % 32:
        raise ArtifactError(f"{module}: in_features={in_features} is not a multiple of 32; GPTQ v1 packs whole "
                            "32-code words along the input dim. Use --format compressed-tensors for this model")
    if (out_features * bits) % 32:
        raise ArtifactError(f"{module}: out_features={out_features} x {bits} bits is not a whole number of int32 "
                            "words (qzeros packs along the output dim). Use --format compressed-tensors")


def encode_linear(module: str, result: QuantResult, *, sym: bool, scale_dtype: torch.dtype,
                  backend: Backend = Backend.REFERENCE, checks: Checks | None = None) -> dict[str, Tensor]:
    """The artifact tensors of one quantized linear. module: its full name ("model.layers.0.mlp.up_proj").
    result.scale must already be exact in float16 (the quantizer rounds its grid to `SCALE_DTYPE`).
    backend: unused; GPTQ v1 packs on the reference path (its column layout has no CUDA kernel). checks:
    unused; GPTQ v1 checks its conditions at once (the failing row and group go into the message)."""
    out_features, in_features = result.shape
    bits = result.bits
    _check_shape(module, out_features, in_features, bits)
    if scale_dtype != SCALE_DTYPE:
        raise ArtifactError(f"{module}: GPTQ v1 stores float16 scales, asked for {scale_dtype}; quantize with "
                            "scale_dtype=torch.float16 (wq_ops.formats.scale_dtype gives it per format)")
    scales = result.scale.to(SCALE_DTYPE)
    if not torch.equal(scales.to(result.scale.dtype), result.scale):
        raise ArtifactError(f"{module}: scales are not exact in float16 (e.g. {float(result.scale.flatten()[0])}); "
                            "the grid must be rounded to float16 before codes are chosen")
    zero = result.zero.to(torch.int64)                                   # (out, G)
    if sym and not bool((zero == 2 ** (bits - 1)).all()):
        raise ArtifactError(f"{module}: a symmetric scheme needs every zero point at {2 ** (bits - 1)}")
    if bool((zero == 0).any()):
        o, g = (int(i) for i in (zero == 0).nonzero()[0])
        raise ArtifactError(f"{module}: zero point 0 at row {o}, group {g} cannot be stored in GPTQ v1 (it stores "
                            "zero - 1 and readers add 1 back, so 0 would read as 2**bits); quantize with zero "
                            "points in [1, 2**bits - 1], use --sym, or use --format compressed-tensors")
    return {
        f"{module}.qweight": pack_columns(result.codes.T, bits),            # codes (in, out) -> (in*bits/32, out)
        f"{module}.qzeros": pack_rows((zero - 1).T, bits),                  # (G, out) -> (G, out*bits/32)
        f"{module}.scales": scales.T.contiguous(),                          # (G, out)
        f"{module}.g_idx": _group_index(in_features, result.group_size),
    }


def decode_linear(module: str, tensors: dict[str, Tensor], *, bits: int, group_size: int | None) -> QuantResult:
    """Inverse of `encode_linear` (for tests and format checks). Refuses a g_idx other than static groups."""
    qweight = tensors[f"{module}.qweight"]
    scales = tensors[f"{module}.scales"]                                     # (G, out)
    g_idx = tensors[f"{module}.g_idx"]
    in_features, out_features = int(g_idx.shape[0]), int(qweight.shape[1])
    if not torch.equal(g_idx.to(torch.int32), _group_index(in_features, group_size)):
        raise ArtifactError(f"{module}.g_idx: not the static grouping j // {group_size}; wq reads only static groups")
    codes = unpack_columns(qweight, bits, in_features).T.contiguous()        # (out, in)
    stored = unpack_rows(tensors[f"{module}.qzeros"], bits, out_features)    # (G, out): zero - 1
    zero = (stored.to(torch.int16) + 1).T.contiguous()
    if bool((zero > 2**bits - 1).any()):
        raise ArtifactError(f"{module}.qzeros: a stored zero of {2**bits - 1} reads as {2**bits}, outside the grid")
    return QuantResult(codes=codes, scale=scales.T.to(torch.float32).contiguous(), zero=zero.to(torch.uint8),
                       bits=bits, group_size=group_size)


def quantization_config(quant: QuantConfig, *, ignore: list[str]) -> dict[str, Any]:
    """config.json's `quantization_config` (also what AutoGPTQ wrote to quantize_config.json).
    ignore: full names of every Linear left unquantized; lm_head needs no entry (GPTQ's `lm_head: false`)."""
    config: dict[str, Any] = {
        "quant_method": "gptq",
        "checkpoint_format": CHECKPOINT_FORMAT,
        "bits": quant.bits,
        # The format's own spelling of per-channel: -1 (readers compare against it), only at this boundary.
        "group_size": quant.group_size if quant.group_size is not None else -1,
        "sym": quant.sym,
        # False even under act-order: our groups are static (column j in group j // group_size), so g_idx is
        # the identity grouping. desc_act=True would tell vLLM that g_idx is a permutation: it then replicates
        # scales on every rank of row-parallel layers and drops its exllama path there, for no gain.
        "desc_act": False,
        "static_groups": quant.act_order,      # informational (GPTQModel's name): columns were solved in act-order
        "lm_head": False,
    }
    skipped = sorted(name for name in ignore if name != "lm_head")
    if skipped:
        # GPTQModel's `dynamic` overrides, read by vLLM and GPTQModel: "-:" + regex means "not quantized".
        config["dynamic"] = {f"-:{re.escape(name)}$": {} for name in skipped}
    return config


def side_files(quant: QuantConfig, *, ignore: list[str]) -> dict[str, dict[str, Any]]:
    """quantize_config.json, which AutoGPTQ and GPTQModel read beside config.json (GPTQModel's loader reads only
    it): config.json's quantization_config with the fields their QuantizeConfig holds. damp_percent is the
    job's GPTQ damping (the default's for another method: their configs require one in (0, 1))."""
    import wq_ops

    return {"quantize_config.json": {
        **quantization_config(quant, ignore=ignore),
        "damp_percent": quant.gptq.damp_frac,
        "true_sequential": True,           # one block's linears in order, each on the previous ones' outputs
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"wq:{wq_ops.__version__}"]},
    }}
