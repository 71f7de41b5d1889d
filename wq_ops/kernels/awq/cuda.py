"""CUDA AWQ search primitives: the contracts of reference.py on the GPU.

fake_quant(w (rows, cols) bfloat16/float32, s (cols,) float32) -> Q(w * s) / s float32, one pass, one
output buffer. clip_error(w (rows, cols) float32, h (cols, cols) float32, ratios (n,)) -> (rows,
n_groups, n) float32, with group_size 32, 64, 128 or 256; no clipped weights are materialised.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wq_ops.errors import KernelError
from wq_ops.kernels.arguments import cuda_device_of, require_bits, require_tensor
from wq_ops.kernels.build import load_extension

__all__ = ["fake_quant", "clip_error"]

_SCALE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _scale_code(scale_dtype: torch.dtype) -> int:
    try:
        return _SCALE_DTYPES[scale_dtype]
    except KeyError:
        raise KernelError(f"scale_dtype={scale_dtype}: expected float32, bfloat16 or float16") from None


def fake_quant(w: Tensor, s: Tensor, *, bits: int, group_size: int, sym: bool, scale_dtype: torch.dtype) -> Tensor:
    kernel = "awq fake quant"
    require_bits(kernel, bits)
    device = cuda_device_of(w)
    require_tensor(kernel, "w", w, dtypes=(torch.bfloat16, torch.float32), shape=(None, None), device=device)
    _require_groups(kernel, w.shape[1], group_size)
    require_tensor(kernel, "s", s, dtypes=(torch.float32, torch.bfloat16, torch.float16), shape=(w.shape[1],),
                   device=device)
    code = _scale_code(scale_dtype)
    try:
        return load_extension().awq_fake_quant(w, s.to(torch.float32), bits, group_size, sym, code, False)
    except RuntimeError as e:
        raise KernelError(str(e).split("\n")[0]) from None


def clip_error(w: Tensor, h: Tensor, *, group_size: int, bits: int, sym: bool, scale_dtype: torch.dtype,
               ratios: Tensor) -> Tensor:
    kernel = "awq clip error"
    require_bits(kernel, bits)
    if group_size not in (32, 64, 128, 256):
        raise KernelError(f"{kernel}: group_size={group_size}; the kernel handles 32, 64, 128 or 256 columns a group")
    device = cuda_device_of(w)
    require_tensor(kernel, "w", w, dtypes=(torch.float32,), shape=(None, None), device=device)
    _require_groups(kernel, w.shape[1], group_size)
    require_tensor(kernel, "h", h, dtypes=(torch.float32,), shape=(w.shape[1], w.shape[1]), device=device)
    require_tensor(kernel, "ratios", ratios, dtypes=(torch.float32, torch.float64), shape=(None,), device=device)
    code = _scale_code(scale_dtype)
    try:
        return load_extension().awq_clip_error(w, h, group_size, bits, sym, code, ratios.to(torch.float32))
    except RuntimeError as e:
        raise KernelError(str(e).split("\n")[0]) from None


def _require_groups(kernel: str, cols: int, group_size: int) -> None:
    if group_size < 1 or cols % group_size:
        raise KernelError(f"{kernel}: {cols} columns are not a multiple of group_size={group_size}")
