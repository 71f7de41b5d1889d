"""What the scheduler asks of the Hub: the repos of an author, a repo's current commit, a repo's model card.

`HubSource` is the interface (tests inject their own); `HfHubSource` is the real one, through
huggingface_hub (which reads HF_TOKEN and HF_ENDPOINT itself). `parse_model_card` reads back what wq's
model card (wq_ops.report.model_card) says about an artifact, so lost state can be rebuilt from the
destination repos. Nothing here quantizes, submits or writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from wq_ops.errors import CheckpointError
from wq_ops.io.checkpoint import network_error

__all__ = ["HubSource", "HfHubSource", "HubUnreachable", "CardFacts", "parse_model_card"]


class HubSource(Protocol):
    def list_models(self, author: str) -> list[str]:
        """Repo ids of every model `author` owns (that the token can see)."""
        ...

    def current_revision(self, repo_id: str) -> str | None:
        """The commit sha the default branch points at; None if the repo does not exist (or is not visible).
        Raises CheckpointError when the Hub cannot answer."""
        ...

    def model_card(self, repo_id: str) -> str | None:
        """README.md of the repo's default branch; None if the repo or the file does not exist."""
        ...


class HubUnreachable(CheckpointError):
    """The Hub could not be reached at all (no network, a wrong HF_ENDPOINT): a run decides nothing."""


class HfHubSource:
    """The real Hub, through huggingface_hub. cache_dir: where model cards are downloaded (None: HF's cache)."""

    def __init__(self, *, cache_dir: str | None = None) -> None:
        from huggingface_hub import HfApi, constants

        self.endpoint = constants.ENDPOINT     # honours HF_ENDPOINT; pinned so every call goes to one Hub
        self.api = HfApi(endpoint=self.endpoint)
        self.cache_dir = cache_dir

    # Past "not found", any exception means the Hub did not answer: huggingface_hub raises its own
    # HfHubHTTPError for HTTP statuses, but its transport's errors (requests, httpx or httpx2, by version)
    # for a refused connection or a timeout.
    def list_models(self, author: str) -> list[str]:
        try:
            return sorted(m.id for m in self.api.list_models(author=author))
        except Exception as e:
            raise self._failed(f"listing the models of {author!r}", e) from None

    def _failed(self, what: str, error: Exception) -> CheckpointError:
        """HubUnreachable where the Hub could not be reached at all (the run stops: nothing can be decided),
        else a CheckpointError for this one query."""
        if network_error(error):
            return HubUnreachable(f"the Hub at {self.endpoint} is unreachable ({type(error).__name__}: "
                                  f"{str(error)[:160]})")
        return CheckpointError(f"{what}: the Hub did not answer ({error!r})")

    def current_revision(self, repo_id: str) -> str | None:
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        try:
            info = self.api.model_info(repo_id, files_metadata=False)
        except (RepositoryNotFoundError, RevisionNotFoundError):
            return None
        except Exception as e:
            raise self._failed(repo_id, e) from None
        if not info.sha:
            raise CheckpointError(f"{repo_id}: the Hub gave no commit sha for the default branch")
        return info.sha

    def model_card(self, repo_id: str) -> str | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            path = hf_hub_download(repo_id, "README.md", cache_dir=self.cache_dir, endpoint=self.endpoint)
        except LocalEntryNotFoundError as e:
            # Raised when the Hub cannot be reached and nothing is cached; in some versions it subclasses
            # EntryNotFoundError, and "no card" would wrongly mean "never published".
            raise HubUnreachable(f"the Hub at {self.endpoint} is unreachable ({type(e).__name__}: "
                                 f"{str(e)[:160]})") from None
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError):
            return None
        except Exception as e:
            raise self._failed(f"{repo_id}/README.md", e) from None
        return Path(path).read_text(encoding="utf-8")


@dataclass(frozen=True)
class CardFacts:
    """What a wq model card says about its artifact. group_size None: per-channel."""

    base_model: str
    revision: str
    method: str
    bits: int
    group: str                  # as the card writes it: a number, per-channel, per-tensor, 128x128-block
    format: str


# The lines wq_ops.report.model_card writes; tests/schedule/test_hub.py renders a card and parses it back,
# so a change there that breaks these fails a test instead of silently losing state.
_BASE = re.compile(r"^base_model:\s*(\S+)\s*$", re.M)
_REVISION = re.compile(r"\(revision `([^`]+)`\)")
_METHOD = re.compile(r"^\| method \| (\w+)\b", re.M)
_GRID = re.compile(r"^\| bits / group size \| (\d+) / ([\w-]+) \|", re.M)
_FORMAT = re.compile(r"^\| format \| ([\w-]+)\b", re.M)


def parse_model_card(text: str) -> CardFacts | None:
    """The facts of a card wq wrote; None for a card that is not one of ours (or lacks a field)."""
    if not text.startswith("---"):
        return None
    front = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    found = [_BASE.search(front), _REVISION.search(text), _METHOD.search(text), _GRID.search(text),
             _FORMAT.search(text)]
    if any(m is None for m in found):
        return None
    base, revision, method, grid, fmt = found
    assert base and revision and method and grid and fmt     # for the type checker: checked just above
    return CardFacts(base_model=base.group(1), revision=revision.group(1), method=method.group(1),
                     bits=int(grid.group(1)), group=grid.group(2), format=fmt.group(1))
