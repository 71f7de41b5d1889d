"""In-memory stand-ins for the Hub and the Ray job server, with the interfaces of wq_ops.schedule.hub and
wq_ops.schedule.submit, for testing the scheduler's decisions without a network or a cluster."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Callable

from wq_ops.errors import CheckpointError
from wq_ops.schedule.submit import JobState, JobStatusReport


@dataclass
class MemoryHub:
    revisions: dict[str, str] = field(default_factory=dict)      # repo id -> current sha
    cards: dict[str, str] = field(default_factory=dict)          # repo id -> README.md
    broken: set[str] = field(default_factory=set)                # repo ids (or authors) the Hub errors on

    def list_models(self, author: str) -> list[str]:
        if author in self.broken:
            raise CheckpointError(f"listing the models of {author!r}: the Hub answered 503")
        return sorted(r for r in self.revisions if r.split("/")[0] == author)

    def current_revision(self, repo_id: str) -> str | None:
        if repo_id in self.broken:
            raise CheckpointError(f"{repo_id}: the Hub answered 503")
        return self.revisions.get(repo_id)

    def model_card(self, repo_id: str) -> str | None:
        return self.cards.get(repo_id)


@dataclass
class FakeJobServer:
    """Jobs finish on their second status poll. fails(argv) decides which fail; the rest succeed."""

    fails: Callable[[list[str]], bool] = lambda argv: False
    address: str = "http://fake:8265"
    jobs: dict[str, list[str]] = field(default_factory=dict)     # submission id -> argv
    polls: dict[str, int] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)
    finishes: bool = True                                         # False: jobs run forever
    in_flight_max: int = 0

    def submit(self, submission_id: str, entrypoint: str) -> bool:
        if submission_id in self.jobs:
            return False
        self.jobs[submission_id] = shlex.split(entrypoint)
        self.polls[submission_id] = 0
        running = sum(1 for s in self.jobs if not self._done(s))
        self.in_flight_max = max(self.in_flight_max, running)
        return True

    def _done(self, sid: str) -> bool:
        return sid in self.stopped or (self.finishes and self.polls[sid] >= 2)

    def status(self, submission_id: str) -> JobStatusReport:
        self.polls[submission_id] += 1
        if submission_id in self.stopped:
            return JobStatusReport(JobState.STOPPED, "stopped")
        if not self._done(submission_id):
            return JobStatusReport(JobState.RUNNING)
        if self.fails(self.jobs[submission_id]):
            return JobStatusReport(JobState.FAILED, "Job entrypoint command failed with exit code 2")
        return JobStatusReport(JobState.SUCCEEDED, "Job finished successfully.")

    def logs(self, submission_id: str) -> str:
        return f"logs of {submission_id}\n"

    def stop(self, submission_id: str) -> None:
        self.stopped.append(submission_id)
