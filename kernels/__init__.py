"""wq's kernels: one directory per family, each with its CUDA source, C++ binding, Python wrapper and a
plain-PyTorch `reference.py` that runs on any device and in float64.

The backend is always chosen explicitly (`wq_ops.config.Backend`): a missing CUDA build is an error,
never a silent fallback to the reference.
"""
