"""How long a GPU job should take, from measured rates (`H100`), before it runs: the plan prints it, and
docs/scaling.md tabulates it for clusters not at hand. A model of quantized propagation (the blocks one after
another): each block's own actor computes its dense part (attention, a dense MLP or a shared expert) while
its next block loads; a routed block's experts are quantized one at a time by its actor or, with
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
    expert_forward: float      # an expert's statistics and passes: per weight and routed row
    expert_solve: float        # an expert's GPTQ solves: per in^2 x out of its gate/up and its down
    expert_fixed: float        # an expert's launches and bookkeeping, whatever its size
    disk: float                # bytes per second one node's disk reads (its actors share it)
    host_copy: float           # bytes per second of a copy between a GPU and its host (and the object store)
    startup: float             # Ray, the actors' processes, CUDA contexts and kernels, the preparation
    source: str                # where the numbers come from


# Dense rates: the 8B GPTQ runs of benchmarks/RESULTS.md (H100, 128 x 2048 tokens, 32 blocks): forward phase
# 10.7 s, solve 4.3 s; a block has 218M weights and its linears' in^2 x out sum to 1.49e12.
# Expert rates: the eleventh session's H100 blocks (RESULTS.md, before experts went one at a time over all
# their rows, so an upper bound): per routed block, Qwen3-30B-A3B (128 experts of 2048 x 768, 16384 rows each)
# forward 4.9 s and solve 1.1 s, Mixtral-8x7B (8 of 4096 x 14336, 65536 rows each) forward 1.4 s and solve 0.9 s.
# Per expert, forward = f x rows x 3hi + c1 and solve = s x (h^2 2i + i^2 h) + c2 through both points:
# f = 1.2e-14, c1 = 0.037 s, s = 7.9e-14 (the dense solve's 9.0e-14 agrees), c2 = 0.008 s.
# Disk: 1.34 GB/s measured on that machine (docs/scaling.md). Host copies: 10 GB/s, the object store's
# in-node rate assumed in docs/scaling.md. Start-up: Ray, actors and preparation, about 30 s in those runs.
H100 = Rates(
    dense_forward=10.7 / 32 / (218_103_808 * 262_144),
    dense_solve=4.3 / 32 / 1.49e12,
    expert_forward=(1.4 / 8 - 4.9 / 128) / (65536 * 3 * 4096 * 14336 - 16384 * 3 * 2048 * 768),
    expert_solve=(0.9 / 8 - 1.1 / 128) / (4096 ** 2 * 2 * 14336 + 14336 ** 2 * 4096 - 2048 ** 2 * 2 * 768
                                           - 768 ** 2 * 2048),
    expert_fixed=0.037 + 0.008,
    disk=1.34e9,
    host_copy=10e9,
    startup=30.0,
    source="H100, benchmarks/RESULTS.md: 8B GPTQ (dense) and the Qwen3-30B-A3B and Mixtral-8x7B blocks of the "
           "eleventh session (experts)",
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
    """One expert at the mean routed rows (tokens x top-k / experts), or every token with --moe-calibration all
    for its statistics (counted as routed rows: the passes dominate)."""
    h, i = moe.hidden_size, moe.expert_intermediate
    rows = tokens * moe.top_k / moe.n_experts
    return (rates.expert_forward * rows * 3 * h * i + rates.expert_solve * (h * h * 2 * i + i * i * h)
            + rates.expert_fixed)


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
        experts = largest * _expert_seconds(moe, tokens, rates)
        # Host copies: the block's actor puts the routed inputs in the object store (two copies) and each
        # expert actor takes them onto its GPU (one, side by side); each puts its outputs there (two of its share,
        # side by side) and the block's actor takes all of them onto its GPU (two).
        inputs, outputs = tokens * moe.hidden_size * elt, tokens * moe.top_k * moe.hidden_size * elt
        transfers = (3 * inputs + 2 * outputs * (1 + 1 / k)) / rates.host_copy
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
