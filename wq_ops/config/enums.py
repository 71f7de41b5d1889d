"""The str enums of wq's options (method, format, backend, ...) and the two checks every config uses: bare
strings stop at the config boundary, where `parse_enum` turns them into members or names the allowed ones."""

from __future__ import annotations

from enum import Enum
from typing import Any

from wq_ops.errors import ConfigError

__all__ = ["Method", "Format", "Backend", "TpPolicy", "Modeling", "Propagation", "AwqLoss", "SpanMode", "Runtime",
           "MoeCalibration", "parse_enum", "positive_int"]


class Method(str, Enum):
    GPTQ = "gptq"
    AWQ = "awq"
    RTN = "rtn"
    HQQ = "hqq"       # half-quadratic optimisation of each group's grid: calibration-free, better than RTN


class Format(str, Enum):
    COMPRESSED_TENSORS = "compressed-tensors"   # pack-quantized, as vLLM and llm-compressor read it
    GPTQ = "gptq"                               # GPTQ v1 layout (qweight/qzeros/scales/g_idx)
    AWQ = "awq"                                 # AutoAWQ's GEMM layout (4-bit, groups; qweight/qzeros/scales)
    BITSANDBYTES = "bitsandbytes"               # transformers' Linear4bit state dicts (--scheme BNB_NF4, BNB_FP4)


class Backend(str, Enum):
    REFERENCE = "reference"   # plain PyTorch, any device
    CUDA = "cuda"             # our CUDA kernels; an error if they are not built


class TpPolicy(str, Enum):
    """What to do with a requested tensor-parallel size the artifact cannot be loaded with."""

    REFUSE = "refuse"     # stop at plan time, naming the layer and dimension
    PAD = "pad"           # pad intermediate_size with zero rows/columns so the size loads (exact outputs)


class Modeling(str, Enum):
    """Whose module classes compute the model's blocks."""

    AUTO = "auto"                     # native for the configs it reads (Llama, Qwen2, Qwen3), else transformers
    NATIVE = "native"                 # wq's Llama modules (the same bits); an error for any other config
    TRANSFORMERS = "transformers"     # transformers' classes, imported at start-up (about 4 s on an H100 host)


class Propagation(str, Enum):
    """Where a block's calibration inputs come from."""

    QUANTIZED = "quantized"   # outputs of the already-quantized blocks before it (the GPTQ paper's scheme)
    FLOAT = "float"           # outputs of the unquantized model: every block's statistics in one forward pass


class AwqLoss(str, Enum):
    """What AWQ's scale search measures for a group of linears that share one input."""

    # The output of the module that reads the group (the attention or the MLP), replayed on
    # awq_search_samples kept samples for every candidate: AutoAWQ's and llm-compressor's choice.
    MODULE = "module"
    # The group's own linear outputs, ||Q(W diag(s)) diag(s)^-1 X - W X||^2 summed over its layers (the AWQ
    # paper's Eq. 4), over every calibration token, from the input Hessian: no replay, no kept samples.
    # The default: on SmolLM2 its perplexity was lower in 3 of 4 runs (benchmarks/quality.md).
    LAYER = "layer"


class MoeCalibration(str, Enum):
    """Which tokens an expert's statistics come from (its routed outputs feed the next block either way)."""

    ROUTED = "routed"     # the tokens the router sends it
    ALL = "all"           # every calibration token (llm-compressor's default): every expert fed, at more compute


class SpanMode(str, Enum):
    """How float propagation moves the calibration set through an actor's span."""

    AUTO = "auto"         # stream where there are several actors and the resident span fits, else block
    STREAM = "stream"     # the span's weights stay resident; micro-batches stream through it, actor to actor
    BLOCK = "block"       # one block resident at a time; the span's outputs leave after its last block


class Runtime(str, Enum):
    """Where the block actors run."""

    AUTO = "auto"         # local for one actor and no cluster address, else ray
    RAY = "ray"           # Ray actors: on the cluster at --address, or on a local Ray the driver starts
    LOCAL = "local"       # one actor inside the driver's process (no Ray): single-machine, single-actor jobs


class Scheme(str, Enum):
    """Presets named as llm-compressor's (compressed-tensors' preset schemes), so habits carry over."""

    W4A16 = "W4A16"               # 4-bit integer weights, groups of 128, symmetric; activations as they are
    W4A16_ASYM = "W4A16_ASYM"     # the same with zero points
    W8A16 = "W8A16"               # 8-bit integer weights, groups of 128 (--group-size channel: per channel)
    W8A8 = "W8A8"                 # INT8 weights per channel, INT8 activations per token (dynamic)
    FP8_DYNAMIC = "FP8_DYNAMIC"   # FP8 E4M3 weights per channel, FP8 activations per token (dynamic)
    FP8 = "FP8"                   # FP8 weights per tensor, static per-tensor activation scales
    FP8_BLOCK = "FP8_BLOCK"       # FP8 weights per 128x128 block, activations per group of 128 (dynamic)
    NVFP4 = "NVFP4"               # FP4 E2M1 weights and activations, FP8 scales per 16 and a global scale
    NVFP4A16 = "NVFP4A16"         # the same weights, activations in 16 bits
    BNB_NF4 = "BNB_NF4"           # bitsandbytes 4-bit NormalFloat (QLoRA's "-bnb-4bit"), double-quantized absmax
    BNB_FP4 = "BNB_FP4"           # bitsandbytes 4-bit float, the same layout


class TextJoin(str, Enum):
    """How a text file becomes the string that is tokenized (`wq_ops.evaluate.perplexity` states the rules)."""

    WIKITEXT = "wikitext"   # each line one row, rows joined by a blank line: the HF-rows convention of the papers
    RAW = "raw"             # the file as is


def parse_enum(kind: type[Enum], value: Any, name: str) -> Any:
    """`value` as a member of the str enum `kind`; a ConfigError naming the field and the allowed values."""
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(m.value for m in kind)  # type: ignore[attr-defined]
        raise ConfigError(f"{name}={value!r}: expected one of {allowed}") from None


def positive_int(value: Any, name: str) -> int:
    """`value` if it is an int > 0 (not a bool); else a ConfigError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r}: expected a positive integer")
    return value
