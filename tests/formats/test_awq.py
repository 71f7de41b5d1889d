"""AutoAWQ's GEMM layout: golden packing, round trips, and a dequantizer written from AutoAWQ's reader code
(unpack each word's eight nibbles, undo the interleaved column order, (q - z) * s) giving wq's weights."""

import json

import pytest
import torch

from tests.factory import write_checkpoint, write_text
from wq_ops.cluster.driver import run_job
from wq_ops.config import Format, JobConfig, QuantConfig
from wq_ops.errors import ArtifactError, ConfigError
from wq_ops.formats import dense_tensors
from wq_ops.formats.awq import decode_linear, encode_linear, quantization_config
from wq_ops.quant.result import QuantResult, dequantize
from wq_ops.quant.rtn import quantize_rtn

NAME = "model.layers.0.mlp.up_proj"
_REVERSE = [0, 4, 1, 5, 2, 6, 3, 7]          # AutoAWQ's AWQ_REVERSE_ORDER


def autoawq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int):
    """As AutoAWQ's reader does: (in, out) float16 weights from qweight (in, out/8), qzeros (G, out/8), scales
    (G, out). Returned transposed to (out, in), the linear's weight."""
    shifts = torch.arange(0, 32, 4)
    iweights = (qweight[:, :, None] >> shifts[None, None, :]).to(torch.int8).reshape(qweight.shape[0], -1)
    izeros = (qzeros[:, :, None] >> shifts[None, None, :]).to(torch.int8).reshape(qzeros.shape[0], -1)
    order = torch.arange(iweights.shape[-1]).reshape(-1, 8)[:, _REVERSE].reshape(-1)
    iweights, izeros = iweights[:, order] & 0xF, izeros[:, order] & 0xF
    scale = scales.repeat_interleave(group_size, dim=0)
    zero = izeros.repeat_interleave(group_size, dim=0)
    return ((iweights - zero).to(torch.float16) * scale).T


def test_golden_packing_order_and_round_trip(gen):
    codes = torch.randint(0, 16, (16, 64), generator=gen, dtype=torch.uint8)     # (out, in)
    zero = torch.randint(1, 15, (16, 2), generator=gen, dtype=torch.uint8)
    scale = torch.rand(16, 2, generator=gen).to(torch.float16).to(torch.float32)
    result = QuantResult(codes=codes, scale=scale, zero=zero, bits=4, group_size=32)
    t = encode_linear(NAME, result, sym=False, scale_dtype=torch.float16)
    qweight = t[f"{NAME}.qweight"]
    assert qweight.shape == (64, 2) and qweight.dtype == torch.int32
    word = int(qweight[5, 1]) & 0xFFFFFFFF            # input column 5, output columns 8..15
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [int(codes[8 + c, 5]) for c in (0, 2, 4, 6, 1, 3, 5, 7)]
    back = decode_linear(NAME, t, bits=4, group_size=32)
    assert torch.equal(back.codes, codes) and torch.equal(back.zero, zero) and torch.equal(back.scale, scale)


@pytest.mark.parametrize("sym", [True, False])
def test_autoawq_reader_dequantizes_to_our_weights(gen, sym):
    w = torch.randn(48, 256, generator=gen)
    result = quantize_rtn(w, bits=4, group_size=64, sym=sym, scale_dtype=torch.float16)
    t = encode_linear(NAME, result, sym=sym, scale_dtype=torch.float16)
    theirs = autoawq_dequantize(t[f"{NAME}.qweight"], t[f"{NAME}.qzeros"], t[f"{NAME}.scales"], 64)
    assert torch.equal(theirs, dequantize(result, torch.float16))


def test_awq_refuses_what_its_layout_cannot_hold(gen):
    w = torch.randn(12, 64, generator=gen)
    odd = quantize_rtn(w, bits=4, group_size=32, sym=True, scale_dtype=torch.float16)
    with pytest.raises(ArtifactError, match="out_features=12 is not a multiple of 8"):
        encode_linear(NAME, odd, sym=True, scale_dtype=torch.float16)
    with pytest.raises(ConfigError, match="format=awq: AutoAWQ's GEMM layout holds 4-bit codes in groups"):
        JobConfig.from_dict({"out": "o", "format": "awq", "bits": 8})
    with pytest.raises(ConfigError, match="format=awq stores integer weight-only schemes"):
        JobConfig.from_dict({"out": "o", "format": "awq", "scheme": "FP8_DYNAMIC"})


def test_quantization_config_has_autoawq_fields():
    assert quantization_config(QuantConfig(bits=4, group_size=128), ignore=["lm_head"]) == {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128, "zero_point": True,
        "modules_to_not_convert": ["lm_head"]}


def test_an_awq_job_writes_what_autoawq_reads_back_as_wq_replays_it(tmp_path):
    model = write_checkpoint(tmp_path / "m", "llama")
    calib = write_text(tmp_path / "calib.txt")
    job = JobConfig.from_dict({"out": str(tmp_path / "out"), "model": str(model), "calib": str(calib), "samples": 6,
                               "seq_len": 64, "runtime": "local", "method": "awq", "format": "awq", "group_size": 64,
                               "sym": False})
    result = run_job(job, cache_dir=tmp_path / "cache")
    config = json.loads((result.out_dir / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "awq" and config["version"] == "gemm"
    from safetensors.torch import load_file

    tensors = {}
    for path in result.out_dir.glob("*.safetensors"):
        tensors.update(load_file(path))
    dense = dense_tensors(Format.AWQ, tensors, quant=job.quant, dtype=torch.float16)
    modules = sorted(n.removesuffix(".qweight") for n in tensors if n.endswith(".qweight"))
    assert len(modules) == 3 * 7
    for m in modules:
        theirs = autoawq_dequantize(tensors[m + ".qweight"], tensors[m + ".qzeros"], tensors[m + ".scales"], 64)
        assert torch.equal(theirs, dense[m + ".weight"]), m
    assert result.report["compatibility"]["loader"]["quant_method"] == "awq"
