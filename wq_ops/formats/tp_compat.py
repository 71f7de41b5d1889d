"""Which tensor-parallel sizes vLLM can load an artifact with, what the artifact needs from its loader, and
the padding that would make a refused size load. Decides from shapes and the quant config only (no tensors),
so the driver can ask at plan time. It does not pad anything by itself: `padding.pad_output_rows` and
`padding.pad_input_columns` are the pure functions a padding policy applies to a `QuantResult`; what the
loaders need is `loader.loader_requirements`; vLLM's rules for one size are `tp_rules`'.

Entry point: `check_tp_sizes(layout, attention, quant, fmt, tp_sizes=...)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Protocol

from wq_ops.config import Format, QuantConfig, TpPolicy
from wq_ops.errors import ConfigError
from wq_ops.formats.block_tensors import is_ignored
from wq_ops.formats.compressed_tensors import FORMAT as PACK_QUANTIZED
from wq_ops.formats.compressed_tensors import format_name
from wq_ops.formats.loader import LoaderRequirements, loader_requirements
from wq_ops.formats.marlin import MARLIN_MIN_THREAD_K
from wq_ops.formats.tp_rules import AttentionShape, RankLinear, attention_shape, rank_reasons

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


_INTERMEDIATE = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


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


def _padded(linears: tuple[RankLinear, ...], size: int) -> tuple[RankLinear, ...]:
    out = []
    for spec in linears:
        if spec.name in ("mlp.gate_proj", "mlp.up_proj"):
            spec = RankLinear(spec.name, spec.in_features, size)
        elif spec.name == "mlp.down_proj":
            spec = RankLinear(spec.name, size, spec.out_features)
        out.append(spec)
    return tuple(out)


def _padding_for(linears: tuple[RankLinear, ...], attention: AttentionShape, quant: QuantConfig, fmt: Format,
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
        layout, marlin = rank_reasons(_padded(linears, size), attention, quant, fmt, tp)
        if not layout and (not marlin or fixes_layout):
            return IntermediatePadding(intermediate, size)
    return None


def _quantized_linears(layout: ModelShape, quant: QuantConfig) -> tuple[RankLinear, ...]:
    # A layer counts as quantized if any block quantizes it (the driver matches full module names); blocks
    # may differ, so every block's linears are read, each name once.
    found: dict[str, RankLinear] = {}
    for i in range(layout.n_blocks):
        for spec in layout.block_linears(i):
            if spec.name not in found and not is_ignored(layout.block_tensor_name(i, spec.name), quant.ignore):
                found[spec.name] = RankLinear(spec.name, spec.in_features, spec.out_features)
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
        layout_reasons, marlin_reasons = rank_reasons(quantized, attention, quant, fmt, tp)
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
    before = [rank_reasons(linears, attention, quant, fmt, tp) for tp in sizes]
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
        verdicts = [rank_reasons(_padded(linears, size), attention, quant, fmt, tp) for tp in sizes]
        if all(not layout_r and (not marlin_r or not need_marlin) for layout_r, marlin_r in verdicts):
            return IntermediatePadding(intermediate, size)
    return None
