"""Data safety of a job's output: the source is never written, a failed or concurrent job never damages an
artifact, resume never reuses a block computed from other weights, and no secret is recorded."""

import json
import shutil
from pathlib import Path

import pytest

import jobs.quantize as cli
from tests.factory import fail_index_writes, write_checkpoint, write_text


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety")
    sharded = write_checkpoint(d / "sharded", "llama", num_hidden_layers=2)
    single = write_checkpoint(d / "single", "llama", num_hidden_layers=2, max_shard_size="100MB")
    assert (single / "model.safetensors").is_file() and not (single / "model.safetensors.index.json").exists()
    return sharded, single, write_text(d / "calib.txt")


def _args(model: Path, out: Path, calib: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--out", str(out), "--calib", str(calib), "--samples", "4", "--seq-len", "32",
            "--group-size", "64", *extra]


def _contents(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` but wq's own working files (staging, lease)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and not str(p.relative_to(directory)).startswith(".wq-")}


@pytest.mark.parametrize("where", ["itself", "inside", "parent", "symlink"])
@pytest.mark.parametrize("which", ["sharded", "single"])
def test_out_that_is_inside_or_contains_the_input_is_refused(tmp_path, sources, capsys, monkeypatch, where, which):
    monkeypatch.setenv("WQ_CACHE_DIR", str(tmp_path / "cache"))
    source = shutil.copytree(sources[0] if which == "sharded" else sources[1], tmp_path / "src" / "model")
    before = _contents(tmp_path / "src")
    out = {"itself": source, "inside": source / "quantized", "parent": source.parent,
           "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        out.symlink_to(source)
    for extra in ([], ["--overwrite"]):
        assert cli.main(_args(source, out, sources[2], *extra)) == 2
        err = capsys.readouterr().err
        assert err.startswith("wq: error: --out ") and "would overwrite or delete the source" in err, err
        assert _contents(tmp_path / "src") == before


def test_a_hub_token_is_never_recorded(tmp_path, sources, monkeypatch):
    monkeypatch.setenv("WQ_CACHE_DIR", str(tmp_path / "cache"))
    token = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456"
    out = tmp_path / "o"
    assert cli.main(_args(sources[0], out, sources[2], "--commit-message", f"requantized, token {token}")) == 0
    written = b"".join(_contents(out).values())
    assert token.encode() not in written
    report = json.loads((out / "wq_report.json").read_text())
    assert report["job"]["commit_message"] == "requantized, token hf_***"
    assert "--commit-message 'requantized, token hf_***'" in (out / "README.md").read_text()


def test_a_second_job_into_the_same_out_stops_naming_the_first(tmp_path, sources, capsys, monkeypatch):
    from wq_ops.io.lease import OutputLease

    monkeypatch.setenv("WQ_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "o"
    first = OutputLease.acquire(out)                  # a job running elsewhere holds --out
    try:
        assert cli.main(_args(sources[0], out, sources[2])) == 2
        assert "another wq job is writing it (host" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [".wq-lease.json"]
    finally:
        first.release()
    assert cli.main(_args(sources[0], out, sources[2])) == 0
    assert not (out / ".wq-lease.json").exists()      # released at the end


def test_overwrite_replaces_an_artifact_and_a_failed_one_keeps_it(tmp_path, sources, capsys, monkeypatch):
    monkeypatch.setenv("WQ_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "o"
    assert cli.main(_args(sources[0], out, sources[2], "--bits", "8")) == 0
    before = _contents(out)
    undo = fail_index_writes(monkeypatch)
    assert cli.main(_args(sources[0], out, sources[2], "--overwrite")) == 2
    assert "could not write the artifact in" in capsys.readouterr().err
    assert _contents(out) == before                    # the old artifact, whole
    undo()
    assert cli.main(_args(sources[0], out, sources[2], "--overwrite")) == 0
    report = json.loads((out / "wq_report.json").read_text())
    assert report["job"]["bits"] == 4 and report["totals"]["blocks_resumed"] == 2   # the failed run's blocks
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_calibration_too_short_or_not_text_is_refused_before_work(tmp_path, sources, capsys, monkeypatch):
    monkeypatch.setenv("WQ_CACHE_DIR", str(tmp_path / "cache"))
    short = write_text(tmp_path / "short.txt", n_chars=200)
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"\x00" * 20000)
    out = tmp_path / "o"
    flags = ["--samples", "8", "--seq-len", "128"]
    assert cli.main([*_args(sources[0], out, short), *flags]) == 2
    assert "are distinct text" in capsys.readouterr().err
    assert cli.main([*_args(sources[0], out, nul), *flags]) == 2
    assert "control characters" in capsys.readouterr().err
    assert not out.exists()                            # refused before anything was written
    assert cli.main([*_args(sources[0], out, short), *flags, "--calib-allow-repeats"]) == 0


def test_a_checkpoint_without_a_tokenizer_says_so_and_takes_pre_tokenized_calibration(tmp_path, sources, capsys,
                                                                                          monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("WQ_CACHE_DIR", str(tmp_path / "cache"))
    model = shutil.copytree(sources[0], tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    assert cli.main(_args(model, tmp_path / "o", sources[2])) == 2
    assert "the checkpoint has no tokenizer" in capsys.readouterr().err
    ids = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"input_ids": [[(7 * i + j) % 200 for j in range(32)] for i in range(4)]}), ids)
    assert cli.main(_args(model, tmp_path / "o", ids)) == 0


@pytest.mark.parametrize("tensor", ["model.layers.1.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight"])
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_nan_in_the_weights_names_the_tensor(tmp_path, sources, capsys, monkeypatch, tensor, method):
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("WQ_CACHE_DIR", str(tmp_path / "cache"))
    model = shutil.copytree(sources[0], tmp_path / "m")
    shard = model / json.loads((model / "model.safetensors.index.json").read_text())["weight_map"][tensor]
    tensors = load_file(shard)
    tensors[tensor].view(-1)[3] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    out = tmp_path / "o"
    assert cli.main(_args(model, out, sources[2], "--method", method)) == 2
    err = capsys.readouterr().err
    assert f"tensor {tensor} holds 1 NaN and 0 Inf values: the checkpoint is corrupt" in err, err
    assert not (out / "model.safetensors.index.json").exists()


def test_shards_stored_in_another_dtype_than_the_config_says_are_refused_before_work(tmp_path, sources, capsys,
                                                                                      monkeypatch):
    import torch
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("WQ_CACHE_DIR", str(tmp_path / "cache"))
    model = shutil.copytree(sources[0], tmp_path / "m")
    for shard in model.glob("model-*.safetensors"):
        save_file({k: v.to(torch.float16) for k, v in load_file(shard).items()}, str(shard), metadata={"format": "pt"})
    assert cli.main(_args(model, tmp_path / "o", sources[2])) == 2
    assert ("config.json gives dtype bfloat16 but model.embed_tokens.weight is stored as float16"
            in capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_more_actors_than_blocks_is_refused_before_any_actor_starts(tmp_path, sources, capsys, monkeypatch):
    from wq_ops.cluster import ray_runtime

    def no_start(*args, **kwargs):
        raise AssertionError("actors were started")

    monkeypatch.setattr(ray_runtime.RayRuntime, "start", no_start)
    assert cli.main(_args(sources[0], tmp_path / "o", sources[2], "--actors", "100")) == 2
    assert "actors=100: the model has only 2 decoder blocks; use at most 2" in capsys.readouterr().err


def test_a_full_disk_while_staging_names_the_place_and_keeps_what_was_staged(tmp_path, sources, capsys,
                                                                             monkeypatch):
    from wq_ops.cluster import staging

    monkeypatch.setenv("WQ_CACHE_DIR", str(tmp_path / "cache"))
    real, written = staging.save_tensors_atomic, []

    def fills_up(path, tensors, metadata=None):
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        real(path, tensors, metadata)

    monkeypatch.setattr(staging, "save_tensors_atomic", fills_up)
    out = tmp_path / "o"
    assert cli.main(_args(sources[0], out, sources[2], "--log-level", "debug")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("wq: error: cannot stage ") and "No space left on device" in err
    assert "free space there or choose another --out" in err and str(out / ".wq-staging") in err
    assert written and written[0].is_file()            # the block staged before is kept for the rerun
    monkeypatch.setattr(staging, "save_tensors_atomic", real)
    assert cli.main(_args(sources[0], out, sources[2])) == 0


def test_yaml_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "job.yaml"
    bad.write_text("model: [unclosed\n")
    assert cli.main(["--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith(f"wq: error: {bad}: not valid YAML")
    bad.write_text("- a\n- b\n")
    assert cli.main(["--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}: expected a mapping" in capsys.readouterr().err
