"""The CUDA primary context made through the driver API while torch imports: the driver calls in order,
failures kept for torch to report, and on a GPU the context torch then computes in."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from wq_ops.device import cuda_context
from wq_ops.device.cuda_context import start_primary_context


class FakeDriver:
    """libcuda's three calls: each records itself, writes its out-argument and returns its status."""

    def __init__(self, **status):
        self.status, self.calls = status, []

    def cuInit(self, flags):
        self.calls.append(("cuInit", flags))
        return self.status.get("cuInit", 0)

    def cuDeviceGet(self, device, ordinal):
        self.calls.append(("cuDeviceGet", ordinal))
        device._obj.value = 10 + ordinal
        return self.status.get("cuDeviceGet", 0)

    def cuDevicePrimaryCtxRetain(self, context, device):
        self.calls.append(("cuDevicePrimaryCtxRetain", device.value))
        context._obj.value = 0xC0FFEE
        return self.status.get("cuDevicePrimaryCtxRetain", 0)


def _run(monkeypatch, driver, ordinal=0):
    def load(name):
        assert name == "libcuda.so.1"
        if driver is None:
            raise OSError("libcuda.so.1: cannot open shared object file: No such file or directory")
        return driver

    monkeypatch.setattr(cuda_context.ctypes, "CDLL", load)
    thread = start_primary_context(ordinal)
    thread.join(timeout=10)
    assert not thread.is_alive() and thread.seconds is not None
    return thread


def test_the_device_primary_context_is_retained(monkeypatch):
    driver = FakeDriver()
    thread = _run(monkeypatch, driver, ordinal=1)
    assert (thread.context, thread.error) == (0xC0FFEE, None)
    assert driver.calls == [("cuInit", 0), ("cuDeviceGet", 1), ("cuDevicePrimaryCtxRetain", 11)]


@pytest.mark.parametrize("failing, status", [("cuInit", 100), ("cuDeviceGet", 101), ("cuDevicePrimaryCtxRetain", 2)])
def test_a_failed_driver_call_is_kept_and_stops_there(monkeypatch, failing, status):
    driver = FakeDriver(**{failing: status})
    thread = _run(monkeypatch, driver)
    assert thread.context is None
    assert thread.error == f"{failing} failed with CUDA driver error {status}"
    assert driver.calls[-1][0] == failing


def test_no_driver_library_is_kept_as_the_reason(monkeypatch):
    thread = _run(monkeypatch, None)
    assert thread.context is None and "libcuda.so.1: cannot open shared object file" in thread.error


_TORCH_USES_IT = textwrap.dedent("""
    import ctypes, sys
    from wq_ops.device.cuda_context import start_primary_context
    thread = start_primary_context(0)
    import torch
    thread.join()
    assert thread.error is None, thread.error
    torch.ones(4, device="cuda").sum().item()
    current = ctypes.c_void_p()
    assert ctypes.CDLL("libcuda.so.1").cuCtxGetCurrent(ctypes.byref(current)) == 0
    print(thread.seconds, current.value == thread.context)
""")


@pytest.mark.gpu
def test_gpu_torch_computes_in_the_context_made_while_it_imported():
    """In a fresh process: the thread makes device 0's primary context during `import torch`, and torch's
    first tensor runs in that same context (the CUDA runtime retained it, rather than making another)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _TORCH_USES_IT], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seconds, same = done.stdout.split()
    assert same == "True" and float(seconds) > 0
