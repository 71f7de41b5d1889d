"""Float propagation solves block i on a side stream (a helper thread) while block i + 1 calibrates: the
artifact's bytes must not depend on it. On CPU the overlap is forced on (it is a GPU default); the GPU test
compares it with the overlap forced off."""

import pytest
import torch

from tests.factory import write_checkpoint, write_text
from wq_ops.cluster import actor as actor_module
from wq_ops.cluster import spans as spans_module
from wq_ops.cluster.driver import run_job
from wq_ops.config import JobConfig


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    return write_checkpoint(d / "m", "llama", num_hidden_layers=4), write_text(d / "calib.txt")


def _overlap(monkeypatch, on: bool) -> None:
    init = actor_module.BlockActor.__init__

    def forced(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.overlap_solve = on

    monkeypatch.setattr(actor_module.BlockActor, "__init__", forced)


def _artifact(tmp_path, llama, name, **options) -> dict[str, bytes]:
    model, calib = llama
    base = {"out": str(tmp_path / name), "model": str(model), "calib": str(calib), "samples": 6, "seq_len": 64,
            "micro_batch_samples": 4, "propagation": "float", "runtime": "local"}
    result = run_job(JobConfig.from_dict({**base, **options}), cache_dir=tmp_path / "cache")
    return {p.name: p.read_bytes() for p in sorted(result.out_dir.glob("*.safetensors"))}


def _solver_threads(monkeypatch) -> list[str]:
    """Names of the threads that solved blocks."""
    import threading

    seen: list[str] = []
    solve = spans_module.solve_block_

    def recording(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return solve(*args, **kwargs)

    monkeypatch.setattr(spans_module, "solve_block_", recording)
    return seen


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_overlapped_solves_write_the_same_bytes(tmp_path, llama, monkeypatch, method):
    _overlap(monkeypatch, False)
    plain = _artifact(tmp_path, llama, "plain", method=method)
    _overlap(monkeypatch, True)
    threads = _solver_threads(monkeypatch)
    overlapped = _artifact(tmp_path, llama, "overlapped", method=method)
    assert overlapped == plain and len(plain) == 6
    assert len(threads) == 4 and all(t.startswith("wq-solve") for t in threads)   # the overlap really ran


def test_a_failed_solve_stops_the_job_with_its_cause(tmp_path, llama, monkeypatch):
    _overlap(monkeypatch, True)

    def broken(*args, **kwargs):
        raise ValueError("solve broke on purpose")

    monkeypatch.setattr(spans_module, "solve_block_", broken)
    with pytest.raises(ValueError, match="solve broke on purpose"):
        _artifact(tmp_path, llama, "broken")
    assert not (tmp_path / "broken" / "model.safetensors.index.json").exists()


@pytest.mark.gpu
def test_overlap_on_the_gpu_writes_the_same_bytes(tmp_path, llama, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _overlap(monkeypatch, False)
    plain = _artifact(tmp_path, llama, "plain", gpus_per_actor=1, samples=16)
    monkeypatch.undo()
    threads = _solver_threads(monkeypatch)
    overlapped = _artifact(tmp_path, llama, "overlapped", gpus_per_actor=1, samples=16)
    assert overlapped == plain
    assert threads and all(t.startswith("wq-solve") for t in threads)


@pytest.mark.gpu
def test_gpu_job_reports_a_device_peak_within_its_plan(tmp_path, llama):
    """The report puts each actor's measured device peak (this job's only) beside the plan's estimate, and
    the estimate bounds it, up to the libraries' workspaces (cuBLAS keeps some per stream), which the
    plan leaves to its 10% headroom and which dwarf a tiny model's tensors."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.empty(256 << 20, dtype=torch.uint8, device="cuda")          # an earlier peak the job must not report
    model, calib = llama
    options = {"out": str(tmp_path / "out"), "model": str(model), "calib": str(calib), "samples": 6,
               "seq_len": 64, "micro_batch_samples": 4, "runtime": "local", "gpus_per_actor": 1}
    result = run_job(JobConfig.from_dict(options), cache_dir=tmp_path / "cache")
    [memory] = result.report["memory"]
    assert 0 < memory["allocated_bytes"] <= memory["reserved_bytes"]
    assert memory["allocated_bytes"] < 256 << 20
    assert memory["allocated_bytes"] <= memory["planned_bytes"] + (128 << 20)


@pytest.mark.gpu
def test_native_modeling_on_the_gpu_writes_transformers_bytes(tmp_path, llama):
    """The GPU job with wq's native Llama modules (the default for this checkpoint) and with transformers'
    classes: the same artifact."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    native = _artifact(tmp_path, llama, "native", gpus_per_actor=1, samples=16, propagation="quantized")
    theirs = _artifact(tmp_path, llama, "transformers", gpus_per_actor=1, samples=16, propagation="quantized",
                       modeling="transformers")
    assert native == theirs
