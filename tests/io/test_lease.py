"""The output lease: one job at a time per --out; a dead owner's lease is taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from wq_ops.errors import ArtifactError
from wq_ops.io.lease import LEASE_NAME, OutputLease


def test_a_second_job_is_refused_naming_the_first(tmp_path):
    lease = OutputLease.acquire(tmp_path / "out")
    try:
        with pytest.raises(ArtifactError, match=f"another wq job is writing it \\(host {socket.gethostname()}, "
                                                f"pid {os.getpid()}, heartbeat 0 s ago\\)"):
            OutputLease.acquire(tmp_path / "out")
        lease.check()
    finally:
        lease.release()
    assert not (tmp_path / "out").exists()          # it created the directory and wrote nothing else
    OutputLease.acquire(tmp_path / "out").release()


def test_the_heartbeat_renews_and_a_stopped_one_goes_stale(tmp_path):
    lease = OutputLease.acquire(tmp_path, heartbeat_s=0.05)
    path = tmp_path / LEASE_NAME
    os.utime(path, (0, 0))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5      # renewed by the owner's heartbeat
    lease._stop.set()                                  # the owner hangs: no more heartbeats
    lease._thread.join()
    os.utime(path, (time.time() - 120, time.time() - 120))
    taker = OutputLease.acquire(tmp_path)              # another pod's retried driver takes it over
    with pytest.raises(ArtifactError, match="another job took over this output directory"):
        lease.check()
    lease.release()                                    # does not remove the new owner's lease
    assert json.loads(path.read_text())["token"] == taker.token
    taker.release()


def test_a_lease_whose_process_is_gone_from_this_host_is_taken_at_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LEASE_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                   "token": "x"}))
    lease = OutputLease.acquire(tmp_path)             # kill -9, then a rerun: no wait for the heartbeat
    assert json.loads((tmp_path / LEASE_NAME).read_text())["pid"] == os.getpid()
    lease.release()


def test_a_live_lease_on_another_host_is_respected(tmp_path):
    (tmp_path / LEASE_NAME).write_text(json.dumps({"host": "other-pod", "pid": 1, "token": "x"}))
    with pytest.raises(ArtifactError, match="host other-pod, pid 1"):
        OutputLease.acquire(tmp_path)
