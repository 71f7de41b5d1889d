"""Shared fixtures: fresh random seeds (reported on failure), and the real SmolLM2 checkpoint."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WQ_SHARED", REPO.parent / "shared"))


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A fresh seed per test run (WQ_TEST_SEED pins one to reproduce a failure); shown when a test fails."""
    value = int(os.environ.get("WQ_TEST_SEED", secrets.randbits(31)))
    request.node.add_report_section("call", "seed", f"WQ_TEST_SEED={value}")
    return value


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SmolLM2-135M as a sharded bf16 HF checkpoint, built once from the shared GGUF.
    WQ_SMOLLM2_DIR points at a prebuilt copy (the build script leaves a complete one alone)."""
    script = SHARED / "tools" / "make-smollm2-checkpoint.sh"
    if not script.exists():
        pytest.skip(f"no shared assets at {SHARED} (set WQ_SHARED)")
    out = Path(os.environ.get("WQ_SMOLLM2_DIR") or tmp_path_factory.mktemp("smollm2") / "hf")
    subprocess.run(["bash", str(script), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole run: starting one takes seconds. Jobs see it and leave it running."""
    import logging

    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()
