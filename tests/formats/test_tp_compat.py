"""Tensor-parallel compatibility: vLLM's partitioning rules on real model shapes, the padding that fixes a
refused size (Qwen2-72B's intermediate_size is the classic case), and the exactness of the padding itself."""

import pytest
import torch

from tests.factory import tiny_config
from wq_ops.config import Format, QuantConfig
from wq_ops.errors import ConfigError
from wq_ops.formats import gptq
from wq_ops.formats.loader import loader_requirements
from wq_ops.formats.padding import pad_input_columns, pad_output_rows
from wq_ops.formats.tp_compat import AttentionShape, attention_shape, check_tp_sizes, padding_for_sizes
from wq_ops.model.architecture import BlockLayout, LinearSpec, ModelLayout, describe_model
from wq_ops.quant.result import dequantize
from wq_ops.quant.rtn import quantize_rtn


def llama_layout(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int) -> ModelLayout:
    q, kv = heads * head_dim, kv_heads * head_dim
    linears = (LinearSpec("self_attn.q_proj", hidden, q, False), LinearSpec("self_attn.k_proj", hidden, kv, False),
               LinearSpec("self_attn.v_proj", hidden, kv, False), LinearSpec("self_attn.o_proj", q, hidden, False),
               LinearSpec("mlp.gate_proj", hidden, intermediate, False),
               LinearSpec("mlp.up_proj", hidden, intermediate, False),
               LinearSpec("mlp.down_proj", intermediate, hidden, False))
    block = BlockLayout(kind="dense", linears=linears, params={})
    return ModelLayout(architecture="LlamaForCausalLM", model_type="llama", block_prefix="model.layers",
                       blocks=(block, block), outer_params={}, outer_linears=("lm_head",),
                       embed_name="model.embed_tokens.weight", hidden_size=hidden, vocab_size=1000,
                       tied_embeddings=False, dtype=torch.bfloat16)


LLAMA3_8B = (llama_layout(4096, 14336, 32, 8, 128), AttentionShape(32, 8, 128))
QWEN2_72B = (llama_layout(8192, 29568, 64, 8, 128), AttentionShape(64, 8, 128))
SMOLLM2_135M = (llama_layout(576, 1536, 9, 3, 64), AttentionShape(9, 3, 64))


@pytest.mark.parametrize("fmt", [Format.COMPRESSED_TENSORS, Format.GPTQ])
def test_llama3_8b_loads_at_every_usual_size(fmt):
    report = check_tp_sizes(*LLAMA3_8B, QuantConfig(bits=4, group_size=128), fmt, tp_sizes=(1, 2, 4, 8))
    assert report.ok_sizes == (1, 2, 4, 8)
    assert all(c.padding is None for c in report.checks)


def test_qwen2_72b_intermediate_needs_padding_beyond_tp1():
    report = check_tp_sizes(*QWEN2_72B, QuantConfig(bits=4, group_size=128), Format.GPTQ, tp_sizes=(1, 2, 4, 8))
    assert report.ok_sizes == (1,)
    tp2 = report.checks[1]
    assert not tp2.loadable
    assert any("mlp.down_proj (tp=2, per rank out=8192, in=14784)" in r and "groups of 128" in r
               for r in tp2.layout_reasons)
    # The padding Qwen published for its own GPTQ/AWQ releases: 29568 -> 29696, a multiple of 8 x 128.
    for check in report.checks[1:]:
        assert check.padding is not None and check.padding.padded_size == 29696
        assert "29568 -> 29696" in check.padding.describe()
    padded = llama_layout(8192, 29696, 64, 8, 128)
    assert check_tp_sizes(padded, QWEN2_72B[1], QuantConfig(bits=4, group_size=128), Format.GPTQ,
                          tp_sizes=(1, 2, 4, 8)).ok_sizes == (1, 2, 4, 8)


def test_one_padding_serves_every_requested_size():
    quant = QuantConfig(bits=4, group_size=128)
    padding = padding_for_sizes(*QWEN2_72B, quant, Format.GPTQ, tp_sizes=(1, 2, 4, 8))
    assert padding is not None and padding.padded_size == 29696
    report = check_tp_sizes(*QWEN2_72B, quant, Format.GPTQ, tp_sizes=(1, 2, 4, 8), padding=padding)
    assert report.ok_sizes == (1, 2, 4, 8) and report.to_dict()["padding_applied"]["padded_size"] == 29696
    # Only the sizes asked for count: tp=2 alone needs a multiple of 2 x 128 (29696 again, by chance).
    assert padding_for_sizes(*QWEN2_72B, quant, Format.GPTQ, tp_sizes=(2,)).padded_size == 29696
    assert padding_for_sizes(*LLAMA3_8B, quant, Format.GPTQ, tp_sizes=(1, 2, 4, 8)) is None


def test_head_counts_are_checked_and_padding_cannot_fix_them():
    report = check_tp_sizes(*SMOLLM2_135M, QuantConfig(bits=4, group_size=64), Format.COMPRESSED_TENSORS,
                            tp_sizes=(1, 2, 3))
    tp1, tp2, tp3 = report.checks
    assert tp1.loadable and tp3.loadable and not tp2.loadable
    assert "num_attention_heads=9 is not divisible by tp=2" in tp2.layout_reasons
    assert any("num_key_value_heads=3" in r for r in tp2.layout_reasons)
    assert tp2.padding is None
    # hidden_size 576 is not a multiple of Marlin's k tile (128): even tp=1 needs the fallback kernel.
    assert not tp1.ok and any("min_thread_k=128" in r and "self_attn.q_proj" in r for r in tp1.marlin_reasons)


def test_kv_heads_replicate_when_tp_exceeds_them():
    layout, _ = LLAMA3_8B
    report = check_tp_sizes(layout, AttentionShape(32, 8, 128), QuantConfig(bits=4, group_size=128),
                            Format.GPTQ, tp_sizes=(16,))
    assert report.checks[0].loadable                       # 8 kv heads, tp=16: each replicated on two ranks
    odd = check_tp_sizes(layout, AttentionShape(32, 6, 128), QuantConfig(bits=4, group_size=128), Format.GPTQ,
                         tp_sizes=(4,))
    assert any("num_key_value_heads=6" in r for r in odd.checks[0].layout_reasons)


def test_three_bit_gptq_needs_32_aligned_output_per_rank():
    # qzeros packs 32 three-bit zeros into 3 words: a k_proj of 16 output columns has no whole word.
    layout, attention = llama_layout(1024, 2048, 16, 1, 16), AttentionShape(16, 1, 16)
    report = check_tp_sizes(layout, attention, QuantConfig(bits=3, group_size=128), Format.GPTQ, tp_sizes=(1,))
    reasons = report.checks[0].layout_reasons
    assert any("self_attn.k_proj" in r and "output dim 16 x 3 bits" in r for r in reasons)
    assert not any("q_proj" in r for r in reasons)                      # 256 columns: 24 whole words
    assert report.checks[0].marlin_reasons == ("Marlin does not run 3-bit with group_size=128 at any tp",)


def test_compressed_tensors_packs_the_output_dim_only_for_zero_points():
    # k_proj of one 36-wide head: 36 x 4 bits is not whole words, which only asymmetric schemes store.
    layout, attention = llama_layout(1024, 2048, 32, 1, 36), AttentionShape(32, 1, 36)
    sym = check_tp_sizes(layout, attention, QuantConfig(bits=4, group_size=128), Format.COMPRESSED_TENSORS,
                         tp_sizes=(1,))
    assert sym.checks[0].loadable
    asym = check_tp_sizes(layout, attention, QuantConfig(bits=4, group_size=128, sym=False),
                          Format.COMPRESSED_TENSORS, tp_sizes=(1,))
    assert any("self_attn.k_proj" in r and "weight_zero_point" in r for r in asym.checks[0].layout_reasons)


def test_ignored_layers_are_not_checked_as_quantized():
    layout, attention = QWEN2_72B
    q = QuantConfig(bits=4, group_size=128, ignore=("model.layers.*.mlp.*",))
    assert check_tp_sizes(layout, attention, q, Format.GPTQ, tp_sizes=(2,)).ok_sizes == (2,)


def test_bad_tp_sizes_are_a_config_error():
    with pytest.raises(ConfigError, match="tp_sizes"):
        check_tp_sizes(*LLAMA3_8B, QuantConfig(), Format.GPTQ, tp_sizes=(0, 2))


def test_report_from_a_real_config_and_layout():
    config = tiny_config("qwen3")
    report = check_tp_sizes(describe_model(config), attention_shape(config), QuantConfig(bits=4, group_size=32),
                            Format.GPTQ, tp_sizes=(1, 2, 4))
    d = report.to_dict()
    assert d["loader"]["quant_method"] == "gptq" and d["loader"]["checkpoint_format"] == "gptq"
    assert [c["tp"] for c in d["tensor_parallel"]] == [1, 2, 4]
    assert d["ok_tp_sizes"] == list(report.ok_sizes)
    assert attention_shape(config) == AttentionShape(4, 2, 32)


def test_loader_requirements_name_what_the_config_needs():
    ct = loader_requirements(QuantConfig(bits=4, group_size=128), Format.COMPRESSED_TENSORS)
    assert (ct.quant_method, ct.checkpoint_format) == ("compressed-tensors", "pack-quantized")
    g = loader_requirements(QuantConfig(bits=4, group_size=128), Format.GPTQ)
    assert {(v.package, v.minimum) for v in g.versions} >= {("optimum", "1.24.0"), ("gptqmodel", "1.4.3"),
                                                            ("vllm", "0.7.3")}
    ct = loader_requirements(QuantConfig(bits=4, group_size=128), Format.COMPRESSED_TENSORS)
    assert {(v.package, v.minimum) for v in ct.versions} == {("compressed-tensors", "0.6.0"),
                                                             ("transformers", "4.48.0"), ("vllm", "0.5.1")}
    asym = loader_requirements(QuantConfig(bits=4, group_size=128, sym=False), Format.COMPRESSED_TENSORS)
    assert ("vllm", "0.8.5") in {(v.package, v.minimum) for v in asym.versions}      # zero points


def test_padding_is_exact(gen):
    """Padded rows and columns dequantize to exactly 0, the original part is bit-identical, and the MLP's
    output is unchanged (float64; any difference could only come from summation order, hence 1e-12)."""
    hidden, inter, extra, gs = 64, 96, 32, 32
    w_gate, w_up = torch.randn(inter, hidden, generator=gen), torch.randn(inter, hidden, generator=gen)
    w_down = torch.randn(hidden, inter, generator=gen)
    q = dict(bits=4, group_size=gs, sym=False, scale_dtype=torch.float16)
    gate, up, down = quantize_rtn(w_gate, **q), quantize_rtn(w_up, **q), quantize_rtn(w_down, **q)
    pgate, pup, pdown = pad_output_rows(gate, extra), pad_output_rows(up, extra), pad_input_columns(down, extra)
    assert pgate.shape == (inter + extra, hidden) and pdown.shape == (hidden, inter + extra)
    for orig, padded in ((gate, pgate), (up, pup)):
        d = dequantize(padded, torch.float64)
        assert torch.equal(d[:inter], dequantize(orig, torch.float64)) and bool((d[inter:] == 0).all())
    d = dequantize(pdown, torch.float64)
    assert torch.equal(d[:, :inter], dequantize(down, torch.float64)) and bool((d[:, inter:] == 0).all())

    def mlp(g, u, dn, x):
        h = torch.nn.functional.silu(x @ dequantize(g, torch.float64).T) * (x @ dequantize(u, torch.float64).T)
        return h @ dequantize(dn, torch.float64).T

    x = torch.randn(5, hidden, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(mlp(pgate, pup, pdown, x), mlp(gate, up, down, x), rtol=1e-12, atol=1e-12)
    # The padded tensors are storable: GPTQ v1 needs zero points >= 1 and float16 scales.
    gptq.encode_linear("m.down_proj", pdown, sym=False, scale_dtype=torch.float16)


def test_padding_per_channel_and_wrong_sizes(gen):
    result = quantize_rtn(torch.randn(8, 64, generator=gen), bits=4, group_size=None, sym=True,
                          scale_dtype=torch.float16)
    padded = pad_input_columns(result, 32)
    assert padded.scale.shape == (8, 1) and bool((dequantize(padded)[:, 64:] == 0).all())
    grouped = quantize_rtn(torch.randn(8, 64, generator=gen), bits=4, group_size=32, sym=True,
                           scale_dtype=torch.float16)
    with pytest.raises(ValueError, match="whole number of groups"):
        pad_input_columns(grouped, 16)


@pytest.mark.gpu
def test_padding_stays_on_the_results_device():
    """A GPU actor pads its results where they are (the padding was once made on the host, and torch.cat of
    a CUDA and a host tensor failed): every padded tensor on the GPU, exactly 0 where padded."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from wq_ops.quant.result import dequantize
    from wq_ops.quant.rtn import quantize_rtn

    result = quantize_rtn(torch.randn(64, 128, device="cuda"), bits=4, group_size=32, sym=True,
                          scale_dtype=torch.bfloat16)
    rows, cols = pad_output_rows(result, 16), pad_input_columns(result, 32)
    assert all(t.is_cuda for t in (rows.codes, rows.scale, rows.zero, cols.codes, cols.scale, cols.zero))
    assert not dequantize(rows, torch.float32)[64:].any() and not dequantize(cols, torch.float32)[:, 128:].any()


def test_fp8_blocks_must_stay_whole_on_each_rank():
    """vLLM's validate_fp8_block_shape: row-parallel inputs per rank, and each part of a fused (q/k/v, gate/up)
    or split column-parallel output per rank, in whole 128-blocks; per-channel FP8 and W8A8 have no such rule
    (and no Marlin tiles)."""
    from wq_ops.config import JobConfig

    block = JobConfig.from_dict({"out": "o", "scheme": "FP8_BLOCK"}).quant
    channel = JobConfig.from_dict({"out": "o", "scheme": "FP8_DYNAMIC"}).quant
    layout, attention = llama_layout(2048, 5632, 16, 2, 128), AttentionShape(16, 2, 128)     # TinyLlama-1.1B
    report = check_tp_sizes(layout, attention, block, Format.COMPRESSED_TENSORS, tp_sizes=(1, 2, 4, 8))
    by_tp = {c.tp: c for c in report.checks}
    assert by_tp[1].ok and by_tp[2].ok and not by_tp[1].marlin_reasons
    # tp=4: gate/up's 5632 / 4 = 1408 rows per rank, 11 blocks; k/v keep 128 rows (one KV head each).
    assert by_tp[4].ok
    # tp=8: 704 rows and columns per rank: not whole blocks; q/k/v still are.
    assert not by_tp[8].loadable
    assert any("mlp.down_proj (tp=8" in r and "input dim per rank is not a multiple of the FP8 block's 128" in r
               for r in by_tp[8].layout_reasons)
    assert any("mlp.gate_proj (tp=8" in r and "(fused into gate_up_proj)" in r for r in by_tp[8].layout_reasons)
    assert report.loader.checkpoint_format == "float-quantized"
    assert ("vllm", "0.11.0") in [(v.package, v.minimum) for v in report.loader.versions]
    plain = check_tp_sizes(layout, attention, channel, Format.COMPRESSED_TENSORS, tp_sizes=(1, 2, 4, 8))
    assert [c.ok for c in plain.checks] == [True, True, True, True]
    # SmolLM2-135M: k/v's 192 rows are fused into qkv_proj, so not even tp=1 loads 128x128 blocks.
    smol = check_tp_sizes(*SMOLLM2_135M, block, Format.COMPRESSED_TENSORS, tp_sizes=(1,))
    assert any("self_attn.k_proj (tp=1, per rank out=192" in r for r in smol.checks[0].layout_reasons)


def test_nvfp4_needs_whole_groups_of_16_on_each_rank():
    from wq_ops.config import JobConfig

    quant = JobConfig.from_dict({"out": "o", "scheme": "NVFP4"}).quant
    layout, attention = llama_layout(2048, 5664, 16, 2, 128), AttentionShape(16, 2, 128)     # 5664 = 354 x 16
    report = check_tp_sizes(layout, attention, quant, Format.COMPRESSED_TENSORS, tp_sizes=(1, 2, 4, 8))
    assert [c.tp for c in report.checks if c.ok] == [1, 2]
    assert any("mlp.down_proj (tp=4): input dim per rank 1416 is not whole groups of 16" in r
               for r in report.checks[2].layout_reasons)
    assert report.loader.checkpoint_format == "nvfp4-pack-quantized"
    assert [(v.package, v.minimum) for v in report.loader.versions] == [("compressed-tensors", "0.13.0"),
                                                                        ("vllm", "0.9.1")]
