import json

import pytest
import torch

from tests.factory import write_checkpoint
from wq_ops.errors import CheckpointError
from wq_ops.io.checkpoint import open_checkpoint, read_tensors, shard_header


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "m")


def test_open_local_reads_index_and_headers(ckpt_dir):
    ckpt = open_checkpoint(str(ckpt_dir))
    assert len(ckpt.shards) > 1
    assert ckpt.weight_map["model.layers.0.self_attn.q_proj.weight"] in ckpt.shards
    t = read_tensors(ckpt, ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"])
    assert t["model.layers.1.mlp.up_proj.weight"].shape == (256, 128)
    assert t["model.norm.weight"].dtype == torch.bfloat16


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_shard_is_named(ckpt_dir, tmp_path):
    d = _copy(ckpt_dir, tmp_path / "m")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: missing; the index puts"):
        open_checkpoint(str(d))


def test_truncated_shard_is_named(ckpt_dir, tmp_path):
    d = _copy(ckpt_dir, tmp_path / "m")
    victim = sorted(d.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        open_checkpoint(str(d))


def test_garbage_shard_is_named(ckpt_dir, tmp_path):
    d = _copy(ckpt_dir, tmp_path / "m")
    victim = sorted(d.glob("model-*.safetensors"))[0]
    victim.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=f"{victim.name}"):
        open_checkpoint(str(d))


def test_index_naming_a_tensor_the_shard_lacks(ckpt_dir, tmp_path):
    d = _copy(ckpt_dir, tmp_path / "m")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = sorted(set(index["weight_map"].values()))[0]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.layers.0.extra.weight"):
        open_checkpoint(str(d))


def test_single_file_checkpoint(tmp_path):
    d = write_checkpoint(tmp_path / "one", max_shard_size="100MB")
    assert not (d / "model.safetensors.index.json").exists()
    ckpt = open_checkpoint(str(d))
    assert set(ckpt.shards) == {"model.safetensors"}
    assert shard_header(d / "model.safetensors")["model.norm.weight"]["shape"] == [128]


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        open_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="convert to safetensors"):
        open_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="not a Hub repo id"):
        open_checkpoint("/no/such/dir")
