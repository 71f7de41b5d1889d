"""Where the actors run: a one-actor job in the driver's process gives the same bytes as on Ray, and the
choice, the refusals and the process state it leaves are as documented."""

import json

import pytest
import torch

from tests.factory import write_checkpoint, write_text
from wq_ops.cluster.driver import run_job
from wq_ops.cluster.local_runtime import LocalRuntime
from wq_ops.cluster.ray_runtime import RayRuntime
from wq_ops.cluster.runtime_choice import choose_runtime
from wq_ops.config import JobConfig, RunConfig
from wq_ops.errors import ConfigError, ResourceError

pytestmark = pytest.mark.usefixtures("ray_session")


def job(tmp_path, out, **options) -> JobConfig:
    base = {"out": str(tmp_path / out), "samples": 6, "seq_len": 64, "micro_batch_samples": 4}
    return JobConfig.from_dict({**base, **options})


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    return write_checkpoint(d / "m", "llama", num_hidden_layers=3), write_text(d / "calib.txt")


def test_auto_runs_one_actor_without_an_address_in_process():
    assert isinstance(choose_runtime(RunConfig()), LocalRuntime)
    assert isinstance(choose_runtime(RunConfig(actors=2)), RayRuntime)
    assert isinstance(choose_runtime(RunConfig(address="ray://head:10001")), RayRuntime)
    assert isinstance(choose_runtime(RunConfig(runtime="ray")), RayRuntime)


@pytest.mark.parametrize("run", [dict(actors=2), dict(address="ray://head:10001")])
def test_local_runtime_refuses_what_it_cannot_run(run):
    with pytest.raises(ConfigError, match="runtime=local runs exactly one actor"):
        choose_runtime(RunConfig(runtime="local", **run))


def test_unknown_runtime_is_refused():
    with pytest.raises(ConfigError, match="runtime"):
        RunConfig(runtime="kubernetes")


@pytest.mark.parametrize("propagation", ["quantized", "float"])
def test_in_process_and_ray_write_the_same_bytes(tmp_path, llama, propagation):
    model, calib = llama
    threads = torch.get_num_threads()
    outs = {}
    for runtime in ("local", "ray"):
        result = run_job(job(tmp_path, runtime, model=str(model), calib=str(calib), runtime=runtime,
                             propagation=propagation), cache_dir=tmp_path / "cache")
        report = json.loads((result.out_dir / "wq_report.json").read_text())
        assert report["startup"]["runtime"] == runtime
        outs[runtime] = {p.name: p.read_bytes() for p in sorted(result.out_dir.glob("*.safetensors"))}
        assert torch.get_num_threads() == threads     # the in-process actor gives the thread count back
    assert outs["local"] == outs["ray"] and len(outs["local"]) == 5


def test_in_process_actor_without_a_gpu_is_refused_before_work(tmp_path, llama):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    model, calib = llama
    with pytest.raises(ResourceError, match="needs a GPU and torch sees 0"):
        run_job(job(tmp_path, "o", model=str(model), calib=str(calib), gpus_per_actor=1, backend="reference"),
                cache_dir=tmp_path / "cache")
    assert not (tmp_path / "o").exists()


def test_in_process_failure_stops_the_job_with_its_cause(tmp_path, llama):
    """A crash inside a block (the fault-injection hook) reaches the caller as itself; staged blocks stay."""
    model, calib = llama
    with pytest.raises(RuntimeError, match="fail_after_blocks=2: injected crash"):
        run_job(job(tmp_path, "o", model=str(model), calib=str(calib), fail_after_blocks=2),
                cache_dir=tmp_path / "cache")
    staged = list((tmp_path / "o").glob(".wq-staging/*/block-*.safetensors"))
    assert len(staged) >= 2          # the next block may already be staged: it is whole, and resume uses it
    result = run_job(job(tmp_path, "o", model=str(model), calib=str(calib)), cache_dir=tmp_path / "cache")
    report = json.loads((result.out_dir / "wq_report.json").read_text())
    assert sum(r.get("resumed", False) for r in report["blocks"]) >= 2


def test_in_process_call_that_fails_stops_the_job_with_its_own_cause(tmp_path, llama, monkeypatch):
    """embed's result is never fetched by the driver: its failure must still stop the job, named."""
    from wq_ops.cluster.actor import BlockActor

    def broken(self, spec, ids):
        raise OSError("embedding table unreadable on purpose")

    monkeypatch.setattr(BlockActor, "embed", broken)
    threads = torch.get_num_threads()
    model, calib = llama
    with pytest.raises(OSError, match="unreadable on purpose"):
        run_job(job(tmp_path, "o", model=str(model), calib=str(calib)), cache_dir=tmp_path / "cache")
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("propagation", ["quantized", "float"])
def test_the_in_process_actor_runs_every_call_on_its_own_thread(tmp_path, llama, monkeypatch, propagation):
    """As a Ray actor does: its start, its calls and its blocks on one thread (the libraries' per-thread
    caches, such as cuDNN's attention graphs, that its warm-up built are then there for its blocks), and
    that thread ends with the job."""
    import threading

    from wq_ops.cluster.actor import BlockActor
    from wq_ops.cluster.spans import SpanRunner

    seen: dict[str, set[int]] = {}
    threads_before = set(threading.enumerate())

    def recorded(cls, name):
        original = getattr(cls, name)

        def method(self, *args, **kwargs):
            seen.setdefault(name, set()).add(threading.get_ident())
            return original(self, *args, **kwargs)
        monkeypatch.setattr(cls, name, method)

    for name in ("__init__", "embed", "stage_head", "forward_span", "outer_records", "close"):
        recorded(BlockActor, name)
    for name in ("compute_block", "calibrate_block", "solve_block"):
        recorded(SpanRunner, name)
    model, calib = llama
    run_job(job(tmp_path, "o", model=str(model), calib=str(calib), propagation=propagation),
            cache_dir=tmp_path / "cache")
    assert {"__init__", "embed", "stage_head", "outer_records", "close"} <= set(seen)
    assert any(name in seen for name in ("compute_block", "calibrate_block", "solve_block"))
    assert len(set().union(*seen.values())) == 1, seen
    assert threading.get_ident() not in set().union(*seen.values())
    assert not [t for t in threading.enumerate() if t not in threads_before and t.name.startswith("wq-actor")]
