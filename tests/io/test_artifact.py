import json

import pytest
import torch

from wq_ops.errors import ArtifactError
from wq_ops.io.artifact import ArtifactLayout, check_output_dir, finalize_artifact, save_tensors_atomic, write_atomic


def test_write_atomic_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_shard_names_do_not_depend_on_actors(tmp_path):
    layout = ArtifactLayout(out_dir=tmp_path, n_blocks=3, fingerprint="abc")
    assert [layout.shard_name(i) for i in range(5)] == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    assert layout.block_shard_name(0) == "model-00002-of-00005.safetensors"


def test_finalize_writes_index_last_and_cleans_up(tmp_path):
    layout = ArtifactLayout(out_dir=tmp_path, n_blocks=1, fingerprint="fp")
    layout.staging.mkdir(parents=True)
    save_tensors_atomic(layout.staged_block(0), {"a": torch.ones(2)})
    (tmp_path / "model-00009-of-00009.safetensors").write_bytes(b"stale")     # from an older artifact
    index = finalize_artifact(layout, shards={layout.staged_block(0): "model-00001-of-00001.safetensors"},
                              weight_map={"a": "model-00001-of-00001.safetensors"}, total_size=8,
                              files={"config.json": b"{}"})
    assert json.loads(index.read_text())["weight_map"] == {"a": "model-00001-of-00001.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model-00001-of-00001.safetensors",
                                                         "model.safetensors.index.json"]


def test_finalize_without_a_staged_shard_writes_no_index(tmp_path):
    layout = ArtifactLayout(out_dir=tmp_path, n_blocks=1, fingerprint="fp")
    with pytest.raises(ArtifactError, match="is missing"):
        finalize_artifact(layout, shards={layout.staged_block(0): "model-00001-of-00001.safetensors"},
                          weight_map={"a": "model-00001-of-00001.safetensors"}, total_size=8, files={})
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_output_dir_checks(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ArtifactError, match="already holds a complete artifact"):
        check_output_dir(tmp_path, overwrite=False)
    check_output_dir(tmp_path, overwrite=True)
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ArtifactError, match="not a directory"):
        check_output_dir(f, overwrite=False)
