"""Quantizing a loaded model's linear inputs as the artifact's scheme says an engine does (W8A8, FP8), so
its perplexity is the served model's: transformers dequantizes the weights on load, and a forward pre-hook on
each quantized linear quantizes what it reads (`wq_ops.quant.activations`). Entry points: `served_activations`
(what a quantization_config asks for) and `quantize_inputs_`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from torch import Tensor, nn

from wq_ops.config.schemes import ActivationQuant, ActivationStrategy, NumberType
from wq_ops.errors import ArtifactError
from wq_ops.formats.block_tensors import is_ignored
from wq_ops.quant.activations import fake_quantize_input

__all__ = ["served_activations", "quantize_inputs_", "static_input_scales", "quantized_module_names"]


def served_activations(quantization_config: Mapping[str, Any] | None) -> ActivationQuant | None:
    """The input quantization of a compressed-tensors `quantization_config` (one config group, as wq and
    llm-compressor's presets write), None for a weight-only scheme or no quantization_config."""
    if not quantization_config or quantization_config.get("quant_method") != "compressed-tensors":
        return None
    groups = list(quantization_config.get("config_groups", {}).values())
    specs = [g.get("input_activations") for g in groups if g.get("input_activations")]
    if not specs:
        return None
    if len(groups) != 1 or specs[0].get("num_bits") not in (4, 8) or not specs[0].get("symmetric", True):
        raise ArtifactError(f"input_activations {specs}: wq evaluates one group of 8-bit or NVFP4 symmetric "
                            "activations")
    args = specs[0]
    try:
        # NVFP4's "local" dynamic: scales per group from the input, times a stored (static) global scale.
        return ActivationQuant(type=NumberType(args["type"]), strategy=ActivationStrategy(args["strategy"]),
                               dynamic=args["dynamic"] is True, group_size=args.get("group_size"),
                               bits=int(args["num_bits"]))
    except (KeyError, ValueError) as e:
        raise ArtifactError(f"input_activations {args}: not a scheme wq evaluates ({e})") from None


def static_input_scales(model_dir: Path) -> dict[str, Tensor]:
    """Each linear's stored static activation scale (by module name) from an artifact's safetensors files:
    FP8's `input_scale`, NVFP4's `input_global_scale`."""
    scales: dict[str, Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                for leaf in (".input_scale", ".input_global_scale"):
                    if name.endswith(leaf):
                        scales[name.removesuffix(leaf)] = f.get_tensor(name).to(torch.float32).reshape(())
    return scales


def quantized_module_names(model_dir: Path) -> set[str]:
    """The modules an artifact stores quantized (each has a `weight_scale`, whatever the format)."""
    names: set[str] = set()
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names.update(n.removesuffix(".weight_scale") for n in f.keys() if n.endswith(".weight_scale"))
    return names


def quantize_inputs_(model: nn.Module, spec: ActivationQuant, *, ignore: list[str],
                     static_scales: Mapping[str, Tensor] | None = None) -> set[str]:
    """Hook every linear of `model` not matched by `ignore` (the config's patterns) so its input is quantized
    as `spec` says; modifies the model in place (hooks), returns the hooked linears' names. static_scales:
    by module name, required for a static spec."""
    hooked: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or is_ignored(name, ignore):
            continue
        scale = None
        if not spec.dynamic:
            scale = (static_scales or {}).get(name)
            if scale is None:
                raise ArtifactError(f"{name}: the scheme's activations have a static scale but the artifact stores "
                                    f"neither {name}.input_scale nor {name}.input_global_scale")

        def hook(_m: nn.Module, args: tuple[Tensor, ...], scale: Tensor | None = scale) -> tuple[Tensor, ...]:
            return (fake_quantize_input(args[0], spec, static_scale=scale), *args[1:])

        module.register_forward_pre_hook(hook)
        hooked.add(name)
    return hooked
