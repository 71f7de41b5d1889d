"""Quantize jobs on a Ray cluster through the Ray Jobs API: submit, poll, fetch logs, stop.

`JobSubmitter` is the interface the scheduler drives (tests inject a fake); `RayJobSubmitter` talks to a
cluster's job server (the dashboard address, http://HEAD:8265) through `JobSubmissionClient`, which
needs ray[default] on this side. Submission ids are chosen by the caller, so submitting an id the
cluster already has attaches to that job instead of running it twice (a scheduler killed mid-run,
restarted, finds its jobs again). Concurrency and retries are the scheduler's, not this module's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from wq_ops.errors import ResourceError

__all__ = ["JobState", "JobStatusReport", "JobSubmitter", "RayJobSubmitter"]


class JobState(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED)


@dataclass(frozen=True)
class JobStatusReport:
    state: JobState
    message: str = ""                  # the job server's explanation (exit code, last log lines)


class JobSubmitter(Protocol):
    address: str

    def submit(self, submission_id: str, entrypoint: str) -> bool:
        """Start `entrypoint` (a shell command) as job `submission_id`. False: a job with that id already
        existed, and it is that job that the id now follows."""
        ...

    def status(self, submission_id: str) -> JobStatusReport: ...

    def logs(self, submission_id: str) -> str: ...

    def stop(self, submission_id: str) -> None: ...


class RayJobSubmitter:
    """A Ray cluster's job server. address: its dashboard URL (http://head:8265). Refuses, before any work,
    a server it cannot reach."""

    def __init__(self, address: str, *, submit_attempts: int = 6, retry_wait_s: float = 5.0) -> None:
        from ray.job_submission import JobSubmissionClient

        self.address = address
        self.submit_attempts = submit_attempts
        self.retry_wait_s = retry_wait_s
        try:
            self.client = JobSubmissionClient(address)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ResourceError(f"cannot reach the Ray job server at {address} ({e}); give the dashboard "
                                "address of a running cluster (http://HEAD:8265)") from None

    def submit(self, submission_id: str, entrypoint: str) -> bool:
        if any(j.submission_id == submission_id for j in self.client.list_jobs()):
            return False
        for attempt in range(1, self.submit_attempts + 1):
            try:
                self.client.submit_job(entrypoint=entrypoint, submission_id=submission_id)
                return True
            except RuntimeError as e:
                # A head that just started (or restarted) answers 500 "No available agent to submit job,
                # please try again later" until its node's job agent has registered: seconds, not minutes.
                if "try again later" not in str(e) or attempt == self.submit_attempts:
                    raise
                time.sleep(self.retry_wait_s)
        raise AssertionError("unreachable: the loop returns or raises")

    def status(self, submission_id: str) -> JobStatusReport:
        info = self.client.get_job_info(submission_id)
        return JobStatusReport(state=JobState(str(info.status.value)), message=info.message or "")

    def logs(self, submission_id: str) -> str:
        return self.client.get_job_logs(submission_id)

    def stop(self, submission_id: str) -> None:
        self.client.stop_job(submission_id)
