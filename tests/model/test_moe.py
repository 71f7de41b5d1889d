"""Mixture-of-experts blocks (Qwen3-MoE, Mixtral): the layout under the checkpoint's per-expert names, the routed
MLP against transformers' own layer, and capture of each expert's routed tokens."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from tests.factory import MOE_ARCHS, tiny_config
from wq_ops.model.anatomy import discover_anatomy
from wq_ops.model.architecture import EAGER_ATTENTION_ARCHITECTURES, describe_model, instantiate_on_meta
from wq_ops.model.block import DecoderBlock, make_sequence_context
from wq_ops.model.moe import fused_params, moe_mlp, moe_spec


def random_params(layout, index: int, gen: torch.Generator, dtype=torch.float32) -> dict[str, torch.Tensor]:
    block = layout.block(index)
    return {n: ((1 + 0.1 * torch.randn(s, generator=gen)) if "norm" in n else torch.randn(s, generator=gen) * 0.08)
            .to(dtype) for n, s in block.params.items()}


def moe_block(arch: str, dtype=torch.float32, seq_len: int = 32):
    config = tiny_config(arch)
    layout = describe_model(config)
    meta = instantiate_on_meta(config)
    rotary = type(meta.model.rotary_emb)(config=config)
    ctx = make_sequence_context(rotary, seq_len=seq_len, hidden_size=128, window=None, device="cpu", dtype=dtype,
                                additive=layout.architecture in EAGER_ATTENTION_ARCHITECTURES)
    return config, layout, meta, DecoderBlock(meta.model.layers[1], ctx, moe=layout.block(1).moe)


def test_qwen3_moe_blocks_differ_and_name_experts_as_the_checkpoint_does():
    layout = describe_model(tiny_config("qwen3_moe"))
    assert [b.kind for b in layout.blocks] == ["dense", "moe", "moe"] and layout.block(1) is layout.block(2)
    moe = layout.block(1)
    names = [s.name for s in moe.linears]
    assert names[:4] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    assert names[4:7] == ["mlp.experts.0.gate_proj", "mlp.experts.0.up_proj", "mlp.experts.0.down_proj"]
    assert moe.params["mlp.gate.weight"] == (4, 128) and moe.params["mlp.experts.3.down_proj.weight"] == (128, 64)
    assert moe.kept == ("mlp.gate",) and "mlp.gate" not in names
    with pytest.raises(ValueError, match="blocks differ"):
        layout.linears


def test_mixtral_keeps_its_own_tensor_names():
    layout = describe_model(tiny_config("mixtral"))
    moe = layout.block(0)
    assert "block_sparse_moe.experts.2.w3.weight" in moe.params and moe.kept == ("block_sparse_moe.gate",)
    assert {s.stage for s in moe.linears if "experts" in s.name} == {"mlp"}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_the_routed_block_computes_what_transformers_layer_does(arch, gen):
    """Float32, a real (not meta) transformers layer with the same tensors, fused as it holds them: relative
    error under 1e-5 (the experts' gate and up run as two matmuls here, one fused matmul there)."""
    config, layout, meta, block = moe_block(arch)
    params = random_params(layout, 1, gen)
    x = torch.randn(2, 32, 128, generator=gen)
    with torch.no_grad():
        ours = block.forward(params, x)
        layer = type(meta.model.layers[1])(config, 1).to(torch.float32)
        theirs = functional_call(layer, fused_params(params, layout.block(1).moe), (x,),
                                 dict(position_embeddings=block.ctx.position_embeddings,
                                      attention_mask=block.ctx.attention_mask))
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-5


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_capture_sees_each_experts_routed_tokens(arch, gen):
    config, layout, _, block = moe_block(arch)
    params = random_params(layout, 1, gen)
    spec = layout.block(1).moe
    x = torch.randn(2, 32, 128, generator=gen)
    seen: dict[str, int] = {}
    names = tuple(spec.expert(e, which) for e in range(spec.n_experts) for which in ("gate", "down"))
    with torch.no_grad(), block.capturing(names, lambda n, t: seen.__setitem__(n, seen.get(n, 0) + t.shape[0])):
        block.forward(params, x)
    gates = [seen[spec.expert(e, "gate")] for e in range(spec.n_experts)]
    assert sum(gates) == 64 * spec.top_k                          # every token reaches top_k experts
    assert all(seen[spec.expert(e, "down")] == gates[e] for e in range(spec.n_experts))
    block.experts_see_all_tokens = True
    seen.clear()
    with torch.no_grad(), block.capturing(names, lambda n, t: seen.__setitem__(n, seen.get(n, 0) + t.shape[0])):
        block.forward(params, x)
    assert set(seen.values()) == {64}


def test_anatomy_of_a_routed_block(gen):
    """The attention is probed as in a dense block; the experts' groups are built: gate and up share their
    routed input (no producer: the norm also feeds the router), down's scale folds into its own up."""
    config, layout, meta, _ = moe_block("qwen3_moe")
    rotary = type(meta.model.rotary_emb)(config=config)
    probe = make_sequence_context(rotary, seq_len=16, hidden_size=128, window=None, device="cpu", dtype=torch.float32)
    block = DecoderBlock(meta.model.layers[1], probe, moe=layout.block(1).moe)
    anatomy = discover_anatomy(block, random_params(layout, 1, gen), layout.block(1).linears, hidden_size=128)
    mlp = anatomy.stage_groups("mlp")
    assert [g.names for g in mlp[:2]] == [("mlp.experts.0.gate_proj", "mlp.experts.0.up_proj"),
                                          ("mlp.experts.1.gate_proj", "mlp.experts.1.up_proj")]
    assert all(g.producer is None for g in mlp[:4])
    assert [g.producer for g in mlp[4:]] == [f"mlp.experts.{e}.up_proj" for e in range(4)]
    assert len(mlp) == 8 and "mlp" not in anatomy.direct_tails
    assert len(anatomy.stage_groups("self_attn")) == 2


def test_an_unknown_moe_is_refused_before_work():
    from transformers import OlmoeConfig

    from wq_ops.errors import CheckpointError

    config = OlmoeConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2)
    config.architectures = ["OlmoeForCausalLM"]
    assert moe_spec(config) is None
    with pytest.raises(CheckpointError, match="unsupported architecture OlmoeForCausalLM"):
        describe_model(config)


def _split_gpt_oss(state: dict[str, torch.Tensor], block: int) -> dict[str, torch.Tensor]:
    """Block `block`'s tensors of a transformers gpt-oss state dict, its fused experts split into per-expert
    names as wq reads them (`wq_ops.io.fused_experts`)."""
    from wq_ops.io.fused_experts import FusedExperts

    prefix = f"model.layers.{block}."
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    fused = FusedExperts(interleaved=True, transposed=True)
    out = {k: v for k, v in own.items() if not k.startswith("mlp.experts.")}
    for e in range(own["mlp.experts.gate_up_proj"].shape[0]):
        for which, stored in (("gate", "gate_up_proj"), ("up", "gate_up_proj"), ("down", "down_proj")):
            part = "all" if which == "down" else which
            out[f"mlp.experts.{e}.{which}_proj.weight"] = fused.split(own[f"mlp.experts.{stored}"][e], part,
                                                                      is_weight=True, out_in=False)
            out[f"mlp.experts.{e}.{which}_proj.bias"] = fused.split(own[f"mlp.experts.{stored}_bias"][e], part,
                                                                    is_weight=False, out_in=False)
    return out


def test_gpt_oss_blocks_chain_to_the_models_hidden_states(seed):
    """A real gpt-oss model (float32, eager attention with sinks, a window of 16 on blocks 0 and 2, YaRN rotary,
    biases everywhere, random weights) against wq's blocks over the per-expert tensors split from its fused
    ones: relative error under 1e-5 on 2 x 24 tokens (past the window)."""
    from transformers import AutoModelForCausalLM

    from wq_ops.model.architecture import attention_window

    config = tiny_config("gpt_oss")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1 + 0.1 * torch.randn_like(p)) if "norm" in name else 0.1 * torch.randn_like(p))
    layout = describe_model(config)
    meta = instantiate_on_meta(config)
    rotary = type(meta.model.rotary_emb)(config=config)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))
    state = model.state_dict()
    windows = []
    with torch.no_grad():
        want = model.model(ids, output_hidden_states=True).hidden_states[-1]
        x = model.model.embed_tokens(ids)
        for i in range(layout.n_blocks):
            window = attention_window(meta.model.layers[i], config, layout.architecture)
            windows.append(window)
            ctx = make_sequence_context(rotary, seq_len=24, hidden_size=128, window=window, device="cpu",
                                        dtype=torch.float32, additive=True)
            x = DecoderBlock(meta.model.layers[i], ctx, moe=layout.block(i).moe).forward(_split_gpt_oss(state, i), x)
        ours = model.model.norm(x)
    assert windows == [16, None, 16]
    assert float((ours - want).norm() / want.norm()) < 1e-5


def test_gpt_oss_layout_and_anatomy(gen):
    """gpt-oss: the router `mlp.router` (weight and bias) kept; every expert linear has a bias; gate and up share
    their routed input; down has no producer (up's rows cannot absorb a scale through (clamp(up) + 1))."""
    config, layout, meta, _ = moe_block("gpt_oss")
    block = layout.block(1)
    assert block.kept == ("mlp.router",) and block.params["mlp.router.bias"] == (4,)
    assert block.params["mlp.experts.3.up_proj.bias"] == (64,) and block.params["self_attn.sinks"] == (4,)
    assert all(s.has_bias for s in block.linears)
    rotary = type(meta.model.rotary_emb)(config=config)
    probe = make_sequence_context(rotary, seq_len=16, hidden_size=128, window=None, device="cpu", dtype=torch.float32,
                                  additive=True)
    anatomy = discover_anatomy(DecoderBlock(meta.model.layers[1], probe, moe=block.moe),
                               random_params(layout, 1, gen), block.linears, hidden_size=128)
    mlp = anatomy.stage_groups("mlp")
    assert [g.producer for g in mlp] == [None] * 8
    assert mlp[0].names == ("mlp.experts.0.gate_proj", "mlp.experts.0.up_proj")


def test_gpt_oss_before_its_config_named_the_swiglu_clamp():
    """transformers up to about 5.20 (the GPU image's 5.17) fixes alpha 1.702 and limit 7.0 in the experts'
    module; its config has neither key: the spec takes the same values."""
    config = tiny_config("gpt_oss")
    del config.swiglu_limit, config.swiglu_alpha
    spec = moe_spec(config)
    assert (spec.swiglu_limit, spec.swiglu_alpha) == (7.0, 1.702)


def test_gpt_oss_routed_mlp_is_transformers_bit_for_bit_in_bfloat16(seed):
    """In bfloat16, wq's routed MLP gives exactly what transformers' `GptOssMLP` gives with its eager experts
    loop: the router's bias and top-k softmax, each expert's bias added after its product (x @ W + b rounds
    twice; a fused addmm would round once and differ by an ulp), the clamped SwiGLU, the weighted sum."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    config = tiny_config("gpt_oss")
    config._experts_implementation = "eager"
    layout = describe_model(config)
    spec = layout.block(1).moe
    gen = torch.Generator().manual_seed(seed)
    params = {n: (torch.randn(s, generator=gen) * 0.3).to(torch.bfloat16) for n, s in layout.block(1).params.items()
              if n.startswith("mlp.")}
    x = (torch.randn(2, 40, 128, generator=gen) * 2).to(torch.bfloat16)
    mlp = GptOssMLP(config).to(torch.bfloat16)
    theirs = functional_call(mlp, {k.removeprefix("mlp."): v for k, v in fused_params(params, spec).items()
                                   if k.startswith("mlp.")}, (x,))[0]
    with torch.no_grad():
        ours = moe_mlp(params, x, spec)
    assert torch.equal(ours, theirs)
