"""The Python side of wq's CUDA kernels: one subpackage per family (wrapper with the argument checks, and a
plain-PyTorch `reference.py` that runs on any device and in float64), and the build. The CUDA sources and
bindings live in the checkout's top-level `kernels/` folder, which is not a Python package: `kernels` is
Hugging Face's import name (transformers imports it).

The backend is always chosen explicitly (`wq_ops.config.Backend`): a missing CUDA build is an error,
never a silent fallback to the reference.
"""
