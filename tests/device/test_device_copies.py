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
