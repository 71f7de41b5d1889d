"""One job at a time per output directory: an exclusive lease, the file `.wq-lease.json` in --out, holding
the owner's host, pid and a token, with a heartbeat (its mtime) the owner renews every HEARTBEAT_S seconds.
A second job stops with a message naming the first. A lease whose heartbeat stopped STALE_S seconds ago is
stale (its owner died: a preempted pod, kill -9), and so is one whose owner process is gone from this host:
a retried driver, in a new pod or the same one, takes it over and resumes. Entry point: `OutputLease.acquire`."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

from wq_ops.errors import ArtifactError

__all__ = ["OutputLease", "LEASE_NAME", "HEARTBEAT_S", "STALE_S"]

LEASE_NAME = ".wq-lease.json"
HEARTBEAT_S = 10.0
STALE_S = 60.0

log = logging.getLogger(__name__)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError):
        return {}                        # unreadable: judged by its heartbeat alone
    return data if isinstance(data, dict) else {}


def _owner_gone(owner: dict[str, Any]) -> bool:
    """The owner ran on this host and its process no longer exists."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:                      # exists, owned by another user
        return False
    return False


class OutputLease:
    def __init__(self, path: Path, token: str, heartbeat_s: float, *, created: bool) -> None:
        self.path, self.token, self.created = path, token, created
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True, name="wq-lease")
        self._thread.start()

    @classmethod
    def acquire(cls, out_dir: Path, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> "OutputLease":
        """Take the lease on `out_dir` (created if missing), or raise ArtifactError naming its live owner."""
        created = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / LEASE_NAME
        token = secrets.token_hex(8)
        mine = {"host": socket.gethostname(), "pid": os.getpid(), "token": token, "since": time.time()}
        for _ in range(5):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _read(path)
                if owner is None:
                    continue                     # released meanwhile: try again
                try:
                    age = time.time() - path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < stale_s and not _owner_gone(owner):
                    raise ArtifactError(
                        f"--out {out_dir}: another wq job is writing it (host {owner.get('host')}, pid "
                        f"{owner.get('pid')}, heartbeat {age:.0f} s ago); wait for it to end, or choose another "
                        f"directory. A lease whose heartbeat stops for {stale_s:.0f} s is taken over")
                cls._set_aside(path, owner)
                log.warning("--out %s: took over the lease of a job that is gone (host %s, pid %s, heartbeat %.0f s "
                            "ago)", out_dir, owner.get("host"), owner.get("pid"), age)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
            return cls(path, token, heartbeat_s, created=created)
        raise ArtifactError(f"--out {out_dir}: could not take its lease ({path}): other jobs keep taking it")

    @staticmethod
    def _set_aside(path: Path, owner: dict[str, Any]) -> None:
        """Remove a stale lease, unless another job replaced it meanwhile (then put that one back)."""
        aside = path.with_name(f"{LEASE_NAME}.stale-{secrets.token_hex(4)}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        if _read(aside) != owner:                # a live lease, taken by another job since we read it
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def _holds(self) -> bool:
        owner = _read(self.path)
        return owner is not None and owner.get("token") == self.token

    def _beat(self, heartbeat_s: float) -> None:
        while not self._stop.wait(heartbeat_s):
            if not self._holds():
                self._lost.set()
                log.error("the output lease %s was taken by another job", self.path)
                return
            try:
                os.utime(self.path)
            except OSError as e:
                log.warning("could not renew the output lease %s: %s", self.path, e)

    def check(self) -> None:
        """Raise if another job took the lease (this job's heartbeat stalled): the artifact is not ours to write."""
        if self._lost.is_set() or not self._holds():
            raise ArtifactError(f"{self.path.parent}: another job took over this output directory while this one "
                                "ran (its lease heartbeat had stopped); this job's artifact is not written")

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if self._holds():
            self.path.unlink(missing_ok=True)
            if self.created and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()         # a job that wrote nothing leaves no directory behind
