"""The memory of expert actors (--expert-actors K): each quantizes a range of about E/K of every routed block's
experts, one block at a time, a batch of experts at a time. What the block actors then no longer hold:
the routed experts' weights and Hessians (`without_routed_experts`). Entry points: `expert_actor_memory`,
`fewest_expert_actors`."""

from __future__ import annotations

import dataclasses

from wq_ops.block.experts import expert_batch_bytes, experts_per_batch, planned_expert_rows
from wq_ops.config import JobConfig, Method, MoeCalibration
from wq_ops.model.architecture import BlockLayout, ModelLayout
from wq_ops.model.moe import MoeSpec

__all__ = ["expert_actor_memory", "fewest_expert_actors", "without_routed_experts", "solve_working_set",
           "expert_temporaries", "expert_batch_workspace"]


def solve_working_set(job: JobConfig, elt: int) -> tuple[int, bool]:
    """Bytes a solve holds per weight of what it quantizes, and whether it quantizes a stacked group (the
    linears that share an input) or one linear: GPTQ a stacked copy, float32 weights and targets, and codes;
    RTN float32 weights, the dequantized copy and codes (its clipping search about four float32 temporaries
    more); HQQ about four float32 temporaries more; AWQ one linear's float32 copy, dequantized copy and codes."""
    method = job.quant.method
    if method is Method.GPTQ:
        return elt + 4 + 4 + 1 + 1, True
    if method is Method.RTN:
        return 4 + 4 + 1 + (16 if job.quant.rtn_clip_search else 0), True
    if method is Method.HQQ:
        return 4 + 4 + 1 + 16, True
    return 4 + 4 + 1, False


def without_routed_experts(block: BlockLayout) -> BlockLayout:
    """A routed block as its own actor holds it when expert actors quantize its experts: no routed expert's
    tensors (the router, attention and any shared expert stay)."""
    if block.moe is None:
        return block
    routed = block.moe.prefix + ".experts."
    return dataclasses.replace(block, linears=tuple(s for s in block.linears if not s.name.startswith(routed)),
                               params={k: v for k, v in block.params.items() if not k.startswith(routed)})


def expert_temporaries(moe: MoeSpec, job: JobConfig, elt: int) -> int:
    """Bytes one expert's quantization holds besides weights and Hessians (`quantize_experts_`): its routed rows
    gathered from every micro-batch, act(gate) * up of them, and its float32 outputs; an expert's rows counted
    at four times the mean (routing is uneven), at most every token. With --moe-calibration all, every token's
    states once more and act(gate) * up of every token."""
    tokens = job.calib.n_samples * job.calib.seq_len
    h, i = moe.hidden_size, moe.expert_intermediate
    rows = planned_expert_rows(moe, tokens)
    # act(gate) * up: gate's and up's outputs; gpt-oss's clamped SwiGLU holds two more (the clamped copies).
    widths = 4 if moe.swiglu_limit is not None else 2
    held = rows * (h * elt + widths * i * elt + 4 * h)
    if job.quant.moe.calibration is MoeCalibration.ALL:
        held += tokens * (h * elt + widths * i * elt)
    return held


def expert_batch_workspace(moe: MoeSpec, job: JobConfig, elt: int) -> int:
    """Bytes a batch of experts solved together holds (`wq_ops.block.experts.experts_per_batch`, which sizes
    the batch from the same token count: GPTQ only, within its BATCH_BYTES; 0 where experts go one at a time),
    counted on top of one expert's Hessians and temporaries (which it includes again: an overestimate)."""
    tokens = job.calib.n_samples * job.calib.seq_len
    k = experts_per_batch(moe, tokens=tokens, elt=elt, gptq=job.quant.method is Method.GPTQ)
    return k * expert_batch_bytes(moe, rows=planned_expert_rows(moe, tokens), elt=elt) if k > 1 else 0


def expert_actor_memory(layout: ModelLayout, job: JobConfig, expert_actors: int) -> tuple[int, int, int, int]:
    """(weights, hessians, activations, workspace) in bytes on one expert actor of `expert_actors`, for the
    routed block that needs the most:
    - weights: its range's experts as read, one expert's dequantized copies, the range's packed results (at
      most a byte a weight) and the largest solve's working set (one expert's gate and up stacked);
    - hessians: one expert's gate/up Hessian (its down Hessian comes after that is solved), plus the solve's
      copies of the largest one;
    - activations: the block's routed inputs (every calibration token: an expert may be sent any of them) and
      their routing (the range's weighted outputs go to the host as they are made);
    - workspace: one expert's temporaries (`expert_temporaries`) and what a batch of experts solved together
      adds (`expert_batch_workspace`)."""
    elt = layout.dtype.itemsize
    n, t = job.calib.n_samples, job.calib.seq_len
    gptq = job.quant.method is Method.GPTQ
    worst = (0, 0, 0, 0)
    specs: dict[int, MoeSpec] = {id(b.moe): b.moe for b in layout.kinds() if b.moe is not None}
    for moe in specs.values():
        h, i, k = moe.hidden_size, moe.expert_intermediate, moe.top_k
        per_range = -(-moe.n_experts // expert_actors)
        expert = 3 * h * i
        weights = per_range * expert * (elt + 1) + expert * elt + 2 * i * h * solve_working_set(job, elt)[0]
        widest_in = max(h, i)
        hessians = 4 * h * h + 4 * widest_in * widest_in * (4 if gptq else 1)
        activations = n * t * h * elt + n * t * k * (8 + 8 + 4)
        workspace = expert_temporaries(moe, job, elt) + expert_batch_workspace(moe, job, elt)
        estimate = (weights, hessians, activations, workspace)
        if sum(estimate) > sum(worst):
            worst = estimate
    return worst


def fewest_expert_actors(layout: ModelLayout, job: JobConfig, budget: int) -> int | None:
    """The fewest expert actors each of which fits `budget` bytes (None: not even one expert each)."""
    most = min((b.moe.n_experts for b in layout.kinds() if b.moe is not None), default=0)
    for k in range(1, most + 1):
        if sum(expert_actor_memory(layout, job, k)) <= budget:
            return k
    return None
