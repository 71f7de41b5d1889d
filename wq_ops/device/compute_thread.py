"""The thread a GPU actor computes its blocks on, which first warms the device up.

The actor's own thread takes its calls (Ray's, or the in-process runtime's) and only moves data: it stages
the head, embeds the tokens and starts block loads while the warm-up is still running here. Every block
then computes here too, so it finds what the warm-up left per thread (cuDNN's attention graphs).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import torch

__all__ = ["ComputeThread"]

_T = TypeVar("_T")


class ComputeThread:
    """Runs `warm_up()` at once, then each `call` in order. The first call waits for the warm-up (raising its
    error) and runs `settle()` just before it, while the caller waits: no other thread of the actor computes
    then, which is what releasing the warm-up's leftovers needs (`release_warm_up_memory`)."""

    def __init__(self, device: torch.device | None, warm_up: Callable[[], object], settle: Callable[[], None]) -> None:
        self._device = device
        self._ident: int | None = None
        self._settle = settle
        self._settled = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="wq-compute", initializer=self._enter)
        self._warm_up = self._pool.submit(self._timed, warm_up)

    def _enter(self) -> None:
        self._ident = threading.get_ident()
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.set_device(self._device)          # a new thread's current device is device 0

    @staticmethod
    def _timed(fn: Callable[[], object]) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """fn(*args, **kwargs) on the compute thread, waited for (at once, from the compute thread itself)."""
        if threading.get_ident() == self._ident:
            return fn(*args, **kwargs)

        def run() -> _T:
            if not self._settled:
                self._warm_up.result()
                self._settle()
                self._settled = True
            return fn(*args, **kwargs)

        return self._pool.submit(run).result()

    def warm_up_seconds(self) -> float:
        """How long the warm-up took, once it is done; raises its error."""
        return self._warm_up.result()

    def close(self) -> None:
        """Wait for what is queued (a warm-up still running included), then end the thread."""
        self._pool.shutdown(wait=True)
