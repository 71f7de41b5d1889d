"""CUDA pack, quantize-and-pack and unpack-and-dequantize: the contracts of reference.py on the GPU.

codes: (rows, cols) uint8; w: (rows, cols) bfloat16 or float32; scale: (rows, n_groups) float32;
zero: (rows, n_groups) uint8; packed: (rows, ceil(cols * bits / 32)) int32. All CUDA; outputs are new
tensors, bit-identical to the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wq_ops.errors import KernelError
from wq_ops.kernels.arguments import cuda_device_of, require_bits, require_tensor
from wq_ops.kernels.build import load_extension
from wq_ops.kernels.quant_pack import reference

__all__ = ["pack_rows", "quantize_pack", "unpack_dequantize"]


def _call(name: str, *args: object) -> Tensor:
    try:
        return getattr(load_extension(), name)(*args)
    except RuntimeError as e:
        raise KernelError(str(e).split("\n")[0]) from None


def _check_grid(kernel: str, scale: Tensor, zero: Tensor, rows: int, cols: int, device: torch.device) -> int:
    """The group size the grid implies for `cols` columns."""
    require_tensor(kernel, "scale", scale, dtypes=(torch.float32,), shape=(rows, None), device=device)
    require_tensor(kernel, "zero", zero, dtypes=(torch.uint8,), shape=tuple(scale.shape), device=device)
    n_groups = scale.shape[1]
    if n_groups < 1 or cols % n_groups:
        raise KernelError(f"{kernel}: {cols} columns do not split into the grid's {n_groups} groups")
    return cols // n_groups


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    require_bits("pack", bits)
    require_tensor("pack", "codes", codes, dtypes=(torch.uint8,), shape=(None, None), device=cuda_device_of(codes))
    return _call("pack_rows", codes, bits)


def quantize_pack(w: Tensor, scale: Tensor, zero: Tensor, *, bits: int) -> Tensor:
    require_bits("quantize_pack", bits)
    require_tensor("quantize_pack", "w", w, dtypes=(torch.bfloat16, torch.float32), shape=(None, None),
                   device=cuda_device_of(w))
    group_size = _check_grid("quantize_pack", scale, zero, w.shape[0], w.shape[1], w.device)
    return _call("quantize_pack", w, scale.contiguous(), zero.contiguous(), bits, group_size)


def unpack_dequantize(packed: Tensor, scale: Tensor, zero: Tensor, *, bits: int, cols: int) -> Tensor:
    require_bits("unpack_dequantize", bits)
    require_tensor("unpack_dequantize", "packed", packed, dtypes=(torch.int32,),
                   shape=(None, reference.packed_width(cols, bits)), device=cuda_device_of(packed))
    group_size = _check_grid("unpack_dequantize", scale, zero, packed.shape[0], cols, packed.device)
    return _call("unpack_dequantize", packed, scale.contiguous(), zero.contiguous(), bits, cols, group_size)
