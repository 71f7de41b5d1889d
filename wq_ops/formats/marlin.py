"""vLLM's Marlin kernel (its default W4A16/W8A16 kernel on compute capability >= 8.0): the shapes and grids it
takes, as vLLM's marlin_utils.py states them. Read by the tensor-parallel checks and the loader requirements."""

__all__ = ["MARLIN_MIN_THREAD_N", "MARLIN_MIN_THREAD_K", "MARLIN_GROUP_SIZES", "MARLIN_BITS"]

# Tile sizes and group sizes.
MARLIN_MIN_THREAD_N = 64            # GPTQ_MARLIN_MIN_THREAD_N: output features per rank
MARLIN_MIN_THREAD_K = 128           # GPTQ_MARLIN_MIN_THREAD_K: input features per rank
MARLIN_GROUP_SIZES = (None, 32, 64, 128)     # MARLIN_SUPPORTED_GROUP_SIZES ([-1, 32, 64, 128]; -1 = channel)
MARLIN_BITS = (4, 8)
