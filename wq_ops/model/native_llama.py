"""Llama, Qwen2 and Qwen3 decoder layers in plain torch, so that a job need not wait for transformers'
import: 4 s of an H100 job's start-up, before the first block could run, on the critical path of every job.

The modules have transformers' parameter names and shapes, and run its operations in its order (RMSNorm
upcast to float32, rotary tables in float32, Qwen3's per-head query and key norms, SDPA with grouped-query
heads), so a block's outputs are the same bits (tests/model/test_native_llama.py checks them against the
installed transformers, in float32 and bfloat16, on CPU and on the GPU). `read_native_config` accepts a
config.json only when it understands every field that shapes the forward; any other config (another rope
type or activation, sliding-window layers, remote code, a nested text config) goes through transformers'
own classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NATIVE_ARCHITECTURES", "RopeSpec", "NativeLlamaConfig", "read_native_config", "NativeLlamaForCausalLM"]

NATIVE_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_ROPE_TYPES = ("default", "llama3")
_DEFAULT_THETA = 10_000.0         # transformers' default when a config names no rope_theta


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters. rope_type "default": inv_freq = theta^(-2i/d); "llama3": Llama 3.1's
    wavelength-dependent rescaling of those frequencies (factor, low/high_freq_factor, original context)."""

    rope_type: str
    theta: float
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0


@dataclass(frozen=True)
class NativeLlamaConfig:
    """The fields of a Llama config.json that the job reads, with transformers' LlamaConfig defaults for
    those it omits; attribute names as transformers' config has them, so code reading either works."""

    architectures: tuple[str, ...]
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool               # q, k and v projections
    mlp_bias: bool
    dtype: str | None
    rope: RopeSpec
    o_proj_bias: bool = False
    qk_norm: bool = False              # Qwen3: an RMSNorm over each head's query and key


@dataclass(frozen=True)
class _Family:
    """What an architecture's config class defaults to, and which biases and norms its layers have:
    a bool is fixed by the modeling code, a str names the config field that decides."""

    model_type: str
    defaults: dict[str, Any]
    qkv_bias: bool | str
    o_bias: bool | str
    mlp_bias: bool | str
    qk_norm: bool


_COMMON = {"num_attention_heads": 32, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu",
           "num_hidden_layers": 32, "hidden_size": 4096}
_QWEN = {**_COMMON, "vocab_size": 151936, "intermediate_size": 22016, "max_position_embeddings": 32768,
         "num_key_value_heads": 32}
# The config classes' defaults for omitted fields (transformers 4.4x to 5.x agree on these);
# num_key_value_heads and head_dim None: derived from the other fields, as the config class does.
_FAMILIES = {
    "LlamaForCausalLM": _Family("llama", {**_COMMON, "vocab_size": 32000, "intermediate_size": 11008,
                                          "max_position_embeddings": 2048, "num_key_value_heads": None,
                                          "head_dim": None, "attention_bias": False, "mlp_bias": False},
                                qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias", qk_norm=False),
    "Qwen2ForCausalLM": _Family("qwen2", {**_QWEN, "head_dim": None}, qkv_bias=True, o_bias=False, mlp_bias=False,
                                qk_norm=False),
    "Qwen3ForCausalLM": _Family("qwen3", {**_QWEN, "head_dim": 128, "attention_bias": False},
                                qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias=False, qk_norm=True),
}


def read_native_config(raw: Mapping[str, Any]) -> tuple[NativeLlamaConfig | None, str]:
    """(config, "") when the native modules compute exactly what transformers' would for this config.json;
    else (None, the reason), and the job uses transformers' classes. Anything unusual is left to
    transformers, which then computes it or names the problem itself."""
    architectures = raw.get("architectures")
    if not (isinstance(architectures, list) and len(architectures) == 1 and isinstance(architectures[0], str)):
        return None, f"architectures {architectures!r}: expected one class name"
    family = _FAMILIES.get(architectures[0])
    if family is None or raw.get("model_type") != family.model_type:
        return None, (f"architecture {architectures} / model_type {raw.get('model_type')!r} is not one of "
                      f"{', '.join(NATIVE_ARCHITECTURES)} with its own model_type")
    if raw.get("auto_map"):
        return None, "the config names remote code (auto_map)"
    if "text_config" in raw:
        return None, "the config nests a text_config"
    if raw.get("use_sliding_window", False) is not False:
        return None, f"use_sliding_window {raw.get('use_sliding_window')!r}: sliding-window layers, or not a bool"
    if not all(_positive_int(raw[k]) for k in ("sliding_window", "max_window_layers") if raw.get(k) is not None) \
            or ("max_window_layers" in raw and raw["max_window_layers"] is None):
        return None, "sliding_window or max_window_layers is not a positive integer"
    layer_types = raw.get("layer_types")
    n_layers = raw.get("num_hidden_layers", family.defaults["num_hidden_layers"])
    if layer_types is not None and (not isinstance(layer_types, list) or len(layer_types) != n_layers
                                    or any(t != "full_attention" for t in layer_types)):
        return None, "layer_types: not one full_attention per layer"
    fields = {**family.defaults, **{f: False for f in (family.qkv_bias, family.o_bias, family.mlp_bias)
                                    if isinstance(f, str)}}
    # null: derived, as the config class does (Qwen's classes take no null head_dim)
    optional = ("num_key_value_heads", "head_dim") if family.model_type == "llama" else ("num_key_value_heads",)
    nulls = [k for k in (*fields, "rope_theta") if k in raw and raw[k] is None and k not in optional]
    if nulls:
        return None, f"{nulls[0]} is null"
    value = {k: raw.get(k, d) for k, d in fields.items()}
    if value["hidden_act"] != "silu":
        return None, f"hidden_act {value['hidden_act']!r}: the native MLP computes silu only"
    ints = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings")
    if not all(_positive_int(value[k]) for k in ints):
        return None, "a size field is not a positive integer"
    heads = value["num_attention_heads"]
    kv = heads if value["num_key_value_heads"] is None else value["num_key_value_heads"]
    head_dim = value["hidden_size"] // heads if value["head_dim"] is None else value["head_dim"]
    if not (_positive_int(kv) and _positive_int(head_dim)) or heads % kv or value["hidden_size"] % heads:
        return None, "the heads do not divide evenly"
    def decided(flag: bool | str) -> Any:           # fixed by the modeling code, or the config field's value
        return value[flag] if isinstance(flag, str) else flag

    qkv_bias, o_bias, mlp_bias = decided(family.qkv_bias), decided(family.o_bias), decided(family.mlp_bias)
    if not all(isinstance(v, bool) for v in (value["tie_word_embeddings"], qkv_bias, o_bias, mlp_bias)):
        return None, "a flag field is not true or false"
    if not isinstance(value["rms_norm_eps"], float) or not value["rms_norm_eps"] > 0:
        return None, "rms_norm_eps is not a positive float"
    rope, why = _read_rope(raw, max_positions=value["max_position_embeddings"])
    if rope is None:
        return None, why
    return NativeLlamaConfig(
        architectures=tuple(architectures), model_type=family.model_type, vocab_size=value["vocab_size"],
        hidden_size=value["hidden_size"], intermediate_size=value["intermediate_size"],
        num_hidden_layers=value["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=head_dim, rms_norm_eps=value["rms_norm_eps"],
        max_position_embeddings=value["max_position_embeddings"], tie_word_embeddings=value["tie_word_embeddings"],
        attention_bias=qkv_bias, o_proj_bias=o_bias, mlp_bias=mlp_bias,
        qk_norm=family.qk_norm, dtype=raw.get("dtype") or raw.get("torch_dtype"), rope=rope), ""


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_rope(raw: Mapping[str, Any], *, max_positions: int) -> tuple[RopeSpec | None, str]:
    """transformers' precedence: a legacy `rope_scaling` dict replaces `rope_parameters`; the dict's
    rope_theta wins over a top-level one, which wins over the default; a top-level
    original_max_position_embeddings wins over the dict's, which wins over max_position_embeddings."""
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        return None, "rope parameters per layer type"
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        return None, f"partial_rotary_factor {partial}"
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        return None, f"rope_type {rope_type!r}: the native rotary computes {', '.join(_ROPE_TYPES)}"
    theta = params["rope_theta"] if "rope_theta" in params else raw.get("rope_theta", _DEFAULT_THETA)
    if not _number(theta) or not theta > 0:
        return None, f"rope_theta {theta!r} is not a positive number"
    if rope_type == "default":
        return RopeSpec("default", float(theta)), ""
    scales = [params.get(k) for k in ("factor", "low_freq_factor", "high_freq_factor")]
    if not all(_number(v) for v in scales):
        return None, "llama3 rope parameters incomplete (factor, low_freq_factor, high_freq_factor)"
    key = "original_max_position_embeddings"
    original = raw[key] if key in raw else params[key] if key in params else max_positions
    if not _positive_int(original):
        return None, f"llama3 rope: {key} {original!r} is not a positive integer"
    factor, low, high = (float(v) for v in scales if v is not None)
    return RopeSpec("llama3", float(theta), factor=factor, low_freq_factor=low, high_freq_factor=high,
                    original_max_position_embeddings=original), ""


def _inverse_frequencies(config: NativeLlamaConfig) -> Tensor:
    """float32 (head_dim / 2,), on the current default device (the rotary module is built on the job's)."""
    rope, dim = config.rope, config.head_dim
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    if rope.rope_type == "default":
        return inv_freq
    # Llama 3.1: wavelengths beyond the original context are stretched by `factor`, those below
    # original / high_freq_factor kept, and those between interpolated smoothly.
    context = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = context / rope.low_freq_factor, context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class NativeRotaryEmbedding(nn.Module):
    """(cos, sin) for position ids, each (B, T, head_dim), computed in float32 then cast to x's dtype."""

    def __init__(self, config: NativeLlamaConfig) -> None:
        super().__init__()
        # A skeleton on the meta device needs only the shape: meta arithmetic imports torch._dynamo
        # (0.9 s holding the GIL the actor's warm-up needs). On a real device, computed there as
        # transformers does, for the same bits.
        on_meta = torch.get_default_device().type == "meta"
        inv_freq = torch.empty(config.head_dim // 2) if on_meta else _inverse_frequencies(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.attention_scaling = 1.0                  # default and llama3 ropes leave cos and sin unscaled

    @torch.no_grad()
    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        inv = self.inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1).to(dtype=torch.float, device=x.device)
        positions = position_ids[:, None, :].float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = (inv @ positions).transpose(1, 2)
            angles = torch.cat((freqs, freqs), dim=-1)
            cos = angles.cos() * self.attention_scaling
            sin = angles.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class NativeRMSNorm(nn.Module):
    """weight * (x / rms(x)), the normalisation in float32 and rounded back before the weight multiplies."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _repeat_heads(x: Tensor, n: int) -> Tensor:
    """(B, kv, T, d) -> (B, kv * n, T, d), each kv head repeated n times in place."""
    b, kv, t, d = x.shape
    return x[:, :, None].expand(b, kv, n, t, d).reshape(b, kv * n, t, d)


class NativeAttention(nn.Module):
    """Causal self-attention with rotary positions and grouped-query heads, through SDPA."""

    def __init__(self, config: NativeLlamaConfig) -> None:
        super().__init__()
        hidden, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.num_key_value_groups = heads // kv
        self.scaling = self.head_dim ** -0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = NativeRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = NativeRMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor],
                attention_mask: Tensor | None = None, **_: Any) -> tuple[Tensor, None]:
        """attention_mask: None (causal) or a boolean (1, 1, T, T), True where a query may attend."""
        lead = hidden_states.shape[:-1]
        split = (*lead, -1, self.head_dim)
        q, k = self.q_proj(hidden_states).view(split), self.k_proj(hidden_states).view(split)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(split).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        extra: dict[str, Any] = {}
        if self.num_key_value_groups > 1:
            # SDPA's own grouped-query path where its kernels take it (no mask, head_dim <= 256), as
            # transformers chooses; otherwise the kv heads are repeated out, as transformers does.
            if attention_mask is None and k.shape[-1] == v.shape[-1] <= 256:
                extra["enable_gqa"] = True
            else:
                k, v = _repeat_heads(k, self.num_key_value_groups), _repeat_heads(v, self.num_key_value_groups)
        causal = attention_mask is None and q.shape[2] > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, scale=self.scaling,
                                             is_causal=causal, **extra)
        out = out.transpose(1, 2).contiguous().reshape(*lead, -1).contiguous()
        return self.o_proj(out), None


class NativeMLP(nn.Module):
    def __init__(self, config: NativeLlamaConfig) -> None:
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class NativeDecoderLayer(nn.Module):
    """x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config: NativeLlamaConfig) -> None:
        super().__init__()
        self.self_attn = NativeAttention(config)
        self.mlp = NativeMLP(config)
        self.input_layernorm = NativeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = NativeRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                position_embeddings: tuple[Tensor, Tensor] | None = None, **_: Any) -> Tensor:
        if position_embeddings is None:
            raise ValueError("NativeDecoderLayer needs position_embeddings (cos, sin)")
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                           attention_mask)[0]
        return h + self.mlp(self.post_attention_layernorm(h))


class NativeLlamaModel(nn.Module):
    def __init__(self, config: NativeLlamaConfig) -> None:
        super().__init__()
        # An explicit weight skips the module's random init: on the meta device its normal_ imports
        # torch._dynamo (0.9 s, holding the GIL the actor's warm-up needs).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(NativeDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = NativeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = NativeRotaryEmbedding(config)


class NativeLlamaForCausalLM(nn.Module):
    """The skeleton the job describes and runs block by block (it has no whole-model forward)."""

    _no_split_modules = ("NativeDecoderLayer",)

    def __init__(self, config: NativeLlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = NativeLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens
