"""Compile wq's CUDA kernels ahead of time: `python -m jobs.build_kernels` (the Dockerfile's build step), so a
fresh pod loads them instead of spending its first minute in nvcc. Needs nvcc and torch's CUDA build, no GPU;
the build lands in $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions/wq), where jobs look first."""

from __future__ import annotations

import sys
import time

from wq_ops.errors import KernelError
from wq_ops.kernels.build import build_extension


def main() -> int:
    start = time.perf_counter()
    try:
        library = build_extension()
    except KernelError as e:
        print(f"wq: error: {e}", file=sys.stderr)
        return 1
    print(f"built {library} ({library.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
