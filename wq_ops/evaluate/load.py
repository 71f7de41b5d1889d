"""Loading a checkpoint or an artifact with transformers for evaluation: the one place wq decides how.

transformers 5.25 kernelizes every model it loads when Hugging Face's `kernels` package is importable
(`use_kernels` defaults to on): on a GPU it swaps layers such as RMSNorm for kernels downloaded from the
Hub at load time. An evaluation must measure the weights, not whichever Hub kernel a machine could reach,
and must run offline, so it loads with `use_kernels=False`: transformers' own PyTorch modules, on any host.
A user's plain `AutoModelForCausalLM.from_pretrained(artifact)` loads our artifacts too (tests/cluster).

An artifact whose scheme quantizes activations (W8A8, FP8) is loaded with its weights dequantized, and its
linears' inputs quantized as an engine does (`served_inputs`): its perplexity is the served model's.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from wq_ops.errors import ArtifactError
from wq_ops.evaluate.gpt_oss_experts import per_expert_gpt_oss
from wq_ops.evaluate.served_inputs import (
    quantize_inputs_,
    quantized_module_names,
    served_activations,
    static_input_scales,
)

__all__ = ["load_causal_lm", "load_tokenizer"]

# compressed-tensors formats loaded with their weights dequantized (the others run compressed, as before).
_DEQUANTIZED_FORMATS = ("int-quantized", "float-quantized", "nvfp4-pack-quantized")


def load_causal_lm(model: str | Path, *, device: str = "cpu", dtype: Any = "auto") -> Any:
    """The causal LM at `model` (a directory or a Hub repo id) on `device`, in eval mode, with transformers'
    own modules (no Hub kernels). dtype: "auto" (the checkpoint's) or a torch dtype; float32 on a CPU without
    bfloat16 instructions runs several times faster than bfloat16, and holds bfloat16 weights exactly."""
    import warnings

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig

    config = AutoConfig.from_pretrained(str(model))
    quantization = getattr(config, "quantization_config", None)
    quantization = quantization if isinstance(quantization, dict) else {}
    activations = served_activations(quantization)
    kwargs: dict[str, Any] = {}
    if activations is not None or quantization.get("format") in _DEQUANTIZED_FORMATS:
        # Weights dequantized on load (compressed-tensors' own decompressor), in the dtype asked for (NVFP4's
        # compressed modules would compute in the checkpoint's); transformers warns that the rest of the config
        # comes from the checkpoint, which is what is meant.
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    # wq's gpt-oss artifacts store its experts one by one (docs/gpt_oss.md)
    experts = per_expert_gpt_oss() if getattr(config, "model_type", None) == "gpt_oss" else nullcontext()
    with warnings.catch_warnings(), experts:
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        loaded: Any = AutoModelForCausalLM.from_pretrained(str(model), use_kernels=False,    # .to is typed oddly
                                                           dtype=dtype, **kwargs)
    if kwargs:
        _compute_in_float(loaded)
    if activations is not None:
        files = _local_dir(model)
        scales = None if activations.dynamic else static_input_scales(files)
        hooked = quantize_inputs_(loaded, activations, ignore=list(quantization.get("ignore", [])),
                                  static_scales=scales)
        missed = sorted(quantized_module_names(files) - hooked)
        if missed:               # fused experts: transformers holds them as 3-D tensors, not linear modules
            raise ArtifactError(f"{len(missed)} quantized layer(s), e.g. {missed[0]}, are not linear modules in "
                                "transformers' model (fused experts), so their inputs cannot be quantized for "
                                "scoring: a served perplexity needs vLLM")
    return loaded.to(torch.device(device)).eval()


def _compute_in_float(model: Any) -> None:
    """A model loaded with its weights dequantized computes in its float dtype only: compressed-tensors' own
    input quantization is switched off where a transformers release keeps its module wrappers (5.17 does; 5.25
    drops them), so the inputs are quantized once, by wq's hooks, as vLLM's kernels do. A linear left in a
    quantized dtype (an FP8 kernel path) is an error: it would not compute what wq scores."""
    import torch

    for name, module in model.named_modules():
        if hasattr(module, "quantization_scheme"):
            module.quantization_enabled = False
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and isinstance(weight, torch.Tensor) \
                and weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ArtifactError(f"{name}: transformers kept its weight in {weight.dtype} after dequantizing the "
                                "artifact; wq scores it with float weights")


def _local_dir(model: str | Path) -> Path:
    """The directory holding a model's files: itself, or the Hub snapshot transformers just downloaded."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(model), allow_patterns=["*.safetensors", "*.json"]))


def load_tokenizer(model: str | Path) -> Any:
    """The tokenizer saved beside the model (artifacts carry their source's tokenizer files)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))
