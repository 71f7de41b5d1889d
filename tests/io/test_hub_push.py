"""Pushing an artifact with the real huggingface_hub client against tests/hub_server.py: files arrive
byte-identical, an interrupted upload resumes, 5xx and dropped connections are retried, 401/403 stop at plan
time with a clear message, and the token shows up nowhere: logs, stdout/stderr, exceptions, results."""

import json
import logging
import os
import traceback

import pytest

from tests.hub_server import start_hub
from wq_ops.errors import ArtifactError, ConfigError
from wq_ops.io.hub_push import RetryPolicy, artifact_files, check_push_access, push_artifact, resolve_token

TOKEN = "hf_wqTestSecretToken0123456789abcdef"
READ_TOKEN = "hf_wqReadOnlyToken0123456789abcdef"
FAST = RetryPolicy(max_attempts=3, base_delay_s=0.0, max_delay_s=0.0)
# huggingface_hub passes upload bodies as `data=` to its httpx client, which warns; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def hub(monkeypatch, caplog):
    import huggingface_hub.utils._http as hf_http
    from huggingface_hub import constants

    server = start_hub()
    server.add_user(TOKEN, "alice", orgs={"org": "write", "readers": "read"}, denied={"org/locked"})
    server.add_user(READ_TOKEN, "bob", role="read")
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    # huggingface_hub reads HF_HUB_DISABLE_XET at import; the constant is what its upload path consults.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # huggingface_hub's own backoff sleeps 1, 2, 4, 8 s between its retries; tests need not wait.
    monkeypatch.setattr(hf_http.time, "sleep", lambda seconds: None)
    caplog.set_level(logging.DEBUG)
    yield server
    server.server.shutdown()


@pytest.fixture
def artifact(tmp_path):
    out = tmp_path / "artifact"
    out.mkdir()
    shards = {f"model-0000{i}-of-00003.safetensors": os.urandom(20_000 + 1000 * i) for i in (1, 2, 3)}
    for name, data in shards.items():
        (out / name).write_bytes(data)
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": next(iter(shards))}}))
    (out / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    (out / "README.md").write_text("---\nlibrary_name: transformers\n---\n# tiny\n")
    (out / "wq_report.json").write_text("{}")
    (out / ".wq-staging").mkdir()
    (out / ".wq-staging" / "block-0.safetensors").write_bytes(b"staged")
    return out


def assert_no_token(*texts):
    for text in texts:
        assert TOKEN not in text and READ_TOKEN not in text


def test_push_creates_the_repo_and_files_arrive_byte_identical(hub, artifact, caplog, capsys):
    access = check_push_access("org/tiny-gptq", token=TOKEN, retry=FAST)
    assert access.user == "alice" and not access.repo_exists
    result = push_artifact(artifact, "org/tiny-gptq", private=True, commit_message="wq: GPTQ w4g128",
                           token=TOKEN, retry=FAST)
    repo = hub.repos["org/tiny-gptq"]
    assert repo.private and result.commit_sha == repo.sha and result.revision == "main"
    local = {p.as_posix(): (artifact / p).read_bytes() for p in artifact_files(artifact)}
    assert ".wq-staging/block-0.safetensors" not in local and set(result.files) == set(local)
    assert {k: v for k, v in repo.files.items() if k != ".gitattributes"} == local
    assert [c["summary"] for c in repo.commits] == ["wq: GPTQ w4g128"]      # one commit: all or nothing
    assert {p for p in repo.lfs_paths} == {p for p in local if p.endswith(".safetensors")}
    out, err = capsys.readouterr()
    assert_no_token(caplog.text, out, err, repr(result), repr(access))


def test_push_to_a_branch_of_an_existing_repo(hub, artifact):
    push_artifact(artifact, "alice/tiny", commit_message="first", token=TOKEN, retry=FAST)
    assert check_push_access("alice/tiny", token=TOKEN, retry=FAST).repo_exists
    (artifact / "README.md").write_text("# changed\n")
    result = push_artifact(artifact, "alice/tiny", revision="w4g64", commit_message="variant", token=TOKEN,
                           retry=FAST)
    repo = hub.repos["alice/tiny"]
    assert repo.branches["w4g64"].sha == result.commit_sha
    assert repo.branches["w4g64"].files["README.md"] == b"# changed\n"
    assert repo.files["README.md"] != b"# changed\n"


def test_an_upload_cut_midway_resumes_with_only_what_is_missing(hub, artifact, caplog, capsys):
    shards = sorted(p for p in artifact.glob("*.safetensors"))
    hub.cut_upload(shards[1].read_bytes(), times=100)          # every try of shard 2 drops mid-body
    with pytest.raises(ArtifactError, match=r"uploading model-00002-of-00003.safetensors failed after 3") as exc:
        push_artifact(artifact, "org/tiny", commit_message="wq", token=TOKEN, retry=FAST)
    assert "a rerun push sends only what the Hub does not hold yet" in str(exc.value)
    assert "org/tiny" in hub.repos and hub.repos["org/tiny"].commits == []     # nothing published
    first_puts = hub.requests("PUT", "/lfs-upload/")
    assert len(set(first_puts)) == 2                           # shard 1 stored, shard 2 tried (and cut)

    hub.cut_uploads.clear()
    hub.log.clear()
    result = push_artifact(artifact, "org/tiny", commit_message="wq", token=TOKEN, retry=FAST)
    import hashlib

    sent = {p.rsplit("/", 1)[-1] for p in hub.requests("PUT", "/lfs-upload/")}
    assert sent == {hashlib.sha256(s.read_bytes()).hexdigest() for s in shards[1:]}      # not shard 1 again
    assert len(hub.requests("PUT", "/lfs-upload/")) == 2
    assert hub.repos["org/tiny"].files[shards[0].name] == shards[0].read_bytes()
    assert result.commit_sha == hub.repos["org/tiny"].sha
    out, err = capsys.readouterr()
    assert_no_token(caplog.text, out, err, str(exc.value), "".join(traceback.format_exception(exc.value)))


def test_a_500_on_commit_is_retried_without_a_second_commit(hub, artifact, caplog):
    hub.fail("POST", r"/commit/", status=500, times=2)
    result = push_artifact(artifact, "org/tiny", commit_message="wq", token=TOKEN, retry=FAST)
    assert len(hub.requests("POST", r"/commit/")) == 3 and len(hub.repos["org/tiny"].commits) == 1
    assert result.commit_sha == hub.repos["org/tiny"].sha
    assert "retry 1/2" in caplog.text and "retry 2/2" in caplog.text
    assert_no_token(caplog.text)


def test_a_500_on_upload_endpoints_is_retried(hub, artifact):
    hub.fail("POST", r"/preupload/", status=503, after=1, times=1)
    hub.fail("POST", r"/api/repos/create", status=502, times=1)
    push_artifact(artifact, "org/tiny", commit_message="wq", token=TOKEN, retry=FAST)
    assert len(hub.requests("POST", r"/api/repos/create")) == 2
    assert hub.repos["org/tiny"].commits


def test_retries_are_bounded(hub, artifact):
    hub.fail("POST", r"/commit/", status=500, times=100)
    with pytest.raises(ArtifactError, match="after 3 attempts"):
        push_artifact(artifact, "org/tiny", commit_message="wq", token=TOKEN, retry=FAST)
    assert len(hub.requests("POST", r"/commit/")) == 3


def test_a_refused_token_fails_at_plan_time_with_a_clear_message(hub, artifact, caplog, capsys):
    hub.add_repo_from_dir("org/locked", artifact)
    with pytest.raises(ConfigError, match=r"the Hub answered 403: alice may not write to org/locked") as exc:
        check_push_access("org/locked", token=TOKEN, retry=FAST)
    with pytest.raises(ConfigError, match=r"alice has the read role in readers"):
        check_push_access("readers/x", token=TOKEN, retry=FAST)
    with pytest.raises(ConfigError, match=r"alice is not someone-else and not a member of it"):
        check_push_access("someone-else/x", token=TOKEN, retry=FAST)
    with pytest.raises(ConfigError, match=r"read-only"):
        check_push_access("bob/x", token=READ_TOKEN, retry=FAST)
    with pytest.raises(ConfigError, match=r"the Hub answered 401: the token was rejected"):
        check_push_access("alice/x", token="hf_not_a_valid_token_1234567890", retry=FAST)
    # The same refusal during a push is an ArtifactError, and the server's echo of the token is scrubbed.
    with pytest.raises(ArtifactError, match=r"403") as push_exc:
        push_artifact(artifact, "org/locked", commit_message="wq", token=TOKEN, retry=FAST)
    assert "token *** cannot write" in str(push_exc.value)
    out, err = capsys.readouterr()
    assert_no_token(caplog.text, out, err, str(exc.value), str(push_exc.value),
                    "".join(traceback.format_exception(exc.value)),
                    "".join(traceback.format_exception(push_exc.value)))
    assert push_exc.value.__cause__ is None and push_exc.value.__suppress_context__


def test_the_token_travels_only_in_the_authorization_header(hub, artifact):
    push_artifact(artifact, "org/tiny", commit_message="wq", token=TOKEN, retry=FAST)
    for (method, path), headers in zip(hub.log, hub.headers_seen):
        assert TOKEN not in path
        assert all(TOKEN not in v for k, v in headers.items() if k.lower() != "authorization")


def test_inputs_are_checked_before_any_request(hub, tmp_path, artifact):
    with pytest.raises(ConfigError, match="ORG/NAME"):
        check_push_access("no-namespace", token=TOKEN)
    with pytest.raises(ArtifactError, match="not a complete artifact"):
        push_artifact(tmp_path, "org/x", commit_message="wq", token=TOKEN)
    with pytest.raises(ConfigError, match="commit-message"):
        push_artifact(artifact, "org/x", commit_message=" ", token=TOKEN)
    assert hub.log == []


def test_resolve_token_prefers_the_argument_then_hf_token(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))          # no saved login
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="HF_TOKEN"):
        resolve_token(None)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert resolve_token(None) == TOKEN and resolve_token("explicit") == "explicit"
