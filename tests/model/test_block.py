"""The two-stage functional block reproduces the transformers model, for every supported architecture."""

import pytest
import torch

from tests.factory import tiny_config
from wq_ops.model.anatomy import discover_anatomy
from wq_ops.model.architecture import attention_window, describe_model, instantiate_on_meta
from wq_ops.model.block import DecoderBlock, make_sequence_context


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
        window = attention_window(layer, config, layout.architecture)
        ctx = make_sequence_context(rotary, seq_len=ids.shape[1], hidden_size=layout.hidden_size, window=window,
                                    device="cpu", dtype=torch.float32)
        params = {k[len(f"model.layers.{i}."):]: v for k, v in model.state_dict().items()
                  if k.startswith(f"model.layers.{i}.")}
        x = DecoderBlock(layer, ctx).forward(params, x)
    return x


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("llama", {"sliding_window": 8}),                           # a stray key Llama's model ignores
    ("llama", {"attention_dropout": 0.5}),                      # no dropout outside training
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


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_equals_the_modules_own_forward(arch, dtype):
    """Every supported architecture's stage norms take the fused path, and it gives the module's own
    output bit for bit on the CPU (the same operations; on a GPU the fused kernel sums in another order)."""
    from torch.func import functional_call

    from wq_ops.model.block import rms_norm_epsilon

    config = tiny_config(arch, rms_norm_eps=1e-5)
    layer = instantiate_on_meta(config).model.layers[0]
    block = DecoderBlock(layer, ctx=None)  # type: ignore[arg-type]   (norms need no sequence context)
    gen = torch.Generator().manual_seed(5)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        assert rms_norm_epsilon(layer.get_submodule(norm)) == 1e-5
        x = (torch.randn(2, 7, 128, generator=gen) * 4).to(dtype)
        params = {f"{norm}.weight": torch.randn(128, generator=gen).to(dtype)}
        own = functional_call(layer.get_submodule(norm), {"weight": params[f"{norm}.weight"]}, (x,))
        assert torch.equal(block.norm(params, norm, x), own)
        assert torch.equal(DecoderBlock(layer, None, fuse_norms=False).norm(params, norm, x), own)  # type: ignore[arg-type]


class _OffsetRMSNorm(torch.nn.Module):
    """Gemma's form, (1 + w) * rms_norm(x): the same attribute names, another formula."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(width))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 + self.weight) * torch.nn.functional.rms_norm(x, (x.shape[-1],), None, self.variance_epsilon)


class _OneRoundingRMSNorm(_OffsetRMSNorm):
    """w * x / rms in float32, rounded once at the end: equal in float32, not in bfloat16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight.float() * y).to(x.dtype)


def test_other_norms_keep_their_own_forward():
    from wq_ops.model.block import rms_norm_epsilon

    assert rms_norm_epsilon(_OffsetRMSNorm(64)) is None
    assert rms_norm_epsilon(_OneRoundingRMSNorm(64)) is None
    assert rms_norm_epsilon(torch.nn.LayerNorm(64)) is None              # a bias, and no variance_epsilon
    assert rms_norm_epsilon(torch.nn.RMSNorm(64, eps=1e-6)) is None      # its epsilon is named eps


@pytest.mark.gpu
def test_fused_norm_on_the_gpu_is_within_one_rounding_of_the_module():
    """On the GPU the fused kernel sums the squares in another order than the module's mean: the
    normalised value may land one bf16 step away (relative 2^-7 at most), for few elements."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from torch.func import functional_call

    layer = instantiate_on_meta(tiny_config("llama")).model.layers[0]
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(16, 2048, 128, generator=gen) * 4).to(torch.bfloat16).cuda()
    norm = "input_layernorm"
    for w in (torch.ones(128), torch.randn(128, generator=gen)):
        w = w.to(torch.bfloat16).cuda()
        own = functional_call(layer.get_submodule(norm), {"weight": w}, (x,)).float()
        fused = DecoderBlock(layer, None).norm({f"{norm}.weight": w}, norm, x).float()  # type: ignore[arg-type]
        torch.testing.assert_close(fused, own, rtol=2**-7 if bool((w == 1).all()) else 2**-6, atol=0)
        assert (fused != own).float().mean().item() < 0.01
