"""Which tensors a model-free job quantizes, from their names, shapes and dtypes alone (no model class): the
2-D `.weight` of every linear layer, and fused 3-D expert tensors (`...experts.gate_up_proj`, shaped
(experts, out, in)) expert slice by expert slice. Kept as stored: embeddings, norms, routers, `lm_head` (the
default rules, `DEFAULT_KEPT`), anything `--ignore` names, and layers whose width the scheme's groups do not
divide, each with its reason in the report. Entry point: `tensor_role`.

The last dim is taken as the input (the reduction dim of y = x W^T) for both shapes: nn.Linear stores
(out, in), and so do the fused expert tensors whose source is blocks of the input dim (MXFP4 releases).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Sequence

from wq_ops.config import QuantConfig
from wq_ops.config.schemes import NVFP4_GROUP, NumberType, WeightLayout
from wq_ops.formats.block_tensors import is_ignored

__all__ = ["TensorRole", "Role", "tensor_role", "DEFAULT_KEPT", "module_of", "ignored_linears"]

# Module names (the last part) never quantized by default: embeddings and norms are not linear layers; routers
# decide which experts run and engines keep them in their own dtype; lm_head is the layer most sensitive to
# rounding (llm-compressor's presets leave it too). fnmatch patterns on the module's last name.
DEFAULT_KEPT = ("*embed*", "*norm*", "lm_head", "gate", "router", "shared_expert_gate", "wte", "wpe", "score")

_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3")


class TensorRole(str, Enum):
    LINEAR = "linear"        # a 2-D weight: quantized as (out, in)
    EXPERTS = "experts"      # a 3-D fused expert tensor: each (out, in) slice quantized
    KEPT = "kept"            # copied as stored


@dataclass(frozen=True)
class Role:
    """A tensor's role; module: the name its quantized tensors go under (`module.weight_packed`, ...); reason:
    why a weight-like tensor is kept (None for one that is no weight)."""

    role: TensorRole
    module: str | None = None
    reason: str | None = None


def module_of(name: str) -> str:
    """`a.b.weight` -> `a.b`; a fused expert tensor has no `.weight` (`...experts.down_proj`): its own name."""
    return name.removesuffix(".weight")


def tensor_role(name: str, shape: Sequence[int], dtype: str, *, quant: QuantConfig) -> Role:
    """The role of tensor `name` of `shape` and safetensors `dtype` ("BF16", ...) under the job's scheme."""
    linear = len(shape) == 2 and name.endswith(".weight")
    experts = len(shape) == 3 and ".experts." in f".{name}." and dtype in _FLOAT_DTYPES
    if not (linear or experts) or dtype not in _FLOAT_DTYPES:
        return Role(TensorRole.KEPT)
    module = module_of(name)
    last = module.rsplit(".", 1)[-1]
    if experts and last == "experts":             # `mlp.experts.weight`: no projection named, role unknown
        return Role(TensorRole.KEPT, module, "a 3-D tensor named for no projection")
    kept_by = next((p for p in DEFAULT_KEPT if is_ignored(last, (p,))), None)
    if kept_by is not None:
        return Role(TensorRole.KEPT, module, f"default rule {kept_by!r}")
    if is_ignored(module, quant.ignore):
        return Role(TensorRole.KEPT, module, "--ignore")
    if experts and quant.weight_type is NumberType.TABLE:
        return Role(TensorRole.KEPT, module, "bitsandbytes quantizes linear layers only (transformers keeps fused "
                    "expert tensors dense)")
    width = int(shape[-1])
    group = _group_width(quant)
    if group is not None and width % group:
        return Role(TensorRole.KEPT, module, f"in_features={width} is not a multiple of the scheme's groups of {group}")
    return Role(TensorRole.EXPERTS if experts else TensorRole.LINEAR, module)


def _group_width(quant: QuantConfig) -> int | None:
    """Columns that must come in whole groups: integer groups, NVFP4's 16. FP8 blocks may end partial (the
    scales cover ceil(in / 128) blocks), as compressed-tensors and vLLM allow; bitsandbytes' blocks run over the
    flattened weight."""
    if quant.weight_type is NumberType.TABLE:
        return None
    if quant.weight_type is NumberType.FLOAT:
        return NVFP4_GROUP if quant.layout is WeightLayout.TENSOR_GROUP else None
    return quant.group_size


def ignored_linears(roles: dict[str, Role]) -> list[str]:
    """The modules compressed-tensors' `ignore` must list: weight-like tensors kept dense (an engine applies the
    scheme to every linear not listed), not embeddings or norms, which are no linear layers; and `lm_head`
    always, which the default rules keep: a tied one has no tensor of its own, but is a linear to the loaders.
    A fused 3-D expert tensor kept dense also gets its experts module as a regular expression over the
    per-expert names (`re:model\\.layers\\.0\\.mlp\\.experts\\..*`): vLLM decides a fused MoE layer's scheme by
    asking about `<experts>.0.gate_proj` and its kin, and without a match it gives the layer the quantized MoE
    method, which then fails to load the dense tensors. (A module with some fused tensors quantized and some
    kept gets no such entry: no engine loads it half and half.)"""
    kept = {r.module for r in roles.values() if r.role is TensorRole.KEPT and r.module is not None
            and not any(is_ignored(r.module.rsplit(".", 1)[-1], (p,)) for p in ("*embed*", "*norm*"))}
    # Only where every fused tensor of the module is kept: vLLM takes a fused MoE layer whole, quantized or not.
    quantized = {_experts_module(r.module) for r in roles.values() if r.role is TensorRole.EXPERTS and r.module}
    fused = {_experts_module(m) for m in kept} - quantized - {None}
    return sorted(kept | {"lm_head"} | {"re:" + re.escape(str(m)) + r"\..*" for m in fused})


def _experts_module(module: str) -> str | None:
    """`a.experts` for a fused expert tensor's module (`a.experts.gate_up_proj`, or `a.experts` itself); None
    for anything else (a per-expert linear `a.experts.0.gate_proj` included)."""
    parts = module.split(".")
    if parts[-1] == "experts":
        return module
    if len(parts) > 1 and parts[-2] == "experts":
        return ".".join(parts[:-1])
    return None
