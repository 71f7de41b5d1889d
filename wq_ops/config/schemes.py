"""What each `--scheme` preset means: the weights' number type and layout, the activations an engine quantizes
at run time, and the method that suits it. The presets are compressed-tensors' (llm-compressor's names), so a
wq artifact's `quantization_config` reads as theirs would. One table: `SCHEMES`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from wq_ops.config.enums import Method, Scheme

__all__ = ["NumberType", "WeightLayout", "ActivationStrategy", "ActivationQuant", "SchemeSpec", "SCHEMES",
           "FP8_BLOCK_SHAPE", "NVFP4_GROUP", "BNB_BLOCK", "SMOOTHQUANT_ALPHA"]

# SmoothQuant's default alpha with INT8 activations (benchmarks/quality.md measures it on SmolLM2).
SMOOTHQUANT_ALPHA = 0.5

# DeepSeek-V3's layout: one weight scale per 128 x 128 block, activations per group of 128 columns.
FP8_BLOCK_SHAPE = (128, 128)
# NVFP4's group: 16 values of a row share one FP8 scale.
NVFP4_GROUP = 16
# bitsandbytes' block: 64 values of the flattened weight share one absmax (transformers' default blocksize).
BNB_BLOCK = 64


class NumberType(str, Enum):
    INT = "int"            # integer codes on a scaled grid
    FLOAT = "float"        # FP8 E4M3 (8 bits) or FP4 E2M1 (4 bits, NVFP4) values times a scale
    TABLE = "table"        # bitsandbytes: 4-bit codes into a 16-value table (NF4, FP4) times a block's absmax


class WeightLayout(str, Enum):
    """Which weights share one scale."""

    GROUP = "group"        # a run of group_size columns of one row (group_size None: the whole row)
    TENSOR = "tensor"      # the whole matrix
    BLOCK = "block"        # a FP8_BLOCK_SHAPE tile
    TENSOR_GROUP = "tensor_group"    # NVFP4: FP8 scales per 16 columns of a row, times one global scale
    FLAT_BLOCK = "flat_block"        # bitsandbytes: runs of BNB_BLOCK values of the flattened weight


class ActivationStrategy(str, Enum):
    TOKEN = "token"        # one scale per token (row of the input), computed at run time
    TENSOR = "tensor"      # one scale per layer, fixed from calibration
    GROUP = "group"        # one scale per group of columns of each token, at run time
    TENSOR_GROUP = "tensor_group"    # NVFP4: a global scale from calibration, FP8 scales per 16 columns at run time


@dataclass(frozen=True)
class ActivationQuant:
    """How an engine quantizes a linear layer's input (8 bits, symmetric): dynamic scales from each input as it
    arrives, or a static one the artifact stores (`input_scale`)."""

    type: NumberType
    strategy: ActivationStrategy
    dynamic: bool           # every scale from the input itself; False: a stored one (NVFP4: the global one)
    group_size: int | None = None
    bits: int = 8

    def to_args(self) -> dict[str, Any]:
        """compressed-tensors' QuantizationArgs fields, as its writer emits them (a static scale: the largest
        magnitude over every calibration batch, its `static_minmax` observer)."""
        nvfp4 = self.strategy is ActivationStrategy.TENSOR_GROUP
        args: dict[str, Any] = {"num_bits": self.bits, "type": self.type.value, "symmetric": True,
                                "group_size": self.group_size, "strategy": self.strategy.value,
                                "dynamic": "local" if nvfp4 else self.dynamic}
        if not self.dynamic:
            args["observer"] = "static_minmax"
        if nvfp4:
            args["scale_dtype"] = "torch.float8_e4m3fn"
        return args


@dataclass(frozen=True)
class SchemeSpec:
    """A preset: weight bits, symmetry, type and layout; the default group size (integer groups only); the
    activations' quantization (None: weight-only); the method a job takes by default."""

    bits: int
    sym: bool
    weights: NumberType
    layout: WeightLayout
    group_size: int | None
    activations: ActivationQuant | None
    method: Method

    @property
    def group_size_fixed(self) -> bool:
        """Whether the layout leaves no choice of group size (per channel, per tensor, per block)."""
        return self.activations is not None or self.weights is not NumberType.INT


_FP8 = NumberType.FLOAT
SCHEMES: dict[Scheme, SchemeSpec] = {
    Scheme.W4A16: SchemeSpec(4, True, NumberType.INT, WeightLayout.GROUP, 128, None, Method.GPTQ),
    Scheme.W4A16_ASYM: SchemeSpec(4, False, NumberType.INT, WeightLayout.GROUP, 128, None, Method.GPTQ),
    Scheme.W8A16: SchemeSpec(8, True, NumberType.INT, WeightLayout.GROUP, 128, None, Method.GPTQ),
    # INT8 weights per channel; INT8 activations per token, at run time.
    Scheme.W8A8: SchemeSpec(8, True, NumberType.INT, WeightLayout.GROUP, None,
                            ActivationQuant(NumberType.INT, ActivationStrategy.TOKEN, True), Method.GPTQ),
    # FP8 is close enough to the weights that llm-compressor's presets round to nearest (no calibration solve).
    Scheme.FP8_DYNAMIC: SchemeSpec(8, True, _FP8, WeightLayout.GROUP, None,
                                   ActivationQuant(_FP8, ActivationStrategy.TOKEN, True), Method.RTN),
    Scheme.FP8: SchemeSpec(8, True, _FP8, WeightLayout.TENSOR, None,
                           ActivationQuant(_FP8, ActivationStrategy.TENSOR, False), Method.RTN),
    Scheme.FP8_BLOCK: SchemeSpec(8, True, _FP8, WeightLayout.BLOCK, None,
                                 ActivationQuant(_FP8, ActivationStrategy.GROUP, True, FP8_BLOCK_SHAPE[1]), Method.RTN),
    # FP4 E2M1 weights, FP8 scales per 16 columns and a global scale (fused layers share it).
    Scheme.NVFP4A16: SchemeSpec(4, True, _FP8, WeightLayout.TENSOR_GROUP, None, None, Method.RTN),
    Scheme.NVFP4: SchemeSpec(4, True, _FP8, WeightLayout.TENSOR_GROUP, None,
                             ActivationQuant(_FP8, ActivationStrategy.TENSOR_GROUP, False, NVFP4_GROUP, bits=4),
                             Method.RTN),
    # Calibration-free by design (what QLoRA users download): written by --model-free in transformers' layout.
    Scheme.BNB_NF4: SchemeSpec(4, True, NumberType.TABLE, WeightLayout.FLAT_BLOCK, None, None, Method.RTN),
    Scheme.BNB_FP4: SchemeSpec(4, True, NumberType.TABLE, WeightLayout.FLAT_BLOCK, None, None, Method.RTN),
}
