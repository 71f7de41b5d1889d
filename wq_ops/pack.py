"""Pack integer codes into int32 words and back: exact round trips, on the chosen backend.

Layout (compressed-tensors `pack-quantized`; GPTQ v1 along the other dim): each row is one bit stream;
element i of a row occupies bits [i*bits, (i+1)*bits) of the row's little-endian stream of 32-bit
words (wq_ops/kernels/quant_pack/reference.py states it and implements it in plain PyTorch).
"""

from __future__ import annotations

from torch import Tensor

from wq_ops.config import Backend
from wq_ops.kernels.quant_pack import reference

__all__ = ["pack_rows", "unpack_rows", "pack_columns", "unpack_columns", "packed_width"]

packed_width = reference.packed_width


def pack_rows(codes: Tensor, bits: int, *, backend: Backend = Backend.REFERENCE) -> Tensor:
    """codes: (rows, cols) integers in [0, 2**bits - 1] -> (rows, ceil(cols * bits / 32)) int32."""
    if backend is Backend.CUDA:
        from wq_ops.kernels.quant_pack import cuda

        return cuda.pack_rows(codes, bits)
    return reference.pack_rows(codes, bits)


def unpack_rows(packed: Tensor, bits: int, cols: int) -> Tensor:
    """Inverse of `pack_rows` -> (rows, cols) uint8 (reference path: used by format checks)."""
    return reference.unpack_rows(packed, bits, cols)


def pack_columns(codes: Tensor, bits: int) -> Tensor:
    """Pack along dim 0, each column one bit stream (GPTQ's qweight: codes transposed to (in, out)).
    codes: (rows, cols) integers in [0, 2**bits - 1] -> (ceil(rows * bits / 32), cols) int32 (reference path)."""
    return reference.pack_columns(codes, bits)


def unpack_columns(packed: Tensor, bits: int, rows: int) -> Tensor:
    """Inverse of `pack_columns` -> (rows, cols) uint8."""
    return reference.unpack_columns(packed, bits, rows)
