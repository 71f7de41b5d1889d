import json

import pytest
import torch

from tests.factory import write_checkpoint
from wq_ops.errors import CheckpointError
from wq_ops.io.checkpoint import open_checkpoint, read_config, read_tensors, shard_header


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


@pytest.mark.parametrize("shard", ["../../../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors",
                                   "..\\x.safetensors", "C:/x.safetensors"])
def test_index_naming_a_shard_outside_the_checkpoint_is_refused(ckpt_dir, tmp_path, shard):
    d = _copy(ckpt_dir, tmp_path / "m")
    index = d / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.norm.weight"] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="points outside the checkpoint directory"):
        open_checkpoint(str(d))


@pytest.mark.parametrize("text,message", [
    ('{"weight_map": ["a"]}', "not a safetensors index"),
    ("[1, 2]", "not a safetensors index"),
    ("{not json", "not a safetensors index"),
    ('{"weight_map": {"model.norm.weight": 3}}', "maps to 3, not a shard file name"),
])
def test_malformed_index_is_one_clear_error(ckpt_dir, tmp_path, text, message):
    d = _copy(ckpt_dir, tmp_path / "m")
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(str(d))


@pytest.mark.parametrize("header,message", [
    (b"[1, 2]", "its header is a JSON list"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}', "should span"),
    (b'{"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}', "malformed header entry"),
    (b'{"a": 7}', "malformed header entry"),
    (b"[" * 100000, "not a readable safetensors file"),
])
def test_malformed_safetensors_header_is_one_clear_error(tmp_path, header, message):
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(CheckpointError, match=message):
        shard_header(path)


@pytest.mark.parametrize("text,message", [("[1]", "found a list"), ("{oops", "not a readable JSON config")])
def test_malformed_config_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(CheckpointError, match=message):
        read_config(path)


def test_side_file_linked_from_outside_is_refused(ckpt_dir, tmp_path):
    d = _copy(ckpt_dir, tmp_path / "m")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for publishing")
    (d / "merges.txt").symlink_to(secret)
    with pytest.raises(CheckpointError, match="merges.txt: a symlink to .*secret.txt, outside the checkpoint"):
        open_checkpoint(str(d)).side_files()
    (d / "merges.txt").unlink()
    (d / "merges.txt").symlink_to(d / "tokenizer.json")        # a link inside the checkpoint is fine
    assert "merges.txt" in open_checkpoint(str(d)).side_files()
