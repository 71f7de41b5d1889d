"""A decoder block's anatomy, found by probing the real block rather than by its class's name: which linears
read the same input (a group), which module produced that input and can absorb a per-channel scale (AWQ),
which stages return their last linear's output as is, and a check that the two stages reproduce the layer's
own forward. Entry point: `discover_anatomy`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from wq_ops.errors import CheckpointError, QuantizationError
from wq_ops.model.architecture import LinearSpec
from wq_ops.model.block import STAGE_NORMS, BlockAnatomy, DecoderBlock, LinearGroup, Params, SequenceContext
from wq_ops.model.moe import MoeSpec

__all__ = ["discover_anatomy", "expert_groups", "shared_expert_groups"]


def discover_anatomy(block: DecoderBlock, params: Params, linears: tuple[LinearSpec, ...], *,
                     hidden_size: int, seed: int = 0) -> BlockAnatomy:
    """Probe one block (its real tensors, cast to float32, 1 x T random tokens from `block.ctx`) to find
    the linear groups and their scale-absorbing producers, and check the two stages against the layer's
    own forward. Raises CheckpointError if the layer is not the pre-norm residual layout."""
    gen = torch.Generator().manual_seed(seed)
    device = next(iter(params.values())).device
    p32 = {k: v.to(torch.float32) for k, v in params.items()}
    ctx32 = SequenceContext(tuple(t.to(torch.float32) for t in block.ctx.position_embeddings),  # type: ignore[arg-type]
                            block.ctx.attention_mask)
    probe_block = DecoderBlock(block.layer, ctx32, fuse_norms=False, moe=block.moe)   # norm hooks must fire
    seq_len = ctx32.position_embeddings[0].shape[1]
    x = torch.randn(1, seq_len, hidden_size, generator=gen).to(device)

    staged = probe_block.forward(p32, x)
    own = probe_block.layer_forward(p32, x)
    if not bool(torch.isfinite(own).all()):     # not the layout's fault: the driver names the weight
        raise QuantizationError(f"{type(block.layer).__name__}: its forward gives NaN or Inf on random inputs "
                                "(its weights hold NaN or Inf)")
    if not torch.allclose(staged, own, rtol=1e-4, atol=1e-5):
        raise CheckpointError(f"{type(block.layer).__name__}: its forward is not x + attn(norm(x)) then "
                              "h + mlp(norm(h)); wq cannot run this layer in stages")
    moe = block.moe
    if moe is not None:       # the experts are no modules: probe the attention's linears, and build the MLP's groups
        linears = tuple(s for s in linears if s.stage == "self_attn")
    probe = _Probe.of(probe_block, p32, x, linears)
    spec = {s.name: s for s in linears}
    runs = probe.runs(spec)
    groups = tuple(LinearGroup(stage, tuple(names), _producer(probe_block, probe, spec, stage, tensor_id,
                                                                 tuple(names), p32, x, gen))
                   for stage, tensor_id, names in runs)
    # A stage's module that returns its last linear's output tensor itself, unchanged (not written in place
    # after the linear made it), adds nothing after that linear.
    last = {spec[name].stage: name for name, _ in probe.seen}
    out = probe.outputs
    tails = tuple(stage for stage in ("self_attn", "mlp")
                  if stage in last and stage in out and out[stage] is out.get(last[stage])
                  and torch.equal(probe_block.linear(p32, last[stage], probe.inputs[last[stage]]), out[stage]))
    # A group that reads its own stage's norm output itself needs no pass through the module.
    heads = tuple(names[0] for stage, tensor_id, names in runs
                  if probe.norm_out.get(tensor_id) == STAGE_NORMS[stage])
    if moe is None:
        return BlockAnatomy(groups=groups, direct_tails=tails, direct_heads=heads)
    gate_up, down = _expert_groups(moe)
    return BlockAnatomy(groups=groups + gate_up + down, direct_tails=tuple(t for t in tails if t != "mlp"),
                        direct_heads=heads)


def _expert_groups(moe: MoeSpec) -> tuple[tuple[LinearGroup, ...], tuple[LinearGroup, ...]]:
    """A routed MLP's groups: each expert's gate and up read its routed tokens (no producer can absorb a scale:
    the norm before them feeds the router too, and other experts), and its down reads act(gate) * up, whose
    channels its own up's rows can absorb exactly (not gpt-oss's clamped SwiGLU: no producer there). A shared
    expert's (DeepSeek-V3) likewise, on every token."""
    gate_up, down = expert_groups(moe, range(moe.n_experts))
    shared = shared_expert_groups(moe)
    return gate_up + shared[:1], down + shared[1:]


def expert_groups(moe: MoeSpec, experts: range) -> tuple[tuple[LinearGroup, ...], tuple[LinearGroup, ...]]:
    """The gate/up groups and the down groups of the routed `experts`, in expert order."""
    gate_up = tuple(LinearGroup("mlp", (moe.expert(e, "gate"), moe.expert(e, "up")), None) for e in experts)
    # gpt-oss's (clamp(up) + 1) * glu(gate) is not linear in up's rows: nothing can absorb down's scale there.
    down = tuple(LinearGroup("mlp", (moe.expert(e, "down"),), None if moe.swiglu_limit is not None
                             else moe.expert(e, "up")) for e in experts)
    return gate_up, down


def shared_expert_groups(moe: MoeSpec) -> tuple[LinearGroup, ...]:
    """The shared expert's gate/up group and its down group (none without a shared expert): its gate and up
    read the norm beside the router, as the routed experts do."""
    if moe.shared is None:
        return ()
    return (LinearGroup("mlp", (f"{moe.shared}.gate_proj", f"{moe.shared}.up_proj"), None),
            LinearGroup("mlp", (f"{moe.shared}.down_proj",), f"{moe.shared}.up_proj"))


@dataclass
class _Probe:
    """What one forward of the block showed: each linear's input tensor in call order (by id), which norm made
    which tensor, and each module's and linear's output. The tensors are held so their ids stay unique."""

    seen: list[tuple[str, int]] = field(default_factory=list)      # (linear, id of its input), in call order
    norm_out: dict[int, str] = field(default_factory=dict)         # id of a norm's output -> the norm
    inputs: dict[str, Tensor] = field(default_factory=dict)        # linear -> its input
    outputs: dict[str, Tensor] = field(default_factory=dict)       # module or linear -> its output
    keep: list[Tensor] = field(default_factory=list)

    @classmethod
    def of(cls, probe_block: DecoderBlock, params: Params, x: Tensor, linears: tuple[LinearSpec, ...]) -> "_Probe":
        probe = cls()
        layer = probe_block.layer

        def norm_hook(_m: nn.Module, _a: Any, out: Tensor, norm: str) -> None:
            probe.norm_out[id(out)] = norm
            probe.keep.append(out)

        def record(name: str, t: Tensor) -> None:
            probe.seen.append((name, id(t)))
            probe.keep.append(t)
            probe.inputs.setdefault(name, t)

        handles = [layer.get_submodule(norm).register_forward_hook(
            lambda m, a, out, norm=norm: norm_hook(m, a, out, norm)) for norm in STAGE_NORMS.values()]
        for name in ("self_attn", "mlp", *(s.name for s in linears)):
            handles.append(layer.get_submodule(name).register_forward_hook(
                lambda _m, _a, out, name=name: probe.outputs.__setitem__(name, out[0] if isinstance(out, tuple)
                                                                         else out)))
        try:
            with probe_block.capturing(tuple(s.name for s in linears), record):
                probe_block.forward(params, x)
        finally:
            for h in handles:
                h.remove()
        return probe

    def runs(self, spec: dict[str, LinearSpec]) -> list[tuple[str, int, list[str]]]:
        """Consecutive linears of one stage that read the same tensor: (stage, input id, names), in call order."""
        runs: list[tuple[str, int, list[str]]] = []
        for name, tensor_id in self.seen:
            stage = spec[name].stage
            if runs and runs[-1][0] == stage and runs[-1][1] == tensor_id:
                runs[-1][2].append(name)
            else:
                runs.append((stage, tensor_id, [name]))
        return runs


def _producer(probe_block: DecoderBlock, probe: _Probe, spec: dict[str, LinearSpec], stage: str, tensor_id: int,
              group: tuple[str, ...], params: Params, x: Tensor, gen: torch.Generator) -> str | None:
    """The norm whose output is the group's input, else an earlier linear of the same stage whose output rows
    map one to one onto the group's input columns; either only if the scale truly cancels. None: nothing
    upstream can absorb it (AWQ then only clips the group)."""
    stage_in = _stage_input(probe_block, stage, params, x)
    candidates: list[tuple[str, str]] = []
    if tensor_id in probe.norm_out:
        candidates.append((probe.norm_out[tensor_id], "norm"))
    else:
        order = [name for name, _ in probe.seen]
        width = spec[group[0]].in_features
        earlier = order[: order.index(group[0])]
        candidates += [(n, "linear") for n in reversed(earlier)
                       if spec[n].stage == stage and spec[n].out_features == width]
    return next((c for c, kind in candidates if _absorbs(probe_block, stage, params, stage_in, c, kind, group, gen)),
                None)


def _stage_output(block: DecoderBlock, stage: str, params: Params, x: Tensor) -> Tensor:
    return block.attention_stage(params, x) if stage == "self_attn" else block.mlp_stage(params, x)


def _absorbs(block: DecoderBlock, stage: str, params: Params, x: Tensor, producer: str, kind: str,
             consumers: tuple[str, ...], gen: torch.Generator) -> bool:
    """Does dividing the producer's output channels by s and multiplying the consumers' input columns
    by s leave the stage output unchanged (float32, random s)? That is exactly what AWQ relies on."""
    in_features = params[consumers[0] + ".weight"].shape[1]
    s = torch.rand(in_features, generator=gen).to(x.device) * 1.5 + 0.5
    changed = dict(params)
    if kind == "norm":
        if producer + ".weight" not in params or params[producer + ".weight"].shape != (in_features,):
            return False
        changed[producer + ".weight"] = params[producer + ".weight"] / s
        if producer + ".bias" in params:
            changed[producer + ".bias"] = params[producer + ".bias"] / s
    else:
        changed[producer + ".weight"] = params[producer + ".weight"] / s.unsqueeze(1)
        if producer + ".bias" in params:
            changed[producer + ".bias"] = params[producer + ".bias"] / s
    for name in consumers:
        changed[name + ".weight"] = params[name + ".weight"] * s
    ref = _stage_output(block, stage, params, x)
    got = _stage_output(block, stage, changed, x)
    return bool(((got - ref).norm() / ref.norm().clamp(min=1e-30)) < 1e-4)


def _stage_input(block: DecoderBlock, stage: str, params: Params, x: Tensor) -> Tensor:
    return x if stage == "self_attn" else block.attention_stage(params, x)
