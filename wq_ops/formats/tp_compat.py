"""Which tensor-parallel sizes vLLM can load an artifact with, what the artifact needs from its loader, and
the padding that would make a refused size load. Decides from shapes and the quant config only (no tensors),
so the driver can ask at plan time. It does not pad anything by itself: `padding.pad_output_rows` and
`padding.pad_input_columns` are the pure functions a padding policy applies to a `QuantResult`; what the
loaders need is `loader.loader_requirements`.

Entry point: `check_tp_sizes(layout, attention, quant, fmt, tp_sizes=...)`. The rules restate vLLM's own
checks: QKV/MergedColumn/RowParallelLinear partitioning (vllm/model_executor/layers/linear.py), GPTQLinearMethod
and CompressedTensorsWNA16 `create_weights`, and Marlin's `verify_marlin_supports_shape` (marlin_utils.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterable, Protocol

from wq_ops.config import Format, QuantConfig, TpPolicy
from wq_ops.config.schemes import FP8_BLOCK_SHAPE, NVFP4_GROUP, WeightLayout
from wq_ops.errors import ConfigError
from wq_ops.formats.block_tensors import is_ignored
from wq_ops.formats.compressed_tensors import FORMAT as PACK_QUANTIZED
from wq_ops.formats.compressed_tensors import format_name
from wq_ops.formats.loader import LoaderRequirements, loader_requirements
from wq_ops.formats.marlin import MARLIN_BITS, MARLIN_GROUP_SIZES, MARLIN_MIN_THREAD_K, MARLIN_MIN_THREAD_N

__all__ = ["TpPolicy", "LinearShape", "ModelShape", "AttentionShape", "attention_shape", "IntermediatePadding",
           "TpCheck", "CompatReport", "check_tp_sizes", "padding_for_sizes", "DEFAULT_TP_SIZES"]

DEFAULT_TP_SIZES = (1, 2, 4, 8)



class LinearShape(Protocol):
    """A block's linear layer, as wq_ops.model.LinearSpec describes it (formats and model are peers, so
    this module names only what it reads)."""

    @property
    def name(self) -> str: ...          # block-local: "mlp.down_proj"
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...


class ModelShape(Protocol):
    """What this module reads of wq_ops.model.ModelLayout."""

    @property
    def n_blocks(self) -> int: ...
    def block_linears(self, index: int) -> tuple[LinearShape, ...]: ...
    def block_tensor_name(self, block: int, local: str) -> str: ...


@dataclass(frozen=True)
class _Linear:
    name: str
    in_features: int
    out_features: int


class _Split(str, Enum):
    COLUMN = "column"     # output dim split across ranks (q, k, v, gate, up)
    ROW = "row"           # input dim split across ranks (o, down)
    REPLICATED = "replicated"   # every rank holds the whole layer (MLA's low-rank down projections)


# vLLM's parallel style and fused parameter per block-local linear name, for the supported architectures.
_PARALLEL: dict[str, tuple[_Split, str]] = {
    "self_attn.q_proj": (_Split.COLUMN, "qkv_proj"),
    "self_attn.k_proj": (_Split.COLUMN, "qkv_proj"),
    "self_attn.v_proj": (_Split.COLUMN, "qkv_proj"),
    "self_attn.o_proj": (_Split.ROW, "o_proj"),
    "mlp.gate_proj": (_Split.COLUMN, "gate_up_proj"),
    "mlp.up_proj": (_Split.COLUMN, "gate_up_proj"),
    "mlp.down_proj": (_Split.ROW, "down_proj"),
    # DeepSeek-V3's multi-head latent attention: the low-rank down projections are replicated (vLLM fuses them as
    # fused_qkv_a_proj with TP off), the up projections split by heads; its shared expert is a dense MLP.
    "self_attn.q_a_proj": (_Split.REPLICATED, "fused_qkv_a_proj"),
    "self_attn.kv_a_proj_with_mqa": (_Split.REPLICATED, "fused_qkv_a_proj"),
    "self_attn.q_b_proj": (_Split.COLUMN, "q_b_proj"),
    "self_attn.kv_b_proj": (_Split.COLUMN, "kv_b_proj"),
    "mlp.shared_experts.gate_proj": (_Split.COLUMN, "shared_experts.gate_up_proj"),
    "mlp.shared_experts.up_proj": (_Split.COLUMN, "shared_experts.gate_up_proj"),
    "mlp.shared_experts.down_proj": (_Split.ROW, "shared_experts.down_proj"),
}
_INTERMEDIATE = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


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
class IntermediatePadding:
    """Zero-padding of the MLP's intermediate dim that makes a TP size load: gate/up get `extra` output rows
    and down_proj `extra` input columns, all dequantizing to exactly 0, and config.json's intermediate_size
    becomes `padded_size`. The outputs are unchanged: act(0) * 0 = 0 for the padded channels, and zero
    columns of down_proj add nothing."""

    intermediate_size: int
    padded_size: int

    @property
    def extra(self) -> int:
        return self.padded_size - self.intermediate_size

    def describe(self) -> str:
        return (f"pad intermediate_size {self.intermediate_size} -> {self.padded_size} (+{self.extra} zero rows "
                f"in gate_proj/up_proj, zero columns in down_proj; config.json intermediate_size={self.padded_size})")


@dataclass(frozen=True)
class TpCheck:
    """One TP size. layout_reasons: vLLM cannot split the weights this way at all. marlin_reasons: it can,
    but a shard misses Marlin's tiles (vLLM's default kernel on sm80+), so loading needs a fallback kernel
    (float16 activations only; for GPTQ also `--quantization gptq`). padding: what would fix it, if
    padding the intermediate dim can (None when nothing is wrong or when padding cannot help)."""

    tp: int
    layout_reasons: tuple[str, ...]
    marlin_reasons: tuple[str, ...]
    padding: IntermediatePadding | None

    @property
    def ok(self) -> bool:
        """Loads with vLLM's defaults (Marlin path)."""
        return not self.layout_reasons and not self.marlin_reasons

    @property
    def loadable(self) -> bool:
        """Loads at all, possibly with a fallback kernel."""
        return not self.layout_reasons

    def to_dict(self) -> dict[str, Any]:
        return {"tp": self.tp, "ok": self.ok, "loadable": self.loadable,
                "layout_reasons": list(self.layout_reasons), "marlin_reasons": list(self.marlin_reasons),
                "padding": None if self.padding is None else {
                    "intermediate_size": self.padding.intermediate_size, "padded_size": self.padding.padded_size,
                    "description": self.padding.describe()}}


@dataclass(frozen=True)
class CompatReport:
    loader: LoaderRequirements
    checks: tuple[TpCheck, ...]
    padding: IntermediatePadding | None = None      # applied to the artifact (--tp-policy pad)

    @property
    def ok_sizes(self) -> tuple[int, ...]:
        return tuple(c.tp for c in self.checks if c.ok)

    def to_dict(self) -> dict[str, Any]:
        """The `compatibility` section of wq_report.json."""
        return {"loader": self.loader.to_dict(), "tensor_parallel": [c.to_dict() for c in self.checks],
                "ok_tp_sizes": list(self.ok_sizes),
                "padding_applied": None if self.padding is None else {
                    "intermediate_size": self.padding.intermediate_size, "padded_size": self.padding.padded_size,
                    "description": self.padding.describe()}}


@dataclass(frozen=True)
class _Shard:
    """One linear's weight on one rank: (out_per_rank, in_per_rank)."""

    name: str
    split: _Split
    fused: str
    out_features: int
    in_features: int


# A routed MLP's experts, as vLLM's FusedMoE shards them: each expert's intermediate dim is split across ranks
# (gate and up by their output rows, fused as w13; down by its input columns, w2).
_EXPERT_PARALLEL = {"gate_proj": (_Split.COLUMN, "experts.w13"), "w1": (_Split.COLUMN, "experts.w13"),
                    "up_proj": (_Split.COLUMN, "experts.w13"), "w3": (_Split.COLUMN, "experts.w13"),
                    "down_proj": (_Split.ROW, "experts.w2"), "w2": (_Split.ROW, "experts.w2")}


def _parallel_of(spec: _Linear) -> tuple[_Split, str]:
    if ".experts." in spec.name and spec.name.rsplit(".", 1)[-1] in _EXPERT_PARALLEL:
        return _EXPERT_PARALLEL[spec.name.rsplit(".", 1)[-1]]
    try:
        return _PARALLEL[spec.name]
    except KeyError:
        raise ConfigError(f"{spec.name}: no known vLLM tensor-parallel style for this layer; "
                          f"known: {', '.join(_PARALLEL)}") from None


def _shards(linears: Iterable[_Linear], attention: AttentionShape, tp: int,
            reasons: list[str]) -> list[_Shard]:
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
        elif split is _Split.REPLICATED:
            pass                                 # every rank holds the whole layer
        elif split is _Split.COLUMN:
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
            shards.append(_Shard(spec.name, split, fused, out_r, in_r))
    return shards


def _layout_reasons(shard: _Shard, quant: QuantConfig, fmt: Format, tp: int) -> list[str]:
    """Can the loader hold this shard's packed tensors? (GPTQLinearMethod / CompressedTensorsWNA16 create_weights)"""
    bits, group = quant.bits, quant.group_size
    where = f"{shard.name} (tp={tp}, per rank out={shard.out_features}, in={shard.in_features})"
    reasons = []
    if group is not None and shard.in_features % group:
        dim = "input dim split by tp" if shard.split is _Split.ROW else "input dim"
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


def _marlin_reasons(shards: list[_Shard], quant: QuantConfig, fmt: Format, tp: int) -> list[str]:
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


def _fp8_block_reasons(shards: list[_Shard], tp: int) -> list[str]:
    """vLLM's validate_fp8_block_shape: a row-parallel shard's input dim, and each part of a column-parallel
    shard that is split by tp or fused with others (q/k/v, gate/up), must be whole 128-blocks."""
    block_n, block_k = FP8_BLOCK_SHAPE
    reasons = []
    fused_parts: dict[str, list[_Shard]] = {}
    for shard in shards:
        fused_parts.setdefault(shard.fused, []).append(shard)
    for shard in shards:
        where = f"{shard.name} (tp={tp}, per rank out={shard.out_features}, in={shard.in_features})"
        if shard.split is _Split.ROW and tp > 1 and shard.in_features % block_k:
            reasons.append(f"{where}: input dim per rank is not a multiple of the FP8 block's {block_k}")
        merged = len(fused_parts[shard.fused]) > 1
        if shard.split is _Split.COLUMN and (tp > 1 or merged) and shard.out_features % block_n:
            reasons.append(f"{where}: output dim per rank is not a multiple of the FP8 block's {block_n}"
                           + (f" (fused into {shard.fused})" if merged else ""))
    return reasons


def _check(linears: tuple[_Linear, ...], attention: AttentionShape, quant: QuantConfig, fmt: Format,
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


def _padded(linears: tuple[_Linear, ...], size: int) -> tuple[_Linear, ...]:
    out = []
    for spec in linears:
        if spec.name in ("mlp.gate_proj", "mlp.up_proj"):
            spec = _Linear(spec.name, spec.in_features, size)
        elif spec.name == "mlp.down_proj":
            spec = _Linear(spec.name, size, spec.out_features)
        out.append(spec)
    return tuple(out)


def _padding_for(linears: tuple[_Linear, ...], attention: AttentionShape, quant: QuantConfig, fmt: Format,
                 tp: int, *, fixes_layout: bool) -> IntermediatePadding | None:
    """The smallest padded intermediate size that makes `tp` load with Marlin, else (when the layout itself
    fails: fixes_layout) load at all; None if the intermediate dim is not what stands in the way. Per rank
    it must be whole groups, whole words (32 codes) and, for Marlin, a multiple of 128 (down_proj's k;
    gate+up's n, twice that, is then a multiple of 64)."""
    names = {s.name for s in linears}
    if not all(n in names for n in _INTERMEDIATE) or format_name(quant) != PACK_QUANTIZED:
        return None                     # padding pads packed integer codes
    intermediate = next(s.out_features for s in linears if s.name == "mlp.up_proj")
    for unit in (math.lcm(quant.group_size or 1, 32, MARLIN_MIN_THREAD_K), math.lcm(quant.group_size or 1, 32)):
        step = tp * unit
        size = -(-intermediate // step) * step
        if size == intermediate:
            continue
        layout, marlin = _check(_padded(linears, size), attention, quant, fmt, tp)
        if not layout and (not marlin or fixes_layout):
            return IntermediatePadding(intermediate, size)
    return None


def _quantized_linears(layout: ModelShape, quant: QuantConfig) -> tuple[_Linear, ...]:
    # A layer counts as quantized if any block quantizes it (the driver matches full module names); blocks
    # may differ, so every block's linears are read, each name once.
    found: dict[str, _Linear] = {}
    for i in range(layout.n_blocks):
        for spec in layout.block_linears(i):
            if spec.name not in found and not is_ignored(layout.block_tensor_name(i, spec.name), quant.ignore):
                found[spec.name] = _Linear(spec.name, spec.in_features, spec.out_features)
    return tuple(found.values())


def _checked_sizes(tp_sizes: Iterable[int]) -> tuple[int, ...]:
    sizes = tuple(tp_sizes)
    if not sizes or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in sizes):
        raise ConfigError(f"tp_sizes={list(sizes)}: expected positive integers, e.g. 1,2,4,8")
    return sizes


def check_tp_sizes(layout: ModelShape, attention: AttentionShape, quant: QuantConfig, fmt: Format, *,
                   tp_sizes: Iterable[int] = DEFAULT_TP_SIZES,
                   padding: IntermediatePadding | None = None) -> CompatReport:
    """vLLM's verdict for each TP size, from shapes alone; with `padding`, for the artifact padded so.
    Layers listed in quant.ignore stay unquantized, but vLLM still partitions them, so head counts are
    checked for every size."""
    sizes = _checked_sizes(tp_sizes)
    quantized = _quantized_linears(layout, quant)
    if padding is not None:
        quantized = _padded(quantized, padding.padded_size)
    checks = []
    for tp in sizes:
        layout_reasons, marlin_reasons = _check(quantized, attention, quant, fmt, tp)
        fix = None
        if layout_reasons or marlin_reasons:
            fix = _padding_for(quantized, attention, quant, fmt, tp, fixes_layout=bool(layout_reasons))
        checks.append(TpCheck(tp, tuple(layout_reasons), tuple(marlin_reasons), fix))
    return CompatReport(loader=loader_requirements(quant, fmt), checks=tuple(checks), padding=padding)


def padding_for_sizes(layout: ModelShape, attention: AttentionShape, quant: QuantConfig, fmt: Format, *,
                      tp_sizes: Iterable[int]) -> IntermediatePadding | None:
    """The one padded intermediate size that makes every size in `tp_sizes` load: the smallest that
    gives each Marlin's tiles, else the smallest that lets each load at all. None when no padding of the
    intermediate dim makes all of them load (heads that do not divide, say) or none is needed."""
    sizes = _checked_sizes(tp_sizes)
    linears = _quantized_linears(layout, quant)
    names = {s.name for s in linears}
    if not all(n in names for n in _INTERMEDIATE) or format_name(quant) != PACK_QUANTIZED:
        return None
    before = [_check(linears, attention, quant, fmt, tp) for tp in sizes]
    unloadable = any(layout_r for layout_r, _ in before)
    if not unloadable and not any(marlin_r for _, marlin_r in before):
        return None
    intermediate = next(s.out_features for s in linears if s.name == "mlp.up_proj")
    group = quant.group_size or 1
    passes = [(math.lcm(group, 32, MARLIN_MIN_THREAD_K), True)]
    if unloadable:          # padding only to load at all (a fallback kernel) is worth it only if it did not
        passes.append((math.lcm(group, 32), False))
    for per_rank, need_marlin in passes:
        step = math.lcm(*(tp * per_rank for tp in sizes))
        size = -(-intermediate // step) * step
        if size == intermediate:
            continue
        verdicts = [_check(_padded(linears, size), attention, quant, fmt, tp) for tp in sizes]
        if all(not layout_r and (not marlin_r or not need_marlin) for layout_r, marlin_r in verdicts):
            return IntermediatePadding(intermediate, size)
    return None
