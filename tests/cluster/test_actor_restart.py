"""Faults inside the job: an actor process killed mid-run (a preempted node, an OOM kill) is replaced, the new
actors resume from the staged blocks, and the artifact is byte-identical to a clean run's."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.factory import artifact_files, write_checkpoint, write_text
from wq_ops.cluster.driver import run_job
from wq_ops.config import JobConfig
from wq_ops.errors import ActorLostError

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("restart")
    return write_checkpoint(d / "m", "llama", num_hidden_layers=8), write_text(d / "calib.txt", n_chars=60000)


def job(out: Path, llama, **options) -> JobConfig:
    model, calib = llama
    base = {"out": str(out), "model": str(model), "calib": str(calib), "samples": 16, "seq_len": 128,
            "micro_batch_samples": 4, "group_size": 64, "actors": 2}
    return JobConfig.from_dict({**base, **options})


def _descends_from_us(pid: int) -> bool:
    """Whether `pid` is a descendant of this test process: a worker of the Ray this session started, not of
    another run's Ray on the same machine."""
    me = os.getpid()
    while pid > 1:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return False
        pid = int(fields[1])                  # the parent
        if pid == me:
            return True
    return False


def block_actor_pids() -> list[int]:
    """The processes of this session's Ray block actors (their titles name the actor class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if title.startswith(b"ray::BlockActor") and _descends_from_us(int(entry.name)):
                pids.append(int(entry.name))
    return sorted(pids)


class Killer(threading.Thread):
    """Kills one block actor (SIGKILL) each time the staged blocks reach the next count in `at`, once per set
    of `n` actors (a kill at a later point waits for the replacements); with newest, the one started last."""

    def __init__(self, out: Path, at: list[int], n: int = 2, newest: bool = False) -> None:
        super().__init__(daemon=True)
        self.out, self.at, self.killed, self.done = out, list(at), [], threading.Event()
        self.n, self.newest = n, newest

    def staged(self) -> int:
        return len(list(self.out.glob(".wq-staging/*/block-*.json")))

    def run(self) -> None:
        killed_from: set[int] = set()
        while self.at and not self.done.is_set():
            pids = block_actor_pids()
            fresh = [p for p in pids if p not in killed_from]
            if len(fresh) == self.n and self.staged() >= self.at[0]:
                victim = fresh[-1] if self.newest else fresh[len(self.killed) % 2]
                os.kill(victim, signal.SIGKILL)
                self.killed.append((victim, self.staged()))
                killed_from |= set(pids)
                self.at.pop(0)
            time.sleep(0.02)


@pytest.mark.parametrize("options", [{}, {"propagation": "float"}], ids=["quantized", "float-streamed"])
def test_killed_actors_are_replaced_and_the_artifact_is_byte_identical(tmp_path, llama, options):
    clean = run_job(job(tmp_path / "clean", llama, **options), cache_dir=tmp_path).out_dir
    out = tmp_path / "killed"
    killer = Killer(out, at=[1, 4])
    killer.start()
    try:
        result = run_job(job(out, llama, **options), cache_dir=tmp_path)
    finally:
        killer.done.set()
        killer.join()
    assert len(killer.killed) == 2, f"the job ended before both kills: {killer.killed}"
    restarts = result.report["actor_restarts"]
    assert [r["restart"] for r in restarts] == [1, 2]
    assert json.loads((out / "wq_report.json").read_text())["actor_restarts"] == restarts
    assert result.report["totals"]["blocks_resumed"] >= 1
    assert artifact_files(out) == artifact_files(clean)


def test_a_killed_expert_actor_is_replaced_and_the_artifact_is_byte_identical(tmp_path):
    """A Mixtral of 6 blocks, one block actor and two expert actors; the actor started last (an expert actor:
    they start after the block actors) is killed after the second block is staged."""
    model = write_checkpoint(tmp_path / "mixtral", "mixtral", num_hidden_layers=6)
    calib = write_text(tmp_path / "calib.txt", n_chars=60000)
    base = {"model": str(model), "calib": str(calib), "samples": 16, "seq_len": 128, "micro_batch_samples": 4,
            "group_size": 32}
    clean = run_job(JobConfig.from_dict({**base, "out": str(tmp_path / "clean"), "runtime": "local"}),
                    cache_dir=tmp_path).out_dir
    out = tmp_path / "killed"
    killer = Killer(out, at=[2], n=3, newest=True)
    killer.start()
    try:
        result = run_job(JobConfig.from_dict({**base, "out": str(out), "expert_actors": 2}), cache_dir=tmp_path)
    finally:
        killer.done.set()
        killer.join()
    assert len(killer.killed) == 1, "the job ended before the kill"
    assert [r["restart"] for r in result.report["actor_restarts"]] == [1]
    assert result.report["totals"]["blocks_resumed"] >= 2
    assert artifact_files(out) == artifact_files(clean)


def test_restarts_used_up_end_the_job_keeping_the_staged_blocks(tmp_path, llama):
    out = tmp_path / "o"
    killer = Killer(out, at=[1])
    killer.start()
    try:
        with pytest.raises(ActorLostError, match=r"an actor was lost .* after 0 restart\(s\), the most "
                                                 r"--max-actor-restarts allows; the staged blocks are kept"):
            run_job(job(out, llama, max_actor_restarts=0), cache_dir=tmp_path)
    finally:
        killer.done.set()
        killer.join()
    assert list(out.glob(".wq-staging/*/block-*.safetensors"))
    assert not (out / "model.safetensors.index.json").exists()
