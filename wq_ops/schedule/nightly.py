"""One nightly run: ask the Hub for the current revision of every watched model, work out which
(model, revision, recipe) have no artifact yet, quantize those as Ray jobs (a few at a time), and record
how each went. Entry point: `run_nightly(watch, hub=..., submitter=..., store=..., artifacts_root=...)`.

A failed job is retried on a later run, up to `max_attempts` times per revision; a watched repo that has
disappeared is reported and the run goes on. The returned report's `exit_code` says how it went.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import shlex
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Callable, Mapping

from wq_ops.errors import CheckpointError, ConfigError
from wq_ops.report.model_card import card_group
from wq_ops.schedule.hub import HubSource, HubUnreachable, parse_model_card
from wq_ops.schedule.state import Record, StateStore, Status
from wq_ops.schedule.submit import JobState, JobSubmitter
from wq_ops.schedule.watchlist import Recipe, WatchEntry, WatchList

__all__ = ["WorkItem", "Outcome", "ItemResult", "WatchProblem", "NightlyReport", "ExitCode", "find_models",
           "rebuild_records", "plan_work", "artifact_dir", "quantize_command", "run_nightly"]

log = logging.getLogger(__name__)

PYTHON = "python"       # the interpreter on the cluster's PATH that has wq installed (the image's)
MESSAGE_CHARS = 1000    # of a job's failure message kept in the state (Ray appends up to 20k chars of log
                        # tail to it; the whole log is saved beside the state anyway)


class ExitCode(int, Enum):
    OK = 0                  # every job this run asked for succeeded (or there was nothing to do)
    JOB_FAILED = 1          # a job failed (retried next run) or has used up its attempts
    ERROR = 2               # the run could not start: bad watch list, unreachable cluster, corrupt state
    WATCH_PROBLEM = 3       # every job succeeded, but a watched repo is missing or the Hub did not answer


@dataclass(frozen=True)
class WorkItem:
    """One quantize job to run: `recipe` applied to `model` at `revision`, attempt number `attempt`."""

    model: str
    revision: str
    recipe: Recipe
    destination: str
    attempt: int
    reason: str

    @property
    def submission_id(self) -> str:
        # Deterministic, so a restarted scheduler finds the job it had submitted (see submit.py).
        slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{self.model}-{self.recipe.name}").strip("-")
        return f"wq-{slug}-{self.revision[:12]}-{self.recipe.fingerprint[:8]}-a{self.attempt}"


class Outcome(str, Enum):
    UP_TO_DATE = "up to date"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    GAVE_UP = "gave up"
    PLANNED = "would run"   # dry run


@dataclass(frozen=True)
class ItemResult:
    model: str
    recipe: str
    revision: str
    destination: str
    outcome: Outcome
    attempt: int = 0
    job_id: str | None = None
    logs: str | None = None
    detail: str = ""        # the failure message, or the command a dry run would submit


@dataclass(frozen=True)
class WatchProblem:
    """A watch-list entry that yielded no model to check: repo gone, author has no match, Hub error."""

    entry: str
    message: str


@dataclass(frozen=True)
class NightlyReport:
    results: tuple[ItemResult, ...]
    problems: tuple[WatchProblem, ...]
    max_attempts: int
    dry_run: bool = False

    @property
    def exit_code(self) -> ExitCode:
        if any(r.outcome in (Outcome.FAILED, Outcome.GAVE_UP) for r in self.results):
            return ExitCode.JOB_FAILED
        return ExitCode.WATCH_PROBLEM if self.problems else ExitCode.OK

    def describe(self) -> str:
        """A summary line, then one line per (model, recipe) and per problem."""
        counts = {o: sum(r.outcome is o for r in self.results) for o in Outcome}
        head = ", ".join(f"{n} {o.value}" for o, n in counts.items() if n)
        lines = [f"nightly{' (dry run)' if self.dry_run else ''}: {head or 'nothing watched'}"
                 + (f", {len(self.problems)} watch problem(s)" if self.problems else "")]
        for r in self.results:
            what = f"{r.outcome.value:<10} {r.model}@{r.revision[:12]} {r.recipe} -> {r.destination}"
            if r.outcome is Outcome.PLANNED:
                what += f" (attempt {r.attempt}/{self.max_attempts}): {r.detail}"
            elif r.outcome is Outcome.FAILED:
                again = "retried next run" if r.attempt < self.max_attempts else "no attempts left"
                what += f" (attempt {r.attempt}/{self.max_attempts}, {again}): {_first_line(r.detail)}"
            elif r.outcome is Outcome.GAVE_UP:
                what += f" (failed {r.attempt} times; fix the cause, then delete its state record): " \
                        f"{_first_line(r.detail)}"
            if r.logs:
                what += f" [logs: {r.logs}]"
            lines.append(what)
        lines += [f"problem    {p.entry}: {p.message}" for p in self.problems]
        return "\n".join(lines)


def _first_line(text: str, limit: int = 300) -> str:
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[:limit] + "..."


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def find_models(watch: WatchList, hub: HubSource) -> tuple[list[tuple[WatchEntry, str, str]], list[WatchProblem]]:
    """(entry, repo id, current revision) for every watched model the Hub knows, and a problem for each
    entry or repo it could not resolve. Never raises for a missing repo."""
    found: list[tuple[WatchEntry, str, str]] = []
    problems: list[WatchProblem] = []
    for entry in watch.watch:
        if entry.repo is not None:
            repos = [entry.repo]
        else:
            assert entry.author is not None          # WatchEntry guarantees one of repo / author
            try:
                listed = hub.list_models(entry.author)
            except HubUnreachable:
                raise
            except CheckpointError as e:
                problems.append(WatchProblem(entry.label, str(e)))
                continue
            repos = [r for r in listed if fnmatch.fnmatchcase(r.split("/", 1)[-1], entry.pattern)]
            if not repos:
                problems.append(WatchProblem(entry.label, f"no model of {entry.author} matches {entry.pattern!r} "
                                             f"({len(listed)} listed); check the author and pattern"))
        for repo in repos:
            try:
                revision = hub.current_revision(repo)
            except HubUnreachable:
                raise
            except CheckpointError as e:
                problems.append(WatchProblem(repo, str(e)))
                continue
            if revision is None:
                problems.append(WatchProblem(repo, "not found on the Hub (deleted, renamed, or not visible with "
                                             "this token); remove it from the watch list or restore access"))
                continue
            found.append((entry, repo, revision))
    return found, problems


def _pairs(watch: WatchList, found: list[tuple[WatchEntry, str, str]]) -> list[tuple[str, str, Recipe, str]]:
    """(model, revision, recipe, destination) for every watched model and recipe, each pair once.
    Two pairs publishing to one repo, or one pair to two repos, is a watch-list error."""
    by_key: dict[tuple[str, str], str] = {}
    by_dest: dict[str, tuple[str, str]] = {}
    out = []
    for entry, repo, revision in found:
        for name in entry.recipes:
            recipe = watch.recipe(name)
            dest = watch.destination_for(entry, repo, recipe)
            if (repo, name) in by_key:
                if by_key[(repo, name)] != dest:
                    raise ConfigError(f"watch: {repo} with recipe {name} is listed twice with different "
                                      f"destinations ({by_key[(repo, name)]}, {dest}); keep one")
                continue
            if dest in by_dest:
                other = by_dest[dest]
                raise ConfigError(f"destination: {repo} with {name} and {other[0]} with {other[1]} would both "
                                  f"publish to {dest}; make the template tell them apart ({{name}}, {{recipe}})")
            by_key[(repo, name)], by_dest[dest] = dest, (repo, name)
            out.append((repo, revision, recipe, dest))
    return out


def rebuild_records(watch: WatchList, hub: HubSource,
                    found: list[tuple[WatchEntry, str, str]]) -> dict[tuple[str, str], Record]:
    """What the destination repos' model cards say was already published: a record per (model, recipe)
    whose card names that model and the recipe's method, bits, group size and format. A card the Hub
    does not serve raises CheckpointError: guessing "never published" would redo and re-push everything."""
    records: dict[tuple[str, str], Record] = {}
    for repo, _, recipe, dest in _pairs(watch, found):
        card = hub.model_card(dest)
        facts = parse_model_card(card) if card is not None else None
        if facts is None or facts.base_model != repo:
            continue
        quant = recipe.quant
        group = card_group(quant.scheme.value if quant.scheme else None, quant.group_size)
        if (facts.method, facts.bits, facts.group, facts.format) != \
                (quant.method.value, quant.bits, group, recipe.format.value):
            log.warning("rebuild: %s holds %s w%d g%s %s, not recipe %s; it will be replaced", dest, facts.method,
                        facts.bits, facts.group, facts.format, recipe.name)
            continue
        records[(repo, recipe.name)] = Record(
            model=repo, recipe=recipe.name, revision=facts.revision, fingerprint=recipe.fingerprint,
            destination=dest, status=Status.SUCCEEDED, attempts=1, updated=_now(),
            message=f"rebuilt from the model card of {dest}")
    return records


def plan_work(watch: WatchList, found: list[tuple[WatchEntry, str, str]],
              records: Mapping[tuple[str, str], Record]) -> tuple[list[WorkItem], list[ItemResult]]:
    """The jobs to run, and the results already known without running anything (up to date, gave up)."""
    work: list[WorkItem] = []
    settled: list[ItemResult] = []
    for repo, revision, recipe, dest in _pairs(watch, found):
        rec = records.get((repo, recipe.name))
        same = rec is not None and (rec.revision, rec.fingerprint, rec.destination) == \
            (revision, recipe.fingerprint, dest)
        if rec is not None and same and rec.status is Status.SUCCEEDED:
            settled.append(ItemResult(repo, recipe.name, revision, dest, Outcome.UP_TO_DATE, rec.attempts,
                                      rec.job_id, rec.logs))
        elif rec is not None and same and rec.attempts >= watch.max_attempts:
            settled.append(ItemResult(repo, recipe.name, revision, dest, Outcome.GAVE_UP, rec.attempts,
                                      rec.job_id, rec.logs, rec.message))
        else:
            if rec is not None and same:
                attempt, reason = rec.attempts + 1, f"retry after: {_first_line(rec.message, 120)}"
            elif rec is None:
                attempt, reason = 1, "never made"
            elif rec.revision != revision:
                attempt, reason = 1, f"new revision (was {rec.revision[:12]})"
            else:
                attempt, reason = 1, "recipe or destination changed"
            work.append(WorkItem(repo, revision, recipe, dest, attempt, reason))
    return work, settled


def artifact_dir(item: WorkItem, *, artifacts_root: str) -> str:
    """ARTIFACTS/<destination>/<revision>: on a volume every node of the cluster mounts at the same path."""
    return f"{artifacts_root.rstrip('/')}/{item.destination}/{item.revision}"


def quantize_command(item: WorkItem, watch: WatchList, *, artifacts_root: str) -> list[str]:
    """The quantize job's argv. --overwrite because a retry may find the complete artifact of an attempt
    whose push failed (the job still reuses the blocks an interrupted attempt had staged)."""
    argv = [PYTHON, "-m", "jobs.quantize", "--model", item.model, "--revision", item.revision,
            "--out", artifact_dir(item, artifacts_root=artifacts_root),
            *item.recipe.flags(), *watch.resources.flags(), "--overwrite"]
    if watch.publish:
        argv += ["--push-to-hub", item.destination,
                 "--commit-message", f"wq: {item.recipe.name} of {item.model}@{item.revision[:12]}"]
        if watch.private:
            argv.append("--private")
    return argv


def _run_jobs(work: list[WorkItem], *, watch: WatchList, submitter: JobSubmitter, store: StateStore,
              records: dict[tuple[str, str], Record], artifacts_root: str, poll_s: float,
              clock: Callable[[], float], sleep: Callable[[float], None]) -> list[ItemResult]:
    """Keep at most max_concurrent_jobs in flight; record each as it ends (the state is saved every time,
    so a scheduler killed mid-run loses at most the jobs still running, which it re-attaches to)."""
    results: list[ItemResult] = []
    queue = deque(work)
    running: dict[str, tuple[WorkItem, float]] = {}

    def finish(item: WorkItem, status: Status, message: str) -> None:
        sid = item.submission_id
        try:
            logs: str | None = str(store.save_logs(sid, submitter.logs(sid)))
        except Exception as e:   # any client error: the outcome still gets recorded
            logs = None
            log.warning("job=%s logs unavailable: %s", sid, e)
        out = artifact_dir(item, artifacts_root=artifacts_root)
        records[(item.model, item.recipe.name)] = Record(
            model=item.model, recipe=item.recipe.name, revision=item.revision, fingerprint=item.recipe.fingerprint,
            destination=item.destination, status=status, attempts=item.attempt, updated=_now(), job_id=sid,
            logs=logs, out=out, message=message[:MESSAGE_CHARS])
        store.save(records)
        outcome = Outcome.SUCCEEDED if status is Status.SUCCEEDED else Outcome.FAILED
        log.info("job=%s model=%s revision=%s recipe=%s attempt=%d outcome=%s logs=%s", sid, item.model,
                 item.revision, item.recipe.name, item.attempt, status.value, logs)
        results.append(ItemResult(item.model, item.recipe.name, item.revision, item.destination, outcome,
                                  item.attempt, sid, logs, message[:MESSAGE_CHARS]))

    while queue or running:
        while queue and len(running) < watch.max_concurrent_jobs:
            item = queue.popleft()
            command = shlex.join(quantize_command(item, watch, artifacts_root=artifacts_root))
            try:
                fresh = submitter.submit(item.submission_id, command)
            except Exception as e:   # the job server refused it: a failed attempt, not a crash
                finish(item, Status.FAILED, f"submission to {submitter.address} failed: {e}")
                continue
            log.info("job=%s model=%s revision=%s recipe=%s attempt=%d %s (%s)", item.submission_id, item.model,
                     item.revision, item.recipe.name, item.attempt, "submitted" if fresh else "re-attached",
                     item.reason)
            running[item.submission_id] = (item, clock())
        sleep(poll_s)
        for sid, (item, started) in list(running.items()):
            try:
                status = submitter.status(sid)
            except Exception as e:   # a blip in the job server: ask again next poll
                log.warning("job=%s status unavailable: %s", sid, e)
                status = None
            if status is not None and status.state.terminal:
                del running[sid]
                ok = status.state is JobState.SUCCEEDED
                finish(item, Status.SUCCEEDED if ok else Status.FAILED,
                       status.message or f"job ended {status.state.value}")
            elif clock() - started > watch.job_timeout_s:
                del running[sid]
                try:
                    submitter.stop(sid)
                except Exception as e:   # the job may have ended meanwhile; the failure is recorded anyway
                    log.warning("job=%s could not be stopped: %s", sid, e)
                finish(item, Status.FAILED, f"stopped after job_timeout_s={watch.job_timeout_s:g} s")
    return results


def run_nightly(watch: WatchList, *, hub: HubSource, submitter: JobSubmitter | None, store: StateStore,
                artifacts_root: str, dry_run: bool = False, poll_s: float = 10.0,
                clock: Callable[[], float] = time.monotonic,
                sleep: Callable[[float], None] = time.sleep) -> NightlyReport:
    """One scheduler run. A dry run asks the Hub and reads the state, then reports the jobs it would submit
    (submitter may be None) and writes nothing. Raises ConfigError (destinations that collide),
    ArtifactError (unreadable state), CheckpointError (lost state, and the Hub cannot serve the model cards
    to rebuild it); every per-model problem goes into the report instead."""
    try:
        found, problems = find_models(watch, hub)
    except HubUnreachable as e:            # one line, and nothing decided: no rebuild, no state written
        raise CheckpointError(f"{e}; nothing was checked, submitted or recorded: check the network and "
                              "HF_ENDPOINT, then run again") from None
    records = store.load()
    if not store.exists() and watch.publish:
        try:
            records = rebuild_records(watch, hub, found)
        except HubUnreachable as e:
            raise CheckpointError(f"{e}; the lost state cannot be rebuilt from the model cards; nothing was "
                                  "submitted or recorded: run again once the Hub answers") from None
        log.info("state %s missing: rebuilt %d record(s) from the destination repos' model cards",
                 store.path, len(records))
    work, settled = plan_work(watch, found, records)
    if dry_run:
        planned = [ItemResult(w.model, w.recipe.name, w.revision, w.destination, Outcome.PLANNED, w.attempt,
                              w.submission_id, None,
                              shlex.join(quantize_command(w, watch, artifacts_root=artifacts_root)))
                   for w in work]
        return NightlyReport(tuple(settled + planned), tuple(problems), watch.max_attempts, dry_run=True)
    ran: list[ItemResult] = []
    if work:
        if submitter is None:
            raise ConfigError(f"{len(work)} job(s) to run but no Ray cluster given (--address)")
        ran = _run_jobs(work, watch=watch, submitter=submitter, store=store, records=records,
                        artifacts_root=artifacts_root, poll_s=poll_s, clock=clock, sleep=sleep)
    if not store.exists():
        store.save(records)             # the first run, or a rebuilt state: write it even with nothing to run
    return NightlyReport(tuple(settled + ran), tuple(problems), watch.max_attempts)
