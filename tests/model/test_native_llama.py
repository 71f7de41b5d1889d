"""wq's native modules against the installed transformers' Llama, Qwen2 and Qwen3: the same layout, the same rotary
tables and the same decoder-layer outputs, bit for bit, for the config.json styles real checkpoints use;
and every config they do not compute exactly is left to transformers, with the reason."""

import json

import pytest
import torch
from torch.func import functional_call

from wq_ops.model.architecture import describe_model, instantiate_on_meta
from wq_ops.model.native_llama import NativeLlamaConfig, NativeRotaryEmbedding, read_native_config

BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 128,
        "intermediate_size": 320, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "dtype": "bfloat16"}

# Each as a config.json would say it: transformers 4's top-level rope_theta and rope_scaling (with `type`
# or `rope_type`), transformers 5's rope_parameters, and fields left to their defaults.
CONFIGS = {
    "mha-defaults": {},
    "gqa-theta": {"num_key_value_heads": 2, "rope_theta": 500000.0},
    "llama3-rope-scaling": {"num_key_value_heads": 2, "rope_theta": 500000.0,
                            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "llama3-legacy-type": {"num_key_value_heads": 1,
                           "rope_scaling": {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 2.0, "original_max_position_embeddings": 32}},
    "llama3-top-level-original": {"original_max_position_embeddings": 48,
                                  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "rope-parameters": {"num_key_value_heads": 2,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}},
    "biases-head-dim-tied": {"num_key_value_heads": 2, "head_dim": 48, "attention_bias": True, "mlp_bias": True,
                             "tie_word_embeddings": True},
}


# Qwen's configs default to 32 kv heads, more than these tiny models' 4 heads: give the count.
ARCHS = {"llama": {}, "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_key_value_heads": 4},
         "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "num_key_value_heads": 4}}


def _both(tmp_path, extra, arch="llama"):
    """(transformers' config read by AutoConfig from config.json, our NativeLlamaConfig from the same file)."""
    from transformers import AutoConfig

    raw = {**BASE, **ARCHS[arch], **extra}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    native, why = read_native_config(json.loads((tmp_path / "config.json").read_text()))
    assert native is not None, why
    return AutoConfig.from_pretrained(tmp_path), native


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_layout_is_transformers(tmp_path, name, arch):
    hf, native = _both(tmp_path, CONFIGS[name], arch)
    assert describe_model(native) == describe_model(hf)


def _transformers_layer(hf, dtype, gen):
    from transformers import AutoModelForCausalLM

    hf._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa").to(dtype).eval()
    layer = model.model.layers[0]
    params = {n: (torch.randn(p.shape, generator=gen) * (0.3 if "norm" in n else 0.08)
                  + (1.0 if "norm" in n else 0.0)).to(dtype) for n, p in layer.named_parameters()}
    return model, layer, params


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rotary_and_layer_outputs_are_the_same_bits(tmp_path, seed, gen, name, dtype, arch):
    hf, native = _both(tmp_path, CONFIGS[name], arch)
    model, layer, params = _transformers_layer(hf, dtype, gen)
    ours = instantiate_on_meta(native).model.layers[0]
    x = torch.randn(2, 80, 128, generator=gen).to(dtype)
    positions = torch.arange(80).unsqueeze(0)
    want = type(model.model.rotary_emb)(config=hf)(x, positions)
    got = NativeRotaryEmbedding(native)(x, positions)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    window = torch.arange(80)
    mask = ((window[None, :] <= window[:, None]) & (window[:, None] - window[None, :] < 16)).reshape(1, 1, 80, 80)
    with torch.no_grad():
        for attention_mask in (None, mask):
            theirs = functional_call(layer, params, (x,), dict(position_embeddings=want, attention_mask=attention_mask))
            theirs = theirs[0] if isinstance(theirs, tuple) else theirs
            mine = functional_call(ours, params, (x,), dict(position_embeddings=got, attention_mask=attention_mask))
            assert torch.equal(mine, theirs), (name, dtype, attention_mask is not None)


def test_smollm2_block_is_the_same_bits(smollm2_dir):
    """The real checkpoint: its config.json (transformers 5's style) and block 0's weights, in bf16."""
    from safetensors import safe_open
    from transformers import AutoConfig

    raw = json.loads((smollm2_dir / "config.json").read_text())
    native, why = read_native_config(raw)
    assert native is not None, why
    hf = AutoConfig.from_pretrained(smollm2_dir)
    assert describe_model(native) == describe_model(hf)
    index = json.loads((smollm2_dir / "model.safetensors.index.json").read_text())["weight_map"]
    params = {}
    for name, shard in index.items():
        if name.startswith("model.layers.0."):
            with safe_open(str(smollm2_dir / shard), "pt") as f:
                params[name[len("model.layers.0."):]] = f.get_tensor(name)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        theirs_model = AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa")
    x = torch.randn(2, 96, native.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    positions = torch.arange(96).unsqueeze(0)
    rotary = type(theirs_model.model.rotary_emb)(config=hf)
    cos_sin = rotary(x, positions)
    assert all(torch.equal(a, b) for a, b in zip(NativeRotaryEmbedding(native)(x, positions), cos_sin))
    with torch.no_grad():
        theirs = functional_call(theirs_model.model.layers[0], params, (x,), dict(position_embeddings=cos_sin))
        mine = functional_call(instantiate_on_meta(native).model.layers[0], params, (x,),
                               dict(position_embeddings=cos_sin))
    assert torch.equal(mine, theirs[0] if isinstance(theirs, tuple) else theirs)


@pytest.mark.parametrize("extra,reason", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "is not one of"),
    ({"architectures": ["Qwen3ForCausalLM"], "model_type": "llama"}, "is not one of"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
    ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "layer_types": ["sliding_attention"] * 2},
     "layer_types"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"auto_map": {"AutoModelForCausalLM": "modeling.Llama"}}, "remote code"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3 rope parameters incomplete"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "per layer type"),
    ({"num_key_value_heads": 3}, "heads do not divide"),
    ({"hidden_size": "128"}, "not a positive integer"),
    ({"rope_theta": -1.0}, "rope_theta -1.0"),
    ({"architectures": 5}, "expected one class name"),
    ({**ARCHS["qwen2"], "head_dim": None}, "head_dim is null"),
    ({**ARCHS["qwen3"], "head_dim": None}, "head_dim is null"),
    ({**ARCHS["qwen2"], "use_sliding_window": None}, "not a bool"),
    ({**ARCHS["qwen3"], "max_window_layers": None}, "max_window_layers is not a positive integer"),
    ({**ARCHS["qwen3"], "sliding_window": "x"}, "sliding_window or max_window_layers"),
    ({"layer_types": ["full_attention"]}, "one full_attention per layer"),
    ({"rope_theta": None}, "rope_theta is null"),
    ({"hidden_size": None}, "hidden_size is null"),
    ({"tie_word_embeddings": None}, "tie_word_embeddings is null"),
    ({"num_key_value_heads": 0}, "heads do not divide"),
    ({"head_dim": True}, "heads do not divide"),
    ({"rms_norm_eps": 0}, "rms_norm_eps is not a positive float"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": "8", "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
     "llama3 rope parameters incomplete"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192.7}}, "8192.7 is not a positive integer"),
    ({"original_max_position_embeddings": 0,
      "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
     "0 is not a positive integer"),
])
def test_configs_it_does_not_compute_exactly_are_left_to_transformers(extra, reason):
    native, why = read_native_config({**BASE, **extra})
    assert native is None and reason in why


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_defaults_are_the_config_classes(tmp_path, arch):
    """A config.json that names only its architecture: the config class's defaults, and the same layout."""
    from transformers import AutoConfig

    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **ARCHS[arch]}
    raw.pop("num_key_value_heads", None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    native, why = read_native_config(raw)
    hf = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(native, NativeLlamaConfig), why
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(native, field) == getattr(hf, field), field
    assert native.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert native.rope.rope_type == "default" and native.rope.theta == 10000.0
    small = {**raw, "num_hidden_layers": 2}      # the full default model is large even on the meta device
    (tmp_path / "config.json").write_text(json.dumps(small))
    assert describe_model(read_native_config(small)[0]) == describe_model(AutoConfig.from_pretrained(tmp_path))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("name", ["gqa-theta", "llama3-rope-scaling", "biases-head-dim-tied", "mha-defaults"])
def test_the_same_bits_on_the_gpu_at_a_job_sequence_length(tmp_path, gen, name, arch):
    """bf16 on CUDA, where SDPA picks its fused kernels (flash or cuDNN, grouped-query or not): the job's
    path, with the rotary tables built on the GPU as the actor builds them."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    hf, native = _both(tmp_path, CONFIGS[name], arch)
    model, layer, params = _transformers_layer(hf, torch.bfloat16, gen)
    layer = layer.cuda()
    params = {k: v.cuda() for k, v in params.items()}
    ours = instantiate_on_meta(native).model.layers[0]
    x = torch.randn(4, 1024, 128, generator=gen).to(torch.bfloat16).cuda()
    positions = torch.arange(1024, device="cuda").unsqueeze(0)
    with torch.device("cuda"):
        want = type(model.model.rotary_emb)(config=hf)(x, positions)
        got = NativeRotaryEmbedding(native)(x, positions)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    with torch.no_grad():
        theirs = functional_call(layer, params, (x,), dict(position_embeddings=want))
        mine = functional_call(ours, params, (x,), dict(position_embeddings=got))
    assert torch.equal(mine, theirs[0] if isinstance(theirs, tuple) else theirs)
