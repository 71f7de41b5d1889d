"""compressed-tensors pack-quantized: golden bytes, round trips, and agreement with compressed-tensors'
own decompressor (the reference implementation vLLM and transformers follow)."""


import pytest
import torch

from wq_ops.config import QuantConfig
from wq_ops.formats.compressed_tensors import decode_linear, encode_linear, quantization_config
from wq_ops.quant.result import QuantResult, dequantize
from wq_ops.quant.rtn import quantize_rtn

NAME = "model.layers.0.mlp.up_proj"


def tiny(sym: bool) -> QuantResult:
    codes = (torch.arange(4 * 64) % 16).reshape(4, 64).to(torch.uint8)
    scale = torch.tensor([[0.5, 0.25], [1.0, 2.0], [0.125, 0.75], [1.5, 0.0625]])
    zero = (torch.full((4, 2), 8, dtype=torch.uint8) if sym
            else torch.tensor([[0, 15], [7, 8], [3, 12], [1, 9]], dtype=torch.uint8))
    return QuantResult(codes=codes, scale=scale, zero=zero, bits=4, group_size=32)


def test_golden_tensors_symmetric():
    t = encode_linear(NAME, tiny(True), sym=True, scale_dtype=torch.bfloat16)
    assert sorted(t) == [f"{NAME}.weight_packed", f"{NAME}.weight_scale", f"{NAME}.weight_shape"]
    packed = t[f"{NAME}.weight_packed"]
    assert packed.dtype == torch.int32 and packed.shape == (4, 8)
    # Each row holds codes 0..15 four times: element i at bits 4i..4i+3 of word i // 8.
    row = [0x76543210, 0xFEDCBA98 - (1 << 32)] * 4
    assert packed.tolist() == [row] * 4
    assert t[f"{NAME}.weight_scale"].dtype == torch.bfloat16
    assert t[f"{NAME}.weight_scale"].view(torch.int16).tolist() == [[16128, 16000], [16256, 16384],
                                                                     [15872, 16192], [16320, 15744]]
    assert t[f"{NAME}.weight_shape"].tolist() == [4, 64] and t[f"{NAME}.weight_shape"].dtype == torch.int64


def test_golden_zero_points_pack_along_rows():
    t = encode_linear(NAME, tiny(False), sym=False, scale_dtype=torch.bfloat16)
    zp = t[f"{NAME}.weight_zero_point"]
    # Column g's zero points of rows 0..3 form one bit stream: [0, 7, 3, 1] and [15, 8, 12, 9].
    assert zp.dtype == torch.int32 and zp.shape == (1, 2)
    assert zp.tolist() == [[0x1370, 0x9C8F]]


def test_golden_quantization_config():
    q = QuantConfig(bits=4, group_size=128, sym=True)         # GPTQ, act-order on by default
    assert quantization_config(q, ignore=["model.layers.0.mlp.down_proj", "lm_head"]) == {
        "version": "0.20.1",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 128, "strategy": "group",
                        "dynamic": False, "actorder": "weight"},
            "input_activations": None, "output_activations": None, "format": None}},
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": None,
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": ["lm_head", "model.layers.0.mlp.down_proj"],
        "sparsity_config": {},
        "transform_config": {},
        "moe_sparsity_config": None,
    }
    channel = quantization_config(QuantConfig(bits=8, group_size=None, sym=False), ignore=[])
    assert channel["config_groups"]["group_0"]["weights"]["strategy"] == "channel"


@pytest.mark.parametrize("quant", [QuantConfig(bits=4, group_size=128),
                                   QuantConfig(bits=8, group_size=None, sym=False)])
def test_quantization_config_has_the_fields_compressed_tensors_own_writer_emits(tmp_path, quant):
    """What ModelCompressor.update_config (llm-compressor's save path) writes for the same scheme: the same
    fields and values, but `version`, which is the writing package's own (ours: the release we match)."""
    import json

    from compressed_tensors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    ours = quantization_config(quant, ignore=["lm_head"])
    (tmp_path / "config.json").write_text("{}")
    ModelCompressor(quantization_config=QuantizationConfig.model_validate(ours)).update_config(str(tmp_path))
    theirs = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert set(theirs) == set(ours), f"only theirs: {set(theirs) - set(ours)}; only ours: {set(ours) - set(theirs)}"
    assert {k: v for k, v in theirs.items() if k != "version"} == {k: v for k, v in ours.items() if k != "version"}


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 64), (8, None), (2, 32)])
def test_round_trip_and_compressed_tensors_agree(gen, sym, bits, group_size):
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    w = torch.randn(40, 128, generator=gen)
    result = quantize_rtn(w, bits=bits, group_size=group_size, sym=sym, scale_dtype=torch.bfloat16)
    tensors = encode_linear(NAME, result, sym=sym, scale_dtype=torch.bfloat16)
    back = decode_linear(NAME, tensors, bits=bits, group_size=group_size)
    assert torch.equal(back.codes, result.codes) and torch.equal(back.zero, result.zero)
    assert torch.equal(back.scale, result.scale)

    q = QuantConfig(bits=bits, group_size=group_size, sym=sym)
    config = QuantizationConfig.model_validate(quantization_config(q, ignore=["lm_head"]))
    scheme: QuantizationScheme = config.config_groups["group_0"]
    assert isinstance(scheme.weights, QuantizationArgs)
    local = {k[len(NAME) + 1:]: v for k, v in tensors.items()}
    theirs = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    ours = dequantize(result, torch.bfloat16)
    assert theirs.dtype == torch.bfloat16
    assert torch.equal(theirs, ours)     # bit for bit: the engine reconstructs what we propagated


@pytest.mark.gpu
@pytest.mark.parametrize("sym", [True, False])
def test_the_gpu_encodes_the_same_bytes(gen, sym):
    """The CUDA backend packs the codes and (asymmetric) the zero points, bit for bit as the reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from wq_ops.config import Backend

    w = torch.randn(96, 256, generator=gen)
    result = quantize_rtn(w, bits=4, group_size=32, sym=sym, scale_dtype=torch.bfloat16)
    on_gpu = QuantResult(codes=result.codes.cuda(), scale=result.scale.cuda(), zero=result.zero.cuda(), bits=4,
                         group_size=32)
    want = encode_linear(NAME, result, sym=sym, scale_dtype=torch.bfloat16)
    got = encode_linear(NAME, on_gpu, sym=sym, scale_dtype=torch.bfloat16, backend=Backend.CUDA)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert torch.equal(got[name].cpu(), t), name
