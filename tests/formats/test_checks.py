"""Conditions on an artifact's tensors: checked at once on the host, queued on the GPU and raised, with
their messages, once read back (`wq_ops.formats.checks`)."""

import pytest
import torch

from wq_ops.errors import ArtifactError
from wq_ops.formats.checks import Checks, raise_failed, require
from wq_ops.formats.compressed_tensors import encode_linear
from wq_ops.quant.result import QuantResult

NAME = "model.layers.0.mlp.up_proj"


def _sym_result(device: str, bad_zero: bool) -> QuantResult:
    zero = torch.full((4, 2), 8, dtype=torch.uint8)
    if bad_zero:
        zero[2, 1] = 7
    return QuantResult(codes=torch.zeros(4, 64, dtype=torch.uint8, device=device),
                       scale=torch.ones(4, 2, device=device), zero=zero.to(device), bits=4, group_size=32)


def test_require_raises_at_once_without_checks_or_on_the_host():
    with pytest.raises(ArtifactError, match="first"):
        require(torch.tensor(False), "first", None)
    checks = Checks()
    with pytest.raises(ArtifactError, match="host"):
        require(torch.tensor(False), "host", checks)
    require(torch.tensor(True), "fine", checks)
    assert checks.messages == () and checks.values() == []


def test_raise_failed_names_the_first_condition_that_failed():
    raise_failed(("a", "b"), torch.tensor([1.0, 1.0], dtype=torch.float64))
    with pytest.raises(ArtifactError, match="^b$"):
        raise_failed(("a", "b", "c"), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        raise_failed(("a", "b"), torch.tensor([1.0], dtype=torch.float64))


def test_a_symmetric_result_with_another_zero_point_is_refused_on_the_host():
    encode_linear(NAME, _sym_result("cpu", False), sym=True, scale_dtype=torch.bfloat16, checks=Checks())
    with pytest.raises(ArtifactError, match="symmetric scheme needs every zero point at 8"):
        encode_linear(NAME, _sym_result("cpu", True), sym=True, scale_dtype=torch.bfloat16, checks=Checks())


@pytest.mark.gpu
@pytest.mark.parametrize("bad_zero", [False, True])
def test_on_the_gpu_the_zero_point_check_is_queued_and_raised_once_read(bad_zero):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from wq_ops.config import Backend

    encode_linear(NAME, _sym_result("cuda", False), sym=True, scale_dtype=torch.bfloat16,
                  backend=Backend.CUDA)                   # loads the packing kernel before the strict run
    result = _sym_result("cuda", bad_zero)                # its copies to the device are made before the strict run
    checks = Checks()
    torch.cuda.set_sync_debug_mode("error")
    try:
        encode_linear(NAME, result, sym=True, scale_dtype=torch.bfloat16, backend=Backend.CUDA, checks=checks)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(checks.messages) == 1
    read = torch.cat([v.to(torch.float64) for v in checks.values()]).cpu()
    if bad_zero:
        with pytest.raises(ArtifactError, match=f"{NAME}: a symmetric scheme needs every zero point at 8"):
            raise_failed(checks.messages, read)
    else:
        raise_failed(checks.messages, read)
