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


def _staged(out, fingerprint, value):
    layout = ArtifactLayout(out_dir=out, n_blocks=1, fingerprint=fingerprint)
    layout.staging.mkdir(parents=True)
    save_tensors_atomic(layout.staged_block(0), {"a": torch.full((2,), value)})
    return layout


def _finalize(layout, config=b"{}"):
    return finalize_artifact(layout, shards={layout.staged_block(0): "model-00001-of-00001.safetensors"},
                             weight_map={"a": "model-00001-of-00001.safetensors"}, total_size=8,
                             files={"config.json": config})


def _files(d):
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


@pytest.mark.parametrize("exchange", ["renameat2", "two renames"])
def test_an_overwrite_replaces_the_whole_artifact(tmp_path, monkeypatch, exchange):
    import wq_ops.io.artifact as artifact

    if exchange == "two renames":
        monkeypatch.setattr(artifact.ctypes, "CDLL", lambda *a, **k: (_ for _ in ()).throw(OSError("no libc")))
    out = tmp_path / "out"
    _finalize(_staged(out, "old", 1.0), b'{"old": 1}')
    _staged(out, "other", 3.0)                            # another job's staging: kept
    _finalize(_staged(out, "new", 2.0), b'{"new": 1}')
    assert json.loads((out / "config.json").read_text()) == {"new": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]          # nothing left beside it
    assert (out / ".wq-staging" / "other" / "block-00000.safetensors").is_file()


def test_a_failed_overwrite_leaves_the_old_artifact_whole_and_the_staged_shards(tmp_path, monkeypatch):
    from tests.factory import fail_index_writes

    out = tmp_path / "out"
    _finalize(_staged(out, "old", 1.0), b'{"old": 1}')
    before = _files(out)
    layout = _staged(out, "new", 2.0)
    undo = fail_index_writes(monkeypatch)
    with pytest.raises(ArtifactError, match="No space left on device.*the artifact there is unchanged, and the "
                                            "staged blocks are kept"):
        _finalize(layout, b'{"new": 1}')
    assert _files(out) == before                          # readers still see the old artifact, complete
    assert layout.staged_block(0).is_file()               # a rerun resumes from the staged shard
    undo()
    from wq_ops.io.artifact import remove_leftovers

    remove_leftovers(out)                                 # what the next job does under its lease
    _finalize(layout, b'{"new": 1}')
    assert json.loads((out / "config.json").read_text()) == {"new": 1}


def test_a_crash_between_the_two_renames_restores_the_old_artifact(tmp_path):
    from wq_ops.io.artifact import restore_set_aside

    out = tmp_path / "out"
    _finalize(_staged(out, "old", 1.0), b'{"old": 1}')
    before = _files(out)
    out.rename(tmp_path / ".out.wq-old")                  # set aside; the new one never moved in
    with pytest.raises(ArtifactError, match="already holds a complete artifact"):
        check_output_dir(out, overwrite=False)
    restore_set_aside(out)
    assert _files(out) == before


def test_no_room_for_the_artifact_is_refused_with_the_numbers(tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    from wq_ops.io.artifact import check_room

    layout = _staged(tmp_path / "out", "fp", 1.0)
    staged = layout.staged_block(0).stat().st_size
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: usage(10 * 2**30, 0, 2**30))
    assert "needs about 1.00 GiB more" in check_room(layout, 2**30 + staged)   # the staged shard counts
    with pytest.raises(ArtifactError, match=r"needs about 2.00 GiB more; 1.00 GiB free at .*free space there"):
        check_room(layout, 2 * 2**30 + staged)


def test_an_overwrite_through_a_symlinked_out_replaces_the_directory_it_points_at(tmp_path):
    real = tmp_path / "volume" / "model"
    real.parent.mkdir()
    link = tmp_path / "out"
    link.symlink_to(real, target_is_directory=True)
    _finalize(_staged(real, "old", 1.0), b'{"old": 1}')
    _finalize(_staged(link, "new", 2.0), b'{"new": 1}')
    assert link.is_symlink() and json.loads((link / "config.json").read_text()) == {"new": 1}
    assert sorted(p.name for p in real.parent.iterdir()) == ["model"]
