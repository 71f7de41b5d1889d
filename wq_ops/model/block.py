"""Run one decoder block functionally over an explicit dict of its tensors, in two stages:
h = x + self_attn(input_layernorm(x)) and y = h + mlp(post_attention_layernorm(h)).

The layer module stays on the meta device: `torch.func.functional_call` binds the tensors for each call,
so quantized or rescaled weights are swapped in without touching any module. What the block's linears
share and which module can absorb a scale is probed by `wq_ops.model.anatomy.discover_anatomy`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from wq_ops.model.moe import MoeSpec, fused_params, moe_mlp

__all__ = ["STAGE_NORMS", "SequenceContext", "make_sequence_context", "LinearGroup", "BlockAnatomy", "DecoderBlock",
           "rms_norm_epsilon"]

Params = Mapping[str, Tensor]

# The two stages in call order, each with the norm whose output is its module's input.
STAGE_NORMS = {"self_attn": "input_layernorm", "mlp": "post_attention_layernorm"}


@dataclass(frozen=True)
class SequenceContext:
    """Per-sequence-length inputs every block needs: rotary (cos, sin), each (1, T, head_dim), and the
    attention mask: None for plain causal attention (SDPA's is_causal path), else (1, 1, T, T) bool."""

    position_embeddings: tuple[Tensor, Tensor]
    attention_mask: Tensor | None


def make_sequence_context(rotary: nn.Module, *, seq_len: int, hidden_size: int, window: int | None,
                          device: torch.device | str, dtype: torch.dtype, additive: bool = False) -> SequenceContext:
    """rotary: the model's rotary-embedding module, materialised on `device`. window: the layer's sliding
    attention window, None for full attention. additive: the layer's attention adds its mask to the scores (an
    eager-only architecture: `EAGER_ATTENTION_ARCHITECTURES`), so the mask is always given, causal part
    included, as transformers makes it for eager attention: 0 where a query may attend, the dtype's minimum
    elsewhere."""
    position_ids = torch.arange(seq_len, device=device).unsqueeze(0)                  # (1, T)
    probe = torch.zeros(1, seq_len, hidden_size, device=device, dtype=dtype)
    cos, sin = rotary(probe, position_ids)
    mask = None
    if additive or (window is not None and window < seq_len):
        i = torch.arange(seq_len, device=device).unsqueeze(1)
        j = torch.arange(seq_len, device=device).unsqueeze(0)
        allowed = (j <= i) if window is None else (j <= i) & (i - j < window)
        mask = allowed.reshape(1, 1, seq_len, seq_len)                                 # True: may attend
        if additive:
            mask = torch.zeros(mask.shape, device=device, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
    return SequenceContext(position_embeddings=(cos, sin), attention_mask=mask)


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the same input tensor, in call order. producer: the block-local module whose
    output is that input and which can absorb a per-channel 1/s (a norm's weight, or a linear's output
    rows), or None when nothing upstream can (then AWQ only clips this group)."""

    stage: str
    names: tuple[str, ...]
    producer: str | None


@dataclass(frozen=True)
class BlockAnatomy:
    """groups: in call order. direct_tails: the stages whose module returns its last linear's output as is
    (Llama's o_proj and down_proj): that output can be computed from the linear's stashed input alone.
    direct_heads: the groups (by first name) whose input is their stage's norm output itself (Llama's q/k/v
    and gate/up): their statistics need no pass through the module. A routed MLP's groups (each expert's
    gate/up, then each expert's down, then the shared expert's) are quantized expert by expert
    (`wq_ops.block.experts`), not in this order, under quantized propagation."""

    groups: tuple[LinearGroup, ...]
    direct_tails: tuple[str, ...] = ()
    direct_heads: tuple[str, ...] = ()

    def stage_groups(self, stage: str) -> tuple[LinearGroup, ...]:
        return tuple(g for g in self.groups if g.stage == stage)


# Norm classes (with their epsilon and width) found to compute weight * rms_norm(x): checked once each.
_RMS_NORM_CHECKED: dict[tuple[type, float, int], bool] = {}


def rms_norm_epsilon(module: nn.Module) -> float | None:
    """The epsilon of a norm whose forward is weight * rms_norm(x, eps), x upcast to float32 and the
    normalised value cast back before the weight multiplies it (transformers' Llama, Mistral, Qwen2 and
    Qwen3 RMSNorm); None for any other norm. Judged by running the module once on a small random input,
    in float32 and in bfloat16, against that formula, not by its name: a variant with an offset weight,
    a bias or another rounding keeps its own forward."""
    eps = getattr(module, "variance_epsilon", None)
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    if not isinstance(eps, float) or len(shapes) != 1 or len(shapes.get("weight", ())) != 1 or any(module.buffers()):
        return None
    width = shapes["weight"][0]
    key = (type(module), eps, width)
    if key not in _RMS_NORM_CHECKED:
        gen = torch.Generator().manual_seed(0)
        same = True
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(2, 3, width, generator=gen) * 3).to(dtype)
            w = torch.randn(width, generator=gen).to(dtype)
            with torch.no_grad():
                own = functional_call(module, {"weight": w}, (x,))
            same = same and own.dtype == dtype and torch.equal(own, w * F.rms_norm(x, (width,), None, eps))
        _RMS_NORM_CHECKED[key] = same
    return eps if _RMS_NORM_CHECKED[key] else None


def _sub(params: Params, prefix: str) -> dict[str, Tensor]:
    """The tensors under `prefix.`, with the prefix dropped."""
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in params.items() if k.startswith(prefix + ".")}


class DecoderBlock:
    """Functional two-stage forward of one decoder layer. layer: the layer module (meta device is fine);
    ctx: from `make_sequence_context` for this layer and the calibration sequence length. fuse_norms: run a
    Llama-family RMSNorm as one fused kernel (`rms_norm_epsilon`) rather than through its module, whose
    forward hooks then do not fire. moe: the block's routed MLP (its params then hold the router and every
    expert under the checkpoint's names, run by `moe_mlp`), None for a dense block; experts_see_all_tokens:
    capture gives each expert every token (--moe-calibration all), not only its routed ones."""

    def __init__(self, layer: nn.Module, ctx: SequenceContext, *, fuse_norms: bool = True,
                 moe: MoeSpec | None = None, experts_see_all_tokens: bool = False) -> None:
        self.layer = layer
        self.ctx = ctx
        self.fuse_norms = fuse_norms
        self.moe = moe
        self.experts_see_all_tokens = experts_see_all_tokens     # capture: --moe-calibration all
        self._norm_eps: dict[str, float | None] = {}      # per norm: judged once, not on every micro-batch
        self._taps: dict[str, Callable[[str, Tensor], None]] = {}     # expert linears being captured

    def _child(self, name: str) -> nn.Module:
        return self.layer.get_submodule(name)

    def norm(self, params: Params, which: str, x: Tensor) -> Tensor:
        if which not in self._norm_eps:
            self._norm_eps[which] = rms_norm_epsilon(self._child(which)) if self.fuse_norms else None
        eps = self._norm_eps[which]
        if eps is not None:
            # The module's own operations, one of them fused: weight * rms_norm(x), where rms_norm upcasts to
            # float32 and rounds back once, as transformers' Llama-family RMSNorm does in five kernels (the
            # H100: 2.0 ms a micro-batch of 16 x 2048 x 4096 against 0.6 ms, 23 ms of an 8B block).
            return params[which + ".weight"] * F.rms_norm(x, (x.shape[-1],), None, eps)
        return functional_call(self._child(which), _sub(params, which), (x,))

    def self_attn(self, params: Params, normed: Tensor) -> Tensor:
        """normed: (B, T, hidden) -> attention output (B, T, hidden), before the residual add."""
        kwargs: dict[str, Any] = dict(hidden_states=normed, position_embeddings=self.ctx.position_embeddings,
                                      attention_mask=self.ctx.attention_mask)
        out = functional_call(self._child("self_attn"), _sub(params, "self_attn"), (), kwargs)
        return out[0] if isinstance(out, tuple) else out

    def mlp(self, params: Params, normed: Tensor) -> Tensor:
        if self.moe is not None:
            routed = moe_mlp(params, normed, self.moe, act=self.expert_act, tap=self._tap if self._taps else None,
                             tap_all_tokens=self.experts_see_all_tokens)
            if self.moe.shared is None:
                return routed
            # The shared experts: a dense MLP on every token, added to the routed output (DeepSeek-V3's order).
            return routed + self.shared_mlp(params, normed)
        return functional_call(self._child("mlp"), _sub(params, "mlp"), (normed,))

    @property
    def expert_act(self) -> Callable[[Tensor], Tensor]:
        """A routed MLP's activation: transformers' own module (its experts'), so the same function runs."""
        assert self.moe is not None
        act: Callable[[Tensor], Tensor] = getattr(self._child("mlp").get_submodule("experts"), "act_fn", F.silu)
        return act

    def shared_mlp(self, params: Params, normed: Tensor) -> Tensor:
        """A routed MLP's shared expert (DeepSeek-V3's) on every token."""
        assert self.moe is not None and self.moe.shared is not None
        shared = self.moe.shared
        return functional_call(self._child(shared), _sub(params, shared), (normed,))

    def _tap(self, name: str, x: Tensor) -> None:
        on_input = self._taps.get(name)
        if on_input is not None:
            on_input(name, x)

    def linear(self, params: Params, name: str, x: Tensor) -> Tensor:
        """One linear (block-local name) on its input x, as the module calls it."""
        return functional_call(self._child(name), _sub(params, name), (x,))

    def attention_stage(self, params: Params, x: Tensor) -> Tensor:
        """x: (B, T, hidden) block input -> h = x + self_attn(input_layernorm(x))."""
        return x + self.self_attn(params, self.norm(params, "input_layernorm", x))

    def mlp_stage(self, params: Params, h: Tensor) -> Tensor:
        """h -> y = h + mlp(post_attention_layernorm(h)): the block output."""
        return h + self.mlp(params, self.norm(params, "post_attention_layernorm", h))

    def add_mlp_(self, params: Params, h: Tensor) -> Tensor:
        """h -> h + mlp(post_attention_layernorm(h)), written over h (a caller that needs h no more)."""
        return h.add_(self.mlp(params, self.norm(params, "post_attention_layernorm", h)))

    def forward(self, params: Params, x: Tensor) -> Tensor:
        return self.mlp_stage(params, self.attention_stage(params, x))

    def layer_forward(self, params: Params, x: Tensor) -> Tensor:
        """The layer's own forward, to check that the two stages compose to it (a routed MLP's experts fused
        as transformers' module holds them)."""
        own = fused_params(params, self.moe) if self.moe is not None else dict(params)
        out = functional_call(self.layer, own, (x,),
                              dict(position_embeddings=self.ctx.position_embeddings,
                                   attention_mask=self.ctx.attention_mask))
        return out[0] if isinstance(out, tuple) else out

    @contextmanager
    def quantizing_inputs(self, names: Iterable[str], transform: Callable[[str, Tensor], Tensor]) -> Iterator[None]:
        """While active, each named linear (block-local; not a routed expert's) computes on transform(name, x)
        instead of its input x: an engine's activation quantization, for evaluating what it serves."""
        handles = []
        for name in names:
            if self.moe is not None and name.startswith(self.moe.prefix + ".experts."):
                raise ValueError(f"{name}: a routed expert's input is not hooked (experts run in moe_mlp)")

            def hook(_m: nn.Module, args: tuple[Tensor, ...], name: str = name) -> tuple[Tensor, ...]:
                return (transform(name, args[0]), *args[1:])

            handles.append(self.layer.get_submodule(name).register_forward_pre_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def capturing(self, names: tuple[str, ...], on_input: Callable[[str, Tensor], None]) -> Iterator[None]:
        """While active, on_input(name, x) receives the input x: (B, T, in) of each named linear (an expert's:
        (tokens routed to it, in), possibly none)."""
        handles = []
        taps = [n for n in names if self.moe is not None and n.startswith(self.moe.prefix + ".experts.")]
        for name in taps:
            self._taps[name] = on_input
        for name in names:
            if name in taps:
                continue
            module = self.layer.get_submodule(name)

            def hook(_m: nn.Module, args: tuple[Tensor, ...], _out: Tensor, name: str = name) -> None:
                on_input(name, args[0])

            handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for name in taps:
                self._taps.pop(name, None)
