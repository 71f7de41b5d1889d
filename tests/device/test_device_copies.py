"""A GPU actor's block weights reach the device through pinned staging memory (`queue_to_device`), so
their copy runs beside the compute stream's work rather than holding up its launches. The staging memory
must hold each block's bytes until its copy has run, and the artifact must not depend on the route."""

import pytest
import torch

from tests.factory import gpu_job_shards, write_checkpoint, write_text
from wq_ops.cluster import loader as loader_module
from wq_ops.device.transport import queue_to_device


def _gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("source_dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_queued_copy_is_the_source_in_the_models_dtype(source_dtype):
    _gpu()
    source = torch.randn(257, 1031, generator=torch.Generator().manual_seed(0)).to(source_dtype)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = queue_to_device(source, torch.bfloat16, torch.device("cuda"))
    stream.synchronize()
    assert out.is_cuda and out.dtype == torch.bfloat16 and out.shape == source.shape
    assert torch.equal(out.cpu(), source.to(torch.bfloat16))


@pytest.mark.gpu
def test_staging_memory_is_not_reused_before_its_copy_runs():
    """The copies wait behind a long kernel on their stream while later blocks are staged: had the
    staging memory been handed out again before its copy ran, an earlier block would arrive with a later
    one's bytes."""
    _gpu()
    device = torch.device("cuda")
    stream = torch.cuda.Stream()
    sources = [torch.full((1024, 1024), float(k), dtype=torch.bfloat16) for k in range(12)]
    outs = []
    with torch.cuda.stream(stream):
        torch.cuda._sleep(2_000_000_000)       # about 1 s of a busy stream before any copy may run
        for k, source in enumerate(sources):
            outs.append(queue_to_device(source.clone(), torch.bfloat16, device))
            del source
    assert not stream.query(), "the copies ran before the test could queue them all: sleep longer"
    stream.synchronize()
    for k, out in enumerate(outs):
        assert torch.equal(out.cpu(), torch.full((1024, 1024), float(k), dtype=torch.bfloat16)), k


@pytest.mark.gpu
@pytest.mark.parametrize("propagation", ["quantized", "float"])
def test_pinned_staging_writes_the_bytes_pageable_copies_do(tmp_path, monkeypatch, propagation):
    _gpu()
    model = write_checkpoint(tmp_path / "m", "llama", num_hidden_layers=4)
    calib = write_text(tmp_path / "c.txt")

    pinned = gpu_job_shards(tmp_path, model, calib, "pinned", propagation=propagation)
    monkeypatch.setattr(loader_module, "queue_to_device",
                        lambda t, dtype, device: t.to(dtype).to(device, non_blocking=True))
    pageable = gpu_job_shards(tmp_path, model, calib, "pageable", propagation=propagation)
    assert pinned == pageable and len(pinned) == 6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn,
                                   torch.float8_e5m2, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_every_dtype_an_artifact_holds_travels_between_actors_bit_for_bit(dtype):
    """to_host / from_host (what an expert actor's packed tensors and outputs travel as): the same bits, the
    same dtype and shape, through pickling as Ray's object store would."""
    import pickle

    from wq_ops.device.transport import from_host, to_host

    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (3, 5, 8), dtype=torch.uint8, generator=gen)
    value = raw.view(dtype)                       # (3, 5, 8 / itemsize): every bit pattern, NaNs included
    back = from_host(pickle.loads(pickle.dumps(to_host(value))), "cpu")
    assert back.dtype == dtype and back.shape == value.shape
    assert torch.equal(back.view(torch.uint8), value.view(torch.uint8))
