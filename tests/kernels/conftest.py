"""GPU kernel tests: each CUDA kernel against its PyTorch reference on fresh random inputs.
Run on the GPU machine with `pytest -m gpu tests/kernels`; skipped where torch sees no GPU."""

import pytest
import torch


@pytest.fixture
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")
