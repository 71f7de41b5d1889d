"""CUDA pack, quantize-and-pack and unpack-and-dequantize: the contracts of reference.py on the GPU.

codes: (rows, cols) uint8; w: (rows, cols) bfloat16 or float32; scale: (rows, n_groups) float32;
zero: (rows, n_groups) uint8; packed: (rows, ceil(cols * bits / 32)) int32. All CUDA; outputs are new
tensors, bit-identical to the reference.
"""

from __future__ import annotations

from torch import Tensor

from kernels.build import load_extension
from wq_ops.errors import KernelError

__all__ = ["pack_rows", "quantize_pack", "unpack_dequantize"]


def _call(name: str, *args: object) -> Tensor:
    try:
        return getattr(load_extension(), name)(*args)
    except RuntimeError as e:
        raise KernelError(str(e).split("\n")[0]) from None


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    return _call("pack_rows", codes, bits)


def quantize_pack(w: Tensor, scale: Tensor, zero: Tensor, *, bits: int) -> Tensor:
    group_size = w.shape[1] // scale.shape[1]
    return _call("quantize_pack", w, scale.contiguous(), zero.contiguous(), bits, group_size)


def unpack_dequantize(packed: Tensor, scale: Tensor, zero: Tensor, *, bits: int, cols: int) -> Tensor:
    return _call("unpack_dequantize", packed, scale.contiguous(), zero.contiguous(), bits, cols,
                 cols // scale.shape[1])
