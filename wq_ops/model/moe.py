"""Mixture-of-experts blocks: which decoder blocks route their MLP to experts, under which checkpoint names, and
the routed MLP itself as wq runs it (`moe_mlp`): transformers' operations in transformers' order, over the
checkpoint's per-expert tensors (transformers 5 fuses them into 3-D parameters at load time; the artifact
keeps the checkpoint's per-expert names, as vLLM's MoE loaders and llm-compressor's outputs do).

Architectures: Qwen3-MoE (`mlp.gate`, `mlp.experts.{e}.{gate,up,down}_proj`; some blocks dense through
`mlp_only_layers` / `decoder_sparse_step`), Mixtral (`block_sparse_moe.gate`,
`block_sparse_moe.experts.{e}.{w1,w3,w2}`) and DeepSeek-V3 (sigmoid scores with `e_score_correction_bias`, top
groups then top experts, a float32 router, a shared expert `mlp.shared_experts`, the first
`first_k_dense_replace` blocks dense) and gpt-oss (a router `mlp.router` with a bias, softmax over the top-k logits;
experts with biases and a clamped SwiGLU; released fused, `wq_ops.io.fused_experts` splits them into these
per-expert names). Entry points: `moe_spec`, `moe_mlp`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from wq_ops.errors import CheckpointError

__all__ = ["MoeSpec", "moe_spec", "moe_mlp", "route", "fused_params", "fused_gpt_oss", "MOE_ARCHITECTURES", "Tap",
           "ByExpert", "sort_by_expert", "expert_linears", "expert_hidden"]

MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "MixtralForCausalLM", "DeepseekV3ForCausalLM", "GptOssForCausalLM")

# on_input(linear name, its input (tokens, in)): what capture receives for an expert's linear (block-local name).
Tap = Callable[[str, Tensor], None]


@dataclass(frozen=True)
class MoeSpec:
    """A routed MLP's shape and names (block-local). The router stays unquantized; each expert's gate, up
    and down linears are quantized on their own."""

    architecture: str
    n_experts: int
    top_k: int
    hidden_size: int
    expert_intermediate: int
    prefix: str                    # the MLP's block-local prefix in the checkpoint: "mlp" or "block_sparse_moe"
    gate_name: str                 # an expert's gate linear: "gate_proj" or "w1"
    up_name: str                   # "up_proj" or "w3"
    down_name: str                 # "down_proj" or "w2"
    norm_topk: bool                # renormalise the top-k probabilities to sum to 1
    weights_in_logits_dtype: bool  # Qwen3-MoE casts the top-k weights back to the logits' dtype; Mixtral keeps float32
    sparse_blocks: tuple[int, ...]  # the decoder blocks whose MLP is routed
    grouped: bool = False          # DeepSeek-V3: sigmoid scores plus a bias choose top groups, then top experts
    n_group: int = 1
    topk_group: int = 1
    routed_scaling: float = 1.0    # the routed experts' weights times this
    shared: str | None = None      # block-local name of the shared experts' dense MLP, added to the routed output
    router_leaf: str = "gate"      # the router module under the prefix: gpt-oss's is "router"
    router_bias: bool = False      # gpt-oss: the router's logits have a bias
    softmax_top_k: bool = False    # gpt-oss: the top-k of the logits, then a softmax over those k (logits' dtype)
    expert_bias: bool = False      # gpt-oss: every expert linear has a bias
    swiglu_limit: float | None = None   # gpt-oss's clamped SwiGLU (`expert_hidden`), None for act(gate) * up
    swiglu_alpha: float = 1.0

    @property
    def router(self) -> str:
        return f"{self.prefix}.{self.router_leaf}"

    def expert_tensors(self, e: int) -> list[str]:
        """Block-local names of expert e's tensors: each linear's weight, and its bias where experts have one."""
        leaves = (".weight", ".bias") if self.expert_bias else (".weight",)
        return [self.expert(e, which) + leaf for which in ("gate", "up", "down") for leaf in leaves]

    def expert(self, e: int, which: str) -> str:
        """Block-local name of expert e's linear `which` ("gate", "up" or "down")."""
        leaf = {"gate": self.gate_name, "up": self.up_name, "down": self.down_name}[which]
        return f"{self.prefix}.experts.{e}.{leaf}"

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """(block-local name, in_features, out_features) of every expert linear, expert by expert."""
        h, i = self.hidden_size, self.expert_intermediate
        return [shape for e in range(self.n_experts) for shape in
                ((self.expert(e, "gate"), h, i), (self.expert(e, "up"), h, i), (self.expert(e, "down"), i, h))]

    def params(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the routed MLP, as the checkpoint names it (block-local): the router's and the routed
        experts' (a shared expert is an ordinary module of the block)."""
        shapes: dict[str, tuple[int, ...]] = {self.router + ".weight": (self.n_experts, self.hidden_size)}
        if self.grouped:
            shapes[self.router + ".e_score_correction_bias"] = (self.n_experts,)
        if self.router_bias:
            shapes[self.router + ".bias"] = (self.n_experts,)
        for name, fan_in, fan_out in self.linear_shapes():
            shapes[name + ".weight"] = (fan_out, fan_in)
            if self.expert_bias:
                shapes[name + ".bias"] = (fan_out,)
        return shapes


def moe_spec(config: Any) -> MoeSpec | None:
    """The routed MLP of a transformers config (None for a dense architecture)."""
    architectures = list(getattr(config, "architectures", None) or [])
    name = architectures[0] if architectures else ""
    n_layers = int(config.num_hidden_layers)
    if name == "Qwen3MoeForCausalLM":
        step, dense = int(config.decoder_sparse_step), set(config.mlp_only_layers or [])
        sparse = tuple(i for i in range(n_layers) if i not in dense and config.num_experts > 0 and (i + 1) % step == 0)
        return MoeSpec(name, int(config.num_experts), int(config.num_experts_per_tok), int(config.hidden_size),
                       int(config.moe_intermediate_size), "mlp", "gate_proj", "up_proj", "down_proj",
                       norm_topk=bool(config.norm_topk_prob), weights_in_logits_dtype=True, sparse_blocks=sparse)
    if name == "DeepseekV3ForCausalLM":
        first_sparse = int(config.first_k_dense_replace or 0)
        return MoeSpec(name, int(config.n_routed_experts), int(config.num_experts_per_tok), int(config.hidden_size),
                       int(config.moe_intermediate_size), "mlp", "gate_proj", "up_proj", "down_proj",
                       norm_topk=bool(config.norm_topk_prob), weights_in_logits_dtype=False,
                       sparse_blocks=tuple(range(first_sparse, n_layers)), grouped=True,
                       n_group=int(config.n_group or 1), topk_group=int(config.topk_group or 1),
                       routed_scaling=float(config.routed_scaling_factor),
                       shared="mlp.shared_experts" if int(config.n_shared_experts or 0) else None)
    if name == "MixtralForCausalLM":
        if float(getattr(config, "router_jitter_noise", 0.0) or 0.0) and getattr(config, "training", False):
            raise CheckpointError("Mixtral with router jitter noise: wq routes as at inference (no noise)")
        return MoeSpec(name, int(config.num_local_experts), int(config.num_experts_per_tok), int(config.hidden_size),
                       int(config.intermediate_size), "block_sparse_moe", "w1", "w3", "w2", norm_topk=True,
                       weights_in_logits_dtype=False, sparse_blocks=tuple(range(n_layers)))
    if name == "GptOssForCausalLM":
        return MoeSpec(name, int(config.num_local_experts), int(config.num_experts_per_tok), int(config.hidden_size),
                       int(config.intermediate_size), "mlp", "gate_proj", "up_proj", "down_proj", norm_topk=False,
                       weights_in_logits_dtype=True, sparse_blocks=tuple(range(n_layers)), router_leaf="router",
                       router_bias=True, softmax_top_k=True, expert_bias=True,
                       # transformers before about 5.20 fixes them in the module, not the config
                       swiglu_limit=float(getattr(config, "swiglu_limit", 7.0)),
                       swiglu_alpha=float(getattr(config, "swiglu_alpha", 1.702)))
    return None


def route(params: Mapping[str, Tensor], x: Tensor, spec: MoeSpec) -> tuple[Tensor, Tensor]:
    """x: (tokens, hidden). The top-k experts of each token (tokens, k) int64 and their weights (tokens, k), as
    transformers' routers compute them: softmax in float32 over the router's logits, top-k, renormalised
    where the model says so; DeepSeek-V3's grouped sigmoid routing where the spec says so."""
    router_weight = params[spec.router + ".weight"]
    if spec.grouped:
        return _grouped_route(router_weight, params[spec.router + ".e_score_correction_bias"], x, spec)
    # transformers loads these routers in the model's dtype (a float32 one stored so is cast on load).
    bias = params[spec.router + ".bias"].to(x.dtype) if spec.router_bias else None
    logits = F.linear(x, router_weight.to(x.dtype), bias)                  # (tokens, experts)
    if spec.softmax_top_k:                                                 # gpt-oss
        top, experts = torch.topk(logits, spec.top_k, dim=-1)
        return experts, torch.softmax(top, dim=1, dtype=top.dtype)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, spec.top_k, dim=-1)
    if spec.norm_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if spec.weights_in_logits_dtype:
        weights = weights.to(logits.dtype)
    return experts, weights


def _grouped_route(weight: Tensor, bias: Tensor, x: Tensor, spec: MoeSpec) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3: sigmoid scores of float32 logits; the bias steers the choice (not the weights): the top
    `topk_group` groups by the sum of their two best scores, then the top-k experts within them; weights are the
    chosen scores, renormalised, times routed_scaling."""
    logits = F.linear(x.to(torch.float32), weight.to(torch.float32))       # (tokens, experts)
    scores = logits.sigmoid()
    choice = scores + bias
    per_group = spec.n_experts // spec.n_group
    group_scores = choice.view(-1, spec.n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)   # (tokens, groups)
    groups = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, groups, 1)
    mask = group_mask.unsqueeze(-1).expand(-1, spec.n_group, per_group).reshape(-1, spec.n_experts)
    choice = choice.masked_fill(~mask.bool(), float("-inf"))
    experts = torch.topk(choice, k=spec.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, experts)
    if spec.norm_topk:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return experts, weights * spec.routed_scaling


def moe_mlp(params: Mapping[str, Tensor], x: Tensor, spec: MoeSpec, *, act: Callable[[Tensor], Tensor] = F.silu,
            tap: Tap | None = None, tap_all_tokens: bool = False) -> Tensor:
    """The routed MLP on x (B, T, hidden), with `params` its block-local tensors (the router's and every
    expert's, checkpoint names). Each expert runs on the tokens routed to it, and its outputs, times their
    routing weights, are added in expert order (transformers' loop). tap: receives each expert linear's input
    (its routed tokens; an expert no token reached gets an empty one), for capture; with tap_all_tokens, every
    token's instead (each expert also runs on all tokens, for its statistics only: the output is the routed
    one either way)."""
    flat = x.reshape(-1, x.shape[-1])                                      # (tokens, hidden)
    experts, weights = route(params, flat, spec)
    out = torch.zeros_like(flat)
    by_expert = sort_by_expert(experts, spec.n_experts)
    for e in range(spec.n_experts):
        token, slot = by_expert.of(e)                                      # the tokens routed to e, and where
        if not token.numel() and tap is None:                              # capture visits every expert
            continue
        state = flat[token]                                                # (n_e, hidden)
        gate_name, down_name = spec.expert(e, "gate"), spec.expert(e, "down")
        # A weight held on the host (a replayed block whose experts were quantized elsewhere) comes over now.
        linear = expert_linears(params, spec, e, flat.device)
        hidden = expert_hidden(spec, act, linear["gate"](state), linear["up"](state))
        if tap is not None and tap_all_tokens:
            tap(gate_name, flat)
            tap(down_name, expert_hidden(spec, act, linear["gate"](flat), linear["up"](flat)))
        elif tap is not None:
            tap(gate_name, state)
            tap(down_name, hidden)
        y = linear["down"](hidden) * weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out.reshape(x.shape)


def expert_linears(params: Mapping[str, Tensor], spec: MoeSpec, e: int,
                   device: torch.device | None = None) -> dict[str, Callable[[Tensor], Tensor]]:
    """Expert e's gate, up and down linears over `params` (block-local names; its bias where it has one), each
    weight moved to `device` if given. A bias is added after the product, rounded apart from it, as gpt-oss's
    experts compute `x @ W + b` (a fused addmm rounds once, and moved its perplexity by 1e-3)."""
    def linear(which: str) -> Callable[[Tensor], Tensor]:
        name = spec.expert(e, which)
        weight = params[name + ".weight"]
        if device is not None:
            weight = weight.to(device)
        if not spec.expert_bias:
            return lambda x: F.linear(x, weight)
        bias = params[name + ".bias"] if device is None else params[name + ".bias"].to(device)
        return lambda x: F.linear(x, weight) + bias

    return {which: linear(which) for which in ("gate", "up", "down")}


def expert_hidden(spec: MoeSpec, act: Callable[[Tensor], Tensor], gate: Tensor, up: Tensor) -> Tensor:
    """An expert's down-projection input from its gate and up outputs: act(gate) * up, or gpt-oss's clamped
    SwiGLU, (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = min(gate, limit), in the order
    transformers' `GptOssExperts._apply_gate` computes it."""
    if spec.swiglu_limit is None:
        return act(gate) * up
    gate = gate.clamp(min=None, max=spec.swiglu_limit)
    up = up.clamp(min=-spec.swiglu_limit, max=spec.swiglu_limit)
    glu = gate * torch.sigmoid(gate * spec.swiglu_alpha)
    return (up + 1) * glu


@dataclass(frozen=True)
class ByExpert:
    """One micro-batch's (token, slot) pairs sorted by expert, stably: expert e's are one slice, its tokens
    ascending as torch.where(experts == e) gives them. starts: host offsets, starts[e] to starts[e + 1]."""

    tokens: Tensor                 # (tokens x top_k,) int64
    slots: Tensor
    starts: tuple[int, ...]

    def of(self, e: int) -> tuple[Tensor, Tensor]:
        """The tokens routed to expert e, and in which of their top-k slots."""
        lo, hi = self.starts[e], self.starts[e + 1]
        return self.tokens[lo:hi], self.slots[lo:hi]


def sort_by_expert(experts: Tensor, n_experts: int) -> ByExpert:
    """experts: (tokens, top_k) from `route`. One stable sort, and the counts in the pass's one host sync (a
    sync per expert left a GPU idle between 128 experts' small launches)."""
    top_k = experts.shape[-1]
    routed = experts.reshape(-1)
    order = torch.argsort(routed, stable=True)
    counts = torch.bincount(routed, minlength=n_experts).tolist()
    return ByExpert(order // top_k, order % top_k, tuple(itertools.accumulate(counts, initial=0)))


def fused_params(params: Mapping[str, Tensor], spec: MoeSpec) -> dict[str, Tensor]:
    """The block's tensors under transformers' module names: the routed MLP's experts fused into 3-D
    parameters (`mlp.experts.gate_up_proj` (experts, 2 x intermediate, hidden), gate rows first;
    `mlp.experts.down_proj` (experts, hidden, intermediate)) and the router as `mlp.gate.weight`; gpt-oss's
    as its module holds them (`fused_gpt_oss`). For running transformers' own layer on wq's tensors (checks)."""
    routed = (spec.router + ".", spec.prefix + ".experts.")
    out = {k: v for k, v in params.items() if not k.startswith(routed)}
    experts = range(spec.n_experts)
    if spec.swiglu_limit is not None:
        return {**out, **fused_gpt_oss(params, spec)}
    out["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([params[spec.expert(e, "gate") + ".weight"],
                                                              params[spec.expert(e, "up") + ".weight"]])
                                                   for e in experts])
    out["mlp.experts.down_proj"] = torch.stack([params[spec.expert(e, "down") + ".weight"] for e in experts])
    out["mlp.gate.weight"] = params[spec.router + ".weight"]
    if spec.grouped:
        out["mlp.gate.e_score_correction_bias"] = params[spec.router + ".e_score_correction_bias"]
    return out


def fused_gpt_oss(params: Mapping[str, Tensor], spec: MoeSpec) -> dict[str, Tensor]:
    """gpt-oss's routed MLP as `GptOssMLP` holds it, from the per-expert tensors: `experts.gate_up_proj`
    (experts, hidden, 2 x intermediate) with gate and up interleaved along the last dim (gate the even
    columns), `gate_up_proj_bias` likewise, `down_proj` (experts, intermediate, hidden), `down_proj_bias`, and
    the router `mlp.router.{weight,bias}`."""
    def stacked(which: str, leaf: str) -> Tensor:
        return torch.stack([params[spec.expert(e, which) + leaf] for e in range(spec.n_experts)])

    gate, up = stacked("gate", ".weight"), stacked("up", ".weight")                  # (experts, inter, hidden)
    interleaved = torch.stack([gate, up], dim=2).flatten(1, 2)                       # rows gate0, up0, gate1, ...
    bias = torch.stack([stacked("gate", ".bias"), stacked("up", ".bias")], dim=2).flatten(1, 2)
    return {"mlp.experts.gate_up_proj": interleaved.transpose(1, 2), "mlp.experts.gate_up_proj_bias": bias,
            "mlp.experts.down_proj": stacked("down", ".weight").transpose(1, 2),
            "mlp.experts.down_proj_bias": stacked("down", ".bias"),
            "mlp.router.weight": params[spec.router + ".weight"], "mlp.router.bias": params[spec.router + ".bias"]}
