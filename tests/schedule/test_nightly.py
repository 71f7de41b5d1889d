"""The scheduler's decisions, against an in-memory Hub and job server (tests/schedule/fakes.py). The same
scenarios run against a real Ray cluster and a Hub over HTTP in test_ray_jobs.py."""

from __future__ import annotations

import json
import shlex

import pytest

import jobs.nightly as cli
from tests.schedule.cli_flags import parse_quantize_argv
from tests.schedule.fakes import FakeJobServer, MemoryHub
from tests.schedule.listing_hub import card_for
from wq_ops.errors import ArtifactError, ConfigError
from wq_ops.schedule.nightly import ExitCode, Outcome, run_nightly
from wq_ops.schedule.state import StateStore, Status
from wq_ops.schedule.watchlist import WatchList

SHA1, SHA2 = "1" * 40, "2" * 40


def watch_list(**overrides) -> WatchList:
    data = {
        "recipes": {"rtn-w4": {"method": "rtn", "bits": 4, "group_size": 64, "samples": 4, "seq_len": 64,
                               "calib": "/data/calib/c.txt"},
                    "gptq-w4": {"method": "gptq", "bits": 4, "group_size": 64, "calib": "/data/calib/c.txt"}},
        "watch": [{"repo": "org/a", "recipes": ["rtn-w4", "gptq-w4"]}],
        "destination": "quant/{name}-{recipe}",
        "publish": False,
        "max_attempts": 2,
    }
    data.update(overrides)
    return WatchList.from_dict(data)


def run(watch, hub, server, store, **kw):
    return run_nightly(watch, hub=hub, submitter=server, store=store, artifacts_root="/artifacts", poll_s=0,
                       sleep=lambda s: None, **kw)


@pytest.fixture
def store(tmp_path):
    return StateStore(tmp_path / "state" / "nightly.json")


def test_new_revision_is_quantized_once_and_the_next_run_does_nothing(store):
    hub, server = MemoryHub({"org/a": SHA1}), FakeJobServer()
    first = run(watch_list(), hub, server, store)
    assert [r.outcome for r in first.results] == [Outcome.SUCCEEDED] * 2 and first.exit_code is ExitCode.OK
    assert len(server.jobs) == 2
    argv = server.jobs[first.results[0].job_id]
    assert argv[argv.index("--out") + 1] == f"/artifacts/quant/a-rtn-w4/{SHA1}"
    saved = json.loads(store.path.read_text())
    assert {(r["model"], r["recipe"], r["revision"], r["status"]) for r in saved["records"]} == \
        {("org/a", "rtn-w4", SHA1, "succeeded"), ("org/a", "gptq-w4", SHA1, "succeeded")}
    assert all((store.logs_dir / f"{r['job_id']}.log").read_text().startswith("logs of") for r in saved["records"])

    second = run(watch_list(), hub, server, store)
    assert [r.outcome for r in second.results] == [Outcome.UP_TO_DATE] * 2 and second.exit_code is ExitCode.OK
    assert len(server.jobs) == 2                                   # nothing submitted

    hub.revisions["org/a"] = SHA2                                 # a new upstream commit
    third = run(watch_list(), hub, server, store)
    assert [(r.outcome, r.revision, r.attempt) for r in third.results] == [(Outcome.SUCCEEDED, SHA2, 1)] * 2
    assert len(server.jobs) == 4


def test_a_failure_is_recorded_and_retried_next_run_at_most_max_attempts_times(store):
    hub = MemoryHub({"org/a": SHA1})
    server = FakeJobServer(fails=lambda argv: "gptq" in argv)
    first = run(watch_list(), hub, server, store)
    outcomes = {r.recipe: (r.outcome, r.attempt) for r in first.results}
    assert outcomes == {"rtn-w4": (Outcome.SUCCEEDED, 1), "gptq-w4": (Outcome.FAILED, 1)}
    assert first.exit_code is ExitCode.JOB_FAILED
    failed = store.load()[("org/a", "gptq-w4")]
    assert failed.status is Status.FAILED and "exit code 2" in failed.message and failed.logs

    second = run(watch_list(), hub, server, store)                 # retried: attempt 2 of 2, fails again
    assert {r.recipe: (r.outcome, r.attempt) for r in second.results} == \
        {"rtn-w4": (Outcome.UP_TO_DATE, 1), "gptq-w4": (Outcome.FAILED, 2)}
    assert "no attempts left" in second.describe()

    third = run(watch_list(), hub, server, store)                  # bounded: not submitted again
    assert {r.recipe: r.outcome for r in third.results} == {"rtn-w4": Outcome.UP_TO_DATE, "gptq-w4": Outcome.GAVE_UP}
    assert third.exit_code is ExitCode.JOB_FAILED and len(server.jobs) == 3

    hub.revisions["org/a"] = SHA2                                 # a new revision gets fresh attempts
    server.fails = lambda argv: False
    fourth = run(watch_list(), hub, server, store)
    assert {(r.outcome, r.attempt) for r in fourth.results} == {(Outcome.SUCCEEDED, 1)}


def test_a_retry_that_succeeds_clears_the_failure(store):
    hub, broken = MemoryHub({"org/a": SHA1}), {"yes": True}
    server = FakeJobServer(fails=lambda argv: broken["yes"])
    assert run(watch_list(), hub, server, store).exit_code is ExitCode.JOB_FAILED
    broken["yes"] = False
    report = run(watch_list(), hub, server, store)
    assert {(r.outcome, r.attempt) for r in report.results} == {(Outcome.SUCCEEDED, 2)}
    assert report.exit_code is ExitCode.OK


def test_at_most_max_concurrent_jobs_run_at_once(store):
    hub = MemoryHub({f"org/m{i}": SHA1 for i in range(5)})
    server = FakeJobServer()
    watch = watch_list(watch=[{"author": "org", "pattern": "m*", "recipes": ["rtn-w4"]}], max_concurrent_jobs=2)
    report = run(watch, hub, server, store)
    assert len(report.results) == 5 and all(r.outcome is Outcome.SUCCEEDED for r in report.results)
    assert server.in_flight_max == 2


def test_a_missing_repo_is_reported_and_the_rest_still_runs(store):
    hub = MemoryHub({"org/a": SHA1, "team/x1": SHA1}, broken={"org/flaky"})
    watch = watch_list(watch=[{"repo": "org/gone", "recipes": ["rtn-w4"]}, {"repo": "org/flaky", "recipes": ["rtn-w4"]},
                              {"author": "team", "pattern": "y*", "recipes": ["rtn-w4"]},
                              {"repo": "org/a", "recipes": ["rtn-w4"]}])
    report = run(watch, hub, FakeJobServer(), store)
    assert [(r.model, r.outcome) for r in report.results] == [("org/a", Outcome.SUCCEEDED)]
    assert [p.entry for p in report.problems] == ["org/gone", "org/flaky", "team/y*"]
    assert "not found on the Hub" in report.problems[0].message and "503" in report.problems[1].message
    assert report.exit_code is ExitCode.WATCH_PROBLEM
    assert "problem    org/gone: not found" in report.describe()


def test_dry_run_submits_nothing_and_writes_nothing(store):
    hub, server = MemoryHub({"org/a": SHA1}), FakeJobServer()
    report = run(watch_list(), hub, None, store, dry_run=True)
    assert [r.outcome for r in report.results] == [Outcome.PLANNED] * 2 and report.dry_run
    assert not store.path.parent.exists() and not server.jobs
    assert "would run" in report.describe() and "python -m jobs.quantize --model org/a" in report.describe()
    for r in report.results:                                      # publish is off: no push flags
        args = parse_quantize_argv(shlex.split(r.detail)[3:])
        assert (args.model, args.revision, args.method) == ("org/a", SHA1, r.recipe[:-3])
        assert "push_to_hub" not in vars(args)


def test_publishing_commands_are_quantize_command_lines(store):
    watch = watch_list(publish=True, private=True)
    report = run(watch, MemoryHub({"org/a": SHA1}), None, store, dry_run=True)
    for r in report.results:
        argv = shlex.split(r.detail)
        assert argv[argv.index("--push-to-hub") + 1] == r.destination and "--private" in argv
        args = parse_quantize_argv(argv[3:])
        assert args.out == f"/artifacts/{r.destination}/{SHA1}" and args.overwrite
        assert args.push_to_hub == r.destination and args.private


def test_lost_state_is_rebuilt_from_the_destination_model_cards(store):
    hub = MemoryHub({"org/a": SHA2, "org/b": SHA2})
    watch = watch_list(publish=True, watch=[{"repo": "org/a", "recipes": ["rtn-w4", "gptq-w4"]},
                                            {"repo": "org/b", "recipes": ["rtn-w4"]}])
    hub.cards["quant/a-rtn-w4"] = card_for("org/a", SHA2, method="rtn")      # current: nothing to do
    hub.cards["quant/a-gptq-w4"] = card_for("org/a", SHA1, method="gptq")    # an older revision: redo
    hub.cards["quant/b-rtn-w4"] = card_for("org/b", SHA2, method="rtn", bits=8)   # another recipe: redo
    server = FakeJobServer()
    report = run(watch, hub, server, store)
    assert {(r.model, r.recipe): r.outcome for r in report.results} == {
        ("org/a", "rtn-w4"): Outcome.UP_TO_DATE, ("org/a", "gptq-w4"): Outcome.SUCCEEDED,
        ("org/b", "rtn-w4"): Outcome.SUCCEEDED}
    assert store.load()[("org/a", "rtn-w4")].message == "rebuilt from the model card of quant/a-rtn-w4"
    argv = next(iter(server.jobs.values()))
    assert argv[argv.index("--push-to-hub") + 1].startswith("quant/")


def test_an_edited_recipe_is_new_work(store):
    hub, server = MemoryHub({"org/a": SHA1}), FakeJobServer()
    watch = watch_list(watch=[{"repo": "org/a", "recipes": ["rtn-w4"]}])
    run(watch, hub, server, store)
    edited = watch_list(watch=[{"repo": "org/a", "recipes": ["rtn-w4"]}],
                        recipes={"rtn-w4": {"method": "rtn", "bits": 4, "group_size": 128,
                                            "calib": "/data/calib/c.txt"}})
    report = run(edited, hub, server, store)
    assert [r.outcome for r in report.results] == [Outcome.SUCCEEDED] and len(server.jobs) == 2


def test_a_restarted_scheduler_attaches_to_the_job_it_had_submitted(store):
    hub, server = MemoryHub({"org/a": SHA1}), FakeJobServer()
    watch = watch_list(watch=[{"repo": "org/a", "recipes": ["rtn-w4"]}])
    planned = run(watch, hub, None, store, dry_run=True).results[0]
    server.submit(planned.job_id, planned.detail)                 # submitted by a run that then died
    report = run(watch, hub, server, store)
    assert [(r.outcome, r.job_id) for r in report.results] == [(Outcome.SUCCEEDED, planned.job_id)]
    assert len(server.jobs) == 1


def test_a_job_past_its_timeout_is_stopped_and_counts_as_a_failed_attempt(store):
    hub, server = MemoryHub({"org/a": SHA1}), FakeJobServer(finishes=False)
    watch = watch_list(watch=[{"repo": "org/a", "recipes": ["rtn-w4"]}], job_timeout_s=60)
    now = iter(range(0, 10_000, 25))
    report = run_nightly(watch, hub=hub, submitter=server, store=store, artifacts_root="/a", poll_s=0,
                         sleep=lambda s: None, clock=lambda: next(now))
    assert [(r.outcome, r.attempt) for r in report.results] == [(Outcome.FAILED, 1)]
    assert server.stopped == [report.results[0].job_id] and "job_timeout_s=60" in report.results[0].detail


def test_destinations_that_collide_are_refused_before_any_job(store):
    hub, server = MemoryHub({"org/a": SHA1, "other/a": SHA1}), FakeJobServer()
    watch = watch_list(watch=[{"author": "org", "recipes": ["rtn-w4"]}, {"author": "other", "recipes": ["rtn-w4"]}])
    with pytest.raises(ConfigError, match="would both publish to quant/a-rtn-w4"):
        run(watch, hub, server, store)
    assert not server.jobs


def test_a_corrupt_state_file_is_an_error_not_a_silent_reset(store):
    store.path.parent.mkdir(parents=True)
    store.path.write_text("{not json")
    with pytest.raises(ArtifactError, match="not a wq scheduler state file"):
        run(watch_list(), MemoryHub({"org/a": SHA1}), FakeJobServer(), store)


def test_cli_exit_codes(tmp_path, monkeypatch, capsys):
    wl = tmp_path / "watch.yaml"
    wl.write_text("recipes: {rtn-w4: {method: rtn, calib: c.txt}}\n"
                  "watch: [{repo: org/a, recipes: [rtn-w4]}]\npublish: false\n")
    hub = MemoryHub({"org/a": SHA1})
    monkeypatch.setattr(cli, "HfHubSource", lambda: hub)
    common = ["--watch-list", str(wl), "--state", str(tmp_path / "s.json"), "--artifacts", str(tmp_path / "a")]
    assert cli.main([*common, "--dry-run"]) == 0
    assert "would run" in capsys.readouterr().out
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert cli.main(common) == 2 and "--address: missing" in capsys.readouterr().err
    monkeypatch.setenv("RAY_ADDRESS", "http://other:8265")
    assert cli.main([*common, "--address", "http://h:8265"]) == 2 and "prefers them" in capsys.readouterr().err
    monkeypatch.delenv("RAY_ADDRESS")
    server = FakeJobServer(fails=lambda argv: True)
    monkeypatch.setattr(cli, "RayJobSubmitter", lambda address: server)
    assert cli.main([*common, "--address", "http://h:8265", "--poll-s", "0"]) == 1
    hub.revisions.pop("org/a")
    assert cli.main([*common, "--address", "http://h:8265"]) == 3
    wl.write_text("recipes: {rtn-w4: {method: rtn, bits: 5, calib: c.txt}}\n"
                  "watch: [{repo: org/a, recipes: [rtn-w4]}]\n")
    assert cli.main(common) == 2 and "recipes.rtn-w4: bits=5" in capsys.readouterr().err


@pytest.mark.parametrize("publish", [False, True], ids=["state-kept", "state-lost"])
def test_an_unreachable_hub_is_one_line_and_decides_nothing(tmp_path, monkeypatch, capsys, publish):
    """No network: the real Hub client against a port nothing listens on. One error line, exit 2, no state
    written and no claim of a rebuild (with publish and no state, the state would be rebuilt from the cards)."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    wl = tmp_path / "watch.yaml"
    wl.write_text("recipes: {rtn-w4: {method: rtn, calib: c.txt}}\nwatch: [{repo: org/a, recipes: [rtn-w4]}, "
                  "{repo: org/b, recipes: [rtn-w4]}, {author: org, pattern: 'c-*', recipes: [rtn-w4]}]\n"
                  f"publish: {str(publish).lower()}\ndestination: 'quant/{{name}}-{{recipe}}'\n")
    state = tmp_path / "s.json"
    code = cli.main(["--watch-list", str(wl), "--state", str(state), "--artifacts", str(tmp_path / "a"),
                     "--dry-run", "--log-level", "debug"])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("wq-nightly:")]
    assert code == 2 and len(errors) == 1, captured.err
    assert f"the Hub at {endpoint} is unreachable" in errors[0] and "nothing was" in errors[0]
    assert "rebuilt" not in captured.err + captured.out and not state.exists()
