"""GPTQ v1: golden bytes, round trips, a dequantizer written from the readers' code (AutoGPTQ's torch path, as
vLLM and GPTQModel carry it) and agreement with compressed-tensors' own decompressor on the same codes."""

import pytest
import torch

from wq_ops.config import Format, QuantConfig
from wq_ops.errors import ArtifactError
from wq_ops.formats import compressed_tensors as ct
from wq_ops.formats import format_module, scale_dtype
from wq_ops.formats.gptq import decode_linear, encode_linear, quantization_config, tensor_names
from wq_ops.quant.result import QuantResult, dequantize
from wq_ops.quant.rtn import quantize_rtn

NAME = "model.layers.0.mlp.up_proj"
SCALES = [[0.5, 0.25], [1.0, 2.0], [0.125, 0.75], [1.5, 0.0625]] * 2


def tiny(sym: bool) -> QuantResult:
    """out=8, in=64, two groups of 32. Code of row o, column j: (j + o) % 16."""
    j = torch.arange(64)
    codes = torch.stack([(j + o) % 16 for o in range(8)]).to(torch.uint8)       # (8, 64)
    zero = (torch.full((8, 2), 8, dtype=torch.uint8) if sym
            else torch.tensor([[o + 1, 15 - o] for o in range(8)], dtype=torch.uint8))
    return QuantResult(codes=codes, scale=torch.tensor(SCALES), zero=zero, bits=4, group_size=32)


def u32(x: int) -> int:
    """An unsigned 32-bit pattern as the int32 value torch stores."""
    return x - (1 << 32) if x >= 1 << 31 else x


def test_golden_tensors_symmetric():
    t = encode_linear(NAME, tiny(True), sym=True, scale_dtype=torch.float16)
    assert tuple(sorted(t)) == tuple(sorted(tensor_names(NAME, sym=True)))
    qweight = t[f"{NAME}.qweight"]
    assert qweight.dtype == torch.int32 and qweight.shape == (8, 8)           # (in * 4 / 32, out)
    # Column o packs codes (j + o) % 16 of input rows j = 0..63, code j at bits 4(j % 8) of word j // 8.
    assert qweight[:, 0].tolist() == [0x76543210, u32(0xFEDCBA98)] * 4
    assert qweight[:, 1].tolist() == [u32(0x87654321), 0x0FEDCBA9] * 4
    assert qweight[:, 7].tolist() == [u32(0xEDCBA987), 0x6543210F] * 4
    # v1 stores zero - 1: 8 - 1 = 7 in every nibble; (groups, out * 4 / 32).
    assert t[f"{NAME}.qzeros"].dtype == torch.int32 and t[f"{NAME}.qzeros"].tolist() == [[0x77777777]] * 2
    scales = t[f"{NAME}.scales"]
    assert scales.dtype == torch.float16 and scales.shape == (2, 8)           # (groups, out)
    assert scales.view(torch.int16).tolist() == [[0x3800, 0x3C00, 0x3000, 0x3E00] * 2,
                                                 [0x3400, 0x4000, 0x3A00, 0x2C00] * 2]
    assert t[f"{NAME}.g_idx"].dtype == torch.int32 and t[f"{NAME}.g_idx"].tolist() == [0] * 32 + [1] * 32


def test_golden_zero_points_asymmetric():
    t = encode_linear(NAME, tiny(False), sym=False, scale_dtype=torch.float16)
    # Group 0: zeros 1..8 stored as 0..7; group 1: zeros 15..8 stored as 14..7, row o in nibble o.
    assert t[f"{NAME}.qzeros"].tolist() == [[0x76543210], [0x789ABCDE]]


def test_golden_three_bit_codes_straddle_words_like_autogptq():
    # AutoGPTQ's 3-bit "10-1-10-1-10" layout: code 10 has its low two bits at bits 30-31 of word 0 and its
    # high bit at bit 0 of word 1; code 21 its low bit at bit 31 of word 1 and the rest at bits 0-1 of word 2.
    codes = torch.zeros(32, 32, dtype=torch.uint8)
    codes[0, 10] = 0b111
    codes[1, 21] = 0b111
    zero = torch.full((32, 1), 4, dtype=torch.uint8)
    result = QuantResult(codes=codes, scale=torch.ones(32, 1), zero=zero, bits=3, group_size=None)
    t = encode_linear(NAME, result, sym=True, scale_dtype=torch.float16)
    qweight = t[f"{NAME}.qweight"]
    assert qweight.shape == (3, 32)
    assert qweight[:, 0].tolist() == [u32(0xC0000000), 0b1, 0]
    assert qweight[:, 1].tolist() == [0, u32(0x80000000), 0b11]
    # qzeros: 3 stored in each of 32 output columns = one 96-bit stream of 0b011: words 0xDB6DB6DB, ...
    assert t[f"{NAME}.qzeros"].tolist() == [[u32(0xDB6DB6DB), u32(0xB6DB6DB6), 0x6DB6DB6D]]
    assert t[f"{NAME}.g_idx"].tolist() == [0] * 32


def test_golden_quantization_config():
    q = QuantConfig(bits=4, group_size=128, sym=True)         # GPTQ, act-order on by default
    assert quantization_config(q, ignore=["lm_head"]) == {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": 128, "sym": True,
        "desc_act": False, "static_groups": True, "lm_head": False,
    }
    channel = quantization_config(QuantConfig(bits=8, group_size=None, sym=False),
                                  ignore=["lm_head", "model.layers.3.mlp.down_proj"])
    assert channel["group_size"] == -1 and channel["sym"] is False
    assert channel["dynamic"] == {r"-:model\.layers\.3\.mlp\.down_proj$": {}}


def test_quantize_config_json_holds_what_autogptq_and_gptqmodel_read():
    import wq_ops
    from wq_ops.formats import side_files

    q = QuantConfig(bits=4, group_size=64, sym=True)
    ignore = ["lm_head", "model.layers.1.mlp.down_proj"]
    files = side_files(Format.GPTQ, q, ignore=ignore)
    assert list(files) == ["quantize_config.json"]
    assert files["quantize_config.json"] == {
        **quantization_config(q, ignore=ignore), "damp_percent": 0.01, "true_sequential": True, "pack_dtype": "int32",
        "meta": {"quantizer": [f"wq:{wq_ops.__version__}"]}}
    assert side_files(Format.COMPRESSED_TENSORS, q, ignore=ignore) == {}


def test_transformers_reads_the_config():
    from transformers import GPTQConfig

    q = QuantConfig(bits=3, group_size=64, sym=False)
    config = GPTQConfig.from_dict(quantization_config(q, ignore=[]))
    assert (config.bits, config.group_size, config.sym, config.desc_act) == (3, 64, False, False)
    assert config.format == "gptq" and config.quant_method == "gptq"


def test_format_table_and_scale_dtype():
    from wq_ops.formats import gptq

    assert format_module(Format.GPTQ) is gptq
    assert scale_dtype(Format.GPTQ, model_dtype=torch.bfloat16) == torch.float16
    assert scale_dtype(Format.COMPRESSED_TENSORS, model_dtype=torch.bfloat16) == torch.bfloat16


def dequantize_like_autogptq(qweight, qzeros, scales, g_idx, bits):
    """AutoGPTQ's pure-torch dequantization (the fallback in its QuantLinear, carried by vLLM's and GPTQModel's
    torch paths), written independently of wq_ops.pack: shift tables, the 3-bit word fix-ups, zeros + 1.
    Returns W as (out, in) float32."""
    maxq = 2**bits - 1
    if bits in (2, 4, 8):
        wf = torch.arange(0, 32, bits, dtype=torch.int32)
        zeros = (qzeros.unsqueeze(2) >> wf.view(1, 1, -1)) & maxq                     # (G, out/pf, pf)
        zeros = zeros.reshape(qzeros.shape[0], -1)
        weight = (qweight.unsqueeze(1) >> wf.view(1, -1, 1)) & maxq                    # (in/pf, pf, out)
        weight = weight.reshape(-1, qweight.shape[1])
    else:
        wf = torch.tensor([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0],
                           [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
                           [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]], dtype=torch.int32).reshape(1, 3, 12)
        z = qzeros.reshape(qzeros.shape[0], qzeros.shape[1] // 3, 3, 1).expand(-1, -1, -1, 12)
        z = z >> wf.unsqueeze(0)
        z[:, :, 0, 10] = (z[:, :, 0, 10] & 0x3) | ((z[:, :, 1, 0] << 2) & 0x4)
        z[:, :, 1, 11] = (z[:, :, 1, 11] & 0x1) | ((z[:, :, 2, 0] << 1) & 0x6)
        z = z & 0x7
        zeros = torch.cat([z[:, :, 0, :11], z[:, :, 1, 1:12], z[:, :, 2, 1:11]], dim=2).reshape(scales.shape)
        w = qweight.reshape(qweight.shape[0] // 3, 3, 1, qweight.shape[1]).expand(-1, -1, 12, -1)
        w = (w >> wf.unsqueeze(-1)) & 0x7
        w[:, 0, 10] = (w[:, 0, 10] & 0x3) | ((w[:, 1, 0] << 2) & 0x4)
        w[:, 1, 11] = (w[:, 1, 11] & 0x1) | ((w[:, 2, 0] << 1) & 0x6)
        w = w & 0x7
        weight = torch.cat([w[:, 0, :11], w[:, 1, 1:12], w[:, 2, 1:11]], dim=1)
        weight = weight.reshape(-1, qweight.shape[1])
    zeros = zeros + 1                                                                    # the v1 convention
    g = g_idx.long()
    w_in_out = scales.float()[g] * (weight.float() - zeros.float()[g])                  # (in, out)
    return w_in_out.T.contiguous()


def random_result(gen, *, bits, group_size, sym, out_features=64, in_features=256):
    w = torch.randn(out_features, in_features, generator=gen)
    span = group_size or in_features
    w[:, ::span] = -w[:, ::span].abs() - 1.0       # every group has a clearly negative weight: zero point >= 1
    return quantize_rtn(w, bits=bits, group_size=group_size, sym=sym, scale_dtype=torch.float16)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 128), (3, 64), (8, None), (2, 32), (3, None)])
def test_round_trip_and_reader_dequantization(gen, sym, bits, group_size):
    result = random_result(gen, bits=bits, group_size=group_size, sym=sym)
    tensors = encode_linear(NAME, result, sym=sym, scale_dtype=torch.float16)
    back = decode_linear(NAME, tensors, bits=bits, group_size=group_size)
    assert torch.equal(back.codes, result.codes) and torch.equal(back.zero, result.zero)
    assert torch.equal(back.scale, result.scale)
    theirs = dequantize_like_autogptq(tensors[f"{NAME}.qweight"], tensors[f"{NAME}.qzeros"],
                                      tensors[f"{NAME}.scales"], tensors[f"{NAME}.g_idx"], bits)
    assert torch.equal(theirs, dequantize(result))        # exact: (q - z) * s of an fp16 s is exact in fp32


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, None), (2, 64), (3, 32)])
def test_gptq_and_compressed_tensors_artifacts_dequantize_alike(gen, sym, bits, group_size):
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    result = random_result(gen, bits=bits, group_size=group_size, sym=sym)
    gptq_tensors = encode_linear(NAME, result, sym=sym, scale_dtype=torch.float16)
    ours = dequantize_like_autogptq(gptq_tensors[f"{NAME}.qweight"], gptq_tensors[f"{NAME}.qzeros"],
                                    gptq_tensors[f"{NAME}.scales"], gptq_tensors[f"{NAME}.g_idx"], bits)
    ct_tensors = ct.encode_linear(NAME, result, sym=sym, scale_dtype=torch.float16)
    q = QuantConfig(bits=bits, group_size=group_size, sym=sym)
    config = QuantizationConfig.model_validate(ct.quantization_config(q, ignore=["lm_head"]))
    scheme: QuantizationScheme = config.config_groups["group_0"]
    assert isinstance(scheme.weights, QuantizationArgs)
    local = {k[len(NAME) + 1:]: v for k, v in ct_tensors.items()}
    theirs = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    assert theirs.dtype == torch.float16
    assert torch.equal(theirs, ours.to(torch.float16))


def test_zero_point_zero_is_refused():
    bad = tiny(False)
    bad.zero[3, 1] = 0
    with pytest.raises(ArtifactError, match=r"zero point 0 at row 3, group 1"):
        encode_linear(NAME, bad, sym=False, scale_dtype=torch.float16)


def test_scales_must_be_float16():
    with pytest.raises(ArtifactError, match="float16 scales"):
        encode_linear(NAME, tiny(True), sym=True, scale_dtype=torch.bfloat16)
    inexact = QuantResult(codes=tiny(True).codes, scale=torch.full((8, 2), 0.1), zero=tiny(True).zero, bits=4,
                          group_size=32)
    with pytest.raises(ArtifactError, match="not exact in float16"):
        encode_linear(NAME, inexact, sym=True, scale_dtype=torch.float16)


def test_shapes_the_layout_cannot_hold_are_refused():
    odd = QuantResult(codes=torch.zeros(8, 48, dtype=torch.uint8), scale=torch.ones(8, 1),
                      zero=torch.full((8, 1), 8, dtype=torch.uint8), bits=4, group_size=None)
    with pytest.raises(ArtifactError, match="in_features=48"):
        encode_linear(NAME, odd, sym=True, scale_dtype=torch.float16)
    narrow = QuantResult(codes=torch.zeros(4, 32, dtype=torch.uint8), scale=torch.ones(4, 1),
                         zero=torch.full((4, 1), 4, dtype=torch.uint8), bits=3, group_size=None)
    with pytest.raises(ArtifactError, match="out_features=4 x 3 bits"):
        encode_linear(NAME, narrow, sym=True, scale_dtype=torch.float16)


def test_decode_refuses_a_permuted_g_idx():
    t = encode_linear(NAME, tiny(True), sym=True, scale_dtype=torch.float16)
    t[f"{NAME}.g_idx"] = t[f"{NAME}.g_idx"].flip(0).contiguous()
    with pytest.raises(ArtifactError, match="static grouping"):
        decode_linear(NAME, t, bits=4, group_size=32)
