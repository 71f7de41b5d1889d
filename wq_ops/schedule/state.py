"""The scheduler's durable memory: per (model, recipe), the last revision tried, how it went, and how often.

One JSON file on a mounted volume, written atomically (temp file + os.replace, so a crash mid-write leaves
the previous state), with the jobs' logs saved beside it under `logs/`. It holds nothing that cannot be
recovered: if lost, `nightly.rebuild_records` reads it back from the destination repos' model cards.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

from wq_ops.errors import ArtifactError
from wq_ops.io.artifact import write_atomic, write_json_atomic

__all__ = ["Status", "Record", "StateStore", "STATE_VERSION"]

STATE_VERSION = 1


class Status(str, Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class Record:
    """The outcome of the latest attempt(s) at one (model, recipe). attempts counts the tries at this
    revision and recipe fingerprint; a new revision or an edited recipe starts again from zero."""

    model: str
    recipe: str
    revision: str
    fingerprint: str                   # Recipe.fingerprint when this was made
    destination: str
    status: Status
    attempts: int
    updated: str                       # ISO-8601 UTC
    job_id: str | None = None          # Ray job submission id; None when rebuilt from a model card
    logs: str | None = None            # the saved job logs (a path beside the state file)
    out: str | None = None             # the artifact directory the job wrote
    message: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.model, self.recipe)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Record":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ArtifactError(f"state record {dict(data)!r}: unknown key(s) {', '.join(unknown)}")
        return cls(**{**data, "status": Status(data["status"])})


class StateStore:
    """The state file at `path`; the jobs' logs go to `path.parent / "logs"`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def logs_dir(self) -> Path:
        return self.path.parent / "logs"

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> dict[tuple[str, str], Record]:
        """Every record, by (model, recipe). A missing file is an empty state; a corrupt one is an error,
        never silently replaced (delete it to rebuild from the model cards)."""
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {STATE_VERSION}")
            records = [Record.from_dict(r) for r in data["records"]]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ArtifactError(f"{self.path}: not a wq scheduler state file ({e}); move it away to have the "
                                "next run rebuild it from the destination repos' model cards") from None
        return {r.key: r for r in records}

    def save(self, records: Mapping[tuple[str, str], Record]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{**asdict(r), "status": r.status.value} for _, r in sorted(records.items())]
        write_json_atomic(self.path, {"version": STATE_VERSION, "records": rows})

    def save_logs(self, job_id: str, text: str) -> Path:
        """Keep a job's logs beside the state, where they outlive the Ray cluster. Returns the path."""
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        path = self.logs_dir / f"{re.sub(r'[^A-Za-z0-9._-]', '_', job_id)}.log"

        def write(tmp: Path) -> None:
            tmp.write_text(text, encoding="utf-8")

        write_atomic(path, write)
        return path
