"""How long a GPU job should take, from measured rates (`H100`), before it runs: the plan prints it, and
docs/scaling.md tabulates it for clusters not at hand. A model of quantized propagation (the blocks one after
another): each block's own actor computes its dense part (attention, a dense MLP or a shared expert) while
its next block loads; a routed block's experts are quantized a batch at a time by its actor or, with
--expert-actors, range by range on the expert actors at once, each reading its range of the next routed block
while this one runs, and receiving the routed inputs and returning its outputs through the host. Rates, not
guarantees: uneven routing, other disks and networks move it. Entry point: `estimate_seconds`."""

from __future__ import annotations

from dataclasses import dataclass

from wq_ops.config import JobConfig, Method
from wq_ops.model.architecture import BlockLayout, ModelLayout
from wq_ops.model.moe import MoeSpec

__all__ = ["Rates", "H100", "estimate_seconds"]


@dataclass(frozen=True)
class Rates:
    """Seconds per unit of work on one GPU, GPTQ W4 g128 with wq's CUDA kernels, bf16 activations."""

    dense_forward: float       # a dense block's passes: per weight and calibration token
    dense_solve: float         # a dense block's GPTQ solves: per in^2 x out of each linear
    # Experts measured at their shapes: (hidden, intermediate, routed rows, passes' seconds, solve seconds) per
    # expert; passes scale with the rows. Another shape takes the measured one nearest in size, scaled.
    experts: tuple[tuple[int, int, float, float, float], ...]
    disk: float                # bytes per second one node's disk reads (its actors share it)
    to_host: float             # bytes per second of a GPU's tensors copied to the host (the object store's way in)
    to_device: float           # bytes per second from the host (the object store) onto a GPU
    startup: float             # Ray, the actors' processes, CUDA contexts and kernels, the preparation
    source: str                # where the numbers come from


# Dense rates: the 8B GPTQ runs of benchmarks/RESULTS.md (H100, 128 x 2048 tokens, 32 blocks): forward phase
# 10.7 s, solve 4.3 s; a block has 218M weights and its linears' in^2 x out sum to 1.49e12.
# Expert rates: `python benchmarks/expert_rates.py --shapes deepseek_v3,qwen3_30b,mixtral --experts 8` on an
# H100 (RESULTS.md, 2026-12-06; Qwen3's rerun with its experts solved in batches, 18th session; DeepSeek-V3's
# and Mixtral's go one at a time, and measured the same there): per expert at uniform top-k routing of
# 128 x 2048 tokens, the passes (with the
# copy of its outputs to the host, as an expert actor makes it: an upper bound where the block's own actor adds
# them on the GPU) and the solve. Host copies measured there: the routed inputs to the host 1.9 GB/s, onto a
# GPU 3.0 GB/s. Disk: 1.34 GB/s measured on that
# machine (docs/scaling.md). Start-up: Ray, actors and preparation, about 30 s in the MoE runs of RESULTS.md.
H100 = Rates(
    dense_forward=10.7 / 32 / (218_103_808 * 262_144),
    dense_solve=4.3 / 32 / 1.49e12,
    experts=((7168, 2048, 8234, 0.0688, 0.0250), (2048, 768, 16408, 0.0416, 0.0033),
             (4096, 14336, 65536, 0.3210, 0.1100)),
    disk=1.34e9,
    to_host=1.9e9,
    to_device=3.0e9,
    startup=30.0,
    source="H100: benchmarks/RESULTS.md (8B GPTQ for dense blocks), benchmarks/expert_rates.py (experts)",
)


def _solve_units(block: BlockLayout, *, routed: bool) -> float:
    """Sum of in^2 x out over the block's linears: the routed experts' (routed) or the others'."""
    experts = block.moe.prefix + ".experts." if block.moe is not None else None
    return float(sum(s.in_features ** 2 * s.out_features for s in block.linears
                     if (experts is not None and s.name.startswith(experts)) == routed))


def _dense_weights(block: BlockLayout) -> int:
    experts = block.moe.prefix + ".experts." if block.moe is not None else None
    return sum(s.in_features * s.out_features for s in block.linears
               if experts is None or not s.name.startswith(experts))


def _expert_seconds(moe: MoeSpec, tokens: int, rates: Rates) -> float:
    """One expert at the mean routed rows (tokens x top-k / experts; with --moe-calibration all its statistics
    see every token, counted as routed rows: the passes dominate). A shape not measured takes the measured
    shape nearest in weights, its passes scaled by rows x weights and its solve by in^2 x out."""
    h, i = moe.hidden_size, moe.expert_intermediate
    rows = tokens * moe.top_k / moe.n_experts
    mh, mi, m_rows, passes, solve = min(rates.experts, key=lambda m: abs(m[0] * m[1] - h * i))
    return (passes * rows * h * i / (m_rows * mh * mi)
            + solve * (h * h * 2 * i + i * i * h) / (mh * mh * 2 * mi + mi * mi * mh))


def estimate_seconds(layout: ModelLayout, job: JobConfig, *, source_bytes_per_weight: float,
                     gpus_per_node: int = 8, rates: Rates = H100) -> dict[str, float] | None:
    """Seconds by part (startup, dense, experts, expert_loads, transfers) and their total, for a GPTQ job under
    quantized propagation on GPU actors; None where the model does not apply (CPU actors, float propagation,
    another method, or rates not measured). source_bytes_per_weight: what the checkpoint stores a weight in
    (1 for an FP8 release, 2 for bf16), for the expert actors' reads."""
    if job.run.gpus_per_actor <= 0 or job.quant.method is not Method.GPTQ:
        return None
    if job.run.propagation.value != "quantized":
        return None
    tokens = job.calib.n_samples * job.calib.seq_len
    k = job.run.expert_actors
    elt = layout.dtype.itemsize
    parts = {"startup": rates.startup, "dense": 0.0, "experts": 0.0, "expert_loads": 0.0, "transfers": 0.0}
    first_routed = True
    for index in range(layout.n_blocks):
        block = layout.block(index)
        moe = block.moe
        dense = (rates.dense_forward * _dense_weights(block) * tokens
                 + rates.dense_solve * _solve_units(block, routed=False))
        weights = sum(s.in_features * s.out_features for s in block.linears)
        if moe is None or not k:
            # The block's actor computes it all while its next block loads (prefetched).
            experts = moe.n_experts * _expert_seconds(moe, tokens, rates) if moe is not None else 0.0
            load = weights * source_bytes_per_weight / rates.disk
            parts["dense"] += dense
            parts["experts"] += experts
            parts["expert_loads"] += max(0.0, load - dense - experts)        # what the compute does not hide
            continue
        dense = max(dense, _dense_weights(block) * source_bytes_per_weight / rates.disk)
        largest = -(-moe.n_experts // k)
        inputs, outputs = tokens * moe.hidden_size * elt, tokens * moe.top_k * moe.hidden_size * elt
        # The block's actor copies the routed inputs to the host and every range's outputs onto its GPU, and each
        # expert actor the inputs onto its own (side by side); its own outputs' copies are in its passes.
        experts = largest * _expert_seconds(moe, tokens, rates)
        transfers = inputs / rates.to_host + inputs / rates.to_device + outputs / rates.to_device
        # Each expert actor reads its range of the next routed block while this one runs (read ahead); the
        # actors on one node share its disk. The first routed block's read waits.
        read = min(k, gpus_per_node) * largest * 3 * moe.hidden_size * moe.expert_intermediate \
            * source_bytes_per_weight / rates.disk
        busy = dense + experts + transfers
        parts["dense"] += dense
        parts["experts"] += experts
        parts["transfers"] += transfers
        parts["expert_loads"] += read if first_routed else max(0.0, read - busy)
        first_routed = False
    parts["total"] = sum(parts.values())
    return parts
