"""Argument checks for the CUDA kernels, made in Python before an extension function is called.

The bindings check the same things with TORCH_CHECK, but on the H100 machine a failed check inside any
extension built there (our three families, and a one-line load_inline extension alike) ended the process
with a segmentation fault instead of raising, while torch's own errors raised normally. So every wrapper
checks here first and raises a KernelError that names the argument, what was expected and what came.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wq_ops.errors import KernelError

__all__ = ["cuda_device_of", "require_bits", "require_tensor"]


def cuda_device_of(x: object) -> torch.device:
    """x's device when x is a CUDA tensor, else the current CUDA device: where the other arguments must be."""
    return x.device if isinstance(x, Tensor) and x.is_cuda else torch.device("cuda")


def require_tensor(kernel: str, name: str, x: Tensor, *, dtypes: tuple[torch.dtype, ...],
                   shape: tuple[int | None, ...], device: torch.device) -> None:
    """x must be on `device`, of one of `dtypes`, with `shape` (None: any size along that dim)."""
    ok = (isinstance(x, Tensor) and x.device == device and x.dtype in dtypes and x.dim() == len(shape)
          and all(want is None or got == want for got, want in zip(x.shape, shape)))
    if not ok:
        sizes = ", ".join("*" if s is None else str(s) for s in shape)
        want_shape = f"({sizes},)" if len(shape) == 1 else f"({sizes})"
        got = f"{x.dtype} {tuple(x.shape)} on {x.device}" if isinstance(x, Tensor) else type(x).__name__
        raise KernelError(f"{kernel}: {name} must be a {' or '.join(str(d) for d in dtypes)} {want_shape} tensor "
                          f"on {device}; got {got}")


def require_bits(kernel: str, bits: int) -> None:
    """Codes of 1 to 8 bits: what every kernel's integer layout holds."""
    if not 1 <= bits <= 8:
        raise KernelError(f"{kernel}: bits={bits} must be 1..8")
