"""vLLM's per-rank rules for one tensor-parallel size: how QKV/MergedColumn/RowParallelLinear partition each
linear (vllm/model_executor/layers/linear.py), what each format's loader needs of a rank's shard
(GPTQLinearMethod, CompressedTensorsWNA16 and AWQ `create_weights`, validate_fp8_block_shape, NVFP4's groups),
and Marlin's tiles (`verify_marlin_supports_shape`, marlin_utils.py). Shapes and the quant config only.
Entry point: `rank_reasons`; `tp_compat` asks it for each size and searches the padding that fixes one."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterable

from wq_ops.config import Format, QuantConfig
from wq_ops.config.schemes import FP8_BLOCK_SHAPE, NVFP4_GROUP, WeightLayout
from wq_ops.errors import ConfigError
from wq_ops.formats.compressed_tensors import FORMAT as PACK_QUANTIZED
from wq_ops.formats.compressed_tensors import format_name
from wq_ops.formats.marlin import MARLIN_BITS, MARLIN_GROUP_SIZES, MARLIN_MIN_THREAD_K, MARLIN_MIN_THREAD_N

__all__ = ["RankLinear", "Split", "Shard", "AttentionShape", "attention_shape", "rank_reasons"]


@dataclass(frozen=True)
class RankLinear:
    name: str
    in_features: int
    out_features: int


class Split(str, Enum):
    COLUMN = "column"     # output dim split across ranks (q, k, v, gate, up)
    ROW = "row"           # input dim split across ranks (o, down)
    REPLICATED = "replicated"   # every rank holds the whole layer (MLA's low-rank down projections)


# vLLM's parallel style and fused parameter per block-local linear name, for the supported architectures.
_PARALLEL: dict[str, tuple[Split, str]] = {
    "self_attn.q_proj": (Split.COLUMN, "qkv_proj"),
    "self_attn.k_proj": (Split.COLUMN, "qkv_proj"),
    "self_attn.v_proj": (Split.COLUMN, "qkv_proj"),
    "self_attn.o_proj": (Split.ROW, "o_proj"),
    "mlp.gate_proj": (Split.COLUMN, "gate_up_proj"),
    "mlp.up_proj": (Split.COLUMN, "gate_up_proj"),
    "mlp.down_proj": (Split.ROW, "down_proj"),
    # DeepSeek-V3's multi-head latent attention: the low-rank down projections are replicated (vLLM fuses them as
    # fused_qkv_a_proj with TP off), the up projections split by heads; its shared expert is a dense MLP.
    "self_attn.q_a_proj": (Split.REPLICATED, "fused_qkv_a_proj"),
    "self_attn.kv_a_proj_with_mqa": (Split.REPLICATED, "fused_qkv_a_proj"),
    "self_attn.q_b_proj": (Split.COLUMN, "q_b_proj"),
    "self_attn.kv_b_proj": (Split.COLUMN, "kv_b_proj"),
    "mlp.shared_experts.gate_proj": (Split.COLUMN, "shared_experts.gate_up_proj"),
    "mlp.shared_experts.up_proj": (Split.COLUMN, "shared_experts.gate_up_proj"),
    "mlp.shared_experts.down_proj": (Split.ROW, "shared_experts.down_proj"),
}
@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int


def attention_shape(config: Any) -> AttentionShape:
    """From a transformers config: num_attention_heads, num_key_value_heads (default: MHA) and head_dim
    (default: hidden_size // num_attention_heads, as Llama computes it)."""
    heads = int(config.num_attention_heads)
    kv = getattr(config, "num_key_value_heads", None)
    head_dim = getattr(config, "head_dim", None)
    return AttentionShape(num_heads=heads, num_kv_heads=int(kv) if kv else heads,
                          head_dim=int(head_dim) if head_dim else int(config.hidden_size) // heads)


@dataclass(frozen=True)
class Shard:
    """One linear's weight on one rank: (out_per_rank, in_per_rank)."""

    name: str
    split: Split
    fused: str
    out_features: int
    in_features: int


# A routed MLP's experts, as vLLM's FusedMoE shards them: each expert's intermediate dim is split across ranks
# (gate and up by their output rows, fused as w13; down by its input columns, w2).
_EXPERT_PARALLEL = {"gate_proj": (Split.COLUMN, "experts.w13"), "w1": (Split.COLUMN, "experts.w13"),
                    "up_proj": (Split.COLUMN, "experts.w13"), "w3": (Split.COLUMN, "experts.w13"),
                    "down_proj": (Split.ROW, "experts.w2"), "w2": (Split.ROW, "experts.w2")}


def _parallel_of(spec: RankLinear) -> tuple[Split, str]:
    if ".experts." in spec.name and spec.name.rsplit(".", 1)[-1] in _EXPERT_PARALLEL:
        return _EXPERT_PARALLEL[spec.name.rsplit(".", 1)[-1]]
    try:
        return _PARALLEL[spec.name]
    except KeyError:
        raise ConfigError(f"{spec.name}: no known vLLM tensor-parallel style for this layer; "
                          f"known: {', '.join(_PARALLEL)}") from None


def _shards(linears: Iterable[RankLinear], attention: AttentionShape, tp: int,
            reasons: list[str]) -> list[Shard]:
    """Per-rank shapes as vLLM partitions them; appends to `reasons` where it cannot."""
    heads, kv, head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
    if heads % tp:
        reasons.append(f"num_attention_heads={heads} is not divisible by tp={tp}")
    if kv % tp and tp % kv:
        reasons.append(f"num_key_value_heads={kv}: neither divisible by tp={tp} nor a divisor of it "
                       "(vLLM splits KV heads, or replicates them when tp > num_key_value_heads)")
    shards = []
    for spec in linears:
        split, fused = _parallel_of(spec)
        out_r, in_r = spec.out_features, spec.in_features
        leaf = spec.name.rsplit(".", 1)[-1]
        if leaf == "q_proj":
            out_r = heads // tp * head_dim if heads % tp == 0 else 0
        elif leaf in ("k_proj", "v_proj"):
            out_r = max(kv // tp, 1) * head_dim
        elif leaf == "o_proj":
            in_r = heads // tp * head_dim if heads % tp == 0 else 0
        elif split is Split.REPLICATED:
            pass                                 # every rank holds the whole layer
        elif split is Split.COLUMN:
            if out_r % tp:
                reasons.append(f"{spec.name}: out_features={out_r} is not divisible by tp={tp}")
                continue
            out_r //= tp
        else:
            if in_r % tp:
                reasons.append(f"{spec.name}: in_features={in_r} is not divisible by tp={tp}")
                continue
            in_r //= tp
        if out_r and in_r:
            shards.append(Shard(spec.name, split, fused, out_r, in_r))
    return shards


def _layout_reasons(shard: Shard, quant: QuantConfig, fmt: Format, tp: int) -> list[str]:
    """Can the loader hold this shard's packed tensors? (GPTQLinearMethod / CompressedTensorsWNA16 create_weights)"""
    bits, group = quant.bits, quant.group_size
    where = f"{shard.name} (tp={tp}, per rank out={shard.out_features}, in={shard.in_features})"
    reasons = []
    if group is not None and shard.in_features % group:
        dim = "input dim split by tp" if shard.split is Split.ROW else "input dim"
        reasons.append(f"{where}: {dim} {shard.in_features} is not a whole number of groups of {group}")
    if fmt is Format.GPTQ and shard.in_features % 32:
        # qweight holds in * bits / 32 rows and vLLM's pack factor is Fraction(32, bits): 32 codes per word row.
        reasons.append(f"{where}: input dim {shard.in_features} is not a multiple of 32 (qweight packs 32 codes "
                       f"into {bits} int32 rows)")
    elif fmt is not Format.AWQ and (shard.in_features * bits) % 32:      # AWQ packs along the output dim only
        reasons.append(f"{where}: input dim {shard.in_features} x {bits} bits is not a whole number of int32 words")
    # qzeros / weight_zero_point pack along the output dim; AWQ's qweight does too.
    packs_output = fmt in (Format.GPTQ, Format.AWQ) or not quant.sym
    if packs_output and (shard.out_features * bits) % 32:
        what = {Format.GPTQ: "qzeros", Format.AWQ: "qweight and qzeros"}.get(fmt, "weight_zero_point")
        reasons.append(f"{where}: output dim {shard.out_features} x {bits} bits is not a whole number of int32 "
                       f"words ({what} packs along the output dim; vLLM needs out % {32 // math.gcd(32, bits)})")
    return reasons


def _marlin_reasons(shards: list[Shard], quant: QuantConfig, fmt: Format, tp: int) -> list[str]:
    if quant.bits not in MARLIN_BITS or quant.group_size not in MARLIN_GROUP_SIZES:
        return [f"Marlin does not run {quant.bits}-bit with group_size={quant.group_size} at any tp"]
    if fmt is Format.GPTQ and not quant.sym:
        return ["vLLM's gptq_marlin needs a symmetric scheme; asymmetric GPTQ runs on the `gptq` kernel"]
    reasons = []
    fused_out: dict[str, int] = {}
    for shard in shards:
        fused_out[shard.fused] = fused_out.get(shard.fused, 0) + shard.out_features
        if shard.in_features % MARLIN_MIN_THREAD_K:
            reasons.append(f"{shard.name} (tp={tp}): input dim per rank {shard.in_features} is not a multiple of "
                           f"Marlin's min_thread_k={MARLIN_MIN_THREAD_K}")
    for fused, out_r in fused_out.items():
        if out_r % MARLIN_MIN_THREAD_N:
            reasons.append(f"{fused} (tp={tp}): output dim per rank {out_r} is not a multiple of Marlin's "
                           f"min_thread_n={MARLIN_MIN_THREAD_N}")
    return reasons


def _fp8_block_reasons(shards: list[Shard], tp: int) -> list[str]:
    """vLLM's validate_fp8_block_shape: a row-parallel shard's input dim, and each part of a column-parallel
    shard that is split by tp or fused with others (q/k/v, gate/up), must be whole 128-blocks."""
    block_n, block_k = FP8_BLOCK_SHAPE
    reasons = []
    fused_parts: dict[str, list[Shard]] = {}
    for shard in shards:
        fused_parts.setdefault(shard.fused, []).append(shard)
    for shard in shards:
        where = f"{shard.name} (tp={tp}, per rank out={shard.out_features}, in={shard.in_features})"
        if shard.split is Split.ROW and tp > 1 and shard.in_features % block_k:
            reasons.append(f"{where}: input dim per rank is not a multiple of the FP8 block's {block_k}")
        merged = len(fused_parts[shard.fused]) > 1
        if shard.split is Split.COLUMN and (tp > 1 or merged) and shard.out_features % block_n:
            reasons.append(f"{where}: output dim per rank is not a multiple of the FP8 block's {block_n}"
                           + (f" (fused into {shard.fused})" if merged else ""))
    return reasons


def rank_reasons(linears: tuple[RankLinear, ...], attention: AttentionShape, quant: QuantConfig, fmt: Format,
           tp: int) -> tuple[list[str], list[str]]:
    layout: list[str] = []
    shards = _shards(linears, attention, tp, layout)
    if fmt is Format.COMPRESSED_TENSORS and format_name(quant) != PACK_QUANTIZED:
        # W8A8 and FP8 run on vLLM's scaled-matmul kernels: no packing and no Marlin tiles; FP8 blocks must
        # stay whole on each rank.
        if quant.layout is WeightLayout.BLOCK:
            layout.extend(_fp8_block_reasons(shards, tp))
        elif quant.layout is WeightLayout.TENSOR_GROUP:          # NVFP4: whole groups of 16 on each rank
            layout.extend(f"{s.name} (tp={tp}): input dim per rank {s.in_features} is not whole groups of "
                          f"{NVFP4_GROUP}" for s in shards if s.in_features % NVFP4_GROUP)
        return layout, []
    if fmt is Format.COMPRESSED_TENSORS and quant.bits not in MARLIN_BITS:
        layout.append(f"vLLM's compressed-tensors WNA16 scheme reads 4 or 8 bits, not {quant.bits}")
    for shard in shards:
        layout.extend(_layout_reasons(shard, quant, fmt, tp))
    return layout, _marlin_reasons(shards, quant, fmt, tp)
