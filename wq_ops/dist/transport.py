"""Activations between actors: a tensor travels as a NumPy array (bfloat16 viewed as int16), which Ray
stores out of band in its shared-memory object store, so a hand-off costs one copy in and one out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["HostTensor", "to_host", "from_host"]

_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


@dataclass(frozen=True)
class HostTensor:
    array: np.ndarray
    dtype: str          # the torch dtype's name, e.g. "bfloat16"


def to_host(t: Tensor) -> HostTensor:
    view = _VIEW[t.dtype]
    return HostTensor(array=t.detach().contiguous().cpu().view(view).numpy(), dtype=str(t.dtype).replace("torch.", ""))


def from_host(h: HostTensor, device: torch.device | str) -> Tensor:
    dtype = getattr(torch, h.dtype)
    # The object store hands out read-only buffers: copy once, on the way to the device.
    t = torch.from_numpy(np.array(h.array, copy=True)).view(dtype)
    return t.to(device)
