"""`python -m jobs.retry`: the driver run again when it dies; the rerun resumes and takes over the output lease."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jobs import retry
from tests.factory import write_checkpoint, write_text

ROOT = Path(__file__).resolve().parents[2]


def _exits(tmp_path: Path, codes: list[int]) -> list[str]:
    """A command that exits with codes[k] on its k-th run."""
    counter = tmp_path / "runs"
    code = (f"import pathlib, sys; p = pathlib.Path({str(counter)!r}); n = len(p.read_text()) if p.exists() else 0; "
            f"p.write_text('x' * (n + 1)); sys.exit({codes!r}[n])")
    return [sys.executable, "-c", code]


@pytest.mark.parametrize("codes,attempts,result,runs", [
    ([0], 3, 0, 1),
    ([1, 0], 3, 0, 2),            # a crash, then success
    ([75, 0], 3, 0, 2),           # actors lost too often, then success
    ([2], 3, 2, 1),               # a usage or input error: a rerun would repeat it
    ([1, 1, 1], 3, 1, 3),         # no attempts left
])
def test_runs_again_after_what_a_rerun_can_make_good(tmp_path, codes, attempts, result, runs):
    assert retry.main(["--attempts", str(attempts), "--delay-s", "0", "--", *_exits(tmp_path, codes)]) == result
    assert len((tmp_path / "runs").read_text()) == runs


def test_a_killed_driver_is_rerun_resumes_and_takes_over_the_output_lease(tmp_path):
    model = write_checkpoint(tmp_path / "m", "llama", num_hidden_layers=4)
    calib = write_text(tmp_path / "calib.txt")
    out, marker = tmp_path / "out", tmp_path / "killed-once"
    argv = ["--model", str(model), "--out", str(out), "--calib", str(calib), "--samples", "8", "--seq-len", "64",
            "--group-size", "64"]
    # The driver SIGKILLs itself once, as soon as its first block is staged (with its lease held).
    driver = textwrap.dedent(f"""
        import os, pathlib, signal, sys, threading, time
        out, marker = pathlib.Path({str(out)!r}), pathlib.Path({str(marker)!r})
        def kill_once():
            while not list(out.glob(".wq-staging/*/block-*.json")):
                time.sleep(0.01)
            assert (out / ".wq-lease.json").exists()
            marker.write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)
        if not marker.exists():
            threading.Thread(target=kill_once, daemon=True).start()
        import jobs.quantize
        sys.exit(jobs.quantize.main({argv!r}))
    """)
    env = {"WQ_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "jobs.retry", "--delay-s", "0", "--", sys.executable, "-c", driver],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert marker.exists() and "attempt 1 of 3 ended with exit code -9; running it again" in done.stderr
    assert "took over the lease of a job that is gone" in done.stderr
    report = json.loads((out / "wq_report.json").read_text())
    assert report["totals"]["blocks_resumed"] >= 1
    assert not (out / ".wq-lease.json").exists()
