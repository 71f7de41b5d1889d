"""What a loader needs to read an artifact: config.json's quant_method and checkpoint format, the packages
and versions that read it, and notes on what they cannot (for the report's `compatibility.loader`). Entry
point: `loader_requirements`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wq_ops.config import Format, QuantConfig
from wq_ops.config.schemes import NumberType, WeightLayout
from wq_ops.errors import ConfigError
from wq_ops.formats.compressed_tensors import FORMAT as PACK_QUANTIZED
from wq_ops.formats.compressed_tensors import format_name
from wq_ops.formats.marlin import MARLIN_BITS, MARLIN_GROUP_SIZES

__all__ = ["VersionRequirement", "LoaderRequirements", "loader_requirements"]


@dataclass(frozen=True)
class VersionRequirement:
    package: str
    minimum: str              # the first release with what the artifact needs (from that release's own files)
    reason: str


@dataclass(frozen=True)
class LoaderRequirements:
    """What a loader needs to read the artifact. `format` is wq's name; quant_method/checkpoint_format are
    what config.json's quantization_config says."""

    format: Format
    quant_method: str
    checkpoint_format: str
    bits: int
    group_size: int | None
    sym: bool
    versions: tuple[VersionRequirement, ...]
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format.value, "quant_method": self.quant_method,
                "checkpoint_format": self.checkpoint_format, "bits": self.bits, "group_size": self.group_size,
                "sym": self.sym,
                "versions": [{"package": v.package, "minimum": v.minimum, "reason": v.reason} for v in self.versions],
                "notes": list(self.notes)}


def loader_requirements(quant: QuantConfig, fmt: Format) -> LoaderRequirements:
    """What config.json declares and what a loader must support to read it."""
    notes: list[str] = []
    versions: list[VersionRequirement] = []
    if fmt is Format.COMPRESSED_TENSORS and format_name(quant) != PACK_QUANTIZED:
        return _naive_requirements(quant)
    if fmt is Format.COMPRESSED_TENSORS:
        method, checkpoint_format = "compressed-tensors", "pack-quantized"
        # First releases with each feature, read from their PyPI wheels; wq's CI runs the newest.
        versions.append(VersionRequirement("compressed-tensors", "0.6.0", "pack-quantized groups and actorder "
                                           "'weight' (0.6.0); transformers decompresses with it (wq CI: 0.20.1)"))
        versions.append(VersionRequirement("transformers", "4.48.0", "decompresses pack-quantized on load "
                                           "(huggingface/transformers#34719; wq CI: 5.25)"))
        versions.append(VersionRequirement(
            "vllm", "0.5.1" if quant.sym else "0.8.5", "CompressedTensorsWNA16 (vllm-project/vllm#5794, v0.5.1)"
            + ("" if quant.sym else "; zero points: vllm-project/vllm#14211 (v0.8.5)")))
        if quant.bits not in MARLIN_BITS:
            notes.append(f"vLLM's CompressedTensorsWNA16 reads 4 and 8 bits only; {quant.bits}-bit needs another "
                         "loader (transformers + compressed-tensors dequantize it)")
        if not quant.sym:
            notes.append("transformers cannot load asymmetric pack-quantized checkpoints yet (llm-compressor#1618)")
    elif fmt is Format.GPTQ:
        method, checkpoint_format = "gptq", "gptq"
        versions.append(VersionRequirement("optimum", "1.24.0", "transformers' GPTQ quantizer (MIN_OPTIMUM_VERSION)"))
        versions.append(VersionRequirement("gptqmodel", "1.4.3", "transformers' GPTQ quantizer (MIN_GPTQ_VERSION)"))
        versions.append(VersionRequirement("vllm", "0.7.3", "GPTQ v1 (`gptq`, `gptq_marlin`); 0.7.3 for a `dynamic` "
                                           "entry (layers left unquantized in a block, vllm-project/vllm#7086)"))
        notes.append("scales are float16: run vLLM with --dtype float16 for the exact reconstruction wq checked")
        if quant.bits not in MARLIN_BITS or not quant.sym:
            notes.append(f"vLLM serves {quant.bits}-bit {'symmetric' if quant.sym else 'asymmetric'} GPTQ with its "
                         "`gptq` (exllama) kernel, not Marlin: float16 activations")
    elif fmt is Format.AWQ:
        method, checkpoint_format = "awq", "gemm"
        versions.append(VersionRequirement("vllm", "0.2.0", "AWQConfig reads bits, group_size and zero_point "
                                           "(vllm/model_executor/quantization_utils/awq.py in the 0.2.0 wheel)"))
        notes.append("scales are float16: run vLLM with --dtype float16 for the exact reconstruction wq checked")
        notes.append("layers left unquantized inside a block are listed in modules_to_not_convert; a loader that "
                     "ignores that field would expect them packed (not checked against vLLM's releases)")
    else:
        raise ConfigError(f"format={fmt.value}: no loader requirements known")
    if quant.group_size not in MARLIN_GROUP_SIZES:
        notes.append(f"group_size={quant.group_size}: Marlin runs group sizes 32, 64, 128 and channel only")
    return LoaderRequirements(format=fmt, quant_method=method, checkpoint_format=checkpoint_format,
                              bits=quant.bits, group_size=quant.group_size, sym=quant.sym,
                              versions=tuple(versions), notes=tuple(notes))


def _naive_requirements(quant: QuantConfig) -> LoaderRequirements:
    """W8A8, FP8 and NVFP4 (int-quantized, float-quantized, nvfp4-pack-quantized): first releases read from the
    PyPI wheels of compressed-tensors (config/base.py, quant_args.py) and vLLM (its compressed_tensors schemes)."""
    name = format_name(quant)
    if quant.layout is WeightLayout.TENSOR_GROUP:
        return _nvfp4_requirements(quant, name)
    block = quant.layout is WeightLayout.BLOCK
    versions = [VersionRequirement("compressed-tensors", "0.11.0" if block else "0.5.0",
                                   "block_structure as a list and the FP8_BLOCK preset (0.11.0)" if block else
                                   f"{name} (0.5.0); transformers decompresses with it (wq CI: 0.20.1)")]
    notes: list[str] = []
    if quant.weight_type is NumberType.FLOAT:
        kernel = {WeightLayout.GROUP: ("0.5.3", "per-channel FP8 weights with dynamic per-token activations"),
                  WeightLayout.TENSOR: ("0.5.2", "per-tensor FP8 weights with static activation scales"),
                  WeightLayout.BLOCK: ("0.11.0", "128x128-block FP8 weights, activations per group of 128 "
                                       "(vllm-project/vllm#21337)")}[quant.layout]
        versions.append(VersionRequirement("vllm", kernel[0], f"CompressedTensorsW8A8Fp8: {kernel[1]}"))
        notes.append("FP8 activations need an FP8 GPU (Ada, Hopper, Blackwell); on older GPUs vLLM runs the weights "
                     "with its FP8 Marlin kernel and leaves the activations in 16 bits (CompressedTensorsW8A16Fp8)")
    else:
        versions.append(VersionRequirement("vllm", "0.5.2", "CompressedTensorsW8A8Int8: per-channel INT8 weights "
                                           "with dynamic per-token activations"))
    notes.append("transformers (with compressed-tensors) loads it as is and decompresses the weights on first use; "
                 "wq's --eval and jobs.eval quantize the activations as vLLM's kernels do (float32 scales)")
    return LoaderRequirements(format=Format.COMPRESSED_TENSORS, quant_method="compressed-tensors",
                              checkpoint_format=name, bits=quant.bits, group_size=quant.group_size, sym=quant.sym,
                              versions=tuple(versions), notes=tuple(notes))


def _nvfp4_requirements(quant: QuantConfig, name: str) -> LoaderRequirements:
    activations = quant.activations is not None
    versions = (
        VersionRequirement("compressed-tensors", "0.13.0", "nvfp4-pack-quantized (0.10.0) and the weights' "
                           "scale_dtype field (0.13.0; 0.11 and 0.12 refuse fields they do not know)"),
        VersionRequirement("vllm", "0.9.1" if activations else "0.9.0",
                           "CompressedTensorsW4A4Fp4 (0.9.1)" if activations else "CompressedTensorsW4A16Fp4 (0.9.0)"),
    )
    notes = ["vLLM reads the config with the compressed-tensors installed beside it: 0.13.0 or newer"]
    if activations:
        notes.append("FP4 activations need a Blackwell GPU; elsewhere vLLM runs the weights with its FP4 Marlin "
                     "kernel and leaves the activations in 16 bits")
    return LoaderRequirements(format=Format.COMPRESSED_TENSORS, quant_method="compressed-tensors",
                              checkpoint_format=name, bits=quant.bits, group_size=16, sym=quant.sym,
                              versions=versions, notes=tuple(notes))
