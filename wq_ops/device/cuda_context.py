"""The CUDA primary context, made through the CUDA driver API while torch is still being imported.

An in-process GPU actor's first CUDA call makes its device's primary context (0.3 s on the H100 machine),
and that call can only come once `import torch` is done (1.5 to 2.1 s there). Making the context needs
nothing from torch, so the command line starts `PrimaryContextThread` before its first torch import, and
the CUDA runtime under torch then finds the context made and retains it. ctypes releases the GIL for each
foreign call, so the import goes on meanwhile. This module must not import torch.
"""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Any

__all__ = ["PrimaryContextThread", "start_primary_context"]

# The CUDA driver's library, as the CUDA runtime itself loads it.
_LIBCUDA = "libcuda.so.1"


class PrimaryContextThread(threading.Thread):
    """Retains the primary context of CUDA device `ordinal` (numbered after CUDA_VISIBLE_DEVICES, as torch
    numbers it). When it is done: `context`, the context's handle, or `error`, why there is none (no driver,
    no such device); `seconds`, how long it took. A failure is left for torch to report in its own words.
    The reference is never released: torch's runtime holds the same context for the process's life."""

    def __init__(self, ordinal: int) -> None:
        super().__init__(name="wq-cuda-context", daemon=True)
        self.ordinal = ordinal
        self.context: int | None = None
        self.error: str | None = None
        self.seconds: float | None = None

    def run(self) -> None:
        t = time.perf_counter()
        try:
            self.context = _retain_primary_context(ctypes.CDLL(_LIBCUDA), self.ordinal)
        except (OSError, RuntimeError) as e:
            self.error = str(e)
        self.seconds = time.perf_counter() - t


def _retain_primary_context(cuda: Any, ordinal: int) -> int:
    """cuInit, then the device's primary context retained (made, if nobody has yet); returns its handle."""
    def call(name: str, *args: Any) -> None:
        status = getattr(cuda, name)(*args)
        if status != 0:
            raise RuntimeError(f"{name} failed with CUDA driver error {status}")

    device, context = ctypes.c_int(), ctypes.c_void_p()
    call("cuInit", 0)
    call("cuDeviceGet", ctypes.byref(device), ordinal)
    call("cuDevicePrimaryCtxRetain", ctypes.byref(context), device)
    return int(context.value or 0)


def start_primary_context(ordinal: int = 0) -> PrimaryContextThread:
    """Start making device `ordinal`'s primary context in a helper thread, and return the thread."""
    thread = PrimaryContextThread(ordinal)
    thread.start()
    return thread
