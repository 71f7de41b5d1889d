"""The GPTQ solve of one Llama-3-8B `down_proj` (4096 x 14336, group 128): our CUDA block solve against
the reference algorithm (the paper's column loop with lazy batch updates, float32, block 128, run by
torch on the same GPU), in one run. Prints seconds, the speed-up, the fraction of codes that differ and
the ratio of the proxy losses.

    python benchmarks/gptq_solve.py [--out 4096 --in 14336 --tokens 16384]
"""

from __future__ import annotations

import argparse
import time

import torch

from wq_ops.config import Backend
from wq_ops.quant.gptq import quantize_gptq


def timed(fn, repeats: int):
    fn()                                       # warm-up: kernel build/load, cuBLAS/cuSOLVER handles
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=int, default=4096)
    p.add_argument("--in", dest="in_features", type=int, default=14336)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--act-order", action="store_true")
    args = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(args.out, args.in_features, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    # Activations with a spread of channel scales, as real MLP inputs have.
    x = torch.randn(args.tokens, args.in_features, generator=g, device="cuda") \
        * torch.rand(args.in_features, generator=g, device="cuda").pow(3).mul(4).add(0.05)
    h = (x.T @ x / args.tokens).float()
    kw = dict(bits=4, group_size=128, sym=True, damp_frac=0.01, act_order=args.act_order, block_size=128,
              scale_dtype=torch.bfloat16)
    ref_s, ref = timed(lambda: quantize_gptq(w, h, backend=Backend.REFERENCE, **kw), 1)
    cuda_s, got = timed(lambda: quantize_gptq(w, h, backend=Backend.CUDA, **kw), 5)
    differ = (got.codes != ref.codes).float().mean().item()
    print("| layer | reference (s) | cuda (s) | speed-up | codes differing | loss cuda/ref |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.out}x{args.in_features} g128{' act-order' if args.act_order else ''} | {ref_s:.3f} | "
          f"{cuda_s:.4f} | {ref_s / cuda_s:.1f}x | {differ:.2e} | {got.loss / ref.loss:.5f} |")


if __name__ == "__main__":
    main()
