"""Resume after a crash: the blocks staged before it are replayed, not recomputed, and the artifact is
byte-identical to an uninterrupted run; a changed job or a damaged shard never reuses a staged block."""

import json
from pathlib import Path

import pytest

from tests.factory import artifact_files, write_checkpoint, write_text
from wq_ops.cluster.driver import run_job
from wq_ops.config import JobConfig

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    return write_checkpoint(d / "m", "llama", num_hidden_layers=4), write_text(d / "calib.txt")


def job(out: Path, llama, **options) -> JobConfig:
    model, calib = llama
    base = {"out": str(out), "model": str(model), "calib": str(calib), "samples": 6, "seq_len": 64,
            "micro_batch_samples": 4, "group_size": 64, "actors": 2}
    return JobConfig.from_dict({**base, **options})


def staged_blocks(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob(".wq-staging/*/block-*.safetensors"))


def resumed_blocks(out: Path) -> list[int]:
    report = json.loads((out / "wq_report.json").read_text())
    assert report["totals"]["blocks_resumed"] == sum(b["resumed"] for b in report["blocks"])
    return sorted(b["block"] for b in report["blocks"] if b["resumed"])


@pytest.mark.parametrize("options", [{}, {"method": "awq", "format": "gptq"}, {"propagation": "float"},
                                     {"propagation": "float", "span_mode": "block"},
                                     {"scheme": "FP8", "group_size": "channel"},
                                     {"scheme": "W8A8", "group_size": "channel"}],
                         ids=["gptq", "awq-gptq-format", "float-streamed", "float-block", "fp8-static", "w8a8"])
def test_crash_then_rerun_is_byte_identical(tmp_path, llama, options):
    whole = run_job(job(tmp_path / "whole", llama, **options), cache_dir=tmp_path).out_dir
    out = tmp_path / "crashed"
    with pytest.raises(Exception, match="injected crash"):
        run_job(job(out, llama, fail_after_blocks=1, **options), cache_dir=tmp_path)
    assert not (out / "model.safetensors.index.json").exists()
    assert staged_blocks(out)                        # what was finished before the crash is on disk
    run_job(job(out, llama, **options), cache_dir=tmp_path)
    assert resumed_blocks(out), "the rerun recomputed every block"
    assert artifact_files(out) == artifact_files(whole)
    assert not (out / ".wq-staging").exists()


def test_a_changed_job_does_not_reuse_staged_blocks(tmp_path, llama):
    out = tmp_path / "o"
    with pytest.raises(Exception, match="injected crash"):
        run_job(job(out, llama, fail_after_blocks=1), cache_dir=tmp_path)
    run_job(job(out, llama, damp=0.02), cache_dir=tmp_path)
    assert resumed_blocks(out) == []
    changed = run_job(job(tmp_path / "fresh", llama, damp=0.02), cache_dir=tmp_path).out_dir
    assert artifact_files(out) == artifact_files(changed)


def test_a_damaged_staged_shard_is_computed_again(tmp_path, llama):
    whole = run_job(job(tmp_path / "whole", llama), cache_dir=tmp_path).out_dir
    out = tmp_path / "o"
    with pytest.raises(Exception, match="injected crash"):
        run_job(job(out, llama, fail_after_blocks=1), cache_dir=tmp_path)
    staged = sorted(out.glob(".wq-staging/*/block-*.safetensors"))
    damaged = staged[0]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    run_job(job(out, llama), cache_dir=tmp_path)
    assert int(damaged.name[6:11]) not in resumed_blocks(out)
    assert artifact_files(out) == artifact_files(whole)


def test_a_source_changed_in_place_restarts_that_block_and_every_later_one(tmp_path, llama):
    """Same shard sizes, headers and mtimes, other weights in block 2: blocks 0 and 1 resume, 2 and 3 are
    computed from the new weights, and the artifact is the new model's."""
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    model, calib = llama
    source = shutil.copytree(model, tmp_path / "m")
    out = tmp_path / "o"
    with pytest.raises(Exception, match="injected crash"):
        run_job(job(out, (source, calib), fail_after_blocks=3, actors=1), cache_dir=tmp_path)
    assert staged_blocks(out)[:3] == [f"block-{b:05d}.safetensors" for b in range(3)]
    name = "model.layers.2.mlp.down_proj.weight"
    shard = source / json.loads((source / "model.safetensors.index.json").read_text())["weight_map"][name]
    st = shard.stat()
    tensors = load_file(shard)
    tensors[name] = tensors[name].flip(0).contiguous()        # same dtype and shape: same header and size
    save_file(tensors, str(shard), metadata={"format": "pt"})
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_size == st.st_size
    run_job(job(out, (source, calib), actors=1), cache_dir=tmp_path)
    assert resumed_blocks(out) == [0, 1]
    fresh = run_job(job(tmp_path / "fresh", (source, calib), actors=1), cache_dir=tmp_path).out_dir
    assert artifact_files(out) == artifact_files(fresh)
