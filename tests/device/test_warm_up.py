"""The actor's start-up warm-ups: the job's shapes read from a local config.json without transformers, a
warm-up that runs them on the GPU and never fails the job, and the block's host copies queued without a
wait, whose staged bytes must equal waited copies'."""

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.factory import gpu_job_shards, write_checkpoint, write_text
from wq_ops.cluster import actor as actor_module
from wq_ops.cluster import staging as staging_module
from wq_ops.cluster.driver import run_job
from wq_ops.config import Backend, JobConfig, Method
from wq_ops.device import warm_up as warm_up_module
from wq_ops.device.warm_up import (
    JobShapes,
    job_needs_transformers,
    job_shapes,
    warm_up_device,
    warm_up_libraries,
    warm_up_quantizers,
    warm_up_shapes,
)


def _job(model, **options) -> JobConfig:
    return JobConfig.from_dict({"out": "o", "model": model, "calib": "wq:bundled",
                                "samples": 6, "seq_len": 64, "micro_batch_samples": 4,
                                **options})


def _config(tmp_path, **fields):
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(fields))
    return str(d)


def test_shapes_come_from_a_local_config_json(tmp_path):
    model = _config(tmp_path, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                    num_key_value_heads=8, dtype="bfloat16")
    shapes = job_shapes(_job(model, method="gptq"))
    assert shapes == JobShapes(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, seq_len=64,
                               micro_batch=4, dtype=torch.bfloat16, quant=shapes.quant)
    assert shapes.quant.method is Method.GPTQ
    # An explicit head_dim wins; missing KV heads mean plain multi-head attention; fewer samples than a
    # micro-batch make the micro-batch.
    model = _config(tmp_path, hidden_size=2048, intermediate_size=8192, num_attention_heads=16, head_dim=64,
                    torch_dtype="float16")
    shapes = job_shapes(_job(model, samples=3))
    assert (shapes.head_dim, shapes.kv_heads, shapes.micro_batch, shapes.dtype) == (64, 16, 3, torch.float16)


def test_shapes_take_the_families_defaults(tmp_path):
    """A Qwen3 config.json without num_key_value_heads or head_dim: its class's 32 and 128, not Llama's."""
    model = _config(tmp_path, architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=2048,
                    intermediate_size=6144, num_attention_heads=32, dtype="bfloat16")
    shapes = job_shapes(_job(model))
    assert (shapes.heads, shapes.kv_heads, shapes.head_dim) == (32, 32, 128)


@pytest.mark.parametrize("fields", [{}, {"hidden_size": 64, "num_attention_heads": 4},
                                    {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 0},
                                    {"hidden_size": "x", "intermediate_size": 128, "num_attention_heads": 4}])
def test_shapes_are_none_when_the_config_does_not_give_them(tmp_path, fields):
    assert job_shapes(_job(_config(tmp_path, **fields))) is None


def test_shapes_are_none_for_numbers_out_of_range(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text('{"hidden_size": 1e400, "intermediate_size": 128, "num_attention_heads": 4}')
    assert job_shapes(_job(str(d))) is None
    (d / "config.json").write_text("[" * 100000 + "]" * 100000)
    assert job_shapes(_job(str(d))) is None


def test_shapes_are_none_without_a_local_config(tmp_path):
    assert job_shapes(_job(None)) is None                         # the embedded default
    assert job_shapes(_job("some-org/some-model")) is None        # a Hub id, not fetched yet
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    assert job_shapes(_job(str(tmp_path / "m"))) is None


@pytest.mark.parametrize("arch,modeling,preload", [("llama", "auto", False), ("llama", "transformers", True),
                                                     ("mistral", "auto", True)])
def test_shapes_reach_the_in_process_actor(tmp_path, monkeypatch, arch, modeling, preload):
    """The runtime hands the shapes to the actor (on a CPU actor nothing runs them), and tells it to import
    transformers while it starts only where the job's blocks will run transformers' classes."""
    seen = []
    init = actor_module.BlockActor.__init__

    def recording(self, run, backend, shapes=None, *, preload_transformers=True):
        seen.append((shapes, preload_transformers))
        init(self, run, backend, shapes, preload_transformers=preload_transformers)

    monkeypatch.setattr(actor_module.BlockActor, "__init__", recording)
    model = write_checkpoint(tmp_path / "m", arch, num_hidden_layers=2)
    options = {"out": str(tmp_path / "out"), "model": str(model), "calib": str(write_text(tmp_path / "c.txt")),
               "samples": 4, "seq_len": 32, "micro_batch_samples": 4, "runtime": "local", "modeling": modeling}
    run_job(JobConfig.from_dict(options), cache_dir=tmp_path / "cache")
    [(shapes, preloaded)] = seen
    assert shapes is not None and shapes.seq_len == 32 and shapes.hidden == json.loads(
        (model / "config.json").read_text())["hidden_size"]
    assert preloaded is preload


def test_without_a_local_config_the_actor_imports_transformers(tmp_path):
    """A Hub model not yet fetched, or the bundled default: the guess is transformers (time only)."""
    assert job_needs_transformers(JobConfig.from_dict({"out": str(tmp_path / "o"), "model": "org/name",
                                                       "calib": "wq:bundled"}))
    assert job_needs_transformers(JobConfig.from_dict({"out": str(tmp_path / "o")}))


class _Steps:
    """Stand-ins for the three warm-ups that record their calls and threads, and wait for one another at
    a barrier: run one after the other, the first would wait out the barrier's timeout."""

    def __init__(self, monkeypatch, parties: int, fail: tuple[str, ...] = ()) -> None:
        self.calls: dict[str, tuple] = {}
        self.threads: dict[str, int] = {}
        self.finished: list[str] = []
        self.devices: list[int] = []
        self.barrier = threading.Barrier(parties, timeout=10)
        for name in ("warm_up_libraries", "warm_up_quantizers", "warm_up_shapes"):
            monkeypatch.setattr(warm_up_module, name, self._step(name, fail))

        @contextlib.contextmanager
        def device_guard(index):
            self.devices.append(index)
            yield

        monkeypatch.setattr(torch.cuda, "device", device_guard)
        monkeypatch.setattr(warm_up_module, "_load_linalg", self._load_linalg)

    def _load_linalg(self, device) -> None:
        assert not self.calls                   # before any warm-up starts
        self.linalg_loaded = device

    def _step(self, name: str, fail: tuple[str, ...]):
        def step(*args, **kwargs):
            self.calls[name] = args + tuple(kwargs.values())
            self.threads[name] = threading.get_ident()
            self.barrier.wait()                 # BrokenBarrierError unless every step runs at once
            if name in fail:
                raise RuntimeError(f"{name} broke")
            time.sleep(0.05)
            self.finished.append(name)
            return True
        return step


def test_the_warm_ups_run_side_by_side_on_the_actors_device(monkeypatch):
    """The shapes' warm-up on the calling thread (the one that computes the blocks: cuDNN's attention
    graphs are kept per thread), the other two on helper threads, switched to the actor's device."""
    steps = _Steps(monkeypatch, parties=3)
    device, shapes = torch.device("cuda", 3), object()
    warm_up_device(device, Backend.CUDA, shapes)
    assert steps.calls == {"warm_up_libraries": (device,), "warm_up_quantizers": (device, shapes),
                           "warm_up_shapes": (device, shapes)}
    assert sorted(steps.finished) == sorted(steps.calls) and steps.devices == [3, 3]
    assert steps.linalg_loaded == device
    assert steps.threads["warm_up_shapes"] == threading.get_ident()
    assert len({steps.threads["warm_up_libraries"], steps.threads["warm_up_quantizers"],
                threading.get_ident()}) == 3


def test_only_the_warm_ups_a_job_needs_run(monkeypatch):
    """No kernels of ours on the reference backend; no shapes when the job's are unknown."""
    steps = _Steps(monkeypatch, parties=1)
    warm_up_device(torch.device("cuda", 0), Backend.REFERENCE, None)
    assert list(steps.calls) == ["warm_up_libraries"]
    steps = _Steps(monkeypatch, parties=2)
    warm_up_device(torch.device("cuda", 0), Backend.REFERENCE, object())
    assert sorted(steps.calls) == ["warm_up_libraries", "warm_up_shapes"]


@pytest.mark.parametrize("fail,raised", [(("warm_up_quantizers",), "warm_up_quantizers"),
                                         (("warm_up_shapes",), "warm_up_shapes"),
                                         (("warm_up_shapes", "warm_up_libraries"), "warm_up_libraries")])
def test_a_failed_warm_up_is_raised_once_the_others_have_finished(monkeypatch, caplog, fail, raised):
    """None is left running on the device when the actor's start fails; of two errors, the libraries'
    is raised and the other logged."""
    steps = _Steps(monkeypatch, parties=3, fail=fail)
    with pytest.raises(RuntimeError, match=f"{raised} broke"):
        warm_up_device(torch.device("cuda", 0), Backend.CUDA, object())
    assert sorted(steps.finished) == sorted(set(steps.calls) - set(fail))
    for other in set(fail) - {raised}:
        assert f"GPU warm-up also failed: RuntimeError('{other} broke')" in caplog.text


@pytest.mark.parametrize("method,sym,expected", [
    ("gptq", True, [("quantize_gptq", True), ("quantize_rtn", True), ("encode_linear", True)]),
    ("awq", False, [("search_clip", False), ("search_scales", False), ("quantize_rtn", False),
                    ("encode_linear", False)]),
    ("rtn", True, [("quantize_rtn", True), ("encode_linear", True)]),
    (None, None, [(f, sym) for sym in (True, False) for f in ("quantize_gptq", "search_clip", "search_scales",
                                                                 "quantize_rtn", "encode_linear")])])
def test_the_quantizers_warm_up_runs_only_the_jobs_method_and_grid(tmp_path, monkeypatch, method, sym, expected):
    """Kernels the job will not call would only hold up the other warm-ups (the driver loads modules one at a
    time); with no known job, every quantizer, sym and asym, is warmed."""
    import wq_ops.formats.compressed_tensors as ct
    import wq_ops.quant.awq as awq
    import wq_ops.quant.gptq as gptq
    import wq_ops.quant.rtn as rtn

    calls = []

    def recorder(name, returns=None):
        def record(*args, **kwargs):
            calls.append((name, kwargs["sym"]))
            return returns(*args) if returns else None
        return record

    real_rtn = rtn.quantize_rtn
    monkeypatch.setattr(gptq, "quantize_gptq", recorder("quantize_gptq"))
    monkeypatch.setattr(awq, "search_clip", recorder("search_clip"))
    monkeypatch.setattr(awq, "search_scales", recorder("search_scales"))
    monkeypatch.setattr(rtn, "quantize_rtn", lambda w, **k: (calls.append(("quantize_rtn", k["sym"])),
                                                             real_rtn(w, **{**k, "clip": None}))[1])
    monkeypatch.setattr(ct, "encode_linear", recorder("encode_linear"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    shapes = None
    if method is not None:
        model = _config(tmp_path, hidden_size=256, intermediate_size=768, num_attention_heads=8,
                        num_key_value_heads=2)
        shapes = job_shapes(_job(model, method=method, seq_len=128, **({} if sym else {"sym": False})))
    warm_up_quantizers(torch.device("cpu"), shapes)
    assert calls == expected


def _gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("method,backend", [("gptq", "cuda"), ("gptq", "reference"), ("awq", "cuda")])
def test_the_warm_up_runs_a_block_of_shapes_on_the_gpu(tmp_path, method, backend):
    _gpu()
    model = _config(tmp_path, hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=2)
    shapes = job_shapes(_job(model, method=method, backend=backend, seq_len=128, gpus_per_actor=1))
    assert warm_up_shapes(torch.device("cuda"), shapes) is True


@pytest.mark.gpu
def test_the_warm_ups_do_not_depend_on_the_default_dtype(tmp_path):
    """transformers sets torch's default dtype while it builds a model (the config's, bf16 here), and the
    driver's prepare thread builds one on the meta device while an in-process actor warms up: the
    warm-ups name every dtype they make. (Without that, cuSOLVER refused a bf16 Cholesky in one GPU job.)"""
    _gpu()
    model = _config(tmp_path, hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=2)
    shapes = job_shapes(_job(model, method="gptq", backend="cuda", seq_len=128, gpus_per_actor=1))
    device = torch.device("cuda")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        warm_up_libraries(device)
        warm_up_quantizers(device)
        assert warm_up_shapes(device, shapes) is True
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [Backend.CUDA, Backend.REFERENCE])
def test_the_warm_ups_run_side_by_side_on_the_gpu(tmp_path, backend):
    """The three warm-ups side by side (the shapes' on this thread), on the actor's device, under
    transformers' default dtype as in an in-process actor; the device works after them, and they hold none of
    its memory (each thread's cuBLAS workspace once stayed: 96 MiB on the H100, past a tiny job's plan)."""
    _gpu()
    model = _config(tmp_path, hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=2)
    shapes = job_shapes(_job(model, method="gptq", backend=backend.value, seq_len=128, gpus_per_actor=1))
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    before = torch.cuda.memory_allocated(device)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        warm_up_device(device, backend, shapes)
    finally:
        torch.set_default_dtype(previous)
    assert torch.cuda.memory_allocated(device) <= before
    assert torch.ones(4, device=device).sum().item() == 4


@pytest.mark.gpu
def test_a_width_the_group_size_does_not_divide_is_not_solved(tmp_path):
    """A job may ignore its one layer whose width the group size does not divide (down_proj here): the
    warm-up must not refuse what the job accepts."""
    _gpu()
    model = _config(tmp_path, hidden_size=256, intermediate_size=320, num_attention_heads=8, num_key_value_heads=2)
    shapes = job_shapes(_job(model, method="gptq", backend="cuda", seq_len=128, gpus_per_actor=1,
                             ignore=["*down_proj"]))
    assert warm_up_shapes(torch.device("cuda"), shapes) is True


@pytest.mark.gpu
def test_a_warm_up_that_cannot_run_says_so_and_does_not_fail(tmp_path, caplog):
    _gpu()
    free, _ = torch.cuda.mem_get_info()
    model = _config(tmp_path, hidden_size=1 << 16, intermediate_size=1 << 16, num_attention_heads=512)
    shapes = job_shapes(_job(model, samples=free // (1 << 16) // 2 // 1024 + 1, micro_batch_samples=1 << 20,
                             seq_len=1024))
    assert warm_up_shapes(torch.device("cuda"), shapes) is False      # its activations alone exceed the GPU
    assert "warm-up at the job's shapes skipped" in caplog.text
    torch.ones(1, device="cuda").item()                                # the device still works


@pytest.mark.gpu
def test_queued_host_copies_stage_the_bytes_waited_copies_do(tmp_path, monkeypatch):
    """Quantized propagation on the GPU: the artifact with the block's host copies queued (the writer
    waits for them) equals the one with each copy waited for where it is made."""
    _gpu()
    model = write_checkpoint(tmp_path / "m", "llama", num_hidden_layers=4)
    calib = write_text(tmp_path / "c.txt")

    queued = gpu_job_shards(tmp_path, model, calib, "queued")
    monkeypatch.setattr(staging_module, "queue_to_host", lambda t: t.to("cpu"))
    waited = gpu_job_shards(tmp_path, model, calib, "waited")
    assert queued == waited and len(queued) == 6


_FIRST_LINALG_TOGETHER = textwrap.dedent("""
    import sys, threading
    import torch
    import wq_ops.device.warm_up as wu
    from wq_ops.config import Backend

    if sys.argv[1] == "unloaded":
        wu._load_linalg = lambda device: None
    barrier = threading.Barrier(3, timeout=60)

    def first_linalg_call(device, *rest, **settings):
        barrier.wait()
        torch.linalg.cholesky_ex(torch.eye(8, device=device) * 2)
        return True

    wu.warm_up_libraries = wu.warm_up_quantizers = wu.warm_up_shapes = first_linalg_call
    wu.warm_up_device(torch.device("cuda", 0), Backend.CUDA, object())
    print("warmed up")
""")


@pytest.mark.gpu
def test_the_warm_ups_first_linalg_calls_do_not_race():
    """torch loads its CUDA linear algebra library on a process's first call into it, and first calls
    from two threads at once fail: the three warm-ups' first Cholesky, together, in a fresh process. (The
    script's "unloaded" mode, the same without the library loaded first, is the control: it failed in 4
    of 4 processes on the H100.)"""
    _gpu()
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _FIRST_LINALG_TOGETHER, "loaded"], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    assert done.returncode == 0 and "warmed up" in done.stdout, done.stderr[-3000:]
