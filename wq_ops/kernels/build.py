"""Build (once, then cached) and load the CUDA extension that holds every kernel family.

The CUDA sources live in the checkout's top-level `kernels/` folder (not a Python package: `kernels` is
Hugging Face's import name); a wheel ships the same files as package data in `wq_ops/kernels/sources/`.
torch's JIT extension builder compiles the families' .cu files and the bindings with nvcc and ninja into its
extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions/wq); a rebuild happens only
when a source changes. Targets: sm_90a (Hopper: the H100/H200 this is tuned on), sm_80 (A100: no JIT there),
and compute_80 PTX, which the driver compiles for any other newer GPU. `build_extension` compiles with no GPU
present (a container image's build step: `python -m jobs.build_kernels`); `load_extension` loads that build.
Nothing falls back to the PyTorch reference: a failed build is a KernelError.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path
from types import ModuleType

from wq_ops.errors import KernelError

__all__ = ["load_extension", "build_extension", "source_root", "SOURCES", "CUDA_FLAGS"]


def source_root() -> Path:
    """The folder of the CUDA sources: the wheel's package data, else the checkout's `kernels/`."""
    here = Path(__file__).resolve().parent
    for root in (here / "sources", here.parents[1] / "kernels"):
        if (root / "extension.cpp").is_file():
            return root
    raise KernelError(f"the CUDA sources are missing: neither {here / 'sources'} (an installed wheel) nor "
                      f"{here.parents[1] / 'kernels'} (a checkout) holds extension.cpp; reinstall wq")


ROOT = source_root()
SOURCES = [ROOT / "extension.cpp"] + sorted(ROOT.glob("*/binding.cpp")) + sorted(ROOT.glob("*/*.cu"))
# No --use_fast_math: the kernels reproduce the reference's IEEE division and rounding bit for bit.
CUDA_FLAGS = ["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80",
              "-gencode=arch=compute_80,code=compute_80"]
HOST_FLAGS = ["-O3", "-std=c++17"]


def _source_digest() -> str:
    """Of every source, the flags and torch's version: a build's name says exactly what it was built from
    and against (a build loaded directly skips torch's own checks)."""
    import torch

    versions = [torch.__version__, str(torch.version.cuda), sys.version]
    h = hashlib.sha256("\0".join(CUDA_FLAGS + HOST_FLAGS + versions).encode())
    for path in SOURCES + sorted((ROOT / "include").glob("*")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _unique_sources(digest: str) -> list[str]:
    """Every family's binding is named binding.cpp, but ninja wants one object name per source: compile
    each through a one-line wrapper named after its family. The digest of every source is in the folder
    and extension names, so any edit builds afresh and a stale build is never loaded."""
    folder = _build_directory(f"wq_sources_{digest}")
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
    """The extension, built here first unless a finished build of these sources is in the cache."""
    import torch

    if not torch.cuda.is_available():
        raise KernelError("backend=cuda needs a CUDA GPU, and torch sees none; use backend=reference on CPU")
    digest = _source_digest()
    name = _extension_name(digest)
    built = _load_built(name)
    return built if built is not None else _compile(name, digest)


def build_extension() -> Path:
    """Compile the extension into the cache (nothing to do where a finished build is there) and return its
    library's path. Needs nvcc and torch's CUDA build, not a GPU."""
    digest = _source_digest()
    name = _extension_name(digest)
    library = _build_directory(name) / f"{name}.so"
    if _load_built(name) is None:
        _compile(name, digest)
    return library


def _extension_name(digest: str) -> str:
    return f"wq_cuda_kernels_{digest}"


def _compile(name: str, digest: str) -> ModuleType:
    """Build the extension `name` from the sources whose digest is `digest`."""
    from torch.utils.cpp_extension import load

    try:
        return load(name=name, sources=_unique_sources(digest), extra_cflags=HOST_FLAGS, extra_cuda_cflags=CUDA_FLAGS,
                    extra_include_paths=[str(ROOT / "include"), str(ROOT)], build_directory=str(_build_directory(name)),
                    verbose=False)
    except (RuntimeError, OSError, ImportError) as e:
        raise KernelError(f"building the CUDA kernels ({', '.join(s.name for s in SOURCES)}) failed: {e}") from None


def _build_directory(name: str) -> Path:
    """Our own folder in the extension cache (made if missing), so that a new process finds a finished
    build without importing torch.utils.cpp_extension: that import alone (setuptools and all) took 0.9 s
    of every job's start-up on the H100 machine. The build's name covers the Python and torch versions."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache, "torch_extensions", "wq")
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _load_built(name: str) -> ModuleType | None:
    """The extension a finished build of these exact sources left in the cache, imported directly: torch's
    loader would rerun its ninja check (seconds) in every new process. None when there is no such build,
    or when it cannot be imported (then it is rebuilt)."""
    import importlib.util

    library = _build_directory(name) / f"{name}.so"
    # The build's lock file exists while ninja runs: a library beside it may be half written.
    if not library.is_file() or (library.parent / "lock").exists():
        return None
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        return None
    try:
        module = importlib.util.module_from_spec(spec)         # dlopen happens here
        spec.loader.exec_module(module)
    except ImportError:
        return None
    return module
