"""Publish a finished artifact directory to the Hugging Face Hub, and check at plan time that it will be allowed.

`check_push_access` runs before any quantization: a rejected (401) or refused (403) token stops the job then,
not hours later. `push_artifact` creates the repo (and branch) if missing, uploads every file on its own
(huggingface_hub's `preupload_lfs_files`: the LFS batch answers "already there" for what an earlier,
interrupted push stored, so a rerun sends only what is missing; with hf_xet the Xet store deduplicates the
same way), then publishes them all in one commit, so readers never see half an artifact. Transient failures
(5xx, 408, 429, dropped connections) are retried with bounded exponential backoff. The token never appears in
a log line, an exception or a returned object: every message relayed from the Hub is scrubbed of it.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from wq_ops.errors import ArtifactError, ConfigError, WqError

__all__ = ["RetryPolicy", "PushAccess", "PushResult", "resolve_token", "check_push_access", "push_artifact",
           "artifact_files"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_INDEX_NAMES = ("model.safetensors.index.json", "model.safetensors")


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff: waits base, 2 x base, ... capped at max_delay_s, for at most max_attempts
    tries of one Hub call (huggingface_hub retries some calls itself underneath; these retries wrap it)."""

    max_attempts: int = 6
    base_delay_s: float = 2.0
    max_delay_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s:
            raise ConfigError(f"{self}: need max_attempts >= 1 and 0 <= base_delay_s <= max_delay_s")


@dataclass(frozen=True)
class PushAccess:
    """What the plan-time check found. user: the token's account; repo_exists: False means push will create it."""

    repo_id: str
    user: str
    repo_exists: bool
    endpoint: str


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str
    commit_sha: str
    commit_url: str
    files: tuple[str, ...]
    nbytes: int


class _Secret:
    """The token, kept out of every string we emit."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __repr__(self) -> str:
        return "_Secret(***)"

    @property
    def value(self) -> str:
        return self._token

    def scrub(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text


def resolve_token(token: str | None) -> str:
    """The token to push with: `token` if given, else huggingface_hub's own resolution (HF_TOKEN, then the
    token saved by `hf auth login`). Meant for jobs/, the layer that reads the environment."""
    from huggingface_hub import get_token

    resolved = token or get_token()
    if not resolved:
        raise ConfigError("--push-to-hub: no Hugging Face token found; set HF_TOKEN or run `hf auth login` "
                          "with a token that has write access")
    return resolved


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection-level failures worth retrying, for whichever HTTP client this huggingface_hub uses
    (httpx2 or httpx from 1.x on, requests before)."""
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests.exceptions", "ConnectionError"), ("requests.exceptions", "Timeout")):
        try:
            kinds.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(kinds)


def _causes(error: BaseException) -> list[BaseException]:
    """error and what it wraps (huggingface_hub re-raises upload failures as RuntimeError from the cause)."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain and len(chain) < 8:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _summary(error: BaseException) -> str:
    """One line: the type and the message (huggingface_hub puts the Hub's own words on its last line)."""
    text = " ".join(str(error).split())
    text = text if len(text) <= 400 else text[:397] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _status_of(error: BaseException) -> int | None:
    from huggingface_hub.errors import HfHubHTTPError

    for e in _causes(error):
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            return int(e.response.status_code)
    return None


def _call(what: str, call: Callable[[], T], *, retry: RetryPolicy, secret: _Secret,
          error: type[WqError], denied: str) -> T:
    """Run one Hub call with retries on transient failures. Anything else becomes `error`, its message
    scrubbed and its cause dropped (the original exception's text may carry what the Hub echoed)."""
    network = _network_errors()
    delay = retry.base_delay_s
    for attempt in range(1, retry.max_attempts + 1):
        try:
            return call()
        except Exception as e:        # classified below; nothing escapes unscrubbed
            status = _status_of(e)
            detail = secret.scrub("; ".join(_summary(c) for c in _causes(e)[:2]))
            if status in (401, 403):
                raise error(f"{what}: the Hub answered {status}: {denied} ({detail})") from None
            transient = status in _RETRY_STATUS or (status is None and any(isinstance(c, network) for c in _causes(e)))
            if not transient:
                raise error(f"{what} failed: {detail}") from None
            if attempt == retry.max_attempts:
                raise error(f"{what} failed after {attempt} attempts: {detail}; the Hub may be down: rerun "
                            "later (a rerun push sends only what the Hub does not hold yet)") from None
            logger.warning("hub: %s failed (%s); retry %d/%d in %.1f s", what, detail, attempt,
                           retry.max_attempts - 1, delay)
            time.sleep(delay)
            delay = min(delay * 2, retry.max_delay_s)
    raise AssertionError("unreachable")


def _check_repo_id(repo_id: str) -> None:
    if not _REPO_ID.match(repo_id):
        raise ConfigError(f"--push-to-hub {repo_id!r}: expected a Hub repo id ORG/NAME (letters, digits, - _ .)")


def check_push_access(repo_id: str, *, token: str, endpoint: str | None = None,
                      retry: RetryPolicy = RetryPolicy()) -> PushAccess:
    """Before any work: the token is valid (else 401), may write to `repo_id` if it exists (else 403), or may
    create repos in its namespace if it does not. Raises ConfigError saying which, and how to fix it."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    _check_repo_id(repo_id)
    secret = _Secret(token)
    endpoint = endpoint or constants.ENDPOINT
    api = HfApi(endpoint=endpoint, token=secret.value)
    fix = "use a token with write access (HF_TOKEN, or `hf auth login`)"
    me: dict[str, Any] = _call("checking the Hub token", lambda: api.whoami(token=secret.value), retry=retry,
                               secret=secret, error=ConfigError, denied=f"the token was rejected; {fix}")
    user = str(me.get("name", "?"))
    access_token = (me.get("auth") or {}).get("accessToken") or {}
    role = access_token.get("role")
    namespace = repo_id.split("/")[0]
    if role == "read":
        raise ConfigError(f"--push-to-hub {repo_id}: the token of {user} is read-only; {fix}")
    orgs = {str(o.get("name")): o.get("roleInOrg") for o in me.get("orgs") or []}
    if namespace != user and namespace not in orgs:
        raise ConfigError(f"--push-to-hub {repo_id}: {user} is not {namespace} and not a member of it "
                          f"(member of: {', '.join(sorted(orgs)) or 'no organization'}); push to {user}/... or "
                          f"use a token of a member of {namespace}")
    if orgs.get(namespace) == "read":
        raise ConfigError(f"--push-to-hub {repo_id}: {user} has the read role in {namespace}; ask an admin for write")
    if role == "fineGrained":
        scoped = (access_token.get("fineGrained") or {}).get("scoped") or []
        writable = {str((s.get("entity") or {}).get("name")) for s in scoped
                    if "repo.write" in (s.get("permissions") or [])}
        if namespace not in writable and repo_id not in writable:
            raise ConfigError(f"--push-to-hub {repo_id}: the fine-grained token has no repo.write permission on "
                              f"{namespace} or {repo_id}; add it in the token settings")

    def exists() -> bool:
        try:
            api.repo_info(repo_id, token=secret.value)
            return True
        except RepositoryNotFoundError:
            return False

    found = _call(f"looking up {repo_id}", exists, retry=retry, secret=secret, error=ConfigError,
                  denied=f"{user} may not read {repo_id}; {fix}")
    if found and "write" in inspect.signature(api.auth_check).parameters:
        # Newer huggingface_hub can ask the Hub directly whether this token may write to an existing repo.
        _call(f"checking write access to {repo_id}",
              lambda: api.auth_check(repo_id, token=secret.value, write=True),   # type: ignore[call-arg]
              retry=retry, secret=secret, error=ConfigError, denied=f"{user} may not write to {repo_id}; {fix}")
    logger.info("hub: %s may push to %s (%s)", user, repo_id, "exists" if found else "will be created")
    return PushAccess(repo_id=repo_id, user=user, repo_exists=found, endpoint=endpoint)


def artifact_files(out_dir: Path) -> list[Path]:
    """The files of a complete artifact, sorted, relative to out_dir; hidden files and folders (staging,
    temp files) left out. Refuses a directory whose index (written last) is missing."""
    if not any((out_dir / name).is_file() for name in _INDEX_NAMES) or not (out_dir / "config.json").is_file():
        raise ArtifactError(f"{out_dir}: no config.json and {' or '.join(_INDEX_NAMES)}: not a complete artifact "
                            "(the index is written last); finish or rerun the job before pushing")
    return sorted(p.relative_to(out_dir) for p in out_dir.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out_dir).parts))


def push_artifact(out_dir: Path, repo_id: str, *, revision: str | None = None, private: bool = False,
                  commit_message: str, token: str, endpoint: str | None = None,
                  retry: RetryPolicy = RetryPolicy()) -> PushResult:
    """Upload the artifact in `out_dir` to `repo_id` at branch `revision` (main if None) as one commit.
    private applies when the repo is created; an existing repo keeps its visibility. Resumable: rerun
    after a failure and only what the Hub does not hold yet is sent."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    _check_repo_id(repo_id)
    if not commit_message.strip():
        raise ConfigError("--commit-message: empty; give a summary line for the Hub commit")
    files = artifact_files(out_dir)
    secret = _Secret(token)
    api = HfApi(endpoint=endpoint or constants.ENDPOINT, token=secret.value)
    branch = revision or "main"
    denied = "the token may not write here; check it with the plan-time access check (HF_TOKEN, `hf auth login`)"

    def call(what: str, fn: Callable[[], T]) -> T:
        return _call(what, fn, retry=retry, secret=secret, error=ArtifactError, denied=denied)

    call(f"creating {repo_id}", lambda: api.create_repo(repo_id, private=private, exist_ok=True,
                                                        token=secret.value))
    if branch != "main":
        call(f"creating branch {branch}", lambda: api.create_branch(repo_id, branch=branch, exist_ok=True,
                                                                    token=secret.value))
    nbytes = sum((out_dir / f).stat().st_size for f in files)
    logger.info("hub: pushing %d files (%d bytes) from %s to %s@%s", len(files), nbytes, out_dir, repo_id, branch)

    def operation(rel: Path) -> Any:
        return CommitOperationAdd(path_in_repo=rel.as_posix(), path_or_fileobj=str(out_dir / rel))

    operations = []
    for i, rel in enumerate(files, 1):
        def upload(rel: Path = rel) -> Any:
            op = operation(rel)            # fresh per attempt: an operation that failed midway is not reused
            api.preupload_lfs_files(repo_id, additions=[op], revision=branch, token=secret.value, free_memory=False)
            return op

        operations.append(call(f"uploading {rel.as_posix()}", upload))
        logger.info("hub: uploaded %d/%d %s", i, len(files), rel.as_posix())

    first = [operations]

    def commit() -> Any:
        # A retried commit starts from fresh operations: create_commit re-asks the Hub what it holds, so a
        # commit whose answer was lost is seen as "nothing changed" rather than made twice.
        ops = first.pop() if first else [operation(rel) for rel in files]
        return api.create_commit(repo_id, operations=ops, commit_message=commit_message, revision=branch,
                                 token=secret.value)

    info = call(f"committing to {repo_id}@{branch}", commit)
    logger.info("hub: committed %s to %s@%s", info.oid, repo_id, branch)
    return PushResult(repo_id=repo_id, revision=branch, commit_sha=str(info.oid), commit_url=str(info.commit_url),
                      files=tuple(f.as_posix() for f in files), nbytes=nbytes)
