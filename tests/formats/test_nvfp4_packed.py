"""compressed-tensors nvfp4-pack-quantized (NVFP4, NVFP4A16): golden packing, round trips, and compressed-tensors'
own decompressor reading our tensors back to our weights bit for bit."""

import pytest
import torch

from wq_ops.config import Format, JobConfig
from wq_ops.formats import dense_tensors, encode_linear, quantized_modules
from wq_ops.formats.compressed_tensors import quantization_config
from wq_ops.formats.nvfp4_packed import decode_linear, tensor_names
from wq_ops.quant.nvfp4 import global_scale_of, quantize_nvfp4
from wq_ops.quant.result import Fp4Result, dequantize

NAME = "model.layers.0.mlp.up_proj"


def test_golden_packing_puts_the_even_column_in_the_low_nibble():
    codes = torch.tensor([[1, 2, 15, 8] * 4], dtype=torch.uint8)          # 1 x 16
    result = Fp4Result(codes=codes, scale=torch.ones(1, 1).to(torch.float8_e4m3fn), global_scale=torch.tensor(2.0))
    quant = JobConfig.from_dict({"out": "o", "scheme": "NVFP4A16"}).quant
    t = encode_linear(Format.COMPRESSED_TENSORS, NAME, result, quant=quant, scale_dtype=torch.bfloat16)
    assert sorted(t) == sorted(tensor_names(NAME, quant=quant))
    assert t[f"{NAME}.weight_packed"].dtype == torch.uint8
    assert t[f"{NAME}.weight_packed"].tolist() == [[0x21, 0x8F] * 4]
    assert t[f"{NAME}.weight_global_scale"].tolist() == [2.0]
    assert t[f"{NAME}.weight_global_scale"].dtype == torch.float32


@pytest.mark.parametrize("scheme", ["NVFP4A16", "NVFP4"])
def test_compressed_tensors_decompresses_nvfp4_to_our_weights_bit_for_bit(gen, scheme):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    quant = JobConfig.from_dict({"out": "o", "scheme": scheme}).quant
    w = torch.randn(96, 320, generator=gen) * torch.rand(96, 1, generator=gen) * 0.1
    result = quantize_nvfp4(w, global_scale=global_scale_of(w.abs().max()))
    if quant.activations is not None:
        result = Fp4Result(codes=result.codes, scale=result.scale, global_scale=result.global_scale,
                           input_global_scale=torch.tensor(123.5))
    tensors = encode_linear(Format.COMPRESSED_TENSORS, NAME, result, quant=quant, scale_dtype=torch.bfloat16)
    assert sorted(tensors) == sorted(tensor_names(NAME, quant=quant))
    assert tensors[f"{NAME}.weight_packed"].shape == (96, 160)
    assert tensors[f"{NAME}.weight_scale"].shape == (96, 20)
    assert tensors[f"{NAME}.weight_scale"].dtype == torch.float8_e4m3fn

    config = quantization_config(quant, ignore=["lm_head"])
    assert config["format"] == "nvfp4-pack-quantized"
    scheme_ = QuantizationConfig.model_validate(config).config_groups["group_0"]
    local = {k[len(NAME) + 1:]: v for k, v in tensors.items()}
    theirs = BaseCompressor.load_from_registry(config["format"]).decompress(local, scheme_)["weight"]
    ours = dequantize(result, torch.bfloat16)
    assert theirs.dtype == torch.bfloat16 and torch.equal(theirs, ours)

    back = decode_linear(NAME, tensors, quant=quant)
    assert torch.equal(back.codes, result.codes) and torch.equal(back.global_scale, result.global_scale)
    dense = dense_tensors(Format.COMPRESSED_TENSORS, tensors, quant=quant, dtype=torch.bfloat16)
    assert sorted(dense) == [f"{NAME}.weight"] and torch.equal(dense[f"{NAME}.weight"], ours)
    assert quantized_modules(Format.COMPRESSED_TENSORS, quant, tensors) == {NAME}
