"""FP8 block-scaled sources (DeepSeek-V3's release): the config's block size, dequantization against a float64
reference on fresh random inputs (blocks that do not divide the shape included), and `read_tensors` handing
back dequantized weights and everything else as stored."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.factory import write_checkpoint, write_fp8_checkpoint
from wq_ops.errors import CheckpointError
from wq_ops.io.checkpoint import open_checkpoint, read_tensors
from wq_ops.io.fp8_source import dequantize_fp8_blocks, fp8_block_size


def test_block_size_comes_from_the_config():
    assert fp8_block_size({"model_type": "llama"}) is None
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    assert fp8_block_size(config) == (128, 128)


@pytest.mark.parametrize("quantization", [
    {"quant_method": "gptq", "bits": 4},
    {"quant_method": "fp8"},                                    # per-tensor FP8: no block scales
    {"quant_method": "fp8", "weight_block_size": [128, 0]},
])
def test_other_quantized_sources_are_refused(quantization):
    with pytest.raises(CheckpointError, match="already quantized"):
        fp8_block_size({"quantization_config": quantization})


@pytest.mark.parametrize("shape,block", [((256, 384), (128, 128)), ((200, 130), (64, 32)), ((7, 5), (4, 4))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantization_matches_float64(shape, block, dtype):
    gen = torch.Generator().manual_seed(hash((shape, block)) % 2**31)
    weight = (torch.randn(shape, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(-(-shape[0] // block[0]), -(-shape[1] // block[1]), generator=gen) * 1e-3 + 1e-5
    want = weight.double().clone()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            want[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] *= float(scale[i, j])
    got = dequantize_fp8_blocks(weight, scale, block, dtype)
    assert got.dtype == dtype and got.shape == shape
    # Within one unit in the last place of the output dtype (its subnormal step near zero): the product in
    # float32, then one rounding.
    info = torch.finfo(dtype)
    bound = info.eps * want.abs() + info.smallest_normal * info.eps
    assert bool(((got.double() - want).abs() <= bound).all())


def test_a_scale_of_the_wrong_shape_is_refused():
    weight = torch.zeros(256, 256).to(torch.float8_e4m3fn)
    with pytest.raises(CheckpointError, match=r"needs a \(2, 2\) weight_scale_inv; got \(2, 1\)"):
        dequantize_fp8_blocks(weight, torch.ones(2, 1), (128, 128), torch.bfloat16)


def test_read_tensors_dequantizes_only_the_fp8_weights(tmp_path):
    source = write_checkpoint(tmp_path / "bf16", "deepseek_v3")
    fp8_dir, reference_dir = write_fp8_checkpoint(source, tmp_path / "fp8", tmp_path / "ref")
    fp8 = open_checkpoint(str(fp8_dir))
    fp8 = dataclasses.replace(fp8, fp8_block=(32, 32), dequantized_dtype="bfloat16")
    reference = open_checkpoint(str(reference_dir))
    names = [n for n in reference.weight_map if n.startswith("model.layers.1.")] + ["model.embed_tokens.weight"]
    got, want = read_tensors(fp8, names), read_tensors(reference, names)
    scaled = [n for n in names if n + "_scale_inv" in fp8.weight_map]
    assert any(fp8.weight_map[n] != fp8.weight_map[n + "_scale_inv"] for n in scaled)   # scale in another shard
    for name in names:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name
    stored = read_tensors(dataclasses.replace(fp8, fp8_block=None), ["model.layers.1.self_attn.o_proj.weight"])
    assert stored["model.layers.1.self_attn.o_proj.weight"].dtype == torch.float8_e4m3fn
