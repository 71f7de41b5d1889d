"""bitsandbytes 4-bit checkpoints ("-bnb-4bit"), as transformers' `save_pretrained` writes a model loaded with
`BitsAndBytesConfig(load_in_4bit=True)` (each Linear4bit's `_save_to_state_dict`: the packed weight, then its
QuantState's `as_dict(packed=True)`), and as `from_pretrained` reads one back.

Per quantized linear `L` (n = out * in weights, n_blocks = ceil(n / 64)):
- `L.weight`                  uint8 (ceil(n / 2), 1): the 4-bit codes, row-major, two per byte, first one high;
- `L.weight.absmax`           float32 (n_blocks,), or with double quantization uint8 (n_blocks,) 8-bit codes;
- `L.weight.quant_map`        float32 (16,): the value of each code (NF4's or FP4's table);
- `L.weight.nested_absmax`    float32 (ceil(n_blocks / 256),)          (double quantization only);
- `L.weight.nested_quant_map` float32 (256,): the dynamic map           (double quantization only);
- `L.weight.quant_state.bitsandbytes__nf4` (or `__fp4`) uint8: UTF-8 JSON of quant_type, blocksize, dtype,
  shape and, with double quantization, nested_blocksize, nested_dtype, nested_offset;
- `L.bias` (when the linear has one) stays in the model dtype, written with the unquantized tensors.
The math is `wq_ops.quant.bnb4`; this module only names and lays out its result.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor

from wq_ops.errors import ArtifactError
from wq_ops.quant.bnb4 import (
    NESTED_BLOCKSIZE,
    Bnb4Result,
    Bnb4Type,
    NestedAbsmax,
    code_table,
    dynamic_map,
    nested_absmax_values,
    pack_bnb4,
    unpack_bnb4,
)

__all__ = ["encode_linear", "decode_linear", "quantization_config", "tensor_names", "MARKER"]

# The tensor every quantized linear has, and only a quantized one.
MARKER = "weight.quant_map"
# bitsandbytes' QuantState stores its dtype as str(dtype) less "torch."; the nested absmax are float32.
_NESTED_DTYPE = "float32"


def _state_key(module: str, quant_type: Bnb4Type) -> str:
    return f"{module}.weight.quant_state.bitsandbytes__{quant_type.value}"


def tensor_names(module: str, *, quant_type: Bnb4Type, double_quant: bool) -> tuple[str, ...]:
    nested = (f"{module}.weight.nested_absmax", f"{module}.weight.nested_quant_map") if double_quant else ()
    return (f"{module}.weight", f"{module}.weight.absmax", f"{module}.weight.quant_map", *nested,
            _state_key(module, quant_type))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_linear(module: str, result: Bnb4Result, *, dtype: torch.dtype) -> dict[str, Tensor]:
    """The checkpoint tensors of one quantized linear (module: its full name, "model.layers.0.mlp.up_proj").
    dtype: the model's dtype, which the reader dequantizes to (the QuantState's `dtype`)."""
    out_features, in_features = result.shape
    # Key order as bitsandbytes' QuantState.as_dict writes it: json.dumps of this dict is the stored bytes.
    state: dict[str, Any] = {"quant_type": result.quant_type.value, "blocksize": result.blocksize,
                             "dtype": _dtype_name(dtype), "shape": [out_features, in_features]}
    tensors = {f"{module}.weight": pack_bnb4(result.codes, result.quant_type),
               f"{module}.weight.quant_map": code_table(result.quant_type, result.codes.device)}
    if result.nested is None:
        tensors[f"{module}.weight.absmax"] = result.absmax
    else:
        tensors[f"{module}.weight.absmax"] = result.nested.codes
        tensors[f"{module}.weight.nested_absmax"] = result.nested.absmax
        tensors[f"{module}.weight.nested_quant_map"] = dynamic_map(result.codes.device)
        # float() of the float32 offset: the double json writes is that float32 exactly.
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype=_NESTED_DTYPE,
                     nested_offset=float(result.nested.offset))
    tensors[_state_key(module, result.quant_type)] = torch.tensor(list(json.dumps(state).encode("utf-8")),
                                                                  dtype=torch.uint8)
    return tensors


def decode_linear(module: str, tensors: dict[str, Tensor]) -> Bnb4Result:
    """Inverse of `encode_linear` (format checks; tests)."""
    keys = [k for k in tensors if k.startswith(f"{module}.weight.quant_state.bitsandbytes__")]
    if len(keys) != 1:
        raise ArtifactError(f"{module}: expected one weight.quant_state.bitsandbytes__nf4 or __fp4 tensor, "
                            f"found {keys}")
    state = json.loads(bytes(tensors[keys[0]].tolist()).decode("utf-8"))
    quant_type = Bnb4Type(state["quant_type"])
    shape = (int(state["shape"][0]), int(state["shape"][1]))
    codes = unpack_bnb4(tensors[f"{module}.weight"], shape)
    absmax = tensors[f"{module}.weight.absmax"]
    if "nested_offset" not in state:
        return Bnb4Result(codes=codes, absmax=absmax, quant_type=quant_type, blocksize=state["blocksize"])
    nested = NestedAbsmax(codes=absmax, absmax=tensors[f"{module}.weight.nested_absmax"],
                          offset=torch.tensor(state["nested_offset"], dtype=torch.float32))
    return Bnb4Result(codes=codes, absmax=nested_absmax_values(nested), quant_type=quant_type,
                      blocksize=state["blocksize"], nested=nested)


def quantization_config(*, quant_type: Bnb4Type, double_quant: bool, compute_dtype: torch.dtype,
                        skip_modules: list[str]) -> dict[str, Any]:
    """config.json's `quantization_config`, field for field what transformers writes (BitsAndBytesConfig.to_dict).
    skip_modules: every Linear left unquantized, lm_head included: a list turns off transformers' own default
    (it skips the output embedding only when the list is null), and its loader makes Linear4bit of every other
    Linear. compute_dtype: what Linear4bit multiplies in (the model's dtype is the usual choice)."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": _dtype_name(compute_dtype),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type.value,
        "bnb_4bit_use_double_quant": double_quant,
        # The 8-bit (LLM.int8) fields are written at their defaults by every 4-bit checkpoint.
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": sorted(skip_modules),
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }
