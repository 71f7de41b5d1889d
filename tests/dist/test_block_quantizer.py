"""quantize_block in-process (no Ray): outputs track the float block, methods rank as expected."""

import pytest
import torch

from wq_ops.config import Format, QuantConfig
from wq_ops.dist.block_quantizer import quantize_block_
from wq_ops.model.architecture import describe_model, instantiate_on_meta
from wq_ops.model.block import DecoderBlock, discover_anatomy, make_sequence_context
from tests.factory import tiny_config


@pytest.fixture(scope="module")
def block_setup():
    config = tiny_config("llama", num_key_value_heads=4)
    layout = describe_model(config)
    meta = instantiate_on_meta(config)
    gen = torch.Generator().manual_seed(0)
    params = {}
    for name, shape in layout.block_params.items():
        params[name] = (1 + 0.1 * torch.randn(shape, generator=gen)) if "norm" in name else \
            torch.randn(shape, generator=gen) * 0.08
        params[name] = params[name].to(torch.bfloat16)
    rotary = type(meta.model.rotary_emb)(config=config)
    ctx = make_sequence_context(rotary, seq_len=64, hidden_size=128, window=None, device="cpu", dtype=torch.bfloat16)
    block = DecoderBlock(meta.model.layers[0], ctx)
    probe = make_sequence_context(rotary, seq_len=16, hidden_size=128, window=None, device="cpu", dtype=torch.bfloat16)
    anatomy = discover_anatomy(DecoderBlock(meta.model.layers[0], probe), params, layout.linears, hidden_size=128)
    x = torch.randn(8, 64, 128, generator=gen).to(torch.bfloat16)
    x[..., 5] *= 30                             # an outlier channel
    return layout, block, params, anatomy, list(x.split(4))


def run(setup, **quant):
    layout, block, params, anatomy, batches = setup
    q = QuantConfig(**{"bits": 4, "group_size": 32, **quant})
    outcome, outputs = quantize_block_(block, params, anatomy, list(batches), quant=q,
                                       fmt=Format.COMPRESSED_TENSORS, block_index=0, prefix="model.layers",
                                       linears=layout.linears)
    ref = [block.forward(params, x) for x in batches]
    err = sum(float(((o.float() - r.float()) ** 2).sum()) for o, r in zip(outputs, ref)) / \
        sum(float((r.float() ** 2).sum()) for r in ref)
    return outcome, err


def test_params_and_input_tensors_are_not_modified(block_setup):
    layout, block, params, anatomy, batches = block_setup
    before = {k: v.clone() for k, v in params.items()}, [b.clone() for b in batches]
    consumed = list(batches)
    quantize_block_(block, params, anatomy, consumed, quant=QuantConfig(method="awq", group_size=32),
                    fmt=Format.COMPRESSED_TENSORS, block_index=0, prefix="model.layers", linears=layout.linears)
    assert consumed == []                              # the list is consumed, the tensors are not written
    assert all(torch.equal(before[0][k], params[k]) for k in params)
    assert all(torch.equal(a, b) for a, b in zip(before[1], batches))


def test_methods_rank_on_block_output_error(block_setup):
    _, rtn = run(block_setup, method="rtn")
    _, gptq = run(block_setup, method="gptq", act_order=True)
    _, awq = run(block_setup, method="awq")
    assert gptq < rtn and awq < rtn, (rtn, gptq, awq)
    assert rtn < 0.05


def test_outcome_tensors_and_records(block_setup):
    outcome, _ = run(block_setup, method="gptq", ignore=("*.mlp.down_proj",))
    names = set(outcome.tensors)
    assert "model.layers.0.self_attn.q_proj.weight_packed" in names
    assert "model.layers.0.mlp.down_proj.weight" in names            # ignored: kept dense
    assert "model.layers.0.input_layernorm.weight" in names
    kept = [r for r in outcome.layers if not r.quantized]
    assert [r.name for r in kept] == ["model.layers.0.mlp.down_proj"]
    assert set(outcome.seconds) == {"forward", "solve", "pack"}


def test_awq_folds_scales_into_the_norms(block_setup):
    outcome, _ = run(block_setup, method="awq")
    _, _, params, _, _ = block_setup
    norm = outcome.tensors["model.layers.0.input_layernorm.weight"]
    assert not torch.equal(norm, params["input_layernorm.weight"])   # 1/s folded in
    assert any(r.awq_ratio is not None for r in outcome.layers)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_float_propagation_passes_the_float_block_outputs_on(block_setup, method):
    """Propagation.FLOAT: the outputs are the float block's, bit for bit; the attention layers are
    calibrated on the same inputs either way, the MLP on the float attention's output instead."""
    from wq_ops.config import Propagation

    layout, block, params, anatomy, batches = block_setup
    q = QuantConfig(method=method, bits=4, group_size=32)
    kw = dict(quant=q, fmt=Format.COMPRESSED_TENSORS, block_index=0, prefix="model.layers", linears=layout.linears)
    floated, outputs = quantize_block_(block, params, anatomy, list(batches), propagation=Propagation.FLOAT, **kw)
    for out, x in zip(outputs, batches):
        assert torch.equal(out, block.forward(params, x))
    quantized, q_outputs = quantize_block_(block, params, anatomy, list(batches), **kw)
    assert not all(torch.equal(a, b) for a, b in zip(outputs, q_outputs))
    tensors = {n: floated.tensors[n] for n in floated.tensors if ".self_attn." in n}
    assert tensors and all(torch.equal(v, quantized.tensors[n]) for n, v in tensors.items())
    mlp = [n for n in floated.tensors if ".mlp." in n and n.endswith("weight_packed")]
    assert mlp and not all(torch.equal(floated.tensors[n], quantized.tensors[n]) for n in mlp)


@pytest.mark.parametrize("propagation,passes", [("float", 1), ("quantized", 2)])
def test_each_linear_runs_once_per_micro_batch_with_float_propagation(block_setup, propagation, passes):
    """Float propagation takes each stage's outputs from the pass that captures its inputs: one forward
    of the block. Quantized propagation needs a second pass after the solve (GPTQ never runs a linear
    more than that)."""
    from wq_ops.config import Propagation

    layout, block, params, anatomy, batches = block_setup
    calls: dict[str, int] = {}
    hooks = [module.register_forward_hook(lambda m, args, out, name=name: calls.__setitem__(
        name, calls.get(name, 0) + 1)) for name, module in block.layer.named_modules()
        if isinstance(module, torch.nn.Linear)]
    try:
        quantize_block_(block, params, anatomy, list(batches), quant=QuantConfig(method="gptq", group_size=32),
                        fmt=Format.COMPRESSED_TENSORS, block_index=0, prefix="model.layers", linears=layout.linears,
                        propagation=Propagation(propagation))
    finally:
        for h in hooks:
            h.remove()
    assert set(calls) == {s.name for s in layout.linears}
    assert set(calls.values()) == {passes * len(batches)}, calls
