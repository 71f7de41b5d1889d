"""Which kernels a backend means, chosen here once (`kernels_for`) and handed to the quantizers, which never
look a backend up themselves. The CUDA kernels are imported only when asked for: the extension is built on
first use, only where a GPU is."""

from __future__ import annotations

from dataclasses import dataclass

from wq_ops.config import Backend
from wq_ops.kernels.awq import AwqPrimitives
from wq_ops.kernels.awq import reference as awq_reference
from wq_ops.kernels.clip_search import ClipSearch
from wq_ops.kernels.clip_search.reference import search_clip as reference_clip_search
from wq_ops.kernels.gptq import GptqSolver
from wq_ops.kernels.gptq.reference import FLOAT32_SOLVER

__all__ = ["Kernels", "kernels_for"]


@dataclass(frozen=True)
class Kernels:
    gptq: GptqSolver          # GPTQ's layer loop
    awq: AwqPrimitives        # AWQ's scale and clip searches
    clip_search: ClipSearch   # RTN's clip search


def kernels_for(backend: Backend) -> Kernels:
    if backend is Backend.CUDA:
        from wq_ops.kernels.awq import cuda as awq_cuda
        from wq_ops.kernels.clip_search.cuda import search_clip as cuda_clip_search
        from wq_ops.kernels.gptq.cuda import CUDA_SOLVER

        return Kernels(gptq=CUDA_SOLVER, awq=awq_cuda, clip_search=cuda_clip_search)
    return Kernels(gptq=FLOAT32_SOLVER, awq=awq_reference, clip_search=reference_clip_search)
