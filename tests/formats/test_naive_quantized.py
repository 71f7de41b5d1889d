"""compressed-tensors int-quantized (W8A8) and float-quantized (FP8): tensor names and dtypes, round trips,
and agreement with compressed-tensors' own decompressor and config writer."""

import json

import pytest
import torch

from wq_ops.config import JobConfig, QuantConfig
from wq_ops.formats import dense_tensors, encode_linear, quantized_modules
from wq_ops.formats.compressed_tensors import quantization_config
from wq_ops.formats.naive_quantized import decode_linear, tensor_names
from wq_ops.quant.fp8 import quantize_fp8
from wq_ops.quant.result import FloatResult, dequantize
from wq_ops.quant.rtn import quantize_rtn

NAME = "model.layers.0.mlp.up_proj"
SCHEMES = ["W8A8", "FP8_DYNAMIC", "FP8", "FP8_BLOCK"]


def _quant(scheme: str) -> QuantConfig:
    return JobConfig.from_dict({"out": "o", "scheme": scheme}).quant


def _result(quant: QuantConfig, w: torch.Tensor):
    if quant.scheme.value == "W8A8":
        return quantize_rtn(w, bits=8, group_size=None, sym=True, scale_dtype=torch.bfloat16)
    r = quantize_fp8(w, layout=quant.layout, scale_dtype=torch.bfloat16)
    if not quant.activations.dynamic:
        r = FloatResult(values=r.values, scale=r.scale, block=r.block, input_scale=torch.tensor(0.015625))
    return r


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compressed_tensors_decompresses_to_our_weights_bit_for_bit(gen, scheme):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    from wq_ops.config import Format

    quant = _quant(scheme)
    w = torch.randn(200, 384, generator=gen) * torch.rand(200, 1, generator=gen)      # partial 128-row blocks
    result = _result(quant, w)
    tensors = encode_linear(Format.COMPRESSED_TENSORS, NAME, result, quant=quant, scale_dtype=torch.bfloat16)
    assert sorted(tensors) == sorted(tensor_names(NAME, quant=quant))
    want_dtype = torch.int8 if scheme == "W8A8" else torch.float8_e4m3fn
    assert tensors[f"{NAME}.weight"].dtype == want_dtype and tensors[f"{NAME}.weight"].shape == (200, 384)
    scale_shape = {"W8A8": (200, 1), "FP8_DYNAMIC": (200, 1), "FP8": (1,), "FP8_BLOCK": (2, 3)}[scheme]
    assert tuple(tensors[f"{NAME}.weight_scale"].shape) == scale_shape
    assert tensors[f"{NAME}.weight_scale"].dtype == torch.bfloat16

    config = quantization_config(quant, ignore=["lm_head"])
    parsed = QuantizationConfig.model_validate(config)
    scheme_ = parsed.config_groups["group_0"]
    compressor = BaseCompressor.load_from_registry(config["format"])
    local = {k[len(NAME) + 1:]: v for k, v in tensors.items()}
    theirs = compressor.decompress(local, scheme_)["weight"]
    ours = dequantize(result, torch.bfloat16)
    assert theirs.dtype == torch.bfloat16 and torch.equal(theirs, ours)

    back = decode_linear(NAME, tensors, quant=quant)
    assert torch.equal(dequantize(back, torch.bfloat16), ours)
    dense = dense_tensors(Format.COMPRESSED_TENSORS, {**tensors, "model.norm.weight": torch.ones(4)}, quant=quant,
                          dtype=torch.bfloat16)
    assert sorted(dense) == [f"{NAME}.weight", "model.norm.weight"] and torch.equal(dense[f"{NAME}.weight"], ours)
    assert quantized_modules(Format.COMPRESSED_TENSORS, quant, tensors) == {NAME}


@pytest.mark.parametrize("scheme", [*SCHEMES, "NVFP4A16", "NVFP4"])
def test_quantization_config_is_what_compressed_tensors_writes_for_the_preset(tmp_path, scheme):
    """Field for field what ModelCompressor writes (llm-compressor's save path) for the same preset, built from
    compressed-tensors' own PRESET_SCHEMES; only `version` (the writer's own) differs."""
    from compressed_tensors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    quant = _quant(scheme)
    ours = quantization_config(quant, ignore=["lm_head"])
    preset = QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[scheme])
    if quant.act_order:                 # W8A8 solves with GPTQ, in activation order (static groups: no g_idx)
        preset.weights.actorder = "weight"
    reference = QuantizationConfig(config_groups={"group_0": preset}, format=ours["format"],
                                   quantization_status="compressed", ignore=["lm_head"])
    (tmp_path / "config.json").write_text("{}")
    ModelCompressor(quantization_config=reference).update_config(str(tmp_path))
    theirs = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert set(theirs) == set(ours)
    assert {k: v for k, v in theirs.items() if k != "version"} == {k: v for k, v in ours.items() if k != "version"}
    assert ours["format"] == {"W8A8": "int-quantized", "NVFP4A16": "nvfp4-pack-quantized",
                              "NVFP4": "nvfp4-pack-quantized"}.get(scheme, "float-quantized")
