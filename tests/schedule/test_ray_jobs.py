"""The scheduler end to end: a real local Ray cluster (`ray start --head` with its job server) runs the
quantize jobs it submits, on a tiny checkpoint that the fake Hub (real huggingface_hub client, local HTTP
server) serves. About 60-90 s on 2 cores, most of it the three quantize jobs' start-up (torch imports).

The cluster gets its own temp dir (so no other test's `ray.init()` finds it) and token auth off: it
listens on 127.0.0.1 only, and the token file Ray would share with other local clusters is left alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from tests.factory import write_checkpoint, write_text
from tests.schedule.listing_hub import publish_revision, start_listing_hub
from wq_ops.errors import ResourceError
from wq_ops.io.artifact import INDEX_NAME
from wq_ops.schedule.hub import HfHubSource
from wq_ops.schedule.nightly import ExitCode, Outcome, run_nightly
from wq_ops.schedule.state import StateStore, Status
from wq_ops.schedule.submit import RayJobSubmitter
from wq_ops.schedule.watchlist import WatchList


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fake_hub():
    from huggingface_hub import constants

    server = start_listing_hub()
    saved = constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE
    constants.ENDPOINT = server.endpoint
    constants.HUGGINGFACE_CO_URL_TEMPLATE = server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    yield server
    constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE = saved
    assert server.server is not None
    server.server.shutdown()


def _job_env(hub_endpoint: str, root: Path) -> dict[str, str]:
    """What the cluster (and so every job on it) and the scheduler's own process see."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",   # `python` = this venv's
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_ENDPOINT=hub_endpoint,
               HF_HUB_DISABLE_XET="1", HF_HOME=str(root / "hf"), WQ_CACHE_DIR=str(root / "wq-cache"))
    return env


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)          # `ray start --block` stops what it started, then exits
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # anything left of the session we started it in
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def cluster(fake_hub) -> Iterator[str]:
    """A head node with 2 CPUs and its job server; yields the job server's address."""
    root = Path(tempfile.mkdtemp(prefix="wq-ray-"))   # short: Ray's socket paths must stay under 107 bytes
    dashboard = _free_port()
    log = open(root / "ray-start.log", "w")
    # Every port Ray would otherwise take at a fixed default (6379, 10001, 52365) is a free one instead: another
    # Ray on this machine (the in-process one of tests/conftest.py) holds those, and a job server whose agent
    # could not bind answers every submission with "No available agent" forever.
    ports = {flag: str(_free_port()) for flag in ("--port", "--ray-client-server-port", "--dashboard-agent-listen-port",
                                                  "--dashboard-agent-grpc-port", "--metrics-export-port")}
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
           *[x for kv in ports.items() for x in kv],
           "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
           "--include-dashboard", "true", "--num-cpus", "2", "--object-store-memory", str(256 << 20),
           "--temp-dir", str(root / "ray"), "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=_job_env(fake_hub.endpoint, root), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    env = pytest.MonkeyPatch()
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):   # Ray's job client would prefer them to `address`
        env.delenv(name, raising=False)
    try:
        while True:
            try:
                submitter = RayJobSubmitter(address, retry_wait_s=1.0, submit_attempts=60)
                break
            except ResourceError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray start did not bring up a job server:\n{(root / 'ray-start.log').read_text()}")
                time.sleep(1)
        submitter.submit("wq-test-ready", "true")       # ready when a job runs: the job agent registers last
        while not submitter.status("wq-test-ready").state.terminal:
            assert time.monotonic() < deadline, "the test cluster's job server accepts no job"
            time.sleep(0.5)
        yield address
    finally:
        env.undo()
        _stop(proc)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


RECIPE = {"method": "rtn", "bits": 4, "group_size": 64, "samples": 4, "seq_len": 64}


def _outcomes(report) -> list[tuple[str, Outcome]]:
    return [(r.model, r.outcome) for r in report.results]


def test_a_new_revision_is_quantized_once_and_a_missing_repo_is_reported(cluster, fake_hub, tmp_path):
    sha = publish_revision(fake_hub, "org/tiny", write_checkpoint(tmp_path / "ckpt", num_hidden_layers=2))
    watch = WatchList.from_dict({
        "recipes": {"rtn-w4": {**RECIPE, "calib": str(write_text(tmp_path / "calib.txt"))}},
        "watch": [{"repo": "org/tiny", "recipes": ["rtn-w4"]}, {"repo": "org/gone", "recipes": ["rtn-w4"]}],
        "destination": "quant/{name}-{recipe}", "publish": False})
    store, artifacts = StateStore(tmp_path / "state" / "nightly.json"), tmp_path / "artifacts"
    submitter = RayJobSubmitter(cluster)

    def nightly():
        return run_nightly(watch, hub=HfHubSource(cache_dir=str(tmp_path / "cards")), submitter=submitter,
                           store=store, artifacts_root=str(artifacts), poll_s=0.5)

    first = nightly()
    logs = "".join(Path(r.logs).read_text() for r in first.results if r.logs)
    assert _outcomes(first) == [("org/tiny", Outcome.SUCCEEDED)], first.describe() + "\n" + logs
    assert (artifacts / "quant" / "tiny-rtn-w4" / sha / INDEX_NAME).is_file()
    assert [p.entry for p in first.problems] == ["org/gone"] and first.exit_code is ExitCode.WATCH_PROBLEM
    record = store.load()[("org/tiny", "rtn-w4")]
    assert record.status is Status.SUCCEEDED and record.revision == sha and "wrote" in logs
    submitted = len(submitter.client.list_jobs())

    second = nightly()
    assert _outcomes(second) == [("org/tiny", Outcome.UP_TO_DATE)]
    assert len(submitter.client.list_jobs()) == submitted            # nothing new on the cluster


def test_a_failed_job_is_recorded_and_retried_by_the_next_run(cluster, fake_hub, tmp_path):
    publish_revision(fake_hub, "org/tiny2", write_checkpoint(tmp_path / "ckpt", num_hidden_layers=2))
    calib = tmp_path / "calib.txt"             # absent on the first run: that job fails
    watch_list = tmp_path / "watch.yaml"
    watch_list.write_text(yaml.safe_dump({
        "recipes": {"rtn-w4": {**RECIPE, "calib": str(calib)}}, "watch": [{"repo": "org/tiny2", "recipes": ["rtn-w4"]}],
        "destination": "quant/{name}-{recipe}", "publish": False, "max_attempts": 2}))
    state = tmp_path / "state" / "nightly.json"
    cmd = [sys.executable, "-m", "jobs.nightly", "--watch-list", str(watch_list), "--state", str(state),
           "--artifacts", str(tmp_path / "artifacts"), "--address", cluster, "--poll-s", "0.5"]
    env = _job_env(fake_hub.endpoint, tmp_path)

    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == int(ExitCode.JOB_FAILED), first.stdout + first.stderr
    record = StateStore(state).load()[("org/tiny2", "rtn-w4")]
    assert record.status is Status.FAILED and record.attempts == 1 and "exit code 2" in record.message
    assert record.logs and str(calib) in Path(record.logs).read_text()          # the job's own error message
    assert "failed     org/tiny2" in first.stdout and "retried next run" in first.stdout

    write_text(calib)                          # the cause is fixed: the retry succeeds
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == int(ExitCode.OK), second.stdout + second.stderr
    record = StateStore(state).load()[("org/tiny2", "rtn-w4")]
    assert record.status is Status.SUCCEEDED and record.attempts == 2
