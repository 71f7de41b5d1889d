"""What a GPU actor runs while it starts, so that the one-time costs of the GPU libraries (initialisation,
kernels loaded on their first call, per-shape GEMM plans, cuDNN's attention graphs) fall in the driver's
start-up, when the GPU is idle, and not in block 0.

`JobShapes` carries the shapes a job's blocks compute with, read from the local checkpoint's config.json
as plain JSON: the actor warms them up before it imports transformers (when the job's model runs
transformers' classes: `job_needs_transformers`), while it would otherwise wait for the driver to finish
importing it.
"""

from __future__ import annotations

import functools
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F

from wq_ops.config import Backend, JobConfig, Method, Modeling, QuantConfig
from wq_ops.errors import WqError
from wq_ops.kernels.backends import kernels_for
from wq_ops.model.architecture import storage_dtype_of
from wq_ops.model.native_llama import read_native_config

__all__ = ["JobShapes", "job_shapes", "job_needs_transformers", "warm_up_device", "release_warm_up_memory",
           "warm_up_libraries", "warm_up_quantizers", "warm_up_shapes"]

log = logging.getLogger(__name__)

# GPTQ warm-ups solve at most this many rows per layer: the kernels and the factorisation depend on the
# input width, and the full row count would only cost memory.
_WARM_ROWS = 4096


@dataclass(frozen=True)
class JobShapes:
    """A decoder block's widths (Llama naming), the job's micro-batch and sequence length, its dtype, and
    the quantizer settings (GPTQ's solves are warmed up at their real widths)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    seq_len: int
    micro_batch: int
    dtype: torch.dtype
    quant: QuantConfig


def job_shapes(job: JobConfig) -> JobShapes | None:
    """The job's shapes from its model's config.json, when the model is a local directory whose config
    names them; None otherwise (a Hub model not yet fetched, the embedded default, another layout): the
    warm-up is then skipped, at a cost to block 0 only."""
    config = _local_config(job)
    if config is None:
        return None
    native, _ = read_native_config(config)
    config = config.get("text_config", config)
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        # A natively read config knows its family's defaults (Qwen's 32 kv heads, Qwen3's head_dim 128).
        head_dim = native.head_dim if native else int(config.get("head_dim") or hidden // heads)
        kv_heads = native.num_key_value_heads if native else int(config.get("num_key_value_heads") or heads)
        shapes = JobShapes(hidden=hidden, intermediate=int(config["intermediate_size"]), heads=heads,
                           kv_heads=kv_heads, head_dim=head_dim,
                           seq_len=job.calib.seq_len, micro_batch=min(job.run.micro_batch_samples, job.calib.n_samples),
                           dtype=storage_dtype_of(SimpleNamespace(dtype=config.get("dtype"),
                                                                  torch_dtype=config.get("torch_dtype"))),
                           quant=job.quant)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError, AttributeError, WqError):
        return None
    if min(shapes.hidden, shapes.intermediate, shapes.heads, shapes.kv_heads, shapes.head_dim) <= 0:
        return None
    return shapes


def job_needs_transformers(job: JobConfig) -> bool:
    """Whether the job's blocks will run transformers' classes, so that the actor imports transformers
    while it starts: yes unless the local config.json reads natively and --modeling allows that. A
    wrong guess costs time only: the import otherwise happens on the actor's first call."""
    if job.modeling is Modeling.TRANSFORMERS:
        return True
    config = _local_config(job)
    return config is None or read_native_config(config)[0] is None


def _local_config(job: JobConfig) -> dict | None:
    """The model's config.json when the model is a local directory that has a readable one."""
    if not job.model:
        return None
    try:
        config = json.loads((Path(job.model) / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) else None


def warm_up_device(device: torch.device, backend: Backend, shapes: JobShapes | None, *, release: bool = True) -> None:
    """The warm-ups a GPU actor runs, side by side: the libraries and the quantizers (our kernels on CUDA)
    in helper threads, the job's shapes (when known) on the calling thread, the one that will compute the
    blocks: cuDNN keeps its attention graphs per thread (70 ms to build again for the 1B job's block 0).
    Their time is mostly the CUDA driver loading kernel modules and the libraries building handles and
    plans, which overlap well: 0.62 to 0.90 s in 1B GPTQ jobs on the H100, against 1.17 to 1.47 s one after
    the other. Returns once every one has finished (none is left running on the device); the first error,
    in the order libraries, quantizers, shapes, is raised then and any other logged. release: then
    `release_warm_up_memory`; a caller whose other threads may run GEMMs meanwhile releases it later."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    helpers: list[Callable[[torch.device], object]] = [warm_up_libraries]
    if backend is Backend.CUDA:
        helpers.append(functools.partial(warm_up_quantizers, shapes=shapes))

    def on_device(step: Callable[[torch.device], object]) -> object:
        with torch.cuda.device(index):          # a new thread's current device is device 0
            return step(device)

    _load_linalg(device)
    shapes_error: BaseException | None = None
    with ThreadPoolExecutor(len(helpers), thread_name_prefix="wq-warm-up") as pool:
        done = [pool.submit(on_device, step) for step in helpers]
        try:
            if shapes is not None:
                warm_up_shapes(device, shapes)
        except BaseException as e:              # raised below, after the helpers' own errors
            shapes_error = e
    if release:
        release_warm_up_memory()
    errors = [e for e in [*(future.exception() for future in done), shapes_error] if e is not None]
    for later in errors[1:]:
        log.warning("GPU warm-up also failed: %r", later)
    if errors:
        raise errors[0]


def release_warm_up_memory() -> None:
    """Give back the device memory the warm-ups kept. Each helper thread took a cuBLAS handle, and torch
    keeps a workspace per handle and stream for the process's life (32 MiB on the H100), which the plan does
    not hold: every workspace is dropped, and the job's own thread allocates its one again on its first
    GEMM. No other thread may run GEMMs meanwhile: one that has just set its handle's workspace would launch
    into memory given back to the device. The cache goes back to the device too, as the shapes' warm-up
    leaves it when it runs alone."""
    clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear_workspaces is not None:
        clear_workspaces()
    torch.cuda.empty_cache()


def _load_linalg(device: torch.device) -> None:
    """torch loads its CUDA linear algebra library on the process's first call into it, and two threads
    making that first call together fail ("lazy wrapper should be called at most once": 4 of 4 fresh
    processes with three threads at a barrier on the H100). A tiny Cholesky loads it here, on one thread."""
    torch.linalg.cholesky_ex(torch.eye(2, device=device, dtype=torch.float32))   # whatever the default dtype


def warm_up_libraries(device: torch.device) -> None:
    """Initialise, on tiny inputs, the GPU libraries every block calls (cuBLAS in bf16 and float32,
    cuSOLVER, the attention kernels), so their one-time set-up (about a second) happens while the driver
    still reads the checkpoint and the calibration data, not in the first block."""
    from torch.nn.functional import scaled_dot_product_attention

    with torch.no_grad():
        x = torch.randn(64, 64, device=device, dtype=torch.float32)
        h = x.T @ x + 64 * torch.eye(64, device=device, dtype=torch.float32)
        torch.linalg.cholesky_ex(h)
        xb = x.to(torch.bfloat16)
        torch.mm(xb.T, xb, out_dtype=torch.float32)
        q = torch.randn(1, 2, 16, 128, device=device, dtype=torch.bfloat16)
        scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.cuda.synchronize(device)


def warm_up_quantizers(device: torch.device, shapes: JobShapes | None = None) -> None:
    """Run the job's quantizer once on a tiny layer (every quantizer, sym and asym, where the job's shapes and
    settings are unknown): CUDA loads a kernel's module on its first call, and the first block calls dozens
    (the solvers, sorts, scatters, ours), 0.3 s on the H100 that now overlaps with the driver's start-up
    instead of adding to block 0. The warm-ups side by side share the driver's module loading, so the
    quantizers a job will not call only delay the others. Tiny shapes: the per-shape plans are
    `warm_up_shapes`' work, and only the default format's encoder (compressed-tensors) is warmed."""
    from wq_ops.formats.compressed_tensors import encode_linear
    from wq_ops.kernels.awq import cuda as awq_cuda
    from wq_ops.kernels.gptq.cuda import CUDA_SOLVER
    from wq_ops.quant import awq
    from wq_ops.quant.gptq import quantize_gptq
    from wq_ops.quant.hessian import accumulate_input_stats_, hessian_of, new_input_stats, output_error
    from wq_ops.quant.result import dequantize
    from wq_ops.quant.rtn import quantize_rtn

    gen = torch.Generator(device=device).manual_seed(0)
    stats = new_input_stats(256, device)
    accumulate_input_stats_(stats, torch.randn(512, 256, generator=gen, device=device, dtype=torch.bfloat16))
    h = hessian_of(stats)
    w = torch.randn(64, 256, generator=gen, device=device, dtype=torch.float32)
    quant = shapes.quant if shapes is not None else None
    methods = {quant.method} if quant is not None else set(Method)
    act_order = quant.act_order if quant is not None else True
    for sym in (quant.sym,) if quant is not None else (True, False):
        if Method.GPTQ in methods:
            quantize_gptq(w, h, bits=4, group_size=128, sym=sym, damp_frac=0.01, act_order=act_order,
                          block_size=128, scale_dtype=torch.bfloat16, solver=CUDA_SOLVER)
        clip = None
        if Method.AWQ in methods:
            clip = awq.search_clip(w, h, bits=4, group_size=128, sym=sym, scale_dtype=torch.bfloat16, n_grid=20,
                                   max_shrink=0.5, primitives=awq_cuda)
            awq.search_scales({"w": w}, stats.abs_sum, lambda cand: (cand["w"] - w).square().sum(), bits=4,
                              group_size=128, sym=sym, scale_dtype=torch.bfloat16, n_grid=2, primitives=awq_cuda)
        result = quantize_rtn(w, bits=4, group_size=128, sym=sym, scale_dtype=torch.bfloat16, clip=clip)
        output_error(w, dequantize(result, torch.bfloat16), h)
        encode_linear("warm_up", result, sym=sym, scale_dtype=torch.bfloat16, backend=Backend.CUDA)
    torch.cuda.synchronize(device)


def warm_up_shapes(device: torch.device, shapes: JobShapes) -> bool:
    """One micro-batch of random data through a block's GEMM shapes, its attention call and its Hessian
    updates, and for GPTQ a solve at each input width: cuDNN builds an attention graph per shape (0.7 s of
    an 8B job's block 0 on the H100) and cuBLAS picks kernels per shape. The attention call is made as
    transformers' SDPA path makes it (heads viewed out of the projection and transposed, rotary applied
    elementwise, GQA by enable_gqa); where the real call differs, its cost simply stays in block 0.
    Returns False, having logged why, if the warm-up could not run: it does not fail the job, unless it
    left the device itself broken (a sticky CUDA error), which the job's first block would only report
    less clearly. Its memory goes back to the device either way."""
    try:
        with torch.no_grad():
            _run_shapes(device, shapes)
        torch.cuda.synchronize(device)
        return True
    except (RuntimeError, ValueError, WqError) as e:   # out of memory included: the plan decides what fits
        try:
            torch.ones(1, device=device).add_(1).cpu()         # is the device still usable?
        except RuntimeError:
            raise e from None
        log.warning("GPU warm-up at the job's shapes skipped (%s): block 0 pays for its first calls", e)
        return False
    finally:
        torch.cuda.empty_cache()


def _run_shapes(device: torch.device, shapes: JobShapes) -> None:
    from wq_ops.quant.gptq import quantize_gptq
    from wq_ops.quant.hessian import accumulate_input_stats_, hessian_of, new_input_stats

    gen = torch.Generator(device=device).manual_seed(0)
    mb, t, hd = shapes.micro_batch, shapes.seq_len, shapes.head_dim
    q_width, kv_width = shapes.heads * hd, shapes.kv_heads * hd

    def randn(*size: int, dtype: torch.dtype = shapes.dtype) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device, dtype=dtype)

    x = randn(mb, t, shapes.hidden)
    x = randn(shapes.hidden) * F.rms_norm(x, (shapes.hidden,), None, 1e-6)   # the stage norms (DecoderBlock.norm)
    for width in (q_width, kv_width, shapes.intermediate):          # q; k and v; gate and up
        F.linear(x, randn(width, shapes.hidden))
    cos = randn(1, 1, t, hd)
    q = randn(mb, t, q_width).view(mb, t, shapes.heads, hd).transpose(1, 2)
    k = randn(mb, t, kv_width).view(mb, t, shapes.kv_heads, hd).transpose(1, 2)
    v = randn(mb, t, kv_width).view(mb, t, shapes.kv_heads, hd).transpose(1, 2)
    q, k = q * cos + q * cos, k * cos + k * cos
    attended = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, scale=hd ** -0.5, is_causal=True,
                                              enable_gqa=shapes.heads != shapes.kv_heads)
    attended = attended.transpose(1, 2).reshape(mb, t, q_width).contiguous()
    F.linear(attended, randn(shapes.hidden, q_width))                # o
    inner = randn(mb, t, shapes.intermediate)
    F.linear(inner, randn(shapes.hidden, shapes.intermediate))       # down
    quant = shapes.quant
    # q/k/v's input (gate/up's has the same width), o's and down's. A width the group size does not divide
    # is not solved: the job quantizes no such layer (it is ignored, or the job is refused).
    for width, rows, inputs in ((shapes.hidden, q_width + 2 * kv_width, x), (q_width, shapes.hidden, attended),
                                (shapes.intermediate, shapes.hidden, inner)):
        stats = new_input_stats(width, device)
        accumulate_input_stats_(stats, inputs)
        if quant.method is Method.GPTQ and (quant.group_size is None or width % quant.group_size == 0):
            quantize_gptq(randn(min(rows, _WARM_ROWS), width, dtype=torch.float32), hessian_of(stats),
                          bits=quant.bits, group_size=quant.group_size, sym=quant.sym, damp_frac=quant.gptq.damp_frac,
                          act_order=quant.act_order, block_size=quant.gptq.block_size, scale_dtype=shapes.dtype,
                          solver=kernels_for(quant.backend).gptq)
        del stats
