"""A digest of tensors' contents: what a staged block was computed from, so that a resumed job reuses a block
only while its source weights are the same bytes (names, dtypes, shapes and data)."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping

import torch
from torch import Tensor

__all__ = ["tensors_sha256", "tensor_entries", "tensor_entry", "combine_entries"]

# hashlib releases the GIL on large buffers: a block's tensors hash side by side.
_POOL = ThreadPoolExecutor(max(1, min(8, (os.cpu_count() or 1) // 2)), thread_name_prefix="wq-digest")


def tensor_entry(name: str, tensor: Tensor) -> str:
    """One tensor's line of a digest: its name, dtype, shape and the sha256 of its bytes."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    data = hashlib.sha256(flat.view(torch.uint8).numpy().data if flat.numel() else b"").hexdigest()
    return f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0{data}\n"


def combine_entries(entries: Mapping[str, str]) -> str:
    """The digest of tensors from their entries (name -> `tensor_entry`), in name order."""
    h = hashlib.sha256()
    for name in sorted(entries):
        h.update(entries[name].encode())
    return h.hexdigest()


def tensor_entries(tensors: Mapping[str, Tensor]) -> dict[str, str]:
    """Each tensor's `tensor_entry`, hashed side by side: entries of tensors read in different places (a block's
    actor and its expert actors) combine into the digest of them all."""
    names = sorted(tensors)
    return dict(zip(names, _POOL.map(lambda n: tensor_entry(n, tensors[n]), names)))


def tensors_sha256(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and the sha256 of its bytes, in name order."""
    return combine_entries(tensor_entries(tensors))
