"""Build (once, then cached) and load the CUDA extension that holds every kernel family.

torch's JIT extension builder compiles kernels/*/*.cu and the bindings with nvcc and ninja into its
extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions); a rebuild happens only when
a source changes. Targets: sm_90a (Hopper: the H100/H200 this is tuned on) and compute_80 PTX, which
the driver compiles for any newer GPU. Nothing falls back to the PyTorch reference: a failed build is
a KernelError.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from types import ModuleType

from wq_ops.errors import KernelError

__all__ = ["load_extension", "SOURCES", "CUDA_FLAGS"]

ROOT = Path(__file__).resolve().parent
SOURCES = [ROOT / "extension.cpp"] + sorted(ROOT.glob("*/binding.cpp")) + sorted(ROOT.glob("*/*.cu"))
# No --use_fast_math: the kernels reproduce the reference's IEEE division and rounding bit for bit.
CUDA_FLAGS = ["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=compute_80"]


def _source_digest() -> str:
    h = hashlib.sha256()
    for path in SOURCES + sorted((ROOT / "include").glob("*")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _unique_sources(digest: str) -> list[str]:
    """Every family's binding is named binding.cpp, but ninja wants one object name per source: compile
    each through a one-line wrapper named after its family. The digest of every source is in the folder
    and extension names, so any edit builds afresh and a stale build is never loaded."""
    import torch.utils.cpp_extension as ext

    folder = Path(ext._get_build_directory(f"wq_sources_{digest}", verbose=False))
    names = []
    for src in SOURCES:
        family = src.parent.name if src.parent != ROOT else "wq"
        wrapper = folder / f"{family}_{src.name}"
        text = f'#include "{src}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        names.append(str(wrapper))
    return names


@functools.lru_cache(maxsize=1)
def load_extension() -> ModuleType:
    import torch

    if not torch.cuda.is_available():
        raise KernelError("backend=cuda needs a CUDA GPU, and torch sees none; use backend=reference on CPU")
    from torch.utils.cpp_extension import load

    digest = _source_digest()
    try:
        return load(name=f"wq_cuda_kernels_{digest}", sources=_unique_sources(digest),
                    extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=CUDA_FLAGS,
                    extra_include_paths=[str(ROOT / "include"), str(ROOT)], verbose=False)
    except (RuntimeError, OSError, ImportError) as e:
        raise KernelError(f"building the CUDA kernels ({', '.join(s.name for s in SOURCES)}) failed: {e}") from None
