"""Where one decoder block's time goes on the GPU: the block quantizer in-process (no Ray, no checkpoint),
on a block with random bf16 weights and random calibration activations.

For each method and propagation it prints the block's wall time (the baseline every other number is read
against), the quantizer's own phase split, a synced breakdown by function (each listed function is
wrapped with a device sync on both sides, so the parts add up but run a little slower than the whole),
and the top GPU kernels and CPU ops from torch.profiler.

    python benchmarks/block_profile.py --shape 8b --cases gptq:quantized,gptq:float
    python benchmarks/block_profile.py --shape 1b --cases awq:quantized --samples 128
    python benchmarks/block_profile.py --shape qwen3moe --cases gptq:quantized    # a routed block (block 0)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_e2e import SHAPES, checkpoint_tensors  # noqa: E402
from wq_ops.block.quantized import quantize_block_  # noqa: E402
from wq_ops.block.work import BlockTask  # noqa: E402
from wq_ops.config import AWQParams, Format, Propagation, QuantConfig  # noqa: E402
from wq_ops.device.timing import CudaEventClock  # noqa: E402
from wq_ops.model.anatomy import discover_anatomy  # noqa: E402
from wq_ops.model.architecture import describe_model, instantiate_on_meta  # noqa: E402
from wq_ops.model.block import DecoderBlock, make_sequence_context  # noqa: E402

# (module, function name): the calls the synced breakdown times, where the block quantizer reaches them.
TIMED = [
    ("wq_ops.block.quantized", "capture_stage"),
    ("wq_ops.block.quantized", "capture_group"),
    ("wq_ops.calib.capture", "accumulate_input_stats_"),
    ("wq_ops.model.block", "moe_mlp"),
    ("wq_ops.block.processors", "quantize_gptq"),
    ("wq_ops.block.processors", "quantize_gptq_many"),        # a routed MLP's experts, a batch at a time
    ("wq_ops.quant.gptq", "hessian_factors"),
    ("wq_ops.quant.gptq", "compute_grid"),
    ("wq_ops.block.processors", "quantize_rtn"),
    ("wq_ops.block.awq_stage", "quantize_rtn"),
    ("wq_ops.block.processors", "hessian_of"),
    ("wq_ops.block.processors", "dequantize"),
    ("wq_ops.block.processors", "output_error_tensor"),
    ("wq_ops.block.records", "outlier_channels"),
    ("wq_ops.formats.block_tensors", "encode_linear"),
    ("wq_ops.quant.awq", "search_scales"),
    ("wq_ops.quant.awq", "search_clip"),
]


def make_block(shape: str, *, samples: int, seq_len: int, micro: int, device: torch.device) -> tuple[Any, ...]:
    config, _ = checkpoint_tensors(shape)
    layout = describe_model(config)
    kind = layout.block(0)                # a mixture of experts' block 0 is routed in the benchmark's shapes
    meta = instantiate_on_meta(config)
    gen = torch.Generator(device=device).manual_seed(0)
    params = {name: (torch.ones(s, device=device) if len(s) == 1
                     else torch.randn(s, generator=gen, device=device) * 0.02).to(torch.bfloat16)
              for name, s in kind.params.items()}
    rotary = type(meta.model.rotary_emb)(config=config).to(device)
    ctx = make_sequence_context(rotary, seq_len=seq_len, hidden_size=config.hidden_size, window=None,
                                device=device, dtype=torch.bfloat16)
    probe = make_sequence_context(rotary, seq_len=16, hidden_size=config.hidden_size, window=None,
                                  device=device, dtype=torch.bfloat16)
    anatomy = discover_anatomy(DecoderBlock(meta.model.layers[0], probe, moe=kind.moe), params, kind.linears,
                               hidden_size=config.hidden_size)
    x = torch.randn(samples, seq_len, config.hidden_size, generator=gen, device=device).to(torch.bfloat16)
    return kind, DecoderBlock(meta.model.layers[0], ctx, moe=kind.moe), params, anatomy, list(x.split(micro))


def run_block(setup: tuple[Any, ...], quant: QuantConfig, propagation: Propagation) -> dict[str, float]:
    kind, block, params, anatomy, batches = setup
    task = BlockTask(quant=quant, fmt=Format.COMPRESSED_TENSORS, block_index=0, prefix="model.layers",
                     linears=kind.linears, moe=kind.moe, kept=kind.kept)
    outcome, outputs = quantize_block_(block, params, anatomy, list(batches), task, propagation=propagation,
                                       stash_tails=True,      # what the plan picks for 8B and 1B on an H100
                                       clock=CudaEventClock(torch.device("cuda")))
    torch.cuda.synchronize()
    del outputs
    return outcome.seconds


@contextlib.contextmanager
def synced_timers(totals: dict[str, list[float]]) -> Iterator[None]:
    """Wrap each TIMED function with a device sync before and after, adding its seconds to totals."""
    import importlib

    saved: list[tuple[Any, str, Callable]] = []

    def timed(name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            entry = totals.setdefault(name, [0.0, 0])
            entry[0] += time.perf_counter() - t
            entry[1] += 1
            return out

        return wrapper

    for module_name, fn_name in TIMED:
        module = importlib.import_module(module_name)
        fn = getattr(module, fn_name)
        saved.append((module, fn_name, fn))
        setattr(module, fn_name, timed(f"{module_name.rsplit('.', 1)[-1]}.{fn_name}", fn))
    try:
        yield
    finally:
        for module, fn_name, fn in saved:
            setattr(module, fn_name, fn)


def quant_for(method: str) -> QuantConfig:
    """The benchmark's setting: W4 g128, symmetric GPTQ with act-order, asymmetric AWQ, our CUDA kernels.
    "awq.module" is AWQ with --awq-loss module ("awq.layer": the default, named)."""
    method, _, awq_loss = method.partition(".")
    awq = AWQParams(loss=awq_loss) if awq_loss else AWQParams()
    return QuantConfig(method=method, bits=4, group_size=128, sym=method != "awq", backend="cuda", awq=awq)


def profile_cold_block(setup: tuple[Any, ...], args: argparse.Namespace) -> None:
    from torch.profiler import ProfilerActivity, profile

    method, propagation = args.cases.split(",")[0].split(":")
    quant = quant_for(method)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        run_block(setup, quant, Propagation(propagation))
        cold = time.perf_counter() - t
    print(f"\n== cold first block ({args.cases.split(',')[0]}): {cold:.3f} s (profiled)")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.top, max_name_column_width=60))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    p.add_argument("--cases", default="gptq:quantized,gptq:float",
                   help="method:propagation, comma-separated; awq.module is AWQ with --awq-loss module")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--top", type=int, default=18)
    p.add_argument("--cold", action="store_true", help="first profile the first block of the first case, after only "
                   "the actor's library warm-up: what a job's block 0 pays for first calls")
    args = p.parse_args()
    device = torch.device("cuda")
    if args.cold:
        from wq_ops.device.warm_up import warm_up_libraries

        warm_up_libraries(device)
    setup = make_block(args.shape, samples=args.samples, seq_len=args.seq_len, micro=args.micro_batch, device=device)
    if args.cold:
        profile_cold_block(setup, args)
    for case in args.cases.split(","):
        method, propagation = case.split(":")
        quant = quant_for(method)
        prop = Propagation(propagation)
        run_block(setup, quant, prop)                                   # warm-up: kernels, autotuning
        walls = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            seconds = run_block(setup, quant, prop)
            walls.append(time.perf_counter() - t)
        print(f"\n== {args.shape} {case}: block wall {min(walls):.3f} s (best of {args.repeats}); phases "
              + ", ".join(f"{k} {v:.3f}" for k, v in seconds.items()), flush=True)
        totals: dict[str, list[float]] = {}
        with synced_timers(totals):
            t = time.perf_counter()
            run_block(setup, quant, prop)
            synced = time.perf_counter() - t
        print(f"synced breakdown (whole block {synced:.3f} s with syncs; nested calls count in their callers too):")
        for name, (secs, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
            print(f"  {name:45s} {secs:8.3f} s  {calls:4d} calls  {secs / synced:6.1%}")
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            run_block(setup, quant, prop)
            profiled = time.perf_counter() - t
        events = prof.key_averages()
        gpu_total = sum(e.self_device_time_total for e in events) / 1e6
        print(f"profiler: wall {profiled:.3f} s, GPU kernel time {gpu_total:.3f} s "
              f"({gpu_total / profiled:.0%} busy)")
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=60))
        print(events.table(sort_by="cpu_time_total", row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
