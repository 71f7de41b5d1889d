import threading
import time

import pytest

from wq_ops.device.compute_thread import ComputeThread


def test_calls_run_on_the_compute_thread_after_the_warm_up_and_its_settling():
    """The warm-up starts at once; the first call waits for it, then the settling runs once, there, while
    the caller waits; every call runs on that one thread, in order."""
    events = []
    started = threading.Event()

    def warm_up():
        started.set()
        time.sleep(0.2)
        events.append(("warm_up", threading.get_ident()))

    compute = ComputeThread(None, warm_up, settle=lambda: events.append(("settle", threading.get_ident())))
    assert started.wait(5)                    # running before any call
    first = compute.call(lambda x: events.append(("call", threading.get_ident())) or x + 1, 1)
    second = compute.call(lambda: events.append(("call", threading.get_ident())) or "b")
    compute.close()
    assert (first, second) == (2, "b")
    assert [name for name, _ in events] == ["warm_up", "settle", "call", "call"]
    assert len({ident for _, ident in events}) == 1 and events[0][1] != threading.get_ident()
    assert compute.warm_up_seconds() >= 0.2


def test_a_call_made_on_the_compute_thread_runs_at_once():
    """A computation that calls another (a block's anatomy inside its quantization) must not wait for
    itself."""
    compute = ComputeThread(None, lambda: None, settle=lambda: None)
    inner = compute.call(lambda: compute.call(threading.get_ident))
    assert inner == compute.call(threading.get_ident) != threading.get_ident()
    compute.close()


def test_a_failed_warm_up_is_raised_by_every_call_and_nothing_runs_after_it():
    ran = []

    def broken():
        raise RuntimeError("CUDA error: device-side assert")

    compute = ComputeThread(None, broken, settle=lambda: ran.append("settle"))
    for _ in range(2):
        with pytest.raises(RuntimeError, match="device-side assert"):
            compute.call(lambda: ran.append("call"))
    with pytest.raises(RuntimeError, match="device-side assert"):
        compute.warm_up_seconds()
    compute.close()
    assert ran == []


def test_close_waits_for_a_warm_up_still_running():
    done = threading.Event()

    def slow():
        time.sleep(0.2)
        done.set()

    compute = ComputeThread(None, slow, settle=lambda: None)
    compute.close()
    assert done.is_set()
