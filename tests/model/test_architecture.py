import pytest

from tests.factory import ARCHS, tiny_config
from wq_ops.errors import CheckpointError
from wq_ops.model.architecture import describe_model


@pytest.mark.parametrize("arch", ARCHS)
def test_describe_finds_blocks_and_linears(arch):
    layout = describe_model(tiny_config(arch))
    assert layout.n_blocks == 3 and layout.block_prefix == "model.layers"
    names = [s.name for s in layout.linears]
    assert names == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert layout.outer_linears == ("lm_head",)
    assert "model.embed_tokens.weight" in layout.outer_params and "lm_head.weight" in layout.outer_params
    if arch == "qwen2":
        assert [s.has_bias for s in layout.linears][:3] == [True, True, True]
    if arch == "qwen3":
        assert "self_attn.q_norm.weight" in layout.block_params


def test_tied_embeddings_have_no_lm_head_tensor():
    layout = describe_model(tiny_config("llama", tie_word_embeddings=True))
    assert "lm_head.weight" not in layout.outer_params
    assert layout.outer_linears == ("lm_head",)


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config

    config = GPT2Config(n_layer=2, n_embd=64, n_head=2)
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(CheckpointError, match="unsupported architecture GPT2LMHeadModel"):
        describe_model(config)


def test_moe_architecture_is_refused():
    from transformers import MixtralConfig

    config = MixtralConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                           num_key_value_heads=1)
    config.architectures = ["MixtralForCausalLM"]
    with pytest.raises(CheckpointError, match="unsupported architecture MixtralForCausalLM"):
        describe_model(config)
