"""A Hub checkpoint through the real huggingface_hub client, served by tests/hub_server.py."""

import json

import pytest
import torch

from tests.factory import write_checkpoint, write_text
from tests.hub_server import start_hub
from wq_ops.errors import CheckpointError
from wq_ops.io.checkpoint import open_checkpoint, read_tensors


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    server = start_hub()
    # What setting HF_ENDPOINT before import does: both the endpoint and the file-URL template.
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    template = server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield server
    server.server.shutdown()


def test_driver_reads_metadata_only_and_actors_fetch_their_shards(hub, tmp_path, caplog):
    src = write_checkpoint(tmp_path / "src", num_hidden_layers=4)
    sha = hub.add_repo_from_dir("org/tiny", src)
    ckpt = open_checkpoint("org/tiny", cache_dir=str(tmp_path / "cache"))
    assert ckpt.repo_id == "org/tiny" and ckpt.revision == sha and ckpt.endpoint == hub.endpoint
    fetched = {p.rsplit("/", 1)[-1] for p in hub.fetched()}
    assert "config.json" in fetched and "model.safetensors.index.json" in fetched
    assert not any(f.startswith("model-") for f in fetched)          # no weights read by the driver
    name = "model.layers.3.mlp.up_proj.weight"
    with caplog.at_level("INFO", logger="wq_ops.io.checkpoint"):
        t = read_tensors(ckpt, [name])[name]
        read_tensors(ckpt, [name])                  # cached now: fetched and logged once
    lines = [r.getMessage() for r in caplog.records]
    assert len([x for x in lines if x.startswith("downloading model-")]) == 1
    assert len([x for x in lines if x.startswith("downloaded model-") and " GiB in " in x]) == 1
    shard = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][name]
    assert {p.rsplit("/", 1)[-1] for p in hub.fetched()} - fetched == {shard}
    from safetensors import safe_open

    with safe_open(str(src / shard), "pt") as f:
        assert torch.equal(f.get_tensor(name), t)


def test_missing_repo_and_revision(hub, tmp_path):
    with pytest.raises(CheckpointError, match="no such Hub repo"):
        open_checkpoint("org/absent", cache_dir=str(tmp_path))
    hub.add_repo_from_dir("org/tiny", write_checkpoint(tmp_path / "src"))
    with pytest.raises(CheckpointError, match="no revision 'v9'"):
        open_checkpoint("org/tiny", revision="v9", cache_dir=str(tmp_path))


@pytest.mark.usefixtures("ray_session")
def test_job_from_the_hub_equals_the_job_from_disk(hub, tmp_path):
    from wq_ops.cluster.driver import run_job
    from wq_ops.config import JobConfig

    src = write_checkpoint(tmp_path / "src", num_hidden_layers=2)
    hub.add_repo_from_dir("org/tiny", src)
    calib = str(write_text(tmp_path / "c.txt"))
    common = {"samples": 4, "seq_len": 64, "group_size": 64, "calib": calib, "actors": 2}
    local = run_job(JobConfig.from_dict({**common, "model": str(src), "out": str(tmp_path / "a")}),
                    cache_dir=tmp_path / "cache")
    remote = run_job(JobConfig.from_dict({**common, "model": "org/tiny", "out": str(tmp_path / "b")}),
                     cache_dir=tmp_path / "cache")
    for shard in sorted(local.out_dir.glob("model-*.safetensors")):
        assert shard.read_bytes() == (remote.out_dir / shard.name).read_bytes()
    assert remote.report is not None and remote.report["source"]["revision"] == hub.repos["org/tiny"].sha


def test_an_unreachable_hub_is_one_clear_error(monkeypatch, tmp_path):
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:                 # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    with pytest.raises(CheckpointError, match=f"--model org/tiny: cannot reach the Hub at {endpoint}"):
        open_checkpoint("org/tiny", cache_dir=str(tmp_path / "cache"))


def test_more_actors_than_blocks_of_a_hub_model_start_no_actor(hub, tmp_path, monkeypatch):
    from wq_ops.cluster import ray_runtime
    from wq_ops.cluster.driver import run_job
    from wq_ops.config import JobConfig
    from wq_ops.errors import ConfigError

    src = write_checkpoint(tmp_path / "src", num_hidden_layers=4)
    hub.add_repo_from_dir("org/tiny", src)
    monkeypatch.setattr(ray_runtime.RayRuntime, "start", lambda self, job: None)

    def no_actors(self, job):
        raise AssertionError("actors were started")

    monkeypatch.setattr(ray_runtime.RayRuntime, "start_actors", no_actors)
    job = JobConfig.from_dict({"model": "org/tiny", "out": str(tmp_path / "o"), "actors": 10,
                               "calib": str(write_text(tmp_path / "c.txt")), "samples": 4, "seq_len": 32})
    with pytest.raises(ConfigError, match="actors=10: the model has only 4 decoder blocks"):
        run_job(job, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "o").exists()


def test_model_free_from_the_hub_equals_it_from_disk(hub, tmp_path, monkeypatch):
    """--model-free plans from the shards' headers read through the Hub (no download by the driver), and each
    task fetches its own shard: the artifact is the one made from the same files on disk."""
    from tests.factory import artifact_files
    from wq_ops.api import quantize

    monkeypatch.setenv("WQ_CACHE_DIR", str(tmp_path / "cache"))
    src = write_checkpoint(tmp_path / "src", num_hidden_layers=2)
    hub.add_repo_from_dir("org/tiny", src)
    options = {"model_free": True, "scheme": "FP8_DYNAMIC", "progress": False}
    quantize(str(src), out=str(tmp_path / "a"), **options)
    remote = quantize("org/tiny", out=str(tmp_path / "b"), **options)
    assert artifact_files(tmp_path / "a") == artifact_files(tmp_path / "b")
    assert remote.report["source"]["revision"] == hub.repos["org/tiny"].sha
