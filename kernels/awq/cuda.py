"""CUDA AWQ search primitives: the contracts of reference.py on the GPU.

fake_quant(w (rows, cols) bfloat16/float32, s (cols,) float32) -> Q(w * s) / s float32, one pass, one
output buffer. clip_error(w (rows, cols) float32, h (cols, cols) float32, ratios (n,)) -> (rows,
n_groups, n) float32, with group_size 32, 64, 128 or 256; no clipped weights are materialised.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.build import load_extension
from wq_ops.errors import KernelError

__all__ = ["fake_quant", "clip_error"]

_SCALE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _scale_code(scale_dtype: torch.dtype) -> int:
    try:
        return _SCALE_DTYPES[scale_dtype]
    except KeyError:
        raise KernelError(f"scale_dtype={scale_dtype}: expected float32, bfloat16 or float16") from None


def fake_quant(w: Tensor, s: Tensor, *, bits: int, group_size: int, sym: bool, scale_dtype: torch.dtype) -> Tensor:
    try:
        return load_extension().awq_fake_quant(w, s.to(torch.float32), bits, group_size, sym,
                                               _scale_code(scale_dtype), False)
    except RuntimeError as e:
        raise KernelError(str(e).split("\n")[0]) from None


def clip_error(w: Tensor, h: Tensor, *, group_size: int, bits: int, sym: bool, scale_dtype: torch.dtype,
               ratios: Tensor) -> Tensor:
    try:
        return load_extension().awq_clip_error(w, h, group_size, bits, sym, _scale_code(scale_dtype),
                                               ratios.to(torch.float32))
    except RuntimeError as e:
        raise KernelError(str(e).split("\n")[0]) from None
