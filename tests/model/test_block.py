"""The two-stage functional block reproduces the transformers model, for every supported architecture."""

import pytest
import torch

from tests.factory import tiny_config
from wq_ops.model.architecture import describe_model, instantiate_on_meta
from wq_ops.model.block import DecoderBlock, discover_anatomy, make_sequence_context


def _real_model(config, seed):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif "bias" in name:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def _chain(model, config, ids):
    """Embeddings, then every block through DecoderBlock over explicit tensors."""
    layout = describe_model(config)
    meta = instantiate_on_meta(config)
    rotary = type(meta.model.rotary_emb)(config=config)
    x = model.model.embed_tokens(ids)
    for i in range(layout.n_blocks):
        layer = meta.model.layers[i]
        window = getattr(layer.self_attn, "sliding_window", getattr(config, "sliding_window", None))
        ctx = make_sequence_context(rotary, seq_len=ids.shape[1], hidden_size=layout.hidden_size, window=window,
                                    device="cpu", dtype=torch.float32)
        params = {k[len(f"model.layers.{i}."):]: v for k, v in model.state_dict().items()
                  if k.startswith(f"model.layers.{i}.")}
        x = DecoderBlock(layer, ctx).forward(params, x)
    return x


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("mistral", {}),
    ("mistral", {"sliding_window": 8}),                         # window shorter than the sequence
    ("qwen2", {}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    ("qwen3", {}),
])
def test_block_chain_matches_the_model(seed, arch, overrides):
    config = tiny_config(arch, **overrides)
    config._attn_implementation = "sdpa"
    model = _real_model(config, seed)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        # transformers' last hidden state comes after the final norm: apply the same norm to ours.
        want = model.model(ids, output_hidden_states=True).hidden_states[-1]
        ours = model.model.norm(_chain(model, config, ids))
    # float32 throughout; the same ops in the same order, up to SDPA's kernel choice.
    assert torch.allclose(ours, want, rtol=1e-4, atol=1e-4), float((ours - want).abs().max())


@pytest.mark.parametrize("arch,kv_heads,o_producer", [("llama", 2, None), ("llama", 4, "self_attn.v_proj"),
                                                       ("qwen2", 2, None), ("qwen3", 4, "self_attn.v_proj")])
def test_anatomy_groups_and_producers(arch, kv_heads, o_producer):
    config = tiny_config(arch, num_key_value_heads=kv_heads)
    model = _real_model(config, 0)
    layout = describe_model(config)
    meta = instantiate_on_meta(config)
    rotary = type(meta.model.rotary_emb)(config=config)
    ctx = make_sequence_context(rotary, seq_len=16, hidden_size=128, window=None, device="cpu", dtype=torch.float32)
    params = {k[len("model.layers.0."):]: v for k, v in model.state_dict().items() if k.startswith("model.layers.0.")}
    anatomy = discover_anatomy(DecoderBlock(meta.model.layers[0], ctx), params, layout.linears, hidden_size=128)
    groups = [(g.names, g.producer) for g in anatomy.groups]
    assert groups == [
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
        (("self_attn.o_proj",), o_producer),       # v -> o only when every head has its own v (no GQA)
        (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
        (("mlp.down_proj",), "mlp.up_proj"),       # up -> down: the product act(gate) * up is linear in up
    ]
