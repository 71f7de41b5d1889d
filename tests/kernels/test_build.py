"""The extension cache: a finished build is imported directly by a new process, and its name changes
with any source or flag (so a stale build is never loaded)."""

import subprocess
import sys

import pytest

from wq_ops.kernels import build


def test_the_build_name_covers_sources_and_flags(monkeypatch):
    before = build._source_digest()
    monkeypatch.setattr(build, "CUDA_FLAGS", build.CUDA_FLAGS + ["-lineinfo"])
    assert build._source_digest() != before


def test_no_finished_build_means_none(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert build._load_built("wq_cuda_kernels_absent") is None


def test_a_build_still_locked_is_not_imported(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "wq_cuda_kernels_x"
    folder.mkdir()
    (folder / "wq_cuda_kernels_x.so").write_bytes(b"half written")
    (folder / "lock").touch()
    assert build._load_built("wq_cuda_kernels_x") is None
    (folder / "lock").unlink()
    assert build._load_built("wq_cuda_kernels_x") is None       # not a library: rebuilt, never raised


@pytest.mark.gpu
def test_a_new_process_imports_the_cached_build(cuda):
    build.load_extension()
    code = ("import time, torch; from wq_ops.kernels import build; t = time.perf_counter(); "
            "m = build._load_built(f'wq_cuda_kernels_{build._source_digest()}'); "
            "print(m is not None and hasattr(m, 'gptq_solve_block'), round(time.perf_counter() - t, 3))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True", out
